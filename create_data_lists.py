r"""Create the JSON lists that datasets.PascalVOCDataset reads, from folders in Pascal VOC layout.

Pascal VOC (train: VOC2007 trainval + VOC2012 trainval, 16551 images; test: VOC2007 test, 4952 images):
    python create_data_lists.py --download          # fetch VOC into data/VOCdevkit first (~3.6 GB)
    python create_data_lists.py --voc07 data/VOCdevkit/VOC2007 --voc12 data/VOCdevkit/VOC2012 \
        --output data/voc_lists
Any dataset in VOC layout (Annotations/, JPEGImages/, ImageSets/Main/<split>.txt):
    python create_data_lists.py --root DIR [DIR ...] --train-splits trainval --test-splits test --output OUT
        [--classes a b c] [--skip-unknown] [--skip-bad-boxes] [--check-images]
The built-in synthetic "shapes" dataset (generated first if the folder does not exist):
    python create_data_lists.py --shapes data/shapes --output data/shapes_lists
COCO-format annotation files (most labelling tools export them), one per split, with the folder
of their images; a single file is split here with --test-fraction (classes: the file's
categories, in its order):
    python create_data_lists.py --coco-train train.json images/ --coco-test val.json images/ --output OUT
    python create_data_lists.py --coco-train all.json images/ --test-fraction 0.2 --output OUT
    python create_data_lists.py --coco-test instances_val2017.json val2017/ --output OUT   # test lists only
A plain folder of images and VOC XML files, without ImageSets (labelImg; XML files beside the
images or in a folder of their own), split here reproducibly (split.json records it):
    python create_data_lists.py --folder images/ [xml/] --test-fraction 0.2 --seed 0 \
        [--group-by REGEX] --output OUT

Writes to the output folder: TRAIN_images.json / TEST_images.json (absolute image paths),
TRAIN_objects.json / TEST_objects.json (per image: boxes [[x1, y1, x2, y2], ...] in continuous
pixel coordinates, labels, difficulties 0/1, and size [width, height] of the annotated frame),
and label_map.json (class name -> index, "background": 0); with --test-fraction, split.json
(the settings and the images of each side). Beside each split's JSON, <SPLIT>_lists.pt holds the
same lists as a few flat tensors, which the training and evaluation datasets memory-map (at
COCO's size and beyond, parsing the JSON takes most of a run's start-up), as long as the JSON
has not changed since.
"""
import argparse
import json
import os
import re
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from datasets import DataError, ImageLists, exif_rotated_size, lists_fingerprint, load_image, uses_exif_frame
from shapes import SHAPE_CLASSES, make_shapes_dataset
from utils import atomic_write_json, bounded, writable_folder

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
BOX_TOLERANCE = 1  # pixels a box may stick out of the image; it is clipped


@dataclass
class Annotation:
    """One image and its objects, boxes in continuous pixel coordinates of the annotated frame."""
    image_path: str
    source: str  # the annotation file: the image's XML, or the COCO JSON that lists it
    size: tuple  # (width, height)
    names: list = field(default_factory=list)
    boxes: list = field(default_factory=list)
    difficulties: list = field(default_factory=list)


def read_split_ids(root, split):
    """Image ids listed in root/ImageSets/Main/<split>.txt (a warning if it lists none)."""
    path = Path(root) / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        raise DataError(f"{path}: split file not found")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        print(f"warning: {path} lists no images", file=sys.stderr)
    return ids


def _text(element, tag, xml_path, default=None):
    child = element.find(tag)
    if child is None or child.text is None or not child.text.strip():
        if default is None:
            raise DataError(f"{xml_path}: missing <{tag}>")
        return default
    return child.text.strip()


def _number(element, tag, xml_path, default=None):
    text = _text(element, tag, xml_path, default)
    try:
        return float(text)
    except ValueError:
        raise DataError(f"{xml_path}: <{tag}> is not a number: {text!r}") from None


def parse_annotation(xml_path):
    """Read a VOC XML file -> (size (w, h) or None, [(name, (xmin, ymin, xmax, ymax) as written, difficult)]).

    Fields are found by tag whatever their order; unknown tags are ignored; names are stripped
    and lower-cased; coordinates may be floats; a missing <difficult> means 0.
    """
    try:
        annotation = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as error:
        raise DataError(f"{xml_path}: cannot parse XML ({error})") from error
    size_element = annotation.find("size")
    size = None
    if size_element is not None:
        width, height = (_number(size_element, tag, xml_path, "0") for tag in ("width", "height"))
        size = (int(width), int(height)) if width > 0 and height > 0 else None  # some tools write 0
    objects = []
    for element in annotation.iter("object"):
        bndbox = element.find("bndbox")
        if bndbox is None:
            raise DataError(f"{xml_path}: an <object> has no <bndbox>")
        box = tuple(_number(bndbox, tag, xml_path) for tag in ("xmin", "ymin", "xmax", "ymax"))
        difficult = int(_number(element, "difficult", xml_path, "0")) != 0
        objects.append((_text(element, "name", xml_path).lower(), box, difficult))
    return size, objects


def voc_to_continuous(boxes):
    """VOC (xmin, ymin, xmax, ymax), 1-based inclusive pixels, (n, 4) -> continuous x1, y1, x2, y2.

    Pixel i covers [i-1, i) in continuous coordinates, so x1 = xmin - 1, x2 = xmax: then IoU without
    a +1 equals the official devkit's.
    """
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4) - np.array([1.0, 1.0, 0.0, 0.0])


def fit_to_image(boxes, sizes):
    """Continuous boxes (n, 4) x1, y1, x2, y2 in images of sizes (n, 2) (width, height) ->
    (boxes clipped to their image (n, 4), good (n,) bool).

    Boxes may stick out by BOX_TOLERANCE pixels (annotation tools round) and are clipped; a box
    further outside, empty after clipping, or not finite is bad (good False).
    """
    sizes = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
    with np.errstate(invalid="ignore"):                          # NaN compares False: bad
        inside = ((boxes[:, :2] >= -BOX_TOLERANCE) & (boxes[:, 2:] <= sizes + BOX_TOLERANCE)).all(1)
        clipped = np.concatenate([np.maximum(boxes[:, :2], 0.0), np.minimum(boxes[:, 2:], sizes)], 1)
        return clipped, inside & (clipped[:, 2:] > clipped[:, :2]).all(1)


def bad_box_error(source, what, width, height):
    """The DataError for a bad box (see fit_to_image); `what` says which box."""
    return DataError(f"{source}: {what} is empty or outside the {width}x{height} image "
                     "(use --skip-bad-boxes to drop such boxes)")


def annotated_frame_size(image_path, annotated_size, check_images):
    """Size (w, h) of the image frame the boxes refer to: stored pixels, or EXIF-rotated if only that matches.

    Reads the header only, unless check_images, which decodes the whole image.
    """
    try:
        with Image.open(image_path) as image:
            stored, rotated = image.size, exif_rotated_size(image)
            frame = rotated if uses_exif_frame(image, annotated_size) else stored
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{image_path}: cannot read image ({error})") from error
    if annotated_size is not None and tuple(annotated_size) != frame:
        raise DataError(f"{image_path}: <size> {annotated_size[0]}x{annotated_size[1]} in the XML matches "
                        f"neither the stored image {stored[0]}x{stored[1]} nor its EXIF-rotated frame")
    if check_images:
        load_image(image_path, annotated_size)
    return frame


def voc_items(sources):
    """(XML path, image path) of every image listed by (root, split) pairs of VOC-layout folders."""
    items = []
    for root, split in sources:
        root = Path(root)
        items += [(root / "Annotations" / f"{image_id}.xml",
                   (root / "JPEGImages" / f"{image_id}.jpg").resolve())   # <filename> is not trusted
                  for image_id in read_split_ids(root, split)]
    return items


def read_annotations(items, skip_bad_boxes=False, check_images=False, description="parsing"):
    """Parse (XML path, image path) pairs -> ([Annotation], number of bad boxes skipped)."""
    annotations, bad_boxes = [], 0
    for xml_path, image_path in tqdm(items, desc=description, unit="image"):
        size, objects = parse_annotation(xml_path)
        width, height = annotated_frame_size(image_path, size, check_images)
        annotation = Annotation(str(image_path), str(xml_path), (width, height))
        boxes, good = fit_to_image(voc_to_continuous([box for _, box, _ in objects]), (width, height))
        if not good.all() and not skip_bad_boxes:
            name, raw_box, _ = objects[int(np.argmin(good))]
            raise bad_box_error(xml_path, f"box {raw_box} of '{name}'", width, height)
        bad_boxes += int((~good).sum())
        kept = [obj for obj, ok in zip(objects, good) if ok]
        annotation.names = [name for name, _, _ in kept]
        annotation.boxes = boxes[good].tolist()
        annotation.difficulties = [int(difficult) for _, _, difficult in kept]
        annotations.append(annotation)
    return annotations, bad_boxes


def make_label_map(classes):
    """Class names in label order -> {"background": 0, name: 1, ...}, names stripped and lower-cased."""
    classes = [name.strip().lower() for name in classes]
    if len(set(classes)) != len(classes) or "background" in classes:
        raise DataError(f"class names must be unique and must not include 'background': {classes}")
    return {"background": 0, **{name: i for i, name in enumerate(classes, start=1)}}


def unknown_classes(annotations, label_map):
    """Counter of the class names not in label_map, and an example XML file for each."""
    unknown, examples = Counter(), {}
    for annotation in annotations:
        for name in annotation.names:
            if name not in label_map:
                unknown[name] += 1
                examples.setdefault(name, annotation.source)
    return unknown, examples


def to_objects(annotations, label_map):
    """Annotations -> JSON object entries, leaving out objects of classes not in label_map."""
    entries = []
    for annotation in annotations:
        keep = [i for i, name in enumerate(annotation.names) if name in label_map]
        entries.append({"boxes": [annotation.boxes[i] for i in keep],
                        "labels": [label_map[annotation.names[i]] for i in keep],
                        "difficulties": [annotation.difficulties[i] for i in keep],
                        "size": list(annotation.size)})
    return entries


def split_summary(entries, label_map, unknown, bad_boxes):
    """Counts for one split: images, objects and difficult objects per class, what was skipped."""
    index_to_name = {index: name for name, index in label_map.items()}
    objects, difficult = Counter(), Counter()
    for entry in entries:
        for label, is_difficult in zip(entry["labels"], entry["difficulties"]):
            objects[index_to_name[label]] += 1
            difficult[index_to_name[label]] += is_difficult
    return {"images": len(entries), "images_without_objects": sum(not e["labels"] for e in entries),
            "objects": dict(objects), "difficult": dict(difficult),
            "skipped_unknown": dict(unknown), "skipped_bad_boxes": bad_boxes}


def create_data_lists(train_sources, test_sources, output_folder, classes=None, skip_unknown=False,
                      skip_bad_boxes=False, check_images=False):
    """Parse (root, split) sources and write the JSON lists; returns the summary (see print_summary).

    classes: class names in label order; by default the sorted names found in the annotations.
    Nothing is written unless every source parses.
    """
    output_folder = writable_folder(output_folder, create=False)   # before the parsing, not after
    splits = {split: read_annotations(voc_items(sources), skip_bad_boxes, check_images,
                                      description=f"parsing {split}")
              for split, sources in (("TRAIN", train_sources), ("TEST", test_sources))}
    if not any(annotations for annotations, _ in splits.values()):
        raise DataError("neither the training nor the test splits list any image: check the "
                        "ImageSets/Main/<split>.txt files and the split names")
    return write_lists(splits, output_folder, classes, skip_unknown)


def write_lists(splits, output_folder, classes=None, skip_unknown=False, extra_outputs=None):
    """Write the lists of {"TRAIN": ([Annotation], bad boxes skipped), "TEST": ...}, with
    label_map.json and the files of extra_outputs ({file name: JSON data}); returns the summary.

    classes: class names in label order; by default the sorted names found in the annotations.
    Nothing is written if a class is unknown (unless skip_unknown); every file atomically.
    """
    everything = [annotation for annotations, _ in splits.values() for annotation in annotations]
    if classes is None:
        classes = sorted({name for annotation in everything for name in annotation.names})
        print(f"classes found in the annotations (give --classes to fix their set and order): "
              f"{', '.join(classes)}", file=sys.stderr)
    label_map = make_label_map(classes)

    unknown, examples = unknown_classes(everything, label_map)
    if unknown and not skip_unknown:
        listed = ", ".join(f"'{name}' x{count} (e.g. {examples[name]})"
                           for name, count in unknown.most_common())
        raise DataError(f"{sum(unknown.values())} object(s) of classes not in the label map: {listed}. "
                        "Use --skip-unknown to drop them or --classes to name all classes.")

    outputs, summary = {"label_map.json": label_map, **(extra_outputs or {})}, {"classes": list(label_map)[1:]}
    for split, (annotations, bad_boxes) in splits.items():
        entries = to_objects(annotations, label_map)
        outputs[f"{split}_images.json"] = [a.image_path for a in annotations]
        outputs[f"{split}_objects.json"] = entries
        skipped = unknown_classes(annotations, label_map)[0]
        summary[split] = split_summary(entries, label_map, skipped, bad_boxes)

    folder = Path(output_folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in outputs.items():
        atomic_write_json(folder / name, data)
    for split in splits:          # the binary form, after the JSON it is made from (see ImageLists)
        sources = [folder / f"{split}_images.json", folder / f"{split}_objects.json"]
        ImageLists.from_json(*(outputs[source.name] for source in sources)).save(
            folder / f"{split}_lists.pt", lists_fingerprint(sources))
    return summary


# ----------------------------------------------------------------------------------------------
# COCO format (what most labelling tools export)


def _load_json(path):
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not valid JSON ({error})") from None


def _column(records, key, path, kind, default=None):
    """One field of every record (dict) as a list; a DataError naming the first record without it."""
    try:
        return [record[key] for record in records] if default is None else \
            [record.get(key, default) for record in records]
    except (KeyError, TypeError):
        bad = next(r for r in records if not isinstance(r, dict) or key not in r)
        raise DataError(f"{path}: {kind} {bad.get('id', '?') if isinstance(bad, dict) else bad!r} "
                        f"has no '{key}'") from None


def _index_of(ids, wanted, path, what, annotation_ids):
    """Position of every id of `wanted` in the unique `ids` (numpy arrays), or a DataError naming
    the first annotation whose id is not there."""
    order = np.argsort(ids, kind="stable")
    position = np.searchsorted(ids, wanted, sorter=order).clip(max=max(len(ids) - 1, 0))
    found = ids[order[position]] == wanted if len(ids) else np.zeros(len(wanted), dtype=bool)
    if not found.all():
        first = int(np.argmin(found))
        raise DataError(f"{path}: annotation {annotation_ids[first]} refers to {what} "
                        f"{wanted[first]}, which the file does not list")
    return order[position]


def _unique_ids(records, path, kind):
    ids = np.asarray(_column(records, "id", path, kind))
    if ids.dtype.kind not in "iu":
        raise DataError(f"{path}: {kind} ids must be integers")
    values, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise DataError(f"{path}: {kind} id {values[np.argmax(counts > 1)]} is used twice")
    return ids


def read_coco(json_path, image_dir, skip_bad_boxes=False, check_images=False):
    """A COCO-format annotation file -> ([Annotation], bad boxes skipped, category names in order).

    Boxes [x, y, w, h] are continuous pixel coordinates (COCO's own convention), so x1 = x,
    x2 = x + w, checked and clipped like VOC's (fit_to_image). iscrowd objects are kept as
    difficult, images without annotations kept as negatives, image sizes taken from the file's
    width and height (no image is opened), names stripped and lower-cased as for VOC. Images
    are image_dir / file_name, in the file's order; all must exist (check_images: and decode).
    Vectorised over the annotations: COCO train2017 (860k boxes) converts in seconds.
    """
    data = _load_json(json_path)
    if not isinstance(data, dict) or not {"images", "categories"} <= set(data):
        raise DataError(f"{json_path}: not a COCO annotation file (no 'images' and 'categories')")
    images, categories, objects = data["images"], data["categories"], data.get("annotations") or []
    image_ids = _unique_ids(images, json_path, "image")
    category_ids = _unique_ids(categories, json_path, "category")
    names = [str(name).strip().lower() for name in _column(categories, "name", json_path, "category")]
    if len(set(names)) != len(names):
        raise DataError(f"{json_path}: two categories share the name "
                        f"'{next(n for n in names if names.count(n) > 1)}'")
    sizes = np.array([_column(images, key, json_path, "image") for key in ("width", "height")],
                     dtype=np.float64).T.reshape(-1, 2)
    if not (sizes > 0).all():
        raise DataError(f"{json_path}: image {image_ids[np.argmin((sizes > 0).all(1))]} has no "
                        "positive width and height")
    folder = os.path.abspath(image_dir)
    paths = [os.path.join(folder, name) for name in _column(images, "file_name", json_path, "image")]
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise DataError(f"{json_path}: {len(missing)} of its {len(paths)} images are not in "
                        f"{image_dir} (e.g. {missing[0]})")
    if check_images:
        for path, size in zip(tqdm(paths, desc="checking images", unit="image"), sizes.astype(int).tolist()):
            load_image(path, size)

    annotation_ids = _unique_ids(objects, json_path, "annotation")
    image = _index_of(image_ids, np.asarray(_column(objects, "image_id", json_path, "annotation")),
                      json_path, "image", annotation_ids)
    category = _index_of(category_ids, np.asarray(_column(objects, "category_id", json_path,
                                                          "annotation")),
                         json_path, "category", annotation_ids)
    crowd = np.asarray(_column(objects, "iscrowd", json_path, "annotation", default=0), dtype=bool)
    raw = _column(objects, "bbox", json_path, "annotation")
    try:
        xywh = np.array(raw, dtype=np.float64).reshape(-1, 4)
    except (ValueError, TypeError):
        bad = next(i for i, box in enumerate(raw) if np.shape(box) != (4,))
        raise DataError(f"{json_path}: annotation {annotation_ids[bad]} has bbox {raw[bad]!r}, "
                        "not [x, y, width, height]") from None
    boxes, good = fit_to_image(np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1), sizes[image])
    if not good.all() and not skip_bad_boxes:
        i = int(np.argmin(good))
        w, h = sizes[image[i]].astype(int)
        raise bad_box_error(json_path, f"annotation {annotation_ids[i]} (image {paths[image[i]]}): "
                            f"bbox {raw[i]} of '{names[category[i]]}'", w, h)

    # Objects grouped by image (stable: each image keeps the file's order of its objects).
    image, category, crowd, boxes = image[good], category[good], crowd[good], boxes[good]
    order = np.argsort(image, kind="stable")
    ends = np.cumsum(np.bincount(image, minlength=len(paths))).tolist()
    all_names = np.array(names, dtype=object)[category[order]].tolist()
    all_boxes, all_crowd = boxes[order].tolist(), crowd[order].astype(int).tolist()
    annotations, start, source = [], 0, str(json_path)
    for path, (width, height), end in zip(paths, sizes.astype(int).tolist(), ends):
        annotations.append(Annotation(path, source, (width, height), all_names[start:end],
                                      all_boxes[start:end], all_crowd[start:end]))
        start = end
    return annotations, int((~good).sum()), names


def read_coco_splits(train, test, skip_bad_boxes=False, check_images=False):
    """--coco-train and --coco-test ((JSON, image folder) or None) -> (splits as write_lists takes
    them, category names: the training file's order, then any the test file adds)."""
    splits, names = {}, []
    for split, source in (("TRAIN", train), ("TEST", test)):
        annotations, bad_boxes, categories = read_coco(*source, skip_bad_boxes, check_images) if source else ([], 0, [])
        splits[split] = (annotations, bad_boxes)
        names += [name for name in categories if name not in names]
    return splits, names


# ----------------------------------------------------------------------------------------------
# A plain folder of images and VOC XML files (labelImg, most "Pascal VOC" exports), split here


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# Where exporters' augmented copies start: "img_001_aug1.jpg", "img_001-aug2.jpg" and Roboflow's
# "img_001_jpg.rf.<hash>.jpg" are copies of img_001. Used to warn only (--group-by groups).
AUGMENTED_COPY = re.compile(r"(?i)^(.+?)(?:[._-]aug|_(?:jpe?g|png|bmp)\.rf\.)")


def folder_items(image_dir, xml_dir=None):
    """(XML path, image path) of every XML file of a plain folder, by name; its image is the
    file of image_dir with the same stem and an image extension. Images without an XML file
    are left out with a warning (some tools write none for an image without objects)."""
    image_dir, xml_dir = Path(image_dir), Path(xml_dir or image_dir)
    xmls = sorted(xml_dir.glob("*.xml")) if xml_dir.is_dir() else []
    if not xmls:
        raise DataError(f"{xml_dir}: no .xml annotation files found")
    images = {}
    for path in image_dir.iterdir():
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            images.setdefault(path.stem, []).append(path)
    items = []
    for xml in xmls:
        found = images.pop(xml.stem, [])
        if len(found) != 1:
            raise DataError(f"{xml}: {'several images' if found else 'no image'} named "
                            f"{xml.stem}.* in {image_dir} ({', '.join(IMAGE_EXTENSIONS)})")
        items.append((xml, found[0].resolve()))
    if images:
        example = sorted(images)[0]
        print(f"warning: {len(images)} image(s) in {image_dir} have no XML file and are left out "
              f"(e.g. {images[example][0].name})", file=sys.stderr)
    return items


def group_key(stem, pattern):
    """The group of an image by its file stem: the first group (or the whole match) of the
    regular expression `pattern` searched in it; the stem itself if it does not match."""
    match = pattern.search(stem) if pattern else None
    return (match.group(1) if pattern.groups else match.group(0)) if match else stem


def split_annotations(annotations, test_fraction, seed=0, group_by=None):
    """A reproducible train/test split -> (train, test) lists of Annotations.

    Whole groups (group_key; by default one image each) are drawn for the test split, in an
    order shuffled by `seed` from the sorted group names (so the file system's listing order
    plays no part), until it holds round(test_fraction * images). Warns when augmented copies
    of one image (AUGMENTED_COPY) land on both sides: their test AP would flatter the model.
    """
    pattern = re.compile(group_by) if group_by else None
    stems = [Path(a.image_path).stem for a in annotations]
    keys = [group_key(stem, pattern) for stem in stems]
    groups = sorted(set(keys))
    sizes = Counter(keys)
    target, chosen, count = round(test_fraction * len(annotations)), set(), 0
    for i in np.random.default_rng(seed).permutation(len(groups)):
        if count >= target:
            break
        chosen.add(groups[i])
        count += sizes[groups[i]]
    in_test = [key in chosen for key in keys]
    sides = {}
    for stem, test in zip(stems, in_test):
        sides.setdefault(group_key(stem, AUGMENTED_COPY), set()).add(test)
    split_sources = sorted(source for source, where in sides.items() if len(where) == 2)
    if split_sources:
        print(f"warning: augmented copies of {len(split_sources)} image(s) are on both sides of the "
              f"split (e.g. {split_sources[0]}*): near-identical test images flatter the test AP. "
              "Keep them together with --group-by REGEX (e.g. --group-by '^(.+?)[._-]aug').",
              file=sys.stderr)
    return ([a for a, test in zip(annotations, in_test) if not test],
            [a for a, test in zip(annotations, in_test) if test])


def split_record(train, test, test_fraction, seed, group_by):
    """What split.json holds: the settings and the image files of each side."""
    return {"test_fraction": test_fraction, "seed": seed, "group_by": group_by,
            "TRAIN": [a.image_path for a in train], "TEST": [a.image_path for a in test]}


def print_summary(summary, output_folder):
    """A table of objects (and difficult ones) per class, images and skipped objects per split."""
    splits = ("TRAIN", "TEST")
    print(f"\n{'':<20}" + "".join(f"{split + ' objects':>16}{'difficult':>11}" for split in splits))
    for name in summary["classes"]:
        counts = [(summary[s]["objects"].get(name, 0), summary[s]["difficult"].get(name, 0)) for s in splits]
        print(f"{name:<20}" + "".join(f"{objects:>16}{difficult:>11}" for objects, difficult in counts))
    totals = [("total objects", lambda s: sum(s["objects"].values())), ("images", lambda s: s["images"]),
              ("images w/o objects", lambda s: s["images_without_objects"]),
              ("skipped: unknown", lambda s: sum(s["skipped_unknown"].values())),
              ("skipped: bad box", lambda s: s["skipped_bad_boxes"])]
    for title, value in totals:
        print(f"{title:<20}" + "".join(f"{value(summary[s]):>16}{'':>11}" for s in splits))
    for split in splits:
        if summary[split]["skipped_unknown"]:
            print(f"{split} objects of unknown classes skipped: {summary[split]['skipped_unknown']}")
    print(f"\nWrote the lists to {Path(output_folder).resolve()}")


# Images in the paper's VOC07+12 trainval (5,011 + 11,540) and VOC2007 test.
VOC_IMAGES = {"VOC2007 trainval": 5_011, "VOC07+12 trainval": 16_551, "VOC2007 test": 4_952}


def voc_sources(voc07, voc12):
    """VOC07 trainval + VOC12 trainval for training (the paper's "07+12"), VOC07 test for testing.

    Both folders must exist: a run without VOC2012 has a third of the training images and
    loses several mAP points, so leaving it out takes voc12="none".
    """
    if not Path(voc07).is_dir():
        raise DataError(f"VOC2007 folder {voc07} does not exist: download VOC with --download, "
                        "or point --voc07 at VOCdevkit/VOC2007")
    train, test = [(Path(voc07), "trainval")], [(Path(voc07), "test")]
    if str(voc12).lower() == "none":
        print("VOC2012 left out (--voc12 none): training on VOC2007 trainval alone")
    elif not Path(voc12).is_dir():
        raise DataError(f"VOC2012 folder {voc12} does not exist. The paper trains on VOC07+12 "
                        f"({VOC_IMAGES['VOC07+12 trainval']:,} images); download it with --download, "
                        "point --voc12 at VOCdevkit/VOC2012, or pass --voc12 none to train on "
                        f"VOC2007 alone ({VOC_IMAGES['VOC2007 trainval']:,} images, several mAP points lower)")
    else:
        train.append((Path(voc12), "trainval"))
    return train, test


def check_voc_counts(summary, with_voc12):
    """Warn (stderr) when a split's image count differs from the official VOC release's."""
    expected = {"TRAIN": ("VOC07+12 trainval" if with_voc12 else "VOC2007 trainval"),
                "TEST": "VOC2007 test"}
    for split, name in expected.items():
        if summary[split]["images"] != VOC_IMAGES[name]:
            print(f"warning: {split} has {summary[split]['images']:,} images, but {name} has "
                  f"{VOC_IMAGES[name]:,}: an incomplete download or a different ImageSets file?",
                  file=sys.stderr)


VOC_ARCHIVES = (("2007", "trainval"), ("2007", "test"), ("2012", "trainval"))


def download_voc(root):
    """Fetch and extract VOC2007 trainval and test and VOC2012 trainval into root/VOCdevkit,
    with torchvision's downloader (checksums included); splits already there are skipped."""
    from torchvision.datasets import VOCDetection
    for year, image_set in VOC_ARCHIVES:
        if (Path(root) / "VOCdevkit" / f"VOC{year}" / "ImageSets" / "Main" / f"{image_set}.txt").is_file():
            continue
        try:
            VOCDetection(str(root), year=year, image_set=image_set, download=True)
        except Exception as error:
            raise DataError(
                f"could not download VOC{year} {image_set} into {root} ({type(error).__name__}: "
                f"{error}). The official server (host.robots.ox.ac.uk) is often slow or down: fetch "
                "VOCtrainval_06-Nov-2007.tar, VOCtest_06-Nov-2007.tar and VOCtrainval_11-May-2012.tar "
                f"from a mirror and extract them in {root}, which then holds VOCdevkit/VOC2007 and "
                "VOCdevkit/VOC2012") from error


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--voc07", default="data/VOCdevkit/VOC2007",
                        help="VOC2007 folder, trainval and test (default: %(default)s)")
    parser.add_argument("--voc12", default="data/VOCdevkit/VOC2012",
                        help="VOC2012 folder, trainval (default: %(default)s); 'none' trains on "
                             "VOC2007 alone (not the paper's 07+12)")
    parser.add_argument("--download", action="store_true",
                        help="first download VOC2007 and VOC2012 (about 3.6 GB) into the folder "
                             "above --voc07's VOCdevkit (default: data/)")
    parser.add_argument("--root", nargs="+", help="dataset folder(s) in VOC layout, instead of Pascal VOC")
    parser.add_argument("--train-splits", nargs="+", default=["trainval"],
                        help="training splits (ImageSets/Main/<split>.txt) of --root or --shapes "
                             "(default: trainval)")
    parser.add_argument("--test-splits", nargs="*", default=["test"],
                        help="test splits of --root or --shapes (default: test)")
    parser.add_argument("--classes", nargs="+",
                        help="class names in label order (default: the 20 VOC classes for VOC, the "
                             "categories in the file's order for COCO, else the sorted names found "
                             "in the annotations)")
    parser.add_argument("--shapes", help="folder of the built-in synthetic dataset; generated if missing")
    parser.add_argument("--coco-train", nargs=2, metavar=("ANNOTATIONS.json", "IMAGE_DIR"),
                        help="COCO-format training annotations and the folder of their images")
    parser.add_argument("--coco-test", nargs=2, metavar=("ANNOTATIONS.json", "IMAGE_DIR"),
                        help="COCO-format test annotations and their images (or --test-fraction); "
                             "alone, test lists only (e.g. to evaluate a converted checkpoint)")
    parser.add_argument("--folder", nargs="+", metavar="DIR",
                        help="IMAGE_DIR [XML_DIR]: a plain folder of images and VOC XML files "
                             "(XML files beside the images, or in XML_DIR), split with --test-fraction")
    parser.add_argument("--test-fraction", type=bounded(float, above=0, below=1),
                        help="split --folder (default 0.2) or a lone --coco-train into training "
                             "and test images, reproducibly (--seed); the split goes to split.json")
    parser.add_argument("--group-by", metavar="REGEX",
                        help="with --test-fraction: images whose file names (without extension) "
                             "give the same match (its first group, if it has one) stay on one "
                             "side, e.g. '^(.+?)_aug' for augmented copies img_1_aug1, img_1_aug2")
    parser.add_argument("--shapes-size", nargs=2, type=bounded(int, 1), default=[400, 100],
                        metavar=("TRAINVAL", "TEST"),
                        help="number of images to generate for --shapes (default: 400 100)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the --shapes generator and of --test-fraction's split (default: 0)")
    parser.add_argument("--skip-unknown", action="store_true",
                        help="drop objects of unknown classes (counted)")
    parser.add_argument("--skip-bad-boxes", action="store_true",
                        help="drop empty boxes or boxes outside the image (counted) instead of failing")
    parser.add_argument("--check-images", action="store_true", help="decode every image fully (slow)")
    parser.add_argument("--output",
                        help="output folder (default: data/voc_lists, data/shapes_lists or data/lists)")
    args = parser.parse_args(argv)
    modes = [given for given in (args.root, args.shapes, args.folder, args.coco_train or args.coco_test) if given]
    if len(modes) > 1:
        parser.error("use one of --root, --shapes, --folder and --coco-train/--coco-test")
    if args.folder and len(args.folder) > 2:
        parser.error("--folder takes IMAGE_DIR and optionally XML_DIR")
    if args.folder and args.test_fraction is None:
        args.test_fraction = 0.2
    if args.coco_train and not args.coco_test and args.test_fraction is None:
        parser.error("--coco-train alone needs --test-fraction (or give --coco-test)")
    if args.test_fraction is not None and not (args.folder or (args.coco_train and not args.coco_test)):
        parser.error("--test-fraction splits --folder or a lone --coco-train")
    if args.group_by is not None:
        if args.test_fraction is None:
            parser.error("--group-by only applies with --test-fraction")
        try:
            re.compile(args.group_by)
        except re.error as error:
            parser.error(f"--group-by {args.group_by!r} is not a regular expression ({error})")
    return args


def own_data_lists(args):
    """--coco-train/--coco-test or --folder: read, split if asked, write; returns the summary."""
    output = writable_folder(args.output or "data/lists", create=False)
    if args.folder:
        splits = {"TRAIN": read_annotations(folder_items(*args.folder), args.skip_bad_boxes,
                                            args.check_images, description="parsing")}
        categories = None                                     # sorted names, as for --root
    else:
        splits, categories = read_coco_splits(args.coco_train, args.coco_test, args.skip_bad_boxes,
                                              args.check_images)
    extra = None
    if args.test_fraction is not None:
        (annotations, bad_boxes), _ = splits["TRAIN"], splits.pop("TEST", None)
        train, test = split_annotations(annotations, args.test_fraction, args.seed, args.group_by)
        splits = {"TRAIN": (train, bad_boxes), "TEST": (test, 0)}
        extra = {"split.json": split_record(train, test, args.test_fraction, args.seed, args.group_by)}
    return write_lists(splits, output, args.classes or categories, args.skip_unknown, extra)


def main(argv=None):
    args = parse_args(argv)
    if args.folder or args.coco_train or args.coco_test:
        summary = own_data_lists(args)
        print_summary(summary, args.output or "data/lists")
        return
    if args.shapes and not Path(args.shapes).exists():
        print(f"Generating the shapes dataset in {args.shapes}")
        make_shapes_dataset(args.shapes, *args.shapes_size, seed=args.seed)
    if args.shapes or args.root:
        roots = [args.shapes] if args.shapes else args.root
        train = [(root, split) for root in roots for split in args.train_splits]
        test = [(root, split) for root in roots for split in args.test_splits]
        classes, output = (SHAPE_CLASSES, "data/shapes_lists") if args.shapes else (None, "data/lists")
    else:
        if args.download:
            download_voc(Path(args.voc07).parent.parent)
        train, test = voc_sources(args.voc07, args.voc12)
        classes, output = VOC_CLASSES, "data/voc_lists"
    output = args.output or output
    summary = create_data_lists(train, test, output, args.classes or classes, args.skip_unknown,
                                args.skip_bad_boxes, args.check_images)
    print_summary(summary, output)
    if not (args.shapes or args.root):
        check_voc_counts(summary, with_voc12=len(train) == 2)


if __name__ == "__main__":
    try:
        main()
    except DataError as error:                 # bad data
        print(f"create_data_lists.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:                   # a read-only or full disk, a failed download
        print(f"create_data_lists.py: error: {error}", file=sys.stderr)
        sys.exit(1)
