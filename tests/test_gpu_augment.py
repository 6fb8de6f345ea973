"""gpu_augment.py: the device path's samples against the CPU (PIL) path's, piece by piece and whole.

Run on the CPU here (TorchCodec's libjpeg-turbo decoder gives Pillow's pixels); the same code runs on CUDA.
"""
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import datasets as D
import gpu_augment as G
import train
from benchmark import CountOperations
from conftest import TINY

FILTERS = (Image.NEAREST, Image.BOX, Image.BILINEAR, Image.BICUBIC, Image.LANCZOS)


def random_pixels(rng, width, height, smooth):
    """uint8 (height, width, 3): noise (the resamplers' hardest case) or a smooth image."""
    if not smooth:
        return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    coarse = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))


def chw(array):
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def test_resize_matches_pillow():
    """Image.resize with a fractional box and reducing_gap=1 (render's call), every filter,
    shrinking (through Image.reduce) and enlarging, either pass first: 100 images of different
    sizes resized in one batch, each pasted at its own place of the output."""
    rng = np.random.default_rng(0)
    images, placements, expected = [], [], []
    for case in range(100):
        width, height = (int(v) for v in rng.integers(20, 600, size=2))
        pixels = random_pixels(rng, width, height, smooth=case % 2 == 1)
        x0, y0 = rng.uniform(0, 0.7 * width), rng.uniform(0, 0.7 * height)
        box = (x0, y0, rng.uniform(x0 + 1, width), rng.uniform(y0 + 1, height))
        if case % 3 == 0:                                     # whole pixels, as without zoom out
            box = tuple(float(int(v)) for v in box)
        size = (int(rng.integers(1, 301)), int(rng.integers(1, 301)))
        left, top = int(rng.integers(0, 301 - size[0])), int(rng.integers(0, 301 - size[1]))
        interpolation = FILTERS[case % len(FILTERS)]
        images.append(chw(pixels))
        placements.append(((left, top, left + size[0], top + size[1]), box, interpolation))
        resized = Image.fromarray(pixels).resize(size, interpolation, box=box, reducing_gap=1.0)
        expected.append(np.asarray(resized))
    images.append(chw(random_pixels(rng, 30, 40, smooth=False)))           # one showing nothing
    placements.append(None)
    canvas, inside = G.resize_batch(images, placements, torch.device("cpu"))
    assert canvas.shape == (101, 3, 300, 300) and inside.shape == (101, 1, 300, 300)
    assert not inside[-1].any() and not canvas[-1].any()
    differing = {f: [] for f in FILTERS}
    for out, shown, ((x1, y1, x2, y2), box, interpolation), want in zip(canvas, inside, placements, expected):
        assert shown.sum() == (x2 - x1) * (y2 - y1) and shown[0, y1:y2, x1:x2].all()
        assert not out.masked_select(~shown).any()                   # nothing outside its place
        difference = np.abs(out[:, y1:y2, x1:x2].permute(1, 2, 0).numpy().astype(int) - want)
        assert difference.max() <= 2, (want.shape, box, interpolation)
        differing[interpolation].append((difference > 0).mean())
    # NEAREST and BOX pick and average whole pixels: exact. The others' float32 sums differ
    # from Pillow's 32-bit integer ones only where the result is within ~1e-5 of a half.
    assert max(differing[Image.NEAREST]) == max(differing[Image.BOX]) == 0
    assert all(np.mean(v) < 0.005 for v in differing.values()), {f: np.mean(v) for f, v in differing.items()}


@pytest.mark.parametrize("factor", [(2, 2), (3, 1), (1, 5), (3, 7)])
def test_reduce_matches_pillow(factor):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (41, 52, 3), dtype=np.uint8)        # short blocks at both edges
    expected = np.asarray(Image.fromarray(pixels).reduce(factor))
    assert np.array_equal(G.pillow_reduce(chw(pixels), factor).permute(1, 2, 0).numpy(), expected)


def test_hsv_conversions_match_pillow():
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (200, 500, 3), dtype=np.uint8)
    pixels[:20] = pixels[:20, :, :1]                                  # greys: hue and saturation 0
    hsv = np.asarray(Image.fromarray(pixels).convert("HSV"))
    assert np.array_equal(G.rgb_to_hsv(chw(pixels)[None])[0].permute(1, 2, 0).numpy(), hsv)
    # Every HSV triple, not only those RGB gives (hue 255: the last sixth wraps to red).
    back = np.asarray(Image.fromarray(pixels, "HSV").convert("RGB"))
    assert np.array_equal(G.hsv_to_rgb(chw(pixels)[None])[0].permute(1, 2, 0).numpy(), back)


def test_lookup_tables_are_pillows():
    """The tables both paths use equal the photometric steps written out with Python's round,
    and apply_tables equals Image.point."""
    torch.manual_seed(0)
    draws = [D.sample_photometric() for _ in range(50)]
    tables = D.photometric_tables(draws)
    for p, table in zip(draws, tables):
        first, last = (p.contrast, 1.0) if p.contrast_first else (1.0, p.contrast)
        clip = lambda v: min(255, max(0, round(v)))                      # noqa: E731
        assert table[0].tolist() == [clip(clip(v + p.brightness) * first) for v in range(256)]
        assert table[1].tolist() == [round(v + p.hue * 256 / 360) % 256 for v in range(256)]
        assert table[2].tolist() == [clip(v * p.saturation) for v in range(256)]
        assert table[3].tolist() == [clip(v * last) for v in range(256)]
    pixels = np.random.default_rng(3).integers(0, 256, (2, 30, 40, 3), dtype=np.uint8)
    out = G.apply_tables(torch.from_numpy(pixels).permute(0, 3, 1, 2), tables[:2, 0])
    for image, table, result in zip(pixels, tables, out):
        expected = np.asarray(Image.fromarray(image).point(table[0].tolist() * 3))
        assert np.array_equal(result.permute(1, 2, 0).numpy(), expected)


def save_image(path, pixels, orientation=None):
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif, quality=90)


@pytest.fixture(scope="module")
def mixed_lists(tmp_path_factory):
    """Lists of 22 random training images: JPEGs of many sizes (noise and smooth), greyscale,
    EXIF-rotated ones annotated in either frame, a transparent PNG; 1-3 boxes each."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(4)
    paths, objects = [], []
    for i in range(22):
        width, height = (int(v) for v in rng.integers(60, 520, size=2))
        pixels = random_pixels(rng, width, height, smooth=i % 2 == 0)
        path, size = root / f"{i}.jpg", (width, height)
        if i == 0:
            path = root / "transparent.png"
            Image.fromarray(pixels).convert("RGBA").save(path)
        elif i == 1:
            Image.fromarray(pixels).convert("L").save(path)
        elif i in (2, 3, 4):                    # rotated to display; 2 and 3 annotated that way
            save_image(path, pixels, orientation=(6, 3, 8)[i - 2])
            size = (height, width) if i == 2 else (width, height)
        else:
            save_image(path, pixels)
        corners = rng.uniform(0, 1, (int(rng.integers(1, 4)), 2, 2)) * np.array(size)
        boxes = np.concatenate([corners.min(axis=1), corners.max(axis=1) + 2], axis=1).clip(0, size * 2)
        paths.append(str(path))
        objects.append({"boxes": boxes.round(1).tolist(), "labels": [1] * len(boxes),
                        "difficulties": [0] * len(boxes), "size": list(size)})
    (root / "label_map.json").write_text(json.dumps({"background": 0, "thing": 1}))
    for split in ("TRAIN", "TEST"):
        (root / f"{split}_images.json").write_text(json.dumps(paths))
        (root / f"{split}_objects.json").write_text(json.dumps(objects))
    return root


def test_device_path_makes_the_cpu_paths_samples(mixed_lists):
    """The same (seed, epoch, index) gives the same sample on both paths: boxes, labels and
    difficulties identical, pixels within a level but for a few (float32 sums at a rounding
    edge, which the colour steps can widen), through DataLoader workers too."""
    cpu = D.PascalVOCDataset(mixed_lists, "train", seed=5)
    device = D.PascalVOCDataset(mixed_lists, "train", seed=5, decode="device")
    loader = torch.utils.data.DataLoader(device, batch_size=11, collate_fn=D.collate_fn, num_workers=2,
                                         persistent_workers=True)
    std = torch.tensor(D.IMAGENET_STD).view(1, 3, 1, 1) * 255
    per_sample, off_by_more = [], []
    for epoch in range(4):
        cpu.set_epoch(epoch)
        device.set_epoch(epoch)
        for first, pending in zip((0, 11), loader):
            batch = G.render_batch(pending, torch.device("cpu"))
            expected = D.collate_fn([cpu[i] for i in range(first, first + 11)])
            assert batch.problems == [] and batch.images.shape == expected.images.shape
            for got, want in zip(batch[1:4], expected[1:4]):
                assert all(torch.equal(a, b) for a, b in zip(got, want))
            levels = ((batch.images - expected.images) * std).abs()    # 0-255 units
            per_sample += levels.mean(dim=(1, 2, 3)).tolist()
            off_by_more.append(float((levels > 1.5).float().mean()))
    distribution = np.percentile(per_sample, [50, 90, 100])
    assert len(per_sample) == 88 and distribution[2] < 0.2 and np.mean(per_sample) < 0.02, distribution
    assert max(off_by_more) < 0.005, off_by_more


def test_another_model_input_on_both_paths(mixed_lists):
    """SSD512's size with torchvision's COCO normalisation (and so its zoom-out fill): the
    device path's samples are still the CPU path's."""
    spec = D.ModelInput(512, (0.48235, 0.45882, 0.40784), (1 / 255,) * 3)
    cpu = D.PascalVOCDataset(mixed_lists, "train", seed=3, model_input=spec)
    device = D.PascalVOCDataset(mixed_lists, "train", seed=3, decode="device", model_input=spec)
    batch = G.render_batch(D.collate_fn([device[i] for i in range(11)]), torch.device("cpu"),
                           model_input=spec)
    expected = D.collate_fn([cpu[i] for i in range(11)])
    assert batch.images.shape == expected.images.shape == (11, 3, 512, 512)
    assert all(torch.equal(a, b) for a, b in zip(batch.boxes, expected.boxes))
    levels = (batch.images - expected.images).abs()                  # std 1/255: 0-255 units
    assert levels.mean() < 0.02 and float((levels > 1.5).float().mean()) < 0.005
    # The zoom-out fill is this input's mean, which normalises to (almost) 0; ImageNet's would
    # leave a whole level in red.
    assert (expected.images.abs() < 0.01).all(dim=1).any() and (batch.images.abs() < 0.01).all(dim=1).any()


def test_exif_rotated_jpeg_comes_out_in_the_cpu_paths_frame(mixed_lists):
    dataset = D.PascalVOCDataset(mixed_lists, "train", decode="device")
    orientations = [dataset[i][0].orientation for i in (2, 3, 4)]
    assert orientations == [6, 1, 1]        # only 2's annotation is in the displayed frame
    cpu = D.PascalVOCDataset(mixed_lists, "train")
    pixels = G.render_batch(D.collate_fn([dataset[2]]), torch.device("cpu")).images[0]
    assert (pixels - cpu[2][0]).abs().max() < 0.05               # a level is 0.017 here


def test_other_files_fall_back_to_the_workers_decoder(mixed_lists):
    """A PNG (or any non-JPEG) is decoded by the worker with the CPU path's load_image:
    transparency laid on white, as there."""
    pending = D.PascalVOCDataset(mixed_lists, "train", decode="device")[0][0]
    assert not pending.is_jpeg and pending.data.shape[0] == 3 and pending.data.dtype == torch.uint8
    assert np.array_equal(pending.data.permute(1, 2, 0).numpy(),
                          np.asarray(D.load_image(mixed_lists / "transparent.png")))
    assert D.PascalVOCDataset(mixed_lists, "train", decode="device")[5][0].is_jpeg


def broken_jpegs(folder):
    """(cut short, missing, not an image, a bad Huffman table): the last passes the worker's
    header check and fails only when decoded."""
    good = folder / "good.jpg"
    save_image(good, np.random.default_rng(6).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    data = good.read_bytes()
    (folder / "cut.jpg").write_bytes(data[:-200])
    (folder / "text.jpg").write_text("not an image")
    table = data.index(b"\xff\xc4") + 5
    (folder / "huffman.jpg").write_bytes(data[:table] + bytes([255] * 16) + data[table + 16:])
    return [folder / name for name in ("cut.jpg", "missing.jpg", "text.jpg", "huffman.jpg")]


def test_unreadable_files_give_the_cpu_paths_errors(tmp_path):
    paths = broken_jpegs(tmp_path)
    objects = [{"boxes": [[1, 2, 10, 12]], "labels": [1], "difficulties": [0]}] * len(paths)
    (tmp_path / "label_map.json").write_text(json.dumps({"background": 0, "thing": 1}))
    (tmp_path / "TRAIN_images.json").write_text(json.dumps([str(p) for p in paths]))
    (tmp_path / "TRAIN_objects.json").write_text(json.dumps(objects))
    cpu = D.PascalVOCDataset(tmp_path, "train")
    device = D.PascalVOCDataset(tmp_path, "train", decode="device")
    messages = []
    for i in range(4):
        with pytest.raises(D.DataError, match=r"cannot read image") as on_cpu:
            cpu[i]
        messages.append(str(on_cpu.value))
        assert messages[-1].startswith(f"{paths[i]}: ")
    for i in range(3):                                  # found by the worker: the same error
        with pytest.raises(D.DataError) as on_device:
            device[i]
        assert str(on_device.value) == messages[i]
    marking = D.PascalVOCDataset(tmp_path, "train", decode="device", on_error="mark")
    batch = G.render_batch(D.collate_fn([marking[i] for i in range(4)]), torch.device("cpu"))
    assert len(batch.images) == len(batch.boxes) == 0
    assert batch.problems[:3] == messages[:3]
    # Found only by the decoder: the file named as on the CPU path, the decoder's own words.
    assert len(batch.problems) == 4 and batch.problems[3].startswith(f"{paths[3]}: cannot read image (")


def test_evaluation_samples_on_the_device_are_the_cpu_paths(mixed_lists):
    """eval_transform's samples (the whole image resized, bilinear): the same targets, the
    pixels within a level but for a few (float32 sums at a rounding edge), EXIF frames,
    greyscale and the PNG included."""
    cpu = D.PascalVOCDataset(mixed_lists, "test")
    device = D.PascalVOCDataset(mixed_lists, "test", decode="device")
    expected = D.collate_fn([cpu[i] for i in range(len(cpu))])
    batch = G.render_batch(D.collate_fn([device[i] for i in range(len(device))]), torch.device("cpu"))
    assert batch.problems == [] and batch.images.shape == expected.images.shape
    for got, want in zip(batch[1:4], expected[1:4]):
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    levels = ((batch.images - expected.images) * torch.tensor(D.IMAGENET_STD).view(1, 3, 1, 1) * 255).abs()
    assert levels.max() < 2.5 and (levels > 1.5).float().mean() < 1e-4 and levels.mean() < 0.01, \
        (levels.max(), (levels > 1.5).float().mean(), levels.mean())


def test_eval_decodes_on_the_device_with_the_same_result(tiny_checkpoint, tmp_path):
    """eval.py --gpu-decode (here on the CPU): the same detections' mAP as the PIL path."""
    import eval as evaluation
    results = {}
    for flag in ("--gpu-decode", "--no-gpu-decode"):
        assert evaluation.main([str(tiny_checkpoint), "--workers", "0", flag, "--out", str(tmp_path / flag)]) == 0
        results[flag] = json.loads((tmp_path / flag / "results.json").read_text())
    assert results["--gpu-decode"]["mAP_07"] == pytest.approx(results["--no-gpu-decode"]["mAP_07"], abs=0.01)
    assert results["--gpu-decode"]["mAP_07"] > 0


def test_making_samples_is_vectorised_over_the_batch(mixed_lists):
    """A few operations per image, not a per-image loop's ~85 (train.py's batches of 32 would
    cost the host more kernel launches than the GPU's training step takes): zoom-out, crops,
    Image.reduce and every filter drawn, the images of many sizes."""
    dataset = D.PascalVOCDataset(mixed_lists, "train", decode="device")
    pending = [dataset[i][0] for i in range(len(dataset))]
    decoded, _ = G.decode(pending, torch.device("cpu"))
    counts = {}
    for n in (5, len(pending)):
        with CountOperations() as counter:
            G.make_samples(decoded[:n], pending[:n], torch.device("cpu"))
        counts[n] = counter.count
    per_image = (counts[len(pending)] - counts[5]) / (len(pending) - 5)
    assert per_image < 15, counts
    assert {p.geometry.interpolation for p in pending} == set(FILTERS)


def test_training_with_gpu_augment_on_the_cpu(shapes_lists, tmp_path):
    """--gpu-augment trains on the CPU too, and sees what the CPU path's loader gives: the
    first logged loss (same weights, same samples) agrees."""
    losses = {}
    for flag in ("--gpu-augment", "--no-gpu-augment"):
        out = tmp_path / flag
        assert train.main(TINY + ["--iterations", "2", "--data-folder", str(shapes_lists),
                                  "--out", str(out), flag]) == 0
        losses[flag] = torch.load(out / "checkpoint.pt", weights_only=True)["history"][0]["loss"]
    assert losses["--gpu-augment"] == pytest.approx(losses["--no-gpu-augment"], rel=2e-3), losses


def test_gpu_augment_option_has_help_and_defaults_to_auto():
    assert train.parse_config([])["gpu_augment"] is None
    assert train.parse_config(["--no-gpu-augment"])["gpu_augment"] is False
    assert "--gpu-augment" in train.build_parser().format_help()


def test_jpeg_bytes_lose_their_exif_not_their_pixels(tmp_path):
    """TorchCodec turns a JPEG by its EXIF orientation, with no way to say no: the worker sends
    the bytes without APP1 segments, which decode to the stored pixels, unturned."""
    pixels = np.random.default_rng(7).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    save_image(tmp_path / "turned.jpg", pixels, orientation=6)
    raw = (tmp_path / "turned.jpg").read_bytes()
    stripped = D.without_app1_segments(raw)
    assert b"Exif" in raw and b"Exif" not in stripped and len(stripped) < len(raw)
    with Image.open(tmp_path / "turned.jpg") as image:
        stored = np.asarray(image.convert("RGB"))
    decoded = G.jpeg_decoder()(torch.frombuffer(stripped, dtype=torch.uint8))
    assert np.array_equal(decoded.permute(1, 2, 0).numpy(), stored)
    assert G.jpeg_decoder()(torch.frombuffer(bytearray(raw), dtype=torch.uint8)).shape == (3, 50, 30)


def test_without_torchcodec_auto_takes_the_cpu_path_and_an_explicit_choice_fails(
        monkeypatch, capsys, shapes_lists, tmp_path):
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)      # import fails
    for cached in (G.device_decoding_problem, G.decode_place):
        cached.cache_clear()
    try:
        assert G.decode_place(None, torch.device("cuda")) == "cpu"
        said = capsys.readouterr().err.strip().splitlines()
        assert len(said) == 1 and "pip install torchcodec" in said[0] and "loader processes" in said[0]
        with pytest.raises(ValueError, match="needs TorchCodec"):
            G.decode_place(True, torch.device("cpu"))
        assert train.main(TINY + ["--iterations", "1", "--data-folder", str(shapes_lists),
                                  "--out", str(tmp_path), "--gpu-augment"]) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert error[-1].startswith("train.py: error: cannot decode on cpu: decoding on the device needs TorchCodec")
    finally:
        for cached in (G.device_decoding_problem, G.decode_place):
            cached.cache_clear()
