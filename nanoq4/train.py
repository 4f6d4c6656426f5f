"""The training program: `python -m nanoq4.train --dataset cifar10`, or `train(TrainConfig(...))`.

One epoch = shuffle/augment (data.BatchLoader) -> forward -> cross-entropy -> backward ->
optional gradient-norm clip -> SGD/AdamW step -> tanh soft clip of the quantized weights.
After each epoch: test accuracy, grid statistics of every quantized layer, a metrics.jsonl
record, a curve PNG (if matplotlib is installed) and an atomic checkpoint. The final model is
also evaluated with test-time augmentation (--tta). At the end the model is exported as a packed
int4 file (model.nq4) and the FINAL epoch's test accuracy is reported, with and without TTA (the
best epoch is shown too, labelled as selected on the test set).

Never losing a run: every setting is checked before any work starts; a folder that holds a run
is not overwritten without --overwrite; a checkpoint is only replaced by one whose weights,
optimizer state and metrics are finite; a diverging run stops and keeps its last good
checkpoint; --resume continues with the checkpoint's own settings and refuses differing ones
unless --allow-changes says so.

Several machines: `mpiexec -n N python -m nanoq4.train ...` runs the same loop on N ranks, each on
its shard of the global batch, with one gradient Allreduce per step (distributed.py). Rank 0
alone prints and writes files; without mpiexec nothing of this runs.
"""
import argparse
import dataclasses
import json
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np

from . import blas, cli, data, distributed, export, models, nn, ops, optim, quant, safeguards
from .tta import TTA_MODES, predict_logits
from .errors import NanoQ4Error
from .tensor import Tensor, no_grad

# 13 epochs of 196 steps of 256 images fit the 90-minute budget on 2 cores (README lists the
# measured time and accuracy with the commands).
DEFAULT_EPOCHS = 13
EVAL_BATCH = 250  # images per evaluation forward; bounds the im2col buffer of the first layers


@dataclass
class TrainConfig:
    """Every default in one place. Units in comments."""
    dataset: str = "cifar10"            # cifar10 | cifar100 | synthetic | folder:PATH
    model: str = "vgg4bit"              # vgg4bit | simpleresnet4bit
    epochs: int = DEFAULT_EPOCHS        # passes over the training set
    batch_size: int = 256               # images per step, over all ranks under mpiexec (256 runs ~10% more images/s than 128 on 2 cores)
    optimizer: str = "sgd"              # sgd (momentum 0.9, Nesterov) | adamw
    lr: float = None                    # peak learning rate; None: 0.1 for sgd, 1e-3 for adamw
    momentum: float = 0.9               # SGD momentum
    weight_decay: float = 5e-4          # on conv/linear weights only (not biases, not BN)
    schedule: str = "onecycle"          # onecycle (warm-up, linear to 0) | cosine (warm-up, cosine to 0) | constant
    warmup_epochs: float = 1.0          # linear warm-up length, in epochs
    grad_clip: float = None             # max global gradient L2 norm; None: no clipping
    tanh_alpha: float = 3.0             # tanh soft clip W <- a*tanh(W/a) after each step (paper: 3)
    tanh_relative: float = None         # if set, a = k * RMS(W) per tensor instead of the absolute a
    tanh_clip: bool = True              # False: the paper's "no tanh clip" ablation
    bits: int = 4                       # weight bit width, 2..8 (4: levels -7..7)
    per_channel: bool = True            # one scale per output channel (False: one per layer, the paper's)
    fp32: bool = False                  # no quantization: the float32 baseline
    label_smoothing: float = 0.2        # cross-entropy target smoothing (paper: 0)
    dropout: float = 0.2                # dropout before the classifier (paper: 0.5, too strong for short runs)
    tta: str = "flip-translate"         # test-time augmentation of the final evaluation: none | flip | flip-translate
    augment: bool = True                # random crop (pad 4) + horizontal flip
    coarse: bool = False                # CIFAR-100 coarse (20) labels
    seed: int = 0                       # weights, data order, augmentation, dropout
    data_dir: str = None                # else $NANOQ4_DATA, else ./data
    download: bool = True               # fetch CIFAR if missing
    out: str = None                     # run folder; None: runs/<time>-<dataset>-<model>
    resume: str = None                  # checkpoint to continue from
    threads: int = None                 # Numba and BLAS threads per process (None: all cores; under mpiexec each rank's share)
    sync_bn: bool = False               # under mpiexec: batch-norm statistics of the global batch (default: each rank's own, as DDP)
    progress: bool = True               # per-epoch progress bar
    max_steps_per_epoch: int = None     # for smoke tests: cut each epoch short
    overwrite: bool = False             # replace a run already in `out` (else refused: data loss)
    allow_changes: bool = False         # resume with settings that differ from the checkpoint's (else refused)
    divergence_factor: float = 4.0      # stop if the loss stays above this x its first value (safeguards.py); 0: off

    def resolved_lr(self):
        return self.lr if self.lr is not None else (0.1 if self.optimizer == "sgd" else 1e-3)


PAPER_RECIPE = dict(optimizer="adamw", lr=1e-3, weight_decay=5e-4, grad_clip=0.5, tanh_alpha=3.0,
                    schedule="cosine", warmup_epochs=0.0, epochs=150, batch_size=128, augment=True,
                    per_channel=False, label_smoothing=0.0, dropout=0.5, tta="none")

# Resuming: every setting comes from the checkpoint's config unless given (typed on the command
# line). RESUME_KEYS must then agree with the checkpoint even with --allow-changes (the saved state
# or the data order would not fit); RESUME_FREE may differ freely (they do not change the training);
# RUN_ENVIRONMENT describes this process, not the run, and is never taken from the checkpoint; any
# other setting (lr, schedule, augmentation, ...) may differ only with --allow-changes.
RESUME_KEYS = ("dataset", "model", "bits", "per_channel", "fp32", "coarse", "batch_size", "seed", "epochs",
               "optimizer", "dropout", "max_steps_per_epoch")
RESUME_FREE = ("data_dir", "download", "progress", "divergence_factor", "tta")
# Settings that checkpoints written before they existed (or before a default changed) were trained
# with: such a checkpoint's config lacks "dropout", and its lr None meant the old sgd default.
LEGACY_SETTINGS = dict(dropout=0.5, tta="none")
LEGACY_SGD_LR = 0.05
RUN_ENVIRONMENT = ("out", "resume", "threads", "overwrite", "allow_changes")


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
    data.check_dataset_spec(cfg.dataset, cfg.coarse)
    for name in ("out", "resume", "data_dir"):
        value = getattr(cfg, name)
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise NanoQ4Error(f"{safeguards.flag_name(name)} must be a path, got {value!r}")
    if cfg.out is not None and not str(cfg.out).strip():
        raise NanoQ4Error("--out is empty; name the run folder (or leave --out out for a new one under runs/)")


def resumed_config(cfg, saved, given=None):
    """The config a resumed run continues with: the checkpoint's `saved` config (a dict), except
    for the RUN_ENVIRONMENT and the settings named in `given` (None: all of them), taken from cfg.
    Given settings that differ from the checkpoint's are refused, naming them: RESUME_KEYS always,
    the others unless cfg.allow_changes. -> (config, {name: (checkpoint's, new)} allowed changes)."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    given = set(names if given is None else given)
    if "dropout" not in saved:  # written before this setting existed: the values it trained with
        saved = {**LEGACY_SETTINGS, **saved}
        if saved.get("lr") is None and saved.get("optimizer", "sgd") == "sgd":
            saved["lr"] = LEGACY_SGD_LR
    known = [k for k in names if k in saved and k not in RUN_ENVIRONMENT]
    new = dataclasses.replace(cfg, **{k: saved[k] for k in known if k not in given})
    old = dataclasses.replace(new, **{k: saved[k] for k in known})

    def setting(c, k):
        return c.resolved_lr() if k == "lr" else getattr(c, k)

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
    warmup = int(round(min(cfg.warmup_epochs, cfg.epochs) * steps_per_epoch))
    return min(warmup, int(0.3 * cfg.epochs * steps_per_epoch))


def make_schedule(cfg, steps_per_epoch):
    total = cfg.epochs * steps_per_epoch
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


def format_grid(stats):
    if not stats:
        return "grid: float32"
    used = [s["levels_used"] for s in stats]
    flips = [s["flip_rate"] for s in stats if s["flip_rate"] is not None]
    flip = f" flips {np.mean(flips):.2%}" if flips else ""
    return (f"levels {min(used)}/{np.mean(used):.1f}/{max(used)} of {stats[0]['levels_total']} "
            f"at±max {np.mean([s['frac_at_max'] for s in stats]):.2%}{flip}")


def plot_curves(history, path):
    """Loss and accuracy curves as a PNG, when matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(epochs, [h["train_loss"] for h in history], label="train")
    a.plot(epochs, [h["test_loss"] for h in history], label="test")
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.legend()
    b.plot(epochs, [h["train_acc"] for h in history], label="train")
    b.plot(epochs, [h["test_acc"] for h in history], label="test")
    b.set_xlabel("epoch"), b.set_ylabel("accuracy"), b.legend()
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return True


def write_metrics(path, cfg, history):
    """metrics.jsonl: the config, then one record per finished epoch (rewritten atomically)."""
    lines = [json.dumps({"config": dataclasses.asdict(cfg)})] + [json.dumps(h) for h in history]
    export.atomic_write_bytes(path, [("\n".join(lines) + "\n").encode()])


def set_threads(threads):
    if not threads:
        return
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    blas.set_threads(threads)


def _default_out(cfg):
    """runs/<time>-<dataset>-<model>, with a -2, -3, ... suffix if a run started in the same second."""
    name = cfg.dataset.replace("folder:", "folder-").replace("/", "_").replace(":", "_")
    base = Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}-{cfg.model}"
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def log(msg):
    print(msg, flush=True)


class _StopRequest:
    """While active, Ctrl-C (SIGINT) and SIGTERM only set a flag (and remember which signal, for
    the exit code) that the loop checks between steps, so the checkpoint it then saves is
    consistent. A second signal stops at once."""

    def __init__(self):
        self.requested, self.signum = False, None
        self.previous = {}

    def __enter__(self):
        import threading
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise cli.Interrupted(signum)
        self.requested, self.signum = True, signum

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------- the loop

def _read_checkpoint(path):
    """The training state saved at `path`, refused when it could not resume a run."""
    return safeguards.check_resumable(path, export.load_checkpoint(path))


def _choose_run_folder(cfg):
    """(run folder, whether a run in it is replaced): --out, else the resumed checkpoint's folder,
    else a new one under runs/; refused as safeguards.check_run_folder says."""
    out = Path(cfg.out) if cfg.out else (Path(cfg.resume).parent if cfg.resume else _default_out(cfg))
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


def _silent(message):
    pass


def train(cfg, given=None, group=None):
    """Train per `cfg` and return the history (one dict per epoch). Writes into cfg.out.

    With cfg.resume the run continues from that checkpoint: settings not named in `given` (the
    CLI passes the flags typed; None: all) come from the checkpoint's config, given ones that
    differ from it are refused unless cfg.allow_changes (see resumed_config).

    Under mpiexec (`group`: distributed.world() unless given) every rank runs this on its shard of
    each global batch (distributed.py); all return the history, rank 0 alone prints and writes."""
    group = group or distributed.world()
    say = log if group.is_root else _silent
    checkpoint, changes = None, {}
    if cfg.resume:
        safeguards.check_domains(cfg)  # the given values; the others (dataset, ...) come from the checkpoint
        checkpoint = group.on_root(_read_checkpoint, cfg.resume)  # read by rank 0, handed to every rank
        cfg, changes = resumed_config(cfg, checkpoint["config"], given)
    validate(cfg)  # on resume, what came from the checkpoint must fit today's domains too
    distributed.check_batch_split(cfg.batch_size, group.size, cfg.sync_bn)
    cfg.lr = cfg.resolved_lr()  # saved as a number: a later change of the default cannot change a resumed run
    out, replacing = group.on_root(_choose_run_folder, cfg)
    set_threads(cfg.threads or group.default_threads())
    dataset = group.in_turns(lambda: data.load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download,
                                                       coarse=cfg.coarse))
    if dataset.num_classes < 2:
        raise NanoQ4Error(f"{dataset.name} has {dataset.num_classes} class ({dataset.classes[0]}); a classifier "
                          f"needs at least 2")

    nn.manual_seed(cfg.seed)
    model = models.build_model(cfg.model, dataset.num_classes, quantize=not cfg.fp32, bits=cfg.bits,
                               per_channel=cfg.per_channel, dropout=cfg.dropout)
    if group.size > 1:
        nn.manual_seed(distributed.rank_seed(cfg.seed, group.rank, group.size))  # each rank's own dropout masks
        if cfg.sync_bn:
            group.sync_batch_norm(model)
    opt = make_optimizer(model, cfg)
    loader = data.BatchLoader(dataset.x_train, dataset.y_train, cfg.batch_size, dataset.mean, dataset.std,
                              augment=cfg.augment, shuffle=True, seed=cfg.seed, prefetch=True,
                              shard=group.rank, shards=group.size)
    steps_per_epoch = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
    schedule = make_schedule(cfg, steps_per_epoch)
    warmup = warmup_steps(cfg, steps_per_epoch)
    watch = safeguards.DivergenceWatch(cfg.divergence_factor, dataset.num_classes,
                                       safeguards.majority_share(dataset.y_train),
                                       safeguards.majority_share(dataset.y_test),
                                       checkpoint.get("divergence") if checkpoint else None)

    history, prev_codes, start_epoch, start_batch, partial, rng_note = [], {}, 0, 0, None, None
    if checkpoint is not None:
        try:
            model.load_state_dict(checkpoint["model"])
            opt.load_state_dict(checkpoint["optimizer"])
            rng_state, rng_note = _resumed_rng_state(checkpoint, cfg, group)
            nn.set_rng_state(rng_state)
        except (NanoQ4Error, ValueError, TypeError, KeyError) as e:
            raise NanoQ4Error(f"checkpoint {cfg.resume} does not fit this run ({e})") from None
        history, prev_codes = checkpoint["history"], checkpoint["prev_codes"]
        start_epoch, start_batch, partial = checkpoint["epoch"], checkpoint["batch"], checkpoint["partial"]
    group.broadcast_model(model)  # rank 0's weights and batch-norm statistics on every rank
    # Several ranks: the one Allreduce per step (with per-rank batch norm it averages the running statistics too)
    gradient_sum = None if group.size == 1 else group.gradient_sum(
        model.parameters(), [] if cfg.sync_bn else [b for _, b in model.named_buffers()])
    group.on_root(safeguards.make_run_folder, out, replacing)  # only now: every refusal above leaves no folder behind
    cfg.out = str(out)
    ckpt_path, metrics_path = out / "checkpoint.ckpt", out / "metrics.jsonl"
    last_good = cfg.resume  # a checkpoint that really resumes this run (None: none yet)
    if checkpoint is not None:
        say(f"resumed {cfg.resume} at epoch {start_epoch + 1}, batch {start_batch}")
        if changes:
            say("settings changed on resume (--allow-changes): " +
                ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()))
        if rng_note:
            say(rng_note)
    else:
        group.on_root(write_metrics, metrics_path, cfg, history)
        grid_summary(model, cfg, prev_codes)  # flip rates of epoch 1 are relative to the initial weights

    def check_finite(when, **parts):
        broken = [name.replace("_", " ") for name, part in parts.items() if not safeguards.all_finite(part)]
        if broken:
            raise NanoQ4Error(f"the {' and the '.join(broken)} became non-finite {when}; "
                              f"{safeguards.recovery_hint(last_good)}")

    def check_loss(loss_value, epoch, k):
        """Stop on a non-finite or diverging training loss (under mpiexec: the global batch's)."""
        if not math.isfinite(loss_value):
            raise NanoQ4Error(f"loss became {loss_value} at epoch {epoch + 1} step {k + 1}; "
                              f"{safeguards.recovery_hint(last_good)}")
        if watch.loss_diverged(loss_value):
            raise NanoQ4Error(f"training diverged at epoch {epoch + 1} step {k + 1}: "
                              f"{watch.loss_report()}; {safeguards.recovery_hint(last_good)}")

    def save(epoch, batch, running, when):
        """Write the checkpoint -> True. Anything non-finite in it stops the run (NanoQ4Error) and
        a loss above the divergence limit skips the write (False): the last good one stays.
        Under mpiexec every rank calls this at the same point; rank 0 writes, with every rank's
        dropout generator state."""
        nonlocal last_good
        state = dict(model=model.state_dict(), optimizer=opt.state_dict(), rng=nn.get_rng_state(), history=history,
                     prev_codes=prev_codes, epoch=epoch, batch=batch, partial=running, divergence=watch.state(),
                     config=dataclasses.asdict(cfg))
        check_finite(when, weights=state["model"], optimizer_state=state["optimizer"], metrics=history,
                     running_loss=running)
        if watch.loss_above_limit():
            say(f"checkpoint not updated {when}: {watch.loss_report()}; kept {last_good or 'none'}")
            return False
        if group.size > 1:
            state["rank_rngs"] = group.gather(state["rng"])
        group.on_root(export.save_checkpoint, ckpt_path, **state)
        last_good = ckpt_path
        return True

    ranks = "" if group.size == 1 else (
        f"; {group.size} ranks of {cfg.batch_size // group.size} images and {numba.get_num_threads()} thread(s) "
        f"each, {'global' if cfg.sync_bn else 'per-rank'} batch-norm statistics")
    say(f"nanoq4: {cfg.model} ({model.num_parameters():,} parameters, "
        f"{'float32' if cfg.fp32 else f'{cfg.bits}-bit weights'}) on {dataset.name}: "
        f"{len(dataset.y_train):,} train / {len(dataset.y_test):,} test images, {cfg.epochs} epochs of "
        f"{steps_per_epoch} steps, {cfg.optimizer} lr {cfg.resolved_lr()} ({cfg.schedule}){ranks}; output {out}")
    command = "python -m nanoq4.train" if group.size == 1 else f"mpiexec -n {group.size} python -m nanoq4.train"
    run_start = time.perf_counter()
    with _StopRequest() as stop:
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            loader.set_epoch(epoch)
            loss_sum, correct, seen = partial if partial else (0.0, 0, 0)
            first_batch, partial, start_batch = start_batch, None, 0
            epoch_start = time.perf_counter()
            bar = _progress(steps_per_epoch, first_batch, epoch, cfg, shown=group.is_root)
            step = epoch * steps_per_epoch + first_batch
            for k, (xb, yb) in enumerate(loader):
                if k >= steps_per_epoch:
                    break
                if k < first_batch:
                    continue
                signum = group.stop_signal(stop)  # under mpiexec: a signal to any rank stops all here
                if signum:
                    bar.close()
                    saved = save(epoch, k, (loss_sum, correct, seen), f"before epoch {epoch + 1} step {k + 1}")
                    say(f"\ninterrupted: {'saved' if saved else 'kept'} {last_good}; continue with: {command} "
                        f"--resume {shlex.quote(str(last_good))}" if last_good else
                        "\ninterrupted before any checkpoint could be saved")
                    raise cli.Interrupted(signum)
                opt.lr = schedule(step)
                try:
                    logits = model(Tensor(xb))
                    loss = ops.cross_entropy(logits, yb, cfg.label_smoothing)
                except NanoQ4Error as e:  # quantizing weights that the previous step made non-finite
                    raise NanoQ4Error(f"{e} (epoch {epoch + 1} step {k + 1}); "
                                      f"{safeguards.recovery_hint(last_good)}") from None
                loss_value = float(loss.data)
                batch_correct = int((logits.data.argmax(axis=1) == yb).sum())
                if gradient_sum is None:  # one process: a broken loss stops the run before backward
                    check_loss(loss_value, epoch, k)
                    opt.zero_grad()
                    loss.backward()
                else:  # each rank backpropagates its share of the global batch's mean loss, then one Allreduce
                    share = len(yb) / loader.global_batch_len(k)
                    opt.zero_grad()
                    loss.backward(np.float32(share))
                    loss_value, batch_correct = gradient_sum(loss_value, batch_correct, share)
                    check_loss(loss_value, epoch, k)
                if cfg.grad_clip:
                    optim.clip_grad_norm(opt.parameters(), cfg.grad_clip)
                opt.step()
                step += 1
                images = loader.global_batch_len(k)
                loss_sum += loss_value * images
                correct += batch_correct
                seen += images
                bar.update(images, loss_sum / seen, correct / seen)
            bar.close()
            when = f"during epoch {epoch + 1} (by its step {steps_per_epoch})"
            check_finite(when, weights=model.state_dict(), optimizer_state=opt.state_dict())
            group.check_same((model.state_dict(), opt.state), f"by the end of epoch {epoch + 1}",
                             f"resume from {last_good}" if last_good else "no checkpoint was saved yet")
            train_time = time.perf_counter() - epoch_start
            test_loss, test_acc, _ = evaluate(model, dataset.x_test, dataset.y_test, dataset.mean, dataset.std,
                                              group=group)
            stats = grid_summary(model, cfg, prev_codes)
            record = dict(epoch=epoch + 1, train_loss=loss_sum / max(seen, 1), train_acc=correct / max(seen, 1),
                          test_loss=test_loss, test_acc=test_acc, lr=opt.lr, epoch_time=time.perf_counter() - epoch_start,
                          train_images_per_s=seen / train_time, grid=stats)
            # the epoch's last steps blew the weights up (after the warm-up: a barely trained network's
            # batch-norm statistics can legitimately give a large test loss): keep the last checkpoint
            if step - warmup >= safeguards.CHANCE_MIN_STEPS and watch.above_limit(test_loss):
                raise NanoQ4Error(f"training diverged by the end of epoch {epoch + 1}: test loss {test_loss:.4g} is "
                                  f"above the divergence limit; {safeguards.recovery_hint(last_good)}")
            if watch.at_chance(record["train_acc"], test_acc, step - warmup):
                raise NanoQ4Error(f"training diverged: epoch {epoch + 1} (step {step}) ends at chance level "
                                  f"{step - warmup} steps after the warm-up (train accuracy "
                                  f"{record['train_acc']:.1%}, test {test_acc:.1%}; always guessing the commonest "
                                  f"class gives {watch.chance_test:.1%}); {safeguards.recovery_hint(last_good)}")
            if changes:  # the first epoch finished under settings changed on resume says so
                record["changed_settings"] = {k: list(v) for k, v in changes.items()}
                changes = {}
            if epoch + 1 == cfg.epochs and cfg.tta != "none":  # the final model only: TTA costs a pass per view
                record["test_acc_tta"] = evaluate(model, dataset.x_test, dataset.y_test, dataset.mean, dataset.std,
                                                  cfg.tta, group=group)[1]
                record["tta"] = cfg.tta
                record["epoch_time"] = time.perf_counter() - epoch_start
            history.append(record)
            save(epoch + 1, 0, None, when)
            group.on_root(write_metrics, metrics_path, cfg, history)
            group.on_root(plot_curves, history, out / "curves.png")
            say(f"epoch {epoch + 1}/{cfg.epochs}: train loss {record['train_loss']:.4f} acc {record['train_acc']:.2%} | "
                f"test loss {test_loss:.4f} acc {test_acc:.2%} | lr {opt.lr:.2e} | {format_grid(stats)} | "
                f"{record['epoch_time']:.0f}s ({record['train_images_per_s']:.0f} img/s)")
        signum = group.stop_signal(stop)
        if signum:  # a signal during the final evaluation: the checkpoint is complete, resuming exports
            say(f"\ninterrupted: saved {last_good}; finish with: {command} --resume {shlex.quote(str(last_good))}")
            raise cli.Interrupted(signum)

    model_path = out / "model.nq4"
    arch = dict(model=cfg.model, num_classes=dataset.num_classes, quantize=not cfg.fp32, bits=cfg.bits,
                per_channel=cfg.per_channel)

    def write_model_file():
        export.export_model(model, model_path, arch, dataset.classes, dataset.mean, dataset.std)
        return export.model_file_sizes(model, model_path)

    float_bytes, file_bytes = group.on_root(write_model_file)
    final = history[-1]
    best = max(history, key=lambda h: h["test_acc"])
    final_line = f"FINAL test accuracy (epoch {final['epoch']}): {final['test_acc']:.2%}"
    if "test_acc_tta" in final:
        final_line = (f"FINAL test accuracy (epoch {final['epoch']}): {final['test_acc_tta']:.2%} with test-time "
                      f"augmentation {final.get('tta', cfg.tta)} ({final['test_acc']:.2%} without)")
    say(f"{final_line}\n"
        f"best epoch {best['epoch']}: {best['test_acc']:.2%} (selected on the test set: not an unbiased estimate)\n"
        f"model size: float32 {float_bytes / 2**20:.2f} MiB, int{cfg.bits} file {file_bytes / 2**20:.2f} MiB "
        f"(x{float_bytes / file_bytes:.1f} smaller)\n"
        f"time this run: {time.perf_counter() - run_start:.0f}s\n"
        f"model file: {model_path}")
    return history


class _progress:
    """tqdm bar with images/s, running loss and accuracy; a silent stand-in when disabled (or
    `shown` False: ranks other than 0)."""

    def __init__(self, steps, done, epoch, cfg, shown=True):
        self.bar = None
        if cfg.progress and shown:
            from tqdm import tqdm
            self.bar = tqdm(total=steps * cfg.batch_size, initial=done * cfg.batch_size, unit="img", unit_scale=True,
                            desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True,
                            mininterval=0.5)

    def update(self, n, loss, acc):
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix_str(f"loss {loss:.3f} acc {acc:.1%}", refresh=False)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- command line

def build_parser():
    p = cli.ArgumentParser(
        prog="python -m nanoq4.train",
        description="Train a 4-bit quantized CNN on the CPU and export it as a packed int4 model file. "
                    f"Defaults: VGG4bit on CIFAR-10, {DEFAULT_EPOCHS} epochs of SGD with Nesterov momentum and a "
                    "one-cycle schedule, batch 256, per-channel 4-bit scales, label smoothing 0.2, dropout 0.2, "
                    "flip-translate test-time augmentation of the final model (README lists measured results).")
    d = TrainConfig()
    # No argparse defaults: a flag that was not typed is None, so --resume can take it from the checkpoint.
    p.add_argument("--dataset", help=f"cifar10, cifar100, synthetic or folder:PATH (default {d.dataset})")
    p.add_argument("--model", help=f"vgg4bit or simpleresnet4bit (default {d.model})")
    p.add_argument("--recipe", choices=["paper"], help="paper: the paper's settings (AdamW lr 1e-3, weight decay "
                   "5e-4, grad clip 0.5, tanh a=3, cosine annealing, 150 epochs, batch 128, crop+flip); explicit "
                   "flags still override")
    p.add_argument("--epochs", type=int, help=f"passes over the training set (default {d.epochs})")
    p.add_argument("--batch-size", type=int, help=f"images per step (default {d.batch_size}); under mpiexec the global "
                   "batch, split evenly across the ranks")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], help="default sgd (momentum 0.9, Nesterov)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 0.1 for sgd, 1e-3 for adamw)")
    p.add_argument("--schedule", choices=["onecycle", "cosine", "constant"],
                   help="learning-rate schedule after the warm-up, decaying to 0 (default onecycle)")
    p.add_argument("--warmup-epochs", type=float, help=f"linear warm-up length in epochs (default {d.warmup_epochs})")
    p.add_argument("--weight-decay", type=float, help=f"on conv/linear weights only (default {d.weight_decay})")
    p.add_argument("--grad-clip", type=float, help="max global gradient L2 norm (default: no clipping)")
    p.add_argument("--tanh-alpha", type=float, help=f"tanh soft clip a in W <- a*tanh(W/a) (default {d.tanh_alpha})")
    p.add_argument("--tanh-relative", type=float, help="use a = K * RMS(W) per tensor instead of an absolute a")
    p.add_argument("--no-tanh-clip", action="store_true", help="disable the tanh soft clip (paper ablation)")
    p.add_argument("--bits", type=int, help=f"weight bit width 2..8 (default {d.bits}: levels -7..7)")
    p.add_argument("--per-channel", action=argparse.BooleanOptionalAction, default=None,
                   help="one 4-bit scale per output channel; --no-per-channel: one per layer, as the paper "
                        f"(default {'per channel' if d.per_channel else 'per layer'})")
    p.add_argument("--fp32", action="store_true", help="no quantization: the float32 baseline")
    p.add_argument("--label-smoothing", type=float, help=f"cross-entropy label smoothing (default {d.label_smoothing})")
    p.add_argument("--dropout", type=float, help=f"dropout probability before the classifier (default {d.dropout}; "
                   "the paper's 0.5 with --recipe paper)")
    p.add_argument("--tta", choices=TTA_MODES, help=f"test-time augmentation of the final evaluation: none, flip "
                   f"(2 views) or flip-translate (6 views); the plain accuracy is always reported too (default {d.tta})")
    p.add_argument("--no-augment", action="store_true", help="disable random crop + flip")
    p.add_argument("--coarse", action="store_true", help="CIFAR-100: the 20 coarse labels")
    p.add_argument("--seed", type=int, help=f"random seed (default {d.seed})")
    p.add_argument("--data-dir", help="data folder (default $NANOQ4_DATA, else ./data)")
    p.add_argument("--no-download", action="store_true", help="never download missing data")
    p.add_argument("--out", help="run folder (default a new folder under runs/); a folder that already holds a run "
                   "is refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (its checkpoint, metrics and model file are deleted)")
    p.add_argument("--resume", nargs="?", const="", metavar="PATH",
                   help="continue from a checkpoint (without PATH: OUT/checkpoint.ckpt, needs --out); settings not "
                        "given come from the checkpoint, given ones that differ from it are refused")
    fixed = ", ".join(safeguards.flag_name(k) for k in RESUME_KEYS if k != "max_steps_per_epoch")
    p.add_argument("--allow-changes", action="store_true",
                   help="with --resume: train on with given settings that differ from the checkpoint's (learning "
                        f"rate, schedule, augmentation, ...); {fixed} never change within a run")
    p.add_argument("--divergence-factor", type=float,
                   help=f"stop, keeping the last good checkpoint, when {safeguards.DIVERGENCE_HITS} of the last "
                        f"{safeguards.DIVERGENCE_WINDOW} training losses (or an epoch's test loss) exceed this x "
                        f"the first training loss (at least ln(classes)), or when the "
                        f"accuracy is still at chance level {safeguards.CHANCE_MIN_STEPS} steps after the warm-up; "
                        f"0: never (default {d.divergence_factor})")
    p.add_argument("--threads", type=int, help="CPU threads for Numba and BLAS, 1 to the number of cores "
                   "(default: all cores; under mpiexec, per rank: the machine's cores divided among its ranks)")
    p.add_argument("--sync-bn", action="store_true", help="under mpiexec: batch-norm statistics over the global "
                   "batch (N ranks then compute what one process computes); default: each rank's own, as PyTorch DDP")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--max-steps-per-epoch", type=int, help=argparse.SUPPRESS)
    return p


def flag_values(argv=None):
    """{setting: value} of the flags typed on the command line (--recipe paper counts as typing
    its settings); what main passes to train as `given`."""
    args = build_parser().parse_args(argv)
    values = dict(PAPER_RECIPE) if args.recipe == "paper" else {}
    flag_names = {"no_augment": ("augment", False), "no_tanh_clip": ("tanh_clip", False),
                  "no_download": ("download", False), "no_progress": ("progress", False)}
    for key, value in vars(args).items():
        # store_true flags are False when absent; --per-channel/--no-per-channel is None when absent
        if key == "recipe" or value is None or (value is False and key != "per_channel"):
            continue
        if key in flag_names:
            key, value = flag_names[key]
        values[key] = value
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


if __name__ == "__main__":
    sys.exit(main())
