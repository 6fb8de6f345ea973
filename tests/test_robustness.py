"""Nothing lost, nothing cryptic: signals, unreadable data mid-run, full disks, file modes,
high-bit-depth images, argument checks, and one-line errors instead of tracebacks."""
import json
import multiprocessing
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import create_data_lists as lists
import detect
import eval as evaluation
import train
import utils
from conftest import TINY
from datasets import DataError, load_image
from test_data import make_voc

ROOT = Path(__file__).resolve().parents[1]
XML = ("<annotation><size><width>64</width><height>48</height></size><object><name>{}</name>"
       "<bndbox><xmin>5</xmin><ymin>5</ymin><xmax>40</xmax><ymax>30</ymax></bndbox></object></annotation>")


def run_args(data, out, *extra):
    return TINY + ["--data-folder", str(data), "--out", str(out)] + list(extra)


def copy_lists(shapes_lists, folder):
    folder.mkdir(parents=True, exist_ok=True)
    for f in shapes_lists.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def with_truncated_image(shapes_lists, folder, split="TRAIN", index=0):
    """A copy of the lists whose `index`-th image of `split` is a JPEG cut in half."""
    copy_lists(shapes_lists, folder)
    images = json.loads((folder / f"{split}_images.json").read_text())
    data = Path(images[index]).read_bytes()
    bad = folder / "truncated.jpg"
    bad.write_bytes(data[:len(data) // 2])
    images[index] = str(bad)
    (folder / f"{split}_images.json").write_text(json.dumps(images))
    return folder, bad


def start(argv, **kwargs):
    return subprocess.Popen([sys.executable] + argv, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def wait_for_log_rows(log, rows, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) > rows:
            return
        time.sleep(0.05)
    output = proc.communicate()[0] if proc.poll() is not None else ""
    raise AssertionError(f"no {rows} log rows in time: {output}")


# 1. ---------------------------------------------------------------------- signals

def test_sigterm_to_the_process_group_saves_with_data_workers(shapes_lists, tmp_path):
    out = tmp_path / "run"
    proc = start(["train.py"] + run_args(shapes_lists, out, "--iterations", "40", "--workers", "2",
                                         "--save-every", "1000"), start_new_session=True)
    wait_for_log_rows(out / "log.csv", 2, proc)
    os.killpg(proc.pid, signal.SIGTERM)              # as Slurm, Kubernetes and GNU timeout do
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    assert "Traceback" not in output
    stopped_at = torch.load(out / "checkpoint.pt", weights_only=True)["iteration"]
    assert 0 < stopped_at < 40, output
    assert train.main(["--resume", "--out", str(out), "--workers", "0", "--iterations", "44"]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["iteration"] == 44


def test_workers_ignore_the_signals_the_main_process_handles():
    previous = [signal.getsignal(s) for s in train.StopRequest.SIGNALS]
    try:
        train.ignore_interrupts(0)
        assert all(signal.getsignal(s) is signal.SIG_IGN for s in train.StopRequest.SIGNALS)
    finally:
        for s, handler in zip(train.StopRequest.SIGNALS, previous):
            signal.signal(s, handler)


def test_only_the_runs_own_workers_are_ended_at_exit():
    callers = multiprocessing.Process(target=time.sleep, args=(60,))
    callers.start()
    earlier = set(multiprocessing.active_children())
    runs = multiprocessing.Process(target=time.sleep, args=(60,))
    runs.start()
    try:
        train.end_data_workers(earlier)
        assert not runs.is_alive() and callers.is_alive()
    finally:
        for process in (callers, runs):
            process.kill()
            process.join()


# 2. ---------------------------------------------------------------------- bad data mid-run

@pytest.mark.parametrize("workers", ["0", "1"])
def test_an_unreadable_image_mid_run_saves_first_and_says_which(shapes_lists, tmp_path, workers):
    data, bad = with_truncated_image(shapes_lists, tmp_path / "lists", index=7)
    out = tmp_path / "run"
    proc = start(["train.py"] + run_args(data, out, "--iterations", "30", "--workers", workers,
                                         "--save-every", "1000"))
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 1, output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if "error:" in line]
    assert len(errors) == 1 and str(bad) in errors[0] and "--skip-bad-images" in errors[0], output
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["iteration"] < 15                   # the bad image is met within the first epoch


def test_skip_bad_images_trains_on_with_a_count(shapes_lists, tmp_path, capsys):
    data, bad = with_truncated_image(shapes_lists, tmp_path / "lists", index=7)
    out = tmp_path / "run"
    assert train.main(run_args(data, out, "--iterations", "30", "--skip-bad-images")) == 0
    printed = capsys.readouterr()
    assert f"skipped: {bad}" in printed.err + printed.out
    assert "2 unreadable images skipped" in printed.out      # 30 batches of 4: the 60 images twice
    assert torch.load(out / "checkpoint.pt", weights_only=True)["iteration"] == 30


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


def test_eval_on_an_unreadable_test_image_is_one_line_and_writes_nothing(checkpoint, shapes_lists,
                                                                         tmp_path):
    data, bad = with_truncated_image(shapes_lists, tmp_path / "lists", split="TEST", index=5)
    out = tmp_path / "results"
    proc = start(["eval.py", str(checkpoint), "--data-folder", str(data), "--workers", "1",
                  "--batch-size", "4", "--out", str(out)])
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 2, output
    assert "Traceback" not in output and f"eval.py: error: {bad}: cannot read image" in output
    assert not (out / "results.json").exists()


# 3. ---------------------------------------------------------------------- full disks

def zip_writer_failure(obj, f, *args, **kwargs):
    """What torch.save raises when the disk fills up while it writes its zip container."""
    f.write(b"partial")
    raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\n"
                       "frame #0: c10::ThrowEnforceNotMet(...)")


def test_a_save_failing_inside_torch_is_one_line_naming_the_target(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"previous")
    monkeypatch.setattr(torch, "save", zip_writer_failure)
    with pytest.raises(OSError) as raised:
        utils.atomic_torch_save({"x": 1}, target)
    message = str(raised.value)
    assert f"could not save {target}" in message and "unexpected pos" in message
    assert "\n" not in message and "frame #0" not in message
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_training_survives_failing_periodic_saves_and_reports_the_last(shapes_lists, tmp_path,
                                                                      monkeypatch, capsys):
    monkeypatch.setattr(torch, "save", zip_writer_failure)
    with pytest.warns(UserWarning, match="could not save"):
        code = train.main(run_args(shapes_lists, tmp_path, "--iterations", "4", "--save-every", "2"))
    assert code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"train.py: error: could not save {tmp_path / 'checkpoint.pt'}")
    assert "unexpected pos" in last


def test_stale_temporary_files_of_a_run_are_removed_at_start(shapes_lists, tmp_path, capsys):
    tmp_path.mkdir(exist_ok=True)
    stale = tmp_path / ".tmp-abc123"
    stale.write_bytes(b"left by kill -9")
    assert train.main(run_args(shapes_lists, tmp_path, "--iterations", "2")) == 0
    assert not stale.exists()
    assert "removed temporary files" in capsys.readouterr().out


# 4. ---------------------------------------------------------------------- file modes

def process_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_written_files_follow_the_umask_and_keep_an_existing_mode(tmp_path):
    new = tmp_path / "new.json"
    utils.atomic_write_json(new, {"a": 1})
    assert stat.S_IMODE(new.stat().st_mode) == 0o666 & ~process_umask()
    kept = tmp_path / "kept.json"
    kept.write_text("{}")
    kept.chmod(0o640)
    utils.atomic_write_json(kept, {"a": 2})
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640 and json.loads(kept.read_text()) == {"a": 2}


def test_a_training_run_writes_readable_files(checkpoint):
    expected = 0o666 & ~process_umask()
    for name in ("checkpoint.pt", "log.csv", "loss_curve.png"):
        assert stat.S_IMODE((checkpoint.parent / name).stat().st_mode) == expected, name


# 5. ---------------------------------------------------------------------- high bit depth

def test_high_bit_depth_grayscale_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 48).reshape(48, 64)
    Image.fromarray(ramp.astype(np.uint16)).save(tmp_path / "g16.png")          # mode I;16
    Image.fromarray(ramp.astype(np.int32)).save(tmp_path / "g32.tif")           # mode I
    Image.fromarray((ramp / 65535).astype(np.float32)).save(tmp_path / "f32.tif")  # mode F, 0..1
    expected = np.rint(ramp / 257)
    for name in ("g16.png", "g32.tif", "f32.tif"):
        rgb = np.asarray(load_image(tmp_path / name), dtype=np.float64)
        assert rgb.shape == (48, 64, 3), name
        assert np.abs(rgb - expected[..., None]).max() <= 1, name
    # Values outside the 16-bit range are stretched from their minimum to their maximum.
    Image.fromarray((ramp * 100 - 5e6).astype(np.int32)).save(tmp_path / "wide.tif")
    rgb = np.asarray(load_image(tmp_path / "wide.tif"))
    assert rgb.min() == 0 and rgb.max() == 255 and (np.diff(rgb[:, :, 0].ravel().astype(int)) >= 0).all()


# 6. ---------------------------------------------------------------------- arguments

@pytest.mark.parametrize("argv", [["--iterations", "0"], ["--iterations", "-5"], ["--batch-size", "0"],
                                  ["--save-every", "0"], ["--print-every", "0"], ["--eval-every", "-1"],
                                  ["--width", "0"], ["--workers", "-1"], ["--lr", "nan"],
                                  ["--iterations", "ten"]])
def test_train_rejects_impossible_settings(argv, capsys):
    with pytest.raises(SystemExit) as raised:
        train.parse_config(["--preset", "toy"] + argv)
    assert raised.value.code == 2
    assert f"argument {argv[0]}" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--min-score", "2"], ["--top-k", "0"], ["--max-overlap", "5"],
                                  ["--max-overlap", "0"], ["--batch-size", "0"], ["--workers", "-1"]])
def test_eval_and_detect_reject_impossible_settings(argv, capsys):
    with pytest.raises(SystemExit) as raised:
        evaluation.parse_args(["run/checkpoint.pt", "--out", "elsewhere"] + argv)
    assert raised.value.code == 2 and f"argument {argv[0]}" in capsys.readouterr().err
    if argv[0] != "--workers":
        with pytest.raises(SystemExit):
            detect.parse_args(["run/checkpoint.pt", "photo.jpg"] + argv)


def test_eval_with_other_decoding_settings_needs_its_own_out(checkpoint, capsys):
    results = checkpoint.parent / "results.json"
    results.write_text('{"mAP_07": 0.5}')
    with pytest.raises(SystemExit) as raised:
        evaluation.parse_args([str(checkpoint), "--min-score", "0.2"])
    assert raised.value.code == 2 and "--out" in capsys.readouterr().err
    assert results.read_text() == '{"mAP_07": 0.5}'


# 7. ---------------------------------------------------------------------- one-line errors

def test_outputs_that_cannot_be_written_fail_before_the_work(checkpoint, shapes_lists, shapes_root,
                                                             tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert evaluation.main([str(checkpoint), "--workers", "0", "--out", str(blocker / "eval")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("eval.py: error: cannot write in") and str(blocker) in err
    image = json.loads((shapes_lists / "TEST_images.json").read_text())[0]
    assert detect.main([str(checkpoint), image, "--out", str(blocker / "det")]) == 1
    assert "cannot write in" in capsys.readouterr().err
    with pytest.raises(OSError, match="cannot write in"):
        lists.create_data_lists([(shapes_root, "trainval")], [(shapes_root, "test")], blocker / "lists")


def test_checkpoints_that_are_not_ours_get_one_line(checkpoint, tmp_path, capsys):
    noise = tmp_path / "noise.pt"
    noise.write_bytes(os.urandom(4096))
    assert evaluation.main([str(noise), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert str(noise) in err and "weights_only" not in err and len(err.strip().splitlines()) == 1
    state = torch.load(checkpoint, weights_only=True)
    del state["config"]["label_map"]
    torch.save(state, tmp_path / "old.pt")
    assert evaluation.main([str(tmp_path / "old.pt"), "--workers", "0"]) == 2
    assert "lacks label_map" in capsys.readouterr().err


def test_a_read_only_target_is_named_not_its_temporary_file(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / ".tmp-xyz"))

    monkeypatch.setattr(utils.tempfile, "mkstemp", refuse)
    with pytest.raises(OSError) as raised:
        utils.atomic_write_json(tmp_path / "results.json", {})
    assert f"could not save {tmp_path / 'results.json'}: Permission denied" in str(raised.value)
    assert ".tmp-" not in str(raised.value)


# 8. ---------------------------------------------------------------------- empty splits

def test_empty_splits_are_reported(tmp_path, capsys):
    root = make_voc(tmp_path / "voc", {"a": (XML.format("cat"), (64, 48))}, {"trainval": ["a"], "test": []})
    lists.create_data_lists([(root, "trainval")], [(root, "test")], tmp_path / "lists", classes=["cat"])
    assert "test.txt lists no images" in capsys.readouterr().err
    with pytest.raises(DataError, match="neither the training nor the test splits"):
        lists.create_data_lists([(root, "test")], [(root, "test")], tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_eval_refuses_an_empty_test_list(checkpoint, shapes_lists, tmp_path, capsys):
    data = copy_lists(shapes_lists, tmp_path / "lists")
    for name in ("TEST_images.json", "TEST_objects.json"):
        (data / name).write_text("[]")
    assert evaluation.main([str(checkpoint), "--data-folder", str(data), "--workers", "0",
                            "--out", str(tmp_path / "out")]) == 2
    assert "test list is empty" in capsys.readouterr().err


def test_an_undefined_map_is_written_as_null(checkpoint, shapes_lists, tmp_path):
    data = copy_lists(shapes_lists, tmp_path / "lists")
    objects = json.loads((data / "TEST_objects.json").read_text())
    for entry in objects:                           # every object difficult: no AP is defined
        entry["difficulties"] = [1] * len(entry["labels"])
    (data / "TEST_objects.json").write_text(json.dumps(objects))
    out = tmp_path / "out"
    assert evaluation.main([str(checkpoint), "--data-folder", str(data), "--workers", "0",
                            "--out", str(out)]) == 0
    text = (out / "results.json").read_text()
    results = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in results.json"))
    assert results["mAP_07"] is None and results["mAP"] is None


# 9. ---------------------------------------------------------------------- small things

def test_classes_discovered_from_annotations_are_announced(tmp_path, capsys):
    images = {"a": (XML.format("cat"), (64, 48)), "b": (XML.format("dgo"), (64, 48))}
    root = make_voc(tmp_path / "voc", images, {"trainval": ["a"], "test": ["b"]})
    summary = lists.create_data_lists([(root, "trainval")], [(root, "test")], tmp_path / "lists")
    assert summary["classes"] == ["cat", "dgo"]
    assert "classes found in the annotations" in capsys.readouterr().err
