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


def test_classes_must_match_the_checkpoint(checkpoint, shapes_lists, tmp_path, capsys):
    for f in shapes_lists.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "label_map.json").write_text(json.dumps({"background": 0, "cat": 1, "dog": 2, "cow": 3}))
    assert evaluation.main([str(checkpoint), "--data-folder", str(tmp_path), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "has classes ['circle', 'square', 'triangle']" in err and "['cat', 'dog', 'cow']" in err
    # The same classes in another order: the message says so rather than listing two equal sets.
    (tmp_path / "label_map.json").write_text(
        json.dumps({"background": 0, "square": 1, "circle": 2, "triangle": 3}))
    assert evaluation.main([str(checkpoint), "--data-folder", str(tmp_path), "--workers", "0"]) == 2
    assert ("in another order: ['square', 'circle', 'triangle'] instead of "
            "['circle', 'square', 'triangle']") in capsys.readouterr().err


def test_missing_checkpoint_data_or_foreign_file(checkpoint, tmp_path, capsys):
    assert evaluation.main([str(tmp_path / "none.pt")]) == 2
    assert "none.pt" in capsys.readouterr().err
    assert evaluation.main([str(checkpoint), "--data-folder", str(tmp_path / "gone")]) == 2
    assert "gone" in capsys.readouterr().err
    foreign = tmp_path / "resnet.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, foreign)
    assert evaluation.main([str(foreign)]) == 2
    assert "not an SSD checkpoint" in capsys.readouterr().err
