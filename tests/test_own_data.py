"""Your own data: COCO-format files and plain labelling-tool folders to the JSON lists."""
import json
import shutil

import pytest
import torch
from PIL import Image

import create_data_lists as lists
from datasets import DataError
from shapes import voc_xml
from metrics import coco_dataset


def read(folder, *names):
    return [json.loads((folder / f"{name}.json").read_text()) for name in names]


def export_coco(lists_folder, split, path):
    """A lists folder's split as a COCO file (difficult objects as crowd), file names relative
    to the images' folder; returns that folder."""
    images, objects = read(lists_folder, f"{split}_images", f"{split}_objects")
    label_map, = read(lists_folder, "label_map")
    data = coco_dataset([torch.tensor(o["boxes"], dtype=torch.float64).reshape(-1, 4) for o in objects],
                        [torch.tensor(o["labels"]) for o in objects], None,
                        [torch.tensor(o["difficulties"]) for o in objects],
                        [o["size"] for o in objects], len(label_map))
    for image, path_ in zip(data["images"], images):
        image["file_name"] = path_.rsplit("/", 1)[1]
    data["categories"] = [{"id": i, "name": name} for name, i in label_map.items() if i]
    path.write_text(json.dumps(data))
    return images[0].rsplit("/", 1)[0]


def test_shapes_through_coco_give_the_same_lists(shapes_lists, tmp_path):
    folder = export_coco(shapes_lists, "TRAIN", tmp_path / "train.json")
    export_coco(shapes_lists, "TEST", tmp_path / "test.json")
    lists.main(["--coco-train", str(tmp_path / "train.json"), folder,
                "--coco-test", str(tmp_path / "test.json"), folder, "--output", str(tmp_path / "out")])
    names = ["label_map", "TRAIN_images", "TRAIN_objects", "TEST_images", "TEST_objects"]
    assert read(tmp_path / "out", *names) == read(shapes_lists, *names)
    assert any(any(o["difficulties"]) for o in read(tmp_path / "out", "TRAIN_objects")[0])


def hand_made(tmp_path, bbox=(300, 10, 50, 30), image_id=2):
    """Non-contiguous category ids in an order of their own, a crowd box, an image without
    objects, a box sticking out by half a pixel (clipped), and one more box."""
    for name in ("a.jpg", "b.jpg", "empty.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    data = {"images": [{"id": 10, "file_name": "a.jpg", "width": 640, "height": 480},
                       {"id": 2, "file_name": "b.jpg", "width": 320, "height": 240},
                       {"id": 7, "file_name": "empty.jpg", "width": 100, "height": 100}],
            "categories": [{"id": 9, "name": "Dog"}, {"id": 3, "name": "cat"}],
            "annotations": [
                {"id": 1, "image_id": 10, "category_id": 3, "bbox": [10.5, 20, 100.25, 50], "iscrowd": 0},
                {"id": 2, "image_id": 2, "category_id": 9, "bbox": [0, 0, 320.5, 240], "iscrowd": 0},
                {"id": 5, "image_id": 10, "category_id": 9, "bbox": [200, 100, 300, 300], "iscrowd": 1},
                {"id": 6, "image_id": image_id, "category_id": 3, "bbox": list(bbox)}]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    return ["--coco-train", str(tmp_path / "ann.json"), str(tmp_path), "--test-fraction", "0.34",
            "--output", str(tmp_path / "out")]


def test_a_hand_made_coco_file(tmp_path):
    lists.main(hand_made(tmp_path, bbox=(250, 10, 50, 30)))
    label_map, train, test, train_objects, test_objects, split = read(
        tmp_path / "out", "label_map", "TRAIN_images", "TEST_images", "TRAIN_objects", "TEST_objects", "split")
    assert label_map == {"background": 0, "dog": 1, "cat": 2}      # the file's order, not the ids'
    objects = dict(zip(train + test, train_objects + test_objects))
    assert objects[str(tmp_path / "a.jpg")] == {
        "boxes": [[10.5, 20.0, 110.75, 70.0], [200.0, 100.0, 500.0, 400.0]], "labels": [2, 1],
        "difficulties": [0, 1], "size": [640, 480]}
    assert objects[str(tmp_path / "b.jpg")] == {
        "boxes": [[0.0, 0.0, 320.0, 240.0], [250.0, 10.0, 300.0, 40.0]], "labels": [1, 2],
        "difficulties": [0, 0], "size": [320, 240]}
    assert objects[str(tmp_path / "empty.jpg")]["boxes"] == []       # kept: a negative
    assert len(test) == 1 and split["TEST"] == test and split["seed"] == 0


@pytest.mark.parametrize("change, message", [
    (dict(bbox=(300, 10, 50, 30)), r"ann\.json: annotation 6 \(image .*b\.jpg\): bbox \[300, 10, 50, 30\] "
                                   r"of 'cat' is empty or outside the 320x240 image .*--skip-bad-boxes"),
    (dict(bbox=(30, 10, 0, 30)), r"ann\.json: annotation 6 .* is empty or outside"),
    (dict(image_id=99), r"ann\.json: annotation 6 refers to image 99, which the file does not list"),
])
def test_coco_errors_name_the_file_and_annotation_and_write_nothing(tmp_path, change, message):
    with pytest.raises(DataError, match=message):
        lists.main(hand_made(tmp_path, **change))
    assert not (tmp_path / "out").exists()


def test_bad_coco_boxes_are_skipped_on_request_and_missing_images_named(tmp_path, capsys):
    lists.main(hand_made(tmp_path) + ["--skip-bad-boxes"])
    assert "skipped: bad box                   1" in capsys.readouterr().out
    args = hand_made(tmp_path, bbox=(250, 10, 50, 30))
    (tmp_path / "b.jpg").unlink()
    with pytest.raises(DataError, match=r"ann\.json: 1 of its 3 images are not in .*b\.jpg"):
        lists.main(args)


def labelimg_folder(root):
    """labelImg's layout: images and XML side by side; img_3 exported with augmented copies."""
    root.mkdir()
    stems = [f"img_{i}" for i in range(10)] + [f"img_3_aug{k}" for k in range(1, 5)]
    for stem in stems:
        Image.new("RGB", (60, 40)).save(root / f"{stem}.jpg")
        (root / f"{stem}.xml").write_text(voc_xml(stem, (60, 40), [("cat", (2, 2, 30, 20), 0)]))
    Image.new("RGB", (60, 40)).save(root / "unlabelled.png")
    return root


def test_a_plain_folder_is_split_reproducibly(tmp_path, capsys):
    root = labelimg_folder(tmp_path / "photos")
    splits = []
    for seed in range(6):
        out = tmp_path / f"out{seed}"
        lists.main(["--folder", str(root), "--seed", str(seed // 2), "--output", str(out)])
        train, test, split = read(out, "TRAIN_images", "TEST_images", "split")
        assert len(test) == 3 and len(train) == 11 and split["TEST"] == test
        splits.append(test)
    assert splits[0] == splits[1] and splits[2] == splits[3] and splits[0] != splits[2]
    err = capsys.readouterr().err
    assert "1 image(s) in" in err and "unlabelled.png" in err           # no XML: left out
    assert "augmented copies of 1 image(s) are on both sides" in err and "img_3*" in err


def test_group_by_keeps_augmented_copies_together_and_xml_may_live_apart(tmp_path, capsys):
    root = labelimg_folder(tmp_path / "photos")
    (root / "xml").mkdir()
    for xml in root.glob("*.xml"):
        shutil.move(xml, root / "xml" / xml.name)
    for seed in range(4):
        out = tmp_path / f"out{seed}"
        lists.main(["--folder", str(root), str(root / "xml"), "--seed", str(seed),
                    "--group-by", r"^(.+?)_aug", "--output", str(out)])
        train, test = read(out, "TRAIN_images", "TEST_images")
        copies = [path for path in train + test if "img_3" in path]
        assert set(copies) <= set(train) or set(copies) <= set(test)
    assert "both sides" not in capsys.readouterr().err


def test_folder_arguments_are_checked(tmp_path, capsys):
    for args in (["--folder", str(tmp_path), "--test-fraction", "1"],
                 ["--coco-train", "a.json", str(tmp_path)],
                 ["--folder", str(tmp_path), "--group-by", "(unclosed"]):
        with pytest.raises(SystemExit):
            lists.main(args)
    assert "not a regular expression" in capsys.readouterr().err
    with pytest.raises(DataError, match="no .xml annotation files"):
        lists.main(["--folder", str(tmp_path), "--output", str(tmp_path / "out")])
