"""Tests of create_data_lists.py (parsing, checks, errors) and datasets.py (dataset, augmentation, shapes)."""
import gc
import itertools
import json
import types

import numpy as np
import pytest
import torch
from PIL import Image

import datasets as D
from create_data_lists import VOC_CLASSES, create_data_lists, main
from datasets import DataError, PascalVOCDataset, collate_fn, load_image, train_transform
from shapes import make_shapes_dataset
from utils import atomic_write_json as write_json_atomic


def save_jpeg(path, size, mode="RGB", exif=None, seed=0):
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(array).convert(mode)
    image.save(path, **({"exif": exif} if exif is not None else {}))


def voc_xml(objects, size):
    """A plain VOC annotation; objects: [(name, (xmin, ymin, xmax, ymax), difficult)]."""
    parts = [f"<annotation><size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"]
    for name, box, difficult in objects:
        coords = "".join(f"<{t}>{v}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
        parts.append(f"<object><name>{name}</name><difficult>{difficult}</difficult>"
                     f"<bndbox>{coords}</bndbox></object>")
    return "".join(parts) + "</annotation>"


def make_voc(root, images, splits):
    """Write a VOC-layout tree. images: {id: (xml text, image size or None)}; splits: {name: [ids]}."""
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for image_id, (xml, size) in images.items():
        (root / "Annotations" / f"{image_id}.xml").write_text(xml)
        if size is not None:
            save_jpeg(root / "JPEGImages" / f"{image_id}.jpg", size)
    for split, ids in splits.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


# Awkward but legal: <size> after the objects, shuffled tags, a wrong <filename>, an unknown tag,
# float coordinates, " Dog " and "CAT", a missing <difficult>, a box 1 pixel outside the image.
AWKWARD_XML = """<?xml version="1.0"?>
<annotation>
  <filename>not_this_file.png</filename>
  <object>
    <bndbox><ymax>60.0</ymax><xmin>10</xmin><xmax>48.0</xmax><ymin>20.5</ymin></bndbox>
    <name> Dog </name>
    <pose>Left</pose>
  </object>
  <vendor_tag><anything>1</anything></vendor_tag>
  <object>
    <difficult>0</difficult>
    <name>CAT</name>
    <bndbox><xmin>0</xmin><ymin>1</ymin><xmax>101</xmax><ymax>80</ymax></bndbox>
  </object>
  <size><depth>3</depth><height>80</height><width>100</width></size>
</annotation>
"""


@pytest.fixture
def awkward_voc(tmp_path):
    """A tiny VOC tree with awkward but legal annotations and images."""
    root = make_voc(tmp_path / "voc", {
        "a": (AWKWARD_XML, (100, 80)),
        "b": (voc_xml([("dog", (1, 1, 64, 48), 1)], (64, 48)), None),  # difficult only, touching the border
        "c": (voc_xml([("cat", (70, 5, 120, 60), 0)], (120, 60)), None),  # EXIF-rotated; <size>: stored
        "d": (voc_xml([("cat", (5, 5, 30, 40), 0)], (50, 50)), (50, 50)),
    }, {"trainval": ["a", "b", "c"], "test": ["d"]})
    save_jpeg(root / "JPEGImages" / "b.jpg", (64, 48), mode="L")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display, so the displayed frame is 60x120
    save_jpeg(root / "JPEGImages" / "c.jpg", (120, 60), exif=exif)
    return root


def read_lists(folder):
    return {name: json.loads((folder / f"{name}.json").read_text())
            for name in ("TRAIN_images", "TRAIN_objects", "TEST_images", "TEST_objects", "label_map")}


# ----------------------------------------------------------------------------------------------
# create_data_lists


def test_awkward_annotations_parse_box_by_box(awkward_voc, tmp_path):
    summary = create_data_lists([(awkward_voc, "trainval")], [(awkward_voc, "test")], tmp_path / "lists")
    lists = read_lists(tmp_path / "lists")
    assert lists["label_map"] == {"background": 0, "cat": 1, "dog": 2}
    assert lists["TRAIN_images"] == [str((awkward_voc / "JPEGImages" / f"{i}.jpg").resolve()) for i in "abc"]
    assert lists["TRAIN_objects"] == [
        {"boxes": [[9.0, 19.5, 48.0, 60.0], [0.0, 0.0, 100.0, 80.0]], "labels": [2, 1],
         "difficulties": [0, 0], "size": [100, 80]},
        {"boxes": [[0.0, 0.0, 64.0, 48.0]], "labels": [2], "difficulties": [1], "size": [64, 48]},
        {"boxes": [[69.0, 4.0, 120.0, 60.0]], "labels": [1], "difficulties": [0], "size": [120, 60]},
    ]
    assert lists["TEST_objects"] == [{"boxes": [[4.0, 4.0, 30.0, 40.0]], "labels": [1], "difficulties": [0],
                                      "size": [50, 50]}]
    assert summary["TRAIN"]["objects"] == {"dog": 2, "cat": 2}
    assert summary["TRAIN"]["difficult"] == {"dog": 1, "cat": 0}
    assert summary["TEST"]["images"] == 1


def test_exif_rotated_image_loads_in_the_annotated_frame(awkward_voc):
    path = awkward_voc / "JPEGImages" / "c.jpg"
    assert load_image(path).size == (120, 60)  # stored pixels by default
    assert load_image(path, (120, 60)).size == (120, 60)
    assert load_image(path, (60, 120)).size == (60, 120)  # the annotation was made on the rotated frame


def test_size_matching_neither_frame_is_an_error(tmp_path):
    root = make_voc(tmp_path / "voc", {"x": (voc_xml([("cat", (1, 1, 5, 5), 0)], (99, 99)), (50, 40))},
                    {"trainval": ["x"]})
    with pytest.raises(DataError, match=r"x\.jpg.*99x99"):
        create_data_lists([(root, "trainval")], [], tmp_path / "lists")


@pytest.mark.parametrize("xml, image, message", [
    ("<annotation><object><name>cat</name>", True, r"bad\.xml: cannot parse XML"),
    (voc_xml([("cat", (1, 1, 5, 5), 0)], (50, 40)), False, r"JPEGImages/bad\.jpg: cannot read image"),
    (voc_xml([("cat", (1, 1, "five", 5), 0)], (50, 40)), True, r"bad\.xml: <xmax> is not a number"),
    (voc_xml([("cat", (10, 1, 5, 5), 0)], (50, 40)), True, r"bad\.xml: box .* empty or outside"),
    (voc_xml([("cat", (1, 1, 52, 5), 0)], (50, 40)), True, r"bad\.xml: box .* empty or outside the 50x40"),
])
def test_clear_errors_name_the_file_and_write_nothing(tmp_path, xml, image, message):
    images = {"ok": (voc_xml([("cat", (1, 1, 5, 5), 0)], (50, 40)), (50, 40)),
              "bad": (xml, (50, 40) if image else None)}
    root = make_voc(tmp_path / "voc", images, {"trainval": ["ok", "bad"]})
    with pytest.raises(DataError, match=message):
        create_data_lists([(root, "trainval")], [], tmp_path / "lists")
    assert not (tmp_path / "lists").exists()


def test_a_file_that_is_not_an_image_is_an_error(tmp_path):
    root = make_voc(tmp_path / "voc", {"x": (voc_xml([("cat", (1, 1, 5, 5), 0)], (50, 40)), None)},
                    {"trainval": ["x"]})
    (root / "JPEGImages" / "x.jpg").write_text("not an image")
    with pytest.raises(DataError, match=r"x\.jpg: cannot read image"):
        create_data_lists([(root, "trainval")], [], tmp_path / "lists")


def test_truncated_image_is_caught_with_check_images(tmp_path):
    root = make_voc(tmp_path / "voc", {"x": (voc_xml([("cat", (1, 1, 5, 5), 0)], (50, 40)), (50, 40))},
                    {"trainval": ["x"]})
    path = root / "JPEGImages" / "x.jpg"
    path.write_bytes(path.read_bytes()[:-1000])
    create_data_lists([(root, "trainval")], [], tmp_path / "lists")  # the header alone is readable
    with pytest.raises(DataError, match=r"x\.jpg: cannot read image"):
        create_data_lists([(root, "trainval")], [], tmp_path / "lists", check_images=True)


def test_bad_boxes_are_skipped_and_counted_on_request(tmp_path):
    objects = [("cat", (1, 1, 5, 5), 0), ("cat", (10, 1, 5, 5), 0), ("dog", (1, 1, 90, 5), 0)]
    root = make_voc(tmp_path / "voc", {"x": (voc_xml(objects, (50, 40)), (50, 40))}, {"trainval": ["x"]})
    summary = create_data_lists([(root, "trainval")], [], tmp_path / "lists", skip_bad_boxes=True)
    assert summary["TRAIN"]["skipped_bad_boxes"] == 2
    assert read_lists(tmp_path / "lists")["TRAIN_objects"][0]["boxes"] == [[0.0, 0.0, 5.0, 5.0]]


def unknown_class_voc(tmp_path):
    objects = [("cat", (1, 1, 5, 5), 0), ("Bird", (2, 2, 9, 9), 0), ("bird ", (3, 3, 9, 9), 1),
               ("emu", (1, 1, 4, 4), 0)]
    return make_voc(tmp_path / "voc", {"x": (voc_xml(objects, (50, 40)), (50, 40))}, {"trainval": ["x"]})


def test_unknown_classes_are_an_error_listing_them(tmp_path):
    root = unknown_class_voc(tmp_path)
    with pytest.raises(DataError, match=r"3 object.*'bird' x2 \(e\.g\. .*x\.xml\), 'emu' x1"):
        create_data_lists([(root, "trainval")], [], tmp_path / "lists", classes=["cat", "dog"])
    assert not (tmp_path / "lists").exists()


def test_skip_unknown_drops_and_counts_them(tmp_path):
    root = unknown_class_voc(tmp_path)
    summary = create_data_lists([(root, "trainval")], [], tmp_path / "lists", classes=["cat", "dog"],
                                skip_unknown=True)
    assert summary["TRAIN"]["skipped_unknown"] == {"bird": 2, "emu": 1}
    lists = read_lists(tmp_path / "lists")
    assert lists["TRAIN_objects"][0]["labels"] == [1]
    assert lists["label_map"] == {"background": 0, "cat": 1, "dog": 2}


def test_cli_voc_mode_needs_voc2012_unless_left_out(awkward_voc, tmp_path, capsys):
    with pytest.raises(DataError, match=r"VOC2012 folder .*missing.*16,551 images.*--voc12 none"):
        main(["--voc07", str(awkward_voc), "--voc12", str(tmp_path / "missing"),
              "--output", str(tmp_path / "lists")])
    assert not (tmp_path / "lists").exists()
    main(["--voc07", str(awkward_voc), "--voc12", "none", "--output", str(tmp_path / "lists")])
    out, err = capsys.readouterr()
    assert "VOC2012 left out" in out and "images" in out
    # Not the official counts: said, for both splits.
    assert "TRAIN has 3 images, but VOC2007 trainval has 5,011" in err
    assert "TEST has 1 images, but VOC2007 test has 4,952" in err
    lists = read_lists(tmp_path / "lists")
    assert list(lists["label_map"]) == ["background", *VOC_CLASSES]
    assert lists["label_map"]["aeroplane"] == 1 and lists["label_map"]["tvmonitor"] == 20
    assert len(lists["TRAIN_images"]) == 3 and len(lists["TEST_images"]) == 1
    assert lists["TRAIN_objects"][0]["labels"] == [VOC_CLASSES.index("dog") + 1, VOC_CLASSES.index("cat") + 1]


def test_cli_voc_mode_reads_both_years(awkward_voc, tmp_path, capsys):
    main(["--voc07", str(awkward_voc), "--voc12", str(awkward_voc), "--output", str(tmp_path / "lists")])
    assert "VOC07+12 trainval has 16,551" in capsys.readouterr().err
    assert len(read_lists(tmp_path / "lists")["TRAIN_images"]) == 6     # trainval of both


def test_cli_errors_when_no_voc_folder_exists(tmp_path):
    with pytest.raises(DataError, match=r"VOC2007 folder .*nope07.* does not exist"):
        main(["--voc07", str(tmp_path / "nope07"), "--voc12", str(tmp_path / "nope12")])


def test_failed_voc_download_says_what_to_do(tmp_path, monkeypatch):
    import torchvision.datasets

    requested = []

    def offline(root, year, image_set, download):
        requested.append((year, image_set))
        raise RuntimeError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "VOCDetection", offline)
    with pytest.raises(DataError, match=r"could not download VOC2007 trainval .*network unreachable.*mirror"):
        main(["--download", "--voc07", str(tmp_path / "VOCdevkit" / "VOC2007")])
    assert requested == [("2007", "trainval")]


def test_cli_help_and_custom_root(awkward_voc, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "--skip-unknown" in capsys.readouterr().out
    main(["--root", str(awkward_voc), "--train-splits", "trainval", "test", "--test-splits", "--output",
          str(tmp_path / "lists")])
    lists = read_lists(tmp_path / "lists")
    assert len(lists["TRAIN_images"]) == 4 and lists["TEST_images"] == [] and lists["TEST_objects"] == []


def test_json_is_written_atomically(tmp_path):
    path = tmp_path / "x.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


# ----------------------------------------------------------------------------------------------
# Augmentation


ASPECTS = 2.0 ** torch.arange(-2.0, 3.0)  # box width / height encodes the label: label l has ASPECTS[l - 1]


def tagged_sample(rng):
    """A random image with 1-5 boxes in disjoint horizontal bands, labels encoded in their aspect ratios.

    Every geometric step scales all x by one factor and all y by another, so for boxes that were not
    clipped, (width / height) / ASPECTS[label - 1] must be the same whatever the label.
    """
    width, height = (int(v) for v in rng.integers(60, 240, size=2))
    labels = torch.tensor(rng.permutation(len(ASPECTS))[:rng.integers(1, 6)] + 1)
    band = height / len(labels)
    boxes = []
    for i, label in enumerate(labels):
        box_h = rng.uniform(0.3, 0.9) * band
        box_w = min(box_h * ASPECTS[label - 1].item(), 0.9 * width)
        box_h = box_w / ASPECTS[label - 1].item()
        x1, y1 = rng.uniform(0, width - box_w), i * band + rng.uniform(0, band - box_h)
        boxes.append([x1, y1, x1 + box_w, y1 + box_h])
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return image, torch.tensor(boxes, dtype=torch.float32), labels, labels % 2 == 0


def test_train_transform_properties():
    rng = np.random.default_rng(0)
    checked_alignment = 0
    for i in range(1000):
        torch.manual_seed(i)
        image, boxes, labels, difficulties = train_transform(*tagged_sample(rng))
        assert image.shape == (3, 300, 300) and image.dtype == torch.float32
        assert (boxes.dtype, labels.dtype, difficulties.dtype) == (torch.float32, torch.int64, torch.bool)
        # A crop may hold no object's centre (Caffe's constraint is an IoU with any object).
        assert boxes.shape == (len(labels), 4) and len(difficulties) == len(labels)
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 1).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert torch.equal(difficulties, labels % 2 == 0)
        unclipped = ((boxes > 1e-4) & (boxes < 1 - 1e-4)).all(dim=1)
        ratios = ((boxes[:, 2] - boxes[:, 0]) / (boxes[:, 3] - boxes[:, 1]) / ASPECTS[labels - 1])[unclipped]
        assert torch.allclose(ratios, ratios[:1].expand_as(ratios), rtol=1e-3), f"misaligned in sample {i}"
        checked_alignment += len(ratios) >= 2
    assert checked_alignment > 250


def test_crops_meet_caffes_sampler_constraints():
    rng = np.random.default_rng(1)
    torch.manual_seed(0)
    found = {i: 0 for i in range(len(D.CROP_MIN_IOUS))}
    for _ in range(200):
        corners = torch.tensor(rng.uniform(0, 1, (3, 2, 2)), dtype=torch.float64).sort(dim=1).values
        boxes = torch.cat([torch.tensor([[0.05, 0.05, 0.95, 0.95]], dtype=torch.float64), corners.flatten(1)])
        for i, crop in D.sample_crops(boxes).items():
            found[i] += 1
            x1, y1, x2, y2 = crop.tolist()
            assert 0 <= x1 < x2 <= 1 + 1e-9 and 0 <= y1 < y2 <= 1 + 1e-9
            w, h = x2 - x1, y2 - y1
            assert 0.3 ** 2 - 1e-9 <= w * h <= 1 + 1e-9 and 0.5 - 1e-9 <= w / h <= 2 + 1e-9
            assert D.box_iou(crop[None], boxes).max() >= D.CROP_MIN_IOUS[i]
    assert min(found.values()) >= 20, found
    assert D.sample_crops(torch.zeros(0, 4)) == {}


@pytest.mark.parametrize("min_iou", [0.0, 0.1, 0.3, 0.5, 0.7, 0.9])
def test_one_sampler_crop_meets_its_constraints(min_iou):
    """sample_crop, the "one-sampler" policy's (see random_crop)."""
    rng = np.random.default_rng(1)
    torch.manual_seed(0)
    found = 0
    for _ in range(100):
        width, height = (int(v) for v in rng.integers(40, 400, size=2))
        scale = torch.tensor([width, height, width, height])
        corners = torch.tensor(rng.uniform(0, 1, (3, 2, 2)), dtype=torch.float32).sort(dim=1).values
        boxes = torch.cat([torch.tensor([[0.05, 0.05, 0.95, 0.95]]), corners.flatten(1)]) * scale
        boxes = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
        crop = D.sample_crop(width, height, boxes, min_iou)
        if crop is None:
            continue
        found += 1
        left, top, right, bottom = crop
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        assert 0.5 <= (right - left) / (bottom - top) <= 2
        assert right - left >= int(0.3 * width) and bottom - top >= int(0.3 * height)
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        inside = ((centres[:, 0] > left) & (centres[:, 0] < right)
                  & (centres[:, 1] > top) & (centres[:, 1] < bottom))
        iou = D.box_iou(torch.tensor([crop], dtype=torch.float32), boxes[inside])
        assert inside.any() and iou.max() >= min_iou - 1e-6
    assert found >= 20


def caffe_sampler_success_rates(box, n=200_000, seed=0):
    """Per-trial success rate of each of Caffe's samplers for one object, estimated from the
    definition in sampler.cpp, written out independently of datasets.sample_crops."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.3, 1.0, n)
    ratio = np.clip(rng.uniform(0.5, 2.0, n), scale ** 2, 1 / scale ** 2)
    w, h = scale * np.sqrt(ratio), scale / np.sqrt(ratio)
    x1, y1 = rng.uniform(0, 1, n) * (1 - w), rng.uniform(0, 1, n) * (1 - h)
    bx1, by1, bx2, by2 = box
    inter = (np.clip(np.minimum(x1 + w, bx2) - np.maximum(x1, bx1), 0, None)
             * np.clip(np.minimum(y1 + h, by2) - np.maximum(y1, by1), 0, None))
    iou = inter / (w * h + (bx2 - bx1) * (by2 - by1) - inter)
    return [float(np.mean(iou >= t)) for t in D.CROP_MIN_IOUS]


def test_crop_choice_follows_caffes_batch_sampler():
    """One 100x80 object in a 500x375 image: the whole image and each sampler are chosen as
    often as Caffe's definition says (every sampler gets 50 trials; one of the samples found,
    the whole image always among them, is picked uniformly)."""
    box = (200 / 500, 150 / 375, 300 / 500, 230 / 375)
    q = [1 - (1 - p) ** D.CROP_TRIALS for p in caffe_sampler_success_rates(box)]
    expected = np.zeros(len(q) + 1)                      # samplers, then the whole image
    for found in itertools.product([False, True], repeat=len(q)):
        p = np.prod([qi if f else 1 - qi for qi, f in zip(q, found)])
        for i in [i for i, f in enumerate(found) if f] + [len(q)]:
            expected[i] += p / (sum(found) + 1)
    torch.manual_seed(0)
    draws = 3000
    counts = np.zeros(len(q) + 1)
    for _ in range(draws):
        found = D.sample_crops(torch.tensor([box], dtype=torch.float64))
        keys = sorted(found) + [len(q)]
        counts[keys[torch.randint(len(keys), ()).item()]] += 1
    sigma = np.sqrt(draws * expected * (1 - expected))
    assert (np.abs(counts - draws * expected) <= 4.5 * sigma + 1).all(), (counts, draws * expected)
    assert 0.2 < expected[-1] < 0.4          # the whole image: about 0.3 here

    # crop_window itself keeps the whole image as often; the "one-sampler" policy (one option of
    # seven drawn, the whole image if it fails) far more often.
    pixels = torch.tensor([[200.0, 150, 300, 230]])
    draws, p = 1500, expected[-1]
    whole = {policy: sum(D.crop_window(500, 375, pixels, policy) == (0, 0, 500, 375) for _ in range(draws))
             for policy in D.CROP_POLICIES}
    assert abs(whole["caffe"] - draws * p) <= 4.5 * np.sqrt(draws * p * (1 - p)) + 1, (whole, draws * p)
    assert whole["one-sampler"] > whole["caffe"] + 0.15 * draws, whole


def test_crop_keeps_objects_whose_centre_is_inside(monkeypatch):
    monkeypatch.setattr(D, "sample_crops", lambda boxes: {2: torch.tensor([0.2, 0.2, 0.7, 0.7], dtype=torch.float64)})
    image = Image.fromarray(np.arange(100 * 100 * 3, dtype=np.uint8).reshape(100, 100, 3))
    # centres (25, 25): inside; (79, 79): outside; (70, 25): on the crop's edge, so not inside
    boxes = torch.tensor([[10.0, 10, 40, 40], [60, 60, 98, 98], [50, 5, 90, 45]])
    windows = set()
    for seed in range(20):                   # the crop or the whole image, each half the time
        torch.manual_seed(seed)
        windows.add(D.crop_window(100, 100, boxes))
    assert windows == {(0, 0, 100, 100), (20, 20, 70, 70)}
    geometry = D.Geometry((100, 100), (0, 0), (20, 20, 70, 70), False, Image.NEAREST, 300)
    out_boxes, labels, difficulties = D.place_boxes(boxes, torch.tensor([1, 2, 3]),
                                                    torch.tensor([False, True, False]), geometry)
    assert torch.equal(out_boxes * 50, torch.tensor([[0.0, 0, 20, 20]]))
    assert labels.tolist() == [1] and difficulties.tolist() == [False]
    crop = np.asarray(image)[20:70, 20:70]                          # 50x50, each pixel 6x6 at 300x300
    assert np.array_equal(np.asarray(D.render(image, geometry)), crop.repeat(6, axis=0).repeat(6, axis=1))


def smooth_image(rng, width, height):
    """A random image without sharp edges, on which resampling filters roughly agree."""
    coarse = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.BICUBIC)


def step_by_step(image, geometry, photometric=None):
    """Caffe's order, one step at a time: distort the colours, paste on the zoom-out canvas,
    crop, resize, flip."""
    if photometric is not None:
        image = D.distort(image, photometric)
    canvas = Image.new("RGB", geometry.canvas, D.DEFAULT_INPUT.fill)
    canvas.paste(image, geometry.offset)
    out = canvas.crop(geometry.crop).resize((300, 300), geometry.interpolation)
    return out.transpose(Image.FLIP_LEFT_RIGHT) if geometry.flip else out


def test_render_matches_the_steps_one_at_a_time():
    rng = np.random.default_rng(0)
    differences, exact_checked = [], 0
    for seed in range(150):
        width, height = (int(v) for v in rng.integers(60, 500, size=2))
        image = smooth_image(rng, width, height)
        torch.manual_seed(seed)
        photometric = D.sample_photometric()
        geometry = D.sample_geometry(width, height, torch.tensor([[0.2 * width, 0.2 * height, 0.6 * width,
                                                                    0.7 * height]]))
        for colours in (None, photometric):
            fast = np.asarray(D.render(image, geometry, colours)).astype(int)
            slow = np.asarray(step_by_step(image, geometry, colours)).astype(int)
            # Only the image's edge on the canvas and the filters' blending differ.
            assert np.abs(fast - slow).mean() < 2.5, (seed, geometry, colours)
            differences.append(np.abs(fast - slow).mean())
        if geometry.offset == (0, 0) and geometry.interpolation == Image.NEAREST:
            assert np.array_equal(np.asarray(D.render(image, geometry)), np.asarray(step_by_step(image, geometry)))
            exact_checked += 1
    assert np.mean(differences) < 0.5 and exact_checked >= 5


def test_boxes_follow_the_pixels():
    """A white object on black: after any geometry, its placed box is where it is drawn."""
    rng = np.random.default_rng(2)
    checked = 0
    for seed in range(150):
        width, height = (int(v) for v in rng.integers(80, 500, size=2))
        x1, y1 = rng.uniform(0, 0.6) * width, rng.uniform(0, 0.6) * height
        box = [round(x1), round(y1), round(x1 + rng.uniform(0.15, 0.4) * width),
               round(y1 + rng.uniform(0.15, 0.4) * height)]
        pixels = np.zeros((height, width, 3), np.uint8)
        pixels[box[1]:box[3], box[0]:box[2]] = 255
        torch.manual_seed(seed)
        boxes = torch.tensor([box], dtype=torch.float32)
        geometry = D.sample_geometry(width, height, boxes)
        placed, labels, _ = D.place_boxes(boxes, torch.tensor([1]), torch.tensor([False]), geometry)
        drawn = np.asarray(D.render(Image.fromarray(pixels), geometry))[..., 0] > 127
        if not len(labels):                   # its centre left the crop: at most a sliver stays
            continue
        rows, cols = drawn.any(axis=1).nonzero()[0], drawn.any(axis=0).nonzero()[0]
        seen = [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]
        assert np.abs(np.array(seen) - placed[0].numpy() * 300).max() <= 2.5, (seed, geometry, seen, placed)
        checked += 1
    assert checked > 80


def test_photometric_steps_follow_caffes_formulas():
    colours = Image.fromarray(np.array([[[255, 0, 0], [128, 128, 128], [0, 0, 255], [200, 100, 50]]],
                                       dtype=np.uint8))
    pixels = np.asarray(colours).astype(float)
    # Contrast and brightness: a plain factor and a plain offset per channel, each clipped.
    assert np.array_equal(np.asarray(D.adjust_brightness_contrast(colours, alpha=1.5)),
                          np.clip(np.round(pixels * 1.5), 0, 255))
    assert np.array_equal(np.asarray(D.adjust_brightness_contrast(colours, -32)), np.clip(pixels - 32, 0, 255))
    assert np.array_equal(np.asarray(D.adjust_brightness_contrast(colours, 20.4, 1.3)),
                          np.clip(np.round(np.clip(np.round(pixels + 20.4), 0, 255) * 1.3), 0, 255))
    # Hue: a shift on the colour circle (red -> green at 120 degrees, wrapping); grey stays grey.
    shifted = np.asarray(D.adjust_saturation_hue(colours, degrees=120)).astype(int)
    assert np.abs(shifted[0, :3] - [[0, 255, 0], [128, 128, 128], [255, 0, 0]]).max() <= 2
    back = np.asarray(D.adjust_saturation_hue(D.adjust_saturation_hue(colours, degrees=-36), degrees=36))
    assert np.abs(back.astype(int) - pixels).max() <= 5      # two 8-bit HSV round trips
    # Saturation: HSV S multiplied; 0 gives grey at the HSV value (the largest channel).
    grey = np.asarray(D.adjust_saturation_hue(colours, alpha=0.0)).astype(int)
    assert np.abs(grey - pixels.max(axis=2, keepdims=True)).max() <= 1


def test_photometric_draws_follow_caffes_probabilities():
    torch.manual_seed(0)
    draws = [D.sample_photometric() for _ in range(2000)]
    neutral = D.Photometric(0.0, 1.0, 1.0, 0.0, False)
    for field, (low, high) in zip(neutral._fields, [(-32, 32), (0.5, 1.5), (0.5, 1.5), (-36, 36)]):
        values = np.array([getattr(d, field) for d in draws])
        applied = values != getattr(neutral, field)
        assert abs(applied.mean() - 0.5) < 0.05, field
        assert low <= values.min() and values.max() <= high and np.ptp(values[applied]) > 0.9 * (high - low)
    assert abs(np.mean([d.contrast_first for d in draws]) - 0.5) < 0.05


def test_zoom_out_follows_caffes_expand():
    torch.manual_seed(0)
    zooms = [D.sample_zoom_out(200, 100) for _ in range(2000)]
    zoomed = [(canvas, offset) for canvas, offset in zooms if canvas != (200, 100)]
    assert abs(len(zoomed) / len(zooms) - 0.5) < 0.05
    ratios = np.array([canvas[0] / 200 for canvas, _ in zoomed])
    assert 1 <= ratios.min() < 1.1 and 3.9 < ratios.max() <= 4
    for (canvas_w, canvas_h), (x, y) in zoomed:
        assert abs(canvas_w / 200 - canvas_h / 100) < 0.02          # one ratio for both sides
        assert 0 <= x <= canvas_w - 200 and 0 <= y <= canvas_h - 100
    assert D.sample_zoom_out(200, 100, max_ratio=1.0)[0] == (200, 100)


def test_geometry_draws_every_interpolation_and_flips_half_the_time():
    image = smooth_image(np.random.default_rng(0), 650, 470)
    boxes = torch.tensor([[10.0, 10, 40, 40]])
    torch.manual_seed(0)
    geometries = [D.sample_geometry(650, 470, boxes) for _ in range(400)]
    assert {g.interpolation for g in geometries} == set(D.TRAIN_INTERPOLATIONS)
    assert abs(np.mean([g.flip for g in geometries]) - 0.5) < 0.1
    whole = D.Geometry((650, 470), (0, 0), (0, 0, 650, 470), False, Image.NEAREST, 300)
    outputs = {D.render(image, whole._replace(interpolation=f)).tobytes() for f in D.TRAIN_INTERPOLATIONS}
    assert len(outputs) == len(D.TRAIN_INTERPOLATIONS)


def test_degenerate_boxes_are_dropped_with_their_labels():
    image = Image.new("RGB", (80, 60))
    boxes = torch.tensor([[10.0, 10, 10, 20], [5, 5, 40, 30], [20, 30, 50, 30]])  # empty, fine, empty
    for seed in range(50):
        torch.manual_seed(seed)
        _, out_boxes, labels, difficulties = train_transform(image, boxes, torch.tensor([1, 2, 3]),
                                                             torch.tensor([True, False, True]))
        # The good box survives unless the crop leaves its centre out.
        assert labels.tolist() in ([2], []) and difficulties.tolist() in ([False], [])
        assert out_boxes.shape == (len(labels), 4)


def test_empty_targets_pass_through_the_train_transform():
    torch.manual_seed(0)
    no_labels, no_difficulties = torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.bool)
    image, boxes, labels, difficulties = train_transform(Image.new("RGB", (80, 60)), torch.zeros(0, 4),
                                                         no_labels, no_difficulties)
    assert image.shape == (3, 300, 300) and boxes.shape == (0, 4)
    assert labels.shape == difficulties.shape == (0,)


# ----------------------------------------------------------------------------------------------
# Dataset


def test_dataset_items_and_collate(shapes_lists):
    dataset = PascalVOCDataset(shapes_lists, "test")
    assert len(dataset) == 20 and not dataset.augment and dataset.label_map["circle"] == 1
    image, boxes, labels, difficulties = dataset[0]
    assert image.shape == (3, 300, 300) and image.dtype == torch.float32
    raw = json.loads((shapes_lists / "TEST_objects.json").read_text())[0]
    path = json.loads((shapes_lists / "TEST_images.json").read_text())[0]
    width, height = raw["size"]
    expected = torch.tensor(raw["boxes"]) / torch.tensor([width, height, width, height])
    assert torch.allclose(boxes, expected) and labels.tolist() == raw["labels"]
    assert difficulties.tolist() == [bool(d) for d in raw["difficulties"]]
    pixels = np.asarray(Image.open(path).convert("RGB").resize((300, 300), Image.BILINEAR))
    mean, std = np.array(D.IMAGENET_MEAN) * 255, np.array(D.IMAGENET_STD) * 255
    assert np.allclose(image.permute(1, 2, 0).numpy(), (pixels - mean) / std, atol=1e-4)

    images, batch_boxes, batch_labels, batch_difficulties, problems = collate_fn([dataset[i] for i in range(3)])
    assert images.shape == (3, 3, 300, 300)
    assert len(batch_boxes) == len(batch_labels) == len(batch_difficulties) == 3 and problems == []
    assert torch.equal(batch_boxes[0], boxes)


def test_augmentation_depends_only_on_seed_epoch_and_index(shapes_lists):
    dataset = PascalVOCDataset(shapes_lists, "train", seed=0)
    assert dataset.augment
    dataset.set_epoch(2)
    rng_state = torch.get_rng_state()
    first = dataset[5]
    assert torch.equal(torch.get_rng_state(), rng_state), "the caller's RNG was disturbed"
    torch.rand(10)  # draws from the global RNG must not matter
    for a, b in zip(first, dataset[5]):
        assert torch.equal(a, b)
    dataset.set_epoch(3)
    assert not torch.equal(dataset[5][0], first[0])
    other_seed = PascalVOCDataset(shapes_lists, "train", seed=1)
    other_seed.set_epoch(2)
    assert not torch.equal(other_seed[5][0], first[0])


def test_different_indices_of_the_same_image_differ(shapes_lists, tmp_path):
    for name in ("label_map.json",):
        (tmp_path / name).write_text((shapes_lists / name).read_text())
    images, objects = json.loads((shapes_lists / "TRAIN_images.json").read_text()), \
        json.loads((shapes_lists / "TRAIN_objects.json").read_text())
    (tmp_path / "TRAIN_images.json").write_text(json.dumps([images[0]] * 4))
    (tmp_path / "TRAIN_objects.json").write_text(json.dumps([objects[0]] * 4))
    dataset = PascalVOCDataset(tmp_path, "train")
    samples = [dataset[i][0] for i in range(4)]
    assert all(not torch.equal(samples[i], samples[j]) for i in range(4) for j in range(i))


def test_workers_do_not_change_samples(shapes_lists):
    def epochs(num_workers):
        dataset = PascalVOCDataset(shapes_lists, "train", seed=3)
        loader = torch.utils.data.DataLoader(dataset, batch_size=4, sampler=range(8), collate_fn=collate_fn,
                                             num_workers=num_workers, persistent_workers=num_workers > 0)
        batches = []
        for epoch in (0, 1):
            dataset.set_epoch(epoch)
            batches += [batch for batch in loader]
        return batches

    for a, b in zip(epochs(0), epochs(2)):
        assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


def test_keep_difficult_false_drops_difficult_objects(awkward_voc, tmp_path):
    create_data_lists([(awkward_voc, "trainval")], [(awkward_voc, "test")], tmp_path / "lists")
    dataset = PascalVOCDataset(tmp_path / "lists", "train", keep_difficult=False)
    _, boxes, labels, difficulties = dataset[1]  # its only object is difficult
    assert boxes.shape == (0, 4) and len(labels) == len(difficulties) == 0
    assert len(PascalVOCDataset(tmp_path / "lists", "train")[1][1]) == 1


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "1"])
def test_images_of_any_mode_load_as_rgb(tmp_path, mode):
    path = tmp_path / "image.tif"
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    # Pillow 10.1 converts RGB to I;16 only by way of L.
    (rgb.convert("L") if mode == "I;16" else rgb).convert(mode).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (40, 30)


def lists_folder(tmp_path, image_paths):
    folder = tmp_path / "lists"
    folder.mkdir()
    (folder / "label_map.json").write_text(json.dumps({"background": 0, "thing": 1}))
    objects = [{"boxes": [[1, 2, 10, 12]], "labels": [1], "difficulties": [0]} for _ in image_paths]
    for split in ("TRAIN", "TEST"):
        (folder / f"{split}_images.json").write_text(json.dumps([str(p) for p in image_paths]))
        (folder / f"{split}_objects.json").write_text(json.dumps(objects))
    return folder


def test_dataset_loads_any_image_mode_as_3_channels(tmp_path):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    paths = []
    for mode, suffix in (("L", "jpg"), ("RGBA", "png"), ("P", "png"), ("CMYK", "jpg")):
        paths.append(tmp_path / f"{mode}.{suffix}")
        rgb.convert(mode).save(paths[-1])
    folder = lists_folder(tmp_path, paths)
    for split in ("train", "test"):
        for image, *_ in PascalVOCDataset(folder, split):
            assert image.shape == (3, 300, 300) and torch.isfinite(image).all()


def test_corrupt_image_error_names_the_file(tmp_path):
    good = tmp_path / "good.jpg"
    save_jpeg(good, (64, 48))
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(good.read_bytes()[:300])
    dataset = PascalVOCDataset(lists_folder(tmp_path, [good, corrupt]), "train")
    dataset[0]
    with pytest.raises(DataError, match=r"corrupt\.jpg: cannot read image"):
        dataset[1]


def test_missing_or_malformed_lists_are_clear_errors(shapes_lists, tmp_path):
    with pytest.raises(DataError, match=r"data folder .*nowhere does not exist"):
        PascalVOCDataset(tmp_path / "nowhere", "train")
    (tmp_path / "label_map.json").write_text("{not json")
    (tmp_path / "TRAIN_images.json").write_text("[]")
    with pytest.raises(DataError, match=r"TRAIN_objects\.json not found"):
        PascalVOCDataset(tmp_path, "train")
    (tmp_path / "TRAIN_objects.json").write_text("[]")
    with pytest.raises(DataError, match=r"label_map\.json is not valid JSON"):
        PascalVOCDataset(tmp_path, "train")


def random_lists(folder, n, seed=0):
    """Lists of n images (JPEGs of random sizes, some names not ASCII) with 0-5 random objects
    each, a tenth without a recorded size, in `folder`; returns (images, objects) as written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    images, objects = [], []
    for i in range(n):
        size = [int(v) for v in rng.integers(20, 90, size=2)]
        images.append(str(folder / (f"bild_ä_{i}.jpg" if i % 3 == 0 else f"{i}.jpg")))
        save_jpeg(images[-1], size, seed=i)
        corners = np.sort(rng.uniform(0, 1, (int(rng.integers(0, 6)), 2, 2)), axis=1) * size
        objects.append({"boxes": corners.reshape(-1, 4).tolist(),
                        "labels": rng.integers(1, 4, len(corners)).tolist(),
                        "difficulties": rng.integers(0, 2, len(corners)).tolist()})
        if i % 10:
            objects[-1]["size"] = size
    (folder / "label_map.json").write_text(json.dumps({"background": 0, "a": 1, "b": 2, "c": 3}))
    (folder / "TRAIN_images.json").write_text(json.dumps(images))
    (folder / "TRAIN_objects.json").write_text(json.dumps(objects))
    return images, objects


def test_the_datasets_items_are_the_json_lists_from_either_form(tmp_path, monkeypatch, capsys):
    """Paths, boxes, labels, difficulties and sizes as the JSON has them, whether the dataset
    read the JSON or the binary form create_data_lists.py writes beside it; the binary form only
    while it matches the JSON."""
    images, objects = random_lists(tmp_path, 40)

    def check(dataset, images, objects):
        for i, (pending, boxes, labels, difficulties) in enumerate(dataset):
            size = objects[i].get("size") or Image.open(images[i]).size
            assert pending.path == images[i] and dataset.lists.size(i) == (tuple(objects[i]["size"])
                                                                           if "size" in objects[i] else None)
            expected = torch.tensor(objects[i]["boxes"], dtype=torch.float32).reshape(-1, 4)
            assert torch.allclose(boxes * torch.tensor(size * 2), expected, atol=1e-4)
            assert labels.tolist() == objects[i]["labels"]
            assert difficulties.tolist() == [bool(d) for d in objects[i]["difficulties"]]

    from_json = PascalVOCDataset(tmp_path, "train", augment=False, decode="device")
    check(from_json, images, objects)
    sources = [tmp_path / "TRAIN_images.json", tmp_path / "TRAIN_objects.json"]
    D.ImageLists.from_json(images, objects).save(tmp_path / "TRAIN_lists.pt", D.lists_fingerprint(sources))
    with monkeypatch.context() as patched:                      # the JSON is not parsed at all
        patched.setattr(D.ImageLists, "from_json", None)
        binary = PascalVOCDataset(tmp_path, "train", augment=False, decode="device")
    assert all(torch.equal(getattr(binary.lists, f), getattr(from_json.lists, f)) for f in D.ImageLists.FIELDS)
    check(binary, images, objects)
    assert capsys.readouterr().err == ""
    objects[7]["labels"][0] = 3 - objects[7]["labels"][0] % 3        # edited after the binary form
    objects[7]["difficulties"] = [1 - d for d in objects[7]["difficulties"]]
    sources[1].write_text(json.dumps(objects))
    check(PascalVOCDataset(tmp_path, "train", augment=False, decode="device"), images, objects)
    assert "made from other JSON lists" in capsys.readouterr().err
    (tmp_path / "TRAIN_lists.pt").write_bytes(b"not a zip file")
    check(PascalVOCDataset(tmp_path, "train", augment=False, decode="device"), images, objects)
    assert "TRAIN_lists.pt: not a PyTorch file of tensors" in capsys.readouterr().err


def held_objects(root):
    """How many gc-tracked objects `root` reaches (classes, modules and functions aside)."""
    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType)
    seen, stack = set(), [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        stack += [child for child in gc.get_referents(obj) if gc.is_tracked(child)]
    return len(seen)


def test_the_dataset_holds_no_python_object_per_image(tmp_path):
    """The lists live in a few tensors, so forked loader workers share their pages (a Python
    object per image or box would be copied into each worker as its reference count changes):
    as many objects for 1,000 images as for 10."""
    counts = []
    for n in (10, 1000):
        folder = tmp_path / str(n)
        folder.mkdir()
        entry = {"boxes": [[1, 2, 10, 12], [3, 3, 5, 9]], "labels": [1, 1], "difficulties": [0, 1], "size": [20, 20]}
        (folder / "label_map.json").write_text(json.dumps({"background": 0, "thing": 1}))
        (folder / "TRAIN_images.json").write_text(json.dumps([f"/images/{i}.jpg" for i in range(n)]))
        (folder / "TRAIN_objects.json").write_text(json.dumps([entry] * n))
        counts.append(held_objects(PascalVOCDataset(folder, "train")))
    assert counts[0] == counts[1] and counts[0] < 100, counts


class FreezeCount(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        return gc.get_freeze_count()


def test_loader_workers_start_with_the_inherited_objects_frozen():
    """A worker's full garbage collection would write to every object it inherited and so copy
    every page of them (about 80 MiB per worker, benchmark.py data): start_loading forks the
    workers with those objects frozen out of collection, and unfreezes the training process."""
    loader = torch.utils.data.DataLoader(FreezeCount(), batch_size=2, num_workers=1,
                                         multiprocessing_context="fork")
    in_worker = next(D.start_loading(loader))
    assert int(in_worker.min()) > 1000 and gc.get_freeze_count() == 0
    assert int(next(iter(loader)).max()) == 0                       # without it, nothing is frozen


# ----------------------------------------------------------------------------------------------
# The shapes dataset


def test_shapes_dataset_is_deterministic(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        make_shapes_dataset(tmp_path / name, n_trainval=3, n_test=2, seed=seed)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 12
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert any((tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes() for f in files)
    with pytest.raises(FileExistsError):
        make_shapes_dataset(tmp_path / "a", n_trainval=1, n_test=1)


def test_shapes_objects_are_large_and_few(shapes_lists):
    objects = json.loads((shapes_lists / "TRAIN_objects.json").read_text())
    counts = [len(o["labels"]) for o in objects]
    assert 1 <= min(counts) and max(counts) <= 4
    sides = [max(b[2] - b[0], b[3] - b[1]) / min(o["size"]) for o in objects for b in o["boxes"]]
    assert min(sides) >= 0.1 and max(sides) <= 0.62
    difficult = sum(sum(o["difficulties"]) for o in objects) / sum(counts)
    assert 0 < difficult < 0.15
    assert set(l for o in objects for l in o["labels"]) == {1, 2, 3}


def test_crop_policy_is_checked_and_used(shapes_lists):
    with pytest.raises(ValueError, match="crop must be one of"):
        PascalVOCDataset(shapes_lists, "train", crop="random")
    caffe, gentle = (PascalVOCDataset(shapes_lists, "train", crop=policy) for policy in D.CROP_POLICIES)
    assert gentle.crop == "one-sampler"
    assert any(not torch.equal(caffe[i][0], gentle[i][0]) for i in range(4))
