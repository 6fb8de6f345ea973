"""SSD300 and SSD512 (Liu et al., "SSD: Single Shot MultiBox Detector", ECCV 2016): the network,
the MultiBox loss and the decoding of predictions into detections (the priors: priors.py).

    model = SSD(n_classes=21)                    # 20 VOC classes + background (class 0); SSD300
    locs, scores = model(images)                 # N x 8732 x 4, N x 8732 x 21
    loss, loc_loss, conf_loss = MultiBoxLoss(model.priors_cxcy)(locs, scores, boxes, labels)
    boxes, labels, scores = model.detect_objects(locs, scores)   # EVAL_DECODING's settings
"""
import math
import os
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.resnet import BasicBlock
from torchvision.ops import FrozenBatchNorm2d, box_iou

from priors import PRIOR_CONFIGS, as_plain_dict, create_priors, decode, encode, n_boxes_per_location, \
    prior_config
from utils import EVAL_DECODING, cxcy_to_xy, load_tensors, nms, xy_to_cxcy

# The auxiliary convolutions of each model after conv7: per stage (name, 1x1 channels, 3x3 (or
# 4x4) channels, kernel, stride, padding). Each stage's second convolution gives a prediction
# map: SSD300 10x10, 5x5, 3x3, 1x1 from conv7's 19x19; SSD512 (Caffe's ssd_pascal_512.py, whose
# conv6_x ... conv10_x these are) 16x16, 8x8, 4x4, 2x2 and, through conv12_2's 4x4 kernel, 1x1
# from 32x32. The model's input size and priors come from PRIOR_CONFIGS[name].
AUX_STAGES = {
    "ssd300": (("8", 256, 512, 3, 2, 1), ("9", 128, 256, 3, 2, 1),
               ("10", 128, 256, 3, 1, 0), ("11", 128, 256, 3, 1, 0)),
    "ssd512": (("8", 256, 512, 3, 2, 1), ("9", 128, 256, 3, 2, 1), ("10", 128, 256, 3, 2, 1),
               ("11", 128, 256, 3, 2, 1), ("12", 128, 256, 4, 1, 1)),
}
MODELS = tuple(AUX_STAGES)

# What SSD.freeze can keep fixed: nothing, or the base up to and including conv1_x / conv2_x.
FREEZE_CHOICES = ("none", "conv1", "conv2")

# VGG16 convolutions, block by block (torchvision's `features` holds them in this order).
VGG16_BLOCKS = [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]


# ----------------------------------------------------------------------------------------
# Base networks
# ----------------------------------------------------------------------------------------

def scaled(channels, width):
    """Channel count under a width multiplier (used by the small CPU presets)."""
    return max(4, int(round(channels * width)))


class L2Norm(nn.Module):
    """conv4_3's features have a larger scale than the deeper ones, so the paper L2-normalises
    each location's feature vector and multiplies by a learned per-channel scale (init 20)."""

    def __init__(self, channels, scale=20.0, eps=1e-10):
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), scale))
        self.eps = eps

    def forward(self, x):
        # In float32 even under mixed precision: the sum of squares overflows fp16.
        x32 = x.float()
        norm = x32.pow(2).sum(dim=1, keepdim=True).sqrt() + self.eps
        return (x32 / norm * self.weight.float().view(1, -1, 1, 1)).to(x.dtype)


class VGGBase(nn.Module):
    """VGG16 cut at conv5_3, with pool5 as 3x3/s1 and fc6/fc7 turned into convolutions.

    Returns the conv4_3 (38x38) and conv7 (19x19) feature maps for a 300x300 input.
    batch_norm: BatchNorm2d after every convolution from conv2_1 on. Not the paper's base: it
    serves training from scratch, which it makes several times faster (Zhu et al.,
    "ScratchDet", CVPR 2019; on the shapes data, half the images for the same mAP). Not
    after conv1_x: at the toy preset's 8 channels and 300x300, PyTorch's channels_last batch
    norm backward on a CPU is 5x slower than NCHW, and those two layers cost a quarter of
    the training step. ImageNet VGG16 weights are for the base without it.
    """

    # Parameter names of the first stages, for SSD.freeze.
    FIRST_STAGES = {"conv1": ("to_conv4_3.conv1_",), "conv2": ("to_conv4_3.conv2_", "to_conv4_3.bn2_")}

    def __init__(self, width=1.0, batch_norm=False):
        super().__init__()
        self.out_channels = (scaled(512, width), scaled(1024, width))
        layers, in_c = OrderedDict(), 3
        for b, block in enumerate(VGG16_BLOCKS, start=1):
            if b > 1:
                # pool3 in ceil mode turns 75x75 into 38x38, as in the original model.
                layers[f"pool{b - 1}"] = nn.MaxPool2d(2, 2, ceil_mode=(b == 4))
            for i, c in enumerate(block, start=1):
                layers[f"conv{b}_{i}"] = nn.Conv2d(in_c, scaled(c, width), 3, padding=1)
                if batch_norm and b > 1:
                    layers[f"bn{b}_{i}"] = nn.BatchNorm2d(scaled(c, width))
                layers[f"relu{b}_{i}"] = nn.ReLU(inplace=True)
                in_c = scaled(c, width)
            if b == 4:
                self.to_conv4_3 = nn.Sequential(layers)   # conv1_1 ... relu4_3
                layers = OrderedDict()
        layers["pool5"] = nn.MaxPool2d(3, stride=1, padding=1)
        # conv6 is atrous: fc6 subsampled to 3x3 with dilation 6 keeps its receptive field.
        layers["conv6"] = nn.Conv2d(in_c, self.out_channels[1], 3, padding=6, dilation=6)
        if batch_norm:
            layers["bn6"] = nn.BatchNorm2d(self.out_channels[1])
        layers["relu6"] = nn.ReLU(inplace=True)
        layers["conv7"] = nn.Conv2d(self.out_channels[1], self.out_channels[1], 1)
        if batch_norm:
            layers["bn7"] = nn.BatchNorm2d(self.out_channels[1])
        layers["relu7"] = nn.ReLU(inplace=True)
        self.to_conv7 = nn.Sequential(layers)              # pool4 ... relu7
        init_convs(self, kaiming=True)                     # as torchvision's VGG from scratch

    def forward(self, x):
        conv4_3 = self.to_conv4_3(x)          # N x 512 x 38 x 38
        conv7 = self.to_conv7(conv4_3)        # N x 1024 x 19 x 19
        return conv4_3, conv7

    def load_pretrained(self, source=True):
        """Copy ImageNet VGG16 weights in, with fc6/fc7 decimated into conv6/conv7.

        source: True for torchvision's IMAGENET1K_V1 weights (downloaded and cached by
        torchvision on first use), or the path of a saved torchvision VGG16 state dict.
        """
        load_imagenet_weights(self, torchvision.models.VGG16_Weights.IMAGENET1K_V1, source,
                              vgg16_to_ssd_base)


def load_imagenet_weights(base, weights, source, convert):
    """Copy ImageNet weights into `base`: torchvision's `weights` (source True, downloaded and
    cached by torchvision on first use) or a saved state dict (source a path), mapped onto
    the base's names by convert(their state dict, base's state dict)."""
    local = isinstance(source, (str, os.PathLike))
    where = source if local else weights.url
    try:
        state = load_tensors(source) if local else weights.get_state_dict(progress=True, check_hash=True)
    except Exception as e:
        raise OSError(
            f"Could not load ImageNet weights from {where} ({type(e).__name__}: {e}).\n"
            "Either connect to the internet once (torchvision caches the file under "
            f"~/.cache/torch/hub/checkpoints), or download {weights.url.rsplit('/', 1)[-1]} "
            "elsewhere and pass its path (--pretrained PATH), or train from scratch with "
            "--no-pretrained (pretrained=False).") from e
    try:
        base.load_state_dict(convert(state, base.state_dict()))
    except (KeyError, ValueError) as e:
        raise ValueError(f"{where} does not hold the weights this base needs: {e}") from e


def decimate(tensor, steps):
    """Keep every steps[d]-th element along each dimension d (None = keep all)."""
    for d, step in enumerate(steps):
        if step is not None:
            tensor = tensor.index_select(d, torch.arange(0, tensor.size(d), step))
    return tensor


def vgg16_to_ssd_base(vgg, base_state):
    """Map a torchvision VGG16 state dict onto VGGBase's parameter names.

    The 13 convolutions map one to one. fc6 (4096 x 25088 = 4096 x 512x7x7) becomes conv6
    (1024 x 512 x 3x3) by keeping every 4th output unit and every 3rd position of the 7x7
    kernel; fc7 (4096 x 4096) becomes conv7 (1024 x 1024 x 1x1) by keeping every 4th output
    and input unit, as the paper describes.
    """
    ours = [k for k in base_state
            if k.endswith(".weight") and not k.endswith(("conv6.weight", "conv7.weight"))]
    theirs = [k for k in vgg if k.startswith("features.") and k.endswith(".weight")]
    if len(ours) != len(theirs) or len(theirs) != 13:
        raise ValueError(f"expected 13 VGG16 convolutions, found {len(theirs)}")
    new = {}
    for o, t in zip(ours, theirs):
        if vgg[t].shape != base_state[o].shape:
            raise ValueError(f"{t} has shape {tuple(vgg[t].shape)}, {o} needs "
                             f"{tuple(base_state[o].shape)} (pretrained weights need width 1)")
        new[o], new[o[:-6] + "bias"] = vgg[t], vgg[t[:-6] + "bias"]
    fc6_w = vgg["classifier.0.weight"].view(4096, 512, 7, 7)
    new["to_conv7.conv6.weight"] = decimate(fc6_w, [4, None, 3, 3])        # 1024 x 512 x 3 x 3
    new["to_conv7.conv6.bias"] = decimate(vgg["classifier.0.bias"], [4])
    fc7_w = vgg["classifier.3.weight"].view(4096, 4096, 1, 1)
    new["to_conv7.conv7.weight"] = decimate(fc7_w, [4, 4, None, None])    # 1024 x 1024 x 1 x 1
    new["to_conv7.conv7.bias"] = decimate(vgg["classifier.3.bias"], [4])
    return new


class ResNet34Base(nn.Module):
    """ResNet-34 cut after conv4_x (layer3), as in MLPerf's SSD-ResNet34.

    torchvision's BasicBlocks, named as in torchvision's resnet34 so that its ImageNet state
    dict loads by name. layer3 runs at stride 1 (torchvision: 2), so its output stays at 38x38
    for a 300x300 input; a 1x1 and a 3x3 stride-2 convolution then give the 19x19 map.
    width scales the channels as for VGG16 (the CPU presets); ImageNet weights need width 1.
    frozen_bn: torchvision's FrozenBatchNorm2d (ImageNet statistics and affine parameters kept
    fixed) instead of trained BatchNorm2d.
    """

    # (name, channels, blocks, stride); layer4 and the classifier are not used.
    STAGES = [("layer1", 64, 3, 1), ("layer2", 128, 4, 2), ("layer3", 256, 6, 1)]
    # Parameter names of the first stages, for SSD.freeze; in the ResNet paper's names,
    # conv2_x is torchvision's layer1.
    FIRST_STAGES = {"conv1": ("to_conv4.conv1.", "to_conv4.bn1."), "conv2": ("to_conv4.layer1.",)}

    def __init__(self, width=1.0, frozen_bn=False):
        super().__init__()
        norm = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
        c = scaled(64, width)
        layers = OrderedDict(conv1=nn.Conv2d(3, c, 7, stride=2, padding=3, bias=False),
                             bn1=norm(c), relu=nn.ReLU(inplace=True),
                             maxpool=nn.MaxPool2d(3, stride=2, padding=1))
        for name, channels, blocks, stride in self.STAGES:
            out = scaled(channels, width)
            downsample = None
            if stride != 1 or c != out:
                downsample = nn.Sequential(nn.Conv2d(c, out, 1, stride=stride, bias=False), norm(out))
            stage = [BasicBlock(c, out, stride, downsample, norm_layer=norm)]
            stage += [BasicBlock(out, out, norm_layer=norm) for _ in range(blocks - 1)]
            layers[name] = nn.Sequential(*stage)
            c = out
        self.to_conv4 = nn.Sequential(layers)      # conv1 ... layer3 (conv4_x)
        self.out_channels = (c, scaled(512, width))
        self.to_19 = nn.Sequential(
            nn.Conv2d(c, c, 1), nn.ReLU(inplace=True),
            nn.Conv2d(c, self.out_channels[1], 3, stride=2, padding=1), nn.ReLU(inplace=True))
        init_convs(self.to_conv4, kaiming=True)        # as torchvision's ResNet from scratch
        init_convs(self.to_19)

    def forward(self, x):
        conv4 = self.to_conv4(x)               # N x 256 x 38 x 38
        return conv4, self.to_19(conv4)        # and N x 512 x 19 x 19

    def load_pretrained(self, source=True):
        """Copy ImageNet ResNet-34 weights (conv1 .. layer3) in; `source` as for VGGBase."""
        load_imagenet_weights(self, torchvision.models.ResNet34_Weights.IMAGENET1K_V1, source,
                              resnet34_to_ssd_base)


def resnet34_to_ssd_base(resnet, base_state):
    """Map a torchvision ResNet-34 state dict onto ResNet34Base's names (to_conv4.<its name>).

    The layers after layer3 keep their values from base_state; so does BatchNorm2d's
    num_batches_tracked where the file has none.
    """
    new = dict(base_state)
    for key, value in base_state.items():
        if not key.startswith("to_conv4."):
            continue
        theirs = key[len("to_conv4."):]
        if theirs not in resnet:
            if key.endswith("num_batches_tracked"):
                continue
            raise ValueError(f"the ResNet-34 weights have no {theirs}")
        if resnet[theirs].shape != value.shape:
            raise ValueError(f"{theirs} has shape {tuple(resnet[theirs].shape)}, {key} needs "
                             f"{tuple(value.shape)} (pretrained weights need width 1)")
        new[key] = resnet[theirs]
    return new


# ----------------------------------------------------------------------------------------
# Auxiliary and prediction convolutions
# ----------------------------------------------------------------------------------------

class AuxiliaryConvolutions(nn.Module):
    """conv8_1 ... conv11_2 (SSD512: ... conv12_2), a 1x1 then a 3x3 (4x4) per stage: the
    smaller prediction maps (AUX_STAGES)."""

    def __init__(self, in_channels, width=1.0, stages=AUX_STAGES["ssd300"]):
        super().__init__()
        layers, c = OrderedDict(), in_channels
        self.out_channels = []
        for name, mid, out, kernel, stride, pad in stages:
            mid, out = scaled(mid, width), scaled(out, width)
            layers[f"conv{name}_1"] = nn.Conv2d(c, mid, 1)
            layers[f"conv{name}_2"] = nn.Conv2d(mid, out, kernel, stride=stride, padding=pad)
            self.out_channels.append(out)
            c = out
        self.convs = nn.ModuleDict(layers)
        init_convs(self)

    def forward(self, conv7):
        features, x = [], conv7
        for name, conv in self.convs.items():
            x = F.relu(conv(x))
            if name.endswith("_2"):
                features.append(x)
        return features       # SSD300: conv8_2 (10x10), conv9_2 (5x5), conv10_2 (3x3), conv11_2 (1x1)


def init_convs(module, kaiming=False):
    """Initialise every convolution of `module` from scratch, biases at 0: Xavier uniform
    (the released SSD's new layers) or He normal over fan-out (torchvision's VGG and ResNet)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            if kaiming:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def flatten_predictions(x, per_box):
    """N x (B * per_box) x H x W head output -> N x (H * W * B) x per_box.

    Location-major: the same order as `create_priors`.
    """
    n = x.size(0)
    return x.permute(0, 2, 3, 1).reshape(n, -1, per_box)


class PredictionConvolutions(nn.Module):
    """A 3x3 convolution per map for the offsets (4 per prior) and one for the class scores."""

    def __init__(self, in_channels, n_classes, aspect_ratios):
        super().__init__()
        self.n_classes = n_classes
        boxes = [n_boxes_per_location(ratios) for ratios in aspect_ratios]
        self.loc = nn.ModuleList(nn.Conv2d(c, b * 4, 3, padding=1)
                                 for c, b in zip(in_channels, boxes))
        self.cl = nn.ModuleList(nn.Conv2d(c, b * n_classes, 3, padding=1)
                                for c, b in zip(in_channels, boxes))
        init_convs(self)

    def forward(self, features):
        locs = [flatten_predictions(conv(f), 4) for conv, f in zip(self.loc, features)]
        scores = [flatten_predictions(conv(f), self.n_classes) for conv, f in zip(self.cl, features)]
        return torch.cat(locs, dim=1), torch.cat(scores, dim=1)


# ----------------------------------------------------------------------------------------
# SSD
# ----------------------------------------------------------------------------------------

class SSD(nn.Module):
    """SSD300 or SSD512 (`model`) with a VGG16 (the paper's) or ResNet-34 base.

    priors: the PriorConfig of the default boxes (default: PRIOR_CONFIGS[model]); it fixes
    the input size. Other configurations serve imported weights (convert_weights.py), as does
    preprocessing: the input the weights expect, {"mean": [r, g, b], "std": [r, g, b]} on 0-1
    RGB values, and "resize" (datasets.RESIZE_METHODS; none: this repository's); None for
    ImageNet's (datasets.model_input reads it from `config`).
    n_classes counts the background as class 0. width scales every channel count (1.0 is the
    paper's; the CPU presets use less). pretrained: False, True (torchvision's ImageNet
    weights) or the path of a saved torchvision VGG16 / ResNet-34 state dict.
    base_bn, ResNet-34: "frozen" keeps the base's batch-norm statistics and affine
    parameters fixed, "train" learns them; None picks "frozen" for ImageNet weights (their
    statistics are good, and batch 32 split over GPUs gives too few images per GPU for
    reliable batch statistics, as in torchvision's detection models) and "train" from
    scratch (frozen initial statistics would normalise nothing).
    base_bn, VGG16: None is the paper's base, without batch norm; "train" adds trained batch
    norm after its convolutions from conv2_1 on, for training from scratch (the toy preset).
    """

    def __init__(self, n_classes, backbone="vgg16", pretrained=False, width=1.0, base_bn=None,
                 model="ssd300", priors=None, preprocessing=None):
        super().__init__()
        if model not in AUX_STAGES:
            raise ValueError(f"unknown model {model!r}: use one of {', '.join(MODELS)}")
        priors = PRIOR_CONFIGS[model] if priors is None else priors
        if len(priors.maps) != 2 + len(AUX_STAGES[model]):
            raise ValueError(f"{model} predicts from {2 + len(AUX_STAGES[model])} maps; the "
                             f"prior configuration has {len(priors.maps)}")
        if pretrained and width != 1.0:
            raise ValueError("pretrained ImageNet weights need width=1.0")
        if backbone == "vgg16":
            if base_bn not in (None, "train"):
                raise ValueError(f"base_bn {base_bn!r}: VGG16 takes None (the paper's base, no "
                                 "batch norm) or 'train' (batch norm, for training from scratch)")
            if base_bn and pretrained:
                raise ValueError("the ImageNet VGG16 weights are for the base without batch norm: "
                                 "drop --base-bn, or train from scratch")
            self.base = VGGBase(width, batch_norm=base_bn == "train")
            # Only conv4_3 is rescaled: its features are larger than the deeper maps'.
            self.l2_norm = L2Norm(self.base.out_channels[0])
        elif backbone == "resnet34":
            base_bn = base_bn or ("frozen" if pretrained else "train")
            if base_bn not in ("frozen", "train"):
                raise ValueError(f"unknown base_bn {base_bn!r}: use 'frozen' or 'train'")
            self.base = ResNet34Base(width, frozen_bn=base_bn == "frozen")
            # No L2Norm: batch norm already keeps conv4_x on the scale of the deeper maps (MLPerf).
            self.l2_norm = nn.Identity()
        else:
            raise ValueError(f"unknown backbone {backbone!r}: use 'vgg16' or 'resnet34'")
        if pretrained:
            self.base.load_pretrained(pretrained)
        self.config = dict(n_classes=n_classes, backbone=backbone, width=width, base_bn=base_bn,
                           model=model, priors=as_plain_dict(priors), preprocessing=preprocessing)
        self.image_size = priors.image_size
        self.aux_convs = AuxiliaryConvolutions(self.base.out_channels[1], width, AUX_STAGES[model])
        self.pred_convs = PredictionConvolutions(
            list(self.base.out_channels) + self.aux_convs.out_channels, n_classes, priors.aspect_ratios)
        self.register_buffer("priors_cxcy", create_priors(priors), persistent=False)

    def freeze(self, upto):
        """Stop training the base's first stages: "conv1" (conv1_x), "conv2" (conv1_x and
        conv2_x) or "none"; the rest of the network trains.

        "conv2" is what Caffe's ssd_pascal.py freezes when it fine-tunes ImageNet VGG16, and
        torchvision's detection ResNets by default (trainable_backbone_layers=3): these
        generic edge and colour filters need no retraining, and the backward pass then stops
        at conv3_1, which spares VGG16-SSD300 about 18% of a training step's arithmetic.
        Batch norm in a frozen stage (base_bn "train") keeps normalising with the batch's
        statistics; only its affine parameters stay fixed.
        """
        if upto not in FREEZE_CHOICES:
            raise ValueError(f"unknown stage {upto!r}: use one of {', '.join(FREEZE_CHOICES)}")
        stages = FREEZE_CHOICES[1:FREEZE_CHOICES.index(upto) + 1]
        prefixes = tuple(prefix for stage in stages for prefix in self.base.FIRST_STAGES[stage])
        for name, param in self.base.named_parameters():
            param.requires_grad_(not name.startswith(prefixes))

    @property
    def n_classes(self):
        return self.config["n_classes"]

    def forward(self, images):
        """images: N x 3 x S x S (S = image_size), normalised -> (N x P x 4 offsets,
        N x P x n_classes class logits), P priors (SSD300: 8732)."""
        f38, f19 = self.base(images)                 # conv4_3 and conv7 (SSD300: 38x38, 19x19)
        features = [self.l2_norm(f38), f19] + self.aux_convs(f19)
        return self.pred_convs(features)

    @torch.no_grad()
    def detect_objects(self, pred_locs, pred_scores, min_score=EVAL_DECODING.min_score,
                       max_overlap=EVAL_DECODING.max_overlap, top_k=EVAL_DECODING.top_k,
                       per_class_top_k=EVAL_DECODING.per_class_top_k):
        return detect_objects(pred_locs, pred_scores, self.priors_cxcy, min_score,
                              max_overlap, top_k, per_class_top_k)


# ----------------------------------------------------------------------------------------
# Matching priors to objects, and the MultiBox loss
# ----------------------------------------------------------------------------------------

def concat_objects(boxes, labels, device):
    """Per-image lists -> (T x 4 float boxes, T labels, T image index), all on `device`.

    The image index is filled on the device from the lists' lengths: a tensor of counts
    copied from the host, and repeat_interleave's output size, would each wait for a GPU.
    """
    image = torch.cat([torch.full((len(b),), i, dtype=torch.long, device=device)
                       for i, b in enumerate(boxes)])
    return (torch.cat(boxes).to(device=device, dtype=torch.float32),
            torch.cat(labels).to(device=device, dtype=torch.long), image)


def forced_matches(iou, image, n_images):
    """Give every object a prior of its own: the greedy bipartite matching of Caffe's MultiBox.

    Greedy: repeatedly match the highest-IoU (object, prior) pair among unmatched objects
    and free priors of the same image. Common implementations instead let each object take
    its single best prior, so when two objects share one, the last one silently loses its
    guaranteed match. We compute the greedy matching in rounds: in each round every pair that
    is the best of its row (the object's best free prior) and of its column (the prior's best
    unmatched object) is matched at once. Such "locally dominant" pairs give exactly the
    greedy matching (Preis, 1999); one round suffices unless objects compete for a prior.

    iou: T x P (objects x priors), image: T image index of each object.
    Returns the prior index of each object, T.
    """
    T, P = iou.shape
    objects = torch.arange(T, device=iou.device)
    prior = torch.full((T,), -1, dtype=torch.long, device=iou.device)
    taken = torch.zeros(n_images, P, dtype=torch.bool, device=iou.device)
    # Every round works on all T rows, matched ones masked out, rather than on the unmatched
    # rows picked out by index: the loop's end test is then the one host synchronisation of
    # a round on a GPU. How many rounds there are depends on the data.
    while True:
        open_ = prior < 0                                               # T
        cand = iou.masked_fill(taken[image] | ~open_[:, None], -1.0)    # T x P
        best_iou, best_prior = cand.max(dim=1)                         # T
        # Best IoU of every (image, prior) column over the unmatched objects.
        col_best = torch.full((n_images, P), -2.0, dtype=iou.dtype, device=iou.device)
        col_best.scatter_reduce_(0, image[:, None].expand_as(cand), cand, "amax")
        wins = open_ & (best_iou >= col_best[image, best_prior])
        # Exact ties between objects for one prior: the lowest object index wins.
        key = image * P + best_prior
        first = torch.full((n_images * P,), T, dtype=torch.long, device=iou.device)
        first.scatter_reduce_(0, key, torch.where(wins, objects, T), "amin")
        wins &= first[key] == objects
        prior = torch.where(wins, best_prior, prior)
        taken |= (first < T).view(n_images, P)
        if not bool((prior < 0).any()):
            return prior


def match_priors(boxes, labels, image, n_images, priors_cxcy, threshold=0.5):
    """Assign an object (or the background) to every prior of every image in the batch.

    Every prior takes its highest-IoU object of its image if that IoU >= threshold, else the
    background; every object also claims a prior of its own (`forced_matches`), even below
    the threshold.
    boxes: T x 4 fractional corners of all images' objects, labels: T (1..C-1),
    image: T index of each object's image.
    Returns (matched N x P: index into `boxes` of each prior's object, meaningful where
    positive; true_labels N x P: its class, 0 = background).
    """
    P, device = priors_cxcy.size(0), priors_cxcy.device
    T = boxes.size(0)
    if T == 0:
        zeros = torch.zeros(n_images, P, dtype=torch.long, device=device)
        return zeros, zeros.clone()
    iou = box_iou(boxes, cxcy_to_xy(priors_cxcy))                     # T x P
    # Best object of each (image, prior): max IoU over that image's objects, lowest index
    # on ties.
    index = image[:, None].expand(T, P)
    best_iou = torch.full((n_images, P), -1.0, device=device)
    best_iou.scatter_reduce_(0, index, iou, "amax")                   # N x P
    obj_id = torch.arange(T, device=device)[:, None].expand(T, P)
    candidates = torch.where(iou == best_iou[image], obj_id, T)        # T x P
    matched = torch.full((n_images, P), T, dtype=torch.long, device=device)
    matched.scatter_reduce_(0, index, candidates, "amin")
    # Forced matches override, with an overlap above any threshold.
    forced = forced_matches(iou, image, n_images)
    matched[image, forced] = torch.arange(T, device=device)
    best_iou[image, forced] = 2.0
    matched = matched.clamp(max=T - 1)          # images without objects: any valid index
    true_labels = torch.where(best_iou >= threshold, labels[matched], 0)
    return matched, true_labels


class MultiBoxLoss(nn.Module):
    """The paper's loss: (L_conf + alpha * L_loc) / N over the whole batch, N = positive priors.

    L_loc: L1 (this project's default, as the sgrvinod tutorial) or smooth L1 (the paper's and
    the Caffe release's, loc_loss_type SMOOTH_L1 in ssd_pascal.py) over
    the positives' encoded offsets. L_conf: cross-entropy over all positives plus, per image,
    the hardest negatives (highest background loss), at most neg_pos_ratio per positive.
    With no positive at all both terms are 0 (never NaN).
    """

    def __init__(self, priors_cxcy, threshold=0.5, neg_pos_ratio=3, alpha=1.0, loc_loss="l1"):
        super().__init__()
        if loc_loss not in ("l1", "smooth_l1"):
            raise ValueError(f"loc_loss must be 'l1' or 'smooth_l1', not {loc_loss!r}")
        self.register_buffer("priors_cxcy", priors_cxcy, persistent=False)
        self.threshold = threshold
        self.neg_pos_ratio = neg_pos_ratio
        self.alpha = alpha
        self.loc_loss = loc_loss

    def forward(self, pred_locs, pred_scores, boxes, labels):
        """pred_locs N x P x 4, pred_scores N x P x C; boxes (fractional corners) and labels
        are lists of per-image tensors.

        Returns (loss, loc_loss, conf_loss), each a 0-dim tensor (loss = conf + alpha * loc).
        On a GPU it waits for the device only in forced_matches (once per round) and for
        the positives' indices (see below): the hard negatives need no per-batch count.
        """
        device = self.priors_cxcy.device
        all_boxes, all_labels, image = concat_objects(boxes, labels, device)
        matched, true_labels = match_priors(all_boxes, all_labels, image, len(boxes),
                                            self.priors_cxcy, self.threshold)
        positive = true_labels > 0                                      # N x P
        n_total = positive.sum().clamp(min=1).float()

        # Localisation: only positives; the matched box is encoded against its prior. They
        # are a few percent of the priors, picked by index: this nonzero is the loss's one
        # wait on a GPU besides forced_matches', which a step cannot avoid anyway. A masked
        # sum over every prior has none, but made this term 5x slower on a CPU (batch 32:
        # 12 ms against 2, one thread), the whole loss 1.2x.
        image_index, prior_index = positive.nonzero(as_tuple=True)                # n_pos each
        true_locs = encode(xy_to_cxcy(all_boxes[matched[image_index, prior_index]]),
                           self.priors_cxcy[prior_index])
        loss_fn = F.l1_loss if self.loc_loss == "l1" else F.smooth_l1_loss
        loc_loss = loss_fn(pred_locs[image_index, prior_index].float(), true_locs,
                           reduction="sum") / n_total

        # Confidence: cross-entropy (float32) over the positives and the hard negatives.
        conf_loss = MinedCrossEntropy.apply(pred_scores.float(), true_labels, positive,
                                            self.neg_pos_ratio) / n_total
        return conf_loss + self.alpha * loc_loss, loc_loss, conf_loss


class MinedCrossEntropy(torch.autograd.Function):
    """The paper's confidence loss, summed: the cross-entropy of every positive prior and of
    each image's hard negatives (`hard_negatives`), in the scores' dtype.

    scores: N x P x C logits (class 0 the background); labels, positive: N x P.
    Its own backward, (softmax - one-hot) of the selected priors, in place over the saved
    log-probabilities: autograd through F.cross_entropy over every prior takes several
    passes over the scores (a zero gradient, the label gather's scatter, log_softmax's own
    backward) and made the whole loss 1.2-1.25x slower on a CPU (batch 8 and 32, one
    thread), slower than the boolean-indexed cross-entropy it replaces.
    """

    @staticmethod
    def forward(ctx, scores, labels, positive, neg_pos_ratio):
        log_probs = F.log_softmax(scores, dim=2)                                 # N x P x C
        ce = -log_probs.gather(2, labels[..., None])[..., 0]                     # N x P
        # A negative's cross-entropy is its background loss: the mining's ranking key.
        selected = positive | hard_negatives(ce, positive, neg_pos_ratio)
        ctx.save_for_backward(log_probs, labels, selected)
        return torch.where(selected, ce, 0.0).sum()

    @staticmethod
    def backward(ctx, grad):
        log_probs, labels, selected = ctx.saved_tensors
        # In place: log_probs is this function's own buffer, and filling a fresh N x P x C
        # one took several times longer on a CPU (profiled, batch 32). A second backward
        # through the same graph (retain_graph) then fails loudly on the modified saved
        # tensor. Zeros by a fill, not a product with the mask: a prior left out must pass
        # on no NaN.
        grad_scores = log_probs.exp_().masked_fill_(~selected[..., None], 0.0).mul_(grad)
        grad_scores.scatter_add_(2, labels[..., None], -(selected * grad)[..., None])
        return grad_scores, None, None, None


def hard_negatives(background_loss, positive, neg_pos_ratio):
    """The paper's hard negative mining: per image, the negatives with the highest
    background loss, neg_pos_ratio per positive (all of them if there are fewer).

    background_loss, positive: N x P. Returns an N x P bool mask of the chosen negatives.
    No per-batch k is read back to the host (a topk of the batch's largest quota needs one),
    and there is no full sort (several times slower than that topk on a CPU): each image's
    quota-th largest loss v comes from one kthvalue for the whole batch, because P - quota
    infinities appended to every row (and -inf up to a common length) make v the P-th
    largest of each row. Negatives above v are taken, then those equal to v in prior order
    while the quota lasts; which of equal losses are taken does not change the loss.
    """
    n_positives = positive.sum(dim=1, keepdim=True)                           # N x 1
    P = positive.size(1)
    quota = torch.minimum(neg_pos_ratio * n_positives, P - n_positives)       # N x 1
    # Positives rank after every negative (background losses are >= 0); NaN (a diverging
    # network) before all, as in a topk, so that the loss shows it.
    key = torch.where(background_loss.isnan(), math.inf, background_loss)
    key = key.masked_fill(positive, -math.inf)
    filler = torch.where(torch.arange(P, device=key.device) < P - quota, math.inf, -math.inf)
    v = torch.cat([key, filler], 1).kthvalue(P + 1, dim=1, keepdim=True).values  # N x 1
    ties = key == v
    need = quota - (key > v).sum(1, keepdim=True)
    return (key > v) | (ties & (ties.cumsum(1) <= need))


# ----------------------------------------------------------------------------------------
# Detection
# ----------------------------------------------------------------------------------------

def decode_predictions(pred_locs, pred_scores, priors_cxcy):
    """The heads' outputs as boxes and class probabilities, in float32.

    pred_locs: N x P x 4 offsets, pred_scores: N x P x C logits (class 0 the background).
    Returns (boxes N x P x 4 fractional corners clamped to [0, 1], probabilities of the
    object classes N x (C-1) x P). Traceable: export.py puts it inside the ONNX graph.
    """
    return decode_boxes(pred_locs, priors_cxcy), class_probabilities(pred_scores)


def decode_boxes(pred_locs, priors_cxcy):
    """Offsets (..., 4) against their priors (..., 4 centre-size, broadcastable) -> float32
    fractional corners (..., 4), clamped to [0, 1]."""
    return cxcy_to_xy(decode(pred_locs.float(), priors_cxcy)).clamp(0, 1)


def class_probabilities(pred_scores):
    """N x P x C logits -> float32 probabilities of the object classes, N x (C-1) x P."""
    return F.softmax(pred_scores.float(), dim=2)[:, :, 1:].transpose(1, 2)


def detect_objects(pred_locs, pred_scores, priors_cxcy, min_score=EVAL_DECODING.min_score,
                   max_overlap=EVAL_DECODING.max_overlap, top_k=EVAL_DECODING.top_k,
                   per_class_top_k=EVAL_DECODING.per_class_top_k):
    """Decode predictions into detections, as the original evaluation does.

    Per image and class: scores above min_score, at most per_class_top_k of them (Caffe's
    and torchvision's pre-NMS cap; None for no cap), NMS at IoU max_overlap; then the top_k
    highest-scoring detections of the image over all classes.
    pred_locs: (N, 8732, 4) offsets; pred_scores: (N, 8732, C) class logits; priors_cxcy:
    (8732, 4). Returns three lists over images: boxes (k x 4 fractional corners clamped to
    [0, 1]), labels (k, 1..C-1) and scores (k).
    """
    N, P, C = pred_scores.shape
    probs = class_probabilities(pred_scores)                                 # N x (C-1) x P
    # Only as many candidates per (image, class) as the fullest one has above min_score: with
    # a trained model's scores a few, and a top few is far cheaper than a top 400.
    k = int((probs > min_score).sum(dim=2).max())
    if per_class_top_k is not None:
        k = min(per_class_top_k, k)
    scores, prior = probs.topk(k, dim=2)                                     # N x (C-1) x k
    # Only the candidates' boxes are decoded, elementwise as decode_predictions does: with a
    # trained model's scores a few hundred rather than all N x P.
    rows = torch.arange(N, device=prior.device)[:, None, None]
    cand_boxes = decode_boxes(pred_locs[rows, prior], priors_cxcy[prior])   # N x (C-1) x k x 4
    keep = nms(cand_boxes.flatten(0, 1), (scores > min_score).flatten(0, 1),
               max_overlap).view(N, C - 1, k)
    image, cls, _ = keep.nonzero(as_tuple=True)
    scores, cand_boxes = scores[keep], cand_boxes[keep]
    # top_k per image: order by score, then (stably) by image; keep each image's first top_k.
    order = torch.sort(scores, descending=True, stable=True).indices
    order = order[torch.sort(image[order], stable=True).indices]
    image, cls, scores, cand_boxes = image[order], cls[order], scores[order], cand_boxes[order]
    counts = torch.bincount(image, minlength=N)
    rank = torch.arange(len(image), device=image.device) - (torch.cumsum(counts, 0) - counts)[image]
    top = rank < top_k
    sizes = torch.bincount(image[top], minlength=N).tolist()
    return (list(cand_boxes[top].split(sizes)), list((cls[top] + 1).split(sizes)),
            list(scores[top].split(sizes)))


# ----------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------

# What load_checkpoint, eval.py and detect.py need from a checkpoint's config.
CHECKPOINT_CONFIG = ("n_classes", "backbone", "width", "label_map")


def read_checkpoint(path, required=("model", "config")):
    """A checkpoint written by train.py, as a dict, with clear errors for anything else.

    It holds only tensors and plain Python values, so it loads with weights_only=True.
    """
    try:
        checkpoint = load_tensors(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} does not exist") from None
    except ValueError as e:
        raise ValueError(f"{e}; not a checkpoint written by train.py") from None
    if not isinstance(checkpoint, dict) or not set(required) <= set(checkpoint):
        raise ValueError(f"{path} is not an SSD checkpoint written by train.py "
                         f"(it lacks some of {', '.join(required)})")
    if "config" in required:
        missing = [key for key in CHECKPOINT_CONFIG if key not in checkpoint["config"]]
        if missing:
            raise ValueError(f"{path}: its config lacks {', '.join(missing)}, which train.py "
                             "always saves; the file was not written by this repository's train.py")
    return checkpoint


def load_for_new_classes(net, model_state, label_map, source_label_map):
    """Load a trained SSD's weights (model_state, for the classes of source_label_map) into
    `net`, an SSD of the same architecture and priors for the classes of label_map (class ->
    index; indices may leave gaps, as COCO's 91 do, below net.n_classes).

    Every layer but the class-score convolutions is loaded as it is (base, L2Norm, auxiliary
    convolutions, localisation heads, batch-norm statistics). A class-score convolution's
    output channels are box-major (channel b * n_classes + c: the order flatten_predictions
    reads), weight (B * n_classes, in, 3, 3) and bias (B * n_classes,): for each class whose
    name both label maps share, background included, its B rows are copied from the source's
    rows of that name; the other classes keep net's fresh initialisation.
    Returns the shared class names, in label order. A ValueError if the layers differ.
    """
    shared = [name for name in label_map if name in source_label_map]
    rows = torch.tensor([label_map[name] for name in shared], dtype=torch.long)
    source_rows = torch.tensor([source_label_map[name] for name in shared], dtype=torch.long)
    state = net.state_dict()
    for key, value in model_state.items():
        if key.startswith("pred_convs.cl.") and key in state:
            target = state[key]
            by_class = target.view(-1, net.n_classes, *target.shape[1:])           # (B, C, ...)
            if value.shape[0] % by_class.shape[0] or value.shape[1:] != target.shape[1:]:
                raise ValueError(f"{key}: {tuple(value.shape)} does not fit {tuple(target.shape)}")
            source = value.view(by_class.shape[0], -1, *value.shape[1:])          # (B, C', ...)
            by_class[:, rows] = source[:, source_rows]
        else:
            state[key] = value
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(str(e).splitlines()[0] + " " + " ".join(str(e).splitlines()[1:2])) from e
    return shared


def load_checkpoint(path, device="cpu"):
    """Rebuild the trained SSD from a checkpoint written by train.py or convert_weights.py.

    Returns (model in eval mode on `device`, the checkpoint dict).
    """
    checkpoint = read_checkpoint(path)
    return network_of(checkpoint, path).to(device).eval(), checkpoint


def network_of(checkpoint, source="the checkpoint"):
    """The SSD a checkpoint dict describes, with its weights (on the CPU, in training mode);
    a ValueError naming `source` if they do not fit."""
    config = checkpoint["config"]
    try:
        # base_bn, model and priors are absent from checkpoints written before they existed.
        net = SSD(config["n_classes"], config["backbone"], width=config["width"],
                  base_bn=config.get("base_bn"), model=config.get("model", "ssd300"),
                  priors=prior_config(config), preprocessing=config.get("preprocessing"))
        net.load_state_dict(checkpoint["model"])
    except (KeyError, RuntimeError, ValueError) as e:
        described = {k: config.get(k) for k in ("n_classes", "backbone", "width", "base_bn", "model")}
        raise ValueError(f"{source} does not match the SSD it describes (config {described}): "
                         f"{e}") from e
    return net
