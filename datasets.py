"""Data for SSD: the dataset over the JSON lists and the paper's augmentation.

The JSON lists are written by create_data_lists.py. Boxes there are continuous pixel coordinates
(x1, y1, x2, y2) in the frame of the image as annotated; the dataset returns them as fractions of
the image size, with the image resized to the model's input (ModelInput: 300x300 for SSD300) and
normalised as its weights expect (the ImageNet mean/std unless a checkpoint records otherwise).

Training augmentation follows Liu et al. (ECCV 2016, Sec. 2.2 and the Caffe implementation):
photometric distortion, zoom out ("expand"), the min-IoU random crop, horizontal flip, resize,
drawn in that order (draw_augmentation) and applied to the pixels in one pass: here (render),
or on the training device (decode="device", gpu_augment.py). Its randomness depends only on
(seed, epoch, index), so a sample does not depend on the number of DataLoader workers or on the
order in which samples are drawn.
"""
import contextlib
import gc
import hashlib
import io
import itertools
import json
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, ImageOps
from torchvision.ops import box_iou

from priors import prior_config
from utils import atomic_torch_save, load_tensors

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB, on 0-1 images
IMAGENET_STD = (0.229, 0.224, 0.225)


# How an image of any size becomes the network's size x size input: part of what a network's
# weights expect (imported weights were trained and measured with their project's own resize).
#   pillow:      this repository's: Pillow's antialiased bilinear filter on the 8-bit image
#   torchvision: torchvision's detection models' (GeneralizedRCNNTransform): the 0-1 float
#                image normalised, then bilinear without antialiasing (F.interpolate,
#                align_corners=False)
#   opencv:      amdegroot/ssd.pytorch's (BaseTransform): cv2.resize's INTER_LINEAR on the
#                8-bit image (no antialiasing, rounded to 8 bits), then normalised
RESIZE_METHODS = ("pillow", "torchvision", "opencv")


class ModelInput(NamedTuple):
    """What a network takes: size x size RGB images, normalised as (x - mean) / std on 0-1
    values (per channel), made from images of other sizes by the `resize` method
    (RESIZE_METHODS)."""
    size: int
    mean: tuple
    std: tuple
    resize: str = "pillow"

    @property
    def fill(self):
        """The zoom-out canvas's colour on 0-255 images: the mean, which normalises to 0."""
        return tuple(round(255 * m) for m in self.mean)


def model_input(config):
    """The ModelInput of a run's or checkpoint's config: its priors' input size, and its
    preprocessing ({"mean": [...], "std": [...], "resize": ...}: ImageNet's mean and std,
    which torchvision's VGG16 and ResNet-34 weights expect, where a config has none; this
    repository's resize where it names none)."""
    preprocessing = config.get("preprocessing") or {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    return ModelInput(prior_config(config).image_size, tuple(preprocessing["mean"]),
                      tuple(preprocessing["std"]), preprocessing.get("resize", "pillow"))


# SSD300's input with the ImageNet normalisation: the paper's model from ImageNet weights.
DEFAULT_INPUT = model_input({})

# Caffe's photometric distortion (ssd_pascal.py, src/caffe/util/im_transforms.cpp), on 0-255.
BRIGHTNESS_DELTA = 32  # added to every channel
CONTRAST_RANGE = (0.5, 1.5)  # every channel multiplied
SATURATION_RANGE = (0.5, 1.5)  # HSV saturation multiplied
HUE_DEGREES = 36  # Caffe's hue_delta 18 is in OpenCV's 8-bit hue units of 2 degrees

# Caffe's batch samplers (ssd_pascal.py): besides the whole image, one crop with at least this
# IoU with some object for each entry (0.0: the unconstrained sampler, max IoU 1.0), from up
# to 50 trials each, scale [0.3, 1] and aspect ratio [0.5, 2] in normalised coordinates.
CROP_MIN_IOUS = (0.1, 0.3, 0.5, 0.7, 0.9, 0.0)
CROP_TRIALS = 50
# Caffe: scale = sqrt(crop area / image area) and aspect = crop width / height, both as
# fractions of the image's; the "one-sampler" policy (random_crop): each side, and in pixels.
CROP_SCALE_RANGE = (0.3, 1.0)
CROP_ASPECT_RANGE = (0.5, 2.0)

# Caffe's expand_param (ssd_pascal.py): the zoom out's probability and largest ratio of the
# canvas's side to the image's.
ZOOM_OUT_PROB = 0.5
ZOOM_OUT_MAX = 4.0

# Caffe's training resize picks one of OpenCV's LINEAR, AREA, NEAREST, CUBIC and LANCZOS4 at
# random (test: LINEAR). Pillow's equivalents, except that Pillow's bilinear, bicubic and
# Lanczos filters also antialias when they shrink (OpenCV's do not; AREA is a box filter in both).
TRAIN_INTERPOLATIONS = (Image.BILINEAR, Image.BOX, Image.NEAREST, Image.BICUBIC, Image.LANCZOS)



class DataError(ValueError):
    """A problem with the data on disk; the message names the file."""


class BadSample(NamedTuple):
    """Stands in for a sample that could not be read (PascalVOCDataset with on_error="mark"),
    so that the problem reaches the main process as one line from any DataLoader worker."""
    index: int
    message: str


class Batch(NamedTuple):
    """What collate_fn makes of a list of samples."""
    images: torch.Tensor      # (N, 3, S, S), or a list of N PendingImages (decode="device")
    boxes: list               # N tensors (n_i, 4), fractional x1, y1, x2, y2
    labels: list              # N tensors (n_i,)
    difficulties: list        # N tensors (n_i,) bool
    problems: list            # messages of the samples left out (BadSample), in order


# ----------------------------------------------------------------------------------------------
# Images


def exif_rotated_size(image):
    """(width, height) of `image` once its EXIF orientation is applied."""
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    return image.size[::-1] if orientation in (5, 6, 7, 8) else image.size


def uses_exif_frame(image, annotated_size):
    """Whether boxes annotated on an image of `annotated_size` (w, h) refer to the EXIF-rotated frame.

    VOC and most annotation tools annotate the stored pixels, so the stored frame wins unless
    only the rotated frame matches the annotated size.
    """
    if annotated_size is None or tuple(annotated_size) == image.size:
        return False
    return tuple(annotated_size) == exif_rotated_size(image)


def to_8bit(image):
    """A high-bit-depth grayscale PIL image ("I;16*", "I", "F") as mode "L", scaled (Pillow's
    convert clips instead: 16-bit images come out all white).

    16-bit data (modes I;16*, and mode I within 0..65535, which is how Pillow decodes some
    16-bit PNGs) maps 0..65535 to 0..255; floats within 0..1 map to 0..255; anything else is
    stretched from its own minimum to its maximum.
    """
    values = np.asarray(image, dtype=np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode.startswith("I;16") or (image.mode == "I" and low >= 0 and high <= 65535):
        values = values / 257
    elif image.mode == "F" and low >= 0 and high <= 1:
        values = values * 255
    else:
        values = (values - low) * (255 / (high - low) if high > low else 0.0)
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


def to_rgb(image):
    """A PIL image of any mode as RGB; transparent pixels are laid on white, high-bit-depth
    grayscale is scaled to 8 bits (to_8bit)."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        image = to_8bit(image)
    if image.has_transparency_data:
        white = Image.new("RGBA", image.size, "white")
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


# What Pillow (and torchvision's decoders) raise for a file that is not a readable image.
UNREADABLE = (OSError, SyntaxError, ValueError, RuntimeError, Image.DecompressionBombError)


def cannot_read(path, error):
    """The DataError for an unreadable image file, whichever decoder found it."""
    return DataError(f"{path}: cannot read image ({error})")


def load_image(path, annotated_size=None, displayed=False):
    """Load an image as PIL RGB (decoded in full, so a corrupt file fails here, naming it).

    The frame: the one whose size matches `annotated_size` (see uses_exif_frame), or with
    displayed=True the one a viewer shows, EXIF orientation applied (for users' photos).
    """
    try:
        with Image.open(path) as image:
            if displayed or uses_exif_frame(image, annotated_size):
                image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except UNREADABLE as error:
        raise cannot_read(path, error) from error


class PendingImage(NamedTuple):
    """A training image not decoded yet (PascalVOCDataset with decode="device"): its file and
    the augmentation drawn for it, which gpu_augment.render_batch applies on the device."""
    path: str
    data: torch.Tensor        # uint8: a JPEG file's bytes (n,), or another file's RGB pixels (3, H, W)
    orientation: int          # EXIF orientation to undo after decoding (1: none)
    photometric: "Photometric"
    geometry: "Geometry"

    @property
    def is_jpeg(self):
        return self.data.dim() == 1


def without_app1_segments(raw):
    """A JPEG file's bytes without its APP1 segments (EXIF, XMP), as a bytearray.

    TorchCodec's decoders turn the pixels by the EXIF orientation they find, by rules that
    differ between its CPU decoder (the first APP1 segment, whatever it holds) and its CUDA
    one (the first "Exif" segment), and cannot be told not to; the device path applies the
    orientation Pillow reads (PendingImage.orientation), or none. Without the segments the
    decoders turn nothing; the pixels decode the same (APP1 holds no image data).
    """
    out, pos = bytearray(raw[:2]), 2
    while pos + 4 <= len(raw) and raw[pos] == 0xFF:
        marker = raw[pos + 1]
        if marker == 0xFF:                                    # a fill byte before a marker
            out.append(0xFF)
            pos += 1
            continue
        length = int.from_bytes(raw[pos + 2:pos + 4], "big")
        if marker in (0xDA, 0xD9) or length < 2 or pos + 2 + length > len(raw):
            break                                             # the scan (or damage): copied as is
        if marker != 0xE1:
            out += raw[pos:pos + 2 + length]
        pos += 2 + length
    out += raw[pos:]
    return out


def read_undecoded(path, annotated_size=None):
    """(data, orientation, (width, height)) of an image file for PendingImage, decoding no
    pixels when the device can: an RGB or greyscale JPEG (the header says so) comes as
    its bytes (without_app1_segments), with the EXIF orientation load_image would apply and
    the size in that frame.
    Any other file, or a JPEG cut short (no end-of-image marker: Pillow's "truncated" error),
    is decoded here by load_image itself, so its pixels and errors are the CPU path's.
    """
    try:
        # Python's reads (not the decoder's), so that errors read as load_image's.
        with open(path, "rb") as file:
            raw = file.read()
    except UNREADABLE as error:
        raise cannot_read(path, error) from error
    try:
        with Image.open(io.BytesIO(raw)) as image:             # the header only, from the bytes read
            if image.format == "JPEG" and image.mode in ("RGB", "L") and raw.endswith(b"\xff\xd9"):
                exif = uses_exif_frame(image, annotated_size)
                orientation = image.getexif().get(ExifTags.Base.Orientation, 1) if exif else 1
                data = torch.frombuffer(without_app1_segments(raw), dtype=torch.uint8)
                return data, orientation, exif_rotated_size(image) if exif else image.size
    except UNREADABLE:
        pass                              # load_image reads it again and says why, by name
    image = load_image(path, annotated_size)
    return pixels_chw(image), 1, image.size


def pixels_chw(image):
    """A PIL RGB image's pixels: a contiguous uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy())


def resize_as_torchvision(pixels, model_input):
    """uint8 (3, H, W) on any device -> float32 (3, S, S) as torchvision's detection models
    make their input of a 0-1 image (GeneralizedRCNNTransform: normalised first, then
    resized with F.interpolate, bilinear, align_corners=False, no antialiasing), S =
    model_input.size. An image of S x S is unchanged by that resize."""
    x = pixels.float().div(255)                      # as torchvision's to_tensor
    mean = torch.tensor(model_input.mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
    std = torch.tensor(model_input.std, dtype=torch.float32, device=x.device).view(3, 1, 1)
    x = (x - mean) / std
    size = model_input.size
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False)[0]


def resize_with_opencv(image, size):
    """A PIL RGB image resized to size x size as amdegroot/ssd.pytorch's BaseTransform does:
    cv2.resize, INTER_LINEAR on the 8-bit pixels (per channel, so BGR or RGB alike)."""
    try:
        import cv2
    except ImportError as error:
        raise ImportError("this network's input is resized with OpenCV (its weights were trained "
                          "that way): pip install opencv-python-headless") from error
    return Image.fromarray(cv2.resize(np.asarray(image), (size, size), interpolation=cv2.INTER_LINEAR))


def resize_image(image, size, interpolation=Image.BILINEAR):
    """Resize a PIL image to size x size (bilinear, antialiased, unless told otherwise).

    reducing_gap=1 first shrinks by an integer factor (box filter): 2-3x faster on large
    zoomed-out canvases, at no visible cost.
    """
    return image.resize((size, size), interpolation, reducing_gap=1.0)


def to_model_input(image, model_input=DEFAULT_INPUT):
    """PIL RGB image of any size -> normalised float32 tensor (3, S, S), S = model_input.size,
    resized by model_input.resize; an image of S x S (already resized by the training
    transform) is not resampled again."""
    size = model_input.size
    if model_input.resize == "torchvision":
        return resize_as_torchvision(pixels_chw(image), model_input)
    if image.size != (size, size):
        image = (resize_with_opencv(image, size) if model_input.resize == "opencv" else
                 resize_image(image, size))
    # numpy in place: ~5x faster than torch ops, whose intra-op threads only add overhead here
    mean = np.array(model_input.mean, np.float32)[:, None, None] * 255
    std = np.array(model_input.std, np.float32)[:, None, None] * 255
    array = np.asarray(image).transpose(2, 0, 1).astype(np.float32, order="C")  # (3, S, S)
    array -= mean
    array /= std
    return torch.from_numpy(array)


# ----------------------------------------------------------------------------------------------
# Augmentation: the photometric distortion on the PIL image, then the geometric steps drawn as
# one Geometry (sample_geometry) and applied once to the boxes (place_boxes) and the pixels (render).


# The colour steps are 8-bit lookup tables, made here for both the PIL path (Image.point) and
# the device path (gpu_augment), n draws at a time: each function maps float64 parameters of
# shape (n,) to uint8 tables (n, 256).
LEVELS = torch.arange(256, dtype=torch.float64)


def _table(values):
    """Values rounded (half to even, as Python's round) and clipped to 0..255, as uint8."""
    return values.round().clamp(0, 255).to(torch.uint8)


def brightness_contrast_table(delta, alpha):
    """Caffe's AdjustBrightness (delta added to every channel, clipped) then AdjustContrast
    (every channel multiplied by alpha, clipped: convertTo(alpha, 0)), one table equal to the
    two in turn. torchvision's adjust_contrast blends towards the mean grey instead."""
    return _table(_table(LEVELS + delta[:, None]).double() * alpha[:, None])


def hue_table(degrees):
    """HSV hue shifted by `degrees`. Pillow's 8-bit hue spans 360 degrees in 256 steps (OpenCV's:
    180 steps). The shift wraps around the colour circle; Caffe's 8-bit arithmetic clips hues
    below 0 to red instead, a quirk not copied."""
    return ((LEVELS + (degrees * 256 / 360)[:, None]).round() % 256).to(torch.uint8)


def saturation_table(alpha):
    """Caffe's AdjustSaturation: HSV saturation multiplied by alpha, clipped."""
    return _table(LEVELS * alpha[:, None])


def _one(value):
    """A (1,) float64 parameter: the tables' arithmetic is Python's, in double precision."""
    return torch.tensor([value], dtype=torch.float64)


def adjust_brightness_contrast(image, delta=0.0, alpha=1.0):
    """brightness_contrast_table on a PIL RGB image."""
    return image.point(brightness_contrast_table(_one(delta), _one(alpha))[0].tolist() * 3)


def adjust_saturation_hue(image, alpha=1.0, degrees=0.0):
    """Caffe's AdjustSaturation and AdjustHue (saturation_table, hue_table) on a PIL RGB image,
    in one HSV round trip."""
    h, s, v = image.convert("HSV").split()
    h = h.point(hue_table(_one(degrees))[0].tolist())
    s = s.point(saturation_table(_one(alpha))[0].tolist())
    return Image.merge("HSV", (h, s, v)).convert("RGB")


class Photometric(NamedTuple):
    """One draw of Caffe's colour distortion (see sample_photometric); the neutral values
    (0, 1, 1, 0) leave a step out."""
    brightness: float     # added to every channel
    contrast: float       # every channel multiplied
    saturation: float     # HSV saturation multiplied
    hue: float            # HSV hue shifted, degrees
    contrast_first: bool  # contrast before saturation and hue, else after

    @property
    def contrasts(self):
        """The contrast factors before and after the HSV step (1: none)."""
        return (self.contrast, 1.0) if self.contrast_first else (1.0, self.contrast)

    @property
    def changes_hsv(self):
        """Whether the HSV round trip runs (it is not lossless, so it is left out when neutral)."""
        return self.saturation != 1.0 or self.hue != 0.0

    @property
    def neutral(self):
        """Whether the draw leaves every colour as it is (NO_PHOTOMETRIC's, evaluation's)."""
        return self.brightness == 0.0 and self.contrast == 1.0 and not self.changes_hsv


NO_PHOTOMETRIC = Photometric(0.0, 1.0, 1.0, 0.0, False)


def sample_photometric():
    """Caffe's colour distortion (DistortImage in im_transforms.cpp), drawn: brightness, then
    contrast either before or after saturation and hue; each of the four applied with
    probability 0.5. Unlike v2.RandomPhotometricDistort, brightness is additive (+-32, not a
    factor), contrast is a plain factor, hue spans +-36 degrees, and there is no random channel
    permutation (ssd_pascal.py: random_order_prob 0)."""
    contrast_first = torch.rand(()) < 0.5
    apply = torch.rand(4) < 0.5                 # brightness, contrast, saturation, hue
    values = torch.rand(4).tolist()

    def between(value, low, high):
        return low + (high - low) * value

    return Photometric(
        brightness=between(values[0], -BRIGHTNESS_DELTA, BRIGHTNESS_DELTA) if apply[0] else 0.0,
        contrast=between(values[1], *CONTRAST_RANGE) if apply[1] else 1.0,
        saturation=between(values[2], *SATURATION_RANGE) if apply[2] else 1.0,
        hue=between(values[3], -HUE_DEGREES, HUE_DEGREES) if apply[3] else 0.0,
        contrast_first=bool(contrast_first))


def distort(image, p):
    """Apply a Photometric draw `p` to a PIL RGB image."""
    first, last = p.contrasts
    if p.brightness or first != 1.0:
        image = adjust_brightness_contrast(image, p.brightness, first)
    if p.changes_hsv:
        image = adjust_saturation_hue(image, p.saturation, p.hue)
    if last != 1.0:
        image = adjust_brightness_contrast(image, alpha=last)
    return image


def photometric_tables(draws):
    """The lookup tables of Photometric draws, in the order `distort` applies them: uint8
    (n, 4, 256) = brightness and first contrast, hue, saturation, last contrast (identity
    tables for the steps left out)."""
    values = torch.tensor([[p.brightness, *p.contrasts, p.saturation, p.hue] for p in draws],
                          dtype=torch.float64).reshape(-1, 5)
    brightness, first, last, saturation, hue = values.unbind(1)
    return torch.stack([brightness_contrast_table(brightness, first), hue_table(hue),
                        saturation_table(saturation),
                        brightness_contrast_table(torch.zeros_like(last), last)], dim=1)


def centres_inside(boxes, crops):
    """Whether the centre of each box lies strictly inside each crop: (n, 4), (m, 4) -> (m, n) bool."""
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    return ((centres > crops[:, None, :2]) & (centres < crops[:, None, 2:])).all(dim=2)


def sample_crops(boxes, min_ious=CROP_MIN_IOUS, trials=CROP_TRIALS):
    """Caffe's batch samplers: for each min IoU, the first of `trials` random crops that
    overlaps some object by at least that IoU (SampleBBox and SatisfySampleConstraint in
    src/caffe/util/sampler.cpp).

    boxes: (n, 4) corners as fractions of the image. A crop has scale s ~ U(0.3, 1) and aspect
    ratio r ~ U(0.5, 2), r clamped to [s^2, 1/s^2] so that it fits, width s*sqrt(r) and height
    s/sqrt(r) (fractions of the image's), and a uniform position. min IoU 0 is the
    unconstrained sampler (max IoU 1): any crop, given one object. All trials are drawn at once.
    Returns {index into min_ious: crop (4,) fractional corners} for the samplers that succeed.
    """
    n = len(min_ious)
    if len(boxes) == 0:
        return {}
    scale_u, aspect_u, x_u, y_u = torch.rand(4, n, trials, dtype=torch.float64)
    scale = CROP_SCALE_RANGE[0] + (CROP_SCALE_RANGE[1] - CROP_SCALE_RANGE[0]) * scale_u
    aspect = CROP_ASPECT_RANGE[0] + (CROP_ASPECT_RANGE[1] - CROP_ASPECT_RANGE[0]) * aspect_u
    aspect = torch.minimum(torch.maximum(aspect, scale ** 2), scale ** -2)
    w, h = (scale * aspect.sqrt()).clamp(max=1), (scale / aspect.sqrt()).clamp(max=1)  # rounding
    x1, y1 = x_u * (1 - w), y_u * (1 - h)
    crops = torch.stack([x1, y1, x1 + w, y1 + h], dim=-1)                    # (n, trials, 4)
    iou = box_iou(crops.reshape(-1, 4), boxes.double()).reshape(n, trials, -1)
    ok = (iou >= torch.tensor(min_ious, dtype=torch.float64)[:, None, None]).any(dim=2)
    first = ok.to(torch.int8).argmax(dim=1)                                # first success
    return {i: crops[i, first[i]] for i in range(n) if ok[i, first[i]]}


CROP_POLICIES = ("caffe", "one-sampler")


def sample_crop(width, height, boxes, min_iou, trials=CROP_TRIALS):
    """The "one-sampler" policy's crop (left, top, right, bottom) in integer pixels, or None if
    no trial succeeds: each side 0.3-1 of the image's, width / height 0.5-2 in pixels, accepted
    if an object whose centre falls inside has IoU >= min_iou with it (so one always survives).
    boxes: (n, 4) pixels. All trials are drawn at once; the first acceptable one is returned.
    """
    low, high = CROP_SCALE_RANGE
    scale_w, scale_h, fx, fy = torch.rand(4, trials, dtype=torch.float64)
    crop_w = (width * (low + (high - low) * scale_w)).floor().clamp(min=1)  # (trials,)
    crop_h = (height * (low + (high - low) * scale_h)).floor().clamp(min=1)
    left, top = (fx * (width - crop_w)).floor(), (fy * (height - crop_h)).floor()
    crops = torch.stack([left, top, left + crop_w, top + crop_h], dim=1).to(boxes.dtype)  # (trials, 4)
    aspect_ok = (crop_w / crop_h >= CROP_ASPECT_RANGE[0]) & (crop_w / crop_h <= CROP_ASPECT_RANGE[1])
    accepted = aspect_ok & (centres_inside(boxes, crops) & (box_iou(crops, boxes) >= min_iou)).any(dim=1)
    if not accepted.any():
        return None
    return tuple(int(v) for v in crops[accepted.nonzero()[0, 0]])


def crop_window(width, height, boxes, policy="caffe"):
    """The paper's random crop of a (width x height) canvas: (left, top, right, bottom) in
    integer pixels, the whole canvas when no crop is taken. boxes: (n, 4) pixels.

    policy "caffe" (the paper's recipe): every sampler of `sample_crops` runs, and one sample is
    picked uniformly among those found and the whole image (always one of them).
    "one-sampler" (this repository's earlier sampler): one of the whole image and the samplers
    is drawn uniformly, tried with `sample_crop`, and the whole image is kept if it finds
    nothing. It crops less often (on a 500x375 image with one 100x80 object, 34% of samples are
    neither zoomed nor cropped, against 15%), which suits short schedules: the toy preset
    reaches VOC07 mAP 0.90 with it, 0.72 with "caffe".
    v2.RandomIoUCrop differs from both: it draws one option at a time, again and again until
    one succeeds (40 trials each), and never keeps the whole image.
    """
    whole = (0, 0, width, height)
    if policy == "caffe":
        scale = torch.tensor([width, height, width, height], dtype=torch.float64)
        found = list(sample_crops(boxes.double() / scale).values())
        choice = torch.randint(len(found) + 1, ()).item()
        if choice == len(found):
            return whole
        # Integer pixels, as Caffe's CropImage (at least one pixel each way).
        x1, y1, x2, y2 = found[choice].tolist()
        left, top = int(x1 * width), int(y1 * height)
        return left, top, max(left + 1, int(x2 * width)), max(top + 1, int(y2 * height))
    option = torch.randint(len(CROP_MIN_IOUS) + 1, ()).item()     # the last: whole image
    if option == len(CROP_MIN_IOUS) or not len(boxes):
        return whole
    return sample_crop(width, height, boxes, CROP_MIN_IOUS[option]) or whole


class Geometry(NamedTuple):
    """Where the size x size pixels of a training sample come from (see sample_geometry)."""
    canvas: tuple         # (width, height) of the zoom-out canvas (the image's own size if none)
    offset: tuple         # (x, y) of the image's top left corner on the canvas
    crop: tuple           # (left, top, right, bottom) window of the canvas, integer pixels
    flip: bool            # mirrored left to right
    interpolation: int    # the resize filter (one of TRAIN_INTERPOLATIONS)
    size: int             # the sample's side (the model's input size)


def whole_image(image_size, size):
    """The Geometry of eval_transform's sample: the whole image of `image_size` (width,
    height) resized to size x size, bilinear, not flipped."""
    return Geometry(tuple(image_size), (0, 0), (0, 0, *image_size), False, Image.BILINEAR, size)


def sample_zoom_out(width, height, max_ratio=ZOOM_OUT_MAX):
    """Caffe's expand (ExpandImage in data_transformer.cpp): with probability ZOOM_OUT_PROB a
    canvas int(side * r) with r ~ U(1, max_ratio), the image at a uniform integer position.
    The same draws as v2.RandomZoomOut. Returns (canvas (w, h), offset (x, y))."""
    if torch.rand(()) >= ZOOM_OUT_PROB:
        return (width, height), (0, 0)
    ratio = 1 + (max_ratio - 1) * torch.rand(()).item()
    canvas_w, canvas_h = int(width * ratio), int(height * ratio)
    fx, fy = torch.rand(2).tolist()
    return (canvas_w, canvas_h), (int((canvas_w - width) * fx), int((canvas_h - height) * fy))


def sample_geometry(width, height, boxes, crop="caffe", zoom_out=ZOOM_OUT_MAX, size=DEFAULT_INPUT.size):
    """The geometric half of the paper's augmentation, drawn for a (width x height) image with
    boxes (n, 4) in pixels: zoom out, the random crop (policy `crop`), a horizontal flip with
    probability 0.5 and the resize filter, in Caffe's order, for a sample of size x size.
    Only parameters: place_boxes and render apply them."""
    canvas, offset = sample_zoom_out(width, height, zoom_out)
    window = crop_window(*canvas, boxes + torch.tensor(offset * 2, dtype=boxes.dtype), crop)
    flip = bool(torch.rand(()) < 0.5)
    interpolation = TRAIN_INTERPOLATIONS[torch.randint(len(TRAIN_INTERPOLATIONS), ()).item()]
    return Geometry(canvas, offset, window, flip, interpolation, size)


def place_boxes(boxes, labels, difficulties, geometry):
    """Boxes (n, 4) in the image's pixels -> (n', 4) fractions of the output, for the objects
    whose centres fall strictly inside the crop (Caffe's emit_constraint CENTER), clipped to it;
    labels (n',) and difficulties (n',) alongside."""
    left, top, right, bottom = geometry.crop
    x, y = geometry.offset
    width, height = right - left, bottom - top
    boxes = boxes + torch.tensor([x - left, y - top] * 2, dtype=boxes.dtype)   # crop's pixels
    keep = centres_inside(boxes, torch.tensor([[0, 0, width, height]], dtype=boxes.dtype))[0]
    boxes = boxes[keep] / torch.tensor([width, height] * 2, dtype=boxes.dtype)
    boxes = boxes.clamp(0, 1)
    if geometry.flip:
        boxes = torch.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], dim=1)
    return boxes, labels[keep], difficulties[keep]


def visible_window(size, geometry):
    """Where an image of `size` (width, height) shows in its sample: (the whole output
    pixels (x1, y1, x2, y2), the source box (left, top, right, bottom) in the image's pixels
    they show, for Image.resize), or None when none of it is inside the crop."""
    left, top, right, bottom = geometry.crop
    x, y = geometry.offset
    width, height = size
    scale_x, scale_y = geometry.size / (right - left), geometry.size / (bottom - top)
    out_x1, out_x2 = (round((max(left, x) - left) * scale_x), round((min(right, x + width) - left) * scale_x))
    out_y1, out_y2 = (round((max(top, y) - top) * scale_y), round((min(bottom, y + height) - top) * scale_y))
    if out_x2 <= out_x1 or out_y2 <= out_y1:
        return None
    source = (max(0.0, left - x + out_x1 / scale_x), max(0.0, top - y + out_y1 / scale_y),
              min(width, left - x + out_x2 / scale_x), min(height, top - y + out_y2 / scale_y))
    return (out_x1, out_y1, out_x2, out_y2), source


def render(image, geometry, photometric=None, fill=DEFAULT_INPUT.fill):
    """The sample's pixels, each computed once from the source image: PIL RGB image,
    Geometry, Photometric (or None) -> PIL RGB image of geometry.size x geometry.size, the
    zoom-out canvas in the colour `fill` (the mean pixel of the model's input).

    Caffe distorts the colours of the whole image, then zooms out, crops, flips and resizes.
    Here only the part of the image inside the crop is resampled, straight to its place in the
    output, and distorted there, without the zoom-out canvas (up to 16 times the image's
    pixels): the colour steps then touch at most the output's pixels whatever the image's size,
    and the fill keeps the mean colour, as in Caffe. This equals Caffe's order (the reference in
    tests) except at the image's edge on the canvas, which lands on whole output pixels here,
    and where the colour steps' clipping and HSV rounding meet the resize filter's blending.
    """
    output = Image.new("RGB", (geometry.size, geometry.size), fill)
    window = visible_window(image.size, geometry)
    if window is not None:
        (x1, y1, x2, y2), source = window
        patch = image.resize((x2 - x1, y2 - y1), geometry.interpolation, box=source, reducing_gap=1.0)
        output.paste(patch if photometric is None else distort(patch, photometric), (x1, y1))
    return output.transpose(Image.FLIP_LEFT_RIGHT) if geometry.flip else output


class Augmentation(NamedTuple):
    """One draw of the paper's augmentation for an image, and its objects placed by it."""
    photometric: Photometric
    geometry: Geometry
    boxes: torch.Tensor         # (n', 4) fractions of the output, in [0, 1]
    labels: torch.Tensor        # (n',)
    difficulties: torch.Tensor  # (n',)


def draw_augmentation(size, boxes, labels, difficulties, crop="caffe", zoom_out=ZOOM_OUT_MAX,
                      out_size=DEFAULT_INPUT.size):
    """The paper's augmentation drawn for an image of `size` (width, height) and a sample of
    out_size x out_size, from the global
    torch RNG (the dataset seeds it per sample), in Caffe's order: the photometric distortion,
    then the geometry. Both the CPU path (train_transform) and the device path draw here.

    boxes: float (n, 4) pixels; crop: the random crop's policy (CROP_POLICIES); zoom_out: the
    largest zoom-out ratio (1: none). Empty boxes (x2 <= x1 or y2 <= y1) are dropped first, as
    v2.SanitizeBoundingBoxes(min_size=0) would, and again the boxes clipped to a line.
    """
    valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    boxes, labels, difficulties = boxes[valid], labels[valid], difficulties[valid]
    photometric = sample_photometric()
    geometry = sample_geometry(*size, boxes, crop, zoom_out, out_size)
    boxes, labels, difficulties = place_boxes(boxes, labels, difficulties, geometry)
    kept = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return Augmentation(photometric, geometry, boxes[kept], labels[kept], difficulties[kept])


def train_transform(image, boxes, labels, difficulties, crop="caffe", zoom_out=ZOOM_OUT_MAX,
                    model_input=DEFAULT_INPUT):
    """Paper augmentation (draw_augmentation) on a PIL RGB image. Returns image (3, S, S)
    normalised as model_input says, boxes (n', 4) fractional in [0, 1], labels (n',),
    difficulties (n',).

    The steps are drawn first and applied together (render), where torchvision's v2
    pipeline (RandomPhotometricDistort, RandomZoomOut, a crop, RandomHorizontalFlip, Resize)
    would go over the pixels once per step.
    """
    drawn = draw_augmentation(image.size, boxes, labels, difficulties, crop, zoom_out, model_input.size)
    image = render(image, drawn.geometry, drawn.photometric, model_input.fill)
    return to_model_input(image, model_input), drawn.boxes, drawn.labels, drawn.difficulties


def fractions_of(size, boxes):
    """Boxes (n, 4) in the pixels of an image of `size` (width, height) -> fractions of it."""
    width, height = size
    return boxes / torch.tensor([width, height, width, height], dtype=torch.float32)


def eval_transform(image, boxes, labels, difficulties, model_input=DEFAULT_INPUT):
    """Resize to the model's input and normalise; boxes (n, 4) pixels -> fractions of the
    image size."""
    return to_model_input(image, model_input), fractions_of(image.size, boxes), labels, difficulties


# ----------------------------------------------------------------------------------------------
# The lists: create_data_lists.py's JSON, held as a few flat tensors


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError as error:
        raise DataError(f"{path} not found; run create_data_lists.py to create it") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path} is not valid JSON ({error})") from error


def lists_fingerprint(paths):
    """A digest of the files' bytes: what the binary form of the lists was made from."""
    digest = hashlib.blake2b(digest_size=16)
    for path in paths:
        try:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
        except FileNotFoundError as error:
            raise DataError(f"{path} not found; run create_data_lists.py to create it") from error
    return digest.hexdigest()


LISTS_FORMAT = 1       # of the binary form, <SPLIT>_lists.pt


class ImageLists:
    """One split's lists as a few flat tensors, with no Python object per image or per box.

    DataLoader workers are forked from the training process and share its memory until they
    write to it. Reading a Python object writes its reference count, so lists held as Python
    objects (a dict per image, a list per box) are copied into each worker page by page as it
    samples them: about 100 MiB per worker at COCO's size, a full copy per worker and rank in
    the end. A tensor is one object whose data pages are only read. Fields:

        paths         uint8 (bytes,)   the image paths, UTF-8, one after another
        path_ends     int64 (n + 1,)   path i is paths[path_ends[i]:path_ends[i + 1]]
        boxes         float32 (m, 4)   x1, y1, x2, y2 in pixels of the annotated frame, image after image
        labels        int32 (m,)
        difficulties  bool (m,)
        box_ends      int64 (n + 1,)   image i's objects are rows box_ends[i]:box_ends[i + 1]
        sizes         int32 (n, 2)     the annotated frame's width and height; 0, 0 where not recorded

    read() prefers the binary form that create_data_lists.py writes beside the JSON
    (<SPLIT>_lists.pt: these tensors, memory-mapped, so that the ranks on a machine share one
    copy and start in a second) while it matches the JSON's bytes; the JSON is the documented form.
    """

    FIELDS = ("paths", "path_ends", "boxes", "labels", "difficulties", "box_ends", "sizes")

    def __init__(self, paths, path_ends, boxes, labels, difficulties, box_ends, sizes):
        self.paths, self.path_ends = paths, path_ends
        self.boxes, self.labels, self.difficulties, self.box_ends = boxes, labels, difficulties, box_ends
        self.sizes = sizes

    def __len__(self):
        return len(self.path_ends) - 1

    def path(self, i):
        start, end = self.path_ends[i:i + 2].tolist()
        return bytes(self.paths[start:end].numpy()).decode()

    def objects(self, i):
        """Image i's (boxes (k, 4) float32 pixels, labels (k,) int64, difficulties (k,) bool),
        copies (the caller may change them)."""
        start, end = self.box_ends[i:i + 2].tolist()
        return self.boxes[start:end].clone(), self.labels[start:end].long(), self.difficulties[start:end].clone()

    def size(self, i):
        """Image i's annotated (width, height), or None where the lists do not record it."""
        width, height = self.sizes[i].tolist()
        return (width, height) if width > 0 else None

    def per_image(self):
        """(boxes, labels, difficulties), each a list of one tensor per image, as objects() gives."""
        counts = self.box_ends.diff().tolist()
        return tuple(list(t.split(counts)) for t in (self.boxes, self.labels.long(), self.difficulties))

    # ------------------------------------------------------------------ from and to files

    @classmethod
    def read(cls, data_folder, split):
        """The lists of `split` ("TRAIN" or "TEST") in `data_folder`: the binary form if it
        matches the JSON, else the JSON (saying why the binary form was not used)."""
        folder = Path(data_folder)
        images, objects = folder / f"{split}_images.json", folder / f"{split}_objects.json"
        binary = folder / f"{split}_lists.pt"
        lists = cls._load(binary, lists_fingerprint([images, objects])) if binary.is_file() else None
        if lists is None:
            lists = cls.from_json(_read_json(images), _read_json(objects), images, objects)
        return lists

    @classmethod
    def _load(cls, path, fingerprint):
        """The binary form at `path`, memory-mapped, or None (and a line saying why) where it is
        unreadable or was made from other JSON lists (edited since: the JSON wins)."""
        try:
            saved = load_tensors(path, mmap=True)
            usable = isinstance(saved, dict) and saved.get("format") == LISTS_FORMAT and all(
                isinstance(saved.get(name), torch.Tensor) for name in cls.FIELDS)
        except ValueError as error:
            print(f"{error}; reading the JSON lists instead", file=sys.stderr)
            return None
        if not usable or saved.get("fingerprint") != fingerprint:
            why = "was made from other JSON lists (edited since?)" if usable else "is not lists of this format"
            print(f"{path} {why}; reading the JSON lists instead (create_data_lists.py writes both "
                  "again)", file=sys.stderr)
            return None
        return cls(**{name: saved[name] for name in cls.FIELDS})

    def save(self, path, fingerprint):
        """The binary form, written atomically; `fingerprint`: lists_fingerprint of the JSON files."""
        atomic_torch_save({"format": LISTS_FORMAT, "fingerprint": fingerprint,
                           **{name: getattr(self, name) for name in self.FIELDS}}, path)

    @classmethod
    def from_json(cls, images, objects, images_source="images", objects_source="objects"):
        """The JSON lists as read (a list of paths; a list of {"boxes": [[x1, y1, x2, y2], ...],
        "labels": [...], "difficulties": [...], "size": [w, h] (optional)}) -> ImageLists,
        or a DataError naming the file and the first malformed entry. Values are checked by
        check(). Built column by column, never entry by entry, so that 10 million boxes take
        seconds."""
        if not isinstance(images, list) or not isinstance(objects, list) or len(images) != len(objects):
            raise DataError(f"{images_source} and {objects_source} must be lists of equal length")
        bad = next((i for i, path in enumerate(images) if not isinstance(path, str)), None)
        if bad is not None:
            raise DataError(f"{images_source}: entry {bad} is not a path: {images[bad]!r}")

        def entry_error(test, what):
            """The DataError for the first entry that fails `test`."""
            i = next((i for i, entry in enumerate(objects) if not _passes(test, entry)), None)
            return DataError(f"{objects_source}: " + ("" if i is None else f"entry {i} ({images[i]}): ") + what)

        keys = ("boxes", "labels", "difficulties")
        try:
            counts = np.array([[len(entry[key]) for key in keys] for entry in objects], np.int64).reshape(-1, 3)
        except (TypeError, KeyError):
            raise entry_error(lambda e: all(isinstance(e[k], list) for k in keys),
                              "needs lists of boxes, labels and difficulties") from None
        unequal = np.flatnonzero(counts.min(1) != counts.max(1))
        if len(unequal):
            i = int(unequal[0])
            raise DataError(f"{objects_source}: entry {i} ({images[i]}): {counts[i, 0]} boxes, "
                            f"{counts[i, 1]} labels and {counts[i, 2]} difficulties")
        checks = {"boxes": ((4,), lambda e: all(_numbers(box, 4) for box in e["boxes"]), "a box is not four numbers"),
                  "labels": ((), lambda e: _numbers(e["labels"]), "a label is not a number"),
                  "difficulties": ((), lambda e: _numbers(e["difficulties"]), "a difficulty is not a number")}
        columns = {}
        for key, (shape, test, what) in checks.items():
            try:
                values = np.array(list(itertools.chain.from_iterable(entry[key] for entry in objects)),
                                  dtype=np.float64)
            except (TypeError, ValueError):                 # ragged boxes, strings, None
                raise entry_error(test, what) from None
            values = values.reshape(0, *shape) if values.size == 0 else values
            if values.shape[1:] != shape:
                raise entry_error(test, what)
            columns[key] = values
        object_entry = np.repeat(np.arange(len(objects)), counts[:, 0])
        for key, wrong, what in (
                ("labels", columns["labels"] != np.round(columns["labels"]), "a label is not an integer"),
                ("difficulties", ~np.isin(columns["difficulties"], (0, 1)), "a difficulty is not 0 or 1")):
            if wrong.any():
                i = int(object_entry[np.flatnonzero(wrong)[0]])
                raise DataError(f"{objects_source}: entry {i} ({images[i]}): {what}")
        try:
            sizes = np.array([entry.get("size") or (0, 0) for entry in objects], np.float64).reshape(-1, 2)
            if not ((sizes == np.round(sizes)) & (sizes >= 0) & (sizes < 2 ** 31)).all():
                raise ValueError
        except (TypeError, ValueError):
            raise entry_error(lambda e: not e.get("size") or (_numbers(e["size"], 2) and all(
                v == int(v) and v > 0 for v in e["size"])), "size is not [width, height]") from None
        encoded = [path.encode() for path in images]
        return cls(paths=torch.from_numpy(np.frombuffer(b"".join(encoded), np.uint8).copy()),
                   path_ends=torch.from_numpy(np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)),
                   boxes=torch.from_numpy(columns["boxes"].astype(np.float32)),
                   labels=torch.from_numpy(columns["labels"].clip(-1, 2 ** 31 - 1).astype(np.int32)),
                   difficulties=torch.from_numpy(columns["difficulties"].astype(bool)),
                   box_ends=torch.from_numpy(np.concatenate([[0], counts[:, 0].cumsum()])),
                   sizes=torch.from_numpy(sizes.astype(np.int32)))

    def check(self, label_map, source):
        """A DataError unless every label is a class of label_map (not background) and every box
        is finite, not empty (x1 < x2, y1 < y2) and inside its recorded image size: one line
        naming the first bad object's list entry and image, and how many more there are."""
        classes = torch.tensor(sorted(set(label_map.values()) - {0}), dtype=torch.int32)
        image = torch.repeat_interleave(torch.arange(len(self)), self.box_ends.diff())
        size = self.sizes[image].float().repeat(1, 2)                           # (m, 4): w, h, w, h
        x1, y1, x2, y2 = self.boxes.unbind(1)
        problems = (
            (~torch.isin(self.labels, classes), lambda j: f"label {self.labels[j].item()} is not a "
             f"class of label_map.json (1..{classes.max().item() if len(classes) else 0})"),
            (~self.boxes.isfinite().all(1), lambda j: f"box {self.boxes[j].tolist()} is not finite"),
            ((x2 <= x1) | (y2 <= y1), lambda j: f"box {self.boxes[j].tolist()} is empty or inverted "
             "(x1 < x2 and y1 < y2 are needed)"),
            (((self.boxes < 0) | (self.boxes > size)).any(1) & (size[:, 0] > 0),
             lambda j: f"box {self.boxes[j].tolist()} lies outside the recorded "
                       f"{self.sizes[image[j], 0].item()}x{self.sizes[image[j], 1].item()} image"))
        bad = torch.zeros(len(self.labels), dtype=torch.bool)
        first = None
        for mask, describe in problems:
            if first is None and mask.any():
                j = int(mask.nonzero()[0])
                first = (j, describe(j))
            bad |= mask
        if first is None:
            return
        j, what = first
        i = int(image[j])
        count = int(bad.sum())
        total = f" ({count} bad objects in {len(image[bad].unique())} entries in all)" if count > 1 else ""
        raise DataError(f"{source}: entry {i} ({self.path(i)}), object {j - int(self.box_ends[i])}: "
                        f"{what}{total}. Correct the lists, or write them again with create_data_lists.py")


def _numbers(values, length=None):
    """Whether `values` is a list of numbers (of `length`, if given)."""
    return (isinstance(values, list) and (length is None or len(values) == length)
            and all(isinstance(v, (int, float)) for v in values))


def _passes(test, entry):
    try:
        return bool(test(entry))
    except (TypeError, KeyError, ValueError, AttributeError):
        return False


# ----------------------------------------------------------------------------------------------
# Dataset


def load_label_map(data_folder):
    """label_map.json of a lists folder: class name -> index, with "background": 0."""
    path = Path(data_folder) / "label_map.json"
    label_map = _read_json(path)
    if not isinstance(label_map, dict) or label_map.get("background") != 0:
        raise DataError(f"{path} must map class names to indices, with background: 0")
    return label_map


def check_same_classes(expected, found, expected_source, found_source):
    """Raise a DataError unless two label maps are equal, saying when only the order differs."""
    if expected == found:
        return
    in_order = [[name for name, _ in sorted(m.items(), key=lambda item: item[1])][1:]
                for m in (expected, found)]
    if set(expected) == set(found):
        raise DataError(f"{found_source} has the classes of {expected_source} in another order: "
                        f"{in_order[1]} instead of {in_order[0]} (lists made with another --classes?)")
    raise DataError(f"{expected_source} has classes {in_order[0]}, but {found_source} has {in_order[1]}")


DECODE_PLACES = ("cpu", "device")


def sample_seed(seed, epoch, index):
    """A well-mixed 64-bit seed that depends only on (seed, epoch, index)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0])


class PascalVOCDataset(torch.utils.data.Dataset):
    """Images and objects from the JSON lists written by create_data_lists.py.

    Items are (image (3, S, S) float32 normalised as model_input says (S = model_input.size),
    boxes (n, 4) float32 fractional x1y1x2y2, labels (n,) int64, difficulties (n,) bool).
    `lists` (an ImageLists: paths, pixel boxes, labels, difficulties and sizes as the lists
    hold them, checked when read) and `label_map` are the raw lists, for evaluation.

    crop: the training crop's policy, "caffe" (the paper's) or "one-sampler" (see crop_window);
    zoom_out: the largest zoom-out ratio (the paper's 4; 1 for none).
    on_error: "raise" a DataError for an unreadable image, or "mark": return a BadSample
    (collate_fn leaves it out and reports its message).
    decode: "cpu" (items as above) or "device": a worker reads the file (and draws the
    augmentation) but makes no pixels; an item's image is a PendingImage, which
    gpu_augment.render_batch turns into the same pixels on the device.
    Call set_epoch(epoch) before iterating over an epoch: the epoch lives in shared memory, so
    DataLoader workers (persistent or not) see it.
    """

    def __init__(self, data_folder, split, keep_difficult=True, seed=0, augment=None, crop="caffe",
                 zoom_out=ZOOM_OUT_MAX, on_error="raise", decode="cpu", model_input=DEFAULT_INPUT):
        split = split.upper()
        if split not in ("TRAIN", "TEST"):
            raise ValueError(f"split must be 'train' or 'test', not {split!r}")
        data_folder = Path(data_folder)
        if not data_folder.is_dir():
            raise DataError(f"data folder {data_folder} does not exist; run create_data_lists.py first")
        self.lists = ImageLists.read(data_folder, split)
        self.label_map = load_label_map(data_folder)
        self.lists.check(self.label_map, data_folder / f"{split}_objects.json")
        self.keep_difficult = keep_difficult
        self.seed = seed
        self.augment = split == "TRAIN" if augment is None else augment
        if crop not in CROP_POLICIES:
            raise ValueError(f"crop must be one of {CROP_POLICIES}, not {crop!r}")
        self.crop = crop
        if not zoom_out >= 1:
            raise ValueError(f"zoom_out must be at least 1, not {zoom_out!r}")
        self.zoom_out = zoom_out
        if on_error not in ("raise", "mark"):
            raise ValueError(f"on_error must be 'raise' or 'mark', not {on_error!r}")
        self.on_error = on_error
        if decode not in DECODE_PLACES:
            raise ValueError(f"decode must be one of {DECODE_PLACES}, not {decode!r}")
        self.decode = decode
        self.model_input = model_input
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch):
        self._epoch.fill_(epoch)

    @property
    def epoch(self):
        return int(self._epoch)

    def __len__(self):
        return len(self.lists)

    def __getitem__(self, index):
        index = range(len(self))[index]                  # negative indices; IndexError past the end
        path, size = self.lists.path(index), self.lists.size(index)
        try:
            image = self._read(path, size)
        except DataError as error:
            if self.on_error == "raise":
                raise
            return BadSample(index, str(error))
        boxes, labels, difficulties = self.lists.objects(index)
        if not self.keep_difficult:
            easy = ~difficulties
            boxes, labels, difficulties = boxes[easy], labels[easy], difficulties[easy]
        if self.decode == "cpu" and not self.augment:
            return eval_transform(image, boxes, labels, difficulties, self.model_input)
        if self.decode == "cpu":
            with self._sample_rng(index):
                return train_transform(image, boxes, labels, difficulties, self.crop, self.zoom_out,
                                       self.model_input)
        data, orientation, size = image
        if self.augment:
            with self._sample_rng(index):
                drawn = draw_augmentation(size, boxes, labels, difficulties, self.crop, self.zoom_out,
                                          self.model_input.size)
        else:   # eval_transform's sample: the whole image resized, no colour change
            drawn = Augmentation(NO_PHOTOMETRIC, whole_image(size, self.model_input.size),
                                 fractions_of(size, boxes), labels, difficulties)
        pending = PendingImage(path, data, orientation, drawn.photometric, drawn.geometry)
        return pending, drawn.boxes, drawn.labels, drawn.difficulties

    def _read(self, path, size):
        """The image at `path` (PIL, or read_undecoded's tuple with decode="device"), in the frame
        of `size`, the size the lists record (if any): a DataError if it has another size (the
        file changed since the lists were made), whose boxes would land elsewhere."""
        if self.decode == "device":
            image = read_undecoded(path, size)
            actual = image[2]
        else:
            image = load_image(path, size)
            actual = image.size
        if size is not None and tuple(actual) != tuple(size):
            raise DataError(f"{path}: the image is {actual[0]}x{actual[1]}, but the lists record "
                            f"{size[0]}x{size[1]} (the file changed since create_data_lists.py ran?)")
        return image

    @contextlib.contextmanager
    def _sample_rng(self, index):
        """The global torch RNG seeded for one sample, and restored after it."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, self.epoch, index))
            yield


def start_loading(loader):
    """iter(loader), its worker processes forked while Python's objects are frozen out of
    garbage collection (gc.freeze). A forked worker shares the training process's memory until
    it writes to it, and a full collection in the worker writes to every object it inherited
    (their collector headers): it copies every page of them, about 80 MiB per worker here at
    its first full collection (tests/test_data.py and benchmark.py's data section measure it).
    Frozen objects are never collected in the worker; the training process unfreezes at once."""
    gc.freeze()
    try:
        return iter(loader)
    finally:
        gc.unfreeze()


def collate_fn(batch):
    """Samples -> a Batch: images stacked to (N, 3, S, S) (PendingImages: listed, for
    gpu_augment.render_batch); boxes, labels and difficulties lists of N tensors; BadSamples
    left out, their messages in `problems`."""
    problems = [sample.message for sample in batch if isinstance(sample, BadSample)]
    good = [sample for sample in batch if not isinstance(sample, BadSample)]
    if not good:
        return Batch(torch.zeros(0, 3, 0, 0), [], [], [], problems)     # no image: no size either
    images, boxes, labels, difficulties = zip(*good)
    # default_collate stacks straight into shared memory inside DataLoader workers, saving a copy
    images = list(images) if isinstance(images[0], PendingImage) else torch.utils.data.default_collate(images)
    return Batch(images, list(boxes), list(labels), list(difficulties), problems)
