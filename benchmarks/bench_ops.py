"""Conv2d forward and backward at the six conv shapes of VGG4bit, against pure NumPy GEMMs.

A conv here is im2col + one GEMM forward and two GEMMs + col2im backward, so the GEMMs bound
what it can reach: for each layer the same GEMM shapes are timed with np.matmul alone, in the
same run, and the ratio (conv time) / (GEMM time) says what im2col, col2im and the bias cost
on top (target <= 1.25). Input 32x32x3 NHWC float32, 3x3 kernels, padding 1, with bias.
GEMMs (M = N*OH*OW, K = 9*Cin): forward (M,K)@(K,Cout); backward dW (Cout,M)@(M,K), or its
transpose (K,M)@(M,Cout) if faster, and dX (M,Cout)@(Cout,K). Timings on a shared machine are
only meaningful when nothing else runs: check `top` first. conv2d is held to its im2col route on
every layer here (ops.WINOGRAD_MIN_CIN = None); bench_winograd.py compares it with the Winograd
route conv2d takes for the wide 3x3 layers, bench_train_step.py times the step as it really runs.

    python benchmarks/bench_ops.py --batch 128 --repeats 5
"""
import argparse
import os
import time

import numba
import numpy as np

from nanoq4 import cli, kernels, ops, parallel
from nanoq4.tensor import Tensor

# (name, spatial size H = W, Cin, Cout): 3->64, 64->64 | pool | 64->128, 128->128 | pool | 128->256, 256->256
VGG4BIT_CONVS = [
    ("conv1", 32, 3, 64), ("conv2", 32, 64, 64),
    ("conv3", 16, 64, 128), ("conv4", 16, 128, 128),
    ("conv5", 8, 128, 256), ("conv6", 8, 256, 256),
]


def interleaved_medians(fns, repeats, warmup=1):
    """Median seconds of each function, timed round-robin (one call of each per round, the order
    reversed every other round: A B, B A, ...) so that a burst of load from other processes on a
    shared machine, or a cache warmed by the previous call, hits all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names = list(fns)
    times = {name: [] for name in names}
    for rep in range(repeats):
        for name in (names if rep % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def bench_layer(batch, size, cin, cout, repeats, rng):
    """Median seconds of conv forward/backward and of the bare GEMMs they contain."""
    x = Tensor(rng.standard_normal((batch, size, size, cin), dtype=np.float32), requires_grad=cin != 3)
    w = Tensor(rng.standard_normal((cout, 3, 3, cin), dtype=np.float32) * 0.05, requires_grad=True)
    b = Tensor(np.zeros(cout, np.float32), requires_grad=True)
    m, k = batch * size * size, 9 * cin

    out = ops.conv2d(x, w, b, stride=1, padding=1)
    ctx = out._ctx  # Conv2d.backward only reads its context: time it repeatedly on one forward
    grad = rng.standard_normal(out.shape, dtype=np.float32)
    cols = kernels.im2col(x.data, 3, 3, 1, 1)  # the GEMM operands: (M, K) patches, (Cout, K) weights
    wmat = w.data.reshape(cout, k)
    g = grad.reshape(m, cout)
    y, dcols = np.empty((m, cout), np.float32), np.empty((m, k), np.float32)
    dw, dw_t = np.empty((cout, k), np.float32), np.empty((k, cout), np.float32)
    fns = {
        "fwd": lambda: ops.conv2d(x, w, b, stride=1, padding=1),
        "gemm_fwd": lambda: np.matmul(cols, wmat.T, out=y),
        "bwd": lambda: ctx.backward(ctx, grad),
        "gemm_dw": lambda: np.matmul(g.T, cols, out=dw),
        # the same product transposed, cols^T @ dY: OpenBLAS is often much faster this way round,
        # and the baseline should be the best a pure GEMM can do
        "gemm_dw_t": lambda: np.matmul(cols.T, g, out=dw_t),
    }
    if x.requires_grad:  # the first layer's input is the image batch: no input gradient
        fns["gemm_dx"] = lambda: np.matmul(g, wmat, out=dcols)
    t = interleaved_medians(fns, repeats)
    flops_forward = 2.0 * m * k * cout
    flops_backward = flops_forward * (2 if x.requires_grad else 1)
    gemm_backward = min(t["gemm_dw"], t["gemm_dw_t"]) + t.get("gemm_dx", 0.0)
    return dict(m=m, k=k, fwd=t["fwd"], bwd=t["bwd"], gemm_fwd=t["gemm_fwd"], gemm_bwd=gemm_backward,
                flops_fwd=flops_forward, flops_bwd=flops_backward)


def thread_info():
    lines = [f"numba: {numba.get_num_threads()} threads, threading layer "
             f"{numba.threading_layer()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"]
    config = np.show_config(mode="dicts")
    blas_info = config.get("Build Dependencies", {}).get("blas", {})
    lines.append(f"BLAS: {blas_info.get('name')} {blas_info.get('version')}, "
                 f"{parallel.get_blas_threads() or 'unknown'} threads")
    lines.append(f"cpus: {os.cpu_count()}, numpy {np.__version__}, numba {numba.__version__}")
    return lines


def main():
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=cli.int_at_least(1), default=128, help="images per batch (default 128)")
    parser.add_argument("--repeats", type=cli.int_at_least(1), default=5, help="timed repeats per measurement, "
                        "median reported (default 5, at least 5 recommended)")
    parser.add_argument("--seed", type=cli.int_at_least(0), default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    ops.WINOGRAD_MIN_CIN = None  # the im2col route on every layer: what this benchmark measures

    header = (f"{'layer':<6}{'shape':>16}{'GEMM M x K x N':>22} |{'fwd ms':>8}{'GF/s':>7}{'gemm ms':>9}"
              f"{'GF/s':>7}{'ratio':>7} |{'bwd ms':>8}{'GF/s':>7}{'gemm ms':>9}{'GF/s':>7}{'ratio':>7}")
    print(f"conv2d 3x3 pad 1, NHWC float32, batch {args.batch}, median of {args.repeats} after warm-up")
    print(header)
    print("-" * len(header))
    totals = dict(fwd=0.0, bwd=0.0, gemm_fwd=0.0, gemm_bwd=0.0, flops_fwd=0.0, flops_bwd=0.0)
    for name, size, cin, cout in VGG4BIT_CONVS:
        r = bench_layer(args.batch, size, cin, cout, args.repeats, rng)
        for key in totals:
            totals[key] += r[key]
        shape = f"{size}x{size}x{cin}->{cout}"
        bwd_note = "" if cin != 3 else "  (dW only)"
        gemm = f"{r['m']}x{r['k']}x{cout}"
        print(f"{name:<6}{shape:>16}{gemm:>22} |"
              f"{1e3 * r['fwd']:8.1f}{r['flops_fwd'] / r['fwd'] / 1e9:7.1f}"
              f"{1e3 * r['gemm_fwd']:9.1f}{r['flops_fwd'] / r['gemm_fwd'] / 1e9:7.1f}{r['fwd'] / r['gemm_fwd']:7.2f} |"
              f"{1e3 * r['bwd']:8.1f}{r['flops_bwd'] / r['bwd'] / 1e9:7.1f}"
              f"{1e3 * r['gemm_bwd']:9.1f}{r['flops_bwd'] / r['gemm_bwd'] / 1e9:7.1f}"
              f"{r['bwd'] / r['gemm_bwd']:7.2f}{bwd_note}")
    t = totals
    print("-" * len(header))
    print(f"{'total':<44} |{1e3 * t['fwd']:8.1f}{t['flops_fwd'] / t['fwd'] / 1e9:7.1f}"
          f"{1e3 * t['gemm_fwd']:9.1f}{t['flops_fwd'] / t['gemm_fwd'] / 1e9:7.1f}{t['fwd'] / t['gemm_fwd']:7.2f} |"
          f"{1e3 * t['bwd']:8.1f}{t['flops_bwd'] / t['bwd'] / 1e9:7.1f}"
          f"{1e3 * t['gemm_bwd']:9.1f}{t['flops_bwd'] / t['gemm_bwd'] / 1e9:7.1f}{t['bwd'] / t['gemm_bwd']:7.2f}")
    both, gemm_both = t["fwd"] + t["bwd"], t["gemm_fwd"] + t["gemm_bwd"]
    print(f"forward + backward: conv {1e3 * both:.1f} ms, pure GEMM {1e3 * gemm_both:.1f} ms, "
          f"ratio {both / gemm_both:.2f} (target <= 1.25)")
    for line in thread_info():
        print(line)


if __name__ == "__main__":
    main()
