"""Draw a trained SSD's detections on images and videos.

    python detect.py CHECKPOINT INPUTS... [--out detections/] [--min-score 0.2]
                     [--max-overlap 0.45] [--top-k 200] [--device auto] [--batch-size 8]
                     [--amp auto] [--channels-last]
    python detect.py --onnx model.onnx INPUTS... [options]    # onnxruntime, no PyTorch model
    python detect.py CHECKPOINT --camera 0 [--max-frames 300]  # a camera, until Ctrl-C

INPUTS are image files, video files (by extension: .mp4, .avi, .mov, .mkv, ...), folders
(every file inside with an image extension Pillow knows, sorted by name, not recursive) or glob
patterns (expanded here too, so quoted patterns such as 'photos/**/*.jpg' work). Images are
taken in the frame a viewer shows, i.e. with their EXIF orientation applied, and transparent
pixels are laid on white.

Writes to --out: <stem>.png per image (a repeated stem gets _2, _3, ... in input order), each
box drawn with its class name and score in the class's colour, and detections.json, which
maps each image path as given/expanded to a list of
    {"box": [x1, y1, x2, y2], "label": name, "label_index": int, "score": float}
with boxes in pixels of the displayed image. A file that cannot be read is reported on
stderr and skipped. Exit status: 0 if at least one image or video was processed; 2 for bad
arguments or inputs (a checkpoint that is not one, no readable image or video); 1 for a failure
while running (an output that cannot be written).

Videos and cameras (--camera N; needs the opencv-python-headless package): <stem>.mp4 (or
camera<N>.mp4), every frame drawn as above, and <stem>.jsonl with one line per frame,
    {"frame": index from 0, "time": seconds, "detections": [as in detections.json]}
where time is index / the file's frame rate, or for a camera the seconds since its first
frame. Ctrl-C (or --max-frames) ends a video early; what was processed is kept.

--onnx runs a model written by export.py with onnxruntime instead of a checkpoint with
PyTorch: the same detections, drawing and files. Its NMS threshold is fixed in the model
(--max-overlap must match it or be left out) and it keeps scores above its export's
--min-score (a --min-score below that is refused); --device, --amp and --channels-last do
not apply.

From Python (e.g. a notebook):

    from datasets import load_image
    from detect import detect, draw_detections
    from model import load_checkpoint
    net, checkpoint = load_checkpoint("checkpoints/run/checkpoint.pt", "cpu")
    image = load_image("photo.jpg", displayed=True)
    boxes, labels, scores = detect(net, image)          # pixels, label indices, scores
    draw_detections(image, boxes, labels, scores, checkpoint["config"]["label_map"]).show()
"""
import argparse
import functools
import glob
import importlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from datasets import DEFAULT_INPUT, DataError, ModelInput, load_image, model_input, to_model_input, to_rgb
from utils import (DRAW_DECODING, HelpFormatter, add_precision_arguments, atomic_path, atomic_write,
                   bounded, choose_precision, describe_precision, pick_device, writable_folder)

# Box colours by class index (1 -> first entry, cycling after 20): saturated, mutually distinct.
PALETTE = [
    (220, 40, 40), (40, 160, 60), (30, 110, 220), (250, 200, 20), (150, 60, 200),
    (0, 190, 190), (240, 110, 20), (230, 60, 170), (130, 200, 30), (120, 70, 30),
    (0, 120, 120), (255, 140, 160), (90, 90, 200), (180, 160, 0), (100, 220, 160),
    (160, 20, 80), (60, 200, 255), (200, 120, 255), (0, 90, 40), (255, 90, 90),
]
IMAGE_EXTENSIONS = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
# Containers OpenCV's FFmpeg backend reads; such inputs are taken as videos.
VIDEO_EXTENSIONS = {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv"}
# Optional packages by module name: what to install.
OPTIONAL_PACKAGES = {"cv2": "opencv-python-headless", "onnx": "onnx", "onnxruntime": "onnxruntime"}


def import_optional(module, needed_by):
    """Import an optional dependency, or raise ImportError saying which package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = OPTIONAL_PACKAGES[module]
        raise ImportError(f"{needed_by} needs the {package} package: pip install {package}") from error


def load_checkpoint(path, device):
    """model.load_checkpoint, imported only here: the ONNX path never loads the network code."""
    import model
    return model.load_checkpoint(path, device)


# ----------------------------------------------------------------------------------------
# Images in and out
# ----------------------------------------------------------------------------------------

def find_images(inputs):
    """Expand files, folders and glob patterns into (files without repeats, problem messages)."""
    files, problems = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not found:
                problems.append(f"{item}: folder holds no images")
        elif path.exists():
            found = [path]
        else:
            found = [Path(p) for p in sorted(glob.glob(item, recursive=True)) if Path(p).is_file()]
            if not found:
                problems.append(f"{item}: no such file or folder, and no file matches it as a pattern")
        files += found
    return list(dict.fromkeys(files)), problems


def output_stems(paths):
    """path -> output file name without extension, distinct (ignoring case): repeated stems get
    _2, _3, ... in order."""
    names, used = {}, set()
    for path in paths:
        name, n = path.stem, 1
        while name.lower() in used:
            n += 1
            name = f"{path.stem}_{n}"
        used.add(name.lower())
        names[path] = name
    return names


def is_video(path):
    return path.suffix.lower() in VIDEO_EXTENSIONS


# ----------------------------------------------------------------------------------------
# Detection
# ----------------------------------------------------------------------------------------

def input_batch(images, spec):
    """PIL images -> their float32 batch N x 3 x S x S for a network whose input is `spec` (a
    datasets.ModelInput: S and the normalisation)."""
    return torch.stack([to_model_input(to_rgb(image), spec) for image in images])


def in_pixels(images, boxes, labels, scores):
    """Per-image detections with fractional boxes (lists of k x 4, k, k tensors) -> per image
    (boxes k x 4 float32 pixels of that image, labels k int64, scores k float32), on the CPU."""
    results = []
    for image, b, l, s in zip(images, boxes, labels, scores):
        w, h = image.size
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        results.append((b.float().cpu() * scale, l.cpu(), s.float().cpu()))
    return results


@torch.inference_mode()
def detect_batch(net, images, min_score=DRAW_DECODING.min_score,
                 max_overlap=DRAW_DECODING.max_overlap, top_k=DRAW_DECODING.top_k, amp="auto"):
    """Detect objects in several PIL images with one forward pass of `net` (an SSD in eval mode),
    each resized and normalised as the net's config says (datasets.model_input).

    Runs on the device of net's parameters, in the autocast precision that `amp` ("auto",
    "off", "bf16", "fp16") gives there (utils.choose_precision), with channels_last input if
    the net is in channels_last (main() converts it, as utils.choose_precision decides).
    Returns, per image, (boxes k x 4 float32 pixels x1, y1, x2, y2 of that image,
    labels k int64 class indices (1..C-1, map them with class_names), scores k float32),
    all on the CPU, highest score first.
    """
    if not images:
        return []
    weight = next(net.parameters())
    device = weight.device
    dtype, _ = choose_precision(amp, device)
    x = input_batch(images, model_input(net.config)).to(device)
    if weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        locs, class_scores = net(x)                        # N x P x 4, N x P x C
    return in_pixels(images, *net.detect_objects(locs, class_scores, min_score, max_overlap, top_k))


def detect(net, image, min_score=DRAW_DECODING.min_score, max_overlap=DRAW_DECODING.max_overlap,
           top_k=DRAW_DECODING.top_k, amp="auto"):
    """Detections in one PIL image: (boxes k x 4 in its pixels, label indices k, scores k).

    Boxes refer to `image` as passed: use datasets.load_image(path, displayed=True) for a
    file's displayed (EXIF-rotated) frame.
    """
    return detect_batch(net, [image], min_score, max_overlap, top_k, amp)[0]


class OnnxDetector:
    """An SSD written by export.py (decoding inside), run by onnxruntime on the CPU.

    Raises FileNotFoundError or ValueError, naming the file, for a missing file, a file that
    is not an ONNX model, one without its decoding (--no-postprocess) or with another input size.
    """

    def __init__(self, path):
        ort = import_optional("onnxruntime", "--onnx")
        if not Path(path).is_file():
            raise FileNotFoundError(f"ONNX model {path} does not exist")
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as error:          # onnxruntime's own exception types
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"{path} is not an ONNX model onnxruntime can load ({reason})") from error
        metadata = self.session.get_modelmeta().custom_metadata_map
        try:
            self.label_map = json.loads(metadata["label_map"])
            self.decoding = json.loads(metadata["decoding"])
            self.quantization = json.loads(metadata.get("quantization", "null"))   # export.py --int8
            # Exports from before the input was recorded are all SSD300 with ImageNet's.
            spec = json.loads(metadata.get("model_input", "null"))
            self.model_input = DEFAULT_INPUT if spec is None else ModelInput(
                spec["size"], tuple(spec["mean"]), tuple(spec["std"]), spec.get("resize", "pillow"))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path} was not written by export.py (its metadata lack the label "
                             "map, decoding settings and input)") from None
        if self.decoding is None:
            raise ValueError(f"{path} holds only the network's raw heads (export.py "
                             "--no-postprocess); detect.py needs a model exported with its decoding")
        shape = self.session.get_inputs()[0].shape
        size = self.model_input.size
        if list(shape[1:]) != [3, size, size]:
            raise ValueError(f"{path} takes images of shape {shape}, not N x 3 x {size} x {size} "
                             "as its metadata say")
        self.path = path

    def check_settings(self, min_score, max_overlap):
        """ValueError unless the model can give detections at these thresholds."""
        baked = self.decoding
        if max_overlap is not None and max_overlap != baked["max_overlap"]:
            raise ValueError(f"{self.path} does its NMS at IoU {baked['max_overlap']}, not "
                             f"{max_overlap}: leave out --max-overlap, or export again with it")
        if min_score < baked["min_score"]:
            raise ValueError(f"{self.path} keeps only scores above {baked['min_score']}: use a "
                             f"--min-score of at least that, or export again with a lower one")

    def detect_batch(self, images, min_score, top_k):
        """As detect_batch for PyTorch: per image (boxes k x 4 pixels, labels k, scores k), best
        first; at most the model's own top-k. Scores above min_score, as NMS only lets a box
        suppress lower-scoring ones: the same detections as decoding at min_score itself."""
        if not images:
            return []
        outputs = self.session.run(None, {"images": input_batch(images, self.model_input).numpy()})
        boxes, labels, scores = (torch.from_numpy(output) for output in outputs)   # N x K (x 4)
        keep = [(s > min_score).nonzero().squeeze(1)[:top_k] for s in scores]     # best first
        kept = ([t[k] for t, k in zip(tensors, keep)] for tensors in (boxes, labels, scores))
        return in_pixels(images, *kept)


def class_names(label_map):
    """label_map (name -> index) -> list of names by index ("class <i>" for unused indices)."""
    names = [f"class {i}" for i in range(max(label_map.values()) + 1)]
    for name, index in label_map.items():
        names[index] = name
    return names


def detections_to_json(boxes, labels, scores, names):
    """One image's detections as JSON-ready dicts (boxes in pixels to 0.01, scores to 1e-4)."""
    return [{"box": [round(v, 2) for v in box], "label": names[label], "label_index": label,
             "score": round(score, 4)}
            for box, label, score in zip(boxes.tolist(), labels.tolist(), scores.tolist())]


def write_json(results, path):
    """Write {image path: detections} with one line per detection."""
    entries = [f" {json.dumps(image)}: [" + ",".join(f"\n  {json.dumps(d)}" for d in detections) + "\n ]"
               for image, detections in results.items()]
    with atomic_write(path) as f:
        f.write("{\n" + ",\n".join(entries) + "\n}\n")


# ----------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------

def class_colour(label):
    """RGB colour of class index `label` (>= 1)."""
    return PALETTE[(int(label) - 1) % len(PALETTE)]


def text_colour(background):
    """Black or white, whichever reads better on `background` (RGB)."""
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def draw_detections(image, boxes, labels, scores, names):
    """An RGB copy of `image` with each detection's box, class name and score in its class colour.

    boxes: k x 4 pixels (x1, y1, x2, y2) of `image`; labels: k class indices; scores: k;
    names: class names by index, or a label map (name -> index).
    Line width and font size grow with the image. The best detections are drawn last (on top).
    """
    if isinstance(names, dict):
        names = class_names(names)
    canvas = to_rgb(image)
    draw = ImageDraw.Draw(canvas)
    w, h = canvas.size
    line = max(2, round(max(w, h) / 300))
    font_size = max(11, round(max(w, h) / 50))
    font = ImageFont.load_default(size=font_size)
    pad = max(2, font_size // 5)
    for box, label, score in reversed(list(zip(boxes.tolist(), labels.tolist(), scores.tolist()))):
        colour = class_colour(label)
        # Pixel columns round(x1) .. round(x2) - 1 (and rows likewise) hold the box.
        x1, y1, x2, y2 = (round(v) for v in box)
        draw.rectangle((x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)), outline=colour, width=line)
        text = f"{names[label]} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        label_w, label_h = right - left + 2 * pad, bottom - top + 2 * pad
        # Above the box if it fits, else just inside its top; kept within the image's width.
        lx = max(0, min(x1, w - label_w))
        ly = y1 - label_h if y1 >= label_h else y1
        draw.rectangle((lx, ly, lx + label_w - 1, ly + label_h - 1), fill=colour)
        draw.text((lx + pad - left, ly + pad - top), text, fill=text_colour(colour), font=font)
    return canvas


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=HelpFormatter,
        usage="%(prog)s (CHECKPOINT | --onnx MODEL) [INPUT ...] [--camera N] [options]")
    p.add_argument("paths", nargs="*", metavar="CHECKPOINT INPUT",
                   help="checkpoint written by train.py (unless --onnx), then image files, video "
                        "files, folders or glob patterns")
    p.add_argument("--onnx", type=Path, help="run this model written by export.py with onnxruntime "
                                             "instead of a checkpoint")
    p.add_argument("--camera", type=bounded(int, 0), metavar="N", help="also read camera N (0: the first)")
    p.add_argument("--max-frames", type=bounded(int, 1),
                   help="stop each video and the camera after this many frames")
    p.add_argument("--out", type=Path, default=Path("detections"), help="output folder")
    p.add_argument("--min-score", type=bounded(float, 0, below=1), default=DRAW_DECODING.min_score,
                   help="minimum class score")
    p.add_argument("--max-overlap", type=bounded(float, above=0, high=1),
                   help=f"NMS IoU threshold (default: {DRAW_DECODING.max_overlap}; with --onnx, "
                        "the model's)")
    p.add_argument("--top-k", type=bounded(int, 1), default=DRAW_DECODING.top_k,
                   help="most detections per image")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=bounded(int, 1), default=8, help="images per forward pass")
    add_precision_arguments(p)
    args = p.parse_args(argv)
    args.checkpoint = None if args.onnx else (args.paths[0] if args.paths else None)
    args.inputs = args.paths if args.onnx else args.paths[1:]
    if args.checkpoint is None and not args.onnx:
        p.error("give a CHECKPOINT or --onnx MODEL")
    if not args.inputs and args.camera is None:
        p.error("give at least one INPUT, or --camera N")
    return args


def load_detector(args):
    """The detector the options ask for: (function from a list of PIL images to their
    detections as detect_batch returns them, class names by index). Raises
    FileNotFoundError, ValueError or ImportError with a message for the user."""
    if args.onnx:
        detector = OnnxDetector(args.onnx)
        detector.check_settings(args.min_score, args.max_overlap)
        baked = detector.decoding
        weights = "" if detector.quantization is None else f" (INT8: weights {detector.quantization['weights']})"
        print(f"onnxruntime: {args.onnx}{weights}, its decoding: scores above {baked['min_score']}, NMS at "
              f"IoU {baked['max_overlap']}, top {baked['top_k']} per image", file=sys.stderr)
        run = functools.partial(detector.detect_batch, min_score=args.min_score, top_k=args.top_k)
        return run, class_names(detector.label_map)
    net, checkpoint = load_checkpoint(args.checkpoint, pick_device(args.device))
    dtype, memory_format = choose_precision(args.amp, next(net.parameters()).device,
                                            args.channels_last)
    print(f"precision: {describe_precision(dtype, memory_format)}", file=sys.stderr)
    net = net.to(memory_format=memory_format)
    max_overlap = DRAW_DECODING.max_overlap if args.max_overlap is None else args.max_overlap
    run = functools.partial(detect_batch, net, min_score=args.min_score, max_overlap=max_overlap,
                            top_k=args.top_k, amp=args.amp)
    return run, class_names(checkpoint["config"]["label_map"])


def main(argv=None):
    args = parse_args(argv)
    paths, problems = find_images(args.inputs)
    for problem in problems:
        print(problem, file=sys.stderr)
    videos = [path for path in paths if is_video(path)]
    images = [path for path in paths if not is_video(path)]
    if not paths and args.camera is None:
        print("detect.py: error: no images or videos to process", file=sys.stderr)
        return 2
    try:
        if videos or args.camera is not None:
            import_optional("cv2", "video input")
        run, names = load_detector(args)
        writable_folder(args.out)
    except (FileNotFoundError, ValueError) as error:             # bad arguments or inputs
        print(f"detect.py: error: {error}", file=sys.stderr)
        return 2
    except (ImportError, OSError) as error:                       # a package missing; a read-only disk
        print(f"detect.py: error: {error}", file=sys.stderr)
        return 1
    camera = [] if args.camera is None else [Path(f"camera{args.camera}")]
    stems = output_stems(images + videos + camera)
    processed = 0
    try:
        if images:
            results = detect_and_draw(run, images, stems, names, args)
            write_json(results, args.out / "detections.json")
            processed += len(results)
        for source, key in [(path, path) for path in videos] + [(args.camera, path) for path in camera]:
            try:
                frames = detect_in_video(run, source, args.out / stems[key], names, args)
            except DataError as error:
                print(error, file=sys.stderr)
                continue
            print(f"{key}: {frames} frames, drawn in {stems[key]}.mp4, detections in {stems[key]}.jsonl",
                  file=sys.stderr)
            processed += 1
    except OSError as error:                            # e.g. a full disk
        print(f"detect.py: error: {error}", file=sys.stderr)
        return 1
    print(f"{processed} of {len(paths) + len(camera)} inputs processed; results in {args.out}",
          file=sys.stderr)
    return 0 if processed else 2


def detect_and_draw(run, paths, stems, names, args):
    """Detect in the images `paths` batch by batch with `run` (see load_detector) and save each
    annotated image as <stem>.png: {path: detections}."""
    results = {}
    with tqdm(total=len(paths), unit="image", file=sys.stderr) as bar:
        for start in range(0, len(paths), args.batch_size):
            batch = []                                   # (path, PIL RGB image)
            for path in paths[start:start + args.batch_size]:
                try:
                    batch.append((path, load_image(path, displayed=True)))
                except DataError as error:
                    tqdm.write(str(error), file=sys.stderr)
                    bar.update()
            detections = run([image for _, image in batch])
            for (path, image), (boxes, labels, scores) in zip(batch, detections):
                with atomic_write(args.out / f"{stems[path]}.png", "wb") as f:
                    draw_detections(image, boxes, labels, scores, names).save(f, format="PNG")
                results[str(path)] = detections_to_json(boxes, labels, scores, names)
                bar.update()
    return results


# ----------------------------------------------------------------------------------------
# Videos and cameras
# ----------------------------------------------------------------------------------------

def frame_batches(capture, batch_size, max_frames=None):
    """The frames of an OpenCV capture in lists of up to batch_size (PIL RGB image, monotonic
    time it was read), at most max_frames in all (None: to the end)."""
    cv2 = import_optional("cv2", "video input")
    count = 0
    while max_frames is None or count < max_frames:
        batch = []
        while len(batch) < batch_size and (max_frames is None or count < max_frames):
            ok, frame = capture.read()                   # H x W x 3 uint8, BGR
            if not ok:
                break
            batch.append((Image.fromarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)), time.monotonic()))
            count += 1
        if not batch:
            return
        yield batch


def detect_in_video(run, source, out_stem, names, args):
    """Detect in every frame of `source` (a video file's Path, or a camera index) with `run`
    (see load_detector), writing <out_stem>.mp4 (the frames drawn) and <out_stem>.jsonl (one
    record per frame).

    Ends at the video's end, after --max-frames, or at Ctrl-C, keeping what was processed.
    Returns the number of frames; raises DataError if the source gives none.
    """
    cv2 = import_optional("cv2", "video input")
    is_camera = isinstance(source, int)
    label = f"camera {source}" if is_camera else str(source)
    capture = cv2.VideoCapture(source if is_camera else str(source))
    if not capture.isOpened():
        raise DataError(f"cannot open camera {source}" if is_camera else f"{label}: cannot read video")
    # Cameras often report no frame rate or count: then 30 frames/s for the output file, and no total.
    fps = capture.get(cv2.CAP_PROP_FPS) or 30.0
    total = None if is_camera else int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    if args.max_frames:
        total = min(total or args.max_frames, args.max_frames)
    index, started, writer = 0, time.monotonic(), None
    try:
        with atomic_path(out_stem.with_suffix(".mp4")) as video_file, \
                atomic_write(out_stem.with_suffix(".jsonl")) as log, \
                tqdm(total=total, unit="frame", desc=label, file=sys.stderr) as bar:
            try:
                for batch in frame_batches(capture, args.batch_size, args.max_frames):
                    frames = [frame for frame, _ in batch]
                    if writer is None:
                        writer = cv2.VideoWriter(video_file, cv2.VideoWriter_fourcc(*"mp4v"), fps,
                                                 frames[0].size)
                        if not writer.isOpened():
                            raise OSError(f"OpenCV cannot encode {out_stem.with_suffix('.mp4')} (mp4v)")
                    for (frame, read_at), (boxes, labels, scores) in zip(batch, run(frames)):
                        drawn = draw_detections(frame, boxes, labels, scores, names)
                        writer.write(cv2.cvtColor(np.asarray(drawn), cv2.COLOR_RGB2BGR))
                        seconds = read_at - started if is_camera else index / fps
                        log.write(json.dumps({"frame": index, "time": round(seconds, 4),
                                              "detections": detections_to_json(boxes, labels, scores, names)})
                                  + "\n")
                        index += 1
                        bar.update()
            except KeyboardInterrupt:
                tqdm.write(f"{label}: interrupted after {index} frames", file=sys.stderr)
            finally:
                if writer is not None:
                    writer.release()                     # completes the file before it is renamed
            if index == 0:
                raise DataError(f"{label}: cannot read video (no frames)")
    finally:
        capture.release()
    return index


if __name__ == "__main__":
    sys.exit(main())
