"""Shared fixtures: the repository root on sys.path, a small built-in "shapes" dataset with its
lists, and a tiny trained SSD300."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402
from create_data_lists import create_data_lists  # noqa: E402
from shapes import SHAPE_CLASSES, make_shapes_dataset  # noqa: E402

# train.py arguments for a tiny SSD300 (1/16 of the channels, batch 4): seconds per run on two
# cores. Float32 (--amp off): bf16 is only fast on CPUs that have it. Add --data-folder, --out.
TINY = ["--preset", "toy", "--width", "0.0625", "--batch-size", "4", "--workers", "0",
        "--warmup", "2", "--print-every", "2", "--lr", "0.001", "--eval-every", "0", "--amp", "off"]


def pytest_configure(config):
    """Deprecations fail the suite, whoever warns (torchvision warns from its own module, so a
    filter on our modules' names would miss it): the next one is seen at once, not when a
    release removes what it names."""
    for category in ("DeprecationWarning", "PendingDeprecationWarning", "FutureWarning"):
        config.addinivalue_line("filterwarnings", f"error::{category}")


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory):
    """A small shapes dataset in VOC layout (60 trainval, 20 test images)."""
    root = tmp_path_factory.mktemp("data") / "shapes"
    make_shapes_dataset(root, n_trainval=60, n_test=20, seed=0)
    return root


@pytest.fixture(scope="session")
def shapes_lists(shapes_root, tmp_path_factory):
    """Folder with the JSON lists of `shapes_root`, as written by create_data_lists.py."""
    output = tmp_path_factory.mktemp("shapes_lists")
    create_data_lists([(shapes_root, "trainval")], [(shapes_root, "test")], output, classes=SHAPE_CLASSES)
    return output


@pytest.fixture(scope="session")
def tiny_checkpoint(shapes_lists, tmp_path_factory):
    """A tiny SSD300 trained for 30 steps at lr 3e-3 on the shapes lists: confident enough to
    detect every class, and made once for every test module that only reads it."""
    out = tmp_path_factory.mktemp("tiny_run")
    assert train.main(TINY + ["--iterations", "30", "--lr", "0.003", "--data-folder", str(shapes_lists),
                              "--out", str(out)]) == 0
    return out / "checkpoint.pt"
