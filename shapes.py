"""The built-in "shapes" dataset: a small synthetic dataset in PASCAL VOC layout (JPEGs, XML
annotations, ImageSets), learnable by the toy preset in minutes on a CPU.

    python create_data_lists.py --shapes data/shapes --output data/shapes_lists
    make_shapes_dataset("data/shapes", n_trainval=400, n_test=100, seed=0)   # from Python
"""
import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPE_CLASSES = ("circle", "square", "triangle")

def _hsv_to_rgb(h, s, v):
    rgb = Image.new("HSV", (1, 1), (round(255 * h) % 256, round(255 * s), round(255 * v))).convert("RGB")
    return np.array(rgb.getpixel((0, 0)), dtype=np.float32)


def _background(rng, width, height):
    """Muted texture (height, width, 3) float32: a gradient, stripes or blotchy noise, plus grain."""
    angle = rng.uniform(0, np.pi)
    x, y = np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32)[:, None]
    t = (x * np.cos(angle) + y * np.sin(angle)) / max(width, height)  # (height, width), roughly in [-1, 1.5]
    kind = rng.integers(3)
    if kind == 0:
        pattern = t - t.min()
        pattern /= pattern.max()
    elif kind == 1:
        pattern = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 15) * t)
    else:
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8))
        pattern = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32) / 255
    colour_a = _hsv_to_rgb(rng.uniform(), rng.uniform(0, 0.3), rng.uniform(0.15, 0.7))
    colour_b = _hsv_to_rgb(rng.uniform(), rng.uniform(0, 0.3), rng.uniform(0.15, 0.7))
    image = colour_a + pattern[..., None] * (colour_b - colour_a)
    return image + 8 * rng.standard_normal((height, width, 1), dtype=np.float32)


def _shape_mask(kind, box, rng, size):
    """Boolean mask (height, width) of a shape drawn inside box (x0, y0, x1, y1)."""
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse(box, fill=1)
    elif kind == "square":
        draw.rectangle(box, fill=1)
    else:
        apex = x0 + rng.uniform(0.3, 0.7) * (x1 - x0)
        points = [(x0, y1), (x1, y1), (apex, y0)] if rng.uniform() < 0.5 else [(x0, y0), (x1, y0), (apex, y1)]
        draw.polygon(points, fill=1)
    return np.asarray(mask, dtype=bool)


def _area(box):
    return (box[2] - box[0]) * (box[3] - box[1])


def _overlaps_too_much(box, others):
    """Limit overlap: the intersection may cover at most 20% of either box."""
    for other in others:
        iw = min(box[2], other[2]) - max(box[0], other[0])
        ih = min(box[3], other[3]) - max(box[1], other[1])
        if iw > 0 and ih > 0 and iw * ih > 0.2 * min(_area(box), _area(other)):
            return True
    return False


def _shapes_image(rng):
    """One image (PIL RGB) and its objects [(class name, (xmin, ymin, xmax, ymax) VOC 1-based, difficult)]."""
    width, height = (int(v) for v in rng.integers(240, 501, size=2))
    image = _background(rng, width, height)
    placed, shapes = [], []  # shapes: (class name, mask, side / image side)
    for _ in range(rng.integers(1, 5)):
        for _attempt in range(20):
            side = int(rng.uniform(0.12, 0.6) * min(width, height))
            x0, y0 = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
            box = (x0, y0, x0 + side, y0 + side)
            if not _overlaps_too_much(box, placed):
                break
        else:
            continue
        placed.append(box)
        kind = SHAPE_CLASSES[rng.integers(len(SHAPE_CLASSES))]
        mask = _shape_mask(kind, box, rng, (width, height))
        image[mask] = _hsv_to_rgb(rng.uniform(), rng.uniform(0.75, 1), rng.uniform(0.8, 1))
        shapes.append((kind, mask, side / min(width, height)))

    objects = []
    covered = np.zeros((height, width), dtype=bool)
    for kind, mask, rel_side in reversed(shapes):  # later shapes occlude earlier ones
        visible = mask & ~covered
        covered |= mask
        rows, cols = np.nonzero(visible)
        if len(rows) == 0:
            continue
        difficult = rel_side < 0.14 or visible.sum() < 0.7 * mask.sum()
        objects.append((kind, (cols.min() + 1, rows.min() + 1, cols.max() + 1, rows.max() + 1), difficult))
    image = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    return image, objects[::-1]


def voc_xml(image_id, size, objects):
    annotation = ET.Element("annotation")
    ET.SubElement(annotation, "folder").text = "shapes"
    ET.SubElement(annotation, "filename").text = f"{image_id}.jpg"
    size_element = ET.SubElement(annotation, "size")
    for tag, value in zip(("width", "height", "depth"), (*size, 3)):
        ET.SubElement(size_element, tag).text = str(value)
    ET.SubElement(annotation, "segmented").text = "0"
    for name, box, difficult in objects:
        element = ET.SubElement(annotation, "object")
        ET.SubElement(element, "name").text = name
        ET.SubElement(element, "pose").text = "Unspecified"
        ET.SubElement(element, "truncated").text = "0"
        ET.SubElement(element, "difficult").text = str(int(difficult))
        bndbox = ET.SubElement(element, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), box):
            ET.SubElement(bndbox, tag).text = str(int(value))
    ET.indent(annotation)
    return ET.tostring(annotation, encoding="unicode") + "\n"


def make_shapes_dataset(root, n_trainval=400, n_test=100, seed=0):
    """Write the synthetic "shapes" dataset in VOC layout under `root` (which must not exist).

    Coloured circles, squares and triangles (1-4 per image, side 12-60% of the image side,
    limited overlap) on muted textured backgrounds; images 240-500 px per side. Small or heavily
    occluded objects are marked difficult. Boxes are the exact visible pixel extent. Deterministic
    in `seed`. Written to a temporary sibling folder and renamed, so `root` is never half-made.
    """
    root = Path(root)
    if root.exists():
        raise FileExistsError(f"{root} already exists")
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for folder in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (partial / folder).mkdir(parents=True)
    rng = np.random.default_rng(seed)
    ids = [f"{i:06d}" for i in range(1, n_trainval + n_test + 1)]
    for image_id in ids:
        image, objects = _shapes_image(rng)
        image.save(partial / "JPEGImages" / f"{image_id}.jpg", quality=90)
        (partial / "Annotations" / f"{image_id}.xml").write_text(voc_xml(image_id, image.size, objects))
    (partial / "ImageSets/Main/trainval.txt").write_text("".join(f"{i}\n" for i in ids[:n_trainval]))
    (partial / "ImageSets/Main/test.txt").write_text("".join(f"{i}\n" for i in ids[n_trainval:]))
    os.replace(partial, root)
