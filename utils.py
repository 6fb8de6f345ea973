"""Box maths and small helpers shared by every script.

Boxes come in two forms:
  * corners  (x1, y1, x2, y2), "xy"   -- what datasets, NMS and IoU use;
  * centre-size (cx, cy, w, h), "cxcy" -- what the priors and the offsets use.
Both are fractional (0..1 of the image side) inside the model. torchvision.ops already
does IoU and the corner <-> centre conversion, so we call it rather than write it again.
"""
import os
import tempfile

import torch
from torchvision.ops import box_convert

# Variances of the SSD offset encoding (Caffe's prior "variance" 0.1, 0.1, 0.2, 0.2): the
# centre offsets are divided by 0.1 and the log size ratios by 0.2, which scales the
# regression targets to roughly unit variance.
CENTRE_VARIANCE = 0.1
SIZE_VARIANCE = 0.2


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


def pick_device(name="auto"):
    """'auto' -> cuda, then mps, then cpu; anything else is passed to torch.device."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def atomic_torch_save(obj, path):
    """torch.save to a temporary file beside `path`, then rename it over `path`.

    A crash or a full disk while writing leaves the previous file untouched.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise OSError(e.errno, f"could not save {path}: {e.strerror or e}; "
                                   f"the previous file, if any, is unchanged") from e
        raise
