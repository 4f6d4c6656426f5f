"""How fast is a VGG4bit training step? nanoq4 against this machine's GEMM rate and PyTorch CPU.

    python benchmarks/bench_train_step.py [--batch 128] [--steps 10] [--no-torch]

Times forward, backward and optimizer step (fake quantization, AdamW, tanh soft clip) at batch
128, median over --steps steps after warm-up (Numba compilation is timed separately); prints
images/s, achieved GFLOP/s, the time the same GEMMs take in bare NumPy matmul, a per-op table,
the data-pipeline cost per batch, peak RSS, eval throughput (batch 1000, no gradients) of the
training model and of the model loaded from the exported int4 file, and, when torch is
importable, the same model in PyTorch timed the same way with the ratios nanoq4/PyTorch.
"""
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nanoq4 import cli, export, models, nn, ops, optim, profile  # noqa: E402
from nanoq4.tensor import Tensor, no_grad  # noqa: E402

# (H=W, Cin, Cout) of the six 3x3 convolutions, then the two linear layers (in, out)
VGG_CONVS = [(32, 3, 64), (32, 64, 64), (16, 64, 128), (16, 128, 128), (8, 128, 256), (8, 256, 256)]
VGG_LINEARS = [(4096, 512), (512, 10)]


def step_gflop(batch):
    """Multiply-add FLOPs of one training step: forward, input and weight gradients (not for the image)."""
    fwd = sum(2 * batch * h * h * cout * 9 * cin for h, cin, cout in VGG_CONVS)
    fwd += sum(2 * batch * fin * fout for fin, fout in VGG_LINEARS)
    first_dx = 2 * batch * 32 * 32 * 64 * 27
    return (3 * fwd - first_dx) / 1e9


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def gemm_seconds(batch, repeats=3):
    """Bare NumPy matmul time of the step's GEMMs (same shapes, same layouts as im2col)."""
    total = 0.0
    rng = np.random.default_rng(0)
    shapes = []
    for h, cin, cout in VGG_CONVS:
        m, k = batch * h * h, 9 * cin
        shapes += [(m, k, cout), (k, m, cout)] + ([(m, cout, k)] if cin > 3 else [])  # y, dW^T, dcols
    for fin, fout in VGG_LINEARS:
        shapes += [(batch, fin, fout), (fin, batch, fout), (batch, fout, fin)]
    for m, k, n in shapes:
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        a @ b
        total += median_time(lambda: a @ b, repeats)
    return total


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_nanoq4(batch, steps):
    nn.manual_seed(0)
    model = models.vgg4bit(10).train()
    opt = optim.AdamW(optim.param_groups(model, 5e-4), lr=1e-3)
    opt.add_post_step_hook(optim.TanhSoftClip(3.0))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 32, 32, 3), dtype=np.float32)
    y = rng.integers(0, 10, batch)
    parts = {"forward": [], "backward": [], "optimizer": []}

    def step(record):
        t0 = time.perf_counter()
        loss = ops.cross_entropy(model(Tensor(x)), y)
        t1 = time.perf_counter()
        opt.zero_grad()
        loss.backward()
        t2 = time.perf_counter()
        optim.clip_grad_norm(opt.parameters(), 0.5)
        opt.step()
        t3 = time.perf_counter()
        if record:
            parts["forward"].append(t1 - t0)
            parts["backward"].append(t2 - t1)
            parts["optimizer"].append(t3 - t2)

    start = time.perf_counter()
    step(False)  # compiles (or loads from cache) every Numba kernel on the path
    first = time.perf_counter() - start
    step(False)
    with profile.profiling():  # the package's per-op timing, as NANOQ4_PROFILE=1 gives it
        for _ in range(steps):
            step(True)
    table = profile.table(steps, min_ms=0.5)
    totals = [sum(t) for t in zip(*parts.values())]
    train_rss = peak_rss_mb()

    model.eval()
    xe = rng.standard_normal((1000, 32, 32, 3), dtype=np.float32)
    with no_grad():
        model(Tensor(xe))
        eval_s = median_time(lambda: model(Tensor(xe)), 3)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vgg.nq4"
        arch = dict(model="vgg4bit", num_classes=10, quantize=True, bits=4, per_channel=False)
        export.export_model(model, path, arch, [str(i) for i in range(10)], (0.5,) * 3, (0.25,) * 3)
        loaded = export.load_model(path)
        loaded.logits(xe)
        file_eval_s = median_time(lambda: loaded.logits(xe, batch_size=1000), 3)
    return dict(step=float(np.median(totals)), parts={k: float(np.median(v)) for k, v in parts.items()},
                first_step=first, table=table, train_rss=train_rss, eval_s=eval_s, file_eval_s=file_eval_s)


def conv_layer_table(batch, repeats=3):
    """Forward and backward of each VGG4bit convolution alone, with the route conv2d takes
    (im2col + GEMM, or Winograd F(4x4, 3x3)) and that layer's im2col-equivalent GFLOP/s."""
    rng = np.random.default_rng(1)
    rows = []
    for i, (h, cin, cout) in enumerate(VGG_CONVS, 1):
        x = Tensor(rng.standard_normal((batch, h, h, cin), dtype=np.float32), requires_grad=cin > 3)
        w = Tensor(rng.standard_normal((cout, 3, 3, cin), dtype=np.float32) * np.float32(0.05),
                   requires_grad=True)
        grad = rng.standard_normal((batch, h, h, cout), dtype=np.float32)
        ops.conv2d(x, w, None, 1, 1)

        def fwd():
            return ops.conv2d(x, w, None, 1, 1)

        def fwd_bwd():
            x.grad = w.grad = None
            fwd().backward(grad)

        f = median_time(fwd, repeats)
        fb = median_time(fwd_bwd, repeats)
        route = "winograd" if ops.uses_winograd(w.shape, 1, 1) else "im2col+GEMM"
        flop = 2 * batch * h * h * cout * 9 * cin * (3 if cin > 3 else 2)
        rows.append((f"conv{i} {h}x{h} {cin}->{cout}", route, f * 1e3, (fb - f) * 1e3, flop / fb / 1e9))
    return rows


def bench_torch(batch, steps):
    import torch
    import torch.nn.functional as F

    class FakeQuant(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w):
            s = w.abs().max() / 7
            s = torch.where(s > 0, s, torch.ones_like(s))
            return torch.clamp(torch.round(w / s), -7, 7) * s

        @staticmethod
        def backward(ctx, grad):
            return grad

    class QConv(torch.nn.Conv2d):
        def forward(self, x):
            return F.conv2d(x, FakeQuant.apply(self.weight), self.bias, padding=1)

    class QLinear(torch.nn.Linear):
        def forward(self, x):
            return F.linear(x, FakeQuant.apply(self.weight), self.bias)

    torch.manual_seed(0)
    layers, cin = [], 3
    for cout in (64, 128, 256):
        layers += [QConv(cin, cout, 3), torch.nn.BatchNorm2d(cout), torch.nn.ReLU(),
                   QConv(cout, cout, 3), torch.nn.BatchNorm2d(cout), torch.nn.ReLU(), torch.nn.MaxPool2d(2)]
        cin = cout
    layers += [torch.nn.Flatten(), QLinear(4096, 512), torch.nn.BatchNorm1d(512), torch.nn.ReLU(),
               torch.nn.Dropout(0.5), QLinear(512, 10)]
    model = torch.nn.Sequential(*layers)
    quantized = [m.weight for m in model.modules() if isinstance(m, (QConv, QLinear))]
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0}],
                            lr=1e-3)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        with torch.no_grad():
            for w in quantized:
                w.copy_(3.0 * torch.tanh(w / 3.0))

    model.train()
    step(), step()
    step_s = median_time(step, steps)
    model.eval()
    xe = torch.randn(1000, 3, 32, 32)
    with torch.no_grad():
        model(xe)
        eval_s = median_time(lambda: model(xe), 3)
    return dict(step=step_s, eval_s=eval_s, threads=torch.get_num_threads())


def main():
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=cli.int_at_least(2), default=128, help="images per step, >= 2 (default 128)")
    p.add_argument("--steps", type=cli.int_at_least(1), default=10, help="timed steps (default 10)")
    p.add_argument("--no-torch", action="store_true")
    args = p.parse_args()
    b = args.batch
    gflop = step_gflop(b)
    print(f"VGG4bit training step, batch {b}: {gflop:.1f} GFLOP")
    gemm_s = gemm_seconds(b)
    print(f"bare NumPy matmul on the same GEMM shapes: {gemm_s:.3f} s ({gflop / gemm_s:.0f} GFLOP/s)")

    r = bench_nanoq4(b, args.steps)
    print(f"\nnanoq4: first step (Numba compile or cache load) {r['first_step']:.1f} s")
    print(f"nanoq4 step (median of {args.steps}): {r['step']:.3f} s = {b / r['step']:.0f} images/s, "
          f"{gflop / r['step']:.0f} GFLOP/s, {r['step'] / gemm_s:.2f}x the bare GEMM time")
    print("  " + ", ".join(f"{k} {v:.3f} s" for k, v in r["parts"].items()))
    print("\n" + r["table"])
    try:
        from bench_data import bench_batch_ms
        data_ms = bench_batch_ms(b)
        print(f"{'data: augmented batch':<32}{data_ms:>10.3f}{'':>8}{data_ms / 1e3 / r['step']:>8.1%}  (of a step)")
    except ImportError:
        pass
    print(f"\n{'convolution alone':<24}{'route':<13}{'fwd ms':>8}{'bwd ms':>8}{'GFLOP/s*':>10}")
    for name, route, f_ms, b_ms, rate in conv_layer_table(b):
        print(f"{name:<24}{route:<13}{f_ms:>8.1f}{b_ms:>8.1f}{rate:>10.0f}")
    print("  * im2col-equivalent FLOPs (9 Cin Cout per output pixel) / measured time; Winograd does"
          " 4x fewer multiplications, so it can exceed the GEMM rate")
    print(f"\npeak RSS while training: {r['train_rss']:.0f} MB")
    print(f"eval, batch 1000, no gradients: {1000 / r['eval_s']:.0f} images/s (training model), "
          f"{1000 / r['file_eval_s']:.0f} images/s (model loaded from the int4 file)")

    if args.no_torch:
        return
    try:
        import torch  # noqa: F401
    except ImportError:
        print("\ntorch not installed: no PyTorch comparison (pip install torch==2.13.0)")
        return
    t = bench_torch(b, args.steps)
    print(f"\nPyTorch {torch.__version__} ({t['threads']} threads): step {t['step']:.3f} s = "
          f"{b / t['step']:.0f} images/s; eval {1000 / t['eval_s']:.0f} images/s")
    print(f"ratio nanoq4/PyTorch, training step time: {r['step'] / t['step']:.2f} (<= 1.0 means nanoq4 is faster)")
    print(f"ratio nanoq4/PyTorch, eval throughput: {t['eval_s'] / r['eval_s']:.2f} (>= 1.0 means nanoq4 is faster)")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
