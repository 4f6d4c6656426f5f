"""The run folder's bookkeeping, apart from the training itself: the progress bar, Ctrl-C / SIGTERM
as a stop request between steps, metrics.jsonl, curves.png and the lines the trainer prints.

A run folder holds metrics.jsonl (the config, then one record per finished epoch), curves.png (with
matplotlib), checkpoint.ckpt and model.nq4 (export.py writes those two). train.py decides what to
write and when; this module only knows how.
"""
import dataclasses
import json
import signal
import threading
import time
from pathlib import Path

import numpy as np

from . import cli, export


def log(message):
    """Print a line of the run's report at once (a progress bar or a pipe may buffer otherwise)."""
    print(message, flush=True)


def silent(message):
    """What ranks other than 0 print: nothing."""


def default_out(cfg):
    """runs/<time>-<dataset>-<model>, with a -2, -3, ... suffix if a run started in the same second."""
    name = cfg.dataset.replace("folder:", "folder-").replace("/", "_").replace(":", "_")
    base = Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}-{cfg.model}"
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


class Progress:
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


class StopRequest:
    """While active, Ctrl-C (SIGINT) and SIGTERM only set a flag (and remember which signal, for
    the exit code) that the loop checks between steps, so the checkpoint it then saves is
    consistent. A second signal stops at once."""

    def __init__(self):
        self.requested, self.signum = False, None
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # only it may set handlers
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


# ----------------------------------------------------------------------------- files

def write_metrics(path, cfg, history):
    """metrics.jsonl: the config, then one record per finished epoch (rewritten atomically)."""
    lines = [json.dumps({"config": dataclasses.asdict(cfg)})] + [json.dumps(h) for h in history]
    export.atomic_write_bytes(path, [("\n".join(lines) + "\n").encode()])


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


# ----------------------------------------------------------------------------- printed lines

def format_grid(stats):
    """Levels in use (min/mean/max over the quantized layers), the share of codes at +-qmax, flips."""
    if not stats:
        return "grid: float32"
    used = [s["levels_used"] for s in stats]
    flips = [s["flip_rate"] for s in stats if s["flip_rate"] is not None]
    flip = f" flips {np.mean(flips):.2%}" if flips else ""
    return (f"levels {min(used)}/{np.mean(used):.1f}/{max(used)} of {stats[0]['levels_total']} "
            f"at±max {np.mean([s['frac_at_max'] for s in stats]):.2%}{flip}")


def epoch_line(record, epochs):
    """The line printed after each epoch."""
    return (f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f} acc {record['train_acc']:.2%} | "
            f"test loss {record['test_loss']:.4f} acc {record['test_acc']:.2%} | lr {record['lr']:.2e} | "
            f"{format_grid(record['grid'])} | {record['epoch_time']:.0f}s ({record['train_images_per_s']:.0f} img/s)")


def final_report(history, cfg, float_bytes, file_bytes, seconds, model_path):
    """The closing lines: the FINAL epoch's test accuracy (with test-time augmentation when the run
    used it), the best epoch labelled as selected on the test set, the model sizes, the time."""
    final = history[-1]
    best = max(history, key=lambda h: h["test_acc"])
    final_line = f"FINAL test accuracy (epoch {final['epoch']}): {final['test_acc']:.2%}"
    if "test_acc_tta" in final:
        final_line = (f"FINAL test accuracy (epoch {final['epoch']}): {final['test_acc_tta']:.2%} with test-time "
                      f"augmentation {final.get('tta', cfg.tta)} ({final['test_acc']:.2%} without)")
    averaged = final.get("lookahead")
    if averaged:
        final_line += (f"\nweights averaged (lookahead every {averaged['every']} steps): test accuracy without "
                       f"augmentation {averaged['test_acc_before']:.2%} with the last trained weights")
    reestimated = final.get("bn_reestimate")
    if reestimated:
        final_line += (f"\nbatch-norm statistics re-estimated over {reestimated['batches']} training batches with the "
                       f"final weights (test accuracy without augmentation {reestimated['test_acc_before']:.2%} before)")
    return (f"{final_line}\n"
            f"best epoch {best['epoch']}: {best['test_acc']:.2%} (selected on the test set: not an unbiased estimate)\n"
            f"model size: float32 {float_bytes / 2**20:.2f} MiB, int{cfg.bits} file {file_bytes / 2**20:.2f} MiB "
            f"(x{float_bytes / file_bytes:.1f} smaller)\n"
            f"time this run: {seconds:.0f}s\n"
            f"model file: {model_path}")
