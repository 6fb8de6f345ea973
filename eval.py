"""Evaluate a trained SSD300 on the test list: PASCAL VOC mAP as the devkit computes it, and the COCO metrics.

    python eval.py checkpoints/ssd300_voc/checkpoint.pt
    python eval.py checkpoints/toy/checkpoint.pt --data-folder data/shapes_lists

Decodes with the paper's evaluation settings (utils.EVAL_DECODING: min score 0.01, NMS IoU
0.45, top 200 per image), reports VOC07 11-point mAP (the paper's metric for VOC2007 test) and
VOC2010+ area mAP, and the COCO API's metrics (faster-coco-eval): AP@[.50:.95], AP50, AP75,
AP for small, medium and large objects, AR@1/10/100, all per class and overall, on boxes in
the pixels of each image (VOC's difficult objects count as COCO's crowd regions). It writes
results.json and pr_curves.png next to the checkpoint. Other
decoding settings need an --out folder of their own, so that they never replace those results.

The test lists' classes are matched to the network's by name, so they may be any subset of
them, at any index: a converted COCO checkpoint (torchvision's 91 indices) evaluates on lists
that create_data_lists.py --coco-test made from COCO's val2017 (labels 1..80); detections of
classes the lists lack are left out before any metric.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from datasets import DataError, PascalVOCDataset, collate_fn, model_input, start_loading
from gpu_augment import decode_place, render_batch
from metrics import coco_metrics, mean_average_precision, precision_recall_curves
from model import load_checkpoint
from utils import (EVAL_DECODING, HelpFormatter, add_precision_arguments, atomic_write_json, bounded,
                   choose_precision, default_workers, describe_precision, pick_device, save_figure,
                   writable_folder)


@torch.inference_mode()
def predict(net, dataset, device, batch_size=32, workers=2, amp_dtype=None,
            memory_format=torch.contiguous_format, min_score=EVAL_DECODING.min_score,
            max_overlap=EVAL_DECODING.max_overlap, top_k=EVAL_DECODING.top_k, progress=True):
    """Detections and ground truth of every test image, as per-image lists of CPU tensors.

    Boxes stay fractional: IoU does not change when both axes are rescaled, so the VOC
    matching is the same as in pixels. An unreadable image raises a DataError naming it.
    A dataset made with decode="device" has its images decoded and resized on `device`. The
    dataset's model_input must be the net's (its size and normalisation).
    """
    if len(dataset) == 0:
        raise DataError("the test list is empty: there is nothing to evaluate")
    net.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn,
                                         num_workers=workers, pin_memory=device.type == "cuda")
    dets = {"boxes": [], "labels": [], "scores": []}
    truth = {"boxes": [], "labels": [], "difficulties": []}
    for batch in tqdm(start_loading(loader), total=len(loader), desc="evaluate", disable=not progress,
                      leave=False, dynamic_ncols=True):
        if not isinstance(batch.images, torch.Tensor):            # a decode="device" dataset
            batch = render_batch(batch, device, memory_format, dataset.model_input)
        images, boxes, labels, difficulties, problems = batch
        if problems:
            raise DataError(problems[0])
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            locs, scores = net(images)
        found = net.detect_objects(locs, scores, min_score, max_overlap, top_k)
        sizes = [len(v) for v in found[0]]
        for key, values in zip(("boxes", "labels", "scores"), found):
            # One copy to the host per batch, not one (and a wait for the GPU) per image.
            dets[key] += torch.cat(values).cpu().split(sizes)
        truth["boxes"] += boxes
        truth["labels"] += labels
        truth["difficulties"] += difficulties
    return dets, truth


def evaluate(net, dataset, device, batch_size=32, workers=2, amp_dtype=None,
             memory_format=torch.contiguous_format, progress=True, coco=True, classes=None, **decode):
    """VOC07 11-point and VOC2010+ area mAP of `net` on `dataset` (kept difficult objects),
    and with coco=True the COCO metrics.

    classes: the net's label map (name -> index), where its classes are not the dataset's
    (class_lookup): its detections are then counted as the dataset's class of the same name,
    and those of classes the dataset lacks are left out before any metric.
    Returns a dict: mAP_07, mAP, per-class aps_07 and aps (by class name), images_per_s,
    the precision-recall curves by class name, and with coco=True coco ({metric: value},
    metrics.COCO_METRICS) and coco_per_class ({class name: {metric: value}}).
    """
    lookup = class_lookup(classes, dataset.label_map, net.n_classes) if classes else None
    start = time.perf_counter()
    dets, truth = predict(net, dataset, device, batch_size, workers, amp_dtype, memory_format,
                          progress=progress, **decode)
    images_per_s = len(dataset) / (time.perf_counter() - start)
    dets, n_classes = in_dataset_classes(dets, lookup, dataset.label_map, net.n_classes)
    args = (dets["boxes"], dets["labels"], dets["scores"], truth["boxes"], truth["labels"],
            truth["difficulties"], n_classes)
    names = {i: name for name, i in dataset.label_map.items() if i > 0}

    def by_name(per_class):          # indices that name no class (COCO's "N/A") find nothing
        return {names[c]: value for c, value in per_class.items() if c in names}
    curves = precision_recall_curves(*args)              # the matching runs once, here
    aps_07, mAP_07 = mean_average_precision(curves, use_07_metric=True)
    aps, mAP = mean_average_precision(curves, use_07_metric=False)
    result = dict(mAP_07=mAP_07, mAP=mAP, images_per_s=images_per_s,
                  aps_07=by_name(aps_07), aps=by_name(aps), curves=by_name(curves))
    if coco:
        overall, per_class = coco_metrics(*coco_inputs(dets, dataset), n_classes)
        result.update(coco=overall, coco_per_class=by_name(per_class))
    return result


def class_lookup(classes, label_map, n_classes):
    """The network's class index -> the dataset's, by name (a long tensor of n_classes, -1
    for the classes the dataset does not have), or None where the label maps are the same.
    classes: the network's label map; label_map: the dataset's, whose classes must all be the
    network's (in any order, at any index: COCO's ids with gaps, labels 1..80, a subset), else
    a DataError naming those that are not."""
    if classes == label_map:
        return None
    missing = sorted(name for name in label_map if name not in classes)
    if missing:
        common = len(label_map) - len(missing) - 1            # background aside
        raise DataError(f"the network does not detect {len(missing)} of the test lists' classes "
                        f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''})"
                        + ("; they share no class: lists of another dataset?" if common == 0 else ""))
    lookup = torch.full((n_classes,), -1, dtype=torch.long)
    for name, index in label_map.items():
        lookup[classes[name]] = index
    return lookup


def relabelled(dets, lookup):
    """Per-image detections with their labels mapped through `lookup` (class_lookup), those
    that map to -1 left out."""
    out = {"boxes": [], "labels": [], "scores": []}
    for boxes, labels, scores in zip(dets["boxes"], dets["labels"], dets["scores"]):
        mapped = lookup[labels]
        kept = mapped >= 0
        out["boxes"].append(boxes[kept])
        out["labels"].append(mapped[kept])
        out["scores"].append(scores[kept])
    return out


def in_dataset_classes(dets, lookup, label_map, n_classes):
    """The detections counted as the dataset's classes (relabelled through class_lookup's
    `lookup`; as they are where it is None), and the number of class indices to score."""
    if lookup is None:
        return dets, n_classes
    return relabelled(dets, lookup), max(label_map.values()) + 1


def coco_inputs(dets, dataset):
    """coco_metrics' arguments but n_classes: the (fractional) detections scaled to the pixels
    of their images, the objects as the lists hold them (pixels), and the image sizes."""
    lists = dataset.lists
    if (lists.sizes == 0).any():
        raise DataError("the COCO metrics need each image's size, which lists written before "
                        "create_data_lists.py recorded it lack: write the lists again")
    scales = lists.sizes.float().repeat(1, 2)                            # (N, 4): w, h, w, h
    boxes = [b * scale for b, scale in zip(dets["boxes"], scales)]
    return (boxes, dets["labels"], dets["scores"], *lists.per_image(), lists.sizes.tolist())


def print_table(result):
    """Per class and overall: VOC07 and area AP, then the COCO metrics where computed;
    '-' where a metric is undefined (no object of the class, or none of that size)."""
    coco = result.get("coco_per_class", {})
    names = list(coco) or list(result["aps_07"])
    width = max(map(len, names + ["class"]))
    metrics = list(next(iter(coco.values()), {}))

    def row(name, voc07, area, values):
        cells = [voc07, area] + [values.get(m) for m in metrics]
        return f"{name:<{width}}" + "".join(
            f"{'-' if v is None or v != v else f'{v:.4f}':>9}" for v in cells)
    print(f"{'class':<{width}}" + "".join(f"{h:>9}" for h in ["VOC07 AP", "area AP"] + metrics))
    for name in names:
        print(row(name, result["aps_07"].get(name), result["aps"].get(name), coco.get(name, {})))
    print(row("mean", result["mAP_07"], result["mAP"], result.get("coco", {})))


def plot_pr_curves(curves, mAP_07, png):
    """One precision-recall curve per class on one figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 6))
    colours = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20")
    for i, (name, (recall, precision)) in enumerate(sorted(curves.items())):
        ax.plot(recall, precision, color=colours(i % colours.N), label=name)
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
           title=f"precision-recall per class (VOC07 mAP {mAP_07:.3f})")
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.tight_layout()
    save_figure(fig, png)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("checkpoint", nargs="?", default="checkpoints/ssd300/checkpoint.pt",
                   help="checkpoint written by train.py")
    p.add_argument("--data-folder", help="lists from create_data_lists.py (default: the training run's)")
    p.add_argument("--batch-size", type=bounded(int, 1), default=32, help="images per forward pass")
    p.add_argument("--workers", type=bounded(int, 0), default=default_workers(),
                   help="data loading processes")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cuda, cpu, ...")
    p.add_argument("--gpu-decode", action=argparse.BooleanOptionalAction, default=None,
                   help="decode and resize the JPEGs on the device (TorchCodec's nvJPEG; the same "
                        "pixels as Pillow's to within a level in a few pixels): the loading "
                        "processes only read the files. Default: on with CUDA where TorchCodec "
                        "decodes there, off otherwise")
    add_precision_arguments(p)
    p.add_argument("--min-score", type=bounded(float, 0, below=1), default=EVAL_DECODING.min_score,
                   help="class score threshold")
    p.add_argument("--max-overlap", type=bounded(float, above=0, high=1),
                   default=EVAL_DECODING.max_overlap, help="NMS IoU threshold")
    p.add_argument("--top-k", type=bounded(int, 1), default=EVAL_DECODING.top_k,
                   help="detections kept per image")
    p.add_argument("--out", help="folder for results.json and pr_curves.png (default: the "
                                 "checkpoint's; required with other decoding settings)")
    args = p.parse_args(argv)
    settings = (args.min_score, args.max_overlap, args.top_k)
    if settings != EVAL_DECODING[:3] and args.out is None:
        p.error(f"--min-score/--max-overlap/--top-k {settings} differ from the paper's evaluation "
                f"settings {EVAL_DECODING[:3]}: give an --out folder, so that the run's "
                "results.json keeps the paper-setting evaluation")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        device = pick_device(args.device)
        net, checkpoint = load_checkpoint(args.checkpoint, device)
        config = checkpoint["config"]
        data_folder = args.data_folder or config.get("data_folder")
        if data_folder is None:
            raise DataError(f"{args.checkpoint} records no data folder (it was converted, not "
                            "trained here): give the test lists with --data-folder")
        spec = model_input(config)
        dataset = PascalVOCDataset(data_folder, "test", keep_difficult=True, on_error="mark",
                                   decode=decode_where(args.gpu_decode, device, spec), model_input=spec)
        out = writable_folder(args.out or Path(args.checkpoint).parent)
        return evaluate_and_report(net, checkpoint, dataset, data_folder, out, args, device)
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:                                  # e.g. a read-only or full disk
        print(f"eval.py: error: {e}", file=sys.stderr)
        return 1


def decode_where(choice, device, spec):
    """PascalVOCDataset's decode for --gpu-decode (gpu_augment.decode_place), but "cpu" for a
    network whose input OpenCV resizes (amdegroot's weights): that resize runs on the CPU."""
    if spec.resize == "opencv":
        if choice:
            print("this network's input is resized with OpenCV, on the CPU: --gpu-decode does not "
                  "apply", file=sys.stderr)
        return "cpu"
    return decode_place(choice, device)


def evaluate_and_report(net, checkpoint, dataset, data_folder, out, args, device):
    """Evaluate, print the table, and write results.json and pr_curves.png into `out`."""
    amp_dtype, memory_format = choose_precision(args.amp, device, args.channels_last)
    precision = describe_precision(amp_dtype, memory_format)
    print(f"precision: {precision} on {device}")
    torch.backends.cudnn.benchmark = device.type == "cuda"
    result = evaluate(net.to(memory_format=memory_format), dataset, device, args.batch_size,
                      args.workers, amp_dtype=amp_dtype, memory_format=memory_format,
                      classes=checkpoint["config"]["label_map"], min_score=args.min_score,
                      max_overlap=args.max_overlap, top_k=args.top_k)
    print_table(result)
    if not result["aps_07"]:
        print("warning: no class has a test object that is not difficult: mAP is undefined "
              "(null in results.json)", file=sys.stderr)
    print(f"{len(dataset)} images at {result['images_per_s']:.1f} images/s on {device}")
    summary = {k: v for k, v in result.items() if k != "curves"}
    summary.update(checkpoint=str(args.checkpoint), data_folder=str(data_folder),
                   iteration=checkpoint.get("iteration"), min_score=args.min_score,
                   max_overlap=args.max_overlap, top_k=args.top_k, precision=precision)
    atomic_write_json(out / "results.json", summary, indent=2)
    plot_pr_curves(result["curves"], result["mAP_07"], out / "pr_curves.png")
    print(f"wrote {out / 'results.json'} and {out / 'pr_curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
