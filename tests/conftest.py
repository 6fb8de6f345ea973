"""Shared fixtures: the repository root on sys.path and a small built-in "shapes" dataset with its lists."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from create_data_lists import create_data_lists  # noqa: E402
from shapes import SHAPE_CLASSES, make_shapes_dataset  # noqa: E402


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
