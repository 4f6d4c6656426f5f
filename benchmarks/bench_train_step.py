"""How fast is a VGG4bit training step? nanoq4 against this machine's GEMM rate and PyTorch CPU,
and the other targets of issue #12 (memory, a shared CPU, start-up time).

    python benchmarks/bench_train_step.py [--batch 128] [--steps 10] [--shared-steps 20]
        [--no-torch] [--no-shared-cpu] [--no-startup] [--startup-dataset synthetic]
        [--workers N | --no-workers] [--sync-bn | --no-sync-bn]

Times forward, backward and optimizer step (fake quantization, AdamW, tanh soft clip) at batch
128, median over --steps steps after warm-up (Numba compilation is timed separately); prints
images/s, achieved GFLOP/s, the time the same GEMMs take in bare NumPy matmul, a per-op table,
the data-pipeline cost per batch, a per-layer convolution table, then:

  memory      peak RSS (MB = 10^6 bytes) up to the end of the timed steps (the GEMM comparison runs
              after it, so its large matrices are not counted), and the page faults (minor and
              major, getrusage) of each timed step: a step that allocates a fresh large buffer
              faults once per page of it. The target "no new large buffers after warm-up" is read
              as: fewer faults per step (median) than one fresh 1 MiB buffer would cause.
  shared CPU  --shared-steps more steps while one CPU-bound single-threaded process (a Python
              busy loop the benchmark starts, and stops whatever happens) runs next to it: images/s
              against the idle steps' (both total images / total time, so stalls count) and the
              slowest single step. Skipped with --no-shared-cpu.
  eval        throughput (batch 1000, no gradients) of the training model and of the model loaded
              from the exported int4 file.
  workers     the configuration the trainer runs: N local worker processes (nanoq4/workers.py)
              at the global batch 2 x --batch (the trainer's default 256 at --batch 128), N as the
              trainer picks it for that batch (train.auto_workers), or --workers N. Each worker, with
              its share of the cores, times the trainer's own step (train.train_step: forward,
              backward of its share of the mean loss, the group's gradient sum through shared
              memory, optimizer step with the tanh clip) on its share of a random batch, with the
              trainer's default settings, every timed step after a barrier. Batch norm as the trainer
              sets it (TrainConfig.resolved_sync_bn: global or per-worker statistics, printed), or as
              --sync-bn / --no-sync-bn say. Prints the median global step time, images/s, the time
              per --batch images (step time x batch / global batch, comparable per image with the
              one-process step) against the one-process step and the bare GEMMs, and the time inside
              the gradient sum. Skipped with --no-workers or --workers 1, or where the trainer runs
              one process (one core).
  start-up    the real trainer (`python -m nanoq4.train`, VGG4bit, one step of --startup-dataset,
              default synthetic; cifar10 reads $NANOQ4_DATA) run twice in fresh processes: wall time
              from launch until its first training step has finished, first with an empty Numba
              cache, then with the cache that run wrote (the "second run starts training within
              5 s" target); the difference is the first run's compile time. Skipped with
              --no-startup.
  PyTorch     when torch is importable (and not --no-torch), the same model timed the same way,
              and the ratios nanoq4/PyTorch (the workers' per --batch images).

It ends with a table of issue #12's targets, the measured values and pass/fail (n/a where a part
was skipped or torch is missing); the step targets are read twice, for one process and for the
workers (their time per --batch images). The full table: `python benchmarks/bench_train_step.py`
on an otherwise idle machine with torch installed.
"""
import argparse
import contextlib
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_data, trainer_step
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

import nanoq4  # noqa: E402
from nanoq4 import cli, export, memory, models, nn, ops, optim, profile  # noqa: E402
from nanoq4 import train as train_module  # noqa: E402
from nanoq4.errors import NanoQ4Error  # noqa: E402
from nanoq4.tensor import Tensor, no_grad  # noqa: E402
from nanoq4.workers import run_on_workers  # noqa: E402
from trainer_step import median_seconds, time_on_group  # noqa: E402

# (H=W, Cin, Cout) of the six 3x3 convolutions, then the two linear layers (in, out)
VGG_CONVS = [(32, 3, 64), (32, 64, 64), (16, 64, 128), (16, 128, 128), (8, 128, 256), (8, 256, 256)]
VGG_LINEARS = [(4096, 512), (512, 10)]


def step_gflop(batch):
    """Multiply-add FLOPs of one training step: forward, input and weight gradients (not for the image)."""
    fwd = sum(2 * batch * h * h * cout * 9 * cin for h, cin, cout in VGG_CONVS)
    fwd += sum(2 * batch * fin * fout for fin, fout in VGG_LINEARS)
    first_dx = 2 * batch * 32 * 32 * 64 * 27
    return (3 * fwd - first_dx) / 1e9


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
        total += median_seconds(lambda: a @ b, repeats)
    return total


def peak_rss_mb():
    """Peak resident set size of this process so far, in MB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def page_faults():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt + usage.ru_majflt


# A step that allocates a fresh buffer of this size faults about this many times (once per page).
LARGE_BUFFER_FAULTS = (1 << 20) // resource.getpagesize()


@contextlib.contextmanager
def busy_process():
    """One CPU-bound single-threaded process running next to the block: a Python busy loop. It is
    stopped on the way out whatever happens (exception, Ctrl-C), and stops by itself should this
    process die first (it watches its parent)."""
    loop = ("import os\nparent = os.getppid()\ntry:\n    while os.getppid() == parent:\n"
            "        for _ in range(100000): pass\nexcept KeyboardInterrupt: pass")
    proc = subprocess.Popen([sys.executable, "-c", loop])
    try:
        time.sleep(0.5)  # started and holding its core before the first timed step
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def bench_nanoq4(batch, steps, shared_steps):
    nn.manual_seed(0)
    model = models.vgg4bit(10).train()
    opt = optim.AdamW(optim.param_groups(model, 5e-4), lr=1e-3)
    opt.add_post_step_hook(optim.TanhSoftClip(3.0))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 32, 32, 3), dtype=np.float32)
    y = rng.integers(0, 10, batch)
    parts = {"forward": [], "backward": [], "optimizer": []}
    faults = []

    def step(record):
        """One training step -> its wall time; with `record`, its parts and page faults are kept."""
        faults_before = page_faults()
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
            faults.append(page_faults() - faults_before)
        return t3 - t0

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
    shared = None
    if shared_steps:
        with busy_process():
            shared = [step(False) for _ in range(shared_steps)]

    model.eval()
    xe = rng.standard_normal((1000, 32, 32, 3), dtype=np.float32)
    with no_grad():
        model(Tensor(xe))
        eval_s = median_seconds(lambda: model(Tensor(xe)), 3)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vgg.nq4"
        arch = dict(model="vgg4bit", num_classes=10, quantize=True, bits=4, per_channel=False)
        export.export_model(model, path, arch, [str(i) for i in range(10)], (0.5,) * 3, (0.25,) * 3)
        loaded = export.load_model(path)
        loaded.logits(xe)
        file_eval_s = median_seconds(lambda: loaded.logits(xe, batch_size=1000), 3)
    return dict(step=float(np.median(totals)), parts={k: float(np.median(v)) for k, v in parts.items()},
                first_step=first, table=table, train_rss=train_rss, eval_s=eval_s, file_eval_s=file_eval_s,
                idle_images_s=batch * steps / sum(totals), faults=faults,
                shared_images_s=None if shared is None else batch * len(shared) / sum(shared),
                shared_worst=None if shared is None else max(shared))


def check_worker_count(workers, batch):
    """Refuse a --workers count that cannot split the global batch (2 x --batch) into equal shares of
    2 images or more (batch norm needs 2), as the trainer refuses one that cannot split --batch-size."""
    total = 2 * batch
    if workers > 1 and (total % workers or total // workers < 2):
        raise NanoQ4Error(f"--workers {workers} does not split the global batch of {total} images (2 x --batch) "
                          f"into equal shares of 2 or more; choose a divisor of {total} up to {total // 2}")


def bench_workers(batch, steps, workers=None, sync_bn=None, keep_freed_memory=True):
    """The trainer's local worker processes at the global batch 2 x `batch` (the trainer's default batch
    at --batch 128): `workers` of them (None: as many as the trainer picks for that batch), each timing
    the trainer's step on its share after a barrier (trainer_step.py), with batch norm as `sync_bn` says
    (None: the trainer's default) -> rank 0's measurements and the configuration, or None when the
    trainer would run one process."""
    cfg = train_module.TrainConfig(batch_size=2 * batch, workers=workers, sync_bn=sync_bn)
    count = cfg.resolved_workers()
    if count == 1:
        return None
    measured = run_on_workers(count, time_on_group, cfg, steps, keep_freed_memory)
    clip = f"gradient-norm clip {cfg.grad_clip:g}" if cfg.grad_clip else "no gradient-norm clip"
    settings = f"{cfg.optimizer}, {clip}" + (", tanh clip" if cfg.tanh_clip else "")
    return dict(measured, workers=count, trainers_choice=workers is None, global_batch=cfg.batch_size,
                sync_bn=cfg.resolved_sync_bn(), sync_bn_default=sync_bn is None, settings=settings,
                per_batch_s=measured["step_s"] * batch / cfg.batch_size)


def workers_label(w):
    """How the tables name the workers configuration."""
    if w is None:
        return "trainer's workers"
    return f"trainer's {w['workers']} workers" if w["trainers_choice"] else f"--workers {w['workers']}"


def workers_report(w, batch, steps, one_process_s, gemm_s):
    """The workers section's lines: the configuration, the step and its cost per --batch images against the
    one-process step and the bare GEMMs, the time inside the gradient sum."""
    statistics = "global" if w["sync_bn"] else "per-worker"
    whose = "the trainer's default" if w["sync_bn_default"] else "--sync-bn" if w["sync_bn"] else "--no-sync-bn"
    return [
        f"local workers ({workers_label(w)}): {w['workers']} processes x {w['global_batch'] // w['workers']} images "
        f"(global batch {w['global_batch']} = 2 x --batch), {w['threads']} thread(s) each; {statistics} batch-norm "
        f"statistics ({whose}); the trainer's step with its defaults ({w['settings']})",
        f"  step (median of {steps}, each after a barrier): {w['step_s']:.3f} s = {w['images_per_s']:.0f} images/s; "
        f"per {batch} images {w['per_batch_s']:.3f} s = {w['per_batch_s'] / one_process_s:.2f}x the one-process "
        f"step, {w['per_batch_s'] / gemm_s:.2f}x the bare GEMM time",
        f"  inside the gradient sum: {w['sum_in_step_s'] * 1e3:.1f} ms per step (copy in, sum through shared memory, "
        f"waiting for the slower worker)",
    ]


# The real trainer for one step, reporting when that step has finished (and its peak RSS in KiB)
# and then leaving at once (no evaluation, no export): train_step is wrapped where train() looks it
# up. The peak is VmHWM: ru_maxrss of a process just launched also counts its parent's RSS at launch.
STARTUP_SCRIPT = """
import os, resource, sys
import nanoq4.train as trainer

def peak_rss_kib():
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

def first_step(*args):
    real_step(*args)
    print("FIRST STEP DONE", peak_rss_kib(), flush=True)
    os._exit(0)

real_step, trainer.train_step = trainer.train_step, first_step
trainer.main(sys.argv[1:])
"""


def time_to_first_step(batch, dataset, cache_dir, timeout=1800):
    """Seconds from launching `python -m nanoq4.train` (as STARTUP_SCRIPT) until its first training
    step has finished, with NUMBA_CACHE_DIR=cache_dir -> (seconds, peak RSS MB of the trainer)."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(Path(nanoq4.__file__).resolve().parents[1])] +
                                          [p for p in [os.environ.get("PYTHONPATH")] if p]))
    with tempfile.TemporaryDirectory() as out:
        argv = [sys.executable, "-c", STARTUP_SCRIPT, "--dataset", dataset, "--model", "vgg4bit", "--epochs", "1",
                "--max-steps-per-epoch", "1", "--batch-size", str(batch), "--tta", "none", "--no-progress",
                "--no-download", "--out", str(Path(out) / "run")]
        start = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        watchdog = threading.Timer(timeout, proc.kill)
        watchdog.start()
        lines = []
        try:
            for line in proc.stdout:
                if line.startswith("FIRST STEP DONE"):
                    return time.perf_counter() - start, int(line.split()[-1]) * 1024 / 1e6
                lines.append(line)
            raise RuntimeError("the trainer ended before finishing a step:\n" + "".join(lines[-20:]))
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close()


def bench_startup(batch, dataset):
    """(first run, second run): time to the first finished step with an empty, then a warm, Numba cache."""
    with tempfile.TemporaryDirectory() as cache_dir:
        first = time_to_first_step(batch, dataset, cache_dir)
        second = time_to_first_step(batch, dataset, cache_dir)
    return first, second


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

        f = median_seconds(fwd, repeats)
        fb = median_seconds(fwd_bwd, repeats)
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
    step_s = median_seconds(step, steps)
    model.eval()
    xe = torch.randn(1000, 3, 32, 32)
    with torch.no_grad():
        model(xe)
        eval_s = median_seconds(lambda: model(xe), 3)
    return dict(step=step_s, eval_s=eval_s, threads=torch.get_num_threads())


def target_rows(gemm_s, r, t, startup, w=None):
    """(target, measured, pass) per issue #12 target; measured None: not measured this run. The step
    targets are read for one process and for the workers `w` (per --batch images of its global step)."""
    def ratio(a, c):
        return None if a is None or c is None else a / c

    shared = ratio(r["shared_images_s"], r["idle_images_s"])
    fault_median = float(np.median(r["faults"]))
    per_batch_s = w and w["per_batch_s"]
    rows = [
        ("training step, 1 process, nanoq4/PyTorch time", "<= 0.5", ratio(r["step"], t and t["step"]), "{:.2f}",
         lambda v: v <= 0.5),
        ("training step, 1 process / bare im2col GEMM time", "<= 0.7", r["step"] / gemm_s, "{:.2f}",
         lambda v: v <= 0.7),
        (f"training step, {workers_label(w)}, nanoq4/PyTorch per image", "<= 0.5",
         ratio(per_batch_s, t and t["step"]), "{:.2f}", lambda v: v <= 0.5),
        (f"training step, {workers_label(w)} / bare GEMM per image", "<= 0.7", ratio(per_batch_s, gemm_s),
         "{:.2f}", lambda v: v <= 0.7),
        ("eval from .nq4 file, x PyTorch images/s", ">= 2.5", ratio(t and t["eval_s"], r["file_eval_s"]), "{:.2f}",
         lambda v: v >= 2.5),
        ("shared CPU: images/s kept", ">= 45%", shared, "{:.0%}", lambda v: v >= 0.45),
        ("peak RSS while training", "<= 1000 MB", r["train_rss"], "{:.0f} MB", lambda v: v <= 1000),
        ("page faults per step (median)", f"< {LARGE_BUFFER_FAULTS}", fault_median, "{:.0f}",
         lambda v: v < LARGE_BUFFER_FAULTS),
        ("trainer start to first step, 2nd run", "<= 5 s", startup and startup[1][0], "{:.1f} s", lambda v: v <= 5),
        ("trainer start to first step, 1st run", "report", startup and startup[0][0], "{:.1f} s", None),
        ("  of which compiling (1st - 2nd run)", "report", startup and startup[0][0] - startup[1][0], "{:.1f} s",
         None),
    ]
    return [(name, target, "n/a" if v is None else fmt.format(v),
             "n/a" if v is None else "-" if check is None else "pass" if check(v) else "FAIL")
            for name, target, v, fmt, check in rows]


def main(args):
    b = args.batch
    gflop = step_gflop(b)
    print(f"VGG4bit training step, batch {b}: {gflop:.1f} GFLOP")
    if args.default_malloc:
        print("malloc: defaults (--default-malloc; the trainer keeps freed memory for reuse)")
    else:
        print(f"malloc: freed memory kept for reuse, as the trainer does: "
              f"{'yes' if memory.keep_freed_memory() else 'not available here'}")
    r = bench_nanoq4(b, args.steps, 0 if args.no_shared_cpu else args.shared_steps)
    gemm_s = gemm_seconds(b)  # after training: its large matrices stay out of the training's peak RSS
    print(f"bare NumPy matmul on the same GEMM shapes: {gemm_s:.3f} s ({gflop / gemm_s:.0f} GFLOP/s)")

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
    print(f"page faults per timed step (minor + major): median {np.median(r['faults']):.0f}, "
          f"max {max(r['faults'])} ({LARGE_BUFFER_FAULTS} = one fresh 1 MiB buffer)")
    if r["shared_images_s"] is not None:
        print(f"shared CPU ({args.shared_steps} steps next to one busy single-threaded process): "
              f"{r['shared_images_s']:.0f} images/s vs {r['idle_images_s']:.0f} idle "
              f"({r['shared_images_s'] / r['idle_images_s']:.0%} kept); slowest step {r['shared_worst']:.2f} s")
    print(f"eval, batch 1000, no gradients: {1000 / r['eval_s']:.0f} images/s (training model), "
          f"{1000 / r['file_eval_s']:.0f} images/s (model loaded from the int4 file)")

    w = None
    if not args.no_workers and args.workers != 1:
        w = bench_workers(b, args.steps, args.workers, args.sync_bn, not args.default_malloc)
        if w is None:
            print(f"\nlocal workers: the trainer runs one process at the global batch {2 * b} on this machine "
                  f"(--workers N times N)")
        else:
            print("\n" + "\n".join(workers_report(w, b, args.steps, r["step"], gemm_s)))

    startup = None
    if not args.no_startup:
        startup = bench_startup(b, args.startup_dataset)
        (first_s, first_rss), (second_s, second_rss) = startup
        print(f"\ntrainer start to first finished step ({args.startup_dataset} data, batch {b}): "
              f"{first_s:.1f} s with an empty Numba cache, {second_s:.1f} s with the cache it wrote "
              f"(compiling took ~{first_s - second_s:.0f} s); trainer's peak RSS by then {second_rss:.0f} MB")

    t = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            print("\ntorch not installed: no PyTorch comparison (pip install torch==2.13.0)")
        else:
            t = bench_torch(b, args.steps)
            print(f"\nPyTorch {torch.__version__} ({t['threads']} threads): step {t['step']:.3f} s = "
                  f"{b / t['step']:.0f} images/s; eval {1000 / t['eval_s']:.0f} images/s")
            print(f"ratio nanoq4/PyTorch, training step time: {r['step'] / t['step']:.2f} "
                  f"(<= 1.0 means nanoq4 is faster)")
            if w is not None:
                print(f"ratio nanoq4 ({workers_label(w)})/PyTorch, time per {b} images: "
                      f"{w['per_batch_s'] / t['step']:.2f} (<= 1.0 means nanoq4 is faster)")
            print(f"ratio nanoq4/PyTorch, eval throughput: {t['eval_s'] / r['eval_s']:.2f} "
                  f"(>= 1.0 means nanoq4 is faster)")

    rows = target_rows(gemm_s, r, t, startup, w)
    width = max(len(row[0]) for row in rows) + 2
    print(f"\n{'issue #12 target':<{width}}{'target':>12}{'measured':>12}{'':>6}")
    for name, target, value, verdict in rows:
        print(f"{name:<{width}}{target:>12}{value:>12}  {verdict}")
    return 0


def parse_arguments(argv=None):
    """The command line (default sys.argv[1:]) -> its arguments; a bad flag, or a --workers count that
    cannot split the global batch, exits with a one-line error and code 2 before any work."""
    p = cli.ArgumentParser(prog=Path(__file__).name, description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=cli.int_at_least(2), default=128, help="images per step, >= 2 (default 128)")
    p.add_argument("--steps", type=cli.int_at_least(1), default=10, help="timed steps of each step timing: one process, workers, PyTorch (default 10)")
    p.add_argument("--shared-steps", type=cli.int_at_least(1), default=20,
                   help="timed steps next to a busy process (default 20)")
    p.add_argument("--no-torch", action="store_true", help="no PyTorch comparison")
    p.add_argument("--no-shared-cpu", action="store_true", help="skip the shared-CPU scenario")
    p.add_argument("--no-startup", action="store_true", help="skip the trainer start-up runs")
    one_or_many = p.add_mutually_exclusive_group()
    one_or_many.add_argument("--workers", type=cli.int_at_least(1), metavar="N",
                             help="local worker processes of the workers section, sharing the global batch 2 x "
                                  "--batch (default: as many as the trainer picks for that batch; 1: skip it)")
    one_or_many.add_argument("--no-workers", action="store_true", help="skip the local workers section")
    trainer_statistics = "global" if train_module.TrainConfig().resolved_sync_bn() else "per-worker"
    p.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
                   help=f"workers section: batch-norm statistics of the global batch (--sync-bn) or of each "
                        f"worker's share (--no-sync-bn); default the trainer's, now {trainer_statistics}")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave malloc's settings alone (the trainer calls nanoq4.memory.keep_freed_memory)")
    p.add_argument("--startup-dataset", default="synthetic", choices=("synthetic", "cifar10"),
                   help="data of the start-up runs (default synthetic; cifar10 reads $NANOQ4_DATA)")
    arguments = p.parse_args(argv)
    if arguments.workers:
        try:
            check_worker_count(arguments.workers, arguments.batch)
        except NanoQ4Error as e:
            p.error(str(e))
    return arguments


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    arguments = parse_arguments()
    sys.exit(cli.run_command(lambda: main(arguments)))
