"""Speed of the pieces that matter, on this machine: a benchmark, not a test.

    python benchmark.py                      # every section, CPU, 2 threads
    python benchmark.py model loss detect    # some sections
    python benchmark.py train eval --device cuda
    python benchmark.py pipeline --device cuda --workers 8

Sections:
  model       for each base (VGG16, ResNet-34): parameters, FLOPs, and forward ms/image at
              batch 1 and 8 (fp32; bf16 autocast + channels_last), against the bf16 compute
              floor (the model's FLOPs over this machine's bf16 matmul rate)
  loss        MultiBoxLoss forward + backward at batch 8 and 32
  detect      detect_objects ms/image at batch 8 (min score 0.01, NMS 0.45, top 200), for random
              scores and for scores shaped like a trained model's, beside torchvision's SSD
              post-processing (SSD.postprocess_detections) on the same inputs, timed in turn
  transforms  training transform images/s in one process (JPEG decode included, 500x375), and
              DataLoader images/s with 2 workers
  map         calculate_mAP at VOC2007-test size (4952 images, ~15k objects, 200 dets/image),
              and metrics.coco_metrics (faster-coco-eval) on the same input
  coco        create_data_lists.py on a synthetic COCO-train2017-sized annotation file (118,287
              images, 860,001 boxes, a 16-point polygon each), JSON reading included, no image
              decoded (the image files exist, empty)
  data        the training lists at COCO train2017's size and at 10x (1.18 M images, ~8.9 M
              boxes), as Python objects (the layout before, COCO's size only), as flat tensors
              from the JSON and from the memory-mapped binary form: their memory in the
              training process, start-up (lists to first batch) and each loader worker's
              private-memory growth over 24,000 random samples, with 2 and 8 workers (Linux)
  train       training images/s at batch 8 (on CUDA also 32 and 64, to pick the batch
              size): both bases at full width (all layers trained, and conv1_x-conv2_x frozen
              as train.py has them from ImageNet weights) and at the toy preset's, fp32 and
              bf16 + channels_last (CPU) or without and with AMP (CUDA)
  pipeline    end-to-end training images/s (train.py's loop: loading, augmentation, step) on
              500x375 JPEGs, CPU (PIL) augmentation against --gpu-augment (on CUDA also with
              --compile), beside the synthetic step rate at the same settings: VGG16 at batch
              32 on CUDA, the toy preset on a CPU; --workers loading processes. Also
              --gpu-augment's decoding and augmentation alone (render_batch): images/s, the
              host's time per batch, tensor operations per image
  eval        evaluation images/s of eval.predict (data loading, network and decoding), both
              bases at full and toy width, on untrained weights (more boxes reach NMS than
              with a trained model); on CUDA also with the JPEGs decoded there (--gpu-decode)
  deploy      CPU latency at batch 1 and 8 of the whole detector (network and decoding at the
              paper's settings) for SSD300-VGG16, SSD300-ResNet34 and SSD512-VGG16, random
              weights with a trained model's confidence in the background: PyTorch fp32,
              PyTorch in what --amp auto picks, onnxruntime running export.py's graph in fp32
              and INT8 (--int8), against the INT8 compute floor (needs onnx and onnxruntime)
Prints a Markdown table; figures in docs/benchmarks.md came from this script.
"""
import argparse
import contextlib
import copy
import io
import itertools
import json
import multiprocessing
import random
import statistics
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.ssd import SSD

import create_data_lists
import datasets
import metrics
import model
import shapes
import train
import utils
from eval import predict
from gpu_augment import render_batch
from priors import CENTRE_VARIANCE, SIZE_VARIANCE, create_priors

ROWS = []


def report(section, what, value, unit, note=""):
    ROWS.append((section, what, value, unit, note))
    print(f"| {section} | {what} | {value:.4g} | {unit} | {note} |", flush=True)


def timed(fn, device, repeats=5, warmup=2):
    """Median seconds of fn() over `repeats` calls, after `warmup` calls."""
    return timed_alternately([fn], device, repeats, warmup)[0]


def timed_alternately(fns, device, repeats=5, warmup=2):
    """Median seconds of each of fns, called in turn: a load that changes during the run
    then weighs on all of them alike, so their ratios hold on a busy machine."""
    times = [[] for _ in fns]
    for round_ in range(warmup + repeats):
        for fn, fn_times in zip(fns, times):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_ >= warmup:
                fn_times.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def timed_in_blocks(fns, device, rounds=2, repeats=5, warmup=2):
    """The median seconds of each of fns, each timed in a block of its own calls (`timed`),
    the blocks in turn `rounds` times; the smaller of a fn's medians. For runtimes that share
    the cores (PyTorch's OpenMP threads, onnxruntime's pool): alternating single calls would
    time each one against the other's threads still spinning after their work."""
    return [min(medians) for medians in zip(*([timed(fn, device, repeats, warmup) for fn in fns]
                                               for _ in range(rounds)))]


def random_targets(n_images, n_classes, generator, max_objects=6):
    """VOC-like targets: 1..max_objects boxes per image (VOC averages ~2.5)."""
    boxes, labels = [], []
    for _ in range(n_images):
        n = int(torch.randint(1, max_objects + 1, (), generator=generator))
        wh = 0.05 + 0.5 * torch.rand(n, 2, generator=generator)
        xy = torch.rand(n, 2, generator=generator) * (1 - wh)
        boxes.append(torch.cat([xy, xy + wh], 1))
        labels.append(torch.randint(1, n_classes, (n,), generator=generator))
    return boxes, labels


def bf16_matmul_rate(device):
    """FLOP/s of a large bf16 matrix product: the compute ceiling convolutions can reach."""
    n = 4096 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device).bfloat16()
    b = torch.randn(n, n, device=device).bfloat16()
    return 2 * n ** 3 / timed(lambda: a @ b, device, repeats=10)


# The networks compared: (name, backbone, width).
BASES = [("SSD300-VGG16", "vgg16", 1.0), ("SSD300-ResNet34", "resnet34", 1.0)]
TOY = [(f"toy preset, {name.split('-')[1]}", backbone, train.PRESETS["toy"]["width"])
       for name, backbone, _ in BASES]


def section_model(device, args):
    rate = bf16_matmul_rate(device)
    report("model", "bf16 matmul rate", rate / 1e9, "GFLOP/s", "the compute ceiling")
    for name, backbone, width in BASES:
        net = model.SSD(21, backbone, width=width).to(device).eval()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            net(torch.randn(1, 3, 300, 300, device=device))
        flops = counter.get_total_flops()
        report("model", f"{name} forward FLOPs", flops / 1e9, "GFLOP/image",
               f"{sum(p.numel() for p in net.parameters()):,} parameters (21 classes)")
        floor_ms = flops / rate * 1e3
        report("model", f"{name} bf16 compute floor", floor_ms, "ms/image")
        net_cl = model.SSD(21, backbone, width=width).to(device, memory_format=torch.channels_last).eval()
        for batch in (1, 8):
            x = torch.randn(batch, 3, 300, 300, device=device)
            with torch.no_grad():
                t = timed(lambda: net(x), device, repeats=3)
            report("model", f"{name} forward fp32, batch {batch}", t / batch * 1e3, "ms/image",
                   f"{batch / t:.1f} images/s")
            x_cl = x.to(memory_format=torch.channels_last)
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                t = timed(lambda: net_cl(x_cl), device, repeats=3)
            report("model", f"{name} forward bf16 + channels_last, batch {batch}", t / batch * 1e3,
                   "ms/image", f"{batch / t:.1f} images/s, {t / batch * 1e3 / floor_ms:.2f} x the floor")


def section_loss(device, args):
    g = torch.Generator().manual_seed(0)
    criterion = model.MultiBoxLoss(create_priors().to(device))
    for batch in (8, 32):
        boxes, labels = random_targets(batch, 21, g)
        boxes = [b.to(device) for b in boxes]
        labels = [lab.to(device) for lab in labels]
        locs = torch.randn(batch, 8732, 4, device=device, requires_grad=True)
        scores = torch.randn(batch, 8732, 21, device=device, requires_grad=True)
        t = timed(lambda: criterion(locs, scores, boxes, labels)[0].backward(), device, repeats=10)
        report("loss", f"MultiBoxLoss forward + backward, batch {batch}", t * 1e3, "ms")


def trained_like_scores(batch, n_classes, generator, device):
    """Nearly every prior confidently background; about 1% of them (clustered near objects in
    a real model) lean towards one class with a probability anywhere from ~0.02 to ~0.98."""
    scores = torch.randn(batch, 8732, n_classes, generator=generator)
    scores[..., 0] += 10
    hot = (torch.rand(batch, 8732, generator=generator) < 0.01).nonzero(as_tuple=True)
    classes = torch.randint(1, n_classes, (len(hot[0]),), generator=generator)
    scores[hot + (classes,)] = 10 + 8 * torch.rand(len(classes), generator=generator) - 4
    return scores.to(device)


def torchvision_postprocess(locs, scores, priors, decoding=utils.EVAL_DECODING):
    """torchvision's SSD post-processing, its own code (SSD.postprocess_detections) on our
    heads' outputs: per image a softmax, per class the scores above min_score and the top
    per_class_top_k of them, batched_nms, the top_k best. Boxes in a 1 x 1 image (fractions);
    BoxCoder's weights are our variances' inverses. locs N x P x 4, scores N x P x C,
    priors P x 4 centre-size. Returns torchvision's list of dicts."""
    settings = SimpleNamespace(
        box_coder=BoxCoder(weights=(1 / CENTRE_VARIANCE,) * 2 + (1 / SIZE_VARIANCE,) * 2),
        score_thresh=decoding.min_score, nms_thresh=decoding.max_overlap,
        topk_candidates=decoding.per_class_top_k, detections_per_img=decoding.top_k)
    n = len(locs)
    return SSD.postprocess_detections(settings, {"bbox_regression": locs, "cls_logits": scores},
                                      [utils.cxcy_to_xy(priors)] * n, [(1, 1)] * n)


def section_detect(device, args):
    g = torch.Generator().manual_seed(0)
    priors = create_priors().to(device)
    batch = 8
    locs = (0.5 * torch.randn(batch, 8732, 4, generator=g)).to(device)
    for name, scores in (("random scores", torch.randn(batch, 8732, 21, generator=g).to(device)),
                         ("trained-like scores", trained_like_scores(batch, 21, g, device))):
        t, t_tv = timed_alternately([lambda: model.detect_objects(locs, scores, priors),
                                     lambda: torchvision_postprocess(locs, scores, priors)], device)
        n = sum(len(b) for b in model.detect_objects(locs, scores, priors)[0])
        report("detect", f"detect_objects, {name}, batch {batch}", t / batch * 1e3, "ms/image",
               f"{n / batch:.0f} detections/image, {t / t_tv:.2f} x torchvision's time")
        report("detect", f"torchvision SSD postprocess_detections, {name}, batch {batch}",
               t_tv / batch * 1e3, "ms/image", "the same inputs and settings")


def section_transforms(device, args):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dataset = datasets.PascalVOCDataset(shapes_lists(root, 64, 8, size=(500, 375)), "train")
        torch.set_num_threads(1)      # one process, as a DataLoader worker runs
        n = len(dataset)
        start = time.perf_counter()
        for epoch in range(3):
            dataset.set_epoch(epoch)
            for i in range(n):
                dataset[i]
        report("transforms", "training transform, one process", 3 * n / (time.perf_counter() - start),
               "images/s", "500x375 JPEG decode included")
        torch.set_num_threads(args.threads)
        loader = torch.utils.data.DataLoader(dataset, batch_size=16, num_workers=2, shuffle=True,
                                             collate_fn=datasets.collate_fn, persistent_workers=True)
        for _ in loader:                                                 # start the workers
            break
        start = time.perf_counter()
        for epoch in range(3):
            dataset.set_epoch(epoch)
            for _ in loader:
                pass
        report("transforms", "DataLoader, 2 workers", 3 * (n // 16 * 16) / (time.perf_counter() - start),
               "images/s", "batch 16")


def shapes_lists(root, n_trainval, n_test, size=None):
    """A shapes dataset under root/voc (rescaled to `size` if given) and its lists, quietly."""
    shapes.make_shapes_dataset(root / "voc", n_trainval=n_trainval, n_test=n_test, seed=1)
    if size:
        resize_voc_layout(root / "voc", size)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        create_data_lists.main(["--root", str(root / "voc"), "--output", str(root / "lists")])
    return root / "lists"


def resize_voc_layout(root, size):
    """Rescale a VOC-layout folder's images and boxes to `size` (w, h), in place."""
    for xml_path in (root / "Annotations").glob("*.xml"):
        tree = ET.parse(xml_path)
        w, h = int(tree.find("size/width").text), int(tree.find("size/height").text)
        sx, sy = size[0] / w, size[1] / h
        tree.find("size/width").text, tree.find("size/height").text = str(size[0]), str(size[1])
        for box in tree.iter("bndbox"):
            for tag, s, limit in (("xmin", sx, size[0]), ("xmax", sx, size[0]),
                                  ("ymin", sy, size[1]), ("ymax", sy, size[1])):
                v = float(box.find(tag).text)
                box.find(tag).text = str(min(limit, max(1, round(v * s))))
        tree.write(xml_path)
        image_path = root / "JPEGImages" / f"{xml_path.stem}.jpg"
        Image.open(image_path).convert("RGB").resize(size).save(image_path, quality=90)


def voc_sized_map_input(n_images=4952, n_classes=21, dets_per_image=200, seed=0):
    """Random VOC2007-test-sized evaluation input in 500x375 pixels: 1..5 objects per image
    (~3, 10% difficult); a quarter of the detections jittered copies of objects, the rest
    random boxes; random scores."""
    g = torch.Generator().manual_seed(seed)
    size = torch.tensor([500.0, 375.0, 500.0, 375.0])

    def boxes_(n):
        xy = torch.rand(n, 2, generator=g) * 0.8
        wh = 0.05 + torch.rand(n, 2, generator=g) * (1 - xy - 0.05).clamp(min=0.01)
        return torch.cat([xy, xy + wh], 1) * size

    out = [[] for _ in range(6)]
    for _ in range(n_images):
        n_obj = int(torch.randint(1, 6, (), generator=g))
        boxes, labels = boxes_(n_obj), torch.randint(1, n_classes, (n_obj,), generator=g)
        n_near = dets_per_image // 4
        src = torch.randint(0, n_obj, (n_near,), generator=g)
        wh = (boxes[src, 2:] - boxes[src, :2]).repeat(1, 2)
        near = boxes[src] + torch.randn(n_near, 4, generator=g) * 0.1 * wh
        near_labels = torch.where(torch.rand(n_near, generator=g) < 0.8, labels[src],
                                  torch.randint(1, n_classes, (n_near,), generator=g))
        far_labels = torch.randint(1, n_classes, (dets_per_image - n_near,), generator=g)
        values = (torch.cat([near, boxes_(dets_per_image - n_near)]), torch.cat([near_labels, far_labels]),
                  torch.rand(dets_per_image, generator=g), boxes, labels,
                  torch.rand(n_obj, generator=g) < 0.1)
        for column, v in zip(out, values):
            column.append(v)
    return out


def section_map(device, args):
    inputs = voc_sized_map_input()
    n_objects = sum(len(t) for t in inputs[4])
    for use_07 in (True, False):
        t = timed(lambda: metrics.calculate_mAP(*inputs, n_classes=21, use_07_metric=use_07),
                  torch.device("cpu"), repeats=5, warmup=1)
        report("map", f"calculate_mAP, {'11-point' if use_07 else 'area'}", t, "s",
               f"4952 images, {n_objects} objects, 990,400 detections")
    sizes = [(500, 375)] * len(inputs[4])
    t = timed(lambda: metrics.coco_metrics(*inputs, sizes, n_classes=21), torch.device("cpu"),
              repeats=3, warmup=1)
    report("map", "coco_metrics (faster-coco-eval)", t, "s", "the same input, boxes in pixels")


def synthetic_coco(folder, n_images=118_287, n_boxes=860_001, n_categories=80, seed=0):
    """A COCO-train2017-sized annotation file in `folder` (and its images, as empty files):
    sizes, categories with non-contiguous ids, 1% crowd boxes, a polygon per box as in the real
    file (whose reading it dominates). Returns (JSON path, image folder)."""
    rng = random.Random(seed)
    category_ids = [1 + 90 * c // n_categories for c in range(n_categories)]   # 1..90 with gaps
    images_dir = Path(folder) / "images"
    images_dir.mkdir()
    images = [{"id": i * 3 + 1, "file_name": f"{i:012d}.jpg", "width": rng.randint(200, 640),
               "height": rng.randint(200, 640), "license": 1, "date_captured": "2013-11-14 16:28:13"}
              for i in range(n_images)]
    for image in images:
        (images_dir / image["file_name"]).touch()
    annotations = []
    for k in range(n_boxes):
        image = images[rng.randrange(n_images)]
        w, h = rng.uniform(1, image["width"] / 2), rng.uniform(1, image["height"] / 2)
        x, y = rng.uniform(0, image["width"] - w), rng.uniform(0, image["height"] - h)
        polygon = [round(v, 2) for _ in range(16) for v in (x + rng.uniform(0, w), y + rng.uniform(0, h))]
        annotations.append({"segmentation": [polygon], "area": round(w * h * 0.6, 2), "iscrowd": int(rng.random() < 0.01),
                            "image_id": image["id"], "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)],
                            "category_id": rng.choice(category_ids),
                            "id": 1_000_000 + k})
    categories = [{"supercategory": "thing", "id": i, "name": f"class {i}"} for i in category_ids]
    path = Path(folder) / "instances_train.json"
    path.write_text(json.dumps({"info": {}, "licenses": [], "images": images,
                                "annotations": annotations, "categories": categories}))
    return path, images_dir


def section_coco(device, args):
    with tempfile.TemporaryDirectory() as tmp:
        path, images = synthetic_coco(tmp)
        size_mb = path.stat().st_size / 1e6
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            create_data_lists.main(["--coco-train", str(path), str(images), "--test-fraction", "0.01",
                                    "--output", str(Path(tmp) / "lists")])
        report("coco", "create_data_lists.py --coco-train, COCO-train2017-sized", time.perf_counter() - start,
               "s", f"118,287 images, 860,001 boxes, {size_mb:.0f} MB; target < 60 s")


# ----------------------------------------------------------------------------------------------
# Lists at scale: memory and start-up (section data)

COCO_TRAIN = (118_287, 7.5)                 # images and boxes per image (train2017: 860,001 boxes)
PROBE_INPUT = datasets.ModelInput(32, datasets.IMAGENET_MEAN, datasets.IMAGENET_STD)  # cheap items


def synthetic_lists(folder, n_images, boxes_per_image, seed=0):
    """JSON lists (and the binary form create_data_lists.py writes) of n_images entries, about
    boxes_per_image random boxes each (Poisson), every path the same 48x48 JPEG under a
    COCO-like name. Returns seconds spent on the binary form."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    image = folder / "coco" / "train2017" / "000000391895.jpg"
    image.parent.mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(image)
    counts = rng.poisson(boxes_per_image, n_images)
    corners = np.sort(rng.uniform(0, 47.9, (int(counts.sum()), 2, 2)), axis=1).round(1)
    corners[:, 1] += 0.1                                         # never empty
    boxes = corners.reshape(-1, 4).tolist()
    labels = rng.integers(1, 81, len(boxes)).tolist()
    ends = np.concatenate([[0], counts.cumsum()]).tolist()
    objects = [{"boxes": boxes[a:b], "labels": labels[a:b], "difficulties": [0] * (b - a), "size": [48, 48]}
               for a, b in zip(ends[:-1], ends[1:])]
    images = [str(image)] * n_images
    (folder / "label_map.json").write_text(json.dumps({"background": 0, **{f"c{i}": i for i in range(1, 81)}}))
    for name, data in (("TRAIN_images.json", images), ("TRAIN_objects.json", objects)):
        with open(folder / name, "w") as f:
            json.dump(data, f)
    start = time.perf_counter()
    datasets.ImageLists.from_json(images, objects).save(
        folder / "TRAIN_lists.pt", datasets.lists_fingerprint([folder / "TRAIN_images.json", folder / "TRAIN_objects.json"]))
    return time.perf_counter() - start


class PythonObjectLists(torch.utils.data.Dataset):
    """For reference, the layout before ImageLists: the JSON lists kept as Python objects (a
    dict per image, a list per box), each item built from them."""

    def __init__(self, folder, model_input):
        self.images = json.loads((Path(folder) / "TRAIN_images.json").read_text())
        self.objects = json.loads((Path(folder) / "TRAIN_objects.json").read_text())
        self.model_input = model_input

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        entry = self.objects[i]
        image = datasets.load_image(self.images[i], entry["size"])
        boxes = torch.tensor(entry["boxes"], dtype=torch.float32).reshape(-1, 4)
        return datasets.eval_transform(image, boxes, torch.tensor(entry["labels"]),
                                       torch.tensor(entry["difficulties"], dtype=torch.bool), self.model_input)


def memory_kib(pid="self", fields=("Rss",)):
    """The sum of these fields of /proc/PID/smaps_rollup, in KiB (Linux)."""
    values = dict(line.split(":") for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    return sum(int(values[field].split()[0]) for field in fields)


def private_kib(pid):
    """A process's unique set size (USS): the pages no other process maps."""
    return memory_kib(pid, ("Private_Clean", "Private_Dirty"))


def lists_probe(folder, layout, workers, samples_per_worker, gc_frozen, results):
    """In a fresh process: the lists' memory, start-up (lists to first batch), and each loader
    worker's private-memory growth over samples_per_worker random samples (put into `results`)."""
    torch.set_num_threads(1)
    before = memory_kib()
    start = time.perf_counter()
    dataset = (PythonObjectLists(folder, PROBE_INPUT) if layout == "python" else
               datasets.PascalVOCDataset(folder, "train", augment=False, model_input=PROBE_INPUT))
    ready = time.perf_counter() - start
    lists_mib = (memory_kib() - before) / 1024
    batch = 64
    order = torch.randint(len(dataset), (workers * samples_per_worker,), generator=torch.Generator().manual_seed(0))
    # Forked, as train.py's workers are on Linux (this spawned process would spawn them), and
    # started as train.py starts them (datasets.start_loading), or with gc_frozen False plainly.
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=order.tolist(), num_workers=workers,
                                         collate_fn=datasets.collate_fn, multiprocessing_context="fork")
    loader = datasets.start_loading(loader) if gc_frozen else iter(loader)
    next(loader)
    first_batch = time.perf_counter() - start
    pids = [child.pid for child in multiprocessing.active_children()]
    early = [private_kib(pid) for pid in pids]
    for _ in range(-(-len(order) // batch) - 2):
        next(loader)
    late = [private_kib(pid) for pid in pids]          # before the last batch: workers still there
    results.put(dict(ready=ready, first_batch=first_batch, lists_mib=lists_mib,
                     growth_mib=max(b - a for a, b in zip(early, late)) / 1024,
                     private_mib=max(late) / 1024))


def probe_lists(folder, layout, workers, samples_per_worker, gc_frozen=True):
    """lists_probe in a spawned (fresh) interpreter; its results."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=lists_probe, args=(folder, layout, workers, samples_per_worker, gc_frozen, results))
    process.start()
    process.join()
    if process.exitcode:
        raise RuntimeError(f"the {layout} probe of {folder} failed (exit status {process.exitcode})")
    return results.get()


def offer_binary_form(folder, offered):
    """Put the binary form of the lists in `folder` where the dataset looks for it, or aside."""
    there, aside = folder / "TRAIN_lists.pt", folder / "binary.pt"
    if offered and aside.exists():
        aside.rename(there)
    elif not offered and there.exists():
        there.rename(aside)


def section_data(device, args):
    samples = 24_000
    labels = {("python", False): "Python objects, workers started plainly (before)",
              ("binary", False): "flat tensors, binary form, workers started plainly",
              ("json", True): "flat tensors read from the JSON",
              ("binary", True): "flat tensors, binary form memory-mapped"}
    for scale, probes in ((1, (("python", False), ("binary", False), ("json", True), ("binary", True))),
                          (10, (("json", True), ("binary", True)))):
        n = COCO_TRAIN[0] * scale
        name = "COCO train2017" if scale == 1 else f"{scale}x COCO train2017"
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "lists"
            binary_s = synthetic_lists(folder, n, COCO_TRAIN[1])
            report("data", f"{name}: writing the binary form", binary_s, "s",
                   f"{n:,} images; TRAIN_lists.pt {(folder / 'TRAIN_lists.pt').stat().st_size / 2 ** 20:.0f} MiB")
            for layout, gc_frozen in probes:
                offer_binary_form(folder, layout == "binary")
                for workers in (2, 8):
                    r = probe_lists(folder, layout, workers, samples, gc_frozen)
                    where = f"{name}, {labels[layout, gc_frozen]}, {workers} workers"
                    report("data", f"{where}: lists in the training process", r["lists_mib"], "MiB",
                           f"RSS after reading them, less before; ready in {r['ready']:.1f} s")
                    report("data", f"{where}: start-up, lists to first batch", r["first_batch"], "s")
                    report("data", f"{where}: a worker's private memory growth", r["growth_mib"], "MiB",
                           f"USS, largest of the workers, over {samples:,} random samples each; "
                           f"{r['private_mib']:.0f} MiB at the end")


def step_rate(device, batch, backbone, width, dtype, fmt, repeats, n_classes=21, **config):
    """Training images/s of whole steps (forward, loss, backward, optimiser) on a synthetic
    batch, no data loading; config: train.py settings for the network and optimiser."""
    g = torch.Generator().manual_seed(0)
    boxes, labels = random_targets(batch, n_classes, g)
    boxes = [b.to(device) for b in boxes]
    labels = [lab.to(device) for lab in labels]
    net = model.SSD(n_classes, backbone, width=width, base_bn=config.get("base_bn"))
    net = net.to(device, memory_format=fmt).train()
    net.freeze(config.get("freeze") or "none")
    criterion = model.MultiBoxLoss(net.priors_cxcy)
    optimizer = train.make_optimizer(net, dict(dict(weight_decay=5e-4, lr=1e-3, momentum=0.9), **config))
    x = torch.randn(batch, 3, 300, 300, generator=g).to(device, memory_format=fmt)
    scaler = torch.amp.GradScaler(device.type, enabled=False)

    def step():
        loss = train.forward_loss(net, criterion, x, boxes, labels, dtype)[0]
        train.backward_step(loss, optimizer, scaler)
    return batch / timed(step, device, repeats=repeats, warmup=2)


def section_train(device, args):
    """Whole training steps (forward, loss, backward, SGD) on synthetic batches: no data loading."""
    on_cuda = device.type == "cuda"
    modes = [("fp32, no AMP", None), ("bf16 AMP", torch.bfloat16)] if on_cuda else \
        [("fp32", None), ("bf16 autocast", torch.bfloat16)]
    for batch in ((8, 32, 64) if on_cuda else (8,)):
        for (name, backbone, width), mode_dtype, freeze in itertools.product(
                BASES + TOY, modes, ("none", "conv2")):
            if width != 1.0 and freeze != "none":
                continue                      # the toy preset trains from scratch: nothing frozen
            mode, dtype = mode_dtype
            # channels_last goes with bf16 on the CPU, and always on CUDA (cuDNN's NHWC kernels).
            fmt = torch.channels_last if on_cuda or dtype else torch.contiguous_format
            repeats = 3 if width == 1.0 and not on_cuda else 10
            rate = step_rate(device, batch, backbone, width, dtype, fmt, repeats, freeze=freeze)
            layout = "channels_last" if fmt == torch.channels_last else "NCHW"
            frozen = ", conv1_x-conv2_x frozen" if freeze != "none" else ""
            report("train", f"{name}{frozen}, {mode}, {layout}, batch {batch}", rate, "images/s")


# The pipeline section's runs: on CUDA the paper's network and batch (no ImageNet download, but
# conv1_x-conv2_x frozen as train.py has them from ImageNet weights), on a CPU the toy preset.
PIPELINE_RUNS = {"cuda": ["--batch-size", "32", "--no-pretrained", "--freeze", "conv2"],
                 "cpu": ["--preset", "toy"]}


def pipeline_rate(lists, device, settings, flags, iterations, workers):
    """Training images/s through train.py's own loop (loading, augmentation, step) as its log
    reports them, over the second `iterations` of a run of twice that (start-up left out)."""
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stderr(io.StringIO()), \
            contextlib.redirect_stdout(io.StringIO()):
        code = train.main(settings + flags + ["--data-folder", str(lists), "--out", out,
                                      "--device", str(device), "--workers", str(workers),
                                      "--iterations", str(2 * iterations), "--print-every", str(iterations),
                                      "--save-every", str(10 ** 9), "--eval-every", "0"])
        assert code == 0, f"train.py {' '.join(flags)} failed"
        return train.read_log(out)[1]["images_per_s"][-1]


def render_rates(lists, device, batch_size):
    """--gpu-augment's own work, no training step: render_batch (decoding and augmentation) over
    batches read beforehand. Reports its images/s, the host's time to queue a batch (below the
    device's when nothing waits for it), and the tensor operations (on a GPU: kernel
    launches) per image."""
    dataset = datasets.PascalVOCDataset(lists, "train", decode="device")
    batches = [datasets.collate_fn([dataset[i] for i in range(start, start + batch_size)])
               for start in range(0, len(dataset) - batch_size + 1, batch_size)]
    render_batch(batches[0], device)                                       # warm-up
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronize()
    start = time.perf_counter()
    for batch in batches:
        render_batch(batch, device)
    queued = time.perf_counter() - start
    synchronize()
    done = time.perf_counter() - start
    with CountOperations() as counter:
        render_batch(batches[0], device)
    note = f"batch {batch_size}, 500x375 JPEGs read beforehand"
    report("pipeline", "render_batch alone (decoding + augmentation)", len(batches) * batch_size / done,
           "images/s", f"{note}; the host queues a batch in {1000 * queued / len(batches):.1f} ms")
    report("pipeline", "render_batch tensor operations (GPU: kernel launches)", counter.count / batch_size,
           "per image", note)


class CountOperations(TorchDispatchMode):
    """Counts the tensor operations that compute something (views left out)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


def section_pipeline(device, args):
    """End-to-end training rate on 500x375 JPEGs: the CPU (PIL) augmentation in the loaders
    against --gpu-augment, and the synthetic step rate of the same network, batch and precision
    (the data path's ceiling)."""
    on_cuda = device.type == "cuda"
    settings = PIPELINE_RUNS["cuda" if on_cuda else "cpu"]
    config = train.parse_config(settings)
    dtype, fmt = utils.choose_precision(config["amp"], device)
    iterations = 20 if on_cuda else 6
    with tempfile.TemporaryDirectory() as tmp:
        lists = shapes_lists(Path(tmp), 512 if on_cuda else 64, 8, size=(500, 375))
        note = (f"{config['backbone']} x{config['width']}, batch {config['batch_size']}, "
                f"{utils.describe_precision(dtype, fmt)}, {args.workers} workers")
        runs = [(["--no-gpu-augment"], "CPU (PIL) augmentation"), (["--gpu-augment"], "--gpu-augment")]
        if on_cuda:                                            # compiled in the first half
            runs.append((["--gpu-augment", "--compile"], "--gpu-augment --compile"))
        for flags, what in runs:
            rate = pipeline_rate(lists, device, settings, flags, iterations, args.workers)
            report("pipeline", f"training, {what}", rate, "images/s", note)
        render_rates(lists, device, config["batch_size"])
    rate = step_rate(device, config["batch_size"], config["backbone"], config["width"], dtype, fmt,
                     repeats=10, n_classes=4, base_bn=config["base_bn"], optimizer=config["optimizer"],
                     freeze=config["freeze"])
    report("pipeline", "training step, synthetic batch (no data)", rate, "images/s", note)


def section_eval(device, args):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        n_test = 64 if device.type == "cpu" else 512
        lists = shapes_lists(root, 8, n_test)
        on_cuda = device.type == "cuda"
        fmt = torch.channels_last if on_cuda else torch.contiguous_format
        # On a GPU also with the JPEGs decoded and resized there (eval.py --gpu-decode).
        for decode in ("cpu", "device") if on_cuda else ("cpu",):
            dataset = datasets.PascalVOCDataset(lists, "test", decode=decode)
            for name, backbone, width in BASES + TOY:
                net = model.SSD(len(dataset.label_map), backbone, width=width).to(device, memory_format=fmt)
                for mode, dtype in ((("fp32", None),) + ((("bf16 AMP", torch.bfloat16),) if on_cuda else ())):
                    def run():
                        predict(net, dataset, device, batch_size=32, workers=args.workers, amp_dtype=dtype,
                                memory_format=fmt, progress=False)
                    run()                                                  # warm-up
                    start = time.perf_counter()
                    run()
                    report("eval", f"{name}, {mode}, batch 32, decoded on the {decode}",
                           len(dataset) / (time.perf_counter() - start), "images/s",
                           "untrained weights: many boxes reach NMS")


@torch.no_grad()
def detect_with_pytorch(net, x, dtype):
    """An SSD's detections in x (N x 3 x S x S), in autocast `dtype` (None: fp32)."""
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        return net.detect_objects(*net(x))


def int8_matmul_rate(threads):
    """Integer operations/s of a large uint8 x int8 matrix product in onnxruntime
    (MatMulInteger, 2048^3): the ceiling its 8-bit convolutions can reach on this CPU."""
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper
    from export import OPSET
    n = 2048
    rng = np.random.default_rng(0)
    weights = numpy_helper.from_array(rng.integers(-128, 128, (n, n)).astype(np.int8), "B")
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "matmul",
                              [helper.make_tensor_value_info("A", TensorProto.UINT8, [n, n])],
                              [helper.make_tensor_value_info("Y", TensorProto.INT32, [n, n])], [weights])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
                                           .SerializeToString(), options, providers=["CPUExecutionProvider"])
    a = rng.integers(0, 256, (n, n)).astype(np.uint8)
    return 2 * n ** 3 / timed(lambda: session.run(None, {"A": a}), torch.device("cpu"), repeats=10)


def trained_like(net):
    """`net` with its class-score heads biased towards the background, as a trained model's
    are: few boxes pass the 0.01 threshold and reach NMS (random weights send every class's
    top 400), so that the decoding costs what it costs in use."""
    with torch.no_grad():
        for conv in net.pred_convs.cl:
            conv.bias.view(-1, net.n_classes)[:, 0] += 8.0
    return net


DEPLOYED = [("SSD300-VGG16", "vgg16", "ssd300"), ("SSD300-ResNet34", "resnet34", "ssd300"),
            ("SSD512-VGG16", "vgg16", "ssd512")]


def section_deploy(device, args):
    if device.type != "cpu":
        print("deploy: CPU only (onnxruntime's CPU provider); skipped")
        return
    import onnxruntime

    import export
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    kernels = ", ".join(k for k in ("avx2", "avx512", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8",
                                     "amx_bf16") if capabilities.get(k))
    print(f"deploy: this CPU's instructions: {kernels or 'unknown'}")
    int8_rate, bf16_rate = int8_matmul_rate(args.threads), bf16_matmul_rate(device)
    report("deploy", "INT8 matmul rate (onnxruntime MatMulInteger, 2048^3)", int8_rate / 1e9, "GOP/s",
           f"bf16 (PyTorch): {bf16_rate / 1e9:.0f} GFLOP/s")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads              # as many threads as PyTorch's
    dtype, memory_format = utils.choose_precision("auto", device)
    auto = utils.describe_precision(dtype, memory_format)
    reduce_range, why = export.reduce_range_for("auto")
    with tempfile.TemporaryDirectory() as tmp:
        for name, backbone, size in DEPLOYED:
            torch.manual_seed(0)
            net = trained_like(model.SSD(21, backbone, model=size)).eval()
            spec = datasets.model_input(net.config)
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                net(torch.randn(1, 3, spec.size, spec.size))
            lists = shapes_lists(Path(tmp) / name, 16, 8, size=(500, 375))
            calibration = datasets.PascalVOCDataset(lists, "train", augment=False, model_input=spec)
            proto = export.export(net, {f"class {i}": i for i in range(21)}, export.DECODING)
            sessions = {"fp32": onnxruntime.InferenceSession(proto.SerializeToString(), options,
                                                             providers=["CPUExecutionProvider"]),
                        "INT8": onnxruntime.InferenceSession(
                            export.quantize(proto, calibration, list(range(16)), reduce_range).SerializeToString(),
                            options, providers=["CPUExecutionProvider"])}
            fast = copy.deepcopy(net).to(memory_format=memory_format)
            test = datasets.PascalVOCDataset(lists, "test", model_input=spec)
            for batch in (1, 8):
                x = torch.stack([test[i][0] for i in range(batch)])
                x_fast = x.contiguous(memory_format=memory_format)
                with torch.inference_mode():
                    times = timed_in_blocks(
                        [lambda: detect_with_pytorch(net, x, None), lambda: detect_with_pytorch(fast, x_fast, dtype),
                         lambda: sessions["fp32"].run(None, {"images": x.numpy()}),
                         lambda: sessions["INT8"].run(None, {"images": x.numpy()})], device)
                pt32, pt_auto, ort32, int8 = (t / batch * 1e3 for t in times)
                where = f"{name}, batch {batch}"
                report("deploy", f"{where}, PyTorch fp32", pt32, "ms/image", "network and decoding")
                report("deploy", f"{where}, PyTorch {auto}", pt_auto, "ms/image", "what --amp auto picks")
                report("deploy", f"{where}, onnxruntime {onnxruntime.__version__} fp32", ort32, "ms/image",
                       "export.py's graph, decoding inside")
                report("deploy", f"{where}, onnxruntime INT8", int8, "ms/image",
                       f"export.py --int8 ({why}); {int8 / ort32:.2f}x onnxruntime fp32, "
                       f"{int8 / pt_auto:.2f}x PyTorch {auto}; "
                       f"{int8 / (counter.get_total_flops() / int8_rate * 1e3):.1f}x the INT8 compute floor")


SECTIONS = dict(model=section_model, loss=section_loss, detect=section_detect,
                transforms=section_transforms, map=section_map, coco=section_coco, data=section_data,
                train=section_train,
                pipeline=section_pipeline, eval=section_eval, deploy=section_deploy)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sections", nargs="*", metavar="SECTION",
                   help=f"which to run, of {', '.join(SECTIONS)} (default: all)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    p.add_argument("--workers", type=int, default=2,
                   help="DataLoader workers for the eval and pipeline sections")
    args = p.parse_args(argv)
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {device}" +
          (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f", {args.threads} threads"))
    if device.type == "cpu":
        print(f"CPU: {torch.backends.cpu.get_cpu_capability()} kernels, native bf16 (AVX-512 bf16 "
              f"or AMX): {'yes' if utils.cpu_has_native(torch.bfloat16) else 'no'}")
    print(f"--amp auto chooses: {utils.describe_precision(*utils.choose_precision('auto', device))}")
    print("| section | what | value | unit | note |\n|---|---|---|---|---|")
    for name in args.sections or SECTIONS:
        SECTIONS[name](device, args)


if __name__ == "__main__":
    main()
