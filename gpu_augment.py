"""The training augmentation's pixels on the device: the same samples as the CPU path (datasets.render).

A dataset made with decode="device" does no pixel work in its workers: each sample's image is a
PendingImage (the file's bytes and the drawn Photometric and Geometry). `render_batch` decodes
a batch's JPEGs on the device with TorchCodec (nvJPEG on CUDA, whose IDCT and chroma upsampling
may differ from Pillow's libjpeg-turbo by a level; libjpeg-turbo on the CPU: Pillow's pixels), applies the
EXIF orientation the CPU path applies, and makes each sample as `datasets.render` does:
the visible part of the image resampled straight to its place on a mean-filled canvas, the
colour distortion on those pixels, then the flip; normalised last.

Resampling reproduces Pillow's own arithmetic (Image.resize with a box and reducing_gap=1.0,
src/libImaging/Resample.c, Reduce.c, Geometry.c) rather than calling
torch.nn.functional.interpolate, which cannot take a fractional source box (the zoomed-out
samples' window), has no Lanczos, and whose "area" and "nearest" modes pick other pixels than
Pillow's BOX and NEAREST. Per axis, Pillow's filter coefficients (quantised to 22 bits as
Pillow does) form a small matrix; the two passes are two matrix products, in Pillow's order,
each rounded to 8 bits as Pillow rounds between its passes, for the whole batch at once
(resize_batch). The colour steps use the lookup tables of datasets.py and Pillow's 8-bit HSV
conversion (Convert.c), written in torch, also batched. Nothing waits for the device.
"""
import functools
import io
import math
import re
import sys
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
import PIL
from PIL import Image

from datasets import DEFAULT_INPUT, Batch, cannot_read, photometric_tables, resize_as_torchvision, visible_window

# Pillow's filters (Resample.c): support radius at scale 1.
FILTER_SUPPORT = {Image.BOX: 0.5, Image.BILINEAR: 1.0, Image.BICUBIC: 2.0, Image.LANCZOS: 3.0}
PRECISION_BITS = 22   # Pillow's fixed-point coefficients for 8-bit images: 32 - 8 - 2 bits
PILLOW_ORDERS_PASSES = int(PIL.__version__.split(".")[0]) >= 13     # see vertical_first


# ----------------------------------------------------------------------------------------------
# Decoding


def to_device(values, dtype, device):
    """Host numbers (a list, array or CPU tensor) as a tensor on `device`, without waiting for
    it. A copy from pageable memory (torch.tensor(..., device="cuda"), .to("cuda")) first waits
    for everything queued on the stream, so the next batch could not be prepared while the GPU
    still runs the last step; from pinned memory with non_blocking it is queued like a kernel
    (PyTorch's caching host allocator keeps the pinned buffer until the copy is done)."""
    host = torch.as_tensor(values, dtype=dtype)
    if torch.device(device).type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def jpeg_decoder():
    """TorchCodec's decode_jpeg (libjpeg-turbo on the CPU, nvJPEG on CUDA), or an ImportError in
    one line. torchvision 0.29 deprecates its own decode_jpeg for it. Imported here, on first
    use: the CPU path (PIL in the loader processes) runs without TorchCodec."""
    try:
        from torchcodec.decoders import decode_jpeg
    except (ImportError, OSError) as error:      # OSError: its compiled library does not load
        raise ImportError("decoding on the device needs TorchCodec, which matches torch >= 2.11 "
                          f"(pip install torchcodec): {decoder_message(error)}") from error
    return decode_jpeg


def decoder_message(error):
    """The decoder's own words of an error, without the C++ function and source line that
    TorchCodec puts first ("read_header_and_start, /.../DecodeJpeg.cpp:208, Not a JPEG file")."""
    text = str(error).strip()
    return re.sub(r"^\w+, \S+:\d+, ", "", text.splitlines()[0]) if text else type(error).__name__


@functools.lru_cache
def device_decoding_problem(device):
    """Why JPEGs cannot be decoded on `device` (its name), or None: TorchCodec missing, or its
    decoder failing there (a CUDA build without nvJPEG, a CPU-only build), found by decoding an
    8 x 8 JPEG once per process."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG")
    try:
        jpeg_decoder()(torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8), device=device)
    except ImportError as error:
        return str(error)
    except RuntimeError as error:
        return f"TorchCodec cannot decode JPEGs on {device} ({decoder_message(error)})"
    return None


@functools.lru_cache
def decode_place(choice, device):
    """PascalVOCDataset's `decode` for --gpu-augment / --gpu-decode: an explicit True
    ("device") or False ("cpu"), or None (auto): "device" with CUDA, where the loader
    processes' CPUs would otherwise limit the rate, "cpu" elsewhere. Where the device cannot
    decode JPEGs (device_decoding_problem), auto says why in one line and takes the CPU path;
    an explicit True raises a ValueError saying why. Once per process and setting (the
    training run and its evaluation ask alike)."""
    on_device = torch.device(device).type == "cuda" if choice is None else choice
    if not on_device:
        return "cpu"
    problem = device_decoding_problem(str(device))
    if problem is None:
        return "device"
    if choice:
        raise ValueError(f"cannot decode on {device}: {problem}")
    print(f"{problem}; the loader processes decode the images instead", file=sys.stderr)
    return "cpu"


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

    One batched TorchCodec call for the JPEGs (nvJPEG decodes a list at once); other files
    arrive already decoded by the worker. If the batch call fails, each file is decoded alone
    to name the bad ones with the CPU path's message (datasets.cannot_read).
    """
    decode_jpeg = jpeg_decoder()
    jpegs = [i for i, image in enumerate(images) if image.is_jpeg]
    decoded = [None if image.is_jpeg else to_device(image.data, torch.uint8, device) for image in images]
    problems = []
    try:
        pixels = decode_jpeg([images[i].data for i in jpegs], mode="RGB", device=device) if jpegs else []
    except RuntimeError:
        pixels = []
        for i in jpegs:
            try:
                pixels.append(decode_jpeg(images[i].data, mode="RGB", device=device))
            except RuntimeError as error:
                pixels.append(None)
                problems.append(str(cannot_read(images[i].path, decoder_message(error))))
    for i, image in zip(jpegs, pixels):
        decoded[i] = None if image is None else orient(image, images[i].orientation)
    return decoded, problems


# ----------------------------------------------------------------------------------------------
# Resampling as Pillow does it, a whole batch at once
#
# Each image's resize is planned on the host from its size and window (plan_resize: Python
# numbers only) and run for the whole batch in a few tensor operations: per image, only the
# crop of its pixels the filter reads is copied into one zero-padded batch (shrunk first by
# Image.reduce where Pillow does so); every image's filter weights, its place in the output
# included, are built together; the two passes are two batched matrix products. On a GPU
# every operation is a kernel launch from the host, and a per-image loop (about 100 of them
# per image) would take the host longer than the training step takes the GPU.


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


class AxisPlan(NamedTuple):
    """One axis of one image's resize as Pillow runs it: source pixels [start, stop) are read
    and shrunk by `factor` (Image.reduce, short blocks at the end kept; 1: not shrunk), making
    pixels [first, first + length) of a reduced axis of `size` pixels, which are resampled to
    output pixels [out0, out1): by Pillow's filter over the source span from in0, `scale`
    reduced pixels per output pixel (precompute_coeffs), or for NEAREST by picking pixel
    `picks[k]` for output pixel out0 + k."""
    start: int
    stop: int
    factor: int
    first: int
    length: int
    size: int
    out0: int
    out1: int
    interpolation: int
    in0: float = 0.0
    scale: float = 1.0
    picks: tuple = ()


NO_AXIS = AxisPlan(0, 0, 1, 0, 0, 0, 0, 0, Image.NEAREST)      # an image with nothing to show


def plan_axis(in0, in1, span, out0, out1, interpolation, factor):
    """The AxisPlan of resampling [in0, in1) of the reduced axis (source pixels span = (s0, s1)
    shrunk by `factor`) to output pixels [out0, out1). The window [first, last) is the one
    Pillow reads (precompute_coeffs; int() truncates, as C's cast)."""
    s0, s1 = span
    size, out_size = -(-(s1 - s0) // factor), out1 - out0
    in0, in1 = np.float32(in0), np.float32(in1)               # the box as Pillow receives it
    if interpolation == Image.NEAREST:
        picks = nearest_indices(in0, in1, out_size).clip(max=size - 1)
        first, last = int(picks.min()), int(picks.max()) + 1
        return AxisPlan(s0 + first, s0 + last, 1, first, last - first, size, out0, out1, interpolation,
                        picks=tuple(picks.tolist()))
    scale = float(in1 - in0) / out_size
    support = FILTER_SUPPORT[interpolation] * max(scale, 1.0)
    first = max(0, int(float(in0) + 0.5 * scale - support + 0.5))
    last = max(first, min(size, int(float(in0) + (out_size - 0.5) * scale + support + 0.5)))
    return AxisPlan(s0 + first * factor, min(s0 + last * factor, s1), factor, first, last - first, size,
                    out0, out1, interpolation, float(in0), scale)


def plan_resize(image_size, out_box, box, interpolation):
    """Plans (x AxisPlan, y AxisPlan, whether the vertical pass runs first) of
    image.resize(out_box's size, interpolation, box=box, reducing_gap=1.0) pasted at out_box,
    for an image of image_size (width, height). With reducing_gap 1, Pillow first shrinks the
    window the filter reads (safe_box) by the whole factor of the scale with Image.reduce,
    then resamples the rest; NEAREST picks pixels without either."""
    width, height = out_box[2] - out_box[0], out_box[3] - out_box[1]
    factor, span = (1, 1), (0, 0, *image_size)
    if interpolation != Image.NEAREST:
        factor = (int((box[2] - box[0]) / width) or 1, int((box[3] - box[1]) / height) or 1)
    if factor != (1, 1):
        span = safe_box((width, height), box, interpolation, image_size)
        box = ((box[0] - span[0]) / factor[0], (box[1] - span[1]) / factor[1],
               (box[2] - span[0]) / factor[0], (box[3] - span[1]) / factor[1])
    x, y = (plan_axis(box[a], box[a + 2], (span[a], span[a + 2]), out_box[a], out_box[a + 2],
                      interpolation, factor[a]) for a in (0, 1))
    return x, y, vertical_first((x.size, y.size), (width, height))


def axis_weights(plans, length, out_size, device):
    """The resampling weights of AxisPlans, float32 (M, out_size, length): output pixel by window
    pixel, zero outside each plan's output span and window.

    Pillow's coefficients (precompute_coeffs, normalize_coeffs_8bpc) in float64: each output
    pixel's taps from its first source pixel `low` over a band of B (wide enough for the
    widest filter), normalised, quantised to 22 bits so that a float32 product with 8-bit
    values matches Pillow's integer sums, then scattered into the window's columns.
    """
    support = [FILTER_SUPPORT.get(p.interpolation, 0.0) * max(p.scale, 1.0) for p in plans]
    band = int(2 * max(support)) + 2                          # high - low <= 2 support + 1
    numbers = to_device([[p.in0, p.scale, s, max(p.scale, 1.0), p.first, p.size, p.out0, p.out1,
                          p.interpolation] for p, s in zip(plans, support)], torch.float64, device)
    picks = np.full((len(plans), out_size), -1.0)
    for row, p in zip(picks, plans):
        row[p.out0:p.out0 + len(p.picks)] = p.picks
    in0, scale, support, filterscale, first, size, out0, out1, code = \
        numbers.T[..., None, None]                                                   # (M, 1, 1)
    picks = to_device(picks, torch.float64, device)[..., None]                         # (M, S, 1)
    out = torch.arange(out_size, dtype=torch.float64, device=device)[:, None]         # (S, 1)
    taps = torch.arange(band, dtype=torch.float64, device=device)
    centre = in0 + (out - out0 + 0.5) * scale                                         # (M, S, 1)
    low = (centre - support + 0.5).trunc().clamp(min=0)
    high = torch.minimum((centre + support + 0.5).trunc(), size)
    nearest = code == Image.NEAREST
    low = torch.where(nearest, picks, low)
    source = low + taps                                                               # (M, S, B)
    x = (source - centre + 0.5) * (1.0 / filterscale)
    weights = torch.zeros_like(x)
    for interpolation in sorted({p.interpolation for p in plans} - {Image.NEAREST}):
        weights = torch.where(code == interpolation, pillow_filter(x, interpolation), weights)
    weights = torch.where(source < high, weights, 0.0)
    total = weights.sum(dim=2, keepdim=True)
    weights = torch.where(total != 0, weights / total, weights)
    unit = 1 << PRECISION_BITS
    weights = (weights * unit + torch.where(weights < 0, -0.5, 0.5)).trunc() / unit
    weights = torch.where(nearest, (taps == 0).double(), weights)
    weights = torch.where((out >= out0) & (out < out1), weights, 0.0).float()
    # Taps past the window carry 0: any column will do, and adding 0 changes nothing.
    columns = (source - first).long().clamp_(0, max(length - 1, 0))
    dense = torch.zeros(len(plans), out_size, max(length, 1), device=device)
    return dense.scatter_add_(2, columns, weights)[..., :length]


def resample_pass(pixels, weights, dim):
    """One of Pillow's passes on a batch: float32 (N, H, C, W) 8-bit values, rows, channels,
    columns (so that either pass is a batched matrix product without a copy), weighted along
    `dim` (-1: columns, weights (N, out, W); -3: rows, weights (N, out, H)), rounded half up
    and clipped to 0..255 as Pillow's clip8. Full float32 products, PyTorch's default: with
    TF32 matmuls allowed (torch.backends.cuda.matmul.allow_tf32) 4% of the pixels would be a
    level off (simulated on noise, 300x300 from 100-600 pixels)."""
    n, height, channels, width = pixels.shape
    if dim == -1:
        out = pixels.reshape(n, height * channels, width) @ weights.transpose(1, 2)
        out = out.view(n, height, channels, -1)
    else:
        out = (weights @ pixels.reshape(n, height, channels * width)).view(n, -1, channels, width)
    return out.add_(0.5).floor_().clamp_(0, 255)


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
    multiplier = (2.0 ** 32 / (256 * n).float()).long()        # 2^32 is exact in float32
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
    step = float(np.float32(in1) - np.float32(in0)) / out_size
    positions = np.cumsum(np.r_[float(in0) + step * 0.5, np.full(out_size - 1, step)])
    return positions.astype(np.int64)


def vertical_first(in_size, out_size):
    """Whether the installed Pillow runs the vertical pass first (the 8-bit rounding between the
    passes makes the order matter): since Pillow 13 (ImagingResampleInner,
    python-pillow/Pillow#9549) when the height shrinks more than twice as much as the width;
    before it, never (tests/test_gpu_augment.py passes with Pillow 10.1, 11.0, 12.3 and 13.0)."""
    (in_width, in_height), (width, height) = in_size, out_size
    return PILLOW_ORDERS_PASSES and in_height >= height and in_height - height > 2 * (in_width - width)


def gather_windows(decoded, plans, device):
    """The pixels each image's resize reads, float32 (N, Ky, 3, Kx) (rows, channels, columns),
    zero-padded to the largest: its plans' crop of the source, reduced by Image.reduce where
    they say."""
    height, width = max(y.length for _, y, _ in plans), max(x.length for x, _, _ in plans)
    windows = torch.zeros(len(plans), height, 3, width, device=device)
    for i, (pixels, (x, y, _)) in enumerate(zip(decoded, plans)):
        crop = pixels[:, y.start:y.stop, x.start:x.stop]
        if x.factor > 1 or y.factor > 1:
            crop = pillow_reduce(crop, (x.factor, y.factor))
        windows[i, :y.length, :, :x.length] = crop.permute(1, 0, 2)
    return windows


def resample(decoded, plans, vertical, size, device):
    """Images resized as their plans say, all with the passes in the same order (vertical:
    rows first): float32 (N, 3, size, size) 8-bit values, 0 outside each image's output span."""
    windows = gather_windows(decoded, plans, device)                                # (N, Ky, 3, Kx)
    n, height, _, width = windows.shape
    weights = axis_weights([x for x, _, _ in plans] + [y for _, y, _ in plans], max(height, width), size,
                           device)
    cols, rows = weights[:n, :, :width], weights[n:, :, :height]
    if vertical:
        out = resample_pass(resample_pass(windows, rows, -3), cols, -1)
    else:
        out = resample_pass(resample_pass(windows, cols, -1), rows, -3)
    return out.permute(0, 2, 1, 3)


def resize_batch(decoded, placements, device, size=DEFAULT_INPUT.size):
    """Images resized as Pillow would and placed on a size x size output: uint8 (3, H, W) images and,
    for each, (out_box (x1, y1, x2, y2) in the output, box (left, top, right, bottom) of its
    pixels, interpolation), each image as image.resize(out_box's size, interpolation, box=box,
    reducing_gap=1.0) pasted at out_box; None: nothing shown. Returns uint8 (N, 3, size, size),
    0 outside the boxes, and where the boxes are, bool (N, 1, size, size)."""
    n = len(decoded)
    if n == 0:
        return (torch.zeros(0, 3, size, size, dtype=torch.uint8, device=device),
                torch.zeros(0, 1, size, size, dtype=torch.bool, device=device))
    plans = [(NO_AXIS, NO_AXIS, False) if placement is None else
             plan_resize((pixels.shape[-1], pixels.shape[-2]), *placement)
             for pixels, placement in zip(decoded, placements)]
    canvas = torch.empty(n, 3, size, size, device=device)
    for vertical in (False, True):                       # Pillow's order of passes, per image
        members = [i for i, (_, _, v) in enumerate(plans) if v == vertical]
        if len(members) == n:                            # one order for all: no reassembling
            canvas = resample(decoded, plans, vertical, size, device)
        elif members:
            out = resample([decoded[i] for i in members], [plans[i] for i in members], vertical, size,
                           device)
            canvas.index_copy_(0, to_device(members, torch.long, device), out)
    spans = to_device([[x.out0, x.out1, y.out0, y.out1] for x, y, _ in plans], torch.long, device)
    position = torch.arange(size, device=device)
    x0, x1, y0, y1 = spans.T[..., None]                                             # (N, 1)
    inside = ((position >= y0) & (position < y1))[:, :, None] & ((position >= x0) & (position < x1))[:, None]
    return canvas.to(torch.uint8), inside[:, None]


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
    tables = to_device(photometric_tables(photometrics), torch.uint8, pixels.device)   # (N, 4, 256)
    pixels = apply_tables(pixels, tables[:, 0])
    hsv_rows = [i for i, p in enumerate(photometrics) if p.changes_hsv]
    if hsv_rows:
        rows = to_device(hsv_rows, torch.long, pixels.device)
        h, s, v = rgb_to_hsv(pixels[rows]).unbind(1)
        h = apply_tables(h[:, None], tables[rows, 1])[:, 0]
        s = apply_tables(s[:, None], tables[rows, 2])[:, 0]
        pixels = pixels.index_copy(0, rows, hsv_to_rgb(torch.stack([h, s, v], dim=1)))
    return apply_tables(pixels, tables[:, 3])


def paste_resized(decoded, geometries, device, fill=DEFAULT_INPUT.fill):
    """Each image's visible part resampled to its place on a canvas of colour `fill`, as
    datasets.render: uint8 (N, 3, S, S), and where the image is (N, 1, S, S) bool; S is the
    geometries' size (one for the batch)."""
    placements = []
    for pixels, geometry in zip(decoded, geometries):
        window = visible_window((pixels.shape[-1], pixels.shape[-2]), geometry)
        placements.append(None if window is None else (*window, geometry.interpolation))
    canvas, inside = resize_batch(decoded, placements, device, geometries[0].size if geometries else 0)
    fill = to_device(fill, torch.uint8, device).view(1, 3, 1, 1)
    return torch.where(inside, canvas, fill), inside


def normalise(pixels, model_input, memory_format=torch.contiguous_format):
    """uint8 (N, 3, H, W) -> float32 (N, 3, H, W) with model_input's mean and std, the same
    float32 arithmetic as datasets.to_model_input."""
    mean = to_device(model_input.mean, torch.float32, pixels.device).view(1, 3, 1, 1) * 255
    std = to_device(model_input.std, torch.float32, pixels.device).view(1, 3, 1, 1) * 255
    return ((pixels.float() - mean) / std).contiguous(memory_format=memory_format)


def render_batch(batch, device, memory_format=torch.contiguous_format, model_input=DEFAULT_INPUT):
    """A Batch of PendingImages (collate_fn of a decode="device" dataset) -> the Batch of their
    samples (training or evaluation), as the CPU path makes them: images float32 (N', 3, S, S)
    normalised and resized as model_input says (the dataset's), on `device` in
    `memory_format`; the images that cannot be decoded left out with their targets, their
    messages (as the CPU path's) added to `problems`. Evaluation's samples of a network that
    expects torchvision's resize are made by it (datasets.resize_as_torchvision); OpenCV's
    resize (amdegroot's weights) runs on the CPU only: eval.py decodes those there."""
    if model_input.resize == "opencv":
        raise ValueError("OpenCV's resize runs on the CPU: decode these images in the loader processes")
    decoded, problems = decode(batch.images, device)
    kept = [i for i, pixels in enumerate(decoded) if pixels is not None]
    if model_input.resize == "torchvision":       # whole images, unaugmented (training resizes with Pillow)
        images = torch.stack([resize_as_torchvision(decoded[i], model_input) for i in kept]) if kept else \
            torch.zeros(0, 3, model_input.size, model_input.size, device=device)
        images = images.contiguous(memory_format=memory_format)
    else:
        images = make_samples([decoded[i] for i in kept], [batch.images[i] for i in kept], device,
                              memory_format, model_input)
    return Batch(images, *([column[i] for i in kept] for column in batch[1:4]), batch.problems + problems)


def make_samples(decoded, pending, device, memory_format=torch.contiguous_format, model_input=DEFAULT_INPUT):
    """Decoded images (uint8 (3, H, W) each, on `device`) and their PendingImages -> their
    samples, float32 (N, 3, S, S) normalised, as datasets.render and to_model_input make
    them. Nothing here waits for the device: on a GPU the next batch is made while the last
    step still runs."""
    canvas, inside = paste_resized(decoded, [p.geometry for p in pending], device, model_input.fill)
    photometrics = [p.photometric for p in pending]
    if not all(p.neutral for p in photometrics):                    # evaluation's are
        canvas = torch.where(inside, distort_batch(canvas, photometrics), canvas)
    flip = to_device([p.geometry.flip for p in pending], torch.bool, device)
    canvas = torch.where(flip.view(-1, 1, 1, 1), canvas.flip(-1), canvas)
    return normalise(canvas, model_input, memory_format)
