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

Writes to the output folder: TRAIN_images.json / TEST_images.json (absolute image paths),
TRAIN_objects.json / TEST_objects.json (per image: boxes [[x1, y1, x2, y2], ...] in continuous
pixel coordinates, labels, difficulties 0/1, and size [width, height] of the annotated frame),
and label_map.json (class name -> index, "background": 0).
"""
import argparse
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from datasets import (SHAPE_CLASSES, DataError, exif_rotated_size, load_image, make_shapes_dataset,
                      uses_exif_frame)
from utils import atomic_write_json, bounded, writable_folder

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
BOX_TOLERANCE = 1  # pixels a box may stick out of the image; it is clipped


@dataclass
class Annotation:
    """One image and its objects, boxes in continuous pixel coordinates of the annotated frame."""
    image_path: str
    xml_path: str
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


def to_continuous(box, width, height):
    """VOC (xmin, ymin, xmax, ymax), 1-based inclusive pixels -> [x1, y1, x2, y2] continuous, or None if bad.

    Pixel i covers [i-1, i) in continuous coordinates, so x1 = xmin - 1, x2 = xmax: then IoU without
    a +1 equals the official devkit's. Boxes may stick out by BOX_TOLERANCE pixels and are clipped;
    None if a box is further outside or empty.
    """
    x1, y1, x2, y2 = box[0] - 1, box[1] - 1, box[2], box[3]
    inside = (x1 >= -BOX_TOLERANCE and y1 >= -BOX_TOLERANCE
              and x2 <= width + BOX_TOLERANCE and y2 <= height + BOX_TOLERANCE)  # False for NaN too
    x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))
    return [x1, y1, x2, y2] if inside and x2 > x1 and y2 > y1 else None


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


def read_annotations(sources, skip_bad_boxes=False, check_images=False, description="parsing"):
    """Parse the images listed by (root, split) pairs -> ([Annotation], number of bad boxes skipped)."""
    items = [(Path(root), image_id) for root, split in sources for image_id in read_split_ids(root, split)]
    annotations, bad_boxes = [], 0
    for root, image_id in tqdm(items, desc=description, unit="image"):
        xml_path = root / "Annotations" / f"{image_id}.xml"
        image_path = (root / "JPEGImages" / f"{image_id}.jpg").resolve()  # <filename> is not trusted
        size, objects = parse_annotation(xml_path)
        width, height = annotated_frame_size(image_path, size, check_images)
        annotation = Annotation(str(image_path), str(xml_path), (width, height))
        for name, raw_box, difficult in objects:
            box = to_continuous(raw_box, width, height)
            if box is None:
                if not skip_bad_boxes:
                    raise DataError(f"{xml_path}: box {raw_box} of '{name}' is empty or outside the "
                                    f"{width}x{height} image (use --skip-bad-boxes to drop such boxes)")
                bad_boxes += 1
                continue
            annotation.names.append(name)
            annotation.boxes.append(box)
            annotation.difficulties.append(int(difficult))
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
                examples.setdefault(name, annotation.xml_path)
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
    splits = {split: read_annotations(sources, skip_bad_boxes, check_images, description=f"parsing {split}")
              for split, sources in (("TRAIN", train_sources), ("TEST", test_sources))}
    everything = [annotation for annotations, _ in splits.values() for annotation in annotations]
    if not everything:
        raise DataError("neither the training nor the test splits list any image: check the "
                        "ImageSets/Main/<split>.txt files and the split names")
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

    outputs, summary = {"label_map.json": label_map}, {"classes": list(label_map)[1:]}
    for split, (annotations, bad_boxes) in splits.items():
        entries = to_objects(annotations, label_map)
        outputs[f"{split}_images.json"] = [a.image_path for a in annotations]
        outputs[f"{split}_objects.json"] = entries
        skipped = unknown_classes(annotations, label_map)[0]
        summary[split] = split_summary(entries, label_map, skipped, bad_boxes)

    output_folder.mkdir(parents=True, exist_ok=True)
    for name, data in outputs.items():
        atomic_write_json(output_folder / name, data)
    return summary


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
                        help="class names in label order (default: the 20 VOC classes for VOC, else the "
                             "sorted names found in the annotations)")
    parser.add_argument("--shapes", help="folder of the built-in synthetic dataset; generated if missing")
    parser.add_argument("--shapes-size", nargs=2, type=bounded(int, 1), default=[400, 100],
                        metavar=("TRAINVAL", "TEST"),
                        help="number of images to generate for --shapes (default: 400 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --shapes generator (default: 0)")
    parser.add_argument("--skip-unknown", action="store_true",
                        help="drop objects of unknown classes (counted)")
    parser.add_argument("--skip-bad-boxes", action="store_true",
                        help="drop empty boxes or boxes outside the image (counted) instead of failing")
    parser.add_argument("--check-images", action="store_true", help="decode every image fully (slow)")
    parser.add_argument("--output",
                        help="output folder (default: data/voc_lists, data/shapes_lists or data/lists)")
    args = parser.parse_args(argv)
    if args.root and args.shapes:
        parser.error("use either --root or --shapes")
    return args


def main(argv=None):
    args = parse_args(argv)
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
    except (DataError, OSError) as error:     # bad data; a read-only or full disk
        raise SystemExit(f"error: {error}")
