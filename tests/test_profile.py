"""Per-op timing (nanoq4/profile.py): NANOQ4_PROFILE=1 times every Function's forward and backward
and the named blocks around them, and `python -m nanoq4.train` prints the table at the end; off,
nothing is timed."""
import contextlib
import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from nanoq4 import distributed, ops, profile
from nanoq4.tensor import Tensor
from nanoq4.train import main

TINY_RUN = ["--dataset", "synthetic", "--model", "simpleresnet4bit", "--epochs", "1", "--max-steps-per-epoch", "2",
            "--batch-size", "16", "--tta", "none", "--no-progress"]


def leaf(values):
    return Tensor(np.array(values, dtype=np.float64), requires_grad=True)


def test_profiler_records_forward_and_backward():
    with profile.profiling():
        x = leaf([1.0, 2.0])
        ops.relu(x).sum().backward()
    assert {"ReLU.forward", "ReLU.backward", "Sum.forward"} <= set(profile.seconds)
    assert "ReLU.forward" in profile.table()
    assert profile.calls["ReLU.forward"] == 1


def test_off_nothing_is_timed(monkeypatch):
    monkeypatch.setattr(profile, "enabled", False)
    profile.reset()
    assert profile.timed("a") is profile.timed("b"), "one shared do-nothing context, no timer made"
    ops.relu(leaf([1.0, -1.0])).sum().backward()
    assert not profile.seconds and not profile.calls


def test_table_gives_milliseconds_and_calls_per_step_slowest_first(monkeypatch):
    monkeypatch.setattr(profile, "seconds", {"Conv2d.forward": 0.6, "ReLU.forward": 0.2, "tiny": 1e-5})
    monkeypatch.setattr(profile, "calls", {"Conv2d.forward": 12, "ReLU.forward": 4, "tiny": 2})
    lines = profile.table(steps=2, min_ms=0.1).splitlines()
    assert lines[0].split() == ["op", "ms/step", "calls", "share"]
    assert lines[1].split() == ["Conv2d.forward", "300.000", "6", "75.0%"]
    assert lines[2].split() == ["ReLU.forward", "100.000", "2", "25.0%"]
    assert lines[3].split()[:3] == ["total", "timed", "400.005"], "rows left out still count in the total"
    assert len(lines) == 4


@pytest.fixture(scope="module")
def profiled_run(tmp_path_factory):
    """A tiny training run started as a user would: NANOQ4_PROFILE=1 python -m nanoq4.train ..."""
    env = {k: v for k, v in os.environ.items() if k not in distributed.LAUNCH_VARIABLES}
    env["NANOQ4_PROFILE"] = "1"
    out = tmp_path_factory.mktemp("profiled") / "run"
    result = subprocess.run([sys.executable, "-m", "nanoq4.train", *TINY_RUN, "--out", str(out)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def table_rows(stdout):
    """{op: (seconds, calls, share)} of the table printed after 'per-op time of this run'."""
    _, _, table = stdout.partition("per-op time of this run (NANOQ4_PROFILE=1):\n")
    rows = {}
    for line in table.splitlines()[1:]:
        m = re.match(r"^(\S+)\s+([\d.]+)\s+(\d+)\s+([\d.]+)%$", line)
        if m:
            rows[m.group(1)] = (float(m.group(2)), int(m.group(3)), float(m.group(4)))
    return rows


def test_training_with_NANOQ4_PROFILE_prints_the_table_after_the_final_report(profiled_run):
    assert profiled_run.index("FINAL test accuracy") < profiled_run.index("per-op time of this run")
    header = profiled_run.split("per-op time of this run (NANOQ4_PROFILE=1):\n")[1].splitlines()[0]
    assert header.split() == ["op", "seconds", "calls", "share"]


@pytest.mark.parametrize("op, calls", [("Conv2d.forward", None), ("Conv2d.backward", 2 * 6),
                                       ("STE.backward", 2 * 7), ("BatchNorm.backward", None),
                                       ("CrossEntropy.backward", 2), ("fake_quantize", None), ("SGD.step", 2),
                                       ("TanhSoftClip", 2)])
def test_profiled_training_has_a_row_per_op(profiled_run, op, calls):
    """2 steps of SimpleResNet4bit (6 quantized convolutions and a quantized linear layer): forward
    ops and the weights' fake quantization also run in the evaluation, backward and the optimizer
    only in the training steps."""
    rows = table_rows(profiled_run)
    assert op in rows, f"no row for {op}: {sorted(rows)}"
    seconds, count, share = rows[op]
    assert seconds >= 0 and 0 <= share <= 100
    if calls is not None:
        assert count == calls


def test_profiled_shares_add_up_to_the_whole(profiled_run):
    shares = [share for _, _, share in table_rows(profiled_run).values()]
    assert sum(shares) == pytest.approx(100, abs=0.05 * len(shares)), "each share is rounded to 0.1%"


def test_training_without_it_prints_no_table(tmp_path, monkeypatch):
    monkeypatch.setattr(profile, "enabled", False)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(TINY_RUN + ["--out", str(tmp_path / "run")]) == 0
    assert "FINAL" in out.getvalue() and "per-op time" not in out.getvalue()
