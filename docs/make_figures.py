"""Regenerate the figures of docs/method.md as small PNGs in docs/figures/.

    pip install ".[plot]"
    python docs/make_figures.py --checkpoint runs/<run>/checkpoint.ckpt --metrics runs/<run>/metrics.jsonl
    python docs/make_figures.py    # no checkpoint: trains VGG4bit for a few steps on synthetic data first

The weight figures use the latent float weights of one quantized layer (--layer; default: the
largest convolution) from the checkpoint's "model" state dict; the curves come from --metrics,
else from the history the checkpoint carries. The numbers behind the weight figures (max|W|,
RMS, grid steps, levels in use) are printed, for quoting in the text.
"""
import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, Rectangle
except ImportError:
    sys.exit('make_figures.py needs matplotlib: pip install ".[plot]"')

from nanoq4 import NanoQ4Error, export, quant, train  # noqa: E402

FIGURES = Path(__file__).resolve().parent / "figures"
DPI = 100
CIFAR10_TRAIN_IMAGES = 50_000


def save(fig, name):
    FIGURES.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURES / name, dpi=DPI)
    plt.close(fig)
    print(f"wrote {FIGURES / name} ({(FIGURES / name).stat().st_size // 1024} KiB)")


# ----------------------------------------------------------------------------- inputs

def synthetic_checkpoint(folder):
    """A few steps of the default recipe on synthetic images: the figures then always have data."""
    cfg = train.TrainConfig(dataset="synthetic", model="vgg4bit", epochs=1, max_steps_per_epoch=4,
                            out=folder, progress=False, tta="none")
    train.train(cfg)
    return Path(folder) / "checkpoint.ckpt"


def read_metrics(path):
    """The per-epoch records of a metrics.jsonl (its first line is the run's config)."""
    try:
        records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f"error: cannot read {path} as metrics.jsonl ({e})")
    return [r for r in records if "epoch" in r]


def pick_layer(state, name=None):
    """(name, weight) of a conv/linear weight (the tensors with more than one axis)."""
    weights = {k: v for k, v in state.items() if v.ndim > 1}
    if name is None:
        convs = {k: v for k, v in weights.items() if v.ndim == 4}
        name = max(convs, key=lambda k: convs[k].size)
    if name not in weights:
        sys.exit(f"no weight {name!r} in the checkpoint; choose one of: {', '.join(weights)}")
    return name, np.asarray(weights[name], dtype=np.float32)


# ----------------------------------------------------------------------------- weight figures

def grid_histogram(name, w, bits):
    """The float weights against the grid lines k*s, with one scale per layer and per channel."""
    q = quant.qmax(bits)
    s_layer = float(quant.compute_scale(w, bits))
    s_channel = quant.compute_scale(w, bits, per_channel=True)
    c = int(np.argsort(s_channel)[len(s_channel) // 2])  # a channel of median scale
    rms = float(np.sqrt(np.mean(np.square(w, dtype=np.float64))))
    print(f"{name} {w.shape}: max|W| {np.abs(w).max():.4f}, RMS {rms:.4f} (max/RMS {np.abs(w).max() / rms:.2f}), "
          f"per-layer step {s_layer:.5f}, per-channel steps {s_channel.min():.5f}..{s_channel.max():.5f} "
          f"(median {np.median(s_channel):.5f})")

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    panels = [(w.ravel(), s_layer, f"{name}: all {w.size:,} weights,\none scale max|W|/{q} = {s_layer:.4f}"),
              (w[c].ravel(), float(s_channel[c]), f"output channel {c} ({w[c].size} weights),\n"
                                                  f"its own scale = {s_channel[c]:.4f}")]
    for ax, (values, s, title) in zip(axes, panels):
        counts, edges, _ = ax.hist(values, bins=120, color="tab:blue", alpha=0.8)
        sigma = float(np.sqrt(np.mean(np.square(values, dtype=np.float64))))
        x = np.linspace(edges[0], edges[-1], 400)
        gauss = values.size * (edges[1] - edges[0]) * np.exp(-0.5 * (x / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        ax.plot(x, gauss, "k--", lw=0.8, label="Gaussian, same RMS")
        for k in range(-q, q + 1):
            ax.axvline(k * s, color="tab:red", lw=0.6, alpha=0.6)
        ax.set_yscale("log")
        ax.set_ylim(0.5, counts.max() * 2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(f"latent float weight (red: the grid levels -{q}..{q} times s)", fontsize=8)
        ax.legend(fontsize=7, loc="upper right")
    for per_channel, shift, label in ((False, -0.2, "one scale per layer"), (True, 0.2, "one scale per channel")):
        codes, _ = quant.quantize(w, bits, per_channel)
        share = np.bincount(codes.ravel().astype(np.intp) + q, minlength=2 * q + 1) / codes.size
        axes[2].bar(np.arange(-q, q + 1) + shift, share, width=0.4, label=label)
        print(f"  {label}: {quant.grid_stats(codes, bits)['levels_used']} of {2 * q + 1} levels in use, "
              f"share of codes -2..2: {share[q - 2:q + 3].sum():.1%}")
    axes[2].set_yscale("log")
    axes[2].set_xticks(range(-q, q + 1))
    axes[2].set_title("share of weights on each code", fontsize=9)
    axes[2].set_xlabel("code", fontsize=8)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    save(fig, "grid_histogram.png")


def soft_clip(x, alpha):
    y = np.array(x, dtype=np.float64)
    quant.tanh_soft_clip_(y, alpha)
    return y


def tanh_clip(name, w, ks):
    """W -> a*tanh(W/a) over the layer's weight range: the absolute a = 3 and a = k*RMS(W)."""
    m = float(np.abs(w).max())
    alphas = [(3.0, "a = 3 (absolute, the paper's)", "tab:red")]
    alphas += [(quant.rms_alpha(w, k), f"a = {k:g} RMS(W) (relative)", color)
               for k, color in zip(ks, ("tab:green", "tab:purple", "tab:orange"))]
    for a, label, _ in alphas:
        print(f"tanh clip {label}: a = {a:.4f}; max|W| {m:.4f} -> {soft_clip([m], a)[0]:.4f}")

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    x = np.linspace(-1.3 * m, 1.3 * m, 801)
    left.hist(w.ravel(), bins=120, color="0.85", density=True)
    curves = left.twinx()
    curves.plot(x, x, "k:", lw=1, label="identity")
    for a, label, color in alphas:
        curves.plot(x, soft_clip(x, a), color=color, lw=1.2, label=label)
    curves.set_ylabel("weight after one clip", fontsize=8)
    curves.legend(fontsize=7, loc="upper left")
    left.set_yticks([])
    left.set_xlabel(f"weight before (grey: histogram of {name})", fontsize=8)
    left.set_title("the clip over this layer's weight range", fontsize=9)

    xr = np.linspace(m / 100, 1.3 * m, 400)
    for a, label, color in alphas:
        right.semilogy(xr, (xr - soft_clip(xr, a)) / xr, color=color, lw=1.2, label=label)
    right.axvline(m, color="0.5", lw=0.8, ls="--", label="max|W| of the layer")
    right.set_xlabel("|W|", fontsize=8)
    right.set_ylabel("relative shrink of one clip", fontsize=8)
    right.set_title("1 - a tanh(W/a) / W, applied after every step", fontsize=9)
    right.legend(fontsize=7)
    fig.tight_layout()
    save(fig, "tanh_clip.png")


# ----------------------------------------------------------------------------- diagrams

def _matrix(ax, x0, y0, rows, cols, label, color, cell=0.5, shade=None):
    """A rows x cols grid of cells with its lower-left corner at (x0, y0) and a label above;
    shade(i, j) may give cell (row i from the top, column j) another color."""
    for i in range(rows):
        for j in range(cols):
            fill = (shade(i, j) if shade else None) or color
            ax.add_patch(Rectangle((x0 + j * cell, y0 + (rows - 1 - i) * cell), cell, cell,
                                   facecolor=fill, edgecolor="k", lw=0.6))
    ax.text(x0 + cols * cell / 2, y0 + rows * cell + 0.12, label, ha="center", va="bottom", fontsize=8)
    return x0, y0, x0 + cols * cell, y0 + rows * cell


def _arrow(ax, start, end, label=""):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=10, lw=0.8, color="k"))
    if label:
        ax.text((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + 0.12, label, ha="center", va="bottom",
                fontsize=8)


def winograd_tile():
    """F(4x4, 3x3): one 6x6 input tile and one 3x3 kernel give a 4x4 output tile (per Cin, Cout pair)."""
    fig, ax = plt.subplots(figsize=(12, 5))
    # the image: 6x6 windows at stride 4 overlap by two rows/columns; each gives a 4x4 output block
    _matrix(ax, 0.0, 0.6, 10, 10, "padded input: 6x6 windows\nat stride 4, overlapping", "white", cell=0.3,
            shade=lambda i, j: "lightblue" if i < 6 and j < 6 else None)
    ax.add_patch(Rectangle((1.2, 1.8), 1.8, 1.8, fill=False, edgecolor="tab:orange", lw=2, ls="--"))
    d = _matrix(ax, 3.7, 2.0, 6, 6, "d: 6x6 input tile", "lightblue", cell=0.3)
    g = _matrix(ax, 4.15, -0.6, 3, 3, "g: 3x3 kernel (4-bit values)", "navajowhite", cell=0.3)
    v = _matrix(ax, 6.9, 2.0, 6, 6, "V = B$^T$ d B", "lightblue", cell=0.3)
    u = _matrix(ax, 6.9, -0.9, 6, 6, "U = G g G$^T$", "navajowhite", cell=0.3)
    m = _matrix(ax, 10.1, 0.55, 6, 6, "M = U $\\odot$ V\n36 multiplications", "plum", cell=0.3)
    y = _matrix(ax, 13.3, 0.85, 4, 4, "Y = A$^T$ M A\n4x4 output tile", "palegreen", cell=0.3)
    _arrow(ax, (3.1, 2.9), (d[0] - 0.1, d[1] + 0.9))
    _arrow(ax, (d[2] + 0.1, d[1] + 0.9), (v[0] - 0.1, v[1] + 0.9), "small integers")
    _arrow(ax, (g[2] + 0.1, g[1] + 0.45), (u[0] - 0.1, u[1] + 0.9), "once per weight")
    _arrow(ax, (v[2] + 0.1, v[1] + 0.6), (m[0] - 0.1, m[3] - 0.3))
    _arrow(ax, (u[2] + 0.1, u[1] + 1.2), (m[0] - 0.1, m[1] + 0.3))
    _arrow(ax, (m[2] + 0.1, m[1] + 0.9), (y[0] - 0.1, y[1] + 0.6), "small integers")
    ax.text(7.3, -1.3, "Summed over input channels, M[k] = V[k] @ U[k]$^T$ for k = 0..35: 36 GEMMs "
            "(tiles x Cin) @ (Cin x Cout).\nPer 4x4 output tile and (Cin, Cout) pair: im2col + GEMM "
            "multiplies 16 x 9 = 144 times, Winograd 36 times (4x fewer).",
            ha="center", va="top", fontsize=8)
    ax.set_xlim(-0.2, 14.8)
    ax.set_ylim(-2.3, 4.6)
    ax.set_aspect("equal")
    ax.axis("off")
    fig.tight_layout()
    save(fig, "winograd_tile.png")


def lr_schedules():
    """The learning rate at every step, for the default recipe and the paper's, on CIFAR-10."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3))
    recipes = [("default", train.TrainConfig()), ("--recipe paper", train.TrainConfig(**train.PAPER_RECIPE))]
    for ax, (title, cfg) in zip(axes, recipes):
        steps_per_epoch = math.ceil(CIFAR10_TRAIN_IMAGES / cfg.batch_size)
        schedule = train.make_schedule(cfg, steps_per_epoch)
        steps = np.arange(cfg.resolved_epochs() * steps_per_epoch)
        ax.plot(steps / steps_per_epoch, [schedule(s) for s in steps], lw=1.2)
        ax.set_title(f"{title}: {cfg.optimizer}, {cfg.schedule}, peak {cfg.resolved_lr():g}, "
                     f"batch {cfg.batch_size}", fontsize=9)
        ax.set_xlabel(f"epoch ({steps_per_epoch} steps each on CIFAR-10)", fontsize=8)
        ax.set_ylabel("learning rate", fontsize=8)
    fig.tight_layout()
    save(fig, "lr_schedule.png")


# ----------------------------------------------------------------------------- curves

def curves(history, source):
    """Loss, accuracy and grid use per epoch, from a run's metrics records."""
    if not history:
        print(f"no epoch records in {source}: curves.png not written")
        return
    epochs = [h["epoch"] for h in history]
    fig, (loss, acc, grid) = plt.subplots(1, 3, figsize=(13, 3.4))
    for split, style in (("train", "-o"), ("test", "-s")):
        loss.plot(epochs, [h[f"{split}_loss"] for h in history], style, ms=3, label=split)
        acc.plot(epochs, [100 * h[f"{split}_acc"] for h in history], style, ms=3, label=split)
    tta = [(h["epoch"], 100 * h["test_acc_tta"]) for h in history if "test_acc_tta" in h]
    if tta:
        acc.plot(*zip(*tta), "r*", ms=8, label="test, with test-time augmentation")
    loss.set_ylabel("cross-entropy (train: with label smoothing)", fontsize=8)
    acc.set_ylabel("accuracy (%)", fontsize=8)
    if history[0].get("grid"):
        used = np.array([[s["levels_used"] for s in h["grid"]] for h in history])
        grid.plot(epochs, used.mean(axis=1), "-o", ms=3, label="levels in use, mean over layers")
        grid.plot(epochs, used.min(axis=1), "-s", ms=3, label="levels in use, fewest")
        grid.set_ylabel(f"of {history[0]['grid'][0]['levels_total']} levels", fontsize=8)
        flips = grid.twinx()
        flips.plot(epochs, [100 * np.mean([s["flip_rate"] for s in h["grid"]]) for h in history], "g-^", ms=3)
        flips.set_ylabel("codes changed since last epoch (%, green)", fontsize=8)
    else:
        grid.set_title("float32 run: no 4-bit grid", fontsize=9)
    for ax in (loss, acc, grid):
        ax.set_xlabel("epoch", fontsize=8)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(f"measured curves of {source}", fontsize=9)
    fig.tight_layout()
    save(fig, "curves.png")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="a run's checkpoint.ckpt (default: train a few synthetic steps first)")
    p.add_argument("--metrics", help="a run's metrics.jsonl for the curves (default: the checkpoint's history)")
    p.add_argument("--layer", help="state-dict name of the weight to plot (default: the largest convolution)")
    p.add_argument("--tanh-k", type=float, nargs="+", default=[2.0, 3.0], help="k of the relative clips drawn")
    args = p.parse_args(argv)

    try:
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = export.load_checkpoint(args.checkpoint or synthetic_checkpoint(folder))
    except NanoQ4Error as e:
        sys.exit(f"error: {e}")
    bits = checkpoint["config"]["bits"]
    name, w = pick_layer(checkpoint["model"], args.layer)
    grid_histogram(name, w, bits)
    tanh_clip(name, w, args.tanh_k)
    winograd_tile()
    lr_schedules()
    if args.metrics:
        run = Path(args.metrics).resolve().parent.name  # the run folder's name, never a machine's path
        curves(read_metrics(args.metrics), f"run {run}")
    else:
        curves(checkpoint["history"], f"run {Path(args.checkpoint).resolve().parent.name}" if args.checkpoint
               else "a 4-step synthetic run (not a result)")


if __name__ == "__main__":
    main()
