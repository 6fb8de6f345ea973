"""Train SSD300 (or SSD512, --model ssd512) on lists written by create_data_lists.py.

The defaults are the paper's VOC07+12 recipe (SGD, lr 1e-3, momentum 0.9, weight decay 5e-4,
biases at twice the learning rate, batch 32, 120k iterations, lr x0.1 at 80k and 100k):

    python train.py --data-folder data/voc_lists --out checkpoints/ssd300_voc
    python train.py --backbone resnet34 --data-folder data/voc_lists --out checkpoints/ssd300_r34_voc
    python train.py --model ssd512 --data-folder data/voc_lists --out checkpoints/ssd512_voc
    torchrun --nproc_per_node=4 train.py --data-folder data/voc_lists --out checkpoints/ssd300_voc
    python train.py --resume --out checkpoints/ssd300_voc         # continue the latest checkpoint
    python train.py --init-from checkpoints/ssd300_voc/checkpoint.pt --data-folder data/lists \
        --out checkpoints/mine                                     # fine-tune into other classes
    python train.py --preset toy --data-folder data/shapes_lists --out checkpoints/toy   # CPU
    python train.py --plot checkpoints/run_a checkpoints/run_b    # compare loss curves

The run folder (--out) receives checkpoint.pt (every --save-every iterations, at the end and on
Ctrl-C), log.csv and loss_curve.png.
"""
import argparse
import csv
import importlib.util
import multiprocessing
import signal
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from datasets import (CROP_POLICIES, ZOOM_OUT_MAX, DataError, PascalVOCDataset, check_same_classes,
                      collate_fn, load_image, model_input, start_loading)
from distributed import RunLock, join, launched_rank, record_error
from gpu_augment import decode_place, render_batch
from model import FREEZE_CHOICES, MODELS, SSD, MultiBoxLoss, load_for_new_classes, read_checkpoint
from priors import PRIOR_CONFIGS, as_plain_dict, prior_config
from utils import (HelpFormatter, add_precision_arguments, atomic_torch_save, atomic_write, bounded,
                   choose_precision, default_workers, describe_precision, remove_stale_temporaries,
                   save_figure)

# Settings a preset changes; anything given on the command line still wins.
PRESETS = {
    # The same SSD300 at 1/8 of the channels, trained from scratch on a CPU in minutes:
    # AdamW (SGD at this width, from random weights, diverges or stalls) and batch norm in the
    # base (from scratch it reaches a given mAP with about half the images: ScratchDet), so
    # that even a CPU without bf16 (float32) trains it in minutes (README, "Quick start").
    # AdamW's beta2 is 0.99, not 0.999: its second-moment average must follow a gradient scale
    # that falls fast in a run of a few hundred steps. With 0.999, 700 iterations reached 0.88
    # mAP; with 0.99, 600 reach 0.95 (float32, AVX2 kernels) and 0.89-0.93 (bf16, two seeds),
    # 550 0.92 (float32) but 0.84-0.89 in bf16, 500 0.85 (float32).
    # --amp auto: bf16 where the CPU has it. With --backbone resnet34 add --width 0.25.
    # The gentler crop policy: at this budget the paper's (Caffe's) costs 0.18 mAP; and zoom out
    # to 2x the side, not 4x (Caffe's max_expand_ratio): 0.94 against 0.87 (float32, AVX2
    # kernels; the test images are not zoomed out, and these objects are large). Images are
    # loaded in the training process: on two cores a loader process takes CPU time from the
    # two compute threads (5-8% slower in float32, the same in bf16).
    "toy": dict(width=0.125, pretrained=False, base_bn="train", optimizer="adamw", betas=[0.9, 0.99],
                crop="one-sampler", zoom_out=2.0, batch_size=8, lr=3e-3, iterations=600,
                lr_steps=[500, 575], warmup=50, workers=0, print_every=25, save_every=200,
                eval_every=300),
}
# Settings a resumed run must keep: those that define the network, and which of its
# parameters train (the optimizer's state is per parameter).
KEPT_ON_RESUME = ("model", "backbone", "width", "n_classes", "base_bn", "freeze")
# What a command with --resume auto must state as its checkpoint has it (where it states it):
# the network, the data and the schedule. Another value is another run, not this one's restart.
RUN_DEFINING = ("model", "backbone", "width", "base_bn", "freeze", "data_folder", "keep_difficult",
                "crop", "zoom_out", "batch_size", "optimizer", "lr", "momentum", "betas",
                "weight_decay", "iterations", "lr_steps", "lr_gamma", "warmup", "loc_loss", "seed",
                "init_from")
# AdamW's decay rates of its moment averages when not given: Adam's (and PyTorch's) defaults,
# also what checkpoints from before --betas were trained with.
ADAMW_BETAS = (0.9, 0.999)
LOG_FIELDS = ["iteration", "loss", "loc_loss", "conf_loss", "lr", "images_per_s", "elapsed_s", "mAP"]
# Batches in a row with an unreadable image after which --skip-bad-images stops all the same.
MAX_BAD_BATCHES = 10


def build_parser(suppress_defaults=False):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=HelpFormatter,
        argument_default=argparse.SUPPRESS if suppress_defaults else None)
    d = (lambda value: argparse.SUPPRESS) if suppress_defaults else (lambda value: value)
    data = p.add_argument_group("data")
    data.add_argument("--data-folder", default=d("data/voc_lists"), help="lists from create_data_lists.py")
    data.add_argument("--keep-difficult", action=argparse.BooleanOptionalAction, default=d(True),
                      help="train on objects marked difficult (the original Caffe recipe does)")
    data.add_argument("--workers", type=bounded(int, 0), default=d(default_workers()),
                      help="data loading processes per GPU")
    data.add_argument("--crop", choices=CROP_POLICIES, default=d("caffe"),
                      help="random crop: caffe (the paper's: every sampler runs, one sample or the "
                           "whole image picked) or one-sampler (one sampler drawn, fewer crops: "
                           "for short schedules)")
    data.add_argument("--zoom-out", type=bounded(float, 1), default=d(ZOOM_OUT_MAX),
                      help="largest zoom-out ratio of the canvas's side to the image's (Caffe's "
                           "max_expand_ratio, the paper's 4; 1: no zoom out)")
    data.add_argument("--gpu-augment", action=argparse.BooleanOptionalAction, default=d(None),
                      help="decode the JPEGs and make the augmented samples on the device "
                           "(TorchCodec's nvJPEG and tensor ops: the same pixels as the CPU path, to "
                           "within one level in a few pixels); the loading processes only read the "
                           "files and draw the augmentation. Default: on with CUDA where TorchCodec "
                           "decodes there, off otherwise")
    data.add_argument("--skip-bad-images", action="store_true", default=d(False),
                      help="leave out images that cannot be read, with a warning, instead of "
                           "stopping (with a checkpoint) at the first one")
    net = p.add_argument_group("model")
    net.add_argument("--model", choices=MODELS, default=d("ssd300"),
                     help="SSD300 (300x300 input, 8732 priors) or SSD512 (512x512, 24,564 priors, "
                          "Caffe's ssd_pascal_512.py)")
    net.add_argument("--backbone", choices=["vgg16", "resnet34"], default=d("vgg16"),
                     help="VGG16 (the paper's) or ResNet-34 (MLPerf-style) base")
    net.add_argument("--pretrained", nargs="?", const=True, default=d(True),
                     help="ImageNet weights for the base: torchvision's, or a file path")
    net.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                     default=argparse.SUPPRESS, help="train the base from scratch")
    net.add_argument("--width", type=bounded(float, above=0), default=d(1.0),
                     help="channel multiplier (1 = paper)")
    net.add_argument("--base-bn", choices=["frozen", "train"], default=d(None),
                     help="batch norm in the base. ResNet-34: frozen ImageNet statistics or "
                          "trained (default: frozen with pretrained weights, trained from "
                          "scratch). VGG16: none (default, the paper's) or train (from scratch)")
    net.add_argument("--loc-loss", choices=["l1", "smooth_l1"], default=d("l1"),
                     help="localisation loss: L1 (this project's default, as in the sgrvinod "
                          "tutorial) or smooth L1 (the paper's and the Caffe release's)")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--freeze", choices=FREEZE_CHOICES, default=d(None),
                     help="keep the base's first stages fixed: up to conv1_x, up to conv2_x, or "
                          "none (default: conv2 when starting from pretrained weights, as Caffe's "
                          "ssd_pascal.py does; none from scratch, where those filters are random)")
    opt.add_argument("--batch-size", type=bounded(int, 1), default=d(32),
                     help="global batch, over all GPUs")
    opt.add_argument("--optimizer", choices=["sgd", "adamw"], default=d("sgd"),
                     help="SGD with momentum (the paper's) or AdamW")
    opt.add_argument("--lr", type=bounded(float, above=0, high=10), default=d(1e-3),
                     help="base learning rate (at most 10: more only makes the run diverge)")
    opt.add_argument("--momentum", type=bounded(float, 0, below=1), default=d(0.9), help="SGD momentum")
    opt.add_argument("--betas", type=bounded(float, 0, below=1), nargs=2, default=d(ADAMW_BETAS),
                     metavar=("BETA1", "BETA2"), help="AdamW's decay rates of its gradient moments")
    opt.add_argument("--weight-decay", type=bounded(float, 0), default=d(5e-4),
                     help="on weights, not biases")
    opt.add_argument("--iterations", type=bounded(int, 1), default=d(120_000),
                     help="training iterations (batches)")
    opt.add_argument("--lr-steps", type=bounded(int, 0), nargs="*", default=d([80_000, 100_000]),
                     help="iterations at which the learning rate is multiplied by --lr-gamma")
    opt.add_argument("--lr-gamma", type=bounded(float, above=0), default=d(0.1),
                     help="learning rate factor at each step")
    opt.add_argument("--warmup", type=bounded(int, 0), default=d(0), help="linear warm-up iterations")
    opt.add_argument("--scale-lr", action="store_true", default=d(False),
                     help="linear scaling rule: lr x batch/32, iterations and lr steps x 32/batch")
    opt.add_argument("--max-bad-steps", type=bounded(int, 1), default=d(5),
                     help="stop after this many non-finite losses in a row")
    run = p.add_argument_group("run")
    run.add_argument("--preset", choices=sorted(PRESETS), default=d(None),
                     help="toy: a small SSD300 (or --model ssd512) that learns the built-in dataset "
                          "on a CPU in minutes")
    run.add_argument("--out", default=d("checkpoints/ssd300"), help="run folder")
    run.add_argument("--resume", nargs="?", const="latest", default=d(None),
                     help="checkpoint to continue; alone: the run folder's checkpoint.pt; auto: "
                          "that one if there is one, else start a new run (for job scripts, "
                          "requeues and torchrun --max-restarts: the same command either way; "
                          "refused where the checkpoint's run is not the command's)")
    run.add_argument("--init-from", metavar="CHECKPOINT", default=d(None),
                     help="start from a trained checkpoint's weights, for this data's classes: "
                          "base, auxiliary and localisation layers kept, class scores copied "
                          "for the class names both share (background too), new for the others; "
                          "the same --backbone, --width and --base-bn (default: the checkpoint's)")
    run.add_argument("--overwrite", action="store_true", default=d(False),
                     help="start again in a run folder that already holds a checkpoint")
    run.add_argument("--seed", type=bounded(int, 0, 2 ** 32 - 1), default=d(0),
                     help="initialisation, data order, augmentation")
    run.add_argument("--device", default=d("auto"), help="auto (cuda, mps, cpu), cuda, cpu, ...")
    add_precision_arguments(run, d)
    run.add_argument("--compile", action="store_true", default=d(False), help="torch.compile the model")
    run.add_argument("--print-every", type=bounded(int, 1), default=d(100),
                     help="iterations per log.csv row")
    run.add_argument("--save-every", type=bounded(int, 1), default=d(5000),
                     help="iterations per checkpoint")
    run.add_argument("--save-minutes", type=bounded(float, above=0), default=d(None),
                     help="also a checkpoint every so many minutes (wall clock; for preemptible "
                          "machines)")
    run.add_argument("--tensorboard", action="store_true", default=d(False),
                     help="also write TensorBoard event files in the run folder's tensorboard/ "
                          "(losses, learning rate, images/s, mAP, test images with their "
                          "detections); needs the tensorboard package")
    run.add_argument("--eval-every", type=bounded(int, 0), default=d(0),
                     help="test mAP every N iterations (0: never)")
    run.add_argument("--plot", nargs="+", metavar="RUN", default=d(None),
                     help="only draw the loss curves of these run folders (or log.csv files)")
    run.add_argument("--plot-out", default=d("loss_curves.png"), help="figure written by --plot")
    return p


def explicit_arguments(argv=None):
    """Only the settings given on the command line."""
    return vars(build_parser(suppress_defaults=True).parse_args(argv))


def parse_config(argv=None):
    """Command line -> config dict: defaults < preset < explicit arguments."""
    parser = build_parser()
    config = vars(parser.parse_args(argv))
    if config["resume"] not in (None, "auto") and config["init_from"]:
        parser.error("--init-from starts a new run; --resume continues one (a run started with "
                     "--init-from resumes without it; --resume auto takes both)")
    if config["tensorboard"] and importlib.util.find_spec("tensorboard") is None:    # on every rank
        parser.error("--tensorboard needs the tensorboard package: pip install tensorboard")
    if config["preset"]:
        config.update(PRESETS[config["preset"]])
        config.update(explicit_arguments(argv))
    return config


# ------------------------------------------------------------------------------ data order

class TrainSampler(torch.utils.data.Sampler):
    """Shuffled, sharded over ranks like DistributedSampler, and resumable mid-epoch.

    Epoch e visits a permutation seeded by (seed, e); rank r takes every world-th index of it,
    starting at batch `start_batch` (so a resumed run skips what it has already seen without
    loading it). Incomplete final batches are dropped, as the schedule counts iterations.
    """

    def __init__(self, n, batch_per_rank, rank, world, seed):
        self.n, self.batch, self.rank, self.world, self.seed = n, batch_per_rank, rank, world, seed
        self.batches_per_epoch = n // (batch_per_rank * world)
        if n == 0:
            raise DataError("the training list is empty: create_data_lists.py found no training images")
        if self.batches_per_epoch == 0:
            raise DataError(f"the training list has {n} images, fewer than one global batch "
                            f"({batch_per_rank * world}); lower --batch-size")
        self.epoch, self.start_batch = 0, 0

    def set_position(self, iteration):
        self.epoch, self.start_batch = divmod(iteration, self.batches_per_epoch)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g)
        used = self.batches_per_epoch * self.batch * self.world
        mine = order[:used][self.rank::self.world]
        return iter(mine[self.start_batch * self.batch:].tolist())

    def __len__(self):
        return (self.batches_per_epoch - self.start_batch) * self.batch


def batches(loader, sampler, dataset, iteration):
    """Endless stream of batches, epoch after epoch, starting at `iteration`."""
    sampler.set_position(iteration)
    while True:
        dataset.set_epoch(sampler.epoch)
        yield from start_loading(loader)
        sampler.epoch, sampler.start_batch = sampler.epoch + 1, 0


# ------------------------------------------------------------------------------ optimisation

def make_optimizer(net, config):
    """SGD as in Caffe: biases at twice the learning rate and without weight decay.

    --optimizer adamw (decoupled weight decay, same parameter groups) trains a network from
    scratch far more reliably; the toy preset uses it.
    """
    trained = [(n, p) for n, p in net.named_parameters() if p.requires_grad]   # not --freeze's
    biases = [p for n, p in trained if n.endswith(".bias")]
    weights = [p for n, p in trained if not n.endswith(".bias")]
    groups = [dict(params=weights, lr_mult=1.0, weight_decay=config["weight_decay"]),
              dict(params=biases, lr_mult=2.0, weight_decay=0.0)]
    if config.get("optimizer", "sgd") == "adamw":
        return torch.optim.AdamW(groups, lr=config["lr"], betas=tuple(config.get("betas", ADAMW_BETAS)))
    return torch.optim.SGD(groups, lr=config["lr"], momentum=config["momentum"])


def learning_rate(iteration, config):
    """Step schedule with an optional linear warm-up; a pure function of the iteration."""
    lr = config["lr"] * config["lr_gamma"] ** sum(iteration >= s for s in config["lr_steps"])
    if iteration < config["warmup"]:
        lr *= (iteration + 1) / config["warmup"]
    return lr


def apply_linear_scaling(config):
    """Linear scaling rule (Goyal et al.): the same epochs and lr per image as at batch 32.
    The warm-up stays as given: larger batches want one (--warmup), not a shorter one."""
    factor = config["batch_size"] / 32
    config["lr"] *= factor
    config["iterations"] = round(config["iterations"] / factor)
    config["lr_steps"] = [round(s / factor) for s in config["lr_steps"]]


# ------------------------------------------------------------------------------ checkpoints

def checkpoint_state(net, optimizer, scaler, iteration, config, history, running_losses=None):
    return dict(model=net.state_dict(), optimizer=optimizer.state_dict(),
                scaler=scaler.state_dict(), iteration=iteration, config=config,
                history=history, running_losses=running_losses, rng_cpu=torch.get_rng_state(),
                rng_cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def non_finite_entries(state):
    """Names of the floating-point tensors of a checkpoint's model and optimizer state that
    hold a NaN or an infinity."""
    tensors = [(f"model {k}", v) for k, v in state["model"].items()]
    tensors += [(f"optimizer state {k} {name}", v) for k, values in state["optimizer"]["state"].items()
                for name, v in values.items()]
    return [name for name, t in tensors
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all()]


def load_resume_state(path, config, explicit, same_run=False):
    """Read a checkpoint to resume; its config wins, except settings given explicitly.
    same_run (--resume auto): the command is the run's own, restarted; a ValueError naming
    the RUN_DEFINING settings it states otherwise."""
    path = Path(config["out"]) / "checkpoint.pt" if path == "latest" else Path(path)
    state = read_checkpoint(path, required=("model", "optimizer", "scaler", "config", "iteration"))
    saved = dict(state["config"])
    saved.setdefault("freeze", "none")        # checkpoints from before --freeze trained it all
    saved.setdefault("model", "ssd300")       # and from before SSD512
    if same_run:
        check_same_run(path, saved, config, explicit)
    for key in explicit:
        if key in KEPT_ON_RESUME and config[key] != saved.get(key):
            raise ValueError(f"{path} was trained with {key}={saved.get(key)!r}, "
                             f"not {config[key]!r}: start a new run folder instead")
        # A restart's run-defining settings are the checkpoint's, checked equal above: with
        # --scale-lr the command states them before scaling, the checkpoint after.
        if key not in ("resume", "preset") and not (same_run and key in RUN_DEFINING):
            saved[key] = config[key]
    saved["resume"] = str(path)
    return state, saved


def check_same_run(path, saved, config, explicit):
    """A ValueError in one line unless the settings the command states (on its command line
    or through its preset) that define a run (RUN_DEFINING) are the checkpoint's; with
    --scale-lr, as scaled."""
    stated = set(explicit) | set(PRESETS.get(config["preset"] or "", {}))
    command = dict(config)
    if command["scale_lr"]:
        apply_linear_scaling(command)
        stated |= {"lr", "iterations", "lr_steps"}

    def same(key):
        ours, theirs = command[key], saved.get(key)
        if key in ("data_folder", "init_from"):
            return (ours is None) == (theirs is None) and (ours is None or Path(ours).resolve() == Path(theirs).resolve())
        return (list(ours) == list(theirs)) if isinstance(ours, (list, tuple)) and theirs is not None else ours == theirs
    differ = [key for key in RUN_DEFINING if key in stated and key in saved and not same(key)]
    if differ:
        raise ValueError(f"{path} is another run than this command's: "
                         + ", ".join(f"{key} {saved[key]!r} there, {command[key]!r} here" for key in differ)
                         + " (--resume auto continues the command's own run: choose another --out)")


def load_init_state(path, config):
    """The checkpoint --init-from starts from; a ValueError if its network is not this run's
    but for the classes. A base_bn left unset is the checkpoint's; so are the priors and the
    input normalisation (its localisation heads and features were trained with them, e.g. a
    checkpoint of convert_weights.py)."""
    state = read_checkpoint(path)
    source = dict(state["config"])
    source.setdefault("model", "ssd300")
    if config["base_bn"] is None:
        config["base_bn"] = source.get("base_bn")
    for key in ("model", "backbone", "width", "base_bn"):
        if config[key] != source.get(key):
            option = "--" + key.replace("_", "-")
            raise ValueError(f"{path} was trained with {key}={source.get(key)!r}, this run has "
                             f"{config[key]!r}: --init-from keeps the network, so give "
                             f"{option} {source.get(key)} (or the --preset it was trained with)")
    config["pretrained"] = False              # its weights replace any ImageNet weights
    config["priors"] = as_plain_dict(prior_config(source))
    # Its normalisation, which its features expect; but this repository's resize: the network
    # now learns from samples that Pillow resizes (datasets.render), and is then tested as it learnt.
    preprocessing = {k: v for k, v in (source.get("preprocessing") or {}).items() if k != "resize"}
    config["preprocessing"] = preprocessing or None
    return state


def write_log(path, history):
    with atomic_write(path) as f:
        writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        writer.writeheader()
        writer.writerows(history)


def log_columns(rows):
    """Log rows (dicts, as in history or log.csv) -> columns of floats; mAP as (iteration, mAP)
    pairs where it was measured."""
    columns = {k: [float(r[k]) for r in rows] for k in LOG_FIELDS if k != "mAP"}
    columns["mAP"] = [(float(r["iteration"]), float(r["mAP"])) for r in rows if r.get("mAP", "") != ""]
    return columns


def read_log(run):
    """A run folder or log.csv -> (run name, log columns)."""
    path = Path(run)
    path = path / "log.csv" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no training log at {path}")
    with open(path, newline="") as f:
        return path.parent.name, log_columns(list(csv.DictReader(f)))


def smooth(values):
    """Bias-corrected exponential moving average over about a tenth of the points."""
    beta = max(0.0, 1 - 10 / max(len(values), 1))
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** i))
    return out


def plot_loss_curves(logs, png):
    """Total, localisation and confidence loss (raw and smoothed) of one or more runs, and
    their test mAP where it was measured, in one PNG. logs: [(run name, log columns)]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with_map = any(log["mAP"] for _, log in logs)
    panels = [("loss", "total loss"), ("loc_loss", "localisation loss"), ("conf_loss", "confidence loss")]
    fig, axes = plt.subplots(1, len(panels) + with_map, figsize=(5 * (len(panels) + with_map), 4))
    for colour, (name, log) in enumerate(logs):
        c = f"C{colour}"
        for ax, (key, title) in zip(axes, panels):
            ax.plot(log["iteration"], log[key], color=c, alpha=0.3, linewidth=0.8)
            ax.plot(log["iteration"], smooth(log[key]), color=c, label=name)
            ax.set_title(title)
            ax.set_xlabel("iteration")
            ax.set_yscale("log")
        if with_map and log["mAP"]:
            it, m = zip(*log["mAP"])
            axes[-1].plot(it, m, "o-", color=c, label=name)
            axes[-1].set_title("test mAP (VOC07 11-point)")
            axes[-1].set_xlabel("iteration")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    save_figure(fig, png)


# ------------------------------------------------------------------------------ training

class StopRequest:
    """While active, SIGINT, SIGTERM and SIGUSR1 set a flag: the loop saves a checkpoint and
    exits before the next step, with the shell's status for that signal (status: 130 for
    SIGINT, 143 for SIGTERM, 138 for SIGUSR1, Slurm's --signal=USR1@SECONDS warning), so that a
    job script tells a preemption from a Ctrl-C. A second signal stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGUSR1,) if hasattr(signal, "SIGUSR1") else ())

    def __enter__(self):
        self.requested, self.signal = False, None
        self.previous = [signal.signal(sig, self._handle) for sig in self.SIGNALS]
        return self

    def __exit__(self, *exc):
        for sig, handler in zip(self.SIGNALS, self.previous):
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signal = True, signum

    @property
    def status(self):
        """The exit status of a run this request stopped: 128 + the signal's number."""
        return 128 + (self.signal or signal.SIGINT)


def ignore_interrupts(worker_id):
    """DataLoader workers leave Ctrl-C and SIGTERM to the main process, which stops cleanly:
    job schedulers (Slurm's scancel, Kubernetes, GNU timeout) signal the whole process group,
    and a worker that died first would take the main process down before it could save."""
    for sig in StopRequest.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def end_data_workers(earlier):
    """Kill the DataLoader workers still alive: the child processes not in `earlier` (those
    that existed before the run, which are the caller's). The workers ignore SIGTERM, but
    multiprocessing ends them at exit with SIGTERM and then waits for them: forever."""
    for worker in set(multiprocessing.active_children()) - earlier:
        worker.kill()
        worker.join()


class TrainingStopped(Exception):
    """The run cannot go on; where it was training and could still save (no other process
    gone), a checkpoint of its last (finite) weights has been saved first. status: the exit
    status, 2 for bad input data, 1 for other failures; shown: False on the ranks that stop
    because another one met the problem (that one says it)."""

    def __init__(self, message, status=1, shown=True):
        super().__init__(message)
        self.status, self.shown = status, shown


def is_worker_death(error):
    """Whether `error` is the DataLoader's report that one of its worker processes died."""
    return isinstance(error, RuntimeError) and str(error).startswith("DataLoader worker")


# How gloo and NCCL report a collective that a dead process left.
PEER_FAILURES = ("Connection reset by peer", "Connection closed by peer", "Connection refused", "NCCL")


def is_peer_failure(error):
    """Whether `error` is a collective's report that another process of the run is gone."""
    return any(marker in str(error) for marker in PEER_FAILURES)


class Trainer:
    """One training run: the data, the network and its optimiser, and the loop.

    Setup (__init__) keeps the order in which it draws random numbers (the seed, the data, the
    network), on which a seed's run depends; then --init-from's weights or the resumed state.
    The loop (run): a training step, logging (with the test mAP when due), a checkpoint when due.
    """

    # ------------------------------------------------------------------ setup

    def __init__(self, config, resume_state=None, init_state=None):
        self.config = config
        resumed = resume_state is not None
        self._setup_process(resumed)
        self._choose_precision()
        self._build_data()
        self._build_network(resumed)
        if init_state is not None:
            self._init_from(init_state)
        self.net.to(self.device, memory_format=self.memory_format)
        self._build_optimiser()
        self.iteration, self.history, self.running_losses, self.saved_at = 0, [], None, None
        if resumed:
            self._restore(resume_state)
        self._check_ranks_start_alike()
        self.model = self._wrap_for_ddp_and_compile(self.net)

    @property
    def finished(self):
        """Whether a resumed run has nothing left to train (a ValueError if it is past
        --iterations: it would be saved as finished at an iteration the command does not ask for)."""
        config, it = self.config, self.iteration
        if it > config["iterations"]:
            raise ValueError(f"{config['resume']} is at iteration {it}, beyond --iterations "
                             f"{config['iterations']}: nothing to train (give more --iterations)")
        return it == config["iterations"]

    def _setup_process(self, resumed):
        """Rank, world and device (distributed.join); one run per folder;
        refuse to overwrite a run by mistake; seed the RNG."""
        config = self.config
        self.processes = join(config["device"])
        self.rank, self.world, self.device = self.processes.rank, self.processes.world, self.processes.device
        self.main_process = self.processes.main
        if config["batch_size"] % self.world:
            raise ValueError(f"--batch-size {config['batch_size']} is not divisible by "
                             f"{self.world} processes")
        self.out = Path(config["out"])
        self.lock = self._lock_folder()
        if not resumed and (self.out / "checkpoint.pt").exists() and not config["overwrite"]:
            raise FileExistsError(f"{self.out} already holds a run: continue it with --resume, "
                                  "start again with --overwrite, or choose another --out")
        torch.manual_seed(config["seed"])
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    def _check_ranks_start_alike(self):
        """Every rank starts at the same iteration: each read the checkpoint (or found none) on
        its own, and a shared file system whose caches lag can show one of them an older one."""
        low, high = self.processes.agree([-self.iteration, self.iteration])
        if -low != high:
            raise ValueError(f"the processes of the run start at different iterations ({-low:.0f} to "
                             f"{high:.0f}): they read different checkpoints in {self.out}. Do they all "
                             "see the same file system, up to date?")

    def _lock_folder(self):
        """Rank 0 takes the run folder's lock (distributed.RunLock); every rank stops if it
        cannot, rank 0 saying who holds it."""
        lock, refusal = RunLock(self.out), None
        if self.main_process:
            try:
                lock.acquire()
            except FileExistsError as error:
                refusal = error
        if self.processes.agree([float(refusal is not None)])[0]:
            raise refusal or TrainingStopped("the run folder is in use", status=2, shown=False)
        return lock

    def _choose_precision(self):
        """The autocast dtype and memory format (--amp, --channels-last) for this device."""
        config = self.config
        self.dtype, self.memory_format = choose_precision(config["amp"], self.device,
                                                          config["channels_last"])
        # What --amp auto chose on this machine (a resumed run chooses again on its own).
        config["precision"] = describe_precision(self.dtype, self.memory_format)
        if self.main_process:
            print(f"precision: {config['precision']} on {self.device}")

    def _build_data(self):
        """The training set, its resumable sampler and the loader; the classes into config.
        Its samples are the model's input: its priors' size (--model's, or those of the
        checkpoint resumed or started from) and its normalisation (ImageNet's, or theirs)."""
        config = self.config
        config.setdefault("priors", as_plain_dict(PRIOR_CONFIGS[config["model"]]))
        config.setdefault("preprocessing", None)
        # gpu_augment left unset (auto) in the config, so that a run resumed on another device
        # chooses again.
        self.dataset = PascalVOCDataset(config["data_folder"], "train", config["keep_difficult"],
                                        config["seed"], crop=config.get("crop", "caffe"),
                                        zoom_out=config.get("zoom_out", ZOOM_OUT_MAX), on_error="mark",
                                        decode=decode_place(config.get("gpu_augment"), self.device),
                                        model_input=model_input(config))
        if "label_map" in config:                                               # resumed run
            check_same_classes(config["label_map"], self.dataset.label_map,
                               "the checkpoint", config["data_folder"])
        config["label_map"] = self.dataset.label_map
        config["n_classes"] = len(self.dataset.label_map)
        batch_per_rank = config["batch_size"] // self.world
        self.sampler = TrainSampler(len(self.dataset), batch_per_rank, self.rank, self.world,
                                    config["seed"])
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=batch_per_rank, sampler=self.sampler, collate_fn=collate_fn,
            num_workers=config["workers"], pin_memory=self.device.type == "cuda", drop_last=True,
            persistent_workers=config["workers"] > 0, worker_init_fn=ignore_interrupts)

    def _build_network(self, resumed):
        """The SSD (ImageNet weights unless resumed: the checkpoint's replace them), its base
        frozen as --freeze says; still on the CPU."""
        config = self.config
        if config.get("base_bn") == "frozen" and not config["pretrained"] and not config.get("init_from"):
            raise ValueError("--base-bn frozen needs pretrained weights: batch norm frozen at "
                             "its initial statistics would normalise nothing (use --base-bn train)")
        self.net = SSD(config["n_classes"], config["backbone"], width=config["width"],
                       pretrained=config["pretrained"] if not resumed else False,
                       base_bn=config.get("base_bn"),   # absent from older checkpoints
                       model=config["model"], priors=prior_config(config),
                       preprocessing=config["preprocessing"])
        config["base_bn"] = self.net.config["base_bn"]        # the choice made, for --resume
        if config["freeze"] is None:
            config["freeze"] = "conv2" if config["pretrained"] or config.get("init_from") else "none"
        self.net.freeze(config["freeze"])
        if self.main_process and config["freeze"] != "none":
            print(f"frozen: the base up to {config['freeze']}_x (--freeze)")

    def _init_from(self, init_state):
        """--init-from: its weights, and the class scores of the classes both runs share."""
        config = self.config
        shared = load_for_new_classes(self.net, init_state["model"], config["label_map"],
                                      init_state["config"]["label_map"])
        if self.main_process:
            new = [name for name in config["label_map"] if name not in shared]
            print(f"initialised from {config['init_from']} (iteration {init_state.get('iteration')}): "
                  f"class scores copied for {', '.join(shared) or 'none'}; new for "
                  f"{', '.join(new) or 'none'}")

    def _build_optimiser(self):
        """The loss, the optimiser of the trained parameters, and the grad scaler (float16 only)."""
        self.criterion = MultiBoxLoss(self.net.priors_cxcy, loc_loss=self.config["loc_loss"])
        # Batch norm's running statistics, and room for them as they were before a step (step()).
        self.batch_norm_statistics = [b for m in self.net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                                      for b in m.buffers()]
        self.statistics_before_step = [b.clone() for b in self.batch_norm_statistics]
        self.optimizer = make_optimizer(self.net, self.config)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def _restore(self, resume_state):
        """--resume: weights, optimiser, scaler, iteration, log and RNG as the checkpoint left
        them, so that the run goes on as if never stopped."""
        self.net.load_state_dict(resume_state["model"])
        self.optimizer.load_state_dict(resume_state["optimizer"])
        self.scaler.load_state_dict(resume_state["scaler"])
        self.iteration, self.history = resume_state["iteration"], resume_state["history"]
        self.running_losses = resume_state.get("running_losses")   # absent from older checkpoints
        self.saved_at = self.iteration
        torch.set_rng_state(resume_state["rng_cpu"])
        if self.device.type == "cuda" and resume_state["rng_cuda"]:
            torch.cuda.set_rng_state_all(resume_state["rng_cuda"])

    def _wrap_for_ddp_and_compile(self, net):
        """The module the loop calls: `net` in DDP over several processes, compiled with
        --compile (checkpoints and evaluation use the bare self.net)."""
        model = net
        if self.world > 1:
            model = DistributedDataParallel(
                net, device_ids=[self.device] if self.device.type == "cuda" else None)
        if self.config["compile"]:
            model = torch.compile(model)
        return model

    # ------------------------------------------------------------------ the loop

    def run(self):
        """Train to config["iterations"]; returns the exit status (0, or 128 + the signal's
        number when a signal stopped it: StopRequest). A resumed run that has finished already
        says so and writes nothing."""
        if self.finished:
            if self.main_process:
                print(f"{self.config['resume']} has finished its {self.iteration} iterations: nothing to train")
            return 0
        self._prepare_folder()
        evaluator = make_evaluator(self.config, self.processes, self.dtype, self.memory_format) \
            if self.config["eval_every"] else None
        self.tensorboard = TensorBoardLog(self.out, self.config["data_folder"]) \
            if self.config.get("tensorboard") and self.main_process else None
        self.losses = RunningLosses(self.device, self.history[-1]["elapsed_s"] if self.history else 0.0,
                                    self.running_losses)
        self.bad_steps, self.skipped_images, self.skipped_reads, self.bad_batches = 0, set(), 0, 0
        self.saved_on_clock = time.monotonic()
        bar = tqdm(total=self.config["iterations"], initial=self.iteration, desc="train",
                   disable=not self.main_process, dynamic_ncols=True)
        self.model.train()
        stream = batches(self.loader, self.sampler, self.dataset, self.iteration)
        with bar, StopRequest() as stop:
            try:
                signum = self._train_loop(stream, evaluator, bar, stop)
                if signum:
                    return 128 + signum
            except RuntimeError as error:
                if is_worker_death(error):
                    return self._stop_at_worker_death(error, bar, stop)
                if self.world > 1 and is_peer_failure(error):      # died without a word
                    raise TrainingStopped(f"another process of the run died ({str(error).splitlines()[0][-120:]}); "
                                          f"{self._last_good_weights()}: continue with --resume") from error
                raise
        return self._finish()

    def _train_loop(self, stream, evaluator, bar, stop):
        """Step, log, checkpoint, up to the last iteration; the number of the signal that
        stopped it (after a checkpoint), or 0. Before each step the ranks agree (one exchange
        on the CPU) on whether any of them has an unreadable image, was signalled, or (rank 0
        on the clock: --save-minutes) is due to save, so that they all skip, stop or save at
        the same step."""
        while self.iteration < self.config["iterations"]:
            batch = self._rendered(next(stream))
            unreadable, signum, save_now = self.processes.agree(
                [float(bool(batch.problems)), float(stop.signal or 0), float(self._save_due_on_clock())])
            if signum:
                bar.close()
                self.save("interrupted")
                return int(signum)
            if unreadable:
                self._skip_unreadable(batch)
                terms = None
            else:
                self.bad_batches = 0
                terms = self.step(batch)
                self._count(terms)
            bar.update(1)
            self._log_if_due(evaluator, bar)
            self._save_if_due(bool(save_now))
        return 0

    def _stop_at_worker_death(self, error, bar, stop):
        """A DataLoader worker died: save; the signal's exit status if a signal killed it,
        else TrainingStopped."""
        bar.close()
        self.save("interrupted" if stop.requested else "a data loading process died")
        if stop.requested:             # e.g. a signal that reached a worker first
            return stop.status
        raise TrainingStopped(f"{error}; continue with --resume") from error

    def _finish(self):
        """The final checkpoint; report skipped images; check that the ranks agree."""
        self.save("finished")
        if self.skipped_images:
            count = len(self.skipped_images)
            print(f"{count} unreadable image{'s' * (count > 1)} skipped (--skip-bad-images), "
                  f"met {self.skipped_reads} time{'s' * (self.skipped_reads > 1)}")
        check_ranks_agree(self.net, self.device, self.world, self.main_process)
        return 0

    def close(self):
        """End what the run holds: TensorBoard's files, the process groups, the folder's lock."""
        if getattr(self, "tensorboard", None) is not None:
            self.tensorboard.close()
        self.processes.close()
        self.lock.release()

    def _prepare_folder(self):
        """The run folder, cleared of an interrupted write's temporaries, and its log.csv."""
        if self.main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            if remove_stale_temporaries(self.out):
                print(f"removed temporary files left in {self.out} by an interrupted write")
            write_log(self.out / "log.csv", self.history)

    # ------------------------------------------------------------------ one training step

    def step(self, batch):
        """One iteration: its loss terms, or None if its loss was not finite on some rank
        (then no rank steps). Between the forward and the backward pass the ranks agree on
        that (the one wait for the device per step) and on whether the forward pass raised on
        any of them: then they all stop, with a checkpoint of the weights before the step,
        and the rank that met the error raises it."""
        images = batch.images.to(self.device, non_blocking=True, memory_format=self.memory_format)
        boxes = [b.to(self.device, non_blocking=True) for b in batch.boxes]
        labels = [lab.to(self.device, non_blocking=True) for lab in batch.labels]
        lr = learning_rate(self.iteration, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        # The forward pass updates batch norm's running statistics: a skipped step puts them back.
        # One multi-tensor copy into tensors made once (not a new tensor per statistic per step:
        # ResNet-34's 87 were 87 allocations and, on a GPU, 87 kernel launches).
        if self.batch_norm_statistics:
            torch._foreach_copy_(self.statistics_before_step, self.batch_norm_statistics)
        error = None
        try:
            terms = forward_loss(self.model, self.criterion, images, boxes, labels, self.dtype)
            nonfinite = float(not torch.isfinite(terms[0]))
        except Exception as caught:                 # the others must hear of it, not wait for it
            if self.world == 1:
                raise
            error, nonfinite = caught, 0.0
        failed, nonfinite = self.processes.agree([float(error is not None), nonfinite])
        if (failed or nonfinite) and self.batch_norm_statistics:
            torch._foreach_copy_(self.batch_norm_statistics, self.statistics_before_step)
        if failed:
            self.save("stopped: an error in a training step")
            if error is not None:                   # said by this rank, whichever it is
                raise TrainingStopped(f"a training step failed: {type(error).__name__}: {error}") from error
            raise TrainingStopped("another process of the run met an error", shown=False)
        self.iteration += 1
        if nonfinite:
            return None
        backward_step(terms[0], self.optimizer, self.scaler)
        return torch.stack([t.detach() for t in terms]).double()

    def _rendered(self, batch):
        """The batch with its pixels: made on the device here with --gpu-augment (the images
        that fail to decode join batch.problems), else already made by the loader (so too an
        empty batch, every image unreadable)."""
        if isinstance(batch.images, torch.Tensor):
            return batch
        return render_batch(batch, self.device, self.memory_format, self.dataset.model_input)

    def _skip_unreadable(self, batch):
        """Some rank's batch has an unreadable image (this one's, if batch.problems). Without
        --skip-bad-images every rank stops, with a checkpoint (the batch is not consumed:
        --resume reads it again), the rank that met it saying which; with it, every rank skips
        the step (none trains on a smaller batch while the others wait), and a run of
        MAX_BAD_BATCHES such batches stops it all the same."""
        if not self.config["skip_bad_images"]:
            self.save("stopped at an unreadable image")
            raise TrainingStopped(f"{batch.problems[0]}. Replace or remove the image and continue "
                                  "with --resume, or pass --skip-bad-images" if batch.problems else
                                  "another process of the run met an unreadable image",
                                  status=2, shown=bool(batch.problems))
        for problem in batch.problems:
            tqdm.write(f"skipped: {problem}")
        self.skipped_images.update(batch.problems)          # each message names its file
        self.skipped_reads += len(batch.problems)
        self.bad_batches += 1
        self.iteration += 1
        if self.bad_batches >= MAX_BAD_BATCHES:
            self.save("stopped: batch after batch with unreadable images")
            raise TrainingStopped(f"{MAX_BAD_BATCHES} batches in a row with unreadable images "
                                  f"({(batch.problems or ['on another process'])[0]}, ...): is the "
                                  "data folder complete?", status=2)

    def _count(self, terms):
        """Add a step's losses; stop after --max-bad-steps non-finite ones in a row."""
        if terms is not None:
            self.bad_steps = 0
            self.losses.add(terms)
            return
        self.bad_steps += 1
        warnings.warn(f"non-finite loss at iteration {self.iteration}: step skipped "
                      f"({self.bad_steps} in a row)")
        if self.bad_steps >= self.config["max_bad_steps"]:
            self.save("stopped after non-finite losses")
            raise FloatingPointError(
                f"{self.bad_steps} non-finite losses in a row at iteration {self.iteration}: "
                f"stopped. {self._last_good_weights()}; try a lower --lr, a longer --warmup, or --amp off.")

    def _last_good_weights(self):
        """Where the last finite weights are, in words."""
        if self.saved_at is None:
            return f"No checkpoint with finite weights was written to {self.out}"
        return f"The last good weights are in {self.out / 'checkpoint.pt'} (iteration {self.saved_at})"

    # ------------------------------------------------------------------ evaluation and logging

    def _log_if_due(self, evaluator, bar):
        """Every --print-every iterations (and at the end): a log.csv row, with the test mAP
        when it is due, and the loss curve."""
        config, it = self.config, self.iteration
        last = it == config["iterations"]
        evaluate = self._evaluation_due(evaluator)
        if not self.losses.n or not (it % config["print_every"] == 0 or last or evaluate):
            return
        row = self.losses.row(it, learning_rate(it - 1, config), config["batch_size"], self.world)
        if evaluate:
            row["mAP"] = self._evaluate(evaluator)
        self.history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2g}",
                        img_s=f"{row['images_per_s']:.1f}")
        if self.main_process:
            # The curve every 10th row, and whenever mAP is measured or the run ends.
            self._write_log_files(plot=len(self.history) % 10 == 0 or evaluate or last)
        if self.tensorboard is not None:
            self.tensorboard.row(row)
            if evaluate or last:
                self.net.eval()
                self.tensorboard.detections(self.net, self.config["label_map"], it)
                self.model.train()

    def _evaluation_due(self, evaluator):
        """Whether this iteration measures the test mAP: every --eval-every, and at the end."""
        it = self.iteration
        return evaluator is not None and (it % self.config["eval_every"] == 0
                                          or it == self.config["iterations"])

    def _evaluate(self, evaluator):
        """The test mAP of the network now; then back to training mode."""
        result = evaluator(self.net)
        self.model.train()
        return result

    def _write_log_files(self, plot):
        """log.csv with every row so far; with `plot`, loss_curve.png too."""
        write_log(self.out / "log.csv", self.history)
        if plot:
            plot_loss_curves([(self.out.name, log_columns(self.history))], self.out / "loss_curve.png")

    # ------------------------------------------------------------------ checkpoints

    def save(self, reason):
        """checkpoint.pt (main process only): all that --resume needs, the RNG state included.
        Never weights that are not finite: a FloatingPointError instead, the file unchanged."""
        if self.main_process:
            state = checkpoint_state(self.net, self.optimizer, self.scaler, self.iteration,
                                     self.config, self.history, self.losses.state())
            bad = non_finite_entries(state)
            if bad:
                raise FloatingPointError(
                    f"not saved at iteration {self.iteration} ({reason}): {', '.join(bad[:3])}"
                    f"{' ...' if len(bad) > 3 else ''} not finite. {self._last_good_weights()}; "
                    "try a lower --lr, a longer --warmup, or --amp off.")
            atomic_torch_save(state, self.out / "checkpoint.pt")
            self.saved_at, self.saved_on_clock = self.iteration, time.monotonic()
            tqdm.write(f"saved {self.out / 'checkpoint.pt'} at iteration {self.iteration} ({reason})")

    def _save_due_on_clock(self):
        """Whether --save-minutes have passed since the last checkpoint (rank 0's clock
        decides, for every rank: Processes.agree)."""
        minutes = self.config.get("save_minutes")
        return bool(minutes) and self.main_process and time.monotonic() - self.saved_on_clock >= 60 * minutes

    def _save_if_due(self, on_clock=False):
        """A periodic checkpoint every --save-every iterations (the last has its own), or when
        the clock says so (--save-minutes). A save that fails (e.g. a full disk) is reported,
        each time, and training goes on."""
        last = self.iteration >= self.config["iterations"]
        if not last and (on_clock or self.iteration % self.config["save_every"] == 0):
            try:
                self.save("on the clock" if on_clock else "periodic")
            except OSError as e:
                self.saved_on_clock = time.monotonic()      # next try: --save-minutes on, not every step
                kept = (f"iteration {self.saved_at}'s" if self.saved_at is not None else "no checkpoint")
                tqdm.write(f"train.py: warning: {e}. Training goes on; {self.out} keeps {kept}, "
                           "and log.csv runs ahead of it", file=sys.stderr)


def forward_loss(model, criterion, images, boxes, labels, dtype):
    """Network under autocast (when dtype is set), the loss in float32."""
    with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
        locs, scores = model(images)
    return criterion(locs.float(), scores.float(), boxes, labels)


def backward_step(loss, optimizer, scaler):
    """Backward and SGD step; the GradScaler is only enabled for float16."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


class RunningLosses:
    """Loss terms summed on the device since the last log row, read back once per row.
    Checkpoints carry them (state()), so that the first row after a resume averages every
    iteration since the row before (for several processes: the first process's sums)."""

    def __init__(self, device, elapsed_s=0.0, saved=None):
        saved = saved or dict(sums=[0.0] * 3, n=0, seconds=0.0)
        self.sums = torch.tensor(saved["sums"], device=device, dtype=torch.float64)   # loss, loc, conf
        self.n = saved["n"]
        self.t_last = time.perf_counter() - saved["seconds"]
        self.start = time.perf_counter() - elapsed_s - saved["seconds"]

    def state(self):
        """What a checkpoint keeps: the sums, their count, and the seconds they took."""
        return dict(sums=self.sums.tolist(), n=self.n, seconds=time.perf_counter() - self.t_last)

    def add(self, terms):
        self.sums += terms
        self.n += 1

    def row(self, iteration, lr, batch_size, world):
        """Mean losses since the last row (averaged over ranks) and throughput; then reset."""
        if world > 1:
            dist.all_reduce(self.sums)
            self.sums /= world
        now = time.perf_counter()
        loss, loc, conf = (self.sums / self.n).tolist()
        row = dict(iteration=iteration, loss=loss, loc_loss=loc, conf_loss=conf, lr=lr,
                   images_per_s=self.n * batch_size / max(now - self.t_last, 1e-9),
                   elapsed_s=now - self.start, mAP="")
        self.sums.zero_()
        self.n, self.t_last = 0, now
        return row


def make_evaluator(config, processes, dtype, memory_format):
    """Test-set VOC07 mAP during training (on rank 0 only; the other ranks wait for it in
    the control group), its images decoded where the training images are (--gpu-augment)."""
    from eval import evaluate
    device = processes.device
    test_set = PascalVOCDataset(config["data_folder"], "test", on_error="mark",
                                decode=decode_place(config.get("gpu_augment"), device),
                                model_input=model_input(config))

    def run(net):
        result = ""
        if processes.main:
            result = evaluate(net, test_set, device, batch_size=max(1, config["batch_size"]),
                              workers=config["workers"], amp_dtype=dtype,
                              memory_format=memory_format, coco=False)["mAP_07"]
            tqdm.write(f"iteration-level test mAP (VOC07 11-point): {result:.4f}")
        processes.agree([0.0])
        return result
    return run


class TensorBoardLog:
    """--tensorboard: event files in the run folder's tensorboard/ (rank 0 writes them): each
    log row's losses, learning rate and images/s, the test mAP where measured, and with each
    measurement and at the end, the first few test images with the network's detections
    (detect.py's drawing, its score threshold)."""

    IMAGES = 4

    def __init__(self, folder, data_folder):
        from torch.utils.tensorboard import SummaryWriter   # there: parse_config checks
        self.writer = SummaryWriter(str(Path(folder) / "tensorboard"))
        self.images = []                                    # without a test split: scalars only
        if (Path(data_folder) / "TEST_images.json").exists():
            lists = PascalVOCDataset(data_folder, "test").lists
            self.images = [lists.path(i) for i in range(min(self.IMAGES, len(lists)))]

    def row(self, row):
        for key in ("loss", "loc_loss", "conf_loss", "lr", "images_per_s"):
            self.writer.add_scalar(key, row[key], row["iteration"])
        if row["mAP"] != "":
            self.writer.add_scalar("mAP_VOC07", row["mAP"], row["iteration"])
        self.writer.flush()

    def detections(self, net, label_map, iteration):
        """The test images with `net`'s detections (net in eval mode)."""
        from detect import detect_batch, draw_detections
        images = []
        for path in self.images:
            try:
                images.append(load_image(path, displayed=True))
            except DataError as error:                      # a picture fewer, not a stopped run
                tqdm.write(f"train.py: warning: --tensorboard: {error}", file=sys.stderr)
        for k, (image, found) in enumerate(zip(images, detect_batch(net, images) if images else [])):
            drawn = np.asarray(draw_detections(image, *found, label_map))
            self.writer.add_image(f"detections/{k}", drawn, iteration, dataformats="HWC")
        self.writer.flush()

    def close(self):
        self.writer.close()


def check_ranks_agree(net, device, world, main_process):
    """After DDP training every rank must hold the same weights; say so, or fail loudly.

    Only parameters: trained batch norm's running statistics are buffers that each rank
    updates from its own images (DDP copies rank 0's at every forward; rank 0's are saved).
    """
    if world == 1:
        return
    fingerprint = torch.stack([torch.stack([p.double().sum(), p.double().pow(2).sum()])
                               for p in net.parameters()])
    gathered = [torch.empty_like(fingerprint) for _ in range(world)]
    dist.all_gather(gathered, fingerprint)
    if not all(torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError("the ranks' weights differ after training")
    if main_process:
        print(f"weights identical on all {world} ranks")


def resolve_auto_resume(config, main_process):
    """--resume auto: the run folder's checkpoint if it has one ("latest"), else a new run
    (None), said in the run's first line. Returns (the --resume to follow, whether the
    command must be the checkpoint's run's own)."""
    if config["resume"] != "auto":
        return config["resume"], False
    checkpoint = Path(config["out"]) / "checkpoint.pt"
    if main_process:
        print(f"--resume auto: continuing {checkpoint}" if checkpoint.exists() else
              f"--resume auto: no checkpoint in {config['out']}: starting a new run")
    return ("latest", True) if checkpoint.exists() else (None, False)


def main(argv=None):
    config = parse_config(argv)
    if config["plot"]:
        plot_loss_curves([read_log(run) for run in config["plot"]], config["plot_out"])
        print(f"wrote {config['plot_out']}")
        return 0
    children = set(multiprocessing.active_children())
    trainer = None
    main_process = launched_rank() == 0
    try:
        state = init = None
        config["resume"], same_run = resolve_auto_resume(config, main_process)
        if config["resume"]:
            state, config = load_resume_state(config["resume"], config, explicit_arguments(argv), same_run)
            config["init_from"] = None if same_run else config["init_from"]
        else:
            init = load_init_state(config["init_from"], config) if config["init_from"] else None
            if config["scale_lr"]:
                apply_linear_scaling(config)
        trainer = Trainer(config, state, init)
        code = trainer.run()
    except (DataError, FileNotFoundError, FileExistsError, ValueError) as e:
        code = fail(e, 2, shown=main_process)                # every rank meets these alike
    except TrainingStopped as e:
        code = fail(e, e.status, e.shown)
    except (OSError, FloatingPointError) as e:                   # a full disk, a diverged run...
        code = fail(e, 1, shown=main_process)
    finally:
        end_data_workers(children)
        if trainer is not None:
            trainer.close()
        elif dist.is_initialized():
            dist.destroy_process_group()
    return code


def fail(error, status, shown):
    """Say why the run stopped, in one line, where `shown` (the other processes tell only
    torchrun, as a consequence, for its report); the exit status."""
    line = f"train.py: error: {error}"
    if shown:
        print(line, file=sys.stderr)
    record_error(line, consequence=not shown)
    return status


if __name__ == "__main__":
    sys.exit(main())
