"""convert_weights.py: torchvision's SSD300 and amdegroot/ssd.pytorch's layout, against their own
forward passes; converted checkpoints through eval, detect, export and fine-tuning."""
import itertools
import json
import math
import urllib.error
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision.models.detection import ssd300_vgg16
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

import convert_weights
import create_data_lists
import detect
import eval as evaluation
import export
import train
from datasets import PascalVOCDataset, model_input
from metrics import calculate_mAP, coco_metrics
from model import load_checkpoint, network_of
from shapes import SHAPE_CLASSES
from utils import cxcy_to_xy


def random_torchvision_ssd(seed, num_classes=91):
    """torchvision's SSD300-VGG16 with random weights; its class-score convolutions scaled by
    0.1, so that scores are spread out rather than saturated at 1 (ties would make the top-k
    order arbitrary)."""
    torch.manual_seed(seed)
    tv = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=num_classes).eval()
    with torch.no_grad():
        for conv in tv.head.classification_head.module_list:
            conv.weight.mul_(0.1)
    return tv


def normalised(images, spec):
    """0-1 RGB images (N, 3, S, S) normalised as a ModelInput says."""
    return (images - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)


def as_ours(checkpoint):
    """The network of a converted checkpoint (a dict), as load_checkpoint rebuilds it."""
    return network_of(checkpoint).eval()


# Larger, smaller, wider and taller than torchvision's 300 x 300 input.
SIZES = [(640, 480), (200, 150), (520, 180), (190, 470)]


def smooth_image(rng, size):
    """A random photo-like image: noise blurred by enlarging a coarse grid (bicubic)."""
    coarse = rng.integers(0, 256, (max(2, size[1] // 12), max(2, size[0] // 12), 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.BICUBIC)


@pytest.fixture(scope="module")
def coco_case(tmp_path_factory):
    """A seeded random-weight torchvision SSD300 with COCO's 91 classes, converted by the
    command; JPEGs of the sizes SIZES; and torchvision's own detections on them, from the
    0-1 tensors its users give it (to_tensor)."""
    folder = tmp_path_factory.mktemp("coco_case")
    tv = random_torchvision_ssd(seed=5)
    torch.save(tv.state_dict(), folder / "tv.pth")
    assert convert_weights.main(["torchvision", str(folder / "tv.pth"), "--out", str(folder / "ssd.pt")]) == 0
    rng = np.random.default_rng(0)
    paths = []
    for k, size in enumerate(SIZES):
        paths.append(folder / f"{k}.jpg")
        smooth_image(rng, size).save(paths[-1], quality=95)
    images = [Image.open(path).convert("RGB") for path in paths]
    with torch.no_grad():
        theirs = tv([torchvision.transforms.functional.to_tensor(image) for image in images])
    return SimpleNamespace(tv=tv, folder=folder, checkpoint=folder / "ssd.pt", state_dict=folder / "tv.pth",
                           paths=paths, images=images, theirs=theirs)


def test_torchvision_parity(coco_case):
    """On the same 300 x 300 input, as torchvision's model computes it: the raw heads per
    prior, the priors (its DefaultBoxGenerator), and the detections of its own transform and
    post-processing against ours with its settings."""
    tv = coco_case.tv
    net = as_ours(torch.load(coco_case.checkpoint, weights_only=True))
    images = torch.rand(2, 3, 300, 300, generator=torch.Generator().manual_seed(0))
    x = normalised(images, model_input(net.config))
    with torch.no_grad():
        features = list(tv.backbone(x).values())
        heads = tv.head(features)
        anchors = tv.anchor_generator(ImageList(x, [(300, 300)] * 2), features)[0]    # pixels, xyxy
        theirs = tv(list(images))        # 0-1 images: it normalises (and "resizes" 300 to 300)
        locs, scores = net(x)
        boxes, labels, found = net.detect_objects(locs, scores, tv.score_thresh, tv.nms_thresh,
                                                  tv.detections_per_img, tv.topk_candidates)
    # The same prior order: each prediction at the index of the same default box.
    assert torch.allclose(anchors, cxcy_to_xy(net.priors_cxcy) * 300, atol=1e-4)
    assert (locs - heads["bbox_regression"]).abs().max() <= 1e-4
    assert (scores - heads["cls_logits"]).abs().max() <= 1e-4 * max(1.0, float(scores.abs().max()))
    assert sum(len(b) for b in boxes) > 0
    for n, their in enumerate(theirs):
        assert torch.equal(labels[n], their["labels"])
        assert (boxes[n] * 300 - their["boxes"]).abs().max() / 300 <= 1e-3
        assert (found[n] - their["scores"]).abs().max() <= 1e-4


def found_again(theirs, ours, top=20):
    """(how many, of how many) of torchvision's `top` best detections per image `ours` finds
    again: the same label, IoU >= 0.99 and a score within 1e-3. ours: per image (boxes k x 4
    pixels, labels k, scores k)."""
    found = sought = 0
    for their, (boxes, labels, scores) in zip(theirs, ours):
        for box, label, score in zip(*(their[key][:top] for key in ("boxes", "labels", "scores"))):
            sought += 1
            same = (labels == label) & ((scores - score).abs() <= 1e-3)
            found += bool(same.any()) and float(box_iou(box[None], boxes[same].float()).max()) >= 0.99
    return found, sought


def lists_of(images, paths, label_map, folder):
    """Test lists of these images (no objects), for eval.py's data path."""
    folder.mkdir()
    (folder / "label_map.json").write_text(json.dumps(label_map))
    (folder / "TEST_images.json").write_text(json.dumps([str(p) for p in paths]))
    (folder / "TEST_objects.json").write_text(json.dumps(
        [{"boxes": [], "labels": [], "difficulties": [], "size": list(image.size)} for image in images]))
    return folder


def test_a_converted_torchvision_model_finds_its_detections_on_images_of_any_size(coco_case, tmp_path):
    """torchvision's own model(images) against the converted checkpoint through detect_batch,
    eval.py's data path (the images decoded and resized in the loader, and on the device), and
    the ONNX export: each finds >= 99% of torchvision's top 20 per image. With this
    repository's Pillow resize instead of torchvision's, far fewer: the resize is part of what
    the weights expect."""
    net, checkpoint = load_checkpoint(coco_case.checkpoint)
    assert model_input(net.config).resize == "torchvision"
    settings = dict(min_score=0.01, max_overlap=0.45, top_k=200)        # torchvision's
    ours = {"detect_batch": detect.detect_batch(net, coco_case.images, amp="off", **settings)}
    lists = lists_of(coco_case.images, coco_case.paths, checkpoint["config"]["label_map"], tmp_path / "lists")
    for decode in ("cpu", "device"):
        dataset = PascalVOCDataset(lists, "test", decode=decode, model_input=model_input(net.config))
        dets, _ = evaluation.predict(net, dataset, torch.device("cpu"), batch_size=4, workers=0, progress=False)
        ours[f"eval, decoded on the {decode}"] = detect.in_pixels(coco_case.images, *dets.values())
    out = tmp_path / "ssd.onnx"
    assert export.main([str(coco_case.checkpoint), "--out", str(out), "--check-images", str(coco_case.paths[0])]) == 0
    onnx = detect.OnnxDetector(out)
    assert onnx.model_input == model_input(net.config)                   # the resize recorded too
    ours["onnx"] = onnx.detect_batch(coco_case.images, settings["min_score"], settings["top_k"])
    for path, detections in ours.items():
        found, sought = found_again(coco_case.theirs, detections)
        assert sought == 20 * len(SIZES) and found >= 0.99 * sought, (path, found, sought)
    net.config["preprocessing"] = dict(net.config["preprocessing"], resize="pillow")
    found, sought = found_again(coco_case.theirs, detect.detect_batch(net, coco_case.images, amp="off", **settings))
    assert found < 0.9 * sought, found


def test_coco_lists_evaluate_a_converted_model_by_class_name(coco_case, tmp_path):
    """A COCO file with torchvision's category ids (1..90 with gaps), whose ground truth is the
    model's own surest detections, through create_data_lists.py --coco-test (labels 1..80) and
    eval.py: the VOC07 mAP and COCO AP the same metrics give on torchvision's own outputs."""
    categories = torchvision.models.detection.SSD300_VGG16_Weights.COCO_V1.meta["categories"]
    # Every detection above a score is true (about 3 per image), every other one false.
    threshold = torch.cat([t["scores"] for t in coco_case.theirs]).sort(descending=True).values[3 * len(SIZES)]
    truth = [{key: their[key][their["scores"] > threshold] for key in ("boxes", "labels")}
             for their in coco_case.theirs]
    annotations = [{"id": 100 * i + k, "image_id": i + 1, "category_id": int(label), "iscrowd": 0,
                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)}
                   for i, t in enumerate(truth) for k, ((x1, y1, x2, y2), label)
                   in enumerate(zip(t["boxes"].tolist(), t["labels"]))]
    coco = {"images": [{"id": i + 1, "file_name": path.name, "width": image.size[0], "height": image.size[1]}
                       for i, (path, image) in enumerate(zip(coco_case.paths, coco_case.images))],
            "annotations": annotations,
            "categories": [{"id": i, "name": name} for i, name in enumerate(categories) if name not in ("__background__", "N/A")]}
    (tmp_path / "val.json").write_text(json.dumps(coco))
    create_data_lists.main(["--coco-test", str(tmp_path / "val.json"), str(coco_case.folder),
                            "--output", str(tmp_path / "lists")])
    label_map = json.loads((tmp_path / "lists" / "label_map.json").read_text())
    assert len(label_map) == 81 and max(label_map.values()) == 80           # not torchvision's indices
    assert evaluation.main([str(coco_case.checkpoint), "--data-folder", str(tmp_path / "lists"), "--workers", "0",
                            "--amp", "off", "--out", str(tmp_path / "eval")]) == 0
    ours = json.loads((tmp_path / "eval" / "results.json").read_text())
    # The same metrics on torchvision's outputs, in its own indices (91 classes).
    theirs = [[t[key] for t in coco_case.theirs] for key in ("boxes", "labels", "scores")]
    gt = [[t[key] for t in truth] for key in ("boxes", "labels")]
    no_crowd = [torch.zeros(len(b), dtype=torch.bool) for b in gt[0]]
    expected_07 = calculate_mAP(*theirs, *gt, no_crowd, 91)[1]
    expected_coco = coco_metrics(*theirs, *gt, no_crowd, [image.size for image in coco_case.images], 91)[0]
    assert ours["mAP_07"] == pytest.approx(expected_07, abs=1e-6) and expected_07 > 0.99
    assert ours["coco"]["AP"] == pytest.approx(expected_coco["AP"], abs=1e-6) and expected_coco["AP"] > 0.99


def test_torch_hub_gives_the_networks_ready_to_detect(coco_case):
    """hubconf.py's entries through torch.hub's own loader: a checkpoint of this repository,
    and torchvision's COCO weights (here from a local state dict) converted on the fly."""
    root = str(Path(__file__).resolve().parents[1])
    from_checkpoint = torch.hub.load(root, "ssd300", checkpoint=str(coco_case.checkpoint), source="local")
    coco = torch.hub.load(root, "ssd300_coco", weights=str(coco_case.state_dict), source="local")
    assert not from_checkpoint.training and not coco.training
    assert coco.label_map == from_checkpoint.label_map and coco.label_map["stop sign"] == 13
    image = coco_case.images[1]
    found, sought = found_again(coco_case.theirs[1:2], [detect.detect(coco, image, min_score=0.01, amp="off")])
    assert found >= 0.99 * sought
    for a, b in zip(detect.detect(coco, image, amp="off"), detect.detect(from_checkpoint, image, amp="off")):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------ amdegroot

AMDEGROOT_VGG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "C", 512, 512, 512, "M", 512, 512, 512]
AMDEGROOT_EXTRAS = [(1024, 256, 1, 1, 0), (256, 512, 3, 2, 1), (512, 128, 1, 1, 0), (128, 256, 3, 2, 1),
                    (256, 128, 1, 1, 0), (128, 256, 3, 1, 0), (256, 128, 1, 1, 0), (128, 256, 3, 1, 0)]
AMDEGROOT_VOC = dict(feature_maps=[38, 19, 10, 5, 3, 1], min_dim=300, steps=[8, 16, 32, 64, 100, 300],
                     min_sizes=[30, 60, 111, 162, 213, 264], max_sizes=[60, 111, 162, 213, 264, 315],
                     aspect_ratios=[[2], [2, 3], [2, 3], [2, 3], [2], [2]], variance=[0.1, 0.2])


def amdegroot_state_dict(n_classes, seed):
    """Random weights in amdegroot/ssd.pytorch's layout, the sizes its ssd.py builds; the
    convolutions' scales chosen so that activations neither vanish nor explode."""
    g = torch.Generator().manual_seed(seed)

    def conv(prefix, c_in, c_out, k):
        state[f"{prefix}.weight"] = torch.randn(c_out, c_in, k, k, generator=g) * math.sqrt(2 / (c_in * k * k))
        state[f"{prefix}.bias"] = torch.randn(c_out, generator=g) * 0.01

    state, index, c = {}, 0, 3
    for v in AMDEGROOT_VGG:
        if v in ("M", "C"):
            index += 1
        else:
            conv(f"vgg.{index}", c, v, 3)
            c, index = v, index + 2
    conv("vgg.31", 512, 1024, 3)      # index 30 is pool5; conv6, relu, conv7
    conv("vgg.33", 1024, 1024, 1)
    for k, (c_in, c_out, size, _, _) in enumerate(AMDEGROOT_EXTRAS):
        conv(f"extras.{k}", c_in, c_out, size)
    sources = [512, 1024, 512, 256, 256, 256]
    boxes = [4, 6, 6, 6, 4, 4]
    for k, (c_in, b) in enumerate(zip(sources, boxes)):
        conv(f"loc.{k}", c_in, b * 4, 3)
        conv(f"conf.{k}", c_in, b * n_classes, 3)
    state["L2Norm.weight"] = torch.full((512,), 20.0) + torch.randn(512, generator=g)
    return state


def amdegroot_forward(state, x, n_classes):
    """A literal transcription of ssd.py's SSD.forward with functional ops: returns (loc
    N x P x 4, conf N x P x C)."""
    def conv(prefix, x, stride=1, padding=1, dilation=1):
        return F.conv2d(x, state[f"{prefix}.weight"], state[f"{prefix}.bias"], stride, padding, dilation)

    sources, index = [], 0
    for v in AMDEGROOT_VGG:                       # vgg[0:23]: up to conv4_3's relu, then vgg[23:]
        if v == "M":
            x = F.max_pool2d(x, 2, 2)
            index += 1
        elif v == "C":
            x = F.max_pool2d(x, 2, 2, ceil_mode=True)
            index += 1
        else:
            x = F.relu(conv(f"vgg.{index}", x))
            index += 2
        if index == 23:
            norm = x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10
            sources.append(state["L2Norm.weight"].view(1, -1, 1, 1) * (x / norm))
    x = F.max_pool2d(x, 3, 1, 1)
    x = F.relu(conv("vgg.31", x, padding=6, dilation=6))
    x = F.relu(conv("vgg.33", x, padding=0))
    sources.append(x)
    for k, (_, _, _, stride, padding) in enumerate(AMDEGROOT_EXTRAS):
        x = F.relu(conv(f"extras.{k}", x, stride, padding))
        if k % 2 == 1:
            sources.append(x)
    loc = torch.cat([conv(f"loc.{k}", s).permute(0, 2, 3, 1).reshape(len(x), -1) for k, s in enumerate(sources)], 1)
    conf = torch.cat([conv(f"conf.{k}", s).permute(0, 2, 3, 1).reshape(len(x), -1) for k, s in enumerate(sources)], 1)
    return loc.view(len(x), -1, 4), conf.view(len(x), -1, n_classes)


def amdegroot_priors(cfg):
    """layers/functions/prior_box.py's PriorBox.forward, transcribed: (P, 4) cx, cy, w, h."""
    mean = []
    for k, f in enumerate(cfg["feature_maps"]):
        for i, j in itertools.product(range(f), repeat=2):
            f_k = cfg["min_dim"] / cfg["steps"][k]
            cx, cy = (j + 0.5) / f_k, (i + 0.5) / f_k
            s_k = cfg["min_sizes"][k] / cfg["min_dim"]
            mean += [cx, cy, s_k, s_k]
            s_k_prime = math.sqrt(s_k * (cfg["max_sizes"][k] / cfg["min_dim"]))
            mean += [cx, cy, s_k_prime, s_k_prime]
            for ar in cfg["aspect_ratios"][k]:
                mean += [cx, cy, s_k * math.sqrt(ar), s_k / math.sqrt(ar)]
                mean += [cx, cy, s_k / math.sqrt(ar), s_k * math.sqrt(ar)]
    return torch.tensor(mean).view(-1, 4).clamp(min=0, max=1)


def amdegroot_decode(loc, priors, variances):
    """layers/box_utils.py's decode: offsets (P, 4) -> corners (P, 4)."""
    boxes = torch.cat((priors[:, :2] + loc[:, :2] * variances[0] * priors[:, 2:],
                       priors[:, 2:] * torch.exp(loc[:, 2:] * variances[1])), 1)
    boxes[:, :2] -= boxes[:, 2:] / 2
    boxes[:, 2:] += boxes[:, :2]
    return boxes


def amdegroot_base_transform(bgr, size=300, mean=(104, 117, 123)):
    """utils/augmentations.py's base_transform, then voc0712.py's turn to RGB and to a tensor:
    OpenCV's BGR pixels resized by cv2.resize, less Caffe's BGR mean. (3, size, size)."""
    cv2 = pytest.importorskip("cv2")
    x = cv2.resize(bgr, (size, size)).astype(np.float32)
    x -= np.array(mean, dtype=np.float32)
    return torch.from_numpy(x[:, :, (2, 1, 0)].copy()).permute(2, 0, 1)


def test_amdegroot_layout_gives_their_boxes_and_scores():
    """Images that need resizing, through their BaseTransform and forward pass, against ours
    through detect.py's input (OpenCV's resize, recorded by the conversion)."""
    state = amdegroot_state_dict(21, seed=0)
    net = as_ours(convert_weights.convert({"module." + k: v for k, v in state.items()},
                                          convert_weights.LAYOUTS["amdegroot"]))
    assert net.config["priors"]["steps"] == AMDEGROOT_VOC["steps"]
    rng = np.random.default_rng(0)
    images = [smooth_image(rng, size) for size in ((500, 375), (240, 320))]
    theirs_in = torch.stack([amdegroot_base_transform(np.asarray(image)[..., ::-1].copy()) for image in images])
    ours_in = detect.input_batch(images, model_input(net.config))
    assert torch.allclose(ours_in, theirs_in, atol=1e-4)
    with torch.no_grad():
        their_loc, their_conf = amdegroot_forward(state, theirs_in, 21)
        locs, scores = net(ours_in)
        ours = net.detect_objects(locs, scores)
    priors = amdegroot_priors(AMDEGROOT_VOC)
    assert torch.allclose(net.priors_cxcy, priors, atol=1e-6)
    assert torch.allclose(scores.softmax(-1), their_conf.softmax(-1), atol=1e-5)
    for n in range(2):
        their_boxes = amdegroot_decode(their_loc[n], priors, AMDEGROOT_VOC["variance"]).clamp(0, 1)
        assert torch.allclose(locs[n], their_loc[n], atol=1e-4)
        # Each of our detections is their decoded box of some prior, with its softmax score.
        for box, label, score in zip(*(t[n] for t in ours)):
            match = (their_boxes - box).abs().max(dim=1).values < 1e-4
            assert match.any() and torch.isclose(their_conf[n].softmax(-1)[match, label], score, atol=1e-5).any()


def test_a_foreign_layout_is_refused_naming_what_is_missing():
    state = amdegroot_state_dict(21, seed=0)
    with pytest.raises(ValueError, match="torchvision"):
        convert_weights.convert(state, convert_weights.LAYOUTS["torchvision"])
    del state["extras.3.weight"]
    with pytest.raises(ValueError, match="no extras.3.weight"):
        convert_weights.convert(state, convert_weights.LAYOUTS["amdegroot"])
    with pytest.raises(ValueError, match="20 classes besides the background, but 3"):
        convert_weights.convert(amdegroot_state_dict(21, 1), convert_weights.LAYOUTS["amdegroot"], ["a", "b", "c"])


# ------------------------------------------------------------------------------ the command

def test_offline_conversion_fails_in_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    out = tmp_path / "ssd300_coco.pt"
    assert convert_weights.main(["torchvision", "--out", str(out)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "could not download" in error and "torchvision FILE" in error
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A torchvision SSD300 for the shapes classes, saved and converted by the command."""
    folder = tmp_path_factory.mktemp("converted")
    tv = random_torchvision_ssd(3, num_classes=len(SHAPE_CLASSES) + 1)
    torch.save(tv.state_dict(), folder / "tv.pth")
    assert convert_weights.main(["torchvision", str(folder / "tv.pth"), "--out", str(folder / "ssd.pt"),
                                 "--classes", *SHAPE_CLASSES]) == 0
    return folder / "ssd.pt"


def test_converted_checkpoint_loads_weights_only_and_records_what_it_expects(converted):
    checkpoint = torch.load(converted, map_location="cpu", weights_only=True)
    config = checkpoint["config"]
    assert config["preprocessing"]["std"] == [1 / 255] * 3 and config["priors"]["clip"] == "sizes"
    assert config["label_map"] == {"background": 0, **{c: i for i, c in enumerate(SHAPE_CLASSES, 1)}}
    net, _ = load_checkpoint(converted)
    assert model_input(net.config).mean == (0.48235, 0.45882, 0.40784)


def test_coco_names_keep_torchvision_indices():
    label_map = convert_weights.label_map_of(convert_weights.LAYOUTS["torchvision"].classes)
    assert len(label_map) == 81 and label_map["person"] == 1 and label_map["stop sign"] == 13
    assert max(label_map.values()) == 90


@pytest.fixture(scope="module")
def few_test_images(shapes_lists, tmp_path_factory):
    """The shapes lists with only 4 test images: evaluating a full-width network is slow."""
    folder = tmp_path_factory.mktemp("few")
    (folder / "label_map.json").write_text((shapes_lists / "label_map.json").read_text())
    for name in ("TEST_images.json", "TEST_objects.json"):
        (folder / name).write_text(json.dumps(json.loads((shapes_lists / name).read_text())[:4]))
    return folder


def test_converted_checkpoint_evaluates_and_detects(converted, few_test_images, shapes_root, tmp_path):
    assert evaluation.main([str(converted), "--data-folder", str(few_test_images), "--out", str(tmp_path),
                            "--workers", "0", "--amp", "off"]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["mAP_07"] is not None
    images = sorted((shapes_root / "JPEGImages").glob("*.jpg"))[:2]
    assert detect.main([str(converted), *map(str, images), "--out", str(tmp_path / "det"),
                        "--min-score", "0.05", "--amp", "off"]) == 0
    assert len(json.loads((tmp_path / "det" / "detections.json").read_text())) == 2


def test_eval_of_a_converted_checkpoint_asks_for_the_data(converted, capsys):
    assert evaluation.main([str(converted)]) == 2
    assert "--data-folder" in capsys.readouterr().err


def test_fine_tuning_from_a_converted_checkpoint(converted, shapes_lists, tmp_path):
    out = tmp_path / "run"
    assert train.main(["--iterations", "1", "--batch-size", "2", "--workers", "0", "--amp", "off",
                       "--data-folder", str(shapes_lists), "--out", str(out), "--init-from", str(converted)]) == 0
    config = torch.load(out / "checkpoint.pt", weights_only=True)["config"]
    source = torch.load(converted, weights_only=True)["config"]
    assert config["priors"] == source["priors"]
    # Its normalisation, but this repository's resize: it learns from Pillow-resized samples.
    assert config["preprocessing"] == {k: source["preprocessing"][k] for k in ("mean", "std")}
