"""detect.py: detections of a tiny SSD300 drawn on all kinds of images, its JSON and its Python API."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import detect
from model import SSD, load_checkpoint
from priors import create_priors
from utils import cxcy_to_xy

REPO = Path(__file__).resolve().parents[1]
LABEL_MAP = {"background": 0, "circle": 1, "square": 2, "triangle": 3}
NAMES = ["background", "circle", "square", "triangle"]
PRIORS = create_priors()
# Two priors of the 10x10 conv8_2 map (7942 priors come before it, 6 per location): the 2:1
# box at row 4, column 5 (wholly inside the image, so not clamped) and the square box at
# row 8, column 1 (past the left and bottom edges, so clamped there).
WIDE_PRIOR, CORNER_PRIOR = 7942 + (4 * 10 + 5) * 6 + 2, 7942 + (8 * 10 + 1) * 6
STUB_DETECTIONS = {WIDE_PRIOR: 3, CORNER_PRIOR: 1}          # prior -> class


def fractional_box(prior):
    return cxcy_to_xy(PRIORS[prior]).clamp(0, 1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A randomly initialised tiny SSD300 saved as train.py saves it."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    config = {"n_classes": 4, "backbone": "vgg16", "width": 0.0625, "label_map": LABEL_MAP}
    torch.save({"model": SSD(4, width=0.0625).state_dict(), "config": config}, path)
    return path


def stub_forward(images):
    """Zero offsets (boxes = priors); background everywhere except STUB_DETECTIONS' priors."""
    n = images.size(0)
    locs = torch.zeros(n, 8732, 4)
    scores = torch.zeros(n, 8732, 4)
    scores[:, :, 0] = 10.0
    for prior, cls in STUB_DETECTIONS.items():
        scores[:, prior, cls] = 20.0
    return locs, scores


@pytest.fixture
def stub_net(checkpoint):
    net, _ = load_checkpoint(checkpoint)
    net.forward = stub_forward
    return net


@pytest.fixture
def stubbed_cli(monkeypatch, stub_net):
    """detect.main with the stub network in place of the checkpoint's."""
    real_load = detect.load_checkpoint

    def load(path, device):
        _, ckpt = real_load(path, device)
        return stub_net, ckpt
    monkeypatch.setattr(detect, "load_checkpoint", load)
    return detect.main


def gradient_image(width, height, mode="RGB"):
    """A dull grey-blue gradient: no pixel is near a palette colour."""
    x = np.linspace(60, 140, width)[None, :].repeat(height, 0)
    rgb = np.stack([x, x, x + 20], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb).convert(mode)


def edge_pixels(image, box):
    """Colours of the outermost pixel ring of `box` (pixels, x1 y1 x2 y2) as drawn: columns
    round(x1) .. round(x2) - 1, rows likewise."""
    x1, y1, x2, y2 = (round(v) for v in box)
    a = np.asarray(image.convert("RGB"))
    ring = [a[y1, x1:x2], a[y2 - 1, x1:x2], a[y1:y2, x1], a[y1:y2, x2 - 1]]
    return np.concatenate(ring)


def fraction_in_colour(image, box, colour):
    return (edge_pixels(image, box) == np.array(colour)).all(axis=1).mean()


def write_test_images(folder):
    """Images of many kinds plus a non-image; returns {name: displayed (width, height)}."""
    folder.mkdir()
    gradient_image(320, 240).save(folder / "photo.png")
    gradient_image(200, 300, "L").save(folder / "grey.jpg", quality=95)
    rgba = gradient_image(256, 256, "RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((256, 256)))
    rgba.save(folder / "alpha.png")
    # EXIF orientation 6: stored 300x200 with a white top-left corner; displayed 200x300
    # (rotated 90 degrees clockwise), so the white corner shows at the top right.
    stored = gradient_image(300, 200)
    stored.paste((255, 255, 255), (0, 0, 40, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(folder / "rotated.jpg", exif=exif, quality=95)
    gradient_image(120, 90, "P").save(folder / "palette.png")
    gradient_image(90, 120, "CMYK").save(folder / "cmyk.jpg")
    Image.new("RGB", (1, 1), "red").save(folder / "tiny.png")
    (folder / "notes.jpg").write_text("not an image")
    return {"photo.png": (320, 240), "grey.jpg": (200, 300), "alpha.png": (256, 256),
            "rotated.jpg": (200, 300), "palette.png": (120, 90), "cmyk.jpg": (90, 120), "tiny.png": (1, 1)}


def read_json(folder):
    return json.loads((folder / "detections.json").read_text())


# ---------------------------------------------------------------------------- Python API

def test_detect_returns_prior_boxes_in_original_pixels(stub_net):
    image = gradient_image(400, 200)
    boxes, labels, scores = detect.detect(stub_net, image)
    assert labels.tolist() == [1, 3] or labels.tolist() == [3, 1]
    assert scores.min() > 0.99
    scale = torch.tensor([400.0, 200.0, 400.0, 200.0])
    for box, label in zip(boxes, labels):
        prior = WIDE_PRIOR if label == 3 else CORNER_PRIOR
        torch.testing.assert_close(box, fractional_box(prior) * scale)
    wide = boxes[labels == 3][0]
    assert 0 < wide[0] < wide[2] < 400 and 0 < wide[1] < wide[3] < 200    # no clamping
    assert torch.allclose(wide, torch.tensor([115.2, 63.8, 324.8, 116.2]), atol=0.5)

    drawn = detect.draw_detections(image, boxes, labels, scores, LABEL_MAP)
    assert drawn.size == image.size and drawn.mode == "RGB"
    assert np.array_equal(np.asarray(image), np.asarray(gradient_image(400, 200)))   # input untouched
    for box, label in zip(boxes, labels):
        assert fraction_in_colour(drawn, box.tolist(), detect.class_colour(label)) > 0.9


def test_line_width_and_font_grow_with_the_image():
    box, label, score = torch.tensor([[100.0, 200.0, 700.0, 600.0]]), torch.tensor([2]), torch.tensor([0.9])
    colour = detect.class_colour(2)

    def thickness(image):   # coloured pixels on the box's bottom edge, going up from it
        column = np.asarray(image)[:599, 400]
        return int((column[::-1] == colour).all(axis=1).argmin())
    small = detect.draw_detections(gradient_image(800, 800), box, label, score, NAMES)
    large = detect.draw_detections(gradient_image(3000, 2400), box, label, score, NAMES)
    assert thickness(small) >= 2 and thickness(large) >= 3 * thickness(small)

    def label_height(image):   # coloured rows of the label above the box, at its left edge
        column = np.asarray(image)[:200, 100]
        return int((column[::-1] == colour).all(axis=1).argmin())
    assert label_height(large) >= 2.5 * label_height(small) >= 2.5 * 12


def test_detect_respects_min_score_and_top_k(stub_net):
    image = gradient_image(300, 300)
    assert len(detect.detect(stub_net, image, min_score=0.2, top_k=1)[0]) == 1
    assert len(detect.detect(stub_net, image, min_score=0.999999)[0]) == 0


def test_class_names_and_colours():
    assert detect.class_names(LABEL_MAP) == NAMES
    assert detect.class_names({"background": 0, "dog": 2}) == ["background", "class 1", "dog"]
    colours = [detect.class_colour(i) for i in range(1, 21)]
    assert len(set(colours)) == 20
    assert detect.text_colour((250, 200, 20)) == (0, 0, 0)
    assert detect.text_colour((30, 110, 220)) == (255, 255, 255)


# ---------------------------------------------------------------------------- command line

def test_cli_draws_boxes_where_json_says_on_every_kind_of_image(tmp_path, checkpoint, stubbed_cli, capsys):
    sizes = write_test_images(tmp_path / "in")
    inputs = [str(tmp_path / "in" / name) for name in [*sizes, "notes.jpg"]]
    out = tmp_path / "out"
    assert stubbed_cli([str(checkpoint), *inputs, "--out", str(out), "--batch-size", "3"]) == 0

    err = capsys.readouterr().err
    assert "notes.jpg" in err and "cannot read image" in err
    results = read_json(out)
    assert set(results) == {i for i in inputs if not i.endswith("notes.jpg")}
    for name, (w, h) in sizes.items():
        detections = results[str(tmp_path / "in" / name)]
        annotated = Image.open(out / (Path(name).stem + ".png"))
        assert annotated.size == (w, h)
        assert sorted((d["label"], d["label_index"]) for d in detections) == [("circle", 1), ("triangle", 3)]
        for d in detections:
            prior = WIDE_PRIOR if d["label_index"] == 3 else CORNER_PRIOR
            expected = fractional_box(prior) * torch.tensor([w, h, w, h], dtype=torch.float32)
            assert d["box"] == pytest.approx(expected.tolist(), abs=0.01)
            assert d["score"] > 0.99
            if min(w, h) >= 200:
                assert fraction_in_colour(annotated, d["box"], detect.class_colour(d["label_index"])) > 0.9
    assert np.asarray(Image.open(out / "alpha.png"))[1, 250].min() > 250   # transparent -> white
    rotated = np.asarray(Image.open(out / "rotated.png"))
    assert rotated[5, 195].min() > 240            # stored top-left corner, now top right
    assert rotated[5, 5].max() < 200


def test_cli_folder_glob_and_repeated_stems(tmp_path, checkpoint, stubbed_cli):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        gradient_image(64, 48).save(tmp_path / folder / "img.png")
    (tmp_path / "a" / "readme.txt").write_text("skipped: not an image extension")
    gradient_image(64, 48).save(tmp_path / "b" / "other.jpg")
    out = tmp_path / "out"
    # The pattern is passed unexpanded, as a quoted glob would be.
    assert stubbed_cli([str(checkpoint), str(tmp_path / "a"), str(tmp_path / "b" / "*.png"),
                        "--out", str(out)]) == 0
    assert list(read_json(out)) == [str(tmp_path / "a" / "img.png"), str(tmp_path / "b" / "img.png")]
    assert sorted(p.name for p in out.iterdir()) == ["detections.json", "img.png", "img_2.png"]


def test_cli_fails_when_nothing_can_be_processed(tmp_path, checkpoint, capsys):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "out"
    assert detect.main([str(checkpoint), str(tmp_path / "bad.png"), str(tmp_path / "missing*.jpg"),
                        "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "bad.png" in err and "missing*.jpg" in err
    assert read_json(out) == {}
    assert detect.main([str(tmp_path / "no.pt"), str(tmp_path / "bad.png")]) == 2
    assert "no.pt does not exist" in capsys.readouterr().err


def test_a_full_disk_keeps_earlier_results(tmp_path, checkpoint, stubbed_cli, monkeypatch, capsys):
    gradient_image(64, 48).save(tmp_path / "img.png")
    out = tmp_path / "out"
    assert stubbed_cli([str(checkpoint), str(tmp_path / "img.png"), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()

    def full_disk(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("os.fsync", full_disk)
    assert stubbed_cli([str(checkpoint), str(tmp_path / "img.png"), "--out", str(out),
                        "--min-score", "0.5"]) == 1
    err = capsys.readouterr().err
    assert "could not save" in err and "img.png" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before     # no partial or temporary file


def test_cli_rejects_bad_options(checkpoint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        detect.main([str(checkpoint), "x.jpg", "--min-score", "1.5"])
    assert exit_info.value.code == 2 and "--min-score" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        detect.main(["--help"])
    assert exit_info.value.code == 0 and "--max-overlap" in capsys.readouterr().out


@pytest.mark.parametrize("speed", [["--amp", "off", "--no-channels-last"], ["--amp", "bf16", "--channels-last"]],
                         ids=["fp32", "bf16-nhwc"])
def test_cli_end_to_end_with_the_real_network(tmp_path, checkpoint, speed):
    """The real (random, tiny) network in a subprocess: a folder and a quoted glob, in float32
    and in the CPU inference options (bf16 autocast, channels_last)."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "more").mkdir()
    gradient_image(320, 240).save(tmp_path / "folder" / "one.png")
    gradient_image(150, 400, "L").save(tmp_path / "folder" / "two.jpg")
    gradient_image(500, 90).save(tmp_path / "more" / "three.jpg")
    out = tmp_path / "out"
    command = [sys.executable, "detect.py", str(checkpoint), str(tmp_path / "folder"),
               str(tmp_path / "more" / "*.jpg"), "--out", str(out), "--min-score", "0.01",
               "--top-k", "5", "--batch-size", "2", "--device", "cpu"] + speed
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    results = read_json(out)
    sizes = {"folder/one.png": (320, 240), "folder/two.jpg": (150, 400), "more/three.jpg": (500, 90)}
    assert list(results) == [str(tmp_path / name) for name in sizes]
    for name, (w, h) in sizes.items():
        detections = results[str(tmp_path / name)]
        assert 1 <= len(detections) <= 5
        scores = [d["score"] for d in detections]
        assert scores == sorted(scores, reverse=True) and min(scores) >= 0.01
        for d in detections:
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h
            assert NAMES[d["label_index"]] == d["label"] and d["label_index"] >= 1
        assert Image.open(out / (Path(name).stem + ".png")).size == (w, h)
