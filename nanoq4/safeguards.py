"""Safeguards that keep a training run from being lost or wasted (train.py applies them):
the domain of every numeric setting, the run-folder guard (nothing is overwritten without
--overwrite), finiteness checks before a checkpoint is replaced, and the divergence watch
that stops a run whose loss explodes without becoming NaN."""
import math
import numbers
import os
import shlex
from pathlib import Path

import numpy as np

from . import quant
from .errors import NanoQ4Error

MAX_EPOCHS = 1_000_000  # keeps step counts far from float overflow in the schedules

# The domain of every numeric setting: (field, integer?, None allowed?, test, the domain in words).
NUMERIC_DOMAINS = (
    ("epochs", True, True, lambda v: 1 <= v <= MAX_EPOCHS, f"from 1 to {MAX_EPOCHS:,}"),
    ("batch_size", True, False, lambda v: v >= 2, ">= 2 (batch norm needs a batch)"),
    ("lr", False, True, lambda v: v > 0, "> 0"),
    ("momentum", False, False, lambda v: 0 <= v < 1, "in [0, 1)"),
    ("weight_decay", False, False, lambda v: v >= 0, ">= 0"),
    ("warmup_epochs", False, False, lambda v: v >= 0, ">= 0"),
    ("grad_clip", False, True, lambda v: v > 0, "> 0"),
    ("tanh_alpha", False, False, lambda v: v > 0, "> 0"),
    ("tanh_relative", False, True, lambda v: v > 0, "> 0"),
    ("bits", True, False, lambda v: quant.MIN_BITS <= v <= quant.MAX_BITS,
     f"from {quant.MIN_BITS} to {quant.MAX_BITS}"),
    ("label_smoothing", False, False, lambda v: 0 <= v < 1, "in [0, 1)"),
    ("dropout", False, False, lambda v: 0 <= v < 1, "in [0, 1)"),
    ("seed", True, False, lambda v: v >= 0, ">= 0"),
    ("bn_reestimate", True, False, lambda v: v >= 0, ">= 0 (0: off)"),
    ("lookahead", True, False, lambda v: v >= 0, ">= 0 (0: off)"),
    ("lookahead_decay", False, False, lambda v: 0 <= v < 1, "in [0, 1)"),
    ("bn_momentum", False, False, lambda v: 0 < v <= 1, "in (0, 1]"),
    ("threads", True, True, lambda v: 1 <= v <= available_cores(), "from 1 to {cores} (the cores available)"),
    ("workers", True, True, lambda v: v >= 1, ">= 1 (1: one process)"),
    ("max_steps_per_epoch", True, True, lambda v: v >= 1, ">= 1"),
    ("divergence_factor", False, False, lambda v: v == 0 or v > 1, "0 (no divergence stop) or > 1"),
)


def available_cores():
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def flag_name(setting):
    """The command-line flag of a TrainConfig field: batch_size -> --batch-size."""
    return "--" + setting.replace("_", "-")


def _finite(value):
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float range
        return False


def check_domains(cfg):
    """Refuse a numeric setting outside NUMERIC_DOMAINS (NaN and infinities included) as one
    line naming its flag."""
    for name, integer, optional, ok, domain in NUMERIC_DOMAINS:
        value = getattr(cfg, name)
        if value is None and optional:
            continue
        if integer:
            right_type = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        else:
            right_type = isinstance(value, numbers.Real) and not isinstance(value, bool) and _finite(value)
        if not (right_type and ok(value)):
            kind = "an integer" if integer else "a finite number"
            raise NanoQ4Error(f"{flag_name(name)} must be {kind} {domain.format(cores=available_cores())}, "
                              f"got {value!r}")


# ----------------------------------------------------------------------------- the run folder

RUN_FILES = ("checkpoint.ckpt", "metrics.jsonl", "model.nq4")  # a folder holding one of these holds a run
REPLACED_FILES = RUN_FILES + ("curves.png", "model.confusion.png")  # what --overwrite removes


def check_run_folder(out, cfg):
    """Refuse, before any work, an `out` that cannot become the run folder (a file, a path under a
    file, no permission) or that holds another run, unless cfg.overwrite (resuming the checkpoint
    that lies in `out` continues that run). -> True when a run there is to be replaced."""
    try:
        if out.exists() and not out.is_dir():
            raise NanoQ4Error(f"--out {out} is a file, not a folder; choose another --out")
        existing = out.absolute()
        while not existing.exists():  # the deepest part of the path that exists
            existing = existing.parent
        if not existing.is_dir():
            raise NanoQ4Error(f"--out {out} lies under {existing}, which is a file; choose another --out")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise NanoQ4Error(f"--out {out}: no permission to write in {existing}; choose another --out")
        held = [name for name in RUN_FILES if (out / name).exists()]
        in_place = bool(cfg.resume) and Path(cfg.resume).resolve().parent == out.resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
        raise NanoQ4Error(f"--out {out}: {getattr(e, 'strerror', None) or e}; choose another --out") from None
    if not held or in_place:
        return False
    if not cfg.overwrite:
        raise NanoQ4Error(f"--out {out} already holds a run ({', '.join(held)}); continue it with --resume "
                          f"{shlex.quote(str(out / 'checkpoint.ckpt'))}, choose another --out, or pass --overwrite "
                          f"to replace it")
    return True


def make_run_folder(out, replacing):
    """Create `out` (and remove the files of the run it replaces) just before the first write."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name in REPLACED_FILES if replacing else ():
            (out / name).unlink(missing_ok=True)
    except OSError as e:
        raise NanoQ4Error(f"cannot create run folder {out}: {e.strerror or e}; choose another --out") from None


# ----------------------------------------------------------------------------- finiteness

def all_finite(tree):
    """True when no float inside nested dicts/lists/tuples (arrays or numbers) is NaN or infinite."""
    if isinstance(tree, dict):
        return all(all_finite(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return all(all_finite(v) for v in tree)
    if isinstance(tree, np.ndarray):
        return tree.dtype.kind != "f" or bool(np.isfinite(tree).all())
    if isinstance(tree, (float, np.floating)):
        return math.isfinite(tree)
    return True


def check_resumable(path, checkpoint):
    """The checkpoint's training state, refused when it could not really resume this run."""
    needed = ("model", "optimizer", "rng", "history", "prev_codes", "epoch", "batch", "partial", "config")
    missing = [k for k in needed if k not in checkpoint]
    if missing or not isinstance(checkpoint["config"], dict):
        raise NanoQ4Error(f"checkpoint {path} does not hold a training state (missing "
                          f"{', '.join(missing) or 'config'}); it cannot be resumed")
    broken = [k for k in ("model", "optimizer", "history", "partial", "lookahead")
              if not all_finite(checkpoint.get(k))]
    if broken:
        raise NanoQ4Error(f"checkpoint {path} holds non-finite values ({', '.join(broken)}) and cannot be "
                          f"resumed; start again with a lower --lr")
    return checkpoint


def recovery_hint(last_good):
    """How to go on after a stop: which checkpoint really resumes, and a lower learning rate."""
    if last_good is None:
        return "no checkpoint was saved yet; start again with a lower --lr (or with --grad-clip)"
    return (f"the last good checkpoint {last_good} was kept; continue from it with a lower learning rate "
            f"(--resume {shlex.quote(str(last_good))} --lr LR --allow-changes) or start again with a lower --lr")


# ----------------------------------------------------------------------------- divergence

# DivergenceWatch thresholds (the loss factor is TrainConfig.divergence_factor):
DIVERGENCE_WINDOW, DIVERGENCE_HITS = 5, 3  # 3 of the last 5 steps above the limit: a stretch, not a spike
CHANCE_MIN_STEPS = 100                     # steps after the warm-up before chance accuracy counts
CHANCE_MARGIN = 0.02                       # accuracy within this of always guessing the commonest class


class DivergenceWatch:
    """Stops a run that diverged although its loss stayed finite (with 4-bit weights a huge
    learning rate otherwise ends "successfully" at chance accuracy), on either of two signs:
    (1) the training loss exceeded `factor` x its first value (the untrained network's, at least
        ln(classes)) in DIVERGENCE_HITS of the last DIVERGENCE_WINDOW steps;
    (2) CHANCE_MIN_STEPS or more after the warm-up, an epoch's train and test accuracy are both
        within CHANCE_MARGIN of always guessing the most frequent class.
    A healthy run's loss starts near ln(classes) (2.3 for CIFAR-10) and falls, far from 4x; factor
    0 turns both off. The state (first loss, recent losses) is saved in checkpoints. A step that
    blows the weights up is only seen in the next step's loss: a checkpoint saved in between
    is finite, and is what resumes."""

    def __init__(self, factor, num_classes, chance_train, chance_test, state=None):
        self.factor, self.floor = factor, math.log(max(num_classes, 2))
        self.chance_train, self.chance_test = chance_train, chance_test
        state = state or {}
        self.first, self.recent = state.get("first"), list(state.get("recent", []))

    def state(self):
        return {"first": self.first, "recent": list(self.recent)}

    def _limit(self):
        return self.factor * max(self.first, self.floor)

    def loss_diverged(self, loss):
        """Record one training loss; True when rule (1) fires."""
        if self.first is None:
            self.first = loss
        self.recent = (self.recent + [loss])[-DIVERGENCE_WINDOW:]
        return self.factor > 0 and sum(v > self._limit() for v in self.recent) >= DIVERGENCE_HITS

    def loss_above_limit(self):
        """True while one of the recent training losses is above the limit: a checkpoint saved
        now might already hold a diverging run, so the last one is kept until this clears."""
        return self.factor > 0 and self.first is not None and any(v > self._limit() for v in self.recent)

    def loss_report(self):
        return (f"the training loss was above {self._limit():.3g} ({self.factor:g}x its first value "
                f"{self.first:.4g}) in {sum(v > self._limit() for v in self.recent)} of the last "
                f"{len(self.recent)} steps (now {self.recent[-1]:.4g})")

    def above_limit(self, loss):
        """True when `loss` (e.g. an epoch's test loss, on the weights a checkpoint would hold) is
        above the limit."""
        return self.factor > 0 and self.first is not None and loss > self._limit()

    def at_chance(self, train_acc, test_acc, steps_after_warmup):
        """True when rule (2) fires for an epoch with these accuracies. Only for datasets whose
        commonest class is under half of the images: on a very imbalanced set a healthy run can sit
        near the majority share."""
        return (self.factor > 0 and steps_after_warmup >= CHANCE_MIN_STEPS and self.chance_train < 0.5
                and train_acc <= self.chance_train + CHANCE_MARGIN
                and test_acc <= self.chance_test + CHANCE_MARGIN)


def majority_share(labels):
    """The accuracy of always guessing the most frequent label: chance level."""
    return float(np.bincount(labels).max() / len(labels)) if len(labels) else 0.0
