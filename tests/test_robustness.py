"""Nothing lost, nothing cryptic: signals, unreadable data mid-run, full disks, file modes,
high-bit-depth images, argument checks, and one-line errors instead of tracebacks."""
import contextlib
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
from datasets import DataError, PascalVOCDataset, load_image
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
    assert proc.returncode == 143, output            # 128 + SIGTERM: not Ctrl-C's 130
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
    assert proc.returncode == 2, output                 # a bad input, wherever it is met
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
    assert "1 unreadable image skipped (--skip-bad-images), met 2 times" in printed.out   # 30 x 4 images: 60 twice
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
    code = train.main(run_args(shapes_lists, tmp_path, "--iterations", "6", "--save-every", "2"))
    assert code == 1
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if line.startswith("train.py: warning: could not save")]
    assert len(warned) == 2 and all("log.csv runs ahead" in line for line in warned), err   # every one
    last = err.strip().splitlines()[-1]
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


# 10. --------------------------------------------------------------------- lists that are not right

def edited_lists(shapes_lists, folder, edit, split="TRAIN"):
    """A copy of the lists whose objects file `edit(objects)` changed in place (by hand, as it
    were: the binary form beside it no longer matches)."""
    copy_lists(shapes_lists, folder)
    path = folder / f"{split}_objects.json"
    objects = json.loads(path.read_text())
    edit(objects)
    path.write_text(json.dumps(objects))
    return folder


def set_value(key, value, entry=3, item=0):
    def edit(objects):
        objects[entry][key][item] = value
    return edit


def test_a_label_outside_the_label_map_stops_train_and_eval_in_one_line(shapes_lists, checkpoint,
                                                                        tmp_path, capsys):
    data = edited_lists(shapes_lists, tmp_path / "lists", set_value("labels", 9))
    assert train.main(run_args(data, tmp_path / "run", "--iterations", "2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    image = json.loads((data / "TRAIN_images.json").read_text())[3]
    assert err[-1].startswith(f"train.py: error: {data / 'TRAIN_objects.json'}: entry 3 ({image}), object 0: "
                              "label 9 is not a class of label_map.json (1..3)"), err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    data = edited_lists(shapes_lists, tmp_path / "test_lists", set_value("labels", 0, entry=2), "TEST")
    assert evaluation.main([str(checkpoint), "--data-folder", str(data), "--workers", "0",
                            "--out", str(tmp_path / "eval")]) == 2
    assert "entry 2" in capsys.readouterr().err and not (tmp_path / "eval" / "results.json").exists()


@pytest.mark.parametrize("box, problem", [([-5, 10, 30, 40], "outside the recorded"),
                                          ([30, 10, 20, 40], "empty or inverted"),
                                          ([20, 10, 20, 40], "empty or inverted"),
                                          ([20, 10, float("nan"), 40], "not finite"),
                                          ([20, 10, 30, 9999], "outside the recorded")])
def test_boxes_that_cannot_be_right_are_named_when_the_lists_are_read(shapes_lists, tmp_path, box, problem):
    data = edited_lists(shapes_lists, tmp_path, set_value("boxes", box, entry=5))
    with pytest.raises(DataError, match=rf"entry 5 \(.*\), object 0: box .*{problem}") as raised:
        PascalVOCDataset(data, "train")
    assert "\n" not in str(raised.value)


def test_many_bad_objects_are_counted_in_the_one_line(shapes_lists, tmp_path):
    def edit(objects):
        for entry in objects[10:20]:
            entry["labels"] = [7] * len(entry["labels"])
    n_bad = sum(len(o["labels"]) for o in json.loads((shapes_lists / "TRAIN_objects.json").read_text())[10:20])
    with pytest.raises(DataError, match=rf"entry 10 .*\({n_bad} bad objects in 10 entries in all\)"):
        PascalVOCDataset(edited_lists(shapes_lists, tmp_path, edit), "train")


def test_an_image_of_another_size_than_the_lists_say_stops_naming_it(shapes_lists, tmp_path, capsys):
    data = copy_lists(shapes_lists, tmp_path / "lists")
    image = Path(json.loads((data / "TRAIN_images.json").read_text())[6])
    resized = tmp_path / "resized.jpg"
    Image.open(image).resize((123, 77)).save(resized)
    images = json.loads((data / "TRAIN_images.json").read_text())
    images[6] = str(resized)
    (data / "TRAIN_images.json").write_text(json.dumps(images))
    assert train.main(run_args(data, tmp_path / "run", "--iterations", "15")) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{resized}: the image is 123x77, but the lists record" in last and "--skip-bad-images" in last


# 11. --------------------------------------------------------------------- weights that are not finite

def test_a_non_finite_step_leaves_no_trace_in_the_checkpoint(shapes_lists, tmp_path, monkeypatch, capsys):
    """The lr 1e6 case: a diverged step's forward pass already wrote NaN into batch norm's
    running statistics. Skipped steps put them back, so the checkpoint saved on stopping holds
    the last finite state."""
    real = train.forward_loss
    calls = []

    def diverged_from_the_fourth(model_, criterion, images, *args):
        calls.append(1)
        return real(model_, criterion, images * float("nan") if len(calls) >= 4 else images, *args)

    monkeypatch.setattr(train, "forward_loss", diverged_from_the_fourth)
    with pytest.warns(UserWarning, match="non-finite loss"):
        assert train.main(run_args(shapes_lists, tmp_path, "--iterations", "20", "--max-bad-steps", "3")) == 1
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["iteration"] == 6
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert "The last good weights are in" in capsys.readouterr().err


def test_weights_that_are_not_finite_are_never_saved(shapes_lists, tmp_path, monkeypatch, capsys):
    real = train.backward_step
    steps = []

    def poisoned_on_the_third(loss, optimizer, scaler):
        real(loss, optimizer, scaler)
        steps.append(1)
        if len(steps) == 3:
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].fill_(float("inf"))

    monkeypatch.setattr(train, "backward_step", poisoned_on_the_third)
    assert train.main(run_args(shapes_lists, tmp_path, "--iterations", "3")) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "not saved at iteration 3 (finished)" in last and "not finite" in last
    assert f"No checkpoint with finite weights was written to {tmp_path}" in last
    assert not (tmp_path / "checkpoint.pt").exists()


@pytest.mark.parametrize("value", ["inf", "1e30"])
def test_learning_rates_that_can_only_diverge_are_refused(value, capsys):
    with pytest.raises(SystemExit) as raised:
        train.parse_config(["--lr", value])
    assert raised.value.code == 2 and "argument --lr" in capsys.readouterr().err


# 12. --------------------------------------------------------------------- devices and files

@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_one_line(checkpoint, shapes_lists, tmp_path, capsys):
    image = json.loads((shapes_lists / "TEST_images.json").read_text())[0]
    for script, argv in ((train.main, run_args(shapes_lists, tmp_path / "run", "--device", "cuda")),
                         (evaluation.main, [str(checkpoint), "--device", "cuda", "--out", str(tmp_path / "e")]),
                         (detect.main, [str(checkpoint), image, "--device", "cuda:1", "--out", str(tmp_path / "d")])):
        assert script(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no CUDA device" in err[0] and "--device cpu" in err[0], err


def test_a_file_that_would_run_code_is_refused_with_the_reason(checkpoint, shapes_lists, tmp_path, capsys):
    import convert_weights
    import export
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    torch.save({"model": Payload(), "config": {}}, evil)
    image = json.loads((shapes_lists / "TEST_images.json").read_text())[0]
    for script, argv in ((evaluation.main, [str(evil), "--data-folder", str(shapes_lists)]),
                         (detect.main, [str(evil), image, "--out", str(tmp_path / "d")]),
                         (export.main, [str(evil), "--out", str(tmp_path / "m.onnx")]),
                         (train.main, ["--resume", str(evil), "--out", str(tmp_path / "r")]),
                         (train.main, run_args(shapes_lists, tmp_path / "i", "--init-from", str(evil))),
                         (convert_weights.main, ["amdegroot", str(evil), "--out", str(tmp_path / "c.pt")])):
        assert script(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "posix.system" in err[0] and str(evil) in err[0], err
        assert "weights_only" not in err[0] and "Re-running" not in err[0]
    assert not marker.exists()


def test_a_random_file_as_checkpoint_is_a_bad_input_everywhere(tmp_path, capsys):
    import export
    noise = tmp_path / "noise.pt"
    noise.write_bytes(os.urandom(2048))
    image = tmp_path / "image.png"
    Image.new("RGB", (40, 30)).save(image)
    for script, argv in ((evaluation.main, [str(noise)]), (detect.main, [str(noise), str(image)]),
                         (export.main, [str(noise), "--out", str(tmp_path / "m.onnx")]),
                         (train.main, ["--resume", str(noise), "--out", str(tmp_path / "r")])):
        assert script(argv) == 2, argv
        assert str(noise) in capsys.readouterr().err


def test_a_file_that_cannot_be_read_is_not_called_a_bad_file(tmp_path):
    """A folder, a missing file: the system's error (a runtime failure, exit 1), not "not a
    PyTorch file" (bad input)."""
    for path in (tmp_path, tmp_path / "missing.pt"):
        with pytest.raises(OSError):
            utils.load_tensors(path)


def test_a_full_disk_is_reported_as_one(tmp_path, monkeypatch):
    """torch's zip writer says "unexpected pos" when the disk fills up under it; the write's
    own error is what the user needs."""
    real = utils.atomic_write

    @contextlib.contextmanager
    def filling_up(path, mode="w"):
        with real(path, mode) as f:
            yield FullAfter(f, 64)

    monkeypatch.setattr(utils, "atomic_write", filling_up)
    target = tmp_path / "checkpoint.pt"
    with pytest.raises(OSError) as raised:
        utils.atomic_torch_save({"x": torch.zeros(10_000)}, target)
    assert raised.value.errno == 28 and "No space left on device" in str(raised.value)
    assert "unexpected pos" not in str(raised.value) and not target.exists()


class FullAfter:
    """A binary file whose disk fills up after `room` bytes."""

    def __init__(self, file, room):
        self.file, self.room = file, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(28, "No space left on device")
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)


# 13. --------------------------------------------------------------------- small things, part two

def test_resuming_past_or_at_the_end_trains_nothing(shapes_lists, tmp_path, capsys):
    assert train.main(run_args(shapes_lists, tmp_path, "--iterations", "4")) == 0
    before = (tmp_path / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert train.main(["--resume", "--out", str(tmp_path), "--iterations", "2"]) == 2
    assert "at iteration 4, beyond --iterations 2" in capsys.readouterr().err
    assert train.main(["--resume", "--out", str(tmp_path)]) == 0
    assert "has finished its 4 iterations: nothing to train" in capsys.readouterr().out
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize("seed", ["-1", "4294967296"])
def test_a_seed_out_of_range_is_an_argument_error(seed, capsys):
    with pytest.raises(SystemExit) as raised:
        train.parse_config(["--seed", seed])
    assert raised.value.code == 2 and "argument --seed" in capsys.readouterr().err


def test_export_makes_its_folder_and_checks_it_before_the_work(checkpoint, tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    import export
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(export, "export", lambda *args: pytest.fail("exported before checking --out"))
    assert export.main([str(checkpoint), "--out", str(blocker / "m.onnx")]) == 1
    assert "cannot write in" in capsys.readouterr().err
    monkeypatch.undo()
    out = tmp_path / "new" / "folder" / "m.onnx"
    assert export.main([str(checkpoint), "--out", str(out)]) == 0 and out.stat().st_size > 0


def test_the_first_log_row_after_a_resume_averages_every_iteration_since_the_last(shapes_lists, tmp_path,
                                                                                   monkeypatch):
    """A run killed after a periodic checkpoint (iteration 6) between two log rows (4 and 8):
    resumed, its row at 8 is the one the run would have written, iterations 5 to 8."""
    settings = ["--iterations", "10", "--print-every", "4", "--save-every", "6"]
    assert train.main(run_args(shapes_lists, tmp_path / "straight", *settings)) == 0
    real = train.Trainer._save_if_due

    def killed_after_saving(self, *args):
        real(self, *args)
        if self.iteration == 6:
            raise KeyboardInterrupt                     # as kill -9, after the save
    monkeypatch.setattr(train.Trainer, "_save_if_due", killed_after_saving)
    with pytest.raises(KeyboardInterrupt):
        train.main(run_args(shapes_lists, tmp_path / "killed", *settings))
    monkeypatch.undo()
    assert train.main(["--resume", "--out", str(tmp_path / "killed")]) == 0
    rows = [torch.load(tmp_path / run / "checkpoint.pt", weights_only=True)["history"]
            for run in ("straight", "killed")]
    assert [r["iteration"] for r in rows[1]] == [4, 8, 10]
    for key in ("loss", "loc_loss", "conf_loss"):
        assert [r[key] for r in rows[1]] == [r[key] for r in rows[0]], key
