"""Winograd F(4x4, 3x3) against conv2d's im2col + GEMM route, at the conv shapes of VGG4bit.

For each layer both paths run in the same process, interleaved (A B B A ...) so that load from
other processes hits both alike; each cell is the median of --repeats timings after a warm-up.
Forward is conv2d without bias; backward is dx + dw (dw only for the first layer, whose input
is the image batch). The last columns are the largest |difference| between the two paths
relative to the largest |value| of the im2col result, for y, dx and dw.

    python benchmarks/bench_winograd.py --batch 128 --repeats 7
    OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python benchmarks/bench_winograd.py   # work ratio

The machine's other load changes the picture, so the environment (threads, load average,
OPENBLAS_THREAD_TIMEOUT) is printed under the table. OpenBLAS's idle worker threads spin for
~0.1 s after every multi-threaded call unless OPENBLAS_THREAD_TIMEOUT (read when NumPy loads
OpenBLAS) is small; that stolen core slows every Numba kernel that follows a GEMM, in both paths.
The single-threaded run measures the arithmetic alone and is the most repeatable.
"""
import argparse
import os

import numpy as np

from bench_ops import VGG4BIT_CONVS, interleaved_medians, thread_info  # this folder is on sys.path
from nanoq4 import cli, ops, parallel, winograd
from nanoq4.tensor import Tensor


def relative_error(actual, expected):
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))


def bench_layer(batch, size, cin, cout, repeats, rng):
    x = rng.standard_normal((batch, size, size, cin), dtype=np.float32)
    w = rng.standard_normal((cout, 3, 3, cin), dtype=np.float32) * np.float32(0.05)
    grad = rng.standard_normal((batch, size, size, cout), dtype=np.float32)
    need_x = cin != 3  # the first layer's input is the image batch: no dx, as in training
    xt, wt = Tensor(x, requires_grad=need_x), Tensor(w, requires_grad=True)

    def im2col_forward():
        return ops.conv2d(xt, wt, None, stride=1, padding=1)

    ctx = im2col_forward()._ctx  # Conv2d.backward only reads its context: time it on one forward

    def im2col_backward():
        return ctx.backward(ctx, grad)

    _, saved = winograd.conv3x3_forward(x, w)

    def winograd_forward():
        return winograd.conv3x3_forward(x, w)

    def winograd_backward():
        return winograd.conv3x3_backward(grad, saved, need_x=need_x)

    t = interleaved_medians({"im2col_fwd": im2col_forward, "wino_fwd": winograd_forward,
                             "im2col_bwd": im2col_backward, "wino_bwd": winograd_backward}, repeats)
    y_ref, (dx_ref, dw_ref) = im2col_forward().data, im2col_backward()
    y, _ = winograd_forward()
    dx, dw = winograd_backward()
    errors = (relative_error(y, y_ref), relative_error(dx, dx_ref) if need_x else float("nan"),
              relative_error(dw, dw_ref))
    return t, errors


def environment():
    """bench_ops's thread/BLAS lines, plus what decides how the Winograd chunks run."""
    lines = thread_info() + [
        f"OPENBLAS_THREAD_TIMEOUT={os.environ.get('OPENBLAS_THREAD_TIMEOUT', 'unset')}; per-chunk workers: "
        f"{'yes' if parallel.blas_available() else 'no, BLAS threads not settable'}"]
    if hasattr(os, "getloadavg"):
        lines.append("load average (1, 5, 15 min): " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    return lines


def main():
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=cli.int_at_least(1), default=128, help="images per batch (default 128)")
    parser.add_argument("--repeats", type=cli.int_at_least(1), default=7, help="timed repeats per cell, median "
                        "reported (default 7, at least 5 recommended)")
    parser.add_argument("--layers", default=",".join(name for name, *_ in VGG4BIT_CONVS),
                        help="comma-separated subset of conv1..conv6")
    parser.add_argument("--seed", type=cli.int_at_least(0), default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    chosen = set(args.layers.split(","))
    unknown = sorted(chosen - {name for name, *_ in VGG4BIT_CONVS})
    if unknown:
        parser.error(f"--layers: unknown layer(s) {', '.join(unknown)}; choose from conv1..conv6")
    ops.WINOGRAD_MIN_CIN = None  # conv2d's im2col route on every layer, the baseline of this comparison

    print(f"3x3 conv, stride 1, pad 1, NHWC float32, batch {args.batch}; ms = median of {args.repeats} "
          f"interleaved runs; speedup = im2col / winograd")
    header = (f"{'layer':<6}{'shape':>15} |{'fwd im2col':>11}{'wino':>8}{'x':>6} |{'bwd im2col':>11}"
              f"{'wino':>8}{'x':>6} |{'total im2col':>13}{'wino':>8}{'x':>6} |"
              f"{'err y':>9}{'err dx':>9}{'err dw':>9}")
    print(header)
    print("-" * len(header))
    sums = dict(im2col_fwd=0.0, wino_fwd=0.0, im2col_bwd=0.0, wino_bwd=0.0)
    for name, size, cin, cout in VGG4BIT_CONVS:
        if name not in chosen:
            continue
        t, errors = bench_layer(args.batch, size, cin, cout, args.repeats, rng)
        for key in sums:
            sums[key] += t[key]
        shape = f"{size}x{size}x{cin}->{cout}"
        print(f"{name:<6}{shape:>15} |" + row(t) + " |" + "".join(f"{e:9.1e}" for e in errors))
    print("-" * len(header))
    print(f"{'total':<21} |" + row(sums))
    for line in environment():
        print(line)


def row(t):
    ms = {k: 1e3 * v for k, v in t.items()}
    total_i, total_w = ms["im2col_fwd"] + ms["im2col_bwd"], ms["wino_fwd"] + ms["wino_bwd"]
    return (f"{ms['im2col_fwd']:11.1f}{ms['wino_fwd']:8.1f}{ms['im2col_fwd'] / ms['wino_fwd']:6.2f} |"
            f"{ms['im2col_bwd']:11.1f}{ms['wino_bwd']:8.1f}{ms['im2col_bwd'] / ms['wino_bwd']:6.2f} |"
            f"{total_i:13.1f}{total_w:8.1f}{total_i / total_w:6.2f}")


if __name__ == "__main__":
    main()
