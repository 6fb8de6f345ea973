"""Detection metrics: PASCAL VOC average precision with the official devkit's rules, and the
COCO metrics through the COCO API (faster-coco-eval).

    aps, mAP = calculate_mAP(det_boxes, det_labels, det_scores, true_boxes, true_labels,
                             true_difficulties, n_classes)          # VOC07 11-point
    overall, per_class = coco_metrics(..., true_crowd, image_sizes, n_classes)

Per-image lists of tensors throughout; see each function for shapes and units.
"""
import contextlib
import io

import numpy as np
import torch

from utils import pairwise_iou

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
