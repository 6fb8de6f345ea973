"""Training that survives the cluster, on CPU processes (gloo): torchrun restarts after a killed
worker, two nodes, one rank's unreadable image, signals, one run per folder, --resume auto,
--save-minutes and TensorBoard."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
# Two processes of batch 2 each, 16 iterations, a checkpoint every 4. The ResNet-34 base: its
# trained batch norm (buffers DDP broadcasts from rank 0) is the harder case; VGG16's layers
# are all parameters.
RUN = TINY + ["--device", "cpu", "--backbone", "resnet34", "--iterations", "16", "--save-every", "4",
              "--print-every", "4"]


def torchrun(launcher, args):
    """torchrun (its launcher options) running train.py with args, output captured; in a
    process group of its own with its workers (finished() can end them all)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")          # as torchrun sets it for several per node
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launcher, "train.py", *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)


def finished(proc, timeout):
    """A torchrun's output once it has ended; past `timeout` s it is killed with its workers
    (none left behind) and the test fails with what it printed."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"torchrun still running after {timeout} s:\n{proc.communicate()[0]}")


def parameters(checkpoint):
    """A checkpoint's parameters (its model's tensors but batch norm's statistics)."""
    state = torch.load(checkpoint, weights_only=True)["model"]
    return {k: v for k, v in state.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid):
    """The processes whose parent is `pid` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.fixture(scope="module")
def uninterrupted(shapes_lists, tmp_path_factory):
    """Two processes on one machine (torchrun --standalone), not interrupted; their output."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = torchrun(["--standalone", "--nproc_per_node=2"], RUN + ["--data-folder", str(shapes_lists),
                                                                   "--out", str(out), "--resume", "auto"])
    output = finished(proc, 300)
    assert proc.returncode == 0, output
    return out, output


def test_two_processes_train_one_run(uninterrupted):
    out, output = uninterrupted
    assert output.startswith(f"--resume auto: no checkpoint in {out}: starting a new run")
    assert "weights identical on all 2 ranks" in output
    assert torch.load(out / "checkpoint.pt", weights_only=True)["iteration"] == 16
    assert sorted(p.name for p in out.iterdir()) == [".train.lock", "checkpoint.pt", "log.csv", "loss_curve.png"]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the workers through /proc")
def test_a_killed_worker_is_restarted_and_the_run_ends_as_if_never_stopped(uninterrupted, shapes_lists, tmp_path):
    """torchrun --max-restarts 1: rank 0 killed (kill -9) after the first checkpoint; the
    restarted processes resume from the latest checkpoint (--resume auto, the same command),
    and the run ends with the uninterrupted run's weights, bit for bit (2 processes: each
    gradient is the sum of two, in either order the same)."""
    out = tmp_path / "run"
    proc = torchrun(["--standalone", "--nproc_per_node=2", "--max-restarts=1"],
                    RUN + ["--data-folder", str(shapes_lists), "--out", str(out), "--resume", "auto"])
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    workers = sorted(children(proc.pid))
    assert len(workers) == 2 and proc.poll() is None, finished(proc, 300)
    os.kill(workers[0], signal.SIGKILL)                   # the first started: rank 0
    output = finished(proc, 300)
    assert proc.returncode == 0, output
    assert f"--resume auto: continuing {out / 'checkpoint.pt'}" in output, output
    expected = parameters(uninterrupted[0] / "checkpoint.pt")
    found = parameters(out / "checkpoint.pt")
    assert all(torch.equal(found[k], v) for k, v in expected.items())


def test_two_nodes_train_one_run(uninterrupted, shapes_lists, tmp_path):
    """Two torchrun agents on this machine (--nnodes 2, one process each, c10d rendezvous on
    127.0.0.1): every rank ends with the same weights, close to the standalone run's. Not
    bit for bit: which agent arrives first decides which rank reads which shard, and rank 0's
    shard is the one whose batch-norm statistics the checkpoint keeps and DDP broadcasts."""
    out = tmp_path / "run"
    launcher = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=two-nodes"]
    agents = [torchrun(launcher, RUN + ["--data-folder", str(shapes_lists), "--out", str(out)]) for _ in range(2)]
    try:
        outputs = [finished(agent, 300) for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
    assert all(agent.returncode == 0 for agent in agents), outputs
    assert any("weights identical on all 2 ranks" in output for output in outputs)
    expected, found = parameters(uninterrupted[0] / "checkpoint.pt"), parameters(out / "checkpoint.pt")
    for key, value in expected.items():
        assert (found[key] - value).abs().max() <= 1e-3 * max(1.0, float(value.abs().max())), key


def bad_image_on_rank_1(shapes_lists, folder):
    """The shapes lists with rank 1's image of its third batch cut short (first epoch, seed 0,
    two processes of batch 2: train.TrainSampler's order); the image's path."""
    folder.mkdir()
    for name in ("label_map.json", "TRAIN_objects.json", "TEST_images.json", "TEST_objects.json"):
        (folder / name).write_text((shapes_lists / name).read_text())
    images = json.loads((shapes_lists / "TRAIN_images.json").read_text())
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    index = int(order[2 * 2 * 2 + 1])                   # batch 3 of rank 1: every other of order[8:12]
    bad = folder / "cut.jpg"
    bad.write_bytes(Path(images[index]).read_bytes()[:400])
    images[index] = str(bad)
    (folder / "TRAIN_images.json").write_text(json.dumps(images))
    return bad


def test_one_ranks_unreadable_image_stops_every_rank_then_is_skipped_by_all(shapes_lists, tmp_path):
    """Rank 1 meets it: every rank stops within seconds, rank 0 saves the checkpoint, and the
    last line of the job's output is rank 1's one line naming the file (in torchrun's report,
    no other rank's traceback before it). Resumed with --skip-bad-images, every rank skips
    that step (none trains on a smaller batch) and the run ends with the ranks agreeing."""
    data = tmp_path / "lists"
    bad = bad_image_on_rank_1(shapes_lists, data)
    out = tmp_path / "run"
    args = RUN + ["--data-folder", str(data), "--out", str(out), "--resume", "auto"]
    started = time.monotonic()
    proc = torchrun(["--standalone", "--nproc_per_node=2"], args)
    output = finished(proc, 120)
    assert proc.returncode != 0 and time.monotonic() - started < 30, output
    lines = [line.strip() for line in output.splitlines() if line.strip() and not line.startswith("=")]
    assert lines[-1].startswith(f"traceback : train.py: error: {bad}: cannot read image") \
        and lines[-1].endswith("or pass --skip-bad-images"), lines[-3:]
    assert "[rank0]" not in output and "Connection closed by peer" not in output, output
    assert torch.load(out / "checkpoint.pt", weights_only=True)["iteration"] == 2
    proc = torchrun(["--standalone", "--nproc_per_node=2"], args + ["--skip-bad-images"])
    output = finished(proc, 300)
    assert proc.returncode == 0, output
    assert f"skipped: {bad}: cannot read image" in output and "weights identical on all 2 ranks" in output
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["iteration"] == 16 and [r["iteration"] for r in state["history"]][-1] == 16


def test_torchrun_names_the_process_that_met_the_problem_not_the_one_that_stopped_with_it(tmp_path, monkeypatch,
                                                                                           capsys):
    """Rank 1 meets the problem, rank 0 stops because of it, both within one second: torchrun
    (which orders failures by whole seconds, ties to the lowest rank) must name rank 1's line."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
    failures = {}
    for rank, shown in ((1, True), (0, False)):
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / f"error_{rank}.json"))
        assert train.fail(train.TrainingStopped("the problem" if shown else "another process stopped"), 2, shown) == 2
        failures[rank] = ProcessFailure(rank, 100 + rank, 2, str(tmp_path / f"error_{rank}.json"))
    assert capsys.readouterr().err == "train.py: error: the problem\n"
    rank, failure = ChildFailedError("train.py", dict(sorted(failures.items()))).get_first_failure()
    assert rank == 1 and failure.message["message"] == "train.py: error: the problem"


# ------------------------------------------------------------------------------ one process

def test_a_second_run_in_the_same_folder_is_refused_until_the_first_is_gone(shapes_lists, tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, '.'); "
                               "from distributed import RunLock; "
                               f"lock = RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    try:
        assert train.main(TINY + ["--iterations", "2", "--data-folder", str(shapes_lists), "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"is in use by another train.py (pid {holder.pid} on" in err[0], err
        assert not (tmp_path / "checkpoint.pt").exists()
    finally:
        holder.kill()                                    # kill -9: the kernel drops its lock
        holder.wait()
    assert train.main(TINY + ["--iterations", "2", "--data-folder", str(shapes_lists), "--out", str(tmp_path)]) == 0


def test_resume_auto_starts_continues_and_refuses_another_run(shapes_lists, tmp_path, capsys):
    args = TINY + ["--data-folder", str(shapes_lists), "--out", str(tmp_path), "--resume", "auto"]
    assert train.main(args + ["--iterations", "2"]) == 0
    assert capsys.readouterr().out.startswith(f"--resume auto: no checkpoint in {tmp_path}: starting a new run")
    assert train.main(args + ["--iterations", "4"]) == 2                 # another schedule: another run
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is another run than this command's: iterations 2 there, 4 here" in err[0], err
    assert train.main(args + ["--iterations", "2", "--lr", "0.01"]) == 2
    assert "lr 0.001 there, 0.01 here" in capsys.readouterr().err
    assert train.main(args + ["--iterations", "2"]) == 0                  # the same command: finished
    assert "has finished its 2 iterations" in capsys.readouterr().out
    with pytest.raises(SystemExit):                                       # plain --resume stays strict
        train.parse_config(["--resume", "--init-from", "x.pt"])


def test_a_failed_training_step_is_said_by_the_rank_that_met_it(shapes_lists, tmp_path, monkeypatch):
    """Rank 1 of 2 (this process as it sees its part: the others agreeing only on its flag):
    the step's error becomes its one line, shown whichever rank it is (rank 0 saves)."""
    from distributed import Processes
    trainer = train.Trainer(train.parse_config(TINY + ["--iterations", "4", "--data-folder", str(shapes_lists),
                                                       "--out", str(tmp_path)]))
    try:
        trainer.processes, trainer.world, trainer.main_process = Processes(1, 2, torch.device("cpu")), 2, False
        monkeypatch.setattr(train, "forward_loss", lambda *args: 1 / 0)
        batch = trainer._rendered(next(train.batches(trainer.loader, trainer.sampler, trainer.dataset, 0)))
        with pytest.raises(train.TrainingStopped) as stopped:
            trainer.step(batch)
        assert stopped.value.shown and stopped.value.status == 1
        assert str(stopped.value) == "a training step failed: ZeroDivisionError: division by zero"
    finally:
        trainer.close()


def test_ranks_that_found_different_checkpoints_stop_together(shapes_lists, tmp_path, monkeypatch, capsys):
    """This process starts a new run while another rank (as the agreement shows it) resumed at
    iteration 8: a shared folder that one node saw out of date. One line, before any step."""
    from distributed import Processes

    class OtherRankResumedAt8(Processes):
        def agree(self, values):                       # the iteration check: [-iteration, iteration]
            return [max(v, 8.0 * sign) for v, sign in zip(values, (-1, 1))] if len(values) == 2 else list(values)

    monkeypatch.setattr(train, "join", lambda device: OtherRankResumedAt8(0, 1, torch.device("cpu")))
    assert train.main(TINY + ["--iterations", "16", "--data-folder", str(shapes_lists), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"train.py: error: the processes of the run start at different iterations (0 to 8): they read "
                   f"different checkpoints in {tmp_path}. Do they all see the same file system, up to date?"]
    assert not (tmp_path / "checkpoint.pt").exists()


def test_resume_auto_keeps_the_scaled_schedule(shapes_lists, tmp_path):
    """--scale-lr with the schedule stated: the restarted command states it before scaling,
    the checkpoint holds it after; the restart trains the checkpoint's (batch 4: 1/8 the lr,
    8x the iterations)."""
    argv = TINY + ["--data-folder", str(shapes_lists), "--out", str(tmp_path), "--resume", "auto", "--scale-lr",
                   "--iterations", "1", "--lr-steps", "1"]
    assert train.main(argv) == 0
    config = train.parse_config(argv)
    _, resumed = train.load_resume_state("latest", config, train.explicit_arguments(argv), same_run=True)
    assert (resumed["iterations"], resumed["lr_steps"], resumed["lr"]) == (8, [8], pytest.approx(0.001 / 8))


def test_sigusr1_saves_and_exits_138(shapes_lists, tmp_path, monkeypatch):
    """Slurm's --signal=USR1@SECONDS warning: a checkpoint at the current step, and the
    shell's status for SIGUSR1, so that the job script knows to requeue."""
    real = train.Trainer.step

    def signalled_at_3(self, batch):
        if self.iteration == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(self, batch)

    monkeypatch.setattr(train.Trainer, "step", signalled_at_3)
    assert train.main(TINY + ["--iterations", "20", "--data-folder", str(shapes_lists), "--out", str(tmp_path)]) == 138
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["iteration"] == 4


def test_save_minutes_saves_on_the_clock(shapes_lists, tmp_path, capsys):
    assert train.main(TINY + ["--iterations", "4", "--save-minutes", "1e-9", "--data-folder", str(shapes_lists),
                              "--out", str(tmp_path)]) == 0
    saves = [line for line in capsys.readouterr().out.splitlines() if line.startswith("saved")]
    assert [line.split("(")[-1] for line in saves] == ["on the clock)"] * 3 + ["finished)"]


def test_tensorboard_gets_the_log_the_map_and_detections(shapes_lists, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    assert train.main(TINY + ["--iterations", "4", "--eval-every", "4", "--tensorboard", "--data-folder",
                              str(shapes_lists), "--out", str(tmp_path)]) == 0
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0}).Reload()
    tags = events.Tags()
    assert {"loss", "loc_loss", "conf_loss", "lr", "images_per_s", "mAP_VOC07"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [2, 4]
    assert len(tags["images"]) == 4 and events.Images(tags["images"][0])[-1].step == 4


def test_tensorboard_draws_the_readable_test_images_and_names_the_other(shapes_lists, tmp_path, capsys):
    data = tmp_path / "lists"
    data.mkdir()
    for f in shapes_lists.glob("*.json"):
        (data / f.name).write_text(f.read_text())
    images = json.loads((data / "TEST_images.json").read_text())
    (tmp_path / "cut.jpg").write_bytes(Path(images[1]).read_bytes()[:400])
    images[1] = str(tmp_path / "cut.jpg")
    (data / "TEST_images.json").write_text(json.dumps(images))
    assert train.main(TINY + ["--iterations", "2", "--tensorboard", "--data-folder", str(data),
                              "--out", str(tmp_path / "run")]) == 0
    assert f"train.py: warning: --tensorboard: {tmp_path / 'cut.jpg'}: cannot read image" in capsys.readouterr().err


def test_tensorboard_without_its_package_is_one_line(shapes_lists, tmp_path, monkeypatch, capsys):
    real = train.importlib.util.find_spec
    monkeypatch.setattr(train.importlib.util, "find_spec", lambda name: None if name == "tensorboard" else real(name))
    with pytest.raises(SystemExit):
        train.parse_config(TINY + ["--tensorboard", "--data-folder", str(shapes_lists), "--out", str(tmp_path)])
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "--tensorboard needs the tensorboard package: pip install tensorboard")
