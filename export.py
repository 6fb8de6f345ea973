"""Export a trained SSD to ONNX, with its decoding and NMS inside the graph.

    python export.py checkpoints/toy/checkpoint.pt --out toy.onnx
    python export.py CHECKPOINT --out model.onnx [--min-score 0.01] [--max-overlap 0.45]
                     [--top-k 200] [--per-class-top-k 400] [--check-images INPUT ...]
    python export.py CHECKPOINT --out heads.onnx --no-postprocess
    python export.py CHECKPOINT --out model_int8.onnx --int8 --calibrate LISTS [--calibration-images 300]

The model's input is "images": a float32 batch N x 3 x S x S (S = 300 for SSD300, 512 for
SSD512), normalised as datasets.to_model_input does for the checkpoint (RGB; the ImageNet mean
and standard deviation unless its weights expect another, as imported ones may); N is free,
S fixed (onnxruntime rejects other sizes). Its outputs, for every image, are the
--top-k best detections, highest score first, padded with zeros:

    boxes   N x K x 4  float32  fractional corners x1, y1, x2, y2 in [0, 1] (times the
                                image's width and height: pixels)
    labels  N x K      int64    class index, 1..C-1; 0 marks padding
    scores  N x K      float32  class probability; 0 marks padding

Inside: the offsets decoded against the priors (8732 for SSD300), softmax, per class the top
--per-class-top-k scores above --min-score, NMS at IoU --max-overlap (ONNX's
NonMaxSuppression), then the top --top-k of the image over all classes: the rules of
model.detect_objects, with the paper's evaluation settings (utils.EVAL_DECODING) by default.
detect.py --onnx keeps only scores above its own --min-score, so a model exported with a low
--min-score serves any higher one; the NMS threshold is fixed at export.

With --no-postprocess the outputs are the raw heads instead: "locs" N x P x 4 offsets and
"scores" N x P x C logits (P priors), for runtimes that do their own decoding.

The metadata (metadata_props) hold "label_map" (JSON, class name -> index), "decoding" (JSON:
the four settings above, or null for --no-postprocess) and "model_input" (JSON: "size", the
"mean" and "std" of the normalisation on 0-1 RGB values, and "resize": how an image of another
size becomes S x S, datasets.RESIZE_METHODS), which detect.py --onnx reads.

--int8 writes the model with its network in 8-bit integers (onnxruntime's static quantization:
QDQ, weights int8 per output channel, activations uint8), calibrated on --calibration-images
images of the training split of the lists --calibrate names, made as the model's input (the
checkpoint's resize and normalisation); the decoding, conv4_3's L2 normalisation and the first
convolution stay in float32 (see FLOAT_PARTS). "quantization" in the metadata records how,
and detect.py --onnx runs it as any other export. It then reports, in one line, how the INT8
model agrees with the float32 one on held-out images (the lists' test split, its first
--int8-check-images; else training images not used for calibration) and, with a test split,
the VOC07 mAP of both. On CPUs without VNNI instructions the integer kernels can saturate:
--reduce-range auto (the default) quantizes weights to 7 bits there, as onnxruntime advises.

Before it reports success, the file is checked with onnx.checker and run by onnxruntime on a
few images (--check-images, or three generated shapes images) next to the PyTorch model:
the same labels, and boxes and scores within 1e-4 (of the image size, for boxes); otherwise
the exit status is 1 and the float32 file is left in place for inspection (with --int8 nothing
is written). Exit status 2: a bad argument or input (a checkpoint that is not one, unreadable
--check-images or lists), nothing written. Needs the onnx and onnxruntime packages.
"""
import argparse
import io
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from datasets import DataError, PascalVOCDataset, load_image, model_input, to_model_input
from shapes import make_shapes_dataset
from detect import find_images, import_optional
from eval import class_lookup, in_dataset_classes
from metrics import calculate_mAP
from model import decode_predictions, detect_objects, load_checkpoint
from utils import DRAW_DECODING, EVAL_DECODING, HelpFormatter, atomic_write, bounded, pairwise_iou, writable_folder

# The paper's evaluation settings (min_score, max_overlap, top_k, per_class_top_k).
DECODING = EVAL_DECODING._asdict()
# ONNX opset 17: NonMaxSuppression and everything else here, and old enough for most runtimes.
OPSET = 17
# Largest difference allowed between onnxruntime and PyTorch: scores, and boxes as a fraction
# of the image size.
TOLERANCE = 1e-4


class ParityError(Exception):
    """onnxruntime's results differ from PyTorch's on the check images."""


class NonMaxSuppression(torch.autograd.Function):
    """ONNX's NonMaxSuppression operator, for the TorchScript exporter.

    boxes: N x P x 4 corners, probs: N x C' x P. Per image and class: the boxes scoring above
    score_threshold, greedily suppressed at IoU > iou_threshold, at most max_per_class of them.
    Returns selected: M x 3 int64 (image, class, box index).

    Only the exported operator computes this. In PyTorch, forward (run once, while tracing)
    is a stand-in that suppresses nothing: the graph's later steps only need indices of this
    form to be traced. (utils.greedy_nms, the real thing, cannot run inside a trace: its
    data-dependent loop breaks the exporter's graph passes.)
    """

    @staticmethod
    def forward(ctx, boxes, probs, max_per_class, iou_threshold, score_threshold):
        return (probs > score_threshold).nonzero()

    @staticmethod
    def symbolic(g, boxes, probs, max_per_class, iou_threshold, score_threshold):
        def constant(value, dtype):
            return g.op("Constant", value_t=torch.tensor([value], dtype=dtype))
        return g.op("NonMaxSuppression", boxes, probs, constant(max_per_class, torch.int64),
                    constant(iou_threshold, torch.float32), constant(score_threshold, torch.float32))


class DetectorWithDecoding(nn.Module):
    """An SSD and its decoding as one traceable module: the graph export.py writes.

    images N x 3 x S x S -> (boxes N x K x 4 fractional corners, labels N x K int64,
    scores N x K), K = min(top_k, (C-1) x P), P priors, best first, padded with zeros (label 0).
    """

    def __init__(self, net, min_score, max_overlap, top_k, per_class_top_k):
        super().__init__()
        self.net = net
        # Python ints, not the traced tensors' sizes: fixed in the graph.
        self.n_priors, self.n_classes = net.priors_cxcy.size(0), net.n_classes - 1
        self.min_score, self.max_overlap = min_score, max_overlap
        self.top_k, self.per_class_top_k = top_k, per_class_top_k

    def forward(self, images):
        boxes, probs = decode_predictions(*self.net(images), self.net.priors_cxcy)
        C, P = self.n_classes, self.n_priors
        k = P if self.per_class_top_k is None else min(self.per_class_top_k, P)
        if k < P:
            # Caffe's pre-NMS cap: scores outside each class's top k become 0, under any threshold.
            values, index = probs.topk(k, dim=2)
            probs = torch.zeros_like(probs).scatter(2, index, values)
        selected = NonMaxSuppression.apply(boxes, probs, k, self.max_overlap, self.min_score)
        image, cls, prior = selected.unbind(1)
        kept = torch.zeros_like(probs).index_put((image, cls, prior), probs[image, cls, prior])
        scores, index = kept.flatten(1).topk(min(self.top_k, C * P), dim=1)     # N x K
        labels, prior = index // P + 1, index % P
        boxes = boxes.gather(1, prior.unsqueeze(2).expand(-1, -1, 4))
        found = scores > 0
        return boxes * found.unsqueeze(2), torch.where(found, labels, 0), scores


# ----------------------------------------------------------------------------------------
# Export and check
# ----------------------------------------------------------------------------------------

def export(net, label_map, decoding=None):
    """The ONNX model (an onnx.ModelProto) of `net` (an SSD in eval mode, on the CPU):
    with its decoding by the settings in `decoding` (a dict as DECODING), or its raw heads if
    decoding is None. The label map, the settings and the input go into its metadata.
    """
    onnx = import_optional("onnx", "export.py")
    if decoding is None:
        module, outputs = net, ["locs", "scores"]
    else:
        module, outputs = DetectorWithDecoding(net, **decoding), ["boxes", "labels", "scores"]
    # Eval mode for the wrapper too: a module in training mode is traced with batch norm in
    # training mode (batch statistics, and running statistics updated by the example batch).
    module.eval()
    spec = model_input(net.config)
    example = torch.randn(2, 3, spec.size, spec.size)
    buffer = io.BytesIO()
    # dynamo=False, the TorchScript exporter: its autograd.Function symbolic emits ONNX's
    # NonMaxSuppression (whose output size depends on the data) directly, where the default
    # dynamo exporter would need the onnxscript package and a custom operator with its own
    # translation for it.
    with torch.no_grad(), warnings.catch_warnings():
        # Known and harmless here: the exporter's deprecation (see above), the tracer's notes
        # that sizes become constants (they are: the input size, the class and prior counts), and
        # advanced indexing's caveat about negative indices (NMS gives none).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", "Exporting aten::index operator")
        torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=OPSET,
                          input_names=["images"], output_names=outputs,
                          dynamic_axes={name: {0: "batch"} for name in ["images", *outputs]})
    proto = onnx.load_from_string(buffer.getvalue())
    for key, value in (("label_map", label_map), ("decoding", decoding), ("model_input", spec._asdict())):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def check_images(inputs, spec, count=3):
    """Inputs N x 3 x S x S for the parity check, made as `spec` (a datasets.ModelInput) says:
    the images named by `inputs` (files, folders, patterns, as detect.py takes them), or
    `count` generated shapes images."""
    if inputs:
        paths, problems = find_images(inputs)
        if problems or not paths:
            raise DataError("; ".join(problems) or "--check-images: no images")
        return torch.stack([to_model_input(load_image(path, displayed=True), spec) for path in paths])
    with tempfile.TemporaryDirectory() as tmp:
        make_shapes_dataset(Path(tmp) / "shapes", n_trainval=0, n_test=count, seed=1)
        return check_images([str(Path(tmp) / "shapes" / "JPEGImages")], spec)


def unpadded(boxes, labels, scores):
    """One image's padded detections (K x 4, K, K arrays) without the padding (label 0)."""
    real = labels > 0
    return boxes[real], labels[real], scores[real]


def compare_detections(expected, found):
    """Largest differences between two sets of one image's detections, each (boxes k x 4,
    labels k, scores k) numpy arrays: (max box difference, max score difference), or None if
    they differ in number or labels.

    Each expected detection, best first, is paired with the closest (largest of box and score
    difference) unpaired one of its class: detections whose scores tie (or nearly: the two
    runtimes round differently) may come in either order.
    """
    if sorted(expected[1].tolist()) != sorted(found[1].tolist()):
        return None
    worst_box, worst_score = 0.0, 0.0
    free = np.ones(len(found[1]), dtype=bool)
    for box, label, score in zip(*expected):
        box_difference = np.abs(found[0] - box).max(axis=1)
        score_difference = np.abs(found[2] - score)
        distance = np.where(free & (found[1] == label), np.maximum(box_difference, score_difference), np.inf)
        j = int(distance.argmin())
        free[j] = False
        worst_box, worst_score = max(worst_box, box_difference[j]), max(worst_score, score_difference[j])
    return float(worst_box), float(worst_score)


def label_counts(labels):
    """{label: number of detections} of a labels array."""
    return dict(zip(*(values.tolist() for values in np.unique(labels, return_counts=True))))


def check_parity(net, session, images, decoding):
    """Run `images` (N x 3 x S x S) through the PyTorch `net` and the onnxruntime
    `session`. Returns (the largest differences, {name: float}, and the number of
    detections compared, 0 for raw heads); raises ParityError where they disagree."""
    with torch.no_grad():
        locs, logits = net(images)
    outputs = session.run(None, {"images": images.numpy()})
    if decoding is None:
        differences = {"locs": float(np.abs(outputs[0] - locs.numpy()).max()),
                       "scores": float(np.abs(outputs[1] - logits.numpy()).max())}
        # Logits and offsets, unlike probabilities, are unbounded: relative to their size.
        scale = max(1.0, float(logits.abs().max()), float(locs.abs().max()))
        if max(differences.values()) > TOLERANCE * scale:
            raise ParityError(f"onnxruntime's heads differ from PyTorch's by {differences}")
        return differences, 0
    expected = detect_objects(locs, logits, net.priors_cxcy, **decoding)
    worst, count = {"boxes": 0.0, "scores": 0.0}, 0
    for n, reference in enumerate(zip(*expected)):
        reference = [t.numpy() for t in reference]
        difference = compare_detections(reference, unpadded(*(o[n] for o in outputs)))
        if difference is None:
            raise ParityError(f"image {n}: onnxruntime and PyTorch find different detections "
                             f"(per class: {label_counts(unpadded(*(o[n] for o in outputs))[1])} "
                             f"against {label_counts(reference[1])})")
        worst = {key: max(worst[key], value) for key, value in zip(worst, difference)}
        count += len(reference[1])
    if max(worst.values()) > TOLERANCE:
        raise ParityError(f"onnxruntime's detections differ from PyTorch's by {worst} (boxes as "
                         f"a fraction of the image size), more than {TOLERANCE}")
    return worst, count


# ----------------------------------------------------------------------------------------
# INT8
# ----------------------------------------------------------------------------------------

# The operators --int8 quantizes: convolutions with their ReLUs (fused into one integer
# convolution) and max pooling, which passes 8-bit values through.
QUANTIZED_OPS = ["Conv", "Relu", "MaxPool"]
# What stays in float32, and why (float_parts):
#   - the decoding (offsets against the priors, softmax, per-class top-k, NMS): little
#     arithmetic, and its values (exponentials of offsets, probabilities near the 0.01
#     threshold) are those 8 bits keep worst;
#   - conv4_3's L2 normalisation and scaling: a sum of squares over 512 channels and a
#     division, and a learned scale (20 at the start) that multiplies any rounding;
#   - the first convolution: 3 input channels are too shallow for the integer kernels (on the
#     2-core Xeon, SSD300-VGG16's conv1_1 took 7.3 ms in INT8 against 2.9 ms in float32, for
#     0.5% of the arithmetic), and the raw image is the input most sensitive to rounding.
FLOAT_PARTS = ("the decoding", "conv4_3's L2 normalisation", "the first convolution")


def float_parts(proto):
    """Names of the nodes of an export (of export(), after quant_pre_process) that FLOAT_PARTS
    keeps in float32: the network's nodes are under /net/ (the decoding's are not)."""
    first_conv = next(node.name for node in proto.graph.node if node.op_type == "Conv")
    return [node.name for node in proto.graph.node
            if not node.name.startswith("/net/") or node.name.startswith("/net/l2_norm/") or node.name == first_conv]


def has_vnni():
    """Whether this CPU has integer dot-product instructions (AVX-512 VNNI, AVX-VNNI or AMX),
    with which onnxruntime's 8-bit kernels cannot saturate. False where torch cannot tell."""
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return any(capabilities.get(key, False) for key in ("avx512_vnni", "avx_vnni", "amx_int8"))


def reduce_range_for(choice):
    """--reduce-range: (7-bit weights?, why). auto: off on a CPU with VNNI; on without it, where
    onnxruntime's u8s8 kernels (vpmaddubsw) add pairs of 8-bit products in 16 bits, which can
    saturate with full-range weights (onnxruntime's quantization guidance)."""
    if choice == "auto":
        vnni = has_vnni()
        return (not vnni, "auto: this CPU has VNNI, 8-bit weights" if vnni else
                "auto: this CPU has no VNNI, 7-bit weights against saturation")
    return choice == "on", f"--reduce-range {choice}"


def calibration_images(lists, spec, count):
    """`count` training images of the lists (evenly spread over the split, all of them if it
    has fewer), made as the model's input: (dataset, indices). A DataError in one line if
    the split is missing or empty, or (when read) an image cannot be."""
    dataset = PascalVOCDataset(lists, "train", augment=False, model_input=spec)
    if len(dataset) == 0:
        raise DataError(f"{lists}: the training split is empty: nothing to calibrate --int8 with")
    indices = sorted(set(np.linspace(0, len(dataset) - 1, min(count, len(dataset))).round().astype(int).tolist()))
    return dataset, indices


def quantize(proto, dataset, indices, reduce_range):
    """The INT8 model (an onnx.ModelProto) of a float32 export: onnxruntime's shape inference
    and graph cleanup (quant_pre_process), then static quantization (quantize_static: QDQ,
    per-channel int8 weights, uint8 activations, min-max ranges over the calibration images,
    QUANTIZED_OPS, FLOAT_PARTS left in float32). The metadata are the float export's."""
    onnx = import_optional("onnx", "export.py --int8")
    import_optional("onnxruntime", "export.py --int8")
    from onnxruntime import quantization
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(quantization.CalibrationDataReader):
        """The calibration images one at a time, read as they are asked for, a range of them
        at a time (set_range, for CalibStridedMinMax)."""

        def __init__(self):
            self.pending = iter(())

        def __len__(self):
            return len(indices)

        def set_range(self, start_index, end_index):
            self.pending = iter(indices[start_index:end_index])

        def get_next(self):
            index = next(self.pending, None)
            return None if index is None else {"images": dataset[index][0][None].numpy()}

    with tempfile.TemporaryDirectory() as tmp:
        float_path, prepared, quantized = (Path(tmp) / name for name in ("float.onnx", "prepared.onnx", "int8.onnx"))
        onnx.save(proto, float_path)
        # Symbolic shape inference stops at NonMaxSuppression's data-dependent output size.
        quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        quantization.quantize_static(
            str(prepared), str(quantized), Reader(), quant_format=quantization.QuantFormat.QDQ,
            per_channel=True, reduce_range=reduce_range, activation_type=quantization.QuantType.QUInt8,
            weight_type=quantization.QuantType.QInt8, op_types_to_quantize=QUANTIZED_OPS,
            nodes_to_exclude=float_parts(onnx.load(prepared)),
            calibrate_method=quantization.CalibrationMethod.MinMax,
            # The ranges folded in every few images: the intermediate outputs of hundreds of
            # images would not fit in memory. (CalibMaxIntermediateOutputs, meant for this,
            # drops every full group of outputs unused in onnxruntime 1.32: calibrate.py's
            # collect_data clears them before computing their ranges.)
            extra_options={"CalibStridedMinMax": max(k for k in range(1, 17) if len(indices) % k == 0)})
        model = onnx.load(quantized)
    del model.metadata_props[:]
    model.metadata_props.extend(proto.metadata_props)
    return model


def onnx_detections(session, dataset, indices, batch_size=8):
    """An export's detections (with its decoding) on dataset[i] for i in indices: per image
    (boxes k x 4 fractions, labels k, scores k), as tensors."""
    found = []
    for start in range(0, len(indices), batch_size):
        images = torch.stack([dataset[i][0] for i in indices[start:start + batch_size]])
        outputs = session.run(None, {"images": images.numpy()})
        found += [tuple(torch.from_numpy(t) for t in unpadded(*(o[n] for o in outputs))) for n in range(len(images))]
    return found


def agreement(reference, other, min_score=DRAW_DECODING.min_score):
    """(share of reference's detections scoring >= min_score that `other` finds again: the same
    label, IoU >= 0.5; how many there were)."""
    found = total = 0
    for (boxes, labels, scores), (other_boxes, other_labels, _) in zip(reference, other):
        sure = scores >= min_score
        total += int(sure.sum())
        if sure.any() and len(other_labels):
            same = labels[sure][:, None] == other_labels[None, :]
            found += int(((pairwise_iou(boxes[sure], other_boxes) >= 0.5) & same).any(1).sum())
    return (found / total if total else 1.0), total


def int8_report(float_session, int8_session, lists, spec, label_map, n_classes, calibrated, max_images):
    """One line on the INT8 model against the float32 one: on the test split's first
    max_images (with each one's VOC07 mAP), or without a test split on training images that
    calibration did not see."""
    if (Path(lists) / "TEST_images.json").exists():
        dataset = PascalVOCDataset(lists, "test", model_input=spec)
        indices, where = list(range(min(max_images, len(dataset)))), "test images"
    else:
        dataset = PascalVOCDataset(lists, "train", augment=False, model_input=spec)
        unseen = sorted(set(range(len(dataset))) - set(calibrated))
        indices, where = unseen[:max_images], "training images not used for calibration (no test split)"
    if not indices:
        return "INT8 not compared with float32: no held-out image"
    float_dets, int8_dets = (onnx_detections(s, dataset, indices) for s in (float_session, int8_session))
    share, total = agreement(float_dets, int8_dets)
    line = (f"INT8 against float32 on {len(indices)} {where}: {100 * share:.1f}% of float32's {total} "
            f"detections scoring >= {DRAW_DECODING.min_score} found again (same label, IoU >= 0.5)")
    if where == "test images":
        lookup = class_lookup(label_map, dataset.label_map, n_classes)
        truth = list(zip(*(dataset[i][1:4] for i in indices)))        # fractions, as the detections
        maps = []
        for dets in (float_dets, int8_dets):
            dets, n_scored = in_dataset_classes(dict(zip(("boxes", "labels", "scores"), map(list, zip(*dets)))),
                                                lookup, dataset.label_map, n_classes)
            maps.append(calculate_mAP(dets["boxes"], dets["labels"], dets["scores"], *truth, n_scored)[1])
        line += "; VOC07 mAP " + ", ".join(f"{name} {'-' if m is None else f'{m:.4f}'}"
                                            for name, m in (("float32", maps[0]), ("INT8", maps[1])))
    return line


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("checkpoint", help="checkpoint written by train.py")
    p.add_argument("--out", type=Path, required=True, help="ONNX file to write")
    p.add_argument("--no-postprocess", dest="postprocess", action="store_false",
                   help="export only the network's raw heads (locs, scores) (default: the "
                        "decoding and NMS too)")
    p.add_argument("--min-score", type=bounded(float, 0, below=1), default=DECODING["min_score"],
                   help="keep class scores above this")
    p.add_argument("--max-overlap", type=bounded(float, above=0, high=1),
                   default=DECODING["max_overlap"], help="NMS IoU threshold")
    p.add_argument("--top-k", type=bounded(int, 1), default=DECODING["top_k"],
                   help="detections per image")
    p.add_argument("--per-class-top-k", type=bounded(int, 1), default=DECODING["per_class_top_k"],
                   help="best scores per class that enter NMS")
    p.add_argument("--check-images", nargs="+", metavar="INPUT",
                   help="images for the comparison with PyTorch (files, folders, patterns; "
                        "default: three generated shapes images)")
    int8 = p.add_argument_group("INT8")
    int8.add_argument("--int8", action="store_true",
                      help="quantize the network to 8-bit integers (needs --calibrate)")
    int8.add_argument("--calibrate", metavar="LISTS",
                      help="lists folder (create_data_lists.py) whose training split calibrates --int8")
    int8.add_argument("--calibration-images", type=bounded(int, 1), default=300,
                      help="training images to calibrate with (all of them if the split has fewer)")
    int8.add_argument("--reduce-range", choices=["auto", "on", "off"], default="auto",
                      help="7-bit weights, against saturation on CPUs without VNNI; auto: as this "
                           "CPU needs (on: for models that will run on such CPUs)")
    int8.add_argument("--int8-check-images", type=bounded(int, 1), default=500,
                      help="held-out images on which INT8 is compared with float32")
    args = p.parse_args(argv)
    if args.int8 != bool(args.calibrate):
        p.error("--int8 needs --calibrate LISTS, and --calibrate is for --int8")
    return args


def main(argv=None):
    args = parse_args(argv)
    decoding = (dict(min_score=args.min_score, max_overlap=args.max_overlap, top_k=args.top_k,
                     per_class_top_k=args.per_class_top_k) if args.postprocess else None)
    try:
        ort = import_optional("onnxruntime", "export.py")
        writable_folder(args.out.parent)                 # before the export, not after it
        net, checkpoint = load_checkpoint(args.checkpoint)
        spec = model_input(net.config)
        images = check_images(args.check_images, spec)
        if args.int8:
            calibration = calibration_images(args.calibrate, spec, args.calibration_images)
        proto = export(net, checkpoint["config"]["label_map"], decoding)
        if not args.int8:                     # written first: left for inspection if the check fails
            with atomic_write(args.out, "wb") as f:
                f.write(proto.SerializeToString())
        session = ort.InferenceSession(proto.SerializeToString() if args.int8 else str(args.out),
                                       providers=["CPUExecutionProvider"])
        differences, count = check_parity(net, session, images, decoding)
        if args.int8:
            report = write_int8(proto, session, calibration, net, checkpoint, args)
    except (FileNotFoundError, ValueError) as error:         # bad arguments or inputs (DataError too)
        print(f"export.py: error: {error}", file=sys.stderr)
        return 2
    except (ImportError, OSError, ParityError) as error:
        print(f"export.py: error: {error}", file=sys.stderr)
        return 1
    what = (f"{count} detections on {len(images)} images" if decoding
            else f"raw heads of {len(images)} images")
    print(f"{'the float32 graph' if args.int8 else f'wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)'}: "
          f"onnx.checker passed; onnxruntime matches PyTorch on {what}, largest differences "
          + ", ".join(f"{k} {v:.2g}" for k, v in differences.items()), file=sys.stderr)
    if args.int8:
        print(report, file=sys.stderr)
    return 0


def write_int8(proto, float_session, calibration, net, checkpoint, args):
    """--int8: quantize the float32 export `proto`, write it to --out with its quantization in
    the metadata, and return the report's lines (how, and how it agrees with float32)."""
    ort = import_optional("onnxruntime", "export.py --int8")
    (dataset, indices), spec = calibration, model_input(net.config)
    reduce_range, why = reduce_range_for(args.reduce_range)
    model = quantize(proto, dataset, indices, reduce_range)
    details = dict(weights=f"int{7 if reduce_range else 8}, per output channel", activations="uint8",
                   format="QDQ (onnxruntime quantize_static)", reduce_range=reduce_range,
                   reduce_range_reason=why, float32=list(FLOAT_PARTS),
                   calibration=dict(lists=str(args.calibrate), split="train", images=len(indices),
                                    method="min-max"))
    entry = model.metadata_props.add()
    entry.key, entry.value = "quantization", json.dumps(details)
    serialized = model.SerializeToString()
    int8_session = ort.InferenceSession(serialized, providers=["CPUExecutionProvider"])
    comparison = ("INT8 not compared with float32 (--no-postprocess: no detections)" if args.postprocess is False
                  else int8_report(float_session, int8_session, args.calibrate, spec,
                                   checkpoint["config"]["label_map"], net.n_classes, indices, args.int8_check_images))
    with atomic_write(args.out, "wb") as f:                 # only once the report could be made
        f.write(serialized)
    return (f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB): INT8, weights "
            f"{details['weights']} ({why}), calibrated on {len(indices)} training images of {args.calibrate}\n"
            + comparison)


if __name__ == "__main__":
    sys.exit(main())
