"""The training program: `python -m nanoq4.train --dataset cifar10`, or `train(TrainConfig(...))`.

Read it top to bottom: the settings (TrainConfig: every default, unit and --help text in one
place), the building blocks (optimizer, schedule, evaluation), setup() and the training loop
train(), then the command line, whose flags are generated from TrainConfig.

One step = forward -> cross-entropy -> backward -> optional gradient-norm clip -> SGD/AdamW step
-> tanh soft clip of the quantized weights (an optimizer hook) -> with --lookahead K, every K steps,
the weight-averaging sync (optim.Lookahead). After each epoch: test accuracy, grid statistics of
every quantized layer, a checkpoint and the run folder's metrics and curves (runlog.py). After the
last epoch --lookahead first writes the averaged weights into the model, and --bn-reestimate N
recomputes the batch-norm statistics with the final weights; the final model is also evaluated with
test-time augmentation (--tta), exported as a packed int4 file (model.nq4), and the FINAL epoch's
test accuracy is reported.

Never losing a run (safeguards.py): every setting is checked before any work starts; a folder that
holds a run is not overwritten without --overwrite; a checkpoint is only replaced by one whose
weights, optimizer state and metrics are finite; a diverging run stops and keeps its last good
checkpoint; --resume continues with the checkpoint's own settings and refuses differing ones
unless --allow-changes says so.

Several processes: at a batch of 128 or more the run trains on N local worker processes (--workers N,
workers.py), each on its share of every batch, and `mpiexec -n N python -m nanoq4.train ...` runs the
same loop on N ranks on one machine or many (distributed.py); one sum of the gradients per step. Rank 0
alone prints and writes files; with --workers 1 and without mpiexec nothing of this runs.
"""
import argparse
import dataclasses
import itertools
import math
import os
import shlex
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np

from . import cli, data, distributed, export, memory, models, nn, ops, optim, parallel, profile, quant, runlog, safeguards
from .errors import NanoQ4Error
from .tensor import Tensor, no_grad
from .tta import TTA_MODES, predict_logits

EVAL_BATCH = 250  # images per evaluation forward; bounds the im2col buffer of the first layers

# Resuming: every setting comes from the checkpoint's config unless given (typed on the command
# line). RESUME_KEYS must then agree with the checkpoint even with --allow-changes (the saved state
# or the data order would not fit); RESUME_FREE may differ freely (they do not change the training);
# RUN_ENVIRONMENT describes this process, not the run, and is never taken from the checkpoint; any
# other setting (lr, schedule, augmentation, ...) may differ only with --allow-changes.
RESUME_KEYS = ("dataset", "model", "bits", "per_channel", "fp32", "coarse", "batch_size", "seed", "epochs",
               "optimizer", "dropout", "max_steps_per_epoch")
FIXED_WITHIN_A_RUN = ", ".join(safeguards.flag_name(k) for k in RESUME_KEYS if k != "max_steps_per_epoch")
RESUME_FREE = ("data_dir", "download", "progress", "divergence_factor", "tta")
RUN_ENVIRONMENT = ("out", "resume", "threads", "workers", "overwrite", "allow_changes")
# Settings that checkpoints written before they existed (or before a default changed) were trained
# with: such a checkpoint's config lacks "dropout", and its lr None meant the old sgd default.
LEGACY_SETTINGS = dict(dropout=0.5, tta="none")
LEGACY_SGD_LR = 0.05
# what every checkpoint without them trained with
ADDED_SETTINGS = dict(flip="random", bn_reestimate=0, lookahead=0, lookahead_decay=0.95, bn_momentum=0.1)


# ----------------------------------------------------------------------------- the settings

# --workers by default: one process per core, as long as each gets this many images of a batch (fewer
# leave a single-threaded process too little work per layer to gain from running beside the others).
WORKER_MIN_IMAGES = 64


def auto_workers(batch_size):
    """The default number of local worker processes: one per available core, at most one per
    WORKER_MIN_IMAGES images of the batch, lowered until it divides the batch; at least 1."""
    count = max(1, min(safeguards.available_cores(), batch_size // WORKER_MIN_IMAGES))
    while batch_size % count:
        count -= 1
    return count

# Passes over the training set when --epochs is not given, per dataset (any other: EPOCHS_DEFAULT).
# CIFAR-10: the fewest epochs measured to end above 92.5% (with TTA) on local workers; CIFAR-100's
# 13-epoch run still gained 1.5 test points per epoch at its end (README: Results).
EPOCHS_DEFAULT = 13
DATASET_EPOCHS = {"cifar10": 22, "cifar100": 18}


def default_epochs(dataset):
    """The number of epochs a run on `dataset` trains for unless --epochs says otherwise."""
    return DATASET_EPOCHS.get(dataset, EPOCHS_DEFAULT)


def setting(default, help, **flag):
    """A TrainConfig field: its default and its --help text (with the unit), plus argparse keywords
    where the flag needs more than its type (choices, metavar, nargs). build_parser turns each field
    into a flag: batch_size -> --batch-size. A bool becomes a switch whose help says what the switch
    does: --fp32 when the setting is off by default, --no-augment when it is on; both=True gives
    --per-channel and --no-per-channel. hidden=True keeps a flag out of --help."""
    return dataclasses.field(default=default, metadata=dict(help=help, **flag))


@dataclass
class TrainConfig:
    """Every setting of a run, its default and its --help text, in one place. A default of None is
    explained in the help; the others are shown by --help."""
    dataset: str = setting("cifar10", data.DATASET_CHOICES)
    model: str = setting("vgg4bit", f"{' or '.join(models.MODELS)}")
    epochs: int = setting(None, f"passes over the training set (default {EPOCHS_DEFAULT}; "
                                + "; ".join(f"{n} for {d}" for d, n in DATASET_EPOCHS.items()) + ")")
    batch_size: int = setting(256, "images per step; under mpiexec the global batch, split evenly across the ranks")
    optimizer: str = setting("sgd", "sgd (momentum, Nesterov) or adamw", choices=("sgd", "adamw"))
    lr: float = setting(None, "peak learning rate (default 0.1 for sgd, 1e-3 for adamw)")
    momentum: float = setting(0.9, "SGD momentum")
    weight_decay: float = setting(5e-4, "weight decay, on conv/linear weights only, not on biases or batch norm")
    schedule: str = setting("onecycle", "learning-rate schedule after the warm-up: onecycle (linear to 0), cosine "
                                        "(cosine to 0) or constant", choices=("onecycle", "cosine", "constant"))
    warmup_epochs: float = setting(1.0, "linear warm-up length, in epochs; at most 30 percent of the run")
    grad_clip: float = setting(None, "max global gradient L2 norm (default: no clipping)")
    tanh_alpha: float = setting(3.0, "tanh soft clip a in W <- a*tanh(W/a) after each step, in weight units")
    tanh_relative: float = setting(None, "use a = K * RMS(W) per tensor instead of an absolute a (default off)",
                                   metavar="K")
    tanh_clip: bool = setting(True, "disable the tanh soft clip (the paper's ablation)")
    bits: int = setting(4, "weight bit width, 2..8; 4 bits give the levels -7..7")
    per_channel: bool = setting(True, "one 4-bit scale per output channel; --no-per-channel: one per layer, as the "
                                      "paper (default per channel)", both=True)
    fp32: bool = setting(False, "no quantization: the float32 baseline")
    label_smoothing: float = setting(0.2, "cross-entropy label smoothing: the share of the target spread uniformly "
                                          "over the classes; the paper uses 0")
    dropout: float = setting(0.0, "dropout probability before the classifier (default none: a 13-epoch run "
                                  "underfits); the paper's 0.5 comes with --recipe paper")
    tta: str = setting("flip-translate", "test-time augmentation of the final evaluation: none, flip (2 views) or "
                                         "flip-translate (6 views); the plain accuracy is always reported too",
                       choices=TTA_MODES)
    bn_reestimate: int = setting(0, "after the last epoch, before the final evaluation and the export: set the "
                                    "batch-norm statistics to their average over this many training batches (the "
                                    "last epoch's first ones) computed with the final weights, quantized as in "
                                    "training, instead of the running averages (Nagel et al. 2022); 0: off", metavar="BATCHES")
    lookahead: int = setting(0, "weight averaging (airbench's Lookahead): every this many steps a slow copy of every "
                                "weight, bias and batch-norm statistic moves towards the trained weights (see "
                                "--lookahead-decay) and training goes on from it; the final model (evaluated, "
                                "checkpointed, exported) is the slow copy. Recommended with --bn-reestimate N (e.g. "
                                "50), so that the exported batch-norm statistics are those of the averaged weights, "
                                "and airbench's --bn-momentum 0.4; airbench syncs every 5 steps; 0: off",
                             metavar="STEPS")
    lookahead_decay: float = setting(0.95, "with --lookahead K: the slow copy's decay per step; the sync after step s "
                                           "of a run of S steps keeps DECAY**K * (s/S)**3 of the slow copy and takes "
                                           "the rest from the trained weights (airbench's 0.95)", metavar="DECAY")
    bn_momentum: float = setting(0.1, "batch-norm running statistics: the share of each training batch's statistics "
                                      "in the running averages (PyTorch's momentum); airbench's 0.4 follows the latest "
                                      "weights faster (e.g. after a --lookahead sync)")
    augment: bool = setting(True, "disable random crop (zero padding 4) + horizontal flip")
    flip: str = setting("random", "horizontal flips of the augmentation: random (each image with probability 0.5, "
                                  "every epoch) or alternate (airbench: a random half in epoch 1, then each image "
                                  "the other way from the epoch before)", choices=data.FLIP_MODES)
    coarse: bool = setting(False, "CIFAR-100: the 20 coarse labels")
    seed: int = setting(0, "random seed of the weights, the data order, the augmentation and dropout")
    data_dir: str = setting(None, "data folder (default $NANOQ4_DATA, else ./data)")
    download: bool = setting(True, "never download missing data")
    out: str = setting(None, "run folder (default a new folder under runs/); a folder that already holds a run is "
                             "refused unless --overwrite")
    overwrite: bool = setting(False, "replace the run already in --out (its checkpoint, metrics and model file are "
                                     "deleted)")
    resume: str = setting(None, "continue from a checkpoint (without PATH: OUT/checkpoint.ckpt, needs --out); "
                                "settings not given come from the checkpoint, given ones that differ from it are "
                                "refused", nargs="?", const="", metavar="PATH")
    allow_changes: bool = setting(False, "with --resume: train on with given settings that differ from the "
                                         "checkpoint's (learning rate, schedule, augmentation, ...); "
                                         f"{FIXED_WITHIN_A_RUN} never change within a run")
    divergence_factor: float = setting(4.0, f"stop, keeping the last good checkpoint, when "
                                            f"{safeguards.DIVERGENCE_HITS} of the last {safeguards.DIVERGENCE_WINDOW} "
                                            f"training losses (or an epoch's test loss) exceed this x the first "
                                            f"training loss (at least ln(classes)), or when the accuracy is still at "
                                            f"chance level {safeguards.CHANCE_MIN_STEPS} steps after the warm-up; "
                                            f"0: never")
    threads: int = setting(None, "CPU threads for Numba and BLAS, 1 to the number of cores (default: all cores; "
                                 "with --workers or under mpiexec, per process: the machine's cores divided among "
                                 "its processes)")
    workers: int = setting(None, "processes that train together on this machine, each on an equal share of every "
                                 "batch with its share of the cores (data-parallel, as mpiexec -n N, without MPI); "
                                 f"default: one per core while each gets at least {WORKER_MIN_IMAGES} images, as "
                                 "many as divide --batch-size (1 under mpiexec); 1: one process")
    sync_bn: bool = setting(None, "batch-norm statistics over the global batch, summed over the processes (N "
                                  "processes then compute what one computes, a tenth slower on 2 workers); "
                                  "--no-sync-bn (the default): each process's own, as PyTorch DDP", both=True)
    progress: bool = setting(True, "no progress bar")
    max_steps_per_epoch: int = setting(None, "for smoke tests: cut each epoch short", hidden=True)

    def resolved_lr(self):
        return self.lr if self.lr is not None else (0.1 if self.optimizer == "sgd" else 1e-3)

    def resolved_epochs(self):
        return self.epochs if self.epochs is not None else default_epochs(self.dataset)

    def resolved_workers(self):
        """The local worker processes this run asks for: --workers, else auto_workers (1 under mpiexec)."""
        if self.workers is not None:
            return self.workers
        return 1 if distributed.launched_by_mpiexec() else auto_workers(self.batch_size)

    def resolved_sync_bn(self):
        """--sync-bn, else off: each process normalizes with its own share's statistics, as PyTorch
        DDP. Two local workers then never wait for each other inside a step (README: ~10% more
        images/s than with the 14 per-step meetings of synchronized batch norm)."""
        return bool(self.sync_bn)


PAPER_RECIPE = dict(optimizer="adamw", lr=1e-3, weight_decay=5e-4, grad_clip=0.5, tanh_alpha=3.0,
                    schedule="cosine", warmup_epochs=0.0, epochs=150, batch_size=128, augment=True,
                    per_channel=False, label_smoothing=0.0, dropout=0.5, tta="none")


def validate(cfg):
    """Refuse any setting outside its domain, as a one-line NanoQ4Error naming the flag, before
    any work starts (no folder made, no data read)."""
    safeguards.check_domains(cfg)
    if cfg.model not in models.MODELS:
        raise NanoQ4Error(f"unknown model {cfg.model!r}; choose one of: {', '.join(models.MODELS)}")
    if cfg.optimizer not in ("sgd", "adamw"):
        raise NanoQ4Error(f"unknown optimizer {cfg.optimizer!r}; choose sgd or adamw")
    if cfg.schedule not in ("onecycle", "cosine", "constant"):
        raise NanoQ4Error(f"unknown schedule {cfg.schedule!r}; choose onecycle, cosine or constant")
    if cfg.tta not in TTA_MODES:
        raise NanoQ4Error(f"unknown --tta {cfg.tta!r}; choose one of: {', '.join(TTA_MODES)}")
    if cfg.flip not in data.FLIP_MODES:
        raise NanoQ4Error(f"unknown --flip {cfg.flip!r}; choose {' or '.join(data.FLIP_MODES)}")
    data.check_dataset_spec(cfg.dataset, cfg.coarse)
    for name in ("out", "resume", "data_dir"):
        value = getattr(cfg, name)
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise NanoQ4Error(f"{safeguards.flag_name(name)} must be a path, got {value!r}")
    if cfg.out is not None and not str(cfg.out).strip():
        raise NanoQ4Error("--out is empty; name the run folder (or leave --out out for a new one under runs/)")
    check_workers(cfg.workers, cfg.batch_size)


def check_workers(workers, batch_size):
    """Refuse a --workers count that cannot split --batch-size (each worker takes an equal share of
    at least 2 images) or that comes under mpiexec, as one line naming the fix."""
    if workers is None or workers == 1:
        return
    if distributed.launched_by_mpiexec():
        raise NanoQ4Error(f"--workers {workers} under mpiexec: mpiexec -n starts the processes; leave --workers out")
    if workers > batch_size // 2:
        raise NanoQ4Error(f"--workers {workers} leaves some worker fewer than 2 images of --batch-size {batch_size} "
                          f"(batch norm needs 2); choose --workers {batch_size // 2} or fewer")
    if batch_size % workers:
        fewer = max(w for w in range(1, workers) if batch_size % w == 0)
        more = [w for w in range(workers + 1, batch_size // 2 + 1) if batch_size % w == 0]
        choices = f"--workers {fewer}" + (f" or {more[0]}" if more else "")
        raise NanoQ4Error(f"--workers {workers} does not divide --batch-size {batch_size} into equal shares; choose "
                          f"{choices}, or a --batch-size that is a multiple of {workers}")


def resumed_config(cfg, saved, given=None):
    """The config a resumed run continues with: the checkpoint's `saved` config (a dict), except
    for the RUN_ENVIRONMENT and the settings named in `given` (None: all of them), taken from cfg.
    Given settings that differ from the checkpoint's are refused, naming them: RESUME_KEYS always,
    the others unless cfg.allow_changes. -> (config, {name: (checkpoint's, new)} allowed changes)."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    given = set(names if given is None else given)
    saved = {**ADDED_SETTINGS, **saved}
    if "workers" not in saved and not saved.get("sync_bn"):  # written before --workers: one process computed
        saved = {**saved, "sync_bn": not distributed.launched_by_mpiexec()}  # global statistics, mpiexec ranks not
    if "dropout" not in saved:  # written before this setting existed: the values it trained with
        saved = {**LEGACY_SETTINGS, **saved}
        if saved.get("lr") is None and saved.get("optimizer", "sgd") == "sgd":
            saved["lr"] = LEGACY_SGD_LR
    known = [k for k in names if k in saved and k not in RUN_ENVIRONMENT]
    new = dataclasses.replace(cfg, **{k: saved[k] for k in known if k not in given})
    old = dataclasses.replace(new, **{k: saved[k] for k in known})

    def setting(c, k):
        resolved = dict(lr=c.resolved_lr, epochs=c.resolved_epochs, sync_bn=c.resolved_sync_bn).get(k)
        return resolved() if resolved else getattr(c, k)

    differ = {k: (setting(old, k), setting(new, k)) for k in known
              if k in given and k not in RESUME_FREE and setting(old, k) != setting(new, k)}
    if not differ:
        return new, {}
    listing = ", ".join(f"{k}={a!r} (given {b!r})" for k, (a, b) in differ.items())
    refusal = (f"checkpoint {cfg.resume} was trained with different settings ({listing}); resume with the same "
               f"flags or leave them out to take the checkpoint's")
    fixed = [safeguards.flag_name(k) for k in differ if k in RESUME_KEYS]
    if fixed:
        raise NanoQ4Error(f"{refusal} ({', '.join(fixed)} cannot change within a run)")
    if not cfg.allow_changes:
        raise NanoQ4Error(f"{refusal}, or pass --allow-changes to train on with the new values")
    return new, differ


# ----------------------------------------------------------------------------- building blocks

def make_optimizer(model, cfg):
    groups = optim.param_groups(model, cfg.weight_decay)
    lr = cfg.resolved_lr()
    if cfg.optimizer == "sgd":
        opt = optim.SGD(groups, lr, momentum=cfg.momentum, nesterov=True)
    else:
        opt = optim.AdamW(groups, lr)
    if cfg.tanh_clip and not cfg.fp32:
        opt.add_post_step_hook(optim.TanhSoftClip(cfg.tanh_alpha, cfg.tanh_relative))
    return opt


def warmup_steps(cfg, steps_per_epoch):
    """The warm-up in steps. It never takes more than 30% of the run (as PyTorch's OneCycleLR),
    so even a one-epoch run decays to zero and ends on its best-tuned weights."""
    if cfg.schedule == "constant":
        return 0
    epochs = cfg.resolved_epochs()
    warmup = int(round(min(cfg.warmup_epochs, epochs) * steps_per_epoch))
    return min(warmup, int(0.3 * epochs * steps_per_epoch))


def make_schedule(cfg, steps_per_epoch):
    total = cfg.resolved_epochs() * steps_per_epoch
    warmup = warmup_steps(cfg, steps_per_epoch)
    lr = cfg.resolved_lr()
    if cfg.schedule == "onecycle":
        return optim.one_cycle_schedule(lr, total, max(1, warmup))
    if cfg.schedule == "cosine":
        return optim.cosine_schedule(lr, total, warmup)
    return optim.constant_schedule(lr)


def evaluate(model, x, y, mean, std, tta="none", batch_size=EVAL_BATCH, group=None):
    """(mean loss, accuracy, predictions) of `model` in eval mode on uint8 images, through the
    same predict_logits as `python -m nanoq4.evaluate` on the exported file. With a group of
    several ranks each rank takes a slice of the images, the totals are summed over the ranks,
    and the predictions are those of this rank's slice."""
    if group is not None and group.size > 1:
        part = slice(group.rank * len(y) // group.size, (group.rank + 1) * len(y) // group.size)
        totals = np.zeros(3)
        preds = np.empty(0, dtype=np.int64)
        if len(y[part]):
            loss, _, preds = evaluate(model, x[part], y[part], mean, std, tta, batch_size)
            totals[:] = loss * len(preds), (preds == y[part]).sum(), len(preds)
        loss_sum, correct, count = group.sum(totals)
        return float(loss_sum / count), float(correct / count), preds
    model.eval()
    with no_grad():
        logits = predict_logits(lambda xb: model(Tensor(xb)).data, x, mean, std, tta, batch_size)
        loss = float(ops.cross_entropy(Tensor(logits), y).data)
    preds = logits.argmax(axis=1)
    return loss, float((preds == y).mean()), preds


def grid_summary(model, cfg, prev_codes):
    """Grid statistics of every quantized layer; updates prev_codes for the next flip rate."""
    stats = []
    for name, layer in models.quantized_layers(model):
        codes, scale = layer.quantized_codes()
        s = quant.grid_stats(codes, cfg.bits, prev_codes.get(name))
        s.update(name=name, scale=float(np.max(scale)))
        stats.append(s)
        prev_codes[name] = codes
    return stats


# ----------------------------------------------------------------------------- setup

class Run:
    """What train() works with, built by setup(), and the checks and checkpoint writes that need it."""

    cfg: TrainConfig                     # the settings the run goes with (resumed ones included)
    group: object                        # distributed.SingleProcess, workers.LocalGroup or distributed.MPIGroup
    say: object                          # print a line (rank 0), or nothing (the other ranks)
    dataset: data.Dataset
    model: nn.Module
    opt: optim.Optimizer                 # SGD/AdamW with the tanh-clip hook
    loader: data.BatchLoader             # this rank's shard of each global batch
    steps_per_epoch: int
    schedule: object                     # step -> learning rate
    warmup: int                          # warm-up steps
    lookahead: object                    # optim.Lookahead (--lookahead), or None
    watch: safeguards.DivergenceWatch
    gradient_sum: object                 # the one Allreduce per step under mpiexec; None for one process
    history: list                        # one record per finished epoch
    prev_codes: dict                     # each quantized layer's codes at the last epoch end (flip rates)
    start_epoch: int                     # where the run (re)starts; a resumed mid-epoch stop also has
    start_batch: int                     # the batch to go on from and the running sums of the epoch
    partial: tuple                       # so far: (loss sum, correct, images) or None
    changes: dict                        # settings changed on resume, {name: (checkpoint's, new)}
    out: Path                            # the run folder, with checkpoint.ckpt and metrics.jsonl
    ckpt_path: Path
    metrics_path: Path
    last_good: object                    # the checkpoint that really resumes the run; None: none yet
    command: str                         # how to resume: python -m nanoq4.train, or under mpiexec -n N

    def hint(self):
        """How to go on after a stop: the last good checkpoint (safeguards.recovery_hint)."""
        return safeguards.recovery_hint(self.last_good)

    def check_finite(self, when, **parts):
        broken = [name.replace("_", " ") for name, part in parts.items() if not safeguards.all_finite(part)]
        if broken:
            raise NanoQ4Error(f"the {' and the '.join(broken)} became non-finite {when}; {self.hint()}")

    def check_loss(self, loss_value, epoch, k):
        """Stop on a non-finite or diverging training loss (under mpiexec: the global batch's)."""
        if not math.isfinite(loss_value):
            raise NanoQ4Error(f"loss became {loss_value} at epoch {epoch + 1} step {k + 1}; {self.hint()}")
        if self.watch.loss_diverged(loss_value):
            raise NanoQ4Error(f"training diverged at epoch {epoch + 1} step {k + 1}: "
                              f"{self.watch.loss_report()}; {self.hint()}")

    def save(self, epoch, batch, running, when):
        """Write the checkpoint -> True. Anything non-finite in it stops the run (NanoQ4Error) and
        a loss above the divergence limit skips the write (False): the last good one stays.
        Under mpiexec every rank calls this at the same point; rank 0 writes, with every rank's
        dropout generator state."""
        state = dict(model=self.model.state_dict(), optimizer=self.opt.state_dict(), rng=nn.get_rng_state(),
                     history=self.history, prev_codes=self.prev_codes, epoch=epoch, batch=batch, partial=running,
                     divergence=self.watch.state(), config=dataclasses.asdict(self.cfg))
        if self.lookahead:
            state["lookahead"] = self.lookahead.state_dict()
        self.check_finite(when, weights=state["model"], optimizer_state=state["optimizer"], metrics=self.history,
                          running_loss=running, averaged_weights=state.get("lookahead"))
        if self.watch.loss_above_limit():
            self.say(f"checkpoint not updated {when}: {self.watch.loss_report()}; kept {self.last_good or 'none'}")
            return False
        if self.group.size > 1:
            state["rank_rngs"] = self.group.gather(state["rng"])
        self.group.on_root(export.save_checkpoint, self.ckpt_path, **state)
        self.last_good = self.ckpt_path
        return True

    def stop(self, signum, message, epoch=None, batch=None, running=None):
        """End the run on Ctrl-C / SIGTERM (exit code 130 / 143), first saving a checkpoint at this
        batch boundary when `epoch` is given, and saying how to continue."""
        saved = epoch is not None and self.save(epoch, batch, running, f"before epoch {epoch + 1} step {batch + 1}")
        if self.last_good:
            self.say(f"\ninterrupted: {'saved' if saved or epoch is None else 'kept'} {self.last_good}; {message} "
                     f"with: {self.command} --resume {shlex.quote(str(self.last_good))}")
        else:
            self.say("\ninterrupted before any checkpoint could be saved")
        raise cli.Interrupted(signum)


def _read_checkpoint(path):
    """The training state saved at `path`, refused when it could not resume a run."""
    return safeguards.check_resumable(path, export.load_checkpoint(path))


def _choose_run_folder(cfg):
    """(run folder, whether a run in it is replaced): --out, else the resumed checkpoint's folder,
    else a new one under runs/; refused as safeguards.check_run_folder says."""
    out = Path(cfg.out) if cfg.out else (Path(cfg.resume).parent if cfg.resume else runlog.default_out(cfg))
    return out, safeguards.check_run_folder(out, cfg)


def _resumed_rng_state(checkpoint, cfg, group):
    """The dropout generator state this process continues with: the checkpoint's (rank 0's),
    or under mpiexec each rank's own when the checkpoint was written by as many ranks. Another
    rank count starts each rank's stream afresh (the run goes on, though not bit for bit as it
    would have without the interruption) -> (state, a note or None)."""
    if group.size == 1:
        return checkpoint["rng"], None
    states = checkpoint.get("rank_rngs")
    if states and len(states) == group.size:
        return states[group.rank], None
    note = (f"checkpoint written by {len(states) if states else 1} process(es), continued on {group.size} ranks: "
            f"the dropout streams restart from the seed")
    return np.random.default_rng(distributed.rank_seed(cfg.seed, group.rank, group.size)).bit_generator.state, note


def settle_config(cfg, given, group):
    """The settings the run goes with -> (cfg, checkpoint or None, {name: (old, new)} allowed changes):
    with cfg.resume the checkpoint's, except those `given` (see resumed_config); all checked before
    any work starts, the learning rate and the number of epochs saved as numbers (a later change of
    their defaults cannot change a resumed run)."""
    checkpoint, changes = None, {}
    if cfg.resume:
        safeguards.check_domains(cfg)  # the given values; the others (dataset, ...) come from the checkpoint
        checkpoint = group.on_root(_read_checkpoint, cfg.resume)  # read by rank 0, handed to every rank
        cfg, changes = resumed_config(cfg, checkpoint["config"], given)
    validate(cfg)  # on resume, what came from the checkpoint must fit today's domains too
    cfg.lr, cfg.epochs, cfg.sync_bn = cfg.resolved_lr(), cfg.resolved_epochs(), cfg.resolved_sync_bn()
    distributed.check_batch_split(cfg.batch_size, group.size, cfg.sync_bn)
    return cfg, checkpoint, changes


def setup(cfg, given, group, settled=None):
    """Everything before the first step -> Run: the settings (`settled`: what settle_config returned
    already), the run folder (checked, made only once nothing can be refused any more), threads, data,
    model, optimizer, loader, schedule, divergence watch; with a checkpoint, the state it holds. With
    several processes rank 0's model goes to every one."""
    run = Run()
    run.group, run.say = group, runlog.log if group.is_root else runlog.silent
    cfg, checkpoint, changes = settled or settle_config(cfg, given, group)
    cfg.workers = group.workers  # the processes that train (saved: a resumed run may choose others)
    out, replacing = group.on_root(_choose_run_folder, cfg)
    parallel.set_threads(cfg.threads or group.default_threads())
    memory.keep_freed_memory()  # each step reuses the last one's memory (memory.py says why)
    dataset = group.in_turns(lambda: data.load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download,
                                                       coarse=cfg.coarse))
    if dataset.num_classes < 2:
        raise NanoQ4Error(f"{dataset.name} has {dataset.num_classes} class ({dataset.classes[0]}); a classifier "
                          f"needs at least 2")

    nn.manual_seed(cfg.seed)
    model = models.build_model(cfg.model, dataset.num_classes, quantize=not cfg.fp32, bits=cfg.bits,
                               per_channel=cfg.per_channel, dropout=cfg.dropout)
    nn.set_batch_norm_momentum(model, cfg.bn_momentum)
    if group.size > 1:
        nn.manual_seed(distributed.rank_seed(cfg.seed, group.rank, group.size))  # each rank's own dropout masks
        if cfg.sync_bn:
            group.sync_batch_norm(model)
    run.cfg, run.dataset, run.model, run.opt = cfg, dataset, model, make_optimizer(model, cfg)
    run.loader = data.BatchLoader(dataset.x_train, dataset.y_train, cfg.batch_size, dataset.mean, dataset.std,
                                  augment=cfg.augment, shuffle=True, seed=cfg.seed, prefetch=True,
                                  shard=group.rank, shards=group.size, flip=cfg.flip)
    if cfg.bn_reestimate > len(run.loader):
        raise NanoQ4Error(f"--bn-reestimate {cfg.bn_reestimate} asks for more than the {len(run.loader)} training "
                          f"batches of an epoch; choose at most {len(run.loader)}")
    run.steps_per_epoch = min(len(run.loader), cfg.max_steps_per_epoch or len(run.loader))
    total_steps = cfg.epochs * run.steps_per_epoch
    if cfg.lookahead > total_steps:
        raise NanoQ4Error(f"--lookahead {cfg.lookahead} is more than the run's {total_steps} steps: the weights would "
                          f"never be averaged; choose at most {total_steps}")
    run.lookahead = optim.Lookahead(model, cfg.lookahead, cfg.lookahead_decay, total_steps) if cfg.lookahead else None
    run.schedule = make_schedule(cfg, run.steps_per_epoch)
    run.warmup = warmup_steps(cfg, run.steps_per_epoch)
    run.watch = safeguards.DivergenceWatch(cfg.divergence_factor, dataset.num_classes,
                                           safeguards.majority_share(dataset.y_train),
                                           safeguards.majority_share(dataset.y_test),
                                           checkpoint.get("divergence") if checkpoint else None)
    run.history, run.prev_codes, run.start_epoch, run.start_batch, run.partial = [], {}, 0, 0, None
    rng_note = _resume_state(run, checkpoint) if checkpoint is not None else None
    group.broadcast_model(model)  # rank 0's weights and batch-norm statistics on every rank
    # Several ranks: the one Allreduce per step (with per-rank batch norm it averages the running statistics too)
    run.gradient_sum = None if group.size == 1 else group.gradient_sum(
        model.parameters(), [] if cfg.sync_bn else [b for _, b in model.named_buffers()])

    group.on_root(safeguards.make_run_folder, out, replacing)  # only now: every refusal above leaves no folder behind
    cfg.out = str(out)
    run.out, run.ckpt_path, run.metrics_path = out, out / "checkpoint.ckpt", out / "metrics.jsonl"
    run.last_good = cfg.resume  # a checkpoint that really resumes this run (None: none yet)
    run.changes = changes
    run.command = resume_command(cfg, group)
    if checkpoint is not None:
        run.say(f"resumed {cfg.resume} at epoch {run.start_epoch + 1}, batch {run.start_batch}")
        if changes:
            run.say("settings changed on resume (--allow-changes): " +
                    ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()))
        if rng_note:
            run.say(rng_note)
    else:
        group.on_root(runlog.write_metrics, run.metrics_path, cfg, run.history)
        grid_summary(model, cfg, run.prev_codes)  # flip rates of epoch 1 are relative to the initial weights
    return run


def resume_command(cfg, group):
    """How to continue this run (--resume then says from where): under mpiexec with as many ranks,
    else with --workers when this run's number of workers is not the default one."""
    if isinstance(group, distributed.MPIGroup):
        return f"mpiexec -n {group.size} python -m nanoq4.train"
    default = group.workers == auto_workers(cfg.batch_size)
    return "python -m nanoq4.train" + ("" if default else f" --workers {group.workers}")


def _resume_state(run, checkpoint):
    """Load the checkpoint's weights, optimizer state, dropout stream, history and position into
    `run` -> a note to print about the dropout streams, or None."""
    try:
        run.model.load_state_dict(checkpoint["model"])
        run.opt.load_state_dict(checkpoint["optimizer"])
        if run.lookahead:  # none in the checkpoint (--lookahead turned on by --allow-changes): from the next sync on
            run.lookahead.load_state_dict(checkpoint.get("lookahead"))
        rng_state, rng_note = _resumed_rng_state(checkpoint, run.cfg, run.group)
        nn.set_rng_state(rng_state)
    except (NanoQ4Error, ValueError, TypeError, KeyError) as e:
        raise NanoQ4Error(f"checkpoint {run.cfg.resume} does not fit this run ({e})") from None
    run.history, run.prev_codes = checkpoint["history"], checkpoint["prev_codes"]
    run.start_epoch, run.start_batch, run.partial = checkpoint["epoch"], checkpoint["batch"], checkpoint["partial"]
    return rng_note


def announce(run):
    """The run's first line: model, data, schedule, ranks, output folder."""
    cfg, group = run.cfg, run.group
    ranks = "" if group.size == 1 else (
        f"; {group.size} {group.member}s of {cfg.batch_size // group.size} images and {numba.get_num_threads()} "
        f"thread(s) each, {'global' if cfg.sync_bn else f'per-{group.member}'} batch-norm statistics")
    run.say(f"nanoq4: {cfg.model} ({run.model.num_parameters():,} parameters, "
            f"{'float32' if cfg.fp32 else f'{cfg.bits}-bit weights'}) on {run.dataset.name}: "
            f"{len(run.dataset.y_train):,} train / {len(run.dataset.y_test):,} test images, {cfg.epochs} epochs of "
            f"{run.steps_per_epoch} steps, {cfg.optimizer} lr {cfg.resolved_lr()} ({cfg.schedule}){ranks}; "
            f"output {run.out}")
    if cfg.lookahead and not cfg.bn_reestimate:
        run.say("note: --lookahead without --bn-reestimate N: the exported batch-norm statistics will be the "
                "averaged running statistics, not those of the averaged weights")


# ----------------------------------------------------------------------------- the training loop

def train(cfg, given=None, group=None):
    """Train per `cfg` and return the history (one dict per epoch). Writes into cfg.out.

    With cfg.resume the run continues from that checkpoint: settings not named in `given` (the
    CLI passes the flags typed; None: all) come from the checkpoint's config, given ones that
    differ from it are refused unless cfg.allow_changes (see resumed_config).

    Without a `group`, this process's (distributed.world()): under mpiexec every rank runs this on
    its shard of each global batch (distributed.py); else, when cfg asks for several --workers, this
    process starts the others and trains as their rank 0 (workers.py; from a script, call it under
    `if __name__ == "__main__":`, as multiprocessing's spawn needs). All return the history, rank 0
    alone prints and writes."""
    settled = None
    if group is None:
        group = distributed.world()
        settled = settle_config(cfg, given, group)
        workers = settled[0].resolved_workers()
        if workers > 1:
            from . import workers as local  # multiprocessing only when there is something to start
            return local.run_on_workers(workers, train, cfg, given)
    run = setup(cfg, given, group, settled)
    cfg, model, opt, loader = run.cfg, run.model, run.opt, run.loader
    announce(run)
    run_start = time.perf_counter()
    with runlog.StopRequest() as stop:
        for epoch in range(run.start_epoch, cfg.epochs):
            model.train()
            loader.set_epoch(epoch)
            totals = list(run.partial or (0.0, 0, 0))  # loss sum, correct, images (a resumed epoch: so far)
            first_batch, run.partial, run.start_batch = run.start_batch, None, 0
            epoch_start = time.perf_counter()
            bar = runlog.Progress(run.steps_per_epoch, first_batch, epoch, cfg, shown=group.is_root)
            step = epoch * run.steps_per_epoch + first_batch
            for k, (xb, yb) in enumerate(loader):
                if k >= run.steps_per_epoch:
                    break
                if k < first_batch:
                    continue
                signum = group.stop_signal(stop)  # under mpiexec: a signal to any rank stops all here
                if signum:
                    bar.close()
                    run.stop(signum, "continue", epoch, k, tuple(totals))
                opt.lr = run.schedule(step)
                loss_value, correct = train_step(run, xb, yb, epoch, k)
                step += 1
                if run.lookahead:
                    run.lookahead.after_step(step)
                images = loader.global_batch_len(k)
                totals = [totals[0] + loss_value * images, totals[1] + correct, totals[2] + images]
                bar.update(images, totals[0] / totals[2], totals[1] / totals[2])
            bar.close()
            end_epoch(run, epoch, step, totals, epoch_start)
        signum = group.stop_signal(stop)
        if signum:  # a signal during the final evaluation: the checkpoint is complete, resuming exports
            run.stop(signum, "finish")
    return finish(run, run_start)


def train_step(run, xb, yb, epoch, k):
    """One optimizer step on batch k -> (mean loss, correct count) of the batch (under mpiexec the
    global batch's): forward, cross-entropy, backward (under mpiexec each rank backpropagates its
    share of the global batch's mean loss, then one Allreduce sums the gradients), optional
    gradient-norm clip, SGD/AdamW step, whose hook soft-clips the quantized weights."""
    cfg, opt = run.cfg, run.opt
    try:
        logits = run.model(Tensor(xb))
        loss = ops.cross_entropy(logits, yb, cfg.label_smoothing)
    except NanoQ4Error as e:  # quantizing weights that the previous step made non-finite
        raise NanoQ4Error(f"{e} (epoch {epoch + 1} step {k + 1}); {run.hint()}") from None
    loss_value = float(loss.data)
    correct = int((logits.data.argmax(axis=1) == yb).sum())
    if run.gradient_sum is None:  # one process: a broken loss stops the run before backward
        run.check_loss(loss_value, epoch, k)
        opt.zero_grad()
        loss.backward()
    else:
        share = len(yb) / run.loader.global_batch_len(k)
        opt.zero_grad()
        loss.backward(np.float32(share))
        loss_value, correct = run.gradient_sum(loss_value, correct, share)
        run.check_loss(loss_value, epoch, k)
    if cfg.grad_clip:
        optim.clip_grad_norm(opt.parameters(), cfg.grad_clip)
    opt.step()
    return loss_value, correct


def end_epoch(run, epoch, step, totals, epoch_start):
    """After an epoch's last step: the safeguards (finite state, ranks in agreement, no divergence),
    test accuracy (with TTA after the final epoch), grid statistics, the checkpoint, metrics.jsonl,
    curves.png and the epoch's line."""
    cfg, group, dataset = run.cfg, run.group, run.dataset
    loss_sum, correct, seen = totals
    when = f"during epoch {epoch + 1} (by its step {run.steps_per_epoch})"
    slow = run.lookahead.slow if run.lookahead else None
    run.check_finite(when, weights=run.model.state_dict(), optimizer_state=run.opt.state_dict(), averaged_weights=slow)
    group.check_same((run.model.state_dict(), run.opt.state, slow), f"by the end of epoch {epoch + 1}",
                     f"resume from {run.last_good}" if run.last_good else "no checkpoint was saved yet")
    train_time = time.perf_counter() - epoch_start
    last = epoch + 1 == cfg.epochs
    averaged = average_weights(run) if last and run.lookahead else None
    reestimated = reestimate_statistics(run, epoch) if last and cfg.bn_reestimate else None
    test_loss, test_acc, _ = evaluate(run.model, dataset.x_test, dataset.y_test, dataset.mean, dataset.std,
                                      group=group)
    stats = grid_summary(run.model, cfg, run.prev_codes)
    record = dict(epoch=epoch + 1, train_loss=loss_sum / max(seen, 1), train_acc=correct / max(seen, 1),
                  test_loss=test_loss, test_acc=test_acc, lr=run.opt.lr, epoch_time=time.perf_counter() - epoch_start,
                  train_images_per_s=seen / train_time, grid=stats)
    if averaged:
        record["lookahead"] = averaged
    if reestimated:
        record["bn_reestimate"] = reestimated
    # the epoch's last steps blew the weights up (after the warm-up: a barely trained network's
    # batch-norm statistics can legitimately give a large test loss): keep the last checkpoint
    after_warmup = step - run.warmup
    if after_warmup >= safeguards.CHANCE_MIN_STEPS and run.watch.above_limit(test_loss):
        raise NanoQ4Error(f"training diverged by the end of epoch {epoch + 1}: test loss {test_loss:.4g} is "
                          f"above the divergence limit; {run.hint()}")
    if run.watch.at_chance(record["train_acc"], test_acc, after_warmup):
        raise NanoQ4Error(f"training diverged: epoch {epoch + 1} (step {step}) ends at chance level "
                          f"{after_warmup} steps after the warm-up (train accuracy {record['train_acc']:.1%}, "
                          f"test {test_acc:.1%}; always guessing the commonest class gives "
                          f"{run.watch.chance_test:.1%}); {run.hint()}")
    if run.changes:  # the first epoch finished under settings changed on resume says so
        record["changed_settings"] = {k: list(v) for k, v in run.changes.items()}
        run.changes = {}
    if epoch + 1 == cfg.epochs and cfg.tta != "none":  # the final model only: TTA costs a pass per view
        record["test_acc_tta"] = evaluate(run.model, dataset.x_test, dataset.y_test, dataset.mean, dataset.std,
                                          cfg.tta, group=group)[1]
        record["tta"] = cfg.tta
        record["epoch_time"] = time.perf_counter() - epoch_start
    run.history.append(record)
    run.save(epoch + 1, 0, None, when)
    group.on_root(runlog.write_metrics, run.metrics_path, cfg, run.history)
    group.on_root(runlog.plot_curves, run.history, run.out / "curves.png")
    run.say(runlog.epoch_line(record, cfg.epochs))


def average_weights(run):
    """--lookahead: the model becomes the slow copy, the averaged weights and statistics, for good ->
    the record {every, test accuracy before (the last trained weights)}. As airbench, the steps since
    the last sync (fewer than --lookahead) are left out. It runs in end_epoch after the last epoch,
    before the batch-norm re-estimation, the final evaluation and the checkpoint, so a resumed run
    neither repeats nor skips it; every rank holds the same slow copy (check_same covers it)."""
    dataset = run.dataset
    before = evaluate(run.model, dataset.x_test, dataset.y_test, dataset.mean, dataset.std, group=run.group)[1]
    run.lookahead.write_back()
    return dict(every=run.cfg.lookahead, test_acc_before=before)


def reestimate_statistics(run, epoch):
    """--bn-reestimate: the batch-norm statistics recomputed with the final weights over the first
    batches of the last epoch (its order and augmentation) -> the record {batches, test accuracy
    before}. It runs in end_epoch, before the final evaluation and the checkpoint, so a resumed run
    neither repeats nor skips it. Per-rank statistics (no --sync-bn) are averaged over the ranks."""
    cfg, dataset = run.cfg, run.dataset
    before = evaluate(run.model, dataset.x_test, dataset.y_test, dataset.mean, dataset.std, group=run.group)[1]
    run.loader.set_epoch(epoch)
    batches = (xb for xb, _ in itertools.islice(run.loader, cfg.bn_reestimate))
    count = nn.reestimate_batch_norm(run.model, batches)
    if not cfg.sync_bn:
        run.group.average([b for _, b in run.model.named_buffers()])
    return dict(batches=count, test_acc_before=before)


def finish(run, run_start):
    """Export the final model as a packed int4 file (rank 0), print the final report, return the history."""
    cfg, dataset = run.cfg, run.dataset
    model_path = run.out / "model.nq4"
    arch = dict(model=cfg.model, num_classes=dataset.num_classes, quantize=not cfg.fp32, bits=cfg.bits,
                per_channel=cfg.per_channel)

    def write_model_file():
        export.export_model(run.model, model_path, arch, dataset.classes, dataset.mean, dataset.std)
        return export.model_file_sizes(run.model, model_path)

    float_bytes, file_bytes = run.group.on_root(write_model_file)
    seconds = time.perf_counter() - run_start
    run.say(runlog.final_report(run.history, cfg, float_bytes, file_bytes, seconds, model_path))
    if profile.enabled:  # NANOQ4_PROFILE=1: where this process's time went, op by op (rank 0's of several)
        whose = "" if run.group.size == 1 else f", on {run.group.member} 0 of {run.group.size}"
        run.say(f"\nper-op time of this run{whose} (NANOQ4_PROFILE=1):\n{profile.table()}")
    return run.history


# ----------------------------------------------------------------------------- command line

def build_parser():
    """The command line, generated from TrainConfig: one flag per field with the field's help text,
    its default, choices and unit; plus --recipe. No flag has an argparse default: one that was not
    typed reads None, so --resume can take that setting from the checkpoint."""
    p = cli.ArgumentParser(
        prog="python -m nanoq4.train",
        description="Train a 4-bit quantized CNN on the CPU and export it as a packed int4 model file. Every flag "
                    "shows its default; README lists measured results with the commands that produced them.")
    paper = ", ".join(f"{k.replace('_', '-')} {'on' if v else 'off'}" if type(v) is bool else
                      f"{safeguards.flag_name(k)} {v}" for k, v in PAPER_RECIPE.items())
    p.add_argument("--recipe", choices=["paper"], help=f"paper: the paper's settings ({paper}); explicit flags "
                                                       "still override")
    for field in dataclasses.fields(TrainConfig):
        options = dict(field.metadata)
        help_text = options.pop("help")
        if options.pop("hidden", False):
            help_text = argparse.SUPPRESS
        flag = safeguards.flag_name(field.name)
        if field.type is bool and options.pop("both", False):
            p.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif field.type is bool:  # a switch: --fp32 turns an off-by-default setting on, --no-augment one off
            flag = "--no-" + flag[2:] if field.default else flag
            p.add_argument(flag, dest=field.name, action="store_const", const=not field.default, default=None,
                           help=help_text)
        else:
            if field.default is not None and help_text is not argparse.SUPPRESS:
                help_text = f"{help_text} (default {field.default})"
            p.add_argument(flag, dest=field.name, type=None if field.type is str else field.type, default=None,
                           help=help_text, **options)
    return p


def flag_values(argv=None):
    """{setting: value} of the flags typed on the command line (--recipe paper counts as typing
    its settings); what main passes to train as `given`."""
    args = build_parser().parse_args(argv)
    values = dict(PAPER_RECIPE) if args.recipe == "paper" else {}
    values.update((key, value) for key, value in vars(args).items() if key != "recipe" and value is not None)
    if values.get("resume") == "":
        if not values.get("out"):
            raise NanoQ4Error("--resume without a PATH needs --out DIR (the run folder holding checkpoint.ckpt)")
        values["resume"] = str(Path(values["out"]) / "checkpoint.ckpt")
    return values


def config_from_args(argv=None):
    """The TrainConfig of the command line alone (when resuming, train() fills in the rest)."""
    return TrainConfig(**flag_values(argv))


def main(argv=None):
    """The CLI: exit code 0, 2 on a refused input (one line on stderr), 130 on Ctrl-C, 143 on SIGTERM;
    the same under mpiexec, where rank 0 reports for all (distributed.run_command)."""
    def body():
        values = flag_values(argv)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # non-finite values are caught by name
            train(TrainConfig(**values), given=values)
        return 0

    return distributed.run_command(body, memory_hint="lower --batch-size")


class _CallableModule(types.ModuleType):
    """`nanoq4.train(cfg)` calls train(cfg): the package's public name `train` is this module (so that
    `python -m nanoq4.train` and `from nanoq4 import train` mean one thing), and calling it trains."""

    def __call__(self, cfg, given=None, group=None):
        return train(cfg, given, group)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
