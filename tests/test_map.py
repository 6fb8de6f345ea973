"""Tests of metrics.calculate_mAP and metrics.precision_recall_curves against a slow, literal
transcription of the PASCAL VOC devkit's rules (VOCevaldet / VOCap), written below."""
import math
import random

import pytest
import torch

import metrics
import utils


# ------------------------------------------------------------------ reference, plain Python

def _reference_iou(a, b):
    """IoU of two x1, y1, x2, y2 boxes (no +1), with the operations in box_iou's order."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return None  # no overlap: the devkit does not consider the object at all
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _reference_ap(recall, precision, use_07_metric):
    if use_07_metric:
        ap = 0.0
        for t in [k / 10 for k in range(11)]:  # exact tenths, as utils documents
            ap += max([p for r, p in zip(recall, precision) if r >= t], default=0.0) / 11
        return ap
    mrec = [0.0] + recall + [1.0]
    mpre = [0.0] + precision + [0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    return sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]
               for i in range(len(mrec) - 1) if mrec[i + 1] != mrec[i])


def reference_map(det_boxes, det_labels, det_scores, true_boxes, true_labels,
                  true_difficulties, n_classes, use_07_metric):
    """Returns (aps, mean_ap, curves) with curves[c] = (recall, precision) lists holding
    the points of the detections that count (not those ignored for a difficult object)."""
    aps, curves = {}, {}
    for c in range(1, n_classes):
        objects = {}  # image -> [box, difficult, detected]
        n_pos = 0
        for i, (boxes, labels, difficult) in enumerate(
                zip(true_boxes, true_labels, true_difficulties)):
            objects[i] = [[b, bool(d), False] for b, l, d in
                          zip(boxes.tolist(), labels.tolist(), difficult.tolist()) if l == c]
            n_pos += sum(not d for _, d, _ in objects[i])
        if n_pos == 0:
            continue
        detections = [(s, i, b) for i, (boxes, labels, scores) in
                      enumerate(zip(det_boxes, det_labels, det_scores))
                      for b, l, s in zip(boxes.tolist(), labels.tolist(), scores.tolist())
                      if l == c]
        detections = sorted(detections, key=lambda d: -d[0])  # stable
        tp, fp = [], []
        for _, i, box in detections:
            ovmax, jmax = -math.inf, None
            for j, (gt_box, _, _) in enumerate(objects[i]):
                ov = _reference_iou(box, gt_box)
                if ov is not None and ov > ovmax:
                    ovmax, jmax = ov, j
            if ovmax > 0.5:
                if objects[i][jmax][1]:  # difficult: neither TP nor FP
                    tp.append(0)
                    fp.append(0)
                elif not objects[i][jmax][2]:
                    objects[i][jmax][2] = True
                    tp.append(1)
                    fp.append(0)
                else:
                    tp.append(0)
                    fp.append(1)
            else:
                tp.append(0)
                fp.append(1)
        recall, precision, n_tp, n_fp = [], [], 0, 0
        for t, f in zip(tp, fp):
            if t == f == 0:
                continue  # same point as the previous one (or at recall 0): no effect on AP
            n_tp, n_fp = n_tp + t, n_fp + f
            recall.append(n_tp / n_pos)
            precision.append(n_tp / (n_tp + n_fp))
        aps[c] = _reference_ap(recall, precision, use_07_metric)
        curves[c] = (recall, precision)
    mean_ap = sum(aps.values()) / len(aps) if aps else math.nan
    return aps, mean_ap, curves


# ------------------------------------------------------------------ random cases

def random_case(seed):
    """Small random evaluation input with ties, duplicates, difficult objects, exact 0.5
    IoUs (integer corners on a coarse grid), empty images, in pixel or fractional units."""
    rng = random.Random(seed)
    n_classes = rng.randint(2, 6)
    scale = rng.choice([1.0, 1.0, 10.0, 7.0])  # 1: pixel units; else fractional
    dtype = rng.choice([torch.float32, torch.float64])
    grid = rng.choice([4, 8, 20])

    def box():
        x1, y1 = rng.randint(0, grid - 1), rng.randint(0, grid - 1)
        return [x1, y1, rng.randint(x1 + 1, grid), rng.randint(y1 + 1, grid)]

    def jitter(b):
        x1, y1, x2, y2 = (v + rng.randint(-1, 1) for v in b)
        return [x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)]

    case = [[] for _ in range(6)]
    for _ in range(rng.randint(0, 8)):
        gts = [box() for _ in range(rng.choice([0, 1, 2, 3, 5]))]
        labels = [rng.randint(1, n_classes - 1) for _ in gts]
        difficult = [rng.random() < 0.25 for _ in gts]
        dets, det_labels = [], []
        for _ in range(rng.choice([0, 1, 3, 6, 10])):
            kind = rng.random()
            if gts and kind < 0.6:
                j = rng.randrange(len(gts))
                dets.append(gts[j] if kind < 0.25 else jitter(gts[j]))  # copies: duplicates
                det_labels.append(labels[j] if rng.random() < 0.85 else
                                  rng.randint(1, n_classes - 1))
            else:
                dets.append(box())
                det_labels.append(rng.randint(1, n_classes - 1))
        scores = [rng.randint(1, 4) / 4 for _ in dets]  # coarse: many ties
        for column, values in zip(case, [dets, det_labels, scores, gts, labels, difficult]):
            column.append(values)

    def to_boxes(rows):
        return torch.tensor(rows, dtype=dtype).reshape(-1, 4) / scale

    diff_dtype = rng.choice([torch.bool, torch.uint8, torch.int64])
    return ([to_boxes(b) for b in case[0]],
            [torch.tensor(l, dtype=torch.int64) for l in case[1]],
            [torch.tensor(s, dtype=dtype) for s in case[2]],
            [to_boxes(b) for b in case[3]],
            [torch.tensor(l, dtype=torch.int64) for l in case[4]],
            [torch.tensor(d, dtype=diff_dtype) for d in case[5]],
            n_classes)


N_RANDOM_CASES = 300


@pytest.mark.parametrize("use_07_metric", [True, False])
def test_matches_reference_on_random_cases(use_07_metric):
    n_classes_with_ap = 0
    for seed in range(N_RANDOM_CASES):
        case = random_case(seed)
        aps, mean_ap = metrics.calculate_mAP(*case, use_07_metric=use_07_metric)
        ref_aps, ref_mean_ap, _ = reference_map(*case, use_07_metric=use_07_metric)
        assert aps.keys() == ref_aps.keys(), seed
        for c in aps:
            assert isinstance(aps[c], float)
            assert 0.0 <= aps[c] <= 1.0
            assert aps[c] == pytest.approx(ref_aps[c], abs=1e-9), (seed, c)
        if ref_aps:
            assert mean_ap == pytest.approx(ref_mean_ap, abs=1e-9), seed
        else:
            assert math.isnan(mean_ap)
        n_classes_with_ap += len(aps)
    assert n_classes_with_ap > N_RANDOM_CASES  # the cases are not all degenerate


def test_curves_match_reference_on_random_cases():
    for seed in range(N_RANDOM_CASES):
        case = random_case(seed)
        curves = metrics.precision_recall_curves(*case)
        _, _, ref_curves = reference_map(*case, use_07_metric=True)
        assert curves.keys() == ref_curves.keys(), seed
        for c, (recall, precision) in curves.items():
            assert recall.tolist() == pytest.approx(ref_curves[c][0], abs=1e-12), (seed, c)
            assert precision.tolist() == pytest.approx(ref_curves[c][1], abs=1e-12), (seed, c)


def test_random_cases_cover_the_edge_cases():
    """The random cases must contain what they are meant to test."""
    seen = dict(exact_half_iou=0, score_ties=0, empty_image=0, image_without_detections=0,
                only_difficult_class=0, undetected_class=0, fractional=0)
    for seed in range(N_RANDOM_CASES):
        det_boxes, det_labels, det_scores, true_boxes, true_labels, difficult, n = \
            random_case(seed)
        seen["fractional"] += any(bool((b != b.round()).any()) for b in true_boxes)
        seen["empty_image"] += any(len(l) == 0 for l in true_labels)
        seen["image_without_detections"] += any(len(l) == 0 for l in det_labels)
        for d, g, dl, gl in zip(det_boxes, true_boxes, det_labels, true_labels):
            seen["exact_half_iou"] += sum(
                _reference_iou(a, b) == 0.5 and la == lb
                for a, la in zip(d.tolist(), dl.tolist()) for b, lb in zip(g.tolist(), gl.tolist()))
        for s in det_scores:
            seen["score_ties"] += len(set(s.tolist())) < len(s)
        all_gt = torch.cat(true_labels) if true_labels else torch.zeros(0)
        all_diff = torch.cat(difficult).bool() if difficult else torch.zeros(0, dtype=torch.bool)
        all_det = torch.cat(det_labels) if det_labels else torch.zeros(0)
        for c in range(1, n):
            has_gt = bool((all_gt == c).any())
            seen["only_difficult_class"] += has_gt and bool(all_diff[all_gt == c].all())
            seen["undetected_class"] += has_gt and not bool((all_det == c).any())
    assert all(count >= 10 for count in seen.values()), seen


# ------------------------------------------------------------------ hand-made cases

def _t(*rows):
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 4)


def _labels(*values):
    return torch.tensor(values, dtype=torch.int64)


@pytest.mark.parametrize("use_07_metric", [True, False])
def test_perfect_detector_scores_one(use_07_metric):
    true_boxes = [_t([0, 0, 10, 10], [20, 20, 40, 30]), _t(), _t([5, 5, 9, 9])]
    true_labels = [_labels(1, 2), _labels(), _labels(2)]
    difficult = [torch.tensor([False, True]), torch.tensor([], dtype=torch.bool),
                 torch.tensor([False])]
    scores = [torch.tensor([0.9, 0.3]), torch.tensor([]), torch.tensor([0.5])]
    aps, mean_ap = metrics.calculate_mAP(true_boxes, true_labels, scores, true_boxes,
                                       true_labels, difficult, 3, use_07_metric)
    assert aps == {1: 1.0, 2: 1.0}
    assert mean_ap == 1.0


@pytest.mark.parametrize("use_07_metric", [True, False])
def test_empty_detector_scores_zero(use_07_metric):
    true_boxes = [_t([0, 0, 10, 10], [20, 20, 40, 30]), _t([5, 5, 9, 9])]
    true_labels = [_labels(1, 2), _labels(2)]
    difficult = [torch.tensor([0, 0]), torch.tensor([0])]
    empty = [[_t(), _t()], [_labels(), _labels()], [torch.tensor([]), torch.tensor([])]]
    aps, mean_ap = metrics.calculate_mAP(*empty, true_boxes, true_labels, difficult, 4,
                                       use_07_metric)
    assert aps == {1: 0.0, 2: 0.0}  # class 3 has no objects: left out
    assert mean_ap == 0.0


def test_no_images_and_no_objects():
    aps, mean_ap = metrics.calculate_mAP([], [], [], [], [], [], 21)
    assert aps == {} and math.isnan(mean_ap)
    det = [[_t([0, 0, 1, 1])], [_labels(1)], [torch.tensor([0.5])]]
    aps, mean_ap = metrics.calculate_mAP(*det, [_t()], [_labels()], [torch.tensor([])], 2)
    assert aps == {} and math.isnan(mean_ap)


# Class 1, two images; npos = 3 (image 1's second object is difficult).
#   image 0 objects: A [0,0,10,10], B [20,20,30,30]; image 1: C [0,0,10,10], D (difficult)
#   detections by score:   d1 .9 = A  -> TP   tp 1 fp 0   P 1    R 1/3
#                          d2 .8 random -> FP tp 1 fp 1   P 1/2  R 1/3
#                          d3 .7 = C  -> TP   tp 2 fp 1   P 2/3  R 2/3
#                          d5 .65 = D -> ignored (difficult)
#                          d4 .6 = A again -> FP (duplicate) tp 2 fp 2  P 1/2  R 2/3
#   11-point: t = 0, .1, .2, .3 -> max P at R >= t = 1;  t = .4, .5, .6 -> 2/3;
#             t = .7 .. 1 -> nothing, 0.   AP = (4 * 1 + 3 * 2/3) / 11 = 6/11
#   envelope: R 0..1/3 at P 1, 1/3..2/3 at P 2/3, beyond 0.  AP = 1/3 + 2/9 = 5/9
HAND_CASE = (
    [_t([0, 0, 10, 10], [40, 40, 45, 45], [0, 0, 10, 10]), _t([0, 0, 10, 10], [50, 50, 60, 60])],
    [_labels(1, 1, 1), _labels(1, 1)],
    [torch.tensor([0.9, 0.8, 0.6]), torch.tensor([0.7, 0.65])],
    [_t([0, 0, 10, 10], [20, 20, 30, 30]), _t([0, 0, 10, 10], [50, 50, 60, 60])],
    [_labels(1, 1), _labels(1, 1)],
    [torch.tensor([0, 0]), torch.tensor([0, 1])],
    2,
)


def test_hand_computed_case():
    assert metrics.calculate_mAP(*HAND_CASE, use_07_metric=True)[0][1] == pytest.approx(6 / 11)
    assert metrics.calculate_mAP(*HAND_CASE, use_07_metric=False)[0][1] == pytest.approx(5 / 9)
    recall, precision = metrics.precision_recall_curves(*HAND_CASE)[1]
    assert recall.tolist() == pytest.approx([1 / 3, 1 / 3, 2 / 3, 2 / 3])
    assert precision.tolist() == pytest.approx([1, 1 / 2, 2 / 3, 1 / 2])


def test_iou_of_exactly_half_is_a_miss():
    gt = [[_t([0, 0, 2, 2])], [_labels(1)], [torch.tensor([False])]]
    half = [[_t([0, 0, 2, 1])], [_labels(1)], [torch.tensor([0.5])]]  # IoU 2/4
    more = [[_t([0, 0, 2, 1.01])], [_labels(1)], [torch.tensor([0.5])]]
    assert metrics.calculate_mAP(*half, *gt, 2)[1] == 0.0
    assert metrics.calculate_mAP(*more, *gt, 2)[1] == 1.0


def test_best_object_already_matched_gives_false_positive():
    # d2's best object is A (IoU 0.8, taken by d1) though B (IoU 64/116) is free: FP, as in
    # the devkit, which does not fall back to the second best. Then d3 takes B.
    gt = [[_t([0, 0, 10, 10], [2, 0, 12, 10])], [_labels(1, 1)], [torch.tensor([0, 0])]]
    det = [[_t([0, 0, 10, 10], [0, 0, 10, 8], [2, 0, 12, 10])], [_labels(1, 1, 1)],
           [torch.tensor([0.9, 0.8, 0.7])]]
    recall, precision = metrics.precision_recall_curves(*det, *gt, 2)[1]
    assert recall.tolist() == pytest.approx([1 / 2, 1 / 2, 1])
    assert precision.tolist() == pytest.approx([1, 1 / 2, 2 / 3])


def test_best_object_difficult_is_ignored():
    # The detection overlaps the difficult object best (IoU 1) and a normal one by 0.6:
    # ignored, not a TP of the normal one.
    gt = [[_t([0, 0, 10, 10], [0, 0, 10, 6])], [_labels(1, 1)], [torch.tensor([1, 0])]]
    det = [[_t([0, 0, 10, 10])], [_labels(1)], [torch.tensor([0.9])]]
    recall, precision = metrics.precision_recall_curves(*det, *gt, 2)[1]
    assert recall.size == 0 and precision.size == 0
    assert metrics.calculate_mAP(*det, *gt, 2)[1] == 0.0


def test_ties_keep_image_then_detection_order():
    # Same score: image 0's FP comes before image 1's TP, so precision starts at 0.
    gt = [[_t(), _t([0, 0, 4, 4])], [_labels(), _labels(1)],
          [torch.tensor([]), torch.tensor([0])]]
    det = [[_t([9, 9, 10, 10]), _t([0, 0, 4, 4])], [_labels(1), _labels(1)],
           [torch.tensor([0.5]), torch.tensor([0.5])]]
    recall, precision = metrics.precision_recall_curves(*det, *gt, 2)[1]
    assert recall.tolist() == [0.0, 1.0] and precision.tolist() == [0.0, 0.5]
    # Swapping the images makes the TP first.
    swapped = [list(reversed(column)) for column in det + gt]
    recall, precision = metrics.precision_recall_curves(*swapped, 2)[1]
    assert recall.tolist() == [1.0, 1.0] and precision.tolist() == [1.0, 0.5]


def test_eleven_point_thresholds_are_exact_tenths():
    # 10 objects, 3 found without error: recall reaches exactly 3/10, so t = 0.3 counts
    # (np.arange(0., 1.1, 0.1)[3] = 0.30000000000000004 would not): AP = 4/11, not 3/11.
    true_boxes = [_t(*[[10 * k, 0, 10 * k + 5, 5] for k in range(10)])]
    gt = [true_boxes, [_labels(*[1] * 10)], [torch.zeros(10, dtype=torch.bool)]]
    det = [[true_boxes[0][:3]], [_labels(1, 1, 1)], [torch.tensor([0.9, 0.8, 0.7])]]
    assert metrics.calculate_mAP(*det, *gt, 2, use_07_metric=True)[1] == pytest.approx(4 / 11)
    assert metrics.calculate_mAP(*det, *gt, 2, use_07_metric=False)[1] == pytest.approx(3 / 10)


def test_mismatched_image_counts_raise():
    with pytest.raises(ValueError):
        metrics.calculate_mAP(*HAND_CASE[:3], HAND_CASE[3][:1], HAND_CASE[4][:1],
                            HAND_CASE[5][:1], 2)


def test_the_metrics_are_only_in_metrics():
    # utils.py no longer forwards them to metrics.py, which imports utils: that was a cycle.
    for name in ("calculate_mAP", "precision_recall_curves", "coco_metrics"):
        assert not hasattr(utils, name), name
