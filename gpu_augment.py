"""The training augmentation's pixels on the device: the same samples as the CPU path (datasets.render).

A dataset made with decode="device" does no pixel work in its workers: each sample's image is a
PendingImage (the file's bytes and the drawn Photometric and Geometry). `render_batch` decodes
a batch's JPEGs on the device (nvJPEG on CUDA, whose IDCT and chroma upsampling may differ
from Pillow's libjpeg-turbo by a level; libjpeg-turbo on the CPU: Pillow's pixels), applies the
EXIF orientation the CPU path applies, and makes each 300x300 sample as `datasets.render` does:
the visible part of the image resampled straight to its place on a mean-filled canvas, the
colour distortion on those pixels, then the flip; normalised last.

Resampling reproduces Pillow's own arithmetic (Image.resize with a box and reducing_gap=1.0,
src/libImaging/Resample.c, Reduce.c, Geometry.c) rather than calling
torch.nn.functional.interpolate, which cannot take a fractional source box (the zoomed-out
samples' window), has no Lanczos, and whose "area" and "nearest" modes pick other pixels than
Pillow's BOX and NEAREST. Per axis, Pillow's filter coefficients (quantised to 22 bits as
Pillow does) form a small matrix; the two passes are two matrix products, in Pillow's order,
each rounded to 8 bits as Pillow rounds between its passes. The colour steps use the
lookup tables of datasets.py and Pillow's 8-bit HSV conversion (Convert.c), written in torch.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.io
from PIL import Image

from datasets import (IMAGENET_MEAN, IMAGENET_STD, MEAN_PIXEL, Batch, cannot_read, photometric_tables,
                      visible_window)
from utils import IMAGE_SIZE

# Pillow's filters (Resample.c): support radius at scale 1.
FILTER_SUPPORT = {Image.BOX: 0.5, Image.BILINEAR: 1.0, Image.BICUBIC: 2.0, Image.LANCZOS: 3.0}
PRECISION_BITS = 22   # Pillow's fixed-point coefficients for 8-bit images: 32 - 8 - 2 bits


# ----------------------------------------------------------------------------------------------
# Decoding


def decode_place(choice, device):
    """PascalVOCDataset's `decode` for --gpu-augment / --gpu-decode: an explicit True
    ("device") or False ("cpu"), or None (auto): "device" with CUDA, where the loader
    processes' CPUs would otherwise limit the rate, "cpu" elsewhere."""
    on_device = torch.device(device).type == "cuda" if choice is None else choice
    return "device" if on_device else "cpu"



def orient(pixels, orientation):
    """ImageOps.exif_transpose on a tensor (..., H, W): EXIF orientation 1-8 undone."""
    # 5-8 swap the axes (TRANSPOSE, ROTATE_270, TRANSVERSE, ROTATE_90), then mirror.
    flips = {2: (-1,), 3: (-2, -1), 4: (-2,), 6: (-1,), 7: (-2, -1), 8: (-2,)}.get(orientation, ())
    if orientation in (5, 6, 7, 8):
        pixels = pixels.transpose(-2, -1)
    return pixels.flip(flips) if flips else pixels


def decode(images, device):
    """PendingImages -> (list of uint8 (3, H, W) tensors on `device`, oriented as the CPU path
    loads them, None where decoding failed; the failures' messages).

    One batched decode_jpeg call for the JPEGs (nvJPEG decodes a list at once); other files
    arrive already decoded by the worker. If the batch call fails, each file is decoded alone
    to name the bad ones with the CPU path's message (datasets.cannot_read).
    """
    jpegs = [i for i, image in enumerate(images) if image.is_jpeg]
    decoded = [None if image.is_jpeg else image.data.to(device, non_blocking=True) for image in images]
    problems = []
    mode = torchvision.io.ImageReadMode.RGB
    try:
        pixels = torchvision.io.decode_jpeg([images[i].data for i in jpegs], mode=mode, device=device) \
            if jpegs else []
    except RuntimeError:
        pixels = []
        for i in jpegs:
            try:
                pixels.append(torchvision.io.decode_jpeg(images[i].data, mode=mode, device=device))
            except RuntimeError as error:
                pixels.append(None)
                problems.append(str(cannot_read(images[i].path, error)))
    for i, image in zip(jpegs, pixels):
        decoded[i] = None if image is None else orient(image, images[i].orientation)
    return decoded, problems


# ----------------------------------------------------------------------------------------------
# Resampling as Pillow does it


def pillow_filter(x, interpolation):
    """Pillow's filter kernels (Resample.c) at float64 offsets x."""
    if interpolation == Image.BOX:
        return ((x > -0.5) & (x <= 0.5)).double()
    ax = x.abs()
    if interpolation == Image.BILINEAR:
        return (1.0 - ax).clamp(min=0.0)
    if interpolation == Image.BICUBIC:
        a = -0.5
        near = ((a + 2.0) * ax - (a + 3.0)) * ax * ax + 1
        far = (((ax - 5) * ax + 8) * ax - 4) * a
        return torch.where(ax < 1.0, near, torch.where(ax < 2.0, far, 0.0))
    if interpolation == Image.LANCZOS:
        return torch.where((x >= -3.0) & (x < 3.0), torch.sinc(x) * torch.sinc(x / 3), 0.0)
    raise ValueError(f"no Pillow filter {interpolation!r}")


def pillow_coefficients(in0, in1, in_size, out_size, interpolation, device):
    """Pillow's resampling of source span [in0, in1) of an axis of `in_size` pixels to
    `out_size` pixels (precompute_coeffs, normalize_coeffs_8bpc): returns (the first source
    pixel used, float32 weights (out_size, n) over the n source pixels from there).

    Box edges are float32 as Pillow receives them; each weight is quantised to 22 bits, so
    that a float32 product with 8-bit values matches Pillow's integer sums.
    """
    in0, in1 = np.float32(in0), np.float32(in1)
    scale = float(in1 - in0) / out_size
    filterscale = max(scale, 1.0)
    support = FILTER_SUPPORT[interpolation] * filterscale
    # The window of source pixels, as Pillow rounds it (int() truncates, as C's cast does).
    first = max(0, int(float(in0) + 0.5 * scale - support + 0.5))
    last = min(in_size, int(float(in0) + (out_size - 0.5) * scale + support + 0.5))
    centre = float(in0) + (torch.arange(out_size, dtype=torch.float64, device=device) + 0.5) * scale
    low = (centre - support + 0.5).trunc().clamp(min=0)[:, None]
    high = (centre + support + 0.5).trunc().clamp(max=in_size)[:, None]
    source = torch.arange(first, last, dtype=torch.float64, device=device)
    weights = pillow_filter((source - centre[:, None] + 0.5) * (1.0 / filterscale), interpolation)
    weights = torch.where((source >= low) & (source < high), weights, 0.0)
    total = weights.sum(dim=1, keepdim=True)
    weights = torch.where(total != 0, weights / total, weights)
    unit = 1 << PRECISION_BITS
    quantised = (weights * unit + torch.where(weights < 0, -0.5, 0.5)).trunc()
    return first, (quantised / unit).float()


def resample_pass(pixels, weights, dim):
    """One of Pillow's passes: float32 (..., H, W) 8-bit values -> weighted along `dim`
    (-1: columns, weights (out, W); -2: rows, weights (out, H)), rounded half up and clipped
    to 0..255 as Pillow's clip8. Full float32 products, PyTorch's default: with TF32 matmuls
    allowed (torch.backends.cuda.matmul.allow_tf32) 4% of the pixels would be a level off
    (simulated on noise, 300x300 from 100-600 pixels)."""
    if dim == -1:
        out = pixels @ weights.T
    else:
        out = weights @ pixels
    return (out + 0.5).floor_().clamp_(0, 255)


def reduce_counts(length, factor, device):
    """Pixels in each block of `factor` along an axis of `length` (the last block may be short)."""
    starts = torch.arange(0, length, factor, device=device)
    return (length - starts).clamp(max=factor)


def pillow_reduce(pixels, factor):
    """Image.reduce: uint8 (3, H, W) -> (3, ceil(H / fy), ceil(W / fx)) block means, short
    blocks at the edges averaged over their own pixels, rounded as Pillow's Reduce.c does:
    ((sum + n // 2) * multiplier) >> 24, multiplier = 2^32 / (256 n) in float32, truncated."""
    fx, fy = factor
    sums = F.avg_pool2d(pixels[None].float(), (fy, fx), stride=(fy, fx), ceil_mode=True,
                        divisor_override=1)[0].long()
    n = reduce_counts(pixels.shape[-2], fy, pixels.device)[:, None] \
        * reduce_counts(pixels.shape[-1], fx, pixels.device)[None, :]
    multiplier = (torch.tensor(2.0 ** 32, device=pixels.device) / (256 * n).float()).long()
    return (((sums + n // 2) * multiplier) >> 24).to(torch.uint8)


def safe_box(size, box, interpolation, image_size):
    """Image._get_safe_box: the integer source window the filter reads around `box`."""
    support = FILTER_SUPPORT[interpolation] - 0.5
    support_x = support * (box[2] - box[0]) / size[0]
    support_y = support * (box[3] - box[1]) / size[1]
    return (max(0, int(box[0] - support_x)), max(0, int(box[1] - support_y)),
            min(image_size[0], math.ceil(box[2] + support_x)),
            min(image_size[1], math.ceil(box[3] + support_y)))


def nearest_indices(in0, in1, out_size):
    """Pillow's NEAREST source pixels (ImagingScaleAffine): floor(in0 + (i + 0.5) * step),
    the position accumulated step by step in double precision as Pillow's loop does."""
    in0, in1 = np.float32(in0), np.float32(in1)
    step = float(in1 - in0) / out_size
    positions = np.cumsum(np.r_[float(in0) + step * 0.5, np.full(out_size - 1, step)])
    return torch.from_numpy(positions.astype(np.int64))


def vertical_first(in_size, out_size):
    """Whether Pillow runs the vertical pass first: when the height shrinks more than twice as
    much as the width (ImagingResampleInner since Pillow 13, python-pillow/Pillow#9549; the
    8-bit rounding between the passes makes the order matter)."""
    (in_width, in_height), (width, height) = in_size, out_size
    return in_height >= height and in_height - height > 2 * (in_width - width)


def resize_like_pillow(pixels, size, interpolation, box):
    """image.resize(size, interpolation, box=box, reducing_gap=1.0) on a uint8 tensor
    (3, H, W) -> uint8 (3, size[1], size[0]), on its device.

    With reducing_gap 1, Pillow first shrinks by the whole factor of the scale with a box
    filter (Image.reduce over the window the filter reads), then resamples the rest; NEAREST
    picks pixels without either.
    """
    width, height = size
    if interpolation == Image.NEAREST:
        rows = nearest_indices(box[1], box[3], height).clamp(max=pixels.shape[-2] - 1)
        cols = nearest_indices(box[0], box[2], width).clamp(max=pixels.shape[-1] - 1)
        return pixels[:, rows.to(pixels.device)][:, :, cols.to(pixels.device)]
    factor = (int((box[2] - box[0]) / width) or 1, int((box[3] - box[1]) / height) or 1)
    if factor != (1, 1):
        x0, y0, x1, y1 = safe_box(size, box, interpolation, (pixels.shape[-1], pixels.shape[-2]))
        pixels = pillow_reduce(pixels[:, y0:y1, x0:x1], factor)
        box = ((box[0] - x0) / factor[0], (box[1] - y0) / factor[1],
               (box[2] - x0) / factor[0], (box[3] - y0) / factor[1])
    in_height, in_width = pixels.shape[-2:]
    top, rows = pillow_coefficients(box[1], box[3], in_height, height, interpolation, pixels.device)
    left, cols = pillow_coefficients(box[0], box[2], in_width, width, interpolation, pixels.device)
    window = pixels[:, top:top + rows.shape[1], left:left + cols.shape[1]].float()
    if vertical_first((in_width, in_height), size):
        return resample_pass(resample_pass(window, rows, -2), cols, -1).to(torch.uint8)
    return resample_pass(resample_pass(window, cols, -1), rows, -2).to(torch.uint8)


# ----------------------------------------------------------------------------------------------
# Colours as Pillow converts them


def rgb_to_hsv(rgb):
    """image.convert("HSV") (Convert.c, rgb2hsv_row) on uint8 (..., 3, H, W) RGB -> uint8 HSV,
    hue and saturation scaled to 0..255 and truncated. Pillow's float (float32) and double
    (float64) steps are kept apart, so that the truncations fall where Pillow's do."""
    r, g, b = rgb.int().unbind(-3)
    top, bottom = torch.maximum(torch.maximum(r, g), b), torch.minimum(torch.minimum(r, g), b)
    grey = top == bottom
    spread = (top - bottom).float().clamp(min=1)                # float cr; grey pixels: unused
    saturation = spread / top.float().clamp(min=1)
    rc, gc, bc = ((top - c).float().div(spread).double() for c in (r, g, b))
    hue = torch.where(r == top, bc - gc, torch.where(g == top, 2.0 + rc - bc, 4.0 + gc - rc)).float()
    hue = torch.fmod(hue.double() / 6.0 + 1.0, 1.0).float()
    h = torch.where(grey, 0, (hue.double() * 255.0).trunc().clamp(0, 255))
    s = torch.where(grey, 0, (saturation.double() * 255.0).trunc().clamp(0, 255))
    return torch.stack([h, s, top.double()], dim=-3).to(torch.uint8)


# Which of Pillow's (v, p, q, t) each of r, g, b takes in each sixth of the colour circle
# (hsv2rgb's switch).
SECTOR_SOURCES = ((0, 3, 1), (2, 0, 1), (1, 0, 3), (1, 2, 0), (3, 1, 0), (0, 1, 2))


def hsv_to_rgb(hsv):
    """image.convert("RGB") from "HSV" (Convert.c, hsv2rgb) on uint8 (N, 3, H, W)."""
    h, s, v = hsv.double().unbind(1)
    sixths = h * 6.0 / 255.0
    sector = sixths.floor()
    f = (sixths - sector).float()                               # C: float f
    fs = (s / 255.0).float()                                    # C: float fs
    # C's round() takes halves away from zero, torch.round to even: the same here, as no HSV
    # triple makes an exact half (checked over all 2^24 against Pillow).
    p = (v * (1.0 - fs.double())).round()
    q = (v * (1.0 - (fs * f).double())).round()                 # fs * f: a float product
    t = (v * (1.0 - fs.double() * (1.0 - f.double()))).round()
    levels = [level.to(torch.uint8) for level in (v, p, q, t)]   # all within 0..255
    sector = sector.to(torch.uint8) % 6                          # h = 255: sector 6, i.e. 0
    channels = []
    for channel in range(3):
        out = levels[SECTOR_SOURCES[0][channel]]
        for k in range(1, 6):
            out = torch.where(sector == k, levels[SECTOR_SOURCES[k][channel]], out)
        channels.append(torch.where(s == 0, levels[0], out))    # grey: v, v, v
    return torch.stack(channels, dim=1)


def apply_tables(pixels, tables):
    """Each image's 8-bit lookup table on all its channels: uint8 (N, C, H, W), tables uint8
    (N, 256) -> uint8 (N, C, H, W)."""
    offsets = torch.arange(len(pixels), device=pixels.device).view(-1, 1, 1, 1) * 256
    return tables.reshape(-1)[pixels.long() + offsets]


def distort_batch(pixels, photometrics):
    """datasets.distort on a batch: uint8 (N, 3, H, W) and N Photometric draws -> uint8
    (N, 3, H, W). The lookup tables are datasets.photometric_tables; the HSV round trip
    (Pillow's, not lossless) only for the draws that change saturation or hue, as distort."""
    tables = photometric_tables(photometrics).to(pixels.device, non_blocking=True)   # (N, 4, 256)
    pixels = apply_tables(pixels, tables[:, 0])
    hsv_rows = [i for i, p in enumerate(photometrics) if p.changes_hsv]
    if hsv_rows:
        rows = torch.tensor(hsv_rows, device=pixels.device)
        h, s, v = rgb_to_hsv(pixels[rows]).unbind(1)
        h = apply_tables(h[:, None], tables[rows, 1])[:, 0]
        s = apply_tables(s[:, None], tables[rows, 2])[:, 0]
        pixels = pixels.index_copy(0, rows, hsv_to_rgb(torch.stack([h, s, v], dim=1)))
    return apply_tables(pixels, tables[:, 3])


def paste_resized(decoded, geometries, device):
    """Each image's visible part resampled to its place on a mean-filled canvas, as
    datasets.render: uint8 (N, 3, 300, 300), and where the image is (N, 1, 300, 300) bool.
    One image at a time: the windows' sizes differ."""
    n = len(decoded)
    canvas = torch.tensor(MEAN_PIXEL, dtype=torch.uint8, device=device).view(1, 3, 1, 1)
    canvas = canvas.repeat(n, 1, IMAGE_SIZE, IMAGE_SIZE)
    inside = torch.zeros(n, 1, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bool, device=device)
    for i, (pixels, geometry) in enumerate(zip(decoded, geometries)):
        window = visible_window((pixels.shape[-1], pixels.shape[-2]), geometry)
        if window is None:
            continue
        (x1, y1, x2, y2), source = window
        canvas[i, :, y1:y2, x1:x2] = resize_like_pillow(pixels, (x2 - x1, y2 - y1), geometry.interpolation,
                                                        source)
        inside[i, :, y1:y2, x1:x2] = True
    return canvas, inside


def normalise(pixels, memory_format=torch.contiguous_format):
    """uint8 (N, 3, H, W) -> float32 (N, 3, H, W) with the ImageNet mean and std, the same
    float32 arithmetic as datasets.to_model_input."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1) * 255
    return ((pixels.float() - mean) / std).contiguous(memory_format=memory_format)


def render_batch(batch, device, memory_format=torch.contiguous_format):
    """A Batch of PendingImages (collate_fn of a decode="device" dataset) -> the Batch of their
    samples (training or evaluation), as the CPU path makes them: images float32 (N', 3, 300, 300) normalised,
    on `device` in `memory_format`; the images that cannot be decoded left out with their
    targets, their messages (as the CPU path's) added to `problems`."""
    decoded, problems = decode(batch.images, device)
    kept = [i for i, pixels in enumerate(decoded) if pixels is not None]
    pending = [batch.images[i] for i in kept]
    canvas, inside = paste_resized([decoded[i] for i in kept], [p.geometry for p in pending], device)
    photometrics = [p.photometric for p in pending]
    if not all(p.neutral for p in photometrics):                    # evaluation's are
        canvas = torch.where(inside, distort_batch(canvas, photometrics), canvas)
    flip = torch.tensor([p.geometry.flip for p in pending], dtype=torch.bool, device=device)
    canvas = torch.where(flip.view(-1, 1, 1, 1), canvas.flip(-1), canvas)
    return Batch(normalise(canvas, memory_format), *([column[i] for i in kept] for column in batch[1:4]),
                 batch.problems + problems)
