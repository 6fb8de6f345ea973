"""SSD300 network, priors, MultiBox loss and detection decoding, against slow references."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
import torchvision
from torchvision.ops import box_iou

import model
import utils
from model import SSD, MultiBoxLoss
from priors import PRIOR_CONFIGS, create_priors, n_boxes_per_location
from priors import decode, encode
from utils import cxcy_to_xy, xy_to_cxcy


def random_boxes(n, generator, min_size=0.02, max_size=0.6):
    """n random fractional corner boxes inside the unit square."""
    wh = min_size + (max_size - min_size) * torch.rand(n, 2, generator=generator)
    x1y1 = torch.rand(n, 2, generator=generator) * (1 - wh)
    return torch.cat([x1y1, x1y1 + wh], dim=1)


def random_targets(n_images, n_classes, generator, max_objects=6, empty_every=3):
    boxes, labels = [], []
    for i in range(n_images):
        n = 0 if i % empty_every == 1 else int(torch.randint(1, max_objects + 1, (), generator=generator))
        boxes.append(random_boxes(n, generator))
        labels.append(torch.randint(1, n_classes, (n,), generator=generator))
    return boxes, labels


# ---------------------------------------------------------------------------- network

def test_full_model_shapes_and_size():
    net = SSD(n_classes=21).eval()
    with torch.no_grad():
        locs, scores = net(torch.randn(2, 3, 300, 300))
    assert locs.shape == (2, 8732, 4)
    assert scores.shape == (2, 8732, 21)
    assert net.priors_cxcy.shape == (8732, 4)
    assert sum(p.numel() for p in net.parameters()) == 26_285_486


def test_vgg_base_feature_map_sizes():
    base = model.VGGBase(width=0.125)
    conv4_3, conv7 = base(torch.randn(1, 3, 300, 300))
    assert conv4_3.shape[-2:] == (38, 38) and conv7.shape[-2:] == (19, 19)
    assert base.to_conv7.conv6.dilation == (6, 6)
    assert base.to_conv4_3.pool3.ceil_mode and not base.to_conv4_3.pool2.ceil_mode
    aux = model.AuxiliaryConvolutions(conv7.size(1), width=0.125)
    assert [f.shape[-1] for f in aux(conv7)] == [10, 5, 3, 1]


@pytest.mark.parametrize("width", [1.0, 0.125])
def test_resnet34_base_shapes(width):
    net = SSD(n_classes=4, backbone="resnet34", width=width).eval()
    x = torch.randn(1, 3, 300, 300)
    with torch.no_grad():
        locs, scores = net(x)
        f38, f19 = net.base(x)
        maps = [f38, f19] + net.aux_convs(f19)
    assert locs.shape == (1, 8732, 4) and scores.shape == (1, 8732, 4)
    assert net.priors_cxcy.shape == (8732, 4)
    assert [f.shape[-1] for f in maps] == list(PRIOR_CONFIGS["ssd300"].maps)
    assert [f.size(1) for f in maps] == [conv.in_channels for conv in net.pred_convs.loc]
    assert net.base.to_conv4.layer3[0].conv1.stride == (1, 1)       # torchvision's is 2
    assert net.base.to_conv4.layer2[0].conv1.stride == (2, 2)


def test_resnet34_base_is_torchvisions_resnet34_through_layer3():
    ours = {k.removeprefix("to_conv4."): v.shape for k, v in model.ResNet34Base().state_dict().items()
            if k.startswith("to_conv4.")}
    theirs = {k: v.shape for k, v in torchvision.models.resnet34().state_dict().items()
              if not k.startswith(("layer4.", "fc."))}
    assert ours == theirs


def random_resnet34_state_dict():
    torch.manual_seed(0)
    state = torchvision.models.resnet34().state_dict()
    return {k: (v.clone() if k.endswith("num_batches_tracked") else
                0.5 + torch.rand_like(v) if k.endswith("running_var") else
                0.1 * torch.randn_like(v)) for k, v in state.items()}


def test_resnet34_pretrained_from_local_file_loads_into_the_right_modules(tmp_path):
    resnet = random_resnet34_state_dict()
    path = tmp_path / "resnet34.pth"
    torch.save(resnet, path)
    net = SSD(n_classes=3, backbone="resnet34", pretrained=str(path)).eval()
    assert net.config["base_bn"] == "frozen"        # the default with ImageNet weights
    base = net.base.to_conv4
    assert torch.equal(base.conv1.weight, resnet["conv1.weight"])
    assert torch.equal(base.layer2[0].downsample[1].running_var, resnet["layer2.0.downsample.1.running_var"])
    assert torch.equal(base.layer3[5].conv2.weight, resnet["layer3.5.conv2.weight"])
    assert torch.equal(base.layer3[5].bn2.bias, resnet["layer3.5.bn2.bias"])
    # The same function as torchvision's ResNet-34 with these weights and layer3 at stride 1.
    tv = torchvision.models.resnet34()
    tv.load_state_dict(resnet)
    tv.layer3[0].conv1.stride = tv.layer3[0].downsample[0].stride = (1, 1)
    tv.eval()
    x = torch.randn(2, 3, 300, 300)
    with torch.no_grad():
        expected = tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x)))))))
        got = base(x)
    assert got.shape == (2, 256, 38, 38)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_resnet34_pretrained_needs_width_one_and_says_what_to_do(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(random_resnet34_state_dict(), path)
    with pytest.raises(ValueError, match="width=1.0"):
        SSD(n_classes=3, backbone="resnet34", pretrained=str(path), width=0.5)
    with pytest.raises(OSError, match="resnet34-.*--no-pretrained"):
        SSD(n_classes=3, backbone="resnet34", pretrained=str(tmp_path / "missing.pth"))
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
    with pytest.raises(ValueError, match="resnet34.pth .*no bn1.weight"):
        SSD(n_classes=3, backbone="resnet34", pretrained=str(path))


def test_frozen_batch_norm_stays_fixed_and_trained_batch_norm_learns():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 300, 300)
    for base_bn in ("frozen", "train"):
        net = SSD(n_classes=3, backbone="resnet34", width=0.125, base_bn=base_bn).train()
        bn = net.base.to_conv4.layer1[0].bn1
        before = bn.running_mean.clone()
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        net(x)[1].square().mean().backward()
        optimizer.step()
        frozen = base_bn == "frozen"
        assert isinstance(bn, torchvision.ops.FrozenBatchNorm2d) == frozen
        assert torch.equal(bn.running_mean, before) == frozen
        assert any(p is bn.weight for p in net.parameters()) != frozen
    with pytest.raises(ValueError, match="VGG16 takes None"):
        SSD(n_classes=3, base_bn="frozen")
    with pytest.raises(ValueError, match="without batch norm"):
        SSD(n_classes=3, base_bn="train", pretrained="vgg16.pth")


def test_vgg_batch_norm_from_conv2_1_on():
    """base_bn="train" (the toy preset, from scratch): batch norm after every convolution of
    blocks 2-5 and conv6, conv7, none in block 1; the same feature maps."""
    plain, bn = model.VGGBase(width=0.125), model.VGGBase(width=0.125, batch_norm=True)
    names = [n for n, m in bn.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert names == [f"to_conv4_3.bn{b}_{i}" for b, n in [(2, 2), (3, 3), (4, 3)] for i in range(1, n + 1)] \
        + [f"to_conv7.bn5_{i}" for i in (1, 2, 3)] + ["to_conv7.bn6", "to_conv7.bn7"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    x = torch.randn(2, 3, 300, 300)
    assert [f.shape for f in bn(x)] == [f.shape for f in plain(x)]
    net = SSD(n_classes=3, width=0.125, base_bn="train")
    assert net.config["base_bn"] == "train" and SSD(n_classes=3).config["base_bn"] is None


@pytest.mark.parametrize("backbone, base_bn, first_stage, second_stage", [
    ("vgg16", "train", ["conv1_1", "conv1_2"], ["conv2_1", "bn2_1", "conv2_2", "bn2_2"]),
    ("resnet34", "train", ["conv1", "bn1"], ["layer1"]),
])
def test_freeze_stops_training_the_first_stages_only(backbone, base_bn, first_stage, second_stage):
    """freeze("conv2"): no gradient reaches conv1_x and conv2_x (ResNet: conv1 and layer1),
    every other parameter gets one; "conv1" keeps conv2_x training; "none" undoes it."""
    torch.manual_seed(0)
    net = SSD(n_classes=3, backbone=backbone, width=0.125, base_bn=base_bn)
    base = net.base.to_conv4_3 if backbone == "vgg16" else net.base.to_conv4
    def stage_params(names):
        return {id(p) for name in names for p in getattr(base, name).parameters()}
    first, second = stage_params(first_stage), stage_params(second_stage)
    assert first and second
    x = torch.randn(2, 3, 300, 300)
    for upto, frozen in [("conv2", first | second), ("conv1", first), ("none", set())]:
        net.freeze(upto)
        net.zero_grad(set_to_none=True)
        sum(o.square().mean() for o in net(x)).backward()
        for name, p in net.named_parameters():
            assert (p.grad is None) == (id(p) in frozen), (upto, name)
            assert p.requires_grad == (id(p) not in frozen), (upto, name)
    with pytest.raises(ValueError, match="unknown stage"):
        net.freeze("conv3")


def test_l2norm_is_float32_under_autocast():
    norm = model.L2Norm(8)
    x = torch.randn(2, 8, 5, 5) * 300          # squares overflow float16 (max 65504)
    expected = (x.double() / x.double().norm(dim=1, keepdim=True) * 20).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), expected, rtol=1e-2)
    assert torch.allclose(norm(x), expected, rtol=1e-5)


@pytest.mark.parametrize("backbone", ["vgg16", "resnet34"])
def test_ssd512_maps_priors_and_a_training_step(backbone):
    """SSD512 (Caffe's ssd_pascal_512.py): 7 maps 64 ... 1 from a 512x512 input, conv12_2's 4x4
    kernel making the last, 24,564 priors in head order; one forward, loss and backward."""
    net = SSD(n_classes=3, backbone=backbone, width=0.125, model="ssd512")
    assert net.image_size == 512 and net.aux_convs.convs["conv12_2"].kernel_size == (4, 4)
    x = torch.randn(2, 3, 512, 512)
    f64, f32 = net.base(x)
    maps = [f64, f32] + net.aux_convs(f32)
    assert [f.shape[-1] for f in maps] == list(PRIOR_CONFIGS["ssd512"].maps) == [64, 32, 16, 8, 4, 2, 1]
    locs, scores = net(x)
    assert locs.shape == (2, 24564, 4) and scores.shape == (2, 24564, 3)
    assert net.priors_cxcy.shape == (24564, 4)
    boxes, labels = random_targets(2, 3, torch.Generator().manual_seed(0))
    loss, _, _ = MultiBoxLoss(net.priors_cxcy)(locs, scores, boxes, labels)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    assert net.pred_convs.loc[0].weight.grad.abs().sum() > 0


def test_model_and_priors_must_agree():
    with pytest.raises(ValueError, match="ssd300 predicts from 6 maps; the prior configuration has 7"):
        SSD(n_classes=3, priors=PRIOR_CONFIGS["ssd512"])
    with pytest.raises(ValueError, match="unknown model"):
        SSD(n_classes=3, model="ssd600")


# ---------------------------------------------------------------------------- priors

def test_ssd512_priors_follow_caffe():
    """ssd_pascal_512.py: min sizes 35.84 ... 460.8 and max 76.8 ... 537.6 pixels of 512,
    centres every 8, 16, ... 512 pixels, not clipped."""
    config = PRIOR_CONFIGS["ssd512"]
    counts = [f * f * n_boxes_per_location(r) for f, r in zip(config.maps, config.aspect_ratios)]
    assert counts == [16384, 6144, 1536, 384, 96, 16, 4] and sum(counts) == 24564
    priors = create_priors(config)
    assert torch.allclose(priors[0], torch.tensor([4 / 512, 4 / 512, 35.84 / 512, 35.84 / 512]))
    # conv8_2 (16x16, step 32): its last location's centre at (15.5 * 32) / 512.
    last = sum(counts[:3]) - 6
    assert torch.allclose(priors[last, :2], torch.full((2,), 15.5 * 32 / 512))
    assert torch.allclose(priors[-3, 2:], torch.full((2,), math.sqrt(460.8 * 537.6) / 512))
    assert priors[-2, 2] > 1.0


def test_priors_count_per_map():
    priors = create_priors()
    config = PRIOR_CONFIGS["ssd300"]
    counts = [f * f * n_boxes_per_location(r) for f, r in zip(config.maps, config.aspect_ratios)]
    assert counts == [5776, 2166, 600, 150, 36, 4]
    assert priors.shape == (8732, 4)


def test_prior_values_follow_the_original_sizes():
    priors = create_priors()
    # First location of conv4_3: min square 30 px, sqrt(30*60) square, ratios 2 and 1/2.
    c = 0.5 / 38
    s, s2 = 30 / 300, math.sqrt(30 * 60) / 300
    expected = torch.tensor([[c, c, s, s], [c, c, s2, s2],
                             [c, c, s * math.sqrt(2), s / math.sqrt(2)],
                             [c, c, s / math.sqrt(2), s * math.sqrt(2)]])
    assert torch.allclose(priors[:4], expected)
    # conv7's first location has 6 priors, the last two with ratio 3 and 1/3.
    s = 60 / 300
    assert torch.allclose(priors[5776 + 4], torch.tensor([0.5 / 19, 0.5 / 19, s * math.sqrt(3), s / math.sqrt(3)]))
    # conv11_2: one location at the centre, min 264, max 315; not clipped to the image.
    assert torch.allclose(priors[-4:, :2], torch.full((4, 2), 0.5))
    assert torch.allclose(priors[-3, 2:], torch.full((2,), math.sqrt(264 * 315) / 300))
    assert priors[-2, 2] > 1.0


def test_prior_order_matches_head_flatten_order():
    """Each flattened prediction must sit at the index of the prior of its cell and box."""
    priors = create_priors()
    offset = 0
    for f, ratios in zip(PRIOR_CONFIGS["ssd300"].maps, PRIOR_CONFIGS["ssd300"].aspect_ratios):
        b = n_boxes_per_location(ratios)
        # Channel (box k, coordinate c) at cell (i, j) holds a code of (i, j, k).
        i = torch.arange(f).view(1, 1, f, 1).expand(b, 4, f, f)
        j = torch.arange(f).view(1, 1, 1, f).expand(b, 4, f, f)
        k = torch.arange(b).view(b, 1, 1, 1).expand(b, 4, f, f)
        head = (i * 10_000 + j * 100 + k).reshape(1, b * 4, f, f).float()
        flat = model.flatten_predictions(head, 4)[0, :, 0]                # f*f*b codes
        ci, cj, ck = flat // 10_000, flat % 10_000 // 100, flat % 100
        mine = priors[offset:offset + f * f * b]
        assert torch.allclose(mine[:, 0], (cj + 0.5) / f)
        assert torch.allclose(mine[:, 1], (ci + 0.5) / f)
        # The box index k picks the same shape at every location.
        shapes = mine[:b, 2:]
        assert torch.allclose(mine[:, 2:], shapes[ck.long()])
        offset += f * f * b
    assert offset == 8732


# ---------------------------------------------------------------------------- pretrained

def random_vgg16_state_dict():
    torch.manual_seed(0)
    return {k: torch.randn_like(v) for k, v in torchvision.models.vgg16().state_dict().items()}


def test_fc6_fc7_decimation():
    vgg = random_vgg16_state_dict()
    base = model.VGGBase()
    new = model.vgg16_to_ssd_base(vgg, base.state_dict())
    fc6, fc7 = vgg["classifier.0.weight"], vgg["classifier.3.weight"]
    conv6, conv7 = new["to_conv7.conv6.weight"], new["to_conv7.conv7.weight"]
    assert conv6.shape == (1024, 512, 3, 3) and conv7.shape == (1024, 1024, 1, 1)
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        o, c, a, b = (int(torch.randint(n, (), generator=g)) for n in (1024, 512, 3, 3))
        # fc6's input is the flattened 512 x 7 x 7 pool5 map; keep every 3rd position.
        assert conv6[o, c, a, b] == fc6[4 * o, c * 49 + (3 * a) * 7 + 3 * b]
        i = int(torch.randint(1024, (), generator=g))
        assert conv7[o, i, 0, 0] == fc7[4 * o, 4 * i]
    assert torch.equal(new["to_conv7.conv6.bias"], vgg["classifier.0.bias"][::4])
    assert torch.equal(new["to_conv7.conv7.bias"], vgg["classifier.3.bias"][::4])
    # The 13 convolutions map in order.
    assert torch.equal(new["to_conv4_3.conv1_1.weight"], vgg["features.0.weight"])
    assert torch.equal(new["to_conv4_3.conv4_3.bias"], vgg["features.21.bias"])
    assert torch.equal(new["to_conv7.conv5_3.weight"], vgg["features.28.weight"])
    assert set(new) == set(base.state_dict())


def test_pretrained_from_local_file(tmp_path):
    vgg = random_vgg16_state_dict()
    path = tmp_path / "vgg16.pth"
    torch.save(vgg, path)
    net = SSD(n_classes=3, pretrained=str(path))
    assert torch.equal(net.base.to_conv7.conv5_1.weight, vgg["features.24.weight"])


def test_pretrained_failure_says_what_to_do(tmp_path):
    with pytest.raises(OSError, match="--no-pretrained"):
        SSD(n_classes=3, pretrained=str(tmp_path / "missing.pth"))


# ---------------------------------------------------------------------------- box maths

def test_encode_decode_round_trip():
    g = torch.Generator().manual_seed(0)
    boxes = xy_to_cxcy(random_boxes(500, g))
    priors = create_priors()[torch.randint(8732, (500,), generator=g)]
    assert torch.allclose(decode(encode(boxes, priors), priors), boxes, atol=1e-6)
    assert torch.allclose(cxcy_to_xy(xy_to_cxcy(boxes)), boxes, atol=1e-6)
    # The paper's encoding, written out for one box.
    cx, cy, w, h = boxes[0].tolist()
    pcx, pcy, pw, ph = priors[0].tolist()
    expected = [(cx - pcx) / pw / 0.1, (cy - pcy) / ph / 0.1,
                math.log(w / pw) / 0.2, math.log(h / ph) / 0.2]
    assert torch.allclose(encode(boxes[:1], priors[:1])[0], torch.tensor(expected), atol=1e-5)


# ---------------------------------------------------------------------------- matching / loss

def iou_matrix(a, b):
    """Plain IoU between corner boxes a (n x 4) and b (m x 4)."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def greedy_forced_matches(iou):
    """Literal greedy bipartite matching: repeatedly the best (object, free prior) pair."""
    iou = iou.clone()
    prior_of = {}
    for _ in range(iou.size(0)):
        flat = int(iou.argmax())
        obj, prior = divmod(flat, iou.size(1))
        prior_of[obj] = prior
        iou[obj, :] = -1
        iou[:, prior] = -1
    return prior_of


def reference_loss(locs, scores, boxes, labels, priors, threshold=0.5, ratio=3, loc="l1"):
    """One image at a time, written from the paper's description."""
    loc_sum, conf_sum, n_pos_total = 0.0, 0.0, 0
    for n in range(len(boxes)):
        P = priors.size(0)
        label_of = torch.zeros(P, dtype=torch.long)
        box_of = torch.zeros(P, 4)
        if len(boxes[n]):
            # torchvision's IoU, as the model uses: exact geometric ties (a prior inside a box
            # has IoU = its area / the box's at every such position) must break alike.
            iou = box_iou(boxes[n], cxcy_to_xy(priors))                       # n_obj x P
            best_iou, best_obj = iou.max(dim=0)
            for obj, prior in greedy_forced_matches(iou).items():
                best_obj[prior], best_iou[prior] = obj, 2.0
            pos = best_iou >= threshold
            label_of[pos] = labels[n][best_obj[pos]]
            box_of = boxes[n][best_obj]
        pos = label_of > 0
        n_pos = int(pos.sum())
        for p in pos.nonzero().flatten().tolist():
            x1, y1, x2, y2 = box_of[p].double().tolist()
            pcx, pcy, pw, ph = priors[p].double().tolist()
            g = [((x1 + x2) / 2 - pcx) / (pw * 0.1), ((y1 + y2) / 2 - pcy) / (ph * 0.1),
                 math.log((x2 - x1) / pw) / 0.2, math.log((y2 - y1) / ph) / 0.2]
            for pred, target in zip(locs[n, p].double().tolist(), g):
                d = abs(pred - target)
                loc_sum += d if loc == "l1" else (0.5 * d * d if d < 1 else d - 0.5)
        ce = -F.log_softmax(scores[n].double(), dim=1)[torch.arange(P), label_of]
        neg_ce = sorted(ce[~pos].tolist(), reverse=True)
        conf_sum += float(ce[pos].sum()) + sum(neg_ce[:min(ratio * n_pos, len(neg_ce))])
        n_pos_total += n_pos
    n = max(n_pos_total, 1)
    return (conf_sum + loc_sum) / n, loc_sum / n, conf_sum / n


@pytest.mark.parametrize("seed,loc", [(0, "l1"), (1, "smooth_l1"), (2, "l1"), (3, "l1")])
def test_loss_matches_reference(seed, loc):
    g = torch.Generator().manual_seed(seed)
    priors = create_priors()
    n_images, n_classes = 5, 6
    boxes, labels = random_targets(n_images, n_classes, g)
    if seed == 3:   # crowded images: many objects compete for priors
        boxes = [random_boxes(25, g, 0.02, 0.2) for _ in range(2)]
        labels = [torch.randint(1, n_classes, (25,), generator=g) for _ in range(2)]
        n_images = 2
    locs = torch.randn(n_images, 8732, 4, generator=g)
    scores = torch.randn(n_images, 8732, n_classes, generator=g) * 3
    got = MultiBoxLoss(priors, loc_loss=loc)(locs, scores, boxes, labels)
    want = reference_loss(locs, scores, boxes, labels, priors, loc=loc)
    for a, b in zip(got, want):
        assert abs(float(a) - b) <= 1e-5 * max(1.0, abs(b)), (got, want)


def per_image_mined_loss(locs, scores, boxes, labels, priors, ratio=3):
    """MultiBoxLoss one image at a time, with autograd, written from the paper: the L1 loss
    of the positives' offsets, the cross-entropy of the positives and of the
    min(ratio * positives, negatives) negatives of highest background loss (equal losses
    taken in prior order), both summed over the batch and divided by its positives.
    The positives come from model.match_priors, checked against a slow matching above."""
    loc_sum = conf_sum = 0.0
    n_pos_total = 0
    for n in range(len(boxes)):
        image = torch.zeros(len(boxes[n]), dtype=torch.long)
        matched, true_labels = model.match_priors(boxes[n], labels[n], image, 1, priors)
        matched, true_labels = matched[0], true_labels[0]
        pos = (true_labels > 0).nonzero().flatten().tolist()
        ce = F.cross_entropy(scores[n], true_labels, reduction="none")           # P
        background = ce.tolist()                         # a negative's label is 0
        pos_set = set(pos)
        negatives = sorted((p for p in range(priors.size(0)) if p not in pos_set),
                           key=lambda p: -background[p])                      # stable
        hard = negatives[:min(ratio * len(pos), len(negatives))]
        conf_sum = conf_sum + ce[pos].sum() + ce[hard].sum()
        if pos:
            target = encode(xy_to_cxcy(boxes[n][matched[pos]]), priors[pos])
            loc_sum = loc_sum + F.l1_loss(locs[n, pos], target, reduction="sum")
        n_pos_total += len(pos)
    n = max(n_pos_total, 1)
    return (conf_sum + loc_sum) / n, loc_sum / n, conf_sum / n


@pytest.mark.parametrize("ties", [False, True], ids=["continuous", "tied"])
def test_loss_and_gradient_equal_per_image_mining(ties):
    """The batched, sync-free mining against per_image_mined_loss, to 1e-6 in the loss and
    its gradients: an image with objects, one without (no positive, no negative taken), and
    a crowded one (more positives than a third of its negatives: all negatives are taken).
    tied: scores from a few values, so that many priors share a background loss and the
    quota's boundary falls inside a run of equal losses."""
    g = torch.Generator().manual_seed(7)
    priors = create_priors()
    n_classes = 4
    boxes = [random_boxes(5, g), torch.zeros(0, 4), cxcy_to_xy(priors[:2500:2]).clamp(0, 1)]
    labels = [torch.randint(1, n_classes, (len(b),), generator=g) for b in boxes]
    if ties:
        scores = torch.randint(0, 3, (3, 8732, n_classes), generator=g).float()
    else:
        scores = 3 * torch.randn(3, 8732, n_classes, generator=g)
    locs = torch.randn(3, 8732, 4, generator=g)
    results = []
    for loss_fn in (MultiBoxLoss(priors), lambda *a: per_image_mined_loss(*a, priors)):
        l, s = locs.clone().requires_grad_(), scores.clone().requires_grad_()
        terms = loss_fn(l, s, boxes, labels)
        terms[0].backward()
        results.append(([float(t.detach()) for t in terms], l.grad, s.grad))
    (got, got_dl, got_ds), (want, want_dl, want_ds) = results
    positive = [model.match_priors(b, lab, torch.zeros(len(b), dtype=torch.long), 1, priors)[1][0] > 0
                for b, lab in zip(boxes, labels)]
    n_pos = [int(p.sum()) for p in positive]
    assert n_pos[0] > 0 and n_pos[1] == 0 and 3 * n_pos[2] > 8732 - n_pos[2]
    if ties:   # the first image's quota ends inside a run of equal background losses
        background = -F.log_softmax(scores[0], dim=1)[~positive[0], 0]
        ranked = background.sort(descending=True).values
        assert ranked[3 * n_pos[0] - 1] == ranked[3 * n_pos[0]]
    assert got == pytest.approx(want, rel=1e-6)
    torch.testing.assert_close(got_dl, want_dl, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_ds, want_ds, rtol=0, atol=1e-6)
    assert got_ds[1].abs().sum() == 0          # the image without objects takes no negative


def test_loss_without_any_object_is_finite_zero():
    priors = create_priors()
    locs = torch.randn(2, 8732, 4, requires_grad=True)
    scores = torch.randn(2, 8732, 3, requires_grad=True)
    empty = [torch.zeros(0, 4), torch.zeros(0, 4)]
    no_labels = [torch.zeros(0, dtype=torch.long)] * 2
    loss, loc, conf = MultiBoxLoss(priors)(locs, scores, empty, no_labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(locs.grad).all() and torch.isfinite(scores.grad).all()


@pytest.mark.parametrize("loc", ["l1", "smooth_l1"])
def test_a_nan_prediction_gives_a_nan_loss_or_no_nan_gradient(loc):
    """train.py skips a step whose loss is not finite; it never looks at the gradients. A NaN
    score among an image's negatives is ranked hardest (as a topk would) and shows in the
    loss; a NaN where nothing is taken (an image without objects, a negative's offsets) must
    not reach the gradients."""
    priors = create_priors()
    g = torch.Generator().manual_seed(0)
    boxes = [torch.tensor([[0.1, 0.1, 0.5, 0.6]]), torch.zeros(0, 4)]
    labels = [torch.tensor([1]), torch.zeros(0, dtype=torch.long)]
    negative = 8000      # a prior far from the box
    for tensor, image, loss_is_nan in (("scores", 0, True), ("scores", 1, False), ("locs", 0, False)):
        locs = torch.randn(2, 8732, 4, generator=g)
        scores = torch.randn(2, 8732, 3, generator=g)
        (scores if tensor == "scores" else locs)[image, negative, 0] = float("nan")
        locs.requires_grad_()
        scores.requires_grad_()
        loss = MultiBoxLoss(priors, loc_loss=loc)(locs, scores, boxes, labels)[0]
        loss.backward()
        assert math.isnan(loss.item()) == loss_is_nan, (tensor, image)
        if not loss_is_nan:
            assert torch.isfinite(locs.grad).all() and torch.isfinite(scores.grad).all(), (tensor, image)


def test_forced_match_gives_each_of_two_near_identical_boxes_its_own_prior():
    priors = create_priors()
    a = torch.tensor([[0.400, 0.400, 0.450, 0.450]])
    b = torch.tensor([[0.401, 0.400, 0.451, 0.450]])
    pxy = cxcy_to_xy(priors)
    # Both objects have the same single best prior: the naive forced match loses one.
    assert int(iou_matrix(a, pxy).argmax()) == int(iou_matrix(b, pxy).argmax())
    boxes = torch.cat([a, b])
    matched, true_labels = model.match_priors(boxes, torch.tensor([1, 2]), torch.tensor([0, 0]),
                                              1, priors, threshold=0.5)
    # With the 0.5 threshold neither box has any prior on its own merit (IoU < 0.5)...
    assert iou_matrix(boxes, pxy).max() < 0.5
    # ...so each label appears exactly once, on distinct priors, through the forced match.
    assert int((true_labels == 1).sum()) == 1 and int((true_labels == 2).sum()) == 1
    assert matched[true_labels == 1].item() == 0 and matched[true_labels == 2].item() == 1


def test_forced_matches_equal_sequential_greedy():
    g = torch.Generator().manual_seed(5)
    priors_xy = cxcy_to_xy(create_priors())
    for _ in range(20):
        boxes = random_boxes(30, g, 0.01, 0.15)            # many collisions
        iou = iou_matrix(boxes, priors_xy)
        got = model.forced_matches(iou, torch.zeros(30, dtype=torch.long), 1)
        want = greedy_forced_matches(iou.double())
        assert got.tolist() == [want[i] for i in range(30)]


# ---------------------------------------------------------------------------- detection

def naive_nms(boxes, scores, threshold):
    iou = iou_matrix(boxes, boxes).tolist()
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    keep = []
    for i in order:
        if all(iou[i][j] <= threshold for j in keep):
            keep.append(i)
    return keep


def reference_detect(locs, scores, priors, min_score, max_overlap, top_k, per_class_top_k):
    out = []
    for n in range(locs.size(0)):
        boxes = cxcy_to_xy(decode(locs[n], priors)).clamp(0, 1)
        probs = F.softmax(scores[n], dim=1)
        dets = []
        for c in range(1, scores.size(2)):
            idx = [p for p in range(priors.size(0)) if probs[p, c] > min_score]
            idx = sorted(idx, key=lambda p: -float(probs[p, c]))[:per_class_top_k]
            keep = naive_nms(boxes[idx], probs[idx, c], max_overlap)
            dets += [(float(probs[idx[i], c]), c, boxes[idx[i]]) for i in keep]
        dets = sorted(dets, key=lambda d: -d[0])[:top_k]
        out.append(dets)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_detect_objects_matches_naive_reference(seed):
    g = torch.Generator().manual_seed(seed)
    priors = create_priors()
    n_images, n_classes = 3, 4
    locs = torch.randn(n_images, 8732, 4, generator=g) * 0.5
    # Mostly confident background, a few priors per class clearly positive.
    scores = torch.randn(n_images, 8732, n_classes, generator=g)
    scores[..., 0] += 6
    hot = torch.rand(n_images, 8732, generator=g) < 0.015
    scores[..., 1:][hot] += 8 * torch.rand(int(hot.sum()), n_classes - 1, generator=g)
    top_k, per_class = (20, 50) if seed == 2 else (200, 400)
    boxes, labels, sc = model.detect_objects(locs, scores, priors, 0.05, 0.45, top_k, per_class)
    want = reference_detect(locs, scores, priors, 0.05, 0.45, top_k, per_class)
    for n in range(n_images):
        assert len(boxes[n]) == len(want[n]) > 0
        assert sc[n].tolist() == sorted(sc[n].tolist(), reverse=True)
        for b, l, s, (ws, wl, wb) in zip(boxes[n], labels[n], sc[n], want[n]):
            assert abs(float(s) - ws) < 1e-6 and int(l) == wl
            assert torch.allclose(b, wb, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_nms_equals_torchvision_nms(seed):
    g = torch.Generator().manual_seed(seed)
    groups, k = 30, 120
    centres = torch.rand(groups, 1, 2, generator=g) * 0.6 + 0.2       # crowded: long chains
    wh = 0.05 + 0.3 * torch.rand(groups, k, 2, generator=g)
    xy = centres + 0.1 * torch.randn(groups, k, 2, generator=g)
    boxes = torch.cat([xy - wh / 2, xy + wh / 2], dim=2)
    scores = torch.rand(groups, k, generator=g).sort(dim=1, descending=True).values
    valid = scores > 0.2
    keep = utils.greedy_nms(boxes, valid, 0.45)
    for i in range(groups):
        idx = valid[i].nonzero().flatten()
        want = torchvision.ops.nms(boxes[i, idx], scores[i, idx], 0.45)
        assert keep[i].nonzero().flatten().tolist() == sorted(idx[want].tolist())


@pytest.mark.parametrize("seed", [0, 1])
def test_nms_per_group_equals_greedy_nms(seed):
    """utils.nms's two exact methods on many crowded candidates (long suppression chains),
    exact duplicates (only the given order decides), scattered invalid boxes and a group
    with none valid."""
    g = torch.Generator().manual_seed(seed)
    groups, k = 40, 400
    centres = torch.rand(groups, 1, 2, generator=g) * 0.6 + 0.2
    wh = 0.05 + 0.3 * torch.rand(groups, k, 2, generator=g)
    xy = centres + 0.1 * torch.randn(groups, k, 2, generator=g)
    boxes = torch.cat([xy - wh / 2, xy + wh / 2], dim=2)
    boxes[:, 1::7] = boxes[:, ::7][:, :boxes[:, 1::7].size(1)]
    valid = torch.rand(groups, k, generator=g) < 0.8
    valid[3] = False
    keep = utils.greedy_nms(boxes, valid, 0.45)
    assert 0 < int(keep.sum()) < int(valid.sum()) and not keep[3].any()
    assert torch.equal(utils.nms_per_group(boxes, valid, 0.45), keep)


def test_detect_objects_is_the_same_with_either_nms(monkeypatch):
    """Random scores: 400 candidates per class reach NMS, where utils.nms picks
    nms_per_group on a CPU; greedy_nms must give the very same detections."""
    g = torch.Generator().manual_seed(3)
    priors = create_priors()
    locs = 0.5 * torch.randn(3, 8732, 4, generator=g)
    scores = torch.randn(3, 8732, 6, generator=g)
    found = []
    for min_size in (0, 10 ** 9):                  # every group per group, then none
        monkeypatch.setattr(utils, "NMS_PER_GROUP_MIN_SIZE", min_size)
        found.append(model.detect_objects(locs, scores, priors))
    for per_group, greedy in zip(*found):
        assert [len(t) for t in per_group] == [len(t) for t in greedy] == [200] * 3
        assert all(torch.equal(a, b) for a, b in zip(per_group, greedy))


def test_detect_objects_with_nothing_above_threshold():
    priors = create_priors()
    scores = torch.zeros(2, 8732, 3)
    scores[..., 0] = 20
    boxes, labels, sc = model.detect_objects(torch.zeros(2, 8732, 4), scores, priors, 0.01)
    assert [len(b) for b in boxes] == [0, 0] and [len(s) for s in sc] == [0, 0]


# ---------------------------------------------------------------------------- learning

def test_loss_falls_when_overfitting_two_images():
    torch.manual_seed(0)
    net = SSD(n_classes=3, width=0.0625)
    criterion = MultiBoxLoss(net.priors_cxcy)
    images = torch.randn(2, 3, 300, 300)
    images[0, :, 60:200, 90:240] += 2.0             # two bright "objects"
    images[1, :, 150:290, 20:120] -= 2.0
    boxes = [torch.tensor([[90 / 300, 60 / 300, 240 / 300, 200 / 300]]),
             torch.tensor([[20 / 300, 150 / 300, 120 / 300, 290 / 300]])]
    labels = [torch.tensor([1]), torch.tensor([2])]
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = criterion(*net(images), boxes, labels)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    window = [sum(losses[i:i + 6]) / 6 for i in range(0, 30, 6)]
    assert all(b < a for a, b in zip(window, window[1:])), losses   # falls steadily
    assert losses[-1] < 0.3 * losses[0], losses


def test_hard_negative_mining_never_drops_positives_of_a_crowded_image():
    """An image with more than a quarter of its priors positive has fewer negatives than
    3 per positive; next to an image with a larger quota, the batched mining must still keep
    all of its positives: the batch's loss equals the per-image losses, each weighted by its
    number of positives (single images are checked against the reference above)."""
    torch.manual_seed(0)
    priors = create_priors()
    crowded = cxcy_to_xy(priors[:6000])          # boxes equal to 6000 priors: >= 6000 positives
    medium = cxcy_to_xy(priors[:5776:4])         # conv4_3's first prior at each location
    boxes = [crowded, medium]
    labels = [torch.randint(1, 3, (len(b),)) for b in boxes]
    locs, scores = torch.randn(2, 8732, 4), torch.randn(2, 8732, 3) * 3
    loss_fn = MultiBoxLoss(priors)
    n_pos = [int((model.match_priors(b, lab, torch.zeros(len(b), dtype=torch.long), 1, priors)[1] > 0).sum())
             for b, lab in zip(boxes, labels)]
    # The case described: the crowded image has fewer negatives than the medium one's quota.
    assert n_pos[0] > 8732 / 4 and min(3 * n_pos[1], 8732 - n_pos[1]) > 8732 - n_pos[0]
    single = [loss_fn(locs[i:i + 1], scores[i:i + 1], [boxes[i]], [labels[i]]) for i in range(2)]
    batch = loss_fn(locs, scores, boxes, labels)
    for term in range(3):
        want = sum(float(s[term]) * n for s, n in zip(single, n_pos)) / sum(n_pos)
        assert float(batch[term]) == pytest.approx(want, rel=1e-5)
