"""The default boxes ("priors") of each SSD model, as data, and the box coding against them.

    config = PRIOR_CONFIGS["ssd300"]              # the paper's VOC SSD300 (also "ssd512", ...)
    priors_cxcy = create_priors(config)          # (8732, 4) fractional centre-size boxes
    g = encode(boxes_cxcy, priors_cxcy)          # regression targets (the paper's eq. 2)
    boxes_cxcy = decode(g, priors_cxcy)

A checkpoint records its model's PriorConfig in its config (config["priors"], a plain dict),
so that eval.py, detect.py and export.py rebuild the same priors and input size.
"""
import math
from typing import NamedTuple, Optional

import torch

# Variances of the SSD offset encoding (Caffe's prior "variance" 0.1, 0.1, 0.2, 0.2, torchvision's
# BoxCoder weights 10, 10, 5, 5): the centre offsets are divided by 0.1 and the log size ratios
# by 0.2, which scales the regression targets to roughly unit variance.
CENTRE_VARIANCE = 0.1
SIZE_VARIANCE = 0.2


class PriorConfig(NamedTuple):
    """Where a model's priors lie. Each location of a map has a square prior of the map's min
    size, a square of sqrt(min * max), and for each ratio r of the map a prior of r and one of
    1/r (w = s*sqrt(r), h = s/sqrt(r)): 2 + 2 * len(ratios) boxes (n_boxes_per_location)."""
    image_size: int        # the network's input side, pixels
    maps: tuple            # side of each square prediction map, largest first
    min_sizes: tuple       # prior sizes per map, pixels of the input
    max_sizes: tuple
    aspect_ratios: tuple   # the extra ratios of each map
    # Pixels between neighbouring centres per map (Caffe's and torchvision's `steps`): centre i
    # at (i + 0.5) * step / image_size. None: image_size / map side exactly, (i + 0.5) / side.
    steps: Optional[tuple] = None
    # "none"; "sizes": widths and heights clamped to at most 1 (torchvision's clip=True); "all":
    # centres too clamped to [0, 1] (amdegroot's clamp of all four centre-size values).
    clip: str = "none"


PRIOR_CONFIGS = {
    # The paper's VOC SSD300, this project's default: the sizes of the Caffe model that reached
    # 77.2 mAP (s_k = 0.2 + 0.7 (k-1)/(m-1) and a special 0.1 for conv4_3, in whole pixels as
    # ssd_pascal.py rounds them). Centres (i + 0.5) / side, where Caffe steps by 8, 16, 32, 64,
    # 100, 300 pixels (at most 1.3% of the image apart, on conv4_3's 38x38). Not clipped: the
    # original author found unclipped priors slightly better (weiliu89/caffe #526).
    "ssd300": PriorConfig(300, (38, 19, 10, 5, 3, 1), (30, 60, 111, 162, 213, 264),
                          (60, 111, 162, 213, 264, 315), ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))),
    # Caffe's VOC SSD512 (ssd_pascal_512.py): min_ratio 15, max_ratio 90 of 512 pixels, 7% and 15%
    # for conv4_3; the extra 1x1 map conv12_2. 24,564 priors.
    "ssd512": PriorConfig(512, (64, 32, 16, 8, 4, 2, 1),
                          (35.84, 76.8, 153.6, 230.4, 307.2, 384.0, 460.8),
                          (76.8, 153.6, 230.4, 307.2, 384.0, 460.8, 537.6),
                          ((2,), (2, 3), (2, 3), (2, 3), (2, 3), (2,), (2,)),
                          steps=(8, 16, 32, 64, 128, 256, 512)),
    # torchvision's COCO SSD300 (ssd300_vgg16: DefaultBoxGenerator with scales 0.07, 0.15, 0.33,
    # 0.51, 0.69, 0.87, 1.05 of 300 pixels, steps 8 ... 300, clip=True), for its weights.
    "ssd300-coco": PriorConfig(300, (38, 19, 10, 5, 3, 1), (21, 45, 99, 153, 207, 261),
                               (45, 99, 153, 207, 261, 315), ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)),
                               steps=(8, 16, 32, 64, 100, 300), clip="sizes"),
    # amdegroot/ssd.pytorch's VOC SSD300 (data/config.py `voc`): the paper's sizes, Caffe's steps,
    # clip True, which clamps all four centre-size values: conv8_2's and conv9_2's last centres
    # (Caffe's steps put them at 1.013 and 1.067) move to the edge.
    "ssd300-amdegroot": PriorConfig(300, (38, 19, 10, 5, 3, 1), (30, 60, 111, 162, 213, 264),
                                    (60, 111, 162, 213, 264, 315),
                                    ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)),
                                    steps=(8, 16, 32, 64, 100, 300), clip="all"),
}


def prior_config(config):
    """The PriorConfig a checkpoint's config records (config["priors"], a dict), or the
    paper's SSD300 for checkpoints written before configurations were recorded."""
    saved = config.get("priors")
    if saved is None:
        return PRIOR_CONFIGS["ssd300"]
    try:
        return PriorConfig(**{key: _tuples(value) for key, value in saved.items()})
    except TypeError as e:
        raise ValueError(f"prior configuration {saved} is not one this repository writes ({e})") from None


def as_plain_dict(config):
    """A PriorConfig as plain lists and numbers, for a checkpoint's config."""
    return {key: _lists(value) for key, value in config._asdict().items()}


def _tuples(value):
    return tuple(map(_tuples, value)) if isinstance(value, (list, tuple)) else value


def _lists(value):
    return list(map(_lists, value)) if isinstance(value, (list, tuple)) else value


def n_boxes_per_location(ratios):
    return 2 + 2 * len(ratios)


def create_priors(config=PRIOR_CONFIGS["ssd300"]):
    """The priors of a PriorConfig in fractional centre-size form: (P, 4), P = 8732 for SSD300.

    Order: map by map; within a map row by row, column by column (the order of the head's
    permute(0, 2, 3, 1) flatten); within a location the boxes in PriorConfig's order.
    """
    priors = []
    steps = config.steps or [config.image_size / f for f in config.maps]
    for f, step, s_min, s_max, ratios in zip(config.maps, steps, config.min_sizes,
                                             config.max_sizes, config.aspect_ratios):
        s = s_min / config.image_size
        s_prime = math.sqrt(s_min * s_max) / config.image_size
        shapes = [(s, s), (s_prime, s_prime)]
        for r in ratios:
            shapes += [(s * math.sqrt(r), s / math.sqrt(r)), (s / math.sqrt(r), s * math.sqrt(r))]
        shapes = torch.tensor(shapes)                                 # B x 2
        if config.steps is None:
            centres = (torch.arange(f, dtype=torch.float32) + 0.5) / f
        else:
            centres = (torch.arange(f, dtype=torch.float32) + 0.5) * step / config.image_size
        if config.clip in ("sizes", "all"):
            shapes = shapes.clamp(max=1)
        if config.clip == "all":
            centres = centres.clamp(max=1)
        cy, cx = torch.meshgrid(centres, centres, indexing="ij")      # f x f each
        cxcy = torch.stack([cx, cy], dim=-1).reshape(-1, 1, 2).expand(-1, len(shapes), 2)
        wh = shapes.reshape(1, -1, 2).expand(f * f, -1, 2)
        priors.append(torch.cat([cxcy, wh], dim=-1).reshape(-1, 4))
    return torch.cat(priors)


def encode(cxcy, priors_cxcy):
    """Offsets of boxes from their priors (the regression targets of the paper's eq. 2).

    cxcy, priors_cxcy: (..., 4) centre-size boxes, broadcastable.
    g_cx = (cx - p_cx) / (p_w * 0.1),  g_w = log(w / p_w) / 0.2, and likewise for y, h.
    """
    g_cxcy = (cxcy[..., :2] - priors_cxcy[..., :2]) / (priors_cxcy[..., 2:] * CENTRE_VARIANCE)
    g_wh = torch.log(cxcy[..., 2:] / priors_cxcy[..., 2:]) / SIZE_VARIANCE
    return torch.cat([g_cxcy, g_wh], dim=-1)


def decode(g_cxcy, priors_cxcy):
    """Inverse of `encode`: predicted offsets (..., 4) -> centre-size boxes (..., 4).

    torchvision's BoxCoder also clamps the size offsets at log(1000/16) before exp; a trained
    model's offsets stay far below it, and the paper has no such clamp.
    """
    cxcy = g_cxcy[..., :2] * CENTRE_VARIANCE * priors_cxcy[..., 2:] + priors_cxcy[..., :2]
    wh = torch.exp(g_cxcy[..., 2:] * SIZE_VARIANCE) * priors_cxcy[..., 2:]
    return torch.cat([cxcy, wh], dim=-1)
