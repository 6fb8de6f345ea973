"""Box maths and small helpers shared by every script.

Boxes come in two forms:
  * corners  (x1, y1, x2, y2), "xy"   -- what datasets, NMS and IoU use;
  * centre-size (cx, cy, w, h), "cxcy" -- what the priors and the offsets use.
Both are fractional (0..1 of the image side) inside the model. torchvision.ops already
does IoU and the corner <-> centre conversion, so we call it rather than write it again.
"""
import argparse
import contextlib
import errno
import io
import json
import math
import os
import stat
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torchvision.ops import box_convert

# Variances of the SSD offset encoding (Caffe's prior "variance" 0.1, 0.1, 0.2, 0.2): the
# centre offsets are divided by 0.1 and the log size ratios by 0.2, which scales the
# regression targets to roughly unit variance.
CENTRE_VARIANCE = 0.1
SIZE_VARIANCE = 0.2

IMAGE_SIZE = 300   # SSD300's input side, in pixels


class Decoding(NamedTuple):
    """How predictions become detections (see detect_objects)."""
    min_score: float         # class score threshold
    max_overlap: float       # NMS IoU threshold, per class
    top_k: int               # detections kept per image
    per_class_top_k: int = 400   # candidates per class before NMS


# The paper's evaluation settings (Caffe's ssd_pascal.py test: confidence_threshold 0.01,
# nms_threshold 0.45, top_k 400, keep_top_k 200): the ones VOC mAP is reported with.
EVAL_DECODING = Decoding(0.01, 0.45, 200)
# detect.py's pictures: fewer, surer boxes.
DRAW_DECODING = Decoding(0.2, 0.5, 200)


def xy_to_cxcy(xy):
    """(..., 4) corners -> (..., 4) centre-size."""
    return box_convert(xy, in_fmt="xyxy", out_fmt="cxcywh")


def cxcy_to_xy(cxcy):
    """(..., 4) centre-size -> (..., 4) corners."""
    return box_convert(cxcy, in_fmt="cxcywh", out_fmt="xyxy")


def encode(cxcy, priors_cxcy):
    """Offsets of boxes from their priors (the regression targets of the paper's eq. 2).

    cxcy, priors_cxcy: (..., 4) centre-size boxes, broadcastable.
    g_cx = (cx - p_cx) / (p_w * 0.1),  g_w = log(w / p_w) / 0.2, and likewise for y, h.
    """
    g_cxcy = (cxcy[..., :2] - priors_cxcy[..., :2]) / (priors_cxcy[..., 2:] * CENTRE_VARIANCE)
    g_wh = torch.log(cxcy[..., 2:] / priors_cxcy[..., 2:]) / SIZE_VARIANCE
    return torch.cat([g_cxcy, g_wh], dim=-1)


def decode(g_cxcy, priors_cxcy):
    """Inverse of `encode`: predicted offsets (..., 4) -> centre-size boxes (..., 4)."""
    cxcy = g_cxcy[..., :2] * CENTRE_VARIANCE * priors_cxcy[..., 2:] + priors_cxcy[..., :2]
    wh = torch.exp(g_cxcy[..., 2:] * SIZE_VARIANCE) * priors_cxcy[..., 2:]
    return torch.cat([cxcy, wh], dim=-1)


def pairwise_iou(a, b):
    """IoU of every box in a (..., n, 4) with every box in b (..., m, 4), corners: (..., n, m).

    torchvision.ops.box_iou broadcasts over leading dimensions only in recent releases (0.19,
    which requirements.txt admits, takes n x 4 and m x 4 alone), so the batched cases (NMS
    groups, detections against their image's objects) use this, in box_iou's order of
    operations. One pair of plain sets (priors, crops) uses box_iou itself.
    """
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / (area_a[..., :, None] + area_b[..., None, :] - inter)


def greedy_nms(boxes, valid, threshold):
    """Greedy non-maximum suppression in many independent groups at once.

    boxes: G x k x 4 corners, each group sorted by descending score; valid: G x k (padding and
    boxes under the score threshold are False). A box is kept unless a kept, higher-scoring box
    of its group overlaps it with IoU > threshold: the rule of torchvision.ops.nms.
    Returns keep: G x k bool.

    torchvision's batched_nms loops over the groups in Python on the CPU once there are more
    than a thousand boxes, and scans every box for each group. Here the greedy rule is solved
    for many groups together as a fixed point, keep_i = valid_i & ~any_{j<i}(keep_j & overlap_ji),
    iterated from keep = valid: box i is final once every box that can suppress it is, so this
    ends after as many rounds as the longest chain of suppressions (a handful), with exactly
    the greedy result. Groups go through in chunks of about a million box pairs on the CPU
    (the k x k overlap matrices then stay in cache), in far larger ones on a GPU.
    """
    G, k = valid.shape
    if G == 0 or k == 0:
        return valid.clone()
    earlier = torch.ones(k, k, dtype=torch.bool, device=boxes.device).triu(diagonal=1)  # j < i
    pairs = 2 ** 26 if boxes.is_cuda else 2 ** 20
    step = max(1, pairs // (k * k))
    return torch.cat([_greedy_nms_fixed_point(boxes[i:i + step], valid[i:i + step], threshold, earlier)
                      for i in range(0, G, step)])


def _greedy_nms_fixed_point(boxes, valid, threshold, earlier):
    suppresses = ((pairwise_iou(boxes, boxes) > threshold) & earlier).to(boxes.dtype)  # g x k x k
    keep = valid
    while True:
        suppressed = torch.bmm(keep.to(boxes.dtype).unsqueeze(1), suppresses).squeeze(1) > 0
        new_keep = valid & ~suppressed
        if torch.equal(new_keep, keep):
            return keep
        keep = new_keep


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help shows the script's docstring as written, and each option's default if it has one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and action.default not in (None, argparse.SUPPRESS) \
                and "(default" not in text:
            text += " (default: %(default)s)"
        return text


def bounded(kind, low=None, high=None, above=None, below=None):
    """An argparse type: a `kind` (int or float) with low <= value <= high, above < value <
    below (bounds left None are open), else a usage error saying what is allowed."""
    if low is None and above is None:
        lower = "(-inf"
    else:
        lower = f"[{low}" if low is not None else f"({above}"
    upper = f"{high}]" if high is not None else (f"{below})" if below is not None else None)
    if upper is None:
        allowed = f"at least {low}" if low is not None else f"greater than {above}"
    else:
        allowed = f"in {lower}, {upper}"
    noun = "an integer" if kind is int else "a number"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        inside = (value == value and (low is None or value >= low) and (high is None or value <= high)
                  and (above is None or value > above) and (below is None or value < below))
        if not inside:
            raise argparse.ArgumentTypeError(f"{text} is not allowed: must be {allowed}")
        return value
    return parse


def pick_device(name="auto"):
    """'auto' -> cuda, then mps, then cpu; anything else is passed to torch.device."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# --------------------------------------------------------------------------------------
# Precision and memory format: one decision for train.py, eval.py and detect.py.
# --------------------------------------------------------------------------------------

AMP_CHOICES = ("auto", "off", "bf16", "fp16")
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_AMP_NAMES = {dtype: name for name, dtype in AMP_DTYPES.items()}
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below which bf16 convolutions are emulated in fp32.
_ONEDNN_ISAS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2",
                             "AVX512_CORE", "AVX512_CORE_VNNI"}


def cpu_has_native(dtype, capabilities=None):
    """Whether this CPU computes `dtype` (torch.bfloat16 or torch.float16) in hardware.

    bf16 needs AVX-512 bf16 or AMX; fp16 needs AVX-512 fp16 or AMX fp16. Without them,
    autocast still runs but oneDNN emulates the type: about 9x slower than float32 on an
    AVX2-only CPU (a toy training step: 9.9 s against 1.1 s). ONEDNN_MAX_CPU_ISA below
    AVX512_CORE_BF16 disables the instructions for oneDNN, so it counts as absent.
    capabilities: a dict as returned by torch.cpu.get_capabilities() (this CPU's when None;
    given in tests).
    """
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _ONEDNN_ISAS_WITHOUT_BF16:
        return False
    if capabilities is None:
        if hasattr(torch.cpu, "get_capabilities"):          # torch >= 2.7
            capabilities = torch.cpu.get_capabilities()
        else:
            capabilities = {"avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
                            "amx_bf16": torch.cpu._is_amx_tile_supported()}
    keys = ("avx512_bf16", "amx_bf16") if dtype == torch.bfloat16 else ("avx512_fp16", "amx_fp16")
    return any(capabilities.get(key, False) for key in keys)


def choose_precision(amp, device, channels_last=None, capabilities=None):
    """--amp and --channels-last -> (autocast dtype, or None for float32; memory format).

    amp "auto": on CUDA bf16 where the GPU has it, else fp16; on a CPU bf16 where the CPU
    computes it natively (`cpu_has_native`), else float32; float32 on other devices.
    channels_last None (auto): NHWC on CUDA and CPU, where convolutions run faster in it
    in every precision (CPU, SSD300-VGG16 fp32 forward: 350 against 394 ms/image with AVX2
    kernels, simulated on an AVX-512 bf16 machine; toy width: 10 against 19), NCHW elsewhere.
    An explicit reduced precision on a CPU that lacks it runs, with a warning.
    """
    device = torch.device(device)
    if amp not in AMP_CHOICES:
        raise ValueError(f"--amp must be one of {', '.join(AMP_CHOICES)}, not {amp!r}")
    if amp == "auto":
        if device.type == "cuda":
            amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif device.type == "cpu" and cpu_has_native(torch.bfloat16, capabilities):
            amp = "bf16"
        else:
            amp = "off"
    elif amp != "off" and device.type == "cpu" and not cpu_has_native(AMP_DTYPES[amp], capabilities):
        warnings.warn(f"--amp {amp}: this CPU has no native {amp} instructions, so autocast "
                      "emulates them and runs several times slower than --amp off", stacklevel=2)
    if channels_last is None:
        channels_last = device.type in ("cuda", "cpu")
    return AMP_DTYPES[amp], torch.channels_last if channels_last else torch.contiguous_format


def describe_precision(dtype, memory_format):
    """'bf16 autocast, channels_last' and the like, for logs and configs."""
    name = "fp32" if dtype is None else f"{_AMP_NAMES[dtype]} autocast"
    return f"{name}, {'channels_last' if memory_format == torch.channels_last else 'NCHW'}"


def add_precision_arguments(parser, default=lambda value: value):
    """The --amp and --channels-last options, the same in every script (`default` wraps
    the defaults, for train.py's parser of explicit arguments)."""
    parser.add_argument("--amp", choices=AMP_CHOICES, default=default("auto"),
                        help="mixed precision; auto: bf16 on CUDA (fp16 where bf16 is missing) "
                             "and on CPUs with native bf16 (AVX-512 bf16, AMX), float32 elsewhere")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=default(None),
                        help="NHWC memory format (default: on CUDA and CPU)")


def os_error(code, message):
    """An OSError with errno `code` whose text is just `message` (no "[Errno 28]" prefix)."""
    error = OSError(message)
    error.errno = code
    return error


TEMP_PREFIX = ".tmp-"   # atomic_write's temporary files; remove_stale_temporaries clears them


def _current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()   # read once: os.umask can only be read by setting it


@contextlib.contextmanager
def atomic_path(path):
    """A temporary path beside `path`, with its extension, renamed over `path` once the block
    completes: for writers that take a file name and choose the format by its extension
    (OpenCV's video writer).

    An exception or a full disk while writing leaves the previous file untouched and removes
    the temporary file (a kill -9 can leave one: remove_stale_temporaries); an OSError says
    which file could not be saved. The file gets the mode open() would give it (0o666 less
    the umask), or the existing file's mode: mkstemp alone would make every file 0o600.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=os.path.splitext(path)[1], dir=folder)
        os.close(fd)
        try:
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        except FileNotFoundError:
            os.chmod(tmp, 0o666 & ~_UMASK)
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise os_error(e.errno, f"could not save {path}: {e.strerror or e}; "
                                    "the previous file, if any, is unchanged") from e
        raise


@contextlib.contextmanager
def atomic_write(path, mode="w"):
    """Write through a temporary file beside `path`, renamed over it once complete (as
    `atomic_path`), flushed to the disk first."""
    with atomic_path(path) as tmp, open(tmp, mode, **({} if "b" in mode else {"newline": ""})) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def writable_folder(folder, create=True):
    """Create `folder` if needed and check that files can be written in it, before long work
    whose results would otherwise be lost at the end: an OSError naming it if not.
    create=False creates nothing: it checks that the folder or its nearest existing parent
    is writable."""
    folder = Path(folder)
    if not create:
        existing = next(p for p in (folder.absolute(), *folder.absolute().parents) if p.exists())
        if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
            raise os_error(errno.EACCES, f"cannot write in {folder}: {existing} is not a writable folder")
        return folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(prefix=TEMP_PREFIX, dir=folder):
            pass
    except OSError as e:
        raise os_error(e.errno, f"cannot write in {folder}: {e.strerror or e}") from e
    return folder


def remove_stale_temporaries(folder):
    """Delete atomic_write's temporary files that a killed process left in `folder`;
    returns how many. Only for a folder that no other process is writing to."""
    stale = list(Path(folder).glob(TEMP_PREFIX + "*"))
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def atomic_torch_save(obj, path):
    """torch.save through atomic_write. It needs free space for a second copy of the file
    while the old one is still there."""
    with atomic_write(path, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:   # how torch's zip writer reports a failed write (full disk)
            raise OSError(f"torch.save failed ({str(e).splitlines()[0]})") from e


def json_safe(value):
    """`value` with every NaN or infinite float (also inside lists and dicts) as None, so
    that json.dump writes valid JSON (null) rather than NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def atomic_write_json(path, data, indent=None):
    """Valid JSON (NaN and infinities as null), written atomically."""
    with atomic_write(path) as f:
        json.dump(json_safe(data), f, indent=indent, allow_nan=False)


def save_figure(fig, png):
    """Save a matplotlib figure as PNG, atomically, and free it."""
    import matplotlib.pyplot as plt
    try:
        with atomic_write(png, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------------------
# Detection evaluation: PASCAL VOC average precision, with the official devkit's rules.
# --------------------------------------------------------------------------------------

# A detection must overlap an object by strictly more than this IoU to match it.
VOC_IOU_THRESHOLD = 0.5


def _cat(per_image, *row_shape):
    """Per-image tensors -> one CPU tensor of shape (total, *row_shape)."""
    if not per_image:
        return torch.zeros(0, *row_shape)
    return torch.cat([t.reshape(-1, *row_shape) for t in per_image]).cpu()


def _image_ids(per_image):
    """Image index of every row of `_cat(per_image)`."""
    counts = torch.tensor([len(t) for t in per_image], dtype=torch.long)
    return torch.repeat_interleave(torch.arange(len(per_image)), counts)


def _match(det_boxes, det_scores, det_images, gt_boxes, gt_difficult, gt_images, n_images):
    """Devkit matching of the detections of one class to its objects (at least one).

    Returns, in descending score order (ties keep input order), a bool per detection that
    counts: True for a true positive, False for a false positive. Detections whose best
    object is difficult count as neither and are left out.
    """
    order = torch.sort(det_scores, descending=True, stable=True).indices
    det_boxes, det_images = det_boxes[order], det_images[order]
    n_dets, n_gts = len(order), len(gt_images)

    # Objects of each image side by side, padded to the largest count G: (n_images, G).
    gt_images, by_image = torch.sort(gt_images, stable=True)
    gt_boxes, gt_difficult = gt_boxes[by_image], gt_difficult[by_image]
    counts = torch.bincount(gt_images, minlength=n_images)
    slot = torch.arange(n_gts) - (counts.cumsum(0) - counts)[gt_images]  # place in its image
    gt_index = torch.full((n_images, int(counts.max())), -1)  # -1: padding
    gt_index[gt_images, slot] = torch.arange(n_gts)
    padded_boxes = gt_boxes.new_zeros(*gt_index.shape, 4)
    padded_boxes[gt_images, slot] = gt_boxes

    # Best object of each detection among all of its class in its image, already matched or
    # not (the devkit does not fall back to the second best); the first one on ties.
    candidates = gt_index[det_images]  # (D, G)
    iou = pairwise_iou(det_boxes[:, None], padded_boxes[det_images])[:, 0]  # (D, G)
    best_iou, best_slot = iou.masked_fill(candidates < 0, -1).max(1)
    best_gt = candidates.gather(1, best_slot[:, None])[:, 0]  # (D,), -1 if none

    hit = best_iou > VOC_IOU_THRESHOLD
    ignored = hit & gt_difficult[best_gt]
    claims = hit & ~ignored
    # Of the detections claiming an object, the first in score order is the true positive,
    # the later ones are duplicates, i.e. false positives.
    rank = torch.arange(n_dets)
    first_claim = torch.full((n_gts,), n_dets).scatter_reduce(
        0, best_gt[claims], rank[claims], reduce="amin")
    is_tp = claims & (first_claim[best_gt] == rank)
    return is_tp[~ignored]


def _class_curves(det_boxes, det_labels, det_scores, true_boxes, true_labels,
                  true_difficulties, n_classes):
    """Yield (class, recall, precision) as float64 tensors for each class with at least one
    non-difficult object, one point per counted detection (see `_match`)."""
    if len(det_labels) != len(true_labels):
        raise ValueError(f"detections for {len(det_labels)} images, "
                         f"ground truth for {len(true_labels)}")
    n_images = len(true_labels)
    det_images, gt_images = _image_ids(det_labels), _image_ids(true_labels)
    det_boxes, gt_boxes = _cat(det_boxes, 4).double(), _cat(true_boxes, 4).double()
    det_labels, det_scores = _cat(det_labels), _cat(det_scores)
    gt_labels, gt_difficult = _cat(true_labels), _cat(true_difficulties).bool()

    for c in range(1, n_classes):
        is_gt = gt_labels == c
        n_positives = int((is_gt & ~gt_difficult).sum())
        if n_positives == 0:
            continue
        is_det = det_labels == c
        is_tp = _match(det_boxes[is_det], det_scores[is_det], det_images[is_det],
                       gt_boxes[is_gt], gt_difficult[is_gt], gt_images[is_gt], n_images)
        true_positives = is_tp.cumsum(0, dtype=torch.float64)
        n_counted = torch.arange(1, len(is_tp) + 1, dtype=torch.float64)
        yield c, true_positives / n_positives, true_positives / n_counted


def _average_precision(recall, precision, use_07_metric):
    """AP of one precision/recall curve (float64 tensors, recall non-decreasing)."""
    # Best precision at this recall or beyond, for every point.
    envelope = precision.flip(0).cummax(0).values.flip(0)
    if use_07_metric:
        # VOC2007 11-point AP. The thresholds are exact tenths (k / 10, correctly rounded),
        # so `recall >= t` is decided as the exact fraction comparison tp / n_pos >= k / 10.
        # The common Python port's np.arange(0., 1.1, 0.1) has 0.30000000000000004,
        # 0.6000000000000001 and 0.7000000000000001 instead, so there a recall of exactly
        # 3/10, 6/10 or 7/10 misses its threshold.
        thresholds = torch.arange(11, dtype=torch.float64) / 10
        first = torch.searchsorted(recall, thresholds)  # first point with recall >= t
        envelope = torch.cat([envelope, envelope.new_zeros(1)])  # none such: precision 0
        return float(envelope[first].mean())
    # VOC2010 onwards: area under the envelope, with sentinels at recall 0 and 1 (a
    # precision of 0 beyond the last point). Steps of zero width add exactly 0.
    recall = torch.cat([recall.new_zeros(1), recall, recall.new_ones(1)])
    envelope = torch.cat([envelope, envelope.new_zeros(1)])
    return float(((recall[1:] - recall[:-1]) * envelope).sum())


def precision_recall_curves(det_boxes, det_labels, det_scores, true_boxes, true_labels,
                            true_difficulties, n_classes):
    """Per-class precision/recall curves, for plotting; arguments as for `calculate_mAP`.

    Returns {class: (recall, precision)}, two float64 numpy arrays with one point per
    detection of the class taken by descending score, leaving out those ignored for matching
    a difficult object; classes without non-difficult objects are left out.
    """
    curves = _class_curves(det_boxes, det_labels, det_scores, true_boxes, true_labels,
                           true_difficulties, n_classes)
    return {c: (recall.numpy(), precision.numpy()) for c, recall, precision in curves}


def mean_average_precision(curves, use_07_metric=True):
    """(aps, mean_ap) from `precision_recall_curves`' output, so that both metrics and the
    curves come from one matching pass."""
    aps = {c: _average_precision(torch.as_tensor(recall), torch.as_tensor(precision), use_07_metric)
           for c, (recall, precision) in curves.items()}
    mean_ap = sum(aps.values()) / len(aps) if aps else float("nan")
    return aps, mean_ap


def calculate_mAP(det_boxes, det_labels, det_scores, true_boxes, true_labels,
                  true_difficulties, n_classes, use_07_metric=True):
    """Mean average precision as the PASCAL VOC devkit computes it (IoU > 0.5, no +1).

    Every argument but n_classes is a list with one tensor per image: boxes (k, 4) as
    x1, y1, x2, y2 in one consistent unit, labels (k,) in 1..n_classes-1, scores (k,),
    difficulties (k,) bool or 0/1. use_07_metric: VOC2007 11-point AP, else the area under
    the precision envelope (VOC2010 onwards).
    Returns (aps, mean_ap): {class: AP} for the classes with at least one non-difficult
    object (the others are left out, having no AP), and the mean of those APs (nan if none).
    """
    curves = precision_recall_curves(det_boxes, det_labels, det_scores, true_boxes, true_labels,
                                     true_difficulties, n_classes)
    return mean_average_precision(curves, use_07_metric)


# --------------------------------------------------------------------------------------
# Detection evaluation: the COCO metrics, computed by the COCO API (faster-coco-eval).
# --------------------------------------------------------------------------------------

# What is reported, read from COCOeval's accumulated arrays as its summarize() reads them:
# name -> (precision or recall, IoU threshold (None: the mean over 0.50:0.05:0.95), area
# range index (all, small < 32^2, medium, large > 96^2 pixels), maxDets index (1, 10, 100)).
COCO_METRICS = {"AP": ("precision", None, 0, 2), "AP50": ("precision", 0.5, 0, 2),
                "AP75": ("precision", 0.75, 0, 2), "APs": ("precision", None, 1, 2),
                "APm": ("precision", None, 2, 2), "APl": ("precision", None, 3, 2),
                "AR1": ("recall", None, 0, 0), "AR10": ("recall", None, 0, 1),
                "AR100": ("recall", None, 0, 2)}


def coco_dataset(boxes, labels, scores, crowd, image_sizes, n_classes):
    """A COCO-format dict (images, annotations, categories) of per-image pixel boxes.

    boxes: per image (k, 4) x1, y1, x2, y2 pixels; labels (k,) in 1..n_classes-1; scores (k,)
    (detections) or None (ground truth); crowd: per image (k,) bool or None (detections);
    image_sizes: (width, height) per image. Images get ids 1..N in list order, categories
    ids 1..n_classes-1 (the labels). Areas are box areas: COCO's own ground truth gives mask
    areas, which only a segmentation has.
    """
    image_ids = _image_ids(labels) + 1
    xywh = _cat(boxes, 4).double()
    xywh[:, 2:] -= xywh[:, :2]
    # numpy's tolist: 5x faster than torch's for a million rows
    columns = [t.numpy().tolist() for t in (image_ids, _cat(labels).long(), xywh, xywh[:, 2] * xywh[:, 3])]
    if scores is None:
        extra, values = "iscrowd", _cat(crowd).long().numpy().tolist()
    else:
        extra, values = "score", _cat(scores).double().numpy().tolist()
    # Dicts are what the COCO API reads; one comprehension over columns builds a million in ~2 s.
    annotations = [{"id": i, "image_id": image, "category_id": label, "bbox": box, "area": area,
                    extra: value}
                   for i, (image, label, box, area, value) in enumerate(zip(*columns, values), start=1)]
    return {"images": [{"id": i, "width": int(w), "height": int(h)}
                       for i, (w, h) in enumerate(image_sizes, start=1)],
            "annotations": annotations,
            "categories": [{"id": c, "name": str(c)} for c in range(1, n_classes)]}


def coco_api_objects(ground_truth, detections, COCO):
    """COCO API objects from two coco_dataset dicts, for the `COCO` class of either library
    (built from the dicts: loadRes would add a polygon to each of a million detections)."""
    objects = []
    for dataset in (ground_truth, detections):
        api = COCO()
        api.dataset = dataset
        with contextlib.redirect_stdout(io.StringIO()):       # pycocotools prints progress
            api.createIndex()
        objects.append(api)
    return objects


def coco_summary(precision, recall, iou_thresholds, classes=slice(None)):
    """The COCO_METRICS of COCOeval's accumulated `precision` (T, R, K, A, M) and `recall`
    (T, K, A, M) arrays, for the category indices `classes` (default: all), as summarize()
    computes them: the mean over the entries that are not -1 (-1: no object to find), nan
    if there is none."""
    values = {}
    for name, (kind, iou, area, max_dets) in COCO_METRICS.items():
        array = (precision if kind == "precision" else recall)[..., area, max_dets]
        array = array[:, :, classes] if kind == "precision" else array[:, classes]
        if iou is not None:
            array = array[np.isclose(iou_thresholds, iou)]
        valid = array[array > -1]
        values[name] = float(valid.mean()) if valid.size else float("nan")
    return values


def coco_metrics(det_boxes, det_labels, det_scores, true_boxes, true_labels, true_crowd,
                 image_sizes, n_classes):
    """COCO detection metrics (COCO_METRICS), overall and per class, by faster-coco-eval.

    Per-image lists as for `calculate_mAP`, but every box in pixels of its image (the area
    ranges are in pixels); true_crowd: crowd regions (VOC's difficult objects), which a
    detection may overlap without counting as a false positive, and which no detection has
    to find. image_sizes: (width, height) per image.
    Returns (overall, per_class): {metric: value} and {class: {metric: value}} for classes
    1..n_classes-1, nan where there is nothing to find (no object, or none of that size).
    """
    from faster_coco_eval import COCO, COCOeval_faster
    truth = coco_dataset(true_boxes, true_labels, None, true_crowd, image_sizes, n_classes)
    found = coco_dataset(det_boxes, det_labels, det_scores, None, image_sizes, n_classes)
    found["images"], found["categories"] = truth["images"], truth["categories"]
    evaluator = COCOeval_faster(*coco_api_objects(truth, found, COCO), "bbox",
                                print_function=lambda *args: None,
                                separate_eval=True)   # the same results, 2-3x faster
    evaluator.evaluate()
    evaluator.accumulate()
    precision, recall = evaluator.eval["precision"], evaluator.eval["recall"]
    thresholds = evaluator.params.iouThrs
    per_class = {int(c): coco_summary(precision, recall, thresholds, [k])
                 for k, c in enumerate(evaluator.params.catIds)}
    return coco_summary(precision, recall, thresholds), per_class
