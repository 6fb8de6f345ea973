"""train.py --init-from: fine-tuning a trained SSD300 into another class set."""
import json

import pytest
import torch

import eval as evaluation
import model
import train
from conftest import TINY
from create_data_lists import create_data_lists



@pytest.fixture(scope="module")
def source(tiny_checkpoint):
    """A briefly trained 3-class shapes checkpoint."""
    return tiny_checkpoint


@pytest.fixture(scope="module")
def subset_lists(shapes_root, tmp_path_factory):
    """The shapes data with two of its classes, in another order (triangles dropped)."""
    output = tmp_path_factory.mktemp("subset")
    create_data_lists([(shapes_root, "trainval")], [(shapes_root, "test")], output,
                      classes=["square", "circle"], skip_unknown=True)
    return output


def test_shared_classes_are_copied_row_by_row_and_the_rest_kept(source):
    state = torch.load(source, map_location="cpu", weights_only=True)
    label_map = {"background": 0, "square": 1, "star": 2, "circle": 3}
    net = model.SSD(4, width=0.0625, base_bn="train")
    fresh = {k: v.clone() for k, v in net.state_dict().items()}
    shared = model.load_for_new_classes(net, state["model"], label_map, state["config"]["label_map"])
    assert shared == ["background", "square", "circle"]
    old_map = state["config"]["label_map"]
    for key, value in net.state_dict().items():
        if not key.startswith("pred_convs.cl."):
            assert torch.equal(value, state["model"][key]), key
            continue
        new = value.view(-1, 4, *value.shape[1:])
        old = state["model"][key].view(-1, len(old_map), *value.shape[1:])
        for name in shared:
            assert torch.equal(new[:, label_map[name]], old[:, old_map[name]]), (key, name)
        assert torch.equal(new[:, 2], fresh[key].view(-1, 4, *value.shape[1:])[:, 2])   # "star": new


def test_fine_tuning_into_a_subset_trains_and_evaluates(source, subset_lists, tmp_path, capsys):
    args = TINY + ["--iterations", "2", "--data-folder", str(subset_lists), "--out", str(tmp_path),
                   "--init-from", str(source)]
    assert train.main(args) == 0
    state = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["config"]["init_from"] == str(source) and state["config"]["n_classes"] == 3
    assert state["config"]["pretrained"] is False
    assert "class scores copied for background, square, circle" in capsys.readouterr().out
    assert evaluation.main([str(tmp_path / "checkpoint.pt"), "--workers", "0", "--amp", "off"]) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("class"))
    assert header.split() == ["class", "VOC07", "AP", "area", "AP", "AP", "AP50", "AP75", "APs",
                              "APm", "APl", "AR1", "AR10", "AR100"]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["coco_per_class"]) == {"square", "circle"}
    assert 0.0 <= results["coco"]["AP"] <= results["coco"]["AP50"] <= 1.0


def test_another_architecture_or_resume_is_refused(source, subset_lists, tmp_path, capsys):
    args = TINY + ["--iterations", "2", "--data-folder", str(subset_lists), "--out", str(tmp_path),
                   "--init-from", str(source)]
    assert train.main(args + ["--width", "0.125"]) == 2
    assert "trained with width=0.0625, this run has 0.125" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(args + ["--resume"])
    assert "--init-from starts a new run" in capsys.readouterr().err
