"""Import trained SSD300 weights from other projects as checkpoints of this repository.

    python convert_weights.py torchvision --out checkpoints/ssd300_coco.pt
    python convert_weights.py torchvision ssd300_vgg16_coco-b556d3b4.pth --out checkpoints/ssd300_coco.pt
    python convert_weights.py amdegroot ssd300_mAP_77.43_v2.pth --out checkpoints/ssd300_voc_amdegroot.pt

torchvision: the COCO-trained ssd300_vgg16 (SSD300_VGG16_Weights.COCO_V1, COCO AP 25.1), downloaded
and cached through torchvision's weights API, or read from a file of its state dict. amdegroot:
a state dict in the layout of amdegroot/ssd.pytorch (`vgg.N`, `extras.N`, `L2Norm.weight`,
`loc.N`, `conf.N`), e.g. its released VOC07+12 SSD300 (the project's links no longer work:
bring the file).

The checkpoint is an ordinary one of this repository (it loads with weights_only=True) that
records what the weights expect: their priors (torchvision's COCO scales and steps, or
amdegroot's Caffe steps and clipping: priors.PRIOR_CONFIGS), their input (preprocessing: the
normalisation, and how an image becomes 300x300: torchvision's tensor resize, or OpenCV's for
amdegroot's, as each project trained and measured them), and the class names (COCO's 80 at torchvision's 91 indices, or VOC's 20;
--classes for weights trained on other classes). eval.py (with --data-folder), detect.py and
export.py read all of it, and `train.py --init-from` fine-tunes from it (the class-score rows
of the class names both datasets share are kept).

Nothing is written unless the conversion succeeds; the file is written atomically.
"""
import argparse
import sys
from pathlib import Path
from typing import NamedTuple

import torch.nn as nn
import torchvision

from create_data_lists import VOC_CLASSES
from model import SSD
from priors import PRIOR_CONFIGS
from utils import HelpFormatter, atomic_torch_save, load_tensors, writable_folder


class Layout(NamedTuple):
    """Another project's SSD300-VGG16 state dict: its convolutions in the order of SSD's own
    (SSD.named_modules: VGG16 to conv7, the auxiliary convolutions, the localisation heads,
    the class-score heads), the conv4_3 L2 scale, and what its weights expect."""
    convs: list
    l2_scale: str
    priors: str              # a key of priors.PRIOR_CONFIGS
    preprocessing: dict      # mean and std of the normalisation, on 0-1 RGB values; resize
    classes: tuple           # default class names, for the default number of classes
    description: str


LAYOUTS = {
    # torchvision.models.detection.ssd300_vgg16: VGG16 `features` to conv4_3, then `extra.0`
    # holding pool4 ... conv5_3 (1, 3, 5) and fc6/fc7 as convolutions (7.1, 7.3), extra.1-4 the
    # auxiliary stages; its GeneralizedRCNNTransform normalises 0-1 RGB with this mean and a
    # std of 1/255 (Caffe's mean subtraction on 0-255 values), then resizes the float tensor
    # (datasets.resize_as_torchvision); it has COCO's 91 indices.
    "torchvision": Layout(
        [f"backbone.features.{i}" for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21)]
        + [f"backbone.extra.0.{i}" for i in ("1", "3", "5", "7.1", "7.3")]
        + [f"backbone.extra.{s}.{i}" for s in range(1, 5) for i in (0, 2)]
        + [f"head.regression_head.module_list.{k}" for k in range(6)]
        + [f"head.classification_head.module_list.{k}" for k in range(6)],
        "backbone.scale_weight", "ssd300-coco",
        {"mean": [0.48235, 0.45882, 0.40784], "std": [1 / 255] * 3, "resize": "torchvision"},
        tuple(torchvision.models.detection.SSD300_VGG16_Weights.COCO_V1.meta["categories"][1:]),
        "torchvision ssd300_vgg16 (COCO_V1)"),
    # amdegroot/ssd.pytorch (ssd.py): `vgg` a flat list of VGG16's layers with pool5, conv6 (31)
    # and conv7 (33); `extras` the 1x1/3x3 pairs; one `loc` and one `conf` convolution per map.
    # Its heads flatten location-major with the boxes of a location in our order (min size,
    # sqrt(min * max), then each ratio and its inverse: layers/functions/prior_box.py), so they
    # load as they are. Its BaseTransform resizes the 8-bit image with cv2.resize and subtracts
    # Caffe's BGR mean (104, 117, 123) from the 0-255 pixels, which it then feeds as RGB
    # (data/voc0712.py); VOC's 20 classes in alphabetical order.
    "amdegroot": Layout(
        [f"vgg.{i}" for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28, 31, 33)]
        + [f"extras.{i}" for i in range(8)]
        + [f"loc.{k}" for k in range(6)] + [f"conf.{k}" for k in range(6)],
        "L2Norm.weight", "ssd300-amdegroot",
        {"mean": [123 / 255, 117 / 255, 104 / 255], "std": [1 / 255] * 3, "resize": "opencv"},
        VOC_CLASSES, "amdegroot/ssd.pytorch SSD300"),
}
# torchvision's COCO categories leave indices unused ("N/A"); they keep their score rows.
UNUSED = ("N/A",)


def label_map_of(classes):
    """Class names for indices 1, 2, ... -> label map, with "background": 0; names in UNUSED
    keep their index out of the map (its score row stays in the network)."""
    label_map = {"background": 0}
    for index, name in enumerate(classes, start=1):
        if name not in UNUSED:
            if name in label_map:
                raise ValueError(f"class name {name!r} is given twice")
            label_map[name] = index
    return label_map


def convert(state, layout, classes=None):
    """Another project's state dict -> a checkpoint of this repository (a dict: model,
    config), in the layout `layout` (a Layout); classes: names of class indices 1, 2, ...
    (default: the layout's own, which must then match the number of classes). ValueError,
    saying what, where the state dict is not of that layout."""
    if not isinstance(state, dict):
        raise ValueError(f"it holds a {type(state).__name__}, not a state dict")
    state = {key.removeprefix("module."): value for key, value in state.items()}  # DataParallel's
    head = layout.convs[-6] + ".weight"
    if head not in state:
        raise ValueError(f"it has no {head}: not a state dict of {layout.description}'s layout")
    n_classes = state[head].shape[0] // 4           # conv4_3's map has 4 boxes per location
    classes = layout.classes if classes is None else tuple(classes)
    if len(classes) != n_classes - 1:
        raise ValueError(f"its heads score {n_classes - 1} classes besides the background, "
                         f"but {len(classes)} class names are given (--classes)")
    net = SSD(n_classes, priors=PRIOR_CONFIGS[layout.priors], preprocessing=layout.preprocessing)
    ours = [name for name, module in net.named_modules() if isinstance(module, nn.Conv2d)]
    names = {f"{o}.{p}": f"{t}.{p}" for o, t in zip(ours, layout.convs) for p in ("weight", "bias")}
    names["l2_norm.weight"] = layout.l2_scale
    missing = [theirs for theirs in names.values() if theirs not in state]
    unknown = sorted(set(state) - set(names.values()))
    if missing or unknown:
        raise ValueError(f"not a state dict of {layout.description}'s layout: "
                         + "; ".join(f"{what} {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                                     for what, keys in (("no", missing), ("unexpected", unknown)) if keys))
    try:
        net.load_state_dict({ours: state[theirs] for ours, theirs in names.items()})
    except RuntimeError as e:
        raise ValueError(f"its layers do not fit an SSD300-VGG16: {str(e).splitlines()[-1].strip()}") from None
    config = dict(net.config, label_map=label_map_of(classes), converted_from=layout.description)
    return dict(model=net.state_dict(), config=config, iteration=None)


def read_state_dict(source, weights):
    """The state dict in the file `source`, or (source None) torchvision's `weights`, downloaded
    and cached by torchvision; an OSError with one line saying what failed."""
    if source is not None:
        return load_tensors(source)                 # a ValueError saying why, for a bad file
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OSError(f"could not download {weights.url} ({reason}); download it elsewhere and "
                      "pass the file: convert_weights.py torchvision FILE --out ...") from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("source", choices=sorted(LAYOUTS), help="whose weights and layout")
    p.add_argument("weights", nargs="?",
                   help="a file of their state dict (torchvision: default, its COCO weights, "
                        "downloaded)")
    p.add_argument("--out", required=True, help="checkpoint to write")
    p.add_argument("--classes", nargs="+", metavar="NAME",
                   help="names of the classes 1, 2, ... (default: COCO's for torchvision, VOC's "
                        "for amdegroot)")
    args = p.parse_args(argv)
    if args.source == "amdegroot" and args.weights is None:
        p.error("amdegroot needs the weights file (its download links are gone)")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        writable_folder(Path(args.out).parent)
        weights = torchvision.models.detection.SSD300_VGG16_Weights.COCO_V1
        state = read_state_dict(args.weights, weights)
        checkpoint = convert(state, LAYOUTS[args.source], args.classes)
        atomic_torch_save(checkpoint, args.out)
    except ValueError as e:                      # weights that are not of the layout, or not weights
        print(f"convert_weights.py: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:                         # offline, a read-only or full disk
        print(f"convert_weights.py: error: {e}", file=sys.stderr)
        return 1
    config = checkpoint["config"]
    print(f"wrote {args.out}: {config['converted_from']}, {len(config['label_map']) - 1} classes, "
          f"input {config['priors']['image_size']}x{config['priors']['image_size']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
