"""Box maths, the decoding settings every script shares, and small helpers: argument checks,
the precision choice, atomic writes. (The priors and the box coding against them: priors.py.)

Boxes come in two forms:
  * corners  (x1, y1, x2, y2), "xy"   -- what datasets, NMS and IoU use;
  * centre-size (cx, cy, w, h), "cxcy" -- what the priors and the offsets use.
Both are fractional (0..1 of the image side) inside the model. torchvision.ops already
does IoU and the corner <-> centre conversion, so we call it rather than write it again.
"""
import argparse
import contextlib
import errno
import json
import math
import os
import stat
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
import torchvision
from torchvision.ops import box_convert


class Decoding(NamedTuple):
    """How predictions become detections (see detect_objects)."""
    min_score: float         # class score threshold
    max_overlap: float       # NMS IoU threshold, per class
    top_k: int               # detections kept per image
    per_class_top_k: int = 400   # candidates per class before NMS


# The paper's evaluation settings (Caffe's ssd_pascal.py test: confidence_threshold 0.01,
# nms_threshold 0.45, top_k 400, keep_top_k 200): the ones VOC mAP is reported with, and what
# export.py bakes into an ONNX model by default.
EVAL_DECODING = Decoding(0.01, 0.45, 200)
# detect.py's pictures: fewer, surer boxes; the same NMS, so that a checkpoint and its ONNX
# export draw the same boxes by default.
DRAW_DECODING = EVAL_DECODING._replace(min_score=0.2)


def xy_to_cxcy(xy):
    """(..., 4) corners -> (..., 4) centre-size."""
    return box_convert(xy, in_fmt="xyxy", out_fmt="cxcywh")


def cxcy_to_xy(cxcy):
    """(..., 4) centre-size -> (..., 4) corners."""
    return box_convert(cxcy, in_fmt="cxcywh", out_fmt="xyxy")


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


# Group size from which nms_per_group beats greedy_nms on a CPU: its Python call per group
# (about 30 us) costs more than greedy_nms's k x k overlaps for small groups (a trained
# model's few candidates per class), far less for large ones (an untrained model's 400:
# 7x faster). 160 groups of decoded boxes, one thread, AVX-512 and AVX2 kernels alike:
# equal at about 64.
NMS_PER_GROUP_MIN_SIZE = 64


def nms(boxes, valid, threshold):
    """greedy_nms's result (same arguments and return) by the faster of two exact methods on
    this device and group size: nms_per_group for large groups on a CPU, else greedy_nms
    (on a GPU it does all groups in a few batched products, where one call per group would
    wait on each)."""
    if boxes.device.type == "cpu" and valid.size(1) >= NMS_PER_GROUP_MIN_SIZE:
        return nms_per_group(boxes, valid, threshold)
    return greedy_nms(boxes, valid, threshold)


def nms_per_group(boxes, valid, threshold):
    """greedy_nms's result (same arguments and return), by torchvision's compiled nms on
    one group at a time: far less work than greedy_nms's full k x k overlaps when groups are
    large, for a Python call per group.

    torchvision.ops.nms applies the same rule with the same IoU arithmetic, so the result is
    identical. It orders boxes by score itself; descending ranks in place of the scores keep
    each group's given order, ties included. (batched_nms would take all groups in one call
    below 1000 boxes, but by offsetting each group's coordinates, which rounds them
    differently and can change a decision at the threshold.)
    """
    keep = torch.zeros_like(valid)
    if valid.numel() == 0:
        return keep
    group, index = valid.nonzero(as_tuple=True)                 # valid boxes, group by group
    rank = (valid.size(1) - index).to(boxes.dtype)
    position = torch.arange(len(index), device=index.device)
    sizes = valid.sum(dim=1).tolist()
    groups = zip(boxes[group, index].split(sizes), rank.split(sizes), position.split(sizes))
    kept = torch.cat([p[torchvision.ops.nms(b, r, threshold)] for b, r, p in groups])
    keep[group[kept], index[kept]] = True
    return keep


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
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not allowed: must be a finite number")
        return value
    return parse


def default_workers(most=4):
    """The default number of DataLoader processes: `most`, or as many as there are CPUs this
    process may use if fewer (more only take turns on them, and PyTorch warns)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:                                   # macOS, Windows
        cpus = os.cpu_count() or 1
    return min(most, cpus)


def pick_device(name="auto"):
    """'auto' -> cuda, then mps, then cpu; anything else is passed to torch.device. A
    ValueError in one line for a name torch does not know or a device this machine lacks
    (where PyTorch would fail later, in many lines: "Found no NVIDIA driver")."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name (auto, cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA device that PyTorch can use "
                         "(no NVIDIA driver, or a PyTorch built without CUDA); use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s), numbered from 0")
    if device.type == "mps" and not mps:
        raise ValueError(f"--device {name}: this machine has no Apple GPU that PyTorch can use")
    return device


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
    while the old one is still there; a full disk is reported as such."""
    with atomic_write(path, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:
            # torch's zip writer reports a failed write as "unexpected pos ..."; the OSError of
            # the write itself (No space left on device) is the exception it was handling.
            cause = e.__context__
            if isinstance(cause, OSError) and cause.errno is not None:
                raise cause from None
            raise OSError(f"torch.save failed ({str(e).splitlines()[0]})") from e


def load_tensors(path, mmap=False):
    """torch.load of a file that must hold only tensors and plain Python values
    (weights_only=True). A ValueError in one line for anything else, saying why: a file
    that names Python code to run is refused for that reason (torch's own message would
    advise loading it with weights_only=False, which runs that code). An OSError (a missing
    or unreadable file: not the file's fault) as torch raises it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except OSError:
        raise
    except Exception as error:                 # torch.load's many ways to fail on a bad file
        raise ValueError(f"{path}: {load_failure(error)}") from None


# Lines of torch.load's weights_only refusal that advise loading the file anyway.
_UNSAFE_ADVICE = ("weights_only", "torch.load", "safe_globals", "add_safe_globals", "documentation",
                  "trusted source", "arbitrary code")


def load_failure(error):
    """What is wrong with a file torch.load refused, in one line, never its advice to load
    it with weights_only=False."""
    text = str(error)
    if "WeightsUnpickler error:" in text:                     # torch < 2.7 put the reason here
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reasons = [line for line in lines if not any(words in line for words in _UNSAFE_ADVICE)]
    if "GLOBAL" in text or "global" in " ".join(reasons).lower():
        reason = next((line for line in reasons if "GLOBAL" in line or "global" in line.lower()),
                      "it names a Python object to create")
        return ("refused: it is a pickle that would run Python code, not only tensors and plain "
                f"values ({reason.rstrip('.')})")
    if reasons:
        return f"not a PyTorch file of tensors ({reasons[0]})"
    return f"not a PyTorch file of tensors ({type(error).__name__})"


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
