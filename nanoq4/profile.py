"""Per-op timing, tinygrad's DEBUG habit: `NANOQ4_PROFILE=1 python -m nanoq4.train ...` prints at the
end of the run where the time went.

What is timed: every Function's forward and backward (Function.apply and Tensor.backward time
them, "Conv2d.forward"), and named blocks outside any Function: the weights' fake quantization,
gradient clipping, the optimizer update and its post-step hooks. The blocks do not nest, so the
shares add up to the timed total. When profiling is off, timed() hands back one shared do-nothing
context: no clock is read and nothing is recorded.
"""
import contextlib
import os
import time
from collections import defaultdict

enabled = os.environ.get("NANOQ4_PROFILE", "0") not in ("", "0")
seconds = defaultdict(float)  # "Conv2d.forward" -> seconds spent in it
calls = defaultdict(int)      # "Conv2d.forward" -> times it ran
_UNTIMED = contextlib.nullcontext()


class _Timer:
    def __init__(self, name):
        self.name = name

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        seconds[self.name] += time.perf_counter() - self.start
        calls[self.name] += 1


def timed(name):
    """`with timed("fake_quantize"): ...` adds the block's time to seconds[name] while profiling is on."""
    return _Timer(name) if enabled else _UNTIMED


def reset():
    seconds.clear()
    calls.clear()


@contextlib.contextmanager
def profiling():
    """Record inside the block, whatever NANOQ4_PROFILE says, starting from an empty table
    (benchmarks, tests); the table stays readable after the block."""
    global enabled
    before, enabled = enabled, True
    reset()
    try:
        yield
    finally:
        enabled = before


def table(steps=None, min_ms=0.0):
    """The recorded times as a table, slowest first: per op the milliseconds per step (when `steps`
    is given) or the total seconds, the calls (per step), and the share of all recorded time; rows
    under `min_ms` per step are left out of the rows but not of the total."""
    per = steps or 1
    scale = 1e3 / per if steps else 1.0
    total = sum(seconds.values())
    lines = [f"{'op':<32}{'ms/step' if steps else 'seconds':>10}{'calls':>8}{'share':>8}"]
    for name, sec in sorted(seconds.items(), key=lambda kv: -kv[1]):
        if sec * 1e3 / per >= min_ms:
            lines.append(f"{name:<32}{sec * scale:>10.3f}{calls[name] / per:>8.4g}{sec / (total or 1):>8.1%}")
    lines.append(f"{'total timed':<32}{total * scale:>10.3f}")
    return "\n".join(lines)
