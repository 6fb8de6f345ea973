"""The COCO metrics: faster-coco-eval checked against pycocotools, and the obvious cases."""
import contextlib
import io
import math

import pytest
import torch

from metrics import COCO_METRICS, coco_api_objects, coco_dataset, coco_metrics, coco_summary

SIZES = [(640, 480), (300, 500), (1000, 800)]


def random_case(seed, n_images=24, n_classes=5):
    """Objects of every COCO size range (5-400 px sides), 15% crowd, some images empty; per
    image up to 40 detections, half jittered copies of objects (some of the wrong class),
    half random boxes. Scores have no ties, so that the order of equal scores, which the two
    libraries' sorts need not agree on, plays no part."""
    g = torch.Generator().manual_seed(seed)
    case = {key: [] for key in ("det_boxes", "det_labels", "det_scores", "true_boxes",
                                "true_labels", "true_crowd", "image_sizes")}

    def boxes(n, w, h):
        side = torch.exp(torch.empty(n, 2).uniform_(math.log(5), math.log(400), generator=g))
        side = torch.minimum(side, torch.tensor([w - 1.0, h - 1.0]))
        xy = torch.rand(n, 2, generator=g) * (torch.tensor([w, h]) - side)
        return torch.cat([xy, xy + side], 1)

    for i in range(n_images):
        w, h = SIZES[i % len(SIZES)]
        n_obj = int(torch.randint(0, 7, (), generator=g))
        objects = boxes(n_obj, w, h)
        labels = torch.randint(1, n_classes, (n_obj,), generator=g)
        n_near = int(torch.randint(0, 20, (), generator=g)) if n_obj else 0
        source = torch.randint(0, max(n_obj, 1), (n_near,), generator=g)
        size = (objects[source, 2:] - objects[source, :2]).repeat(1, 2)
        near = objects[source] + torch.randn(n_near, 4, generator=g) * 0.08 * size
        near = torch.cat([near[:, :2], torch.maximum(near[:, 2:], near[:, :2] + 1)], 1)
        near_labels = torch.where(torch.rand(n_near, generator=g) < 0.85, labels[source],
                                  torch.randint(1, n_classes, (n_near,), generator=g))
        n_far = int(torch.randint(0, 20, (), generator=g))
        values = (torch.cat([near, boxes(n_far, w, h)]),
                  torch.cat([near_labels, torch.randint(1, n_classes, (n_far,), generator=g)]),
                  torch.rand(n_near + n_far, generator=g, dtype=torch.float64),
                  objects, labels, torch.rand(n_obj, generator=g) < 0.15, (w, h))
        for key, value in zip(case, values):
            case[key].append(value)
    return case, n_classes


def pycocotools_eval(case, n_classes):
    """The reference: pycocotools' COCOeval on the same COCO-format dicts."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    truth = coco_dataset(case["true_boxes"], case["true_labels"], None, case["true_crowd"],
                         case["image_sizes"], n_classes)
    found = coco_dataset(case["det_boxes"], case["det_labels"], case["det_scores"], None,
                         case["image_sizes"], n_classes)
    found["images"], found["categories"] = truth["images"], truth["categories"]
    evaluator = COCOeval(*coco_api_objects(truth, found, COCO), "bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


@pytest.mark.parametrize("seed", range(12))
def test_faster_coco_eval_matches_pycocotools(seed):
    case, n_classes = random_case(seed)
    overall, per_class = coco_metrics(*case.values(), n_classes)
    reference = pycocotools_eval(case, n_classes)
    # Overall: the nine of summarize()'s twelve numbers that coco_metrics reports, in its order.
    expected = dict(zip(COCO_METRICS, reference.stats[:9]))
    assert overall == pytest.approx({k: v if v > -1 else math.nan for k, v in expected.items()},
                                    abs=1e-6, nan_ok=True)
    # Per class: the same summary of pycocotools' own accumulated arrays.
    precision, recall = reference.eval["precision"], reference.eval["recall"]
    for k, c in enumerate(reference.params.catIds):
        assert per_class[c] == pytest.approx(
            coco_summary(precision, recall, reference.params.iouThrs, [k]), abs=1e-6, nan_ok=True)
    assert 0 < overall["AP"] < 1 and 0 < overall["AR1"] < overall["AR100"] < 1   # not trivial


def one_image_case(detections):
    """Two objects (one small, one large) and a crowd region, found perfectly or not at all."""
    truth = torch.tensor([[10.0, 10, 30, 30], [100, 50, 400, 300], [420, 10, 600, 200]])
    labels, crowd = torch.tensor([1, 2, 1]), torch.tensor([False, False, True])
    found = truth[:2] if detections else torch.zeros(0, 4)
    return ([found], [labels[:len(found)]], [torch.tensor([0.9, 0.8])[:len(found)]],
            [truth], [labels], [crowd], [(640, 480)])


def test_perfect_detections_score_one_and_none_score_zero():
    perfect, per_class = coco_metrics(*one_image_case(detections=True), n_classes=3)
    assert perfect["AP"] == perfect["AP50"] == perfect["AP75"] == perfect["AR100"] == 1.0
    assert perfect["APs"] == 1.0 and perfect["APl"] == 1.0 and math.isnan(perfect["APm"])
    assert per_class[1]["AP"] == 1.0 and math.isnan(per_class[1]["APl"])
    nothing, per_class = coco_metrics(*one_image_case(detections=False), n_classes=3)
    assert nothing["AP"] == nothing["AR100"] == 0.0 and per_class[2]["AP"] == 0.0


def test_a_detection_on_a_crowd_region_is_no_false_positive():
    args = list(one_image_case(detections=True))
    args[0] = [torch.cat([args[0][0], torch.tensor([[430.0, 20, 590, 190]])])]
    args[1] = [torch.tensor([1, 2, 1])]
    args[2] = [torch.tensor([0.9, 0.8, 0.95])]     # the best-scored one lies on the crowd
    overall, _ = coco_metrics(*args, n_classes=3)
    assert overall["AP"] == 1.0
    args[0][0][2] = torch.tensor([300.0, 350, 380, 420])      # elsewhere: a false positive
    assert coco_metrics(*args, n_classes=3)[0]["AP"] < 1.0
