"""Data for SSD300: the dataset over the JSON lists and the paper's augmentation.

The JSON lists are written by create_data_lists.py. Boxes there are continuous pixel coordinates
(x1, y1, x2, y2) in the frame of the image as annotated; the dataset returns them as fractions of
the image size, with the image resized to 300x300 and normalised with the ImageNet mean/std.

Training augmentation follows Liu et al. (ECCV 2016, Sec. 2.2 and the Caffe implementation):
photometric distortion, zoom out ("expand"), the min-IoU random crop, horizontal flip, resize.
Its randomness depends only on (seed, epoch, index), so a sample does not depend on the number
of DataLoader workers or on the order in which samples are drawn.
"""
import functools
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from torchvision import tv_tensors
from torchvision.ops import box_iou
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from shapes import SHAPE_CLASSES, make_shapes_dataset  # noqa: F401 (moved to shapes.py, still importable here)
from utils import IMAGE_SIZE

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB, on 0-1 images
IMAGENET_STD = (0.229, 0.224, 0.225)
MEAN_PIXEL = tuple(round(255 * m) for m in IMAGENET_MEAN)  # zoom-out fill, on 0-255 images

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
    images: torch.Tensor      # (N, 3, 300, 300)
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
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{path}: cannot read image ({error})") from error


def resize_image(image, interpolation=Image.BILINEAR):
    """Resize a PIL image to 300x300 (bilinear, antialiased, unless told otherwise).

    reducing_gap=1 first shrinks by an integer factor (box filter): 2-3x faster on large
    zoomed-out canvases, at no visible cost.
    """
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), interpolation, reducing_gap=1.0)


def to_model_input(image):
    """PIL RGB image of any size -> normalised float32 tensor (3, 300, 300); an image of
    300x300 (already resized by the training transform) is not resampled again."""
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = resize_image(image)
    # numpy in place: ~5x faster than torch ops, whose intra-op threads only add overhead here
    mean = np.array(IMAGENET_MEAN, np.float32)[:, None, None] * 255
    std = np.array(IMAGENET_STD, np.float32)[:, None, None] * 255
    array = np.asarray(image).transpose(2, 0, 1).astype(np.float32, order="C")  # (3, 300, 300)
    array -= mean
    array /= std
    return torch.from_numpy(array)


# ----------------------------------------------------------------------------------------------
# Augmentation. Samples are (image: PIL RGB, boxes: BoundingBoxes (n, 4) XYXY pixels,
# labels: int64 (n,), difficulties: bool (n,)).


def _lut(function):
    """A Pillow lookup table (one 8-bit channel) of function(v), rounded and clipped to 0..255."""
    return [min(255, max(0, round(function(v)))) for v in range(256)]


def adjust_brightness(image, delta):
    """Caffe's AdjustBrightness: delta added to every channel, clipped."""
    return image.point(_lut(lambda v: v + delta) * 3)


def adjust_contrast(image, alpha):
    """Caffe's AdjustContrast: every channel multiplied by alpha, clipped (convertTo(alpha, 0)).
    torchvision's adjust_contrast blends towards the mean grey instead."""
    return image.point(_lut(lambda v: v * alpha) * 3)


def adjust_saturation_hue(image, alpha=1.0, degrees=0.0):
    """Caffe's AdjustSaturation (HSV saturation multiplied by alpha, clipped) and AdjustHue
    (HSV hue shifted by `degrees`), in one HSV round trip.

    Pillow's 8-bit hue spans 360 degrees in 256 steps (OpenCV's: 180 steps). The shift wraps
    around the colour circle; Caffe's 8-bit arithmetic clips hues below 0 to red instead, a
    quirk not copied.
    """
    h, s, v = image.convert("HSV").split()
    if degrees:
        shift = degrees * 256 / 360
        h = h.point([round(value + shift) % 256 for value in range(256)])
    if alpha != 1.0:
        s = s.point(_lut(lambda value: value * alpha))
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def photometric_distort(image):
    """Caffe's colour distortion (DistortImage in im_transforms.cpp) on a PIL RGB image.

    Brightness first, then contrast either before or after saturation and hue; each of the four
    is applied with probability 0.5. Unlike v2.RandomPhotometricDistort, brightness is additive
    (+-32, not a factor), contrast is a plain factor, hue spans +-36 degrees, and there is no
    random channel permutation (ssd_pascal.py: random_order_prob 0).
    """
    contrast_first = torch.rand(()) < 0.5
    apply = torch.rand(4) < 0.5                 # brightness, contrast, saturation, hue
    values = torch.rand(4).tolist()

    def between(value, low, high):
        return low + (high - low) * value

    if apply[0]:
        image = adjust_brightness(image, between(values[0], -BRIGHTNESS_DELTA, BRIGHTNESS_DELTA))
    contrast = between(values[1], *CONTRAST_RANGE) if apply[1] else 1.0
    saturation = between(values[2], *SATURATION_RANGE) if apply[2] else 1.0
    hue = between(values[3], -HUE_DEGREES, HUE_DEGREES) if apply[3] else 0.0
    if contrast_first and contrast != 1.0:
        image = adjust_contrast(image, contrast)
    if saturation != 1.0 or hue:
        image = adjust_saturation_hue(image, saturation, hue)
    if not contrast_first and contrast != 1.0:
        image = adjust_contrast(image, contrast)
    return image


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


def random_crop(image, boxes, labels, difficulties, policy="caffe"):
    """The paper's random crop. The objects whose centres fall inside the crop are kept,
    clipped to it.

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
    height, width = boxes.canvas_size
    scale = torch.tensor([width, height, width, height], dtype=torch.float64)
    plain_boxes = boxes.as_subclass(torch.Tensor)
    crop = None                                           # the whole image
    if policy == "caffe":
        found = list(sample_crops(plain_boxes / scale).values())
        choice = torch.randint(len(found) + 1, ()).item()
        if choice < len(found):
            # Integer pixels, as Caffe's CropImage (at least one pixel each way).
            x1, y1, x2, y2 = found[choice].tolist()
            left, top = int(x1 * width), int(y1 * height)
            crop = (left, top, max(left + 1, int(x2 * width)), max(top + 1, int(y2 * height)))
    else:
        option = torch.randint(len(CROP_MIN_IOUS) + 1, ()).item()     # the last: whole image
        if option < len(CROP_MIN_IOUS) and len(boxes):
            crop = sample_crop(width, height, plain_boxes, CROP_MIN_IOUS[option])
    if crop is None:
        return image, boxes, labels, difficulties
    left, top, right, bottom = crop
    keep = centres_inside(plain_boxes, torch.tensor([[left, top, right, bottom]], dtype=boxes.dtype))[0]
    cropped = plain_boxes[keep] - torch.tensor([left, top, left, top], dtype=boxes.dtype)
    cropped[:, 0::2] = cropped[:, 0::2].clamp(0, right - left)
    cropped[:, 1::2] = cropped[:, 1::2].clamp(0, bottom - top)
    image = F.crop(image, top, left, bottom - top, right - left)
    boxes = tv_tensors.wrap(cropped, like=boxes, canvas_size=(bottom - top, right - left))
    return image, boxes, labels[keep], difficulties[keep]


def resize(image, boxes, labels, difficulties):
    """Resize the sample to 300x300 with one of Caffe's training interpolations, at random."""
    interpolation = TRAIN_INTERPOLATIONS[torch.randint(len(TRAIN_INTERPOLATIONS), ()).item()]
    return (resize_image(image, interpolation), F.resize(boxes, [IMAGE_SIZE, IMAGE_SIZE]),
            labels, difficulties)


def _lift(transform):
    """Apply a v2 transform that moves pixels but never drops boxes to a whole sample."""
    def apply(image, boxes, labels, difficulties):
        image, boxes = transform(image, boxes)
        return image, boxes, labels, difficulties
    return apply


def drop_degenerate_boxes(image, boxes, labels, difficulties):
    """Remove boxes with x2 <= x1 or y2 <= y1, keeping labels and difficulties aligned.

    Equivalent to v2.SanitizeBoundingBoxes(min_size=0) (its default drops boxes under 1 pixel).
    """
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return image, tv_tensors.wrap(boxes[keep], like=boxes), labels[keep], difficulties[keep]


zoom_out = _lift(v2.RandomZoomOut(fill=MEAN_PIXEL, side_range=(1.0, 4.0), p=0.5))  # Caffe's expand
flip = _lift(v2.RandomHorizontalFlip(p=0.5))


def train_transform(image, boxes, labels, difficulties, crop="caffe"):
    """Paper augmentation. Uses the global torch RNG (the dataset seeds it per sample).

    image: PIL RGB; boxes: float (n, 4) pixels; crop: the random crop's policy (CROP_POLICIES).
    Returns image (3, 300, 300) normalised, boxes (n', 4) fractional in [0, 1], labels (n',),
    difficulties (n',).
    """
    boxes = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=image.size[::-1])
    sample = (photometric_distort(image), boxes, labels, difficulties)
    for step in (zoom_out, functools.partial(random_crop, policy=crop), flip, resize):
        sample = drop_degenerate_boxes(*step(*sample))
    image, boxes, labels, difficulties = sample
    boxes = boxes.as_subclass(torch.Tensor).clamp(0, IMAGE_SIZE) / IMAGE_SIZE
    return to_model_input(image), boxes, labels, difficulties


def eval_transform(image, boxes, labels, difficulties):
    """Resize to 300x300 and normalise; boxes (n, 4) pixels -> fractions of the image size."""
    width, height = image.size
    boxes = boxes / torch.tensor([width, height, width, height], dtype=torch.float32)
    return to_model_input(image), boxes, labels, difficulties


# ----------------------------------------------------------------------------------------------
# Dataset


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError as error:
        raise DataError(f"{path} not found; run create_data_lists.py to create it") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path} is not valid JSON ({error})") from error


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


def sample_seed(seed, epoch, index):
    """A well-mixed 64-bit seed that depends only on (seed, epoch, index)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0])


class PascalVOCDataset(torch.utils.data.Dataset):
    """Images and objects from the JSON lists written by create_data_lists.py.

    Items are (image (3, 300, 300) float32 normalised, boxes (n, 4) float32 fractional x1y1x2y2,
    labels (n,) int64, difficulties (n,) bool). `images`, `objects` (pixel boxes, as in the JSON)
    and `label_map` are the raw lists, for evaluation.

    crop: the training crop's policy, "caffe" (the paper's) or "one-sampler" (see random_crop).
    on_error: "raise" a DataError for an unreadable image, or "mark": return a BadSample
    (collate_fn leaves it out and reports its message).
    Call set_epoch(epoch) before iterating over an epoch: the epoch lives in shared memory, so
    DataLoader workers (persistent or not) see it.
    """

    def __init__(self, data_folder, split, keep_difficult=True, seed=0, augment=None, crop="caffe",
                 on_error="raise"):
        split = split.upper()
        if split not in ("TRAIN", "TEST"):
            raise ValueError(f"split must be 'train' or 'test', not {split!r}")
        data_folder = Path(data_folder)
        if not data_folder.is_dir():
            raise DataError(f"data folder {data_folder} does not exist; run create_data_lists.py first")
        self.images = _read_json(data_folder / f"{split}_images.json")
        self.objects = _read_json(data_folder / f"{split}_objects.json")
        if not isinstance(self.images, list) or not isinstance(self.objects, list) \
                or len(self.images) != len(self.objects):
            raise DataError(f"{data_folder}: {split}_images.json and {split}_objects.json "
                            "must be lists of equal length")
        self.label_map = load_label_map(data_folder)
        self.keep_difficult = keep_difficult
        self.seed = seed
        self.augment = split == "TRAIN" if augment is None else augment
        if crop not in CROP_POLICIES:
            raise ValueError(f"crop must be one of {CROP_POLICIES}, not {crop!r}")
        self.crop = crop
        if on_error not in ("raise", "mark"):
            raise ValueError(f"on_error must be 'raise' or 'mark', not {on_error!r}")
        self.on_error = on_error
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch):
        self._epoch.fill_(epoch)

    @property
    def epoch(self):
        return int(self._epoch)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        objects = self.objects[index]
        try:
            image = load_image(self.images[index], objects.get("size"))
        except DataError as error:
            if self.on_error == "raise":
                raise
            return BadSample(index, str(error))
        boxes = torch.tensor(objects["boxes"], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor(objects["labels"], dtype=torch.int64)
        difficulties = torch.tensor(objects["difficulties"], dtype=torch.bool)
        if not self.keep_difficult:
            easy = ~difficulties
            boxes, labels, difficulties = boxes[easy], labels[easy], difficulties[easy]
        if not self.augment:
            return eval_transform(image, boxes, labels, difficulties)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, self.epoch, index))
            return train_transform(image, boxes, labels, difficulties, self.crop)


def collate_fn(batch):
    """Samples -> a Batch: images stacked to (N, 3, 300, 300); boxes, labels and difficulties
    lists of N tensors; BadSamples left out, their messages in `problems`."""
    problems = [sample.message for sample in batch if isinstance(sample, BadSample)]
    good = [sample for sample in batch if not isinstance(sample, BadSample)]
    if not good:
        return Batch(torch.zeros(0, 3, IMAGE_SIZE, IMAGE_SIZE), [], [], [], problems)
    images, boxes, labels, difficulties = zip(*good)
    # default_collate stacks straight into shared memory inside DataLoader workers, saving a copy
    return Batch(torch.utils.data.default_collate(images), list(boxes), list(labels),
                 list(difficulties), problems)
