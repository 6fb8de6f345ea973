"""Draw a trained SSD300's detections on images.

    python detect.py CHECKPOINT INPUTS... [--out detections/] [--min-score 0.2]
                     [--max-overlap 0.5] [--top-k 200] [--device auto] [--batch-size 8]
                     [--amp auto] [--channels-last]

INPUTS are image files, folders (every file inside with an image extension Pillow knows,
sorted by name, not recursive) or glob patterns (expanded here too, so quoted patterns such as
'photos/**/*.jpg' work). Images are taken in the frame a viewer shows, i.e. with their EXIF
orientation applied, and transparent pixels are laid on white.

Writes to --out: <stem>.png per image (a repeated stem gets _2, _3, ... in input order), each
box drawn with its class name and score in the class's colour, and detections.json, which
maps each image path as given/expanded to a list of
    {"box": [x1, y1, x2, y2], "label": name, "label_index": int, "score": float}
with boxes in pixels of the displayed image. A file that cannot be read is reported on
stderr and skipped. Exit status: 0 if at least one image was processed, 1 otherwise.

From Python (e.g. a notebook):

    from datasets import load_image
    from detect import detect, draw_detections
    from model import load_checkpoint
    net, checkpoint = load_checkpoint("checkpoints/run/checkpoint.pt", "cpu")
    image = load_image("photo.jpg", displayed=True)
    boxes, labels, scores = detect(net, image)          # pixels, label indices, scores
    draw_detections(image, boxes, labels, scores, checkpoint["config"]["label_map"]).show()
"""
import argparse
import glob
import json
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from datasets import DataError, load_image, to_model_input, to_rgb
from model import DRAW_DECODING, load_checkpoint
from utils import (HelpFormatter, add_precision_arguments, atomic_write, bounded, choose_precision,
                   describe_precision, pick_device, writable_folder)

# Box colours by class index (1 -> first entry, cycling after 20): saturated, mutually distinct.
PALETTE = [
    (220, 40, 40), (40, 160, 60), (30, 110, 220), (250, 200, 20), (150, 60, 200),
    (0, 190, 190), (240, 110, 20), (230, 60, 170), (130, 200, 30), (120, 70, 30),
    (0, 120, 120), (255, 140, 160), (90, 90, 200), (180, 160, 0), (100, 220, 160),
    (160, 20, 80), (60, 200, 255), (200, 120, 255), (0, 90, 40), (255, 90, 90),
]
IMAGE_EXTENSIONS = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


# ----------------------------------------------------------------------------------------
# Images in and out
# ----------------------------------------------------------------------------------------

def find_images(inputs):
    """Expand files, folders and glob patterns into (files without repeats, problem messages)."""
    files, problems = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not found:
                problems.append(f"{item}: folder holds no images")
        elif path.exists():
            found = [path]
        else:
            found = [Path(p) for p in sorted(glob.glob(item, recursive=True)) if Path(p).is_file()]
            if not found:
                problems.append(f"{item}: no such file or folder, and no file matches it as a pattern")
        files += found
    return list(dict.fromkeys(files)), problems


def output_names(paths):
    """path -> '<stem>.png', distinct (ignoring case): repeated stems get _2, _3, ... in order."""
    names, used = {}, set()
    for path in paths:
        name, n = path.stem, 1
        while name.lower() in used:
            n += 1
            name = f"{path.stem}_{n}"
        used.add(name.lower())
        names[path] = name + ".png"
    return names


# ----------------------------------------------------------------------------------------
# Detection
# ----------------------------------------------------------------------------------------

@torch.inference_mode()
def detect_batch(net, images, min_score=DRAW_DECODING.min_score,
                 max_overlap=DRAW_DECODING.max_overlap, top_k=DRAW_DECODING.top_k, amp="auto"):
    """Detect objects in several PIL images with one forward pass of `net` (an SSD300 in eval mode).

    Runs on the device of net's parameters, in the autocast precision that `amp` ("auto",
    "off", "bf16", "fp16") gives there (utils.choose_precision), with channels_last input if
    the net is in channels_last (main() converts it, as utils.choose_precision decides).
    Returns, per image, (boxes k x 4 float32 pixels x1, y1, x2, y2 of that image,
    labels k int64 class indices (1..C-1, map them with class_names), scores k float32),
    all on the CPU, highest score first.
    """
    if not images:
        return []
    weight = next(net.parameters())
    device = weight.device
    dtype, _ = choose_precision(amp, device)
    x = torch.stack([to_model_input(to_rgb(image)) for image in images]).to(device)  # N x 3 x 300 x 300
    if weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        locs, class_scores = net(x)                        # N x 8732 x 4, N x 8732 x C
    boxes, labels, scores = net.detect_objects(locs, class_scores, min_score, max_overlap, top_k)
    results = []
    for image, b, l, s in zip(images, boxes, labels, scores):
        w, h = image.size
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        results.append((b.float().cpu() * scale, l.cpu(), s.float().cpu()))
    return results


def detect(net, image, min_score=DRAW_DECODING.min_score, max_overlap=DRAW_DECODING.max_overlap,
           top_k=DRAW_DECODING.top_k, amp="auto"):
    """Detections in one PIL image: (boxes k x 4 in its pixels, label indices k, scores k).

    Boxes refer to `image` as passed: use datasets.load_image(path, displayed=True) for a
    file's displayed (EXIF-rotated) frame.
    """
    return detect_batch(net, [image], min_score, max_overlap, top_k, amp)[0]


def class_names(label_map):
    """label_map (name -> index) -> list of names by index ("class <i>" for unused indices)."""
    names = [f"class {i}" for i in range(max(label_map.values()) + 1)]
    for name, index in label_map.items():
        names[index] = name
    return names


def detections_to_json(boxes, labels, scores, names):
    """One image's detections as JSON-ready dicts (boxes in pixels to 0.01, scores to 1e-4)."""
    return [{"box": [round(v, 2) for v in box], "label": names[label], "label_index": label,
             "score": round(score, 4)}
            for box, label, score in zip(boxes.tolist(), labels.tolist(), scores.tolist())]


def write_json(results, path):
    """Write {image path: detections} with one line per detection."""
    entries = [f" {json.dumps(image)}: [" + ",".join(f"\n  {json.dumps(d)}" for d in detections) + "\n ]"
               for image, detections in results.items()]
    with atomic_write(path) as f:
        f.write("{\n" + ",\n".join(entries) + "\n}\n")


# ----------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------

def class_colour(label):
    """RGB colour of class index `label` (>= 1)."""
    return PALETTE[(int(label) - 1) % len(PALETTE)]


def text_colour(background):
    """Black or white, whichever reads better on `background` (RGB)."""
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def draw_detections(image, boxes, labels, scores, names):
    """An RGB copy of `image` with each detection's box, class name and score in its class colour.

    boxes: k x 4 pixels (x1, y1, x2, y2) of `image`; labels: k class indices; scores: k;
    names: class names by index, or a label map (name -> index).
    Line width and font size grow with the image. The best detections are drawn last (on top).
    """
    if isinstance(names, dict):
        names = class_names(names)
    canvas = to_rgb(image)
    draw = ImageDraw.Draw(canvas)
    w, h = canvas.size
    line = max(2, round(max(w, h) / 300))
    font_size = max(11, round(max(w, h) / 50))
    font = ImageFont.load_default(size=font_size)
    pad = max(2, font_size // 5)
    for box, label, score in reversed(list(zip(boxes.tolist(), labels.tolist(), scores.tolist()))):
        colour = class_colour(label)
        # Pixel columns round(x1) .. round(x2) - 1 (and rows likewise) hold the box.
        x1, y1, x2, y2 = (round(v) for v in box)
        draw.rectangle((x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)), outline=colour, width=line)
        text = f"{names[label]} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        label_w, label_h = right - left + 2 * pad, bottom - top + 2 * pad
        # Above the box if it fits, else just inside its top; kept within the image's width.
        lx = max(0, min(x1, w - label_w))
        ly = y1 - label_h if y1 >= label_h else y1
        draw.rectangle((lx, ly, lx + label_w - 1, ly + label_h - 1), fill=colour)
        draw.text((lx + pad - left, ly + pad - top), text, fill=text_colour(colour), font=font)
    return canvas


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("checkpoint", help="checkpoint written by train.py")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image file, folder or glob pattern")
    p.add_argument("--out", type=Path, default=Path("detections"), help="output folder")
    p.add_argument("--min-score", type=bounded(float, 0, below=1), default=DRAW_DECODING.min_score,
                   help="minimum class score")
    p.add_argument("--max-overlap", type=bounded(float, above=0, high=1),
                   default=DRAW_DECODING.max_overlap, help="NMS IoU threshold")
    p.add_argument("--top-k", type=bounded(int, 1), default=DRAW_DECODING.top_k,
                   help="most detections per image")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=bounded(int, 1), default=8, help="images per forward pass")
    add_precision_arguments(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    paths, problems = find_images(args.inputs)
    for problem in problems:
        print(problem, file=sys.stderr)
    if not paths:
        print("error: no images to process", file=sys.stderr)
        return 1
    try:
        net, checkpoint = load_checkpoint(args.checkpoint, pick_device(args.device))
        writable_folder(args.out)
    except (FileNotFoundError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    dtype, memory_format = choose_precision(args.amp, next(net.parameters()).device,
                                            args.channels_last)
    print(f"precision: {describe_precision(dtype, memory_format)}", file=sys.stderr)
    net = net.to(memory_format=memory_format)
    names = class_names(checkpoint["config"]["label_map"])
    try:
        results = detect_and_draw(net, paths, names, args)
        write_json(results, args.out / "detections.json")
    except OSError as error:                            # e.g. a full disk
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{len(results)} of {len(paths)} images processed; annotated images and detections.json "
          f"in {args.out}", file=sys.stderr)
    return 0 if results else 1


def detect_and_draw(net, paths, names, args):
    """Detect in `paths` batch by batch and save each annotated image: {path: detections}."""
    out_names = output_names(paths)
    results = {}
    with tqdm(total=len(paths), unit="image", file=sys.stderr) as bar:
        for start in range(0, len(paths), args.batch_size):
            batch = []                                   # (path, PIL RGB image)
            for path in paths[start:start + args.batch_size]:
                try:
                    batch.append((path, load_image(path, displayed=True)))
                except DataError as error:
                    tqdm.write(str(error), file=sys.stderr)
                    bar.update()
            images = [image for _, image in batch]
            detections = detect_batch(net, images, args.min_score, args.max_overlap, args.top_k,
                                      args.amp)
            for (path, image), (boxes, labels, scores) in zip(batch, detections):
                with atomic_write(args.out / out_names[path], "wb") as f:
                    draw_detections(image, boxes, labels, scores, names).save(f, format="PNG")
                results[str(path)] = detections_to_json(boxes, labels, scores, names)
                bar.update()
    return results


if __name__ == "__main__":
    sys.exit(main())
