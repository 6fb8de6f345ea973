"""eval.py end to end on the built-in dataset, and its clear errors."""
import json

import pytest
import torch

import eval as evaluation


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    """A briefly trained tiny SSD300 on the shapes lists."""
    return tiny_checkpoint


def test_eval_writes_results_and_pr_curves(checkpoint, tmp_path, capsys):
    assert evaluation.main([str(checkpoint), "--workers", "0", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["aps_07"]) == {"circle", "square", "triangle"}
    assert 0.0 <= results["mAP_07"] <= 1.0 and 0.0 <= results["mAP"] <= 1.0
    assert results["mAP_07"] == pytest.approx(sum(results["aps_07"].values()) / 3)
    assert results["iteration"] == 30 and results["min_score"] == 0.01 and results["top_k"] == 200
    assert (tmp_path / "pr_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "triangle" in printed and "images/s" in printed


def test_eval_with_cpu_inference_options(checkpoint, tmp_path):
    assert evaluation.main([str(checkpoint), "--workers", "0", "--amp", "off", "--no-channels-last",
                            "--out", str(tmp_path / "fp32")]) == 0
    assert evaluation.main([str(checkpoint), "--workers", "0", "--amp", "bf16", "--channels-last",
                            "--out", str(tmp_path / "bf16")]) == 0
    fp32, bf16 = (json.loads((tmp_path / m / "results.json").read_text()) for m in ("fp32", "bf16"))
    assert (fp32["precision"], bf16["precision"]) == ("fp32, NCHW", "bf16 autocast, channels_last")
    assert abs(fp32["mAP_07"] - bf16["mAP_07"]) < 0.05


def test_eval_defaults_to_the_runs_data_and_folder(checkpoint):
    assert evaluation.main([str(checkpoint), "--workers", "0"]) == 0
    assert (checkpoint.parent / "results.json").is_file()


def relabelled_lists(shapes_lists, folder, label_map, keep=None):
    """A copy of the shapes lists' test split under another label map (name -> index), each
    object relabelled by its class name; only the classes in `keep` if given."""
    folder.mkdir()
    names = {i: name for name, i in json.loads((shapes_lists / "label_map.json").read_text()).items()}
    objects = json.loads((shapes_lists / "TEST_objects.json").read_text())
    for entry in objects:
        kept = [k for k, label in enumerate(entry["labels"]) if keep is None or names[label] in keep]
        for key in ("boxes", "difficulties"):
            entry[key] = [entry[key][k] for k in kept]
        entry["labels"] = [label_map[names[entry["labels"][k]]] for k in kept]
    (folder / "TEST_objects.json").write_text(json.dumps(objects))
    (folder / "TEST_images.json").write_text((shapes_lists / "TEST_images.json").read_text())
    (folder / "label_map.json").write_text(json.dumps(label_map))
    return folder


def test_test_classes_are_matched_to_the_checkpoints_by_name(checkpoint, shapes_lists, tmp_path, capsys):
    """Another order, a subset at other indices (with a gap): the same AP per class as the
    checkpoint's own lists give; lists of other classes are refused in one line."""
    def evaluate(folder, out):
        assert evaluation.main([str(checkpoint), "--data-folder", str(folder), "--workers", "0",
                                "--amp", "off", "--out", str(tmp_path / out)]) == 0
        return json.loads((tmp_path / out / "results.json").read_text())

    reference = evaluate(shapes_lists, "reference")
    reordered = evaluate(relabelled_lists(shapes_lists, tmp_path / "reordered",
                                          {"background": 0, "square": 1, "triangle": 2, "circle": 3}), "r")
    subset = evaluate(relabelled_lists(shapes_lists, tmp_path / "subset", {"background": 0, "triangle": 2,
                                                                           "circle": 5}, keep=("circle", "triangle")), "s")
    assert reordered["aps_07"] == reference["aps_07"]
    assert subset["aps_07"] == {c: reference["aps_07"][c] for c in ("circle", "triangle")}
    # The COCO API's sums run in class order: equal to the last bits but one.
    for found, expected in ((reordered["coco"], reference["coco"]),
                            (subset["coco_per_class"]["circle"], reference["coco_per_class"]["circle"])):
        assert found.keys() == expected.keys() and all(
            (a is None and b is None) or a == pytest.approx(b, rel=1e-12) for a, b in zip(found.values(), expected.values()))
    other = relabelled_lists(shapes_lists, tmp_path / "other", json.loads((shapes_lists / "label_map.json").read_text()))
    (other / "label_map.json").write_text(json.dumps({"background": 0, "cat": 1, "dog": 2, "cow": 3}))
    capsys.readouterr()
    assert evaluation.main([str(checkpoint), "--data-folder", str(other), "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not detect 3 of the test lists' classes (cat, cow, dog)" in err[0]
    assert "share no class" in err[0]


def test_missing_checkpoint_data_or_foreign_file(checkpoint, tmp_path, capsys):
    assert evaluation.main([str(tmp_path / "none.pt")]) == 2
    assert "none.pt" in capsys.readouterr().err
    assert evaluation.main([str(checkpoint), "--data-folder", str(tmp_path / "gone")]) == 2
    assert "gone" in capsys.readouterr().err
    foreign = tmp_path / "resnet.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, foreign)
    assert evaluation.main([str(foreign)]) == 2
    assert "not an SSD checkpoint" in capsys.readouterr().err
