"""The trainer (nanoq4/train.py) end to end on the in-memory synthetic dataset (2000 train /
500 test images): the artefacts of a run, accuracy, exact resume after an interruption at an
epoch boundary or mid-epoch (with the command it prints), resume settings, the stop on a
non-finite loss, checkpoints never replaced by non-finite ones, and the divergence watch."""
import contextlib
import dataclasses
import io
import json
import os
import re
import shlex
import shutil
import signal

import numpy as np
import pytest

from nanoq4 import distributed, export, nn, ops, optim, safeguards
from nanoq4 import train as train_module
from nanoq4.errors import NanoQ4Error
from nanoq4.evaluate import evaluate_file
from nanoq4.safeguards import DivergenceWatch, all_finite
from nanoq4.tensor import Tensor
from nanoq4.train import TrainConfig, main, train

# Two short epochs (4 steps of 32 images each) with a fixed seed: a few seconds per run.
SMOKE = ["--dataset", "synthetic", "--model", "simpleresnet4bit", "--epochs", "2", "--max-steps-per-epoch", "4",
         "--batch-size", "32", "--seed", "5", "--no-progress"]
# Two epochs of 8 steps: room for the divergence watch (3 of the last 5 steps) within an epoch.
LONGER = SMOKE + ["--max-steps-per-epoch", "8"]
# A huge learning rate whose loss explodes but stays finite: clipped gradients bound each step.
HUGE_LR = ["--lr", "1000", "--grad-clip", "1"]
TIMING_KEYS = {"epoch_time", "train_images_per_s"}  # wall-clock measurements, never reproducible
EPOCH_KEYS = {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "grid"}


def run_main(argv):
    """(exit code, stdout) of the training CLI run in this process."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


def one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, f"expected one error line, got {err!r}"
    return err


def signal_after_step(n, signum, monkeypatch):
    """Send `signum` to this process right after the n-th optimizer step of the run."""
    real_step = optim.SGD.step
    calls = []

    def step_then_signal(self):
        real_step(self)
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(optim.SGD, "step", step_then_signal)
    return real_step


def read_metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def without_timing(history):
    return [{k: v for k, v in record.items() if k not in TIMING_KEYS} for record in history]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The uninterrupted reference run: SMOKE through main()."""
    folder = tmp_path_factory.mktemp("smoke")
    code, stdout = run_main(SMOKE + ["--out", str(folder)])
    return code, folder, stdout


# ----------------------------------------------------------------------------- a run's artefacts

def test_run_exits_with_status_0(smoke_run):
    code, _, stdout = smoke_run
    assert code == 0, stdout


@pytest.mark.parametrize("artefact", ["checkpoint.ckpt", "metrics.jsonl", "model.nq4"])
def test_run_writes_its_artefacts(smoke_run, artefact):
    _, folder, _ = smoke_run
    assert (folder / artefact).is_file()
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")], "temporary files left behind"


def test_run_writes_curves_png_when_matplotlib_is_installed(smoke_run):
    pytest.importorskip("matplotlib")
    _, folder, _ = smoke_run
    assert (folder / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_start_with_the_config(smoke_run):
    _, folder, _ = smoke_run
    config = read_metrics(folder)[0]["config"]
    assert config["model"] == "simpleresnet4bit" and config["dataset"] == "synthetic"
    assert config["epochs"] == 2 and config["batch_size"] == 32 and config["seed"] == 5
    assert config["out"] == str(folder)


def test_metrics_hold_one_record_per_epoch(smoke_run):
    _, folder, _ = smoke_run
    records = read_metrics(folder)[1:]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert EPOCH_KEYS <= set(r), f"missing {EPOCH_KEYS - set(r)}"
        assert 0 <= r["train_acc"] <= 1 and 0 <= r["test_acc"] <= 1
        assert np.isfinite(r["train_loss"]) and np.isfinite(r["test_loss"]) and r["lr"] >= 0


def test_metrics_grid_stats_cover_every_quantized_layer(smoke_run):
    _, folder, _ = smoke_run
    for record in read_metrics(folder)[1:]:
        grid = record["grid"]
        assert len(grid) == 7, "SimpleResNet4bit has 7 quantized layers"
        for layer in grid:
            assert layer["levels_total"] == 15 and 1 <= layer["levels_used"] <= 15
            assert 0 <= layer["frac_at_max"] <= 1 and 0 <= layer["flip_rate"] <= 1
            assert layer["scale"] > 0


def test_exported_model_loads_with_the_run_architecture(smoke_run):
    _, folder, _ = smoke_run
    model = export.load_model(folder / "model.nq4")
    assert model.arch == dict(model="simpleresnet4bit", num_classes=10, quantize=True, bits=4,
                              per_channel=TrainConfig().per_channel)
    assert model.class_names == [f"pattern{i}" for i in range(10)]


def test_output_reports_the_final_test_accuracy(smoke_run):
    _, folder, stdout = smoke_run
    final = read_metrics(folder)[-1]
    assert TrainConfig().tta != "none", "the smoke run should exercise the default test-time augmentation"
    assert (f"FINAL test accuracy (epoch 2): {final['test_acc_tta']:.2%} with test-time augmentation "
            f"{TrainConfig().tta} ({final['test_acc']:.2%} without)") in stdout


def test_output_reports_the_model_sizes(smoke_run):
    _, folder, stdout = smoke_run
    size_mib = (folder / "model.nq4").stat().st_size / 2 ** 20
    assert "model size: float32 0.28 MiB" in stdout
    assert f"int4 file {size_mib:.2f} MiB" in stdout


def test_final_checkpoint_marks_the_run_finished(smoke_run):
    _, folder, _ = smoke_run
    ckpt = export.load_checkpoint(folder / "checkpoint.ckpt")
    assert (ckpt["epoch"], ckpt["batch"], ckpt["partial"]) == (2, 0, None)
    assert without_timing(ckpt["history"]) == without_timing(read_metrics(folder)[1:])


def test_fp32_run_exports_a_float_model(tmp_path):
    code, _ = run_main(SMOKE + ["--fp32", "--epochs", "1", "--max-steps-per-epoch", "2", "--out", str(tmp_path)])
    assert code == 0
    model = export.load_model(tmp_path / "model.nq4")
    assert model.arch["quantize"] is False
    assert read_metrics(tmp_path)[1]["grid"] == []


# ----------------------------------------------------------------------------- accuracy

@pytest.fixture(scope="module")
def full_epoch_run(tmp_path_factory):
    """One full epoch (32 steps of 64 images), warm-up over the first quarter: a small CNN
    learns the synthetic patterns (>97% in our runs)."""
    folder = tmp_path_factory.mktemp("full")
    cfg = TrainConfig(dataset="synthetic", model="simpleresnet4bit", epochs=1, batch_size=64, warmup_epochs=0.25,
                      progress=False, out=str(folder))
    with contextlib.redirect_stdout(io.StringIO()):
        history = train(cfg)
    return history, folder


def test_full_epoch_on_synthetic_data_reaches_90_percent(full_epoch_run):
    history, _ = full_epoch_run
    assert history[-1]["test_acc"] >= 0.90, f"test accuracy {history[-1]['test_acc']:.2%}"


def test_train_returns_the_history_it_wrote(full_epoch_run):
    history, folder = full_epoch_run
    assert history == read_metrics(folder)[1:]


# ----------------------------------------------------------------------------- learning-rate schedule

STEPS = 10  # steps per epoch in the schedule tests


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_schedule_warms_up_to_the_peak_then_decays_towards_zero(schedule):
    cfg = TrainConfig(schedule=schedule, epochs=3)
    peak = cfg.resolved_lr()
    lr = train_module.make_schedule(cfg, STEPS)
    rates = [lr(step) for step in range(3 * STEPS)]
    assert max(rates) == pytest.approx(peak)
    assert rates[0] < peak and rates[-1] < peak * 0.1


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_one_epoch_run_with_default_warmup_still_decays(schedule):
    lr = train_module.make_schedule(TrainConfig(schedule=schedule, epochs=1), STEPS)
    assert lr(STEPS - 1) < 0.5 * 0.05, f"the last step runs at {lr(STEPS - 1)}, the peak rate is 0.05"


# ----------------------------------------------------------------------------- resume

def assert_same_run(resumed, reference):
    """Bit-identical weights, optimizer state, history (but wall-clock times) and model file."""
    got = export.load_checkpoint(resumed / "checkpoint.ckpt")
    want = export.load_checkpoint(reference / "checkpoint.ckpt")
    assert list(got["model"]) == list(want["model"])
    differing = {name: float(np.abs(got["model"][name] - want["model"][name]).max())
                 for name in want["model"] if not np.array_equal(got["model"][name], want["model"][name])}
    assert not differing, f"weights differ from the uninterrupted run (max abs difference): {differing}"
    for group_got, group_want in zip(got["optimizer"]["state"], want["optimizer"]["state"]):
        for s_got, s_want in zip(group_got, group_want):
            assert all(np.array_equal(a, b) for a, b in zip(s_got, s_want)), "optimizer buffers differ"
    assert got["optimizer"]["step_count"] == want["optimizer"]["step_count"]
    assert without_timing(read_metrics(resumed)[1:]) == without_timing(read_metrics(reference)[1:])
    assert (resumed / "model.nq4").read_bytes() == (reference / "model.nq4").read_bytes()


def test_resume_from_an_epoch_boundary_equals_the_uninterrupted_run(smoke_run, tmp_path, monkeypatch):
    real_evaluate = train_module.evaluate
    calls = []

    def evaluate_then_stop_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the end of epoch 2: the epoch-1 checkpoint is the last one saved
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", evaluate_then_stop_in_epoch_2)
    code, _ = run_main(SMOKE + ["--out", str(tmp_path)])
    assert code == 130
    ckpt = export.load_checkpoint(tmp_path / "checkpoint.ckpt")
    assert (ckpt["epoch"], ckpt["batch"]) == (1, 0)

    monkeypatch.setattr(train_module, "evaluate", real_evaluate)
    code, stdout = run_main(SMOKE + ["--out", str(tmp_path), "--resume"])
    assert code == 0
    assert "resumed" in stdout and "epoch 2, batch 0" in stdout
    assert_same_run(tmp_path, smoke_run[1])


def test_resume_from_mid_epoch_equals_the_uninterrupted_run(smoke_run, tmp_path, monkeypatch):
    """Ctrl-C during epoch 1: the loop saves at the next batch boundary and stops."""
    real_step = optim.Optimizer.step
    calls = []

    def step_then_interrupt(self):
        real_step(self)
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(optim.SGD, "step", step_then_interrupt)
    code, _ = run_main(SMOKE + ["--out", str(tmp_path)])
    assert code == 130
    ckpt = export.load_checkpoint(tmp_path / "checkpoint.ckpt")
    assert (ckpt["epoch"], ckpt["batch"]) == (0, 3), "saved before the 4th batch of epoch 1"
    assert ckpt["partial"][2] == 3 * 32, "the running sums of the 3 finished batches are kept"

    monkeypatch.setattr(optim.SGD, "step", real_step)
    code, stdout = run_main(SMOKE + ["--out", str(tmp_path), "--resume", str(tmp_path / "checkpoint.ckpt")])
    assert code == 0
    assert "epoch 1, batch 3" in stdout
    assert_same_run(tmp_path, smoke_run[1])


# ----------------------------------------------------------------------------- non-finite loss

def nan_loss_on_training_step(n, monkeypatch):
    """The n-th training loss (counted over the run) becomes NaN; evaluation losses are not counted."""
    real = ops.cross_entropy
    calls = []

    def cross_entropy(logits, *args, **kwargs):
        loss = real(logits, *args, **kwargs)
        if logits.requires_grad:
            calls.append(1)
            if len(calls) == n:
                return Tensor(np.float32(np.nan))
        return loss

    monkeypatch.setattr(ops, "cross_entropy", cross_entropy)


def smoke_config(out):
    return TrainConfig(dataset="synthetic", model="simpleresnet4bit", epochs=2, max_steps_per_epoch=4, batch_size=32,
                       seed=5, progress=False, out=str(out))


def test_non_finite_loss_stops_the_run_naming_the_step(tmp_path, monkeypatch):
    nan_loss_on_training_step(3, monkeypatch)
    with pytest.raises(NanoQ4Error, match=r"loss became nan at epoch 1 step 3") as info:
        with contextlib.redirect_stdout(io.StringIO()):
            train(smoke_config(tmp_path))
    assert "\n" not in str(info.value)


def test_non_finite_loss_names_the_last_good_checkpoint(tmp_path, monkeypatch):
    nan_loss_on_training_step(4 + 2, monkeypatch)  # epoch 2, step 2
    with pytest.raises(NanoQ4Error, match="epoch 2 step 2") as info:
        with contextlib.redirect_stdout(io.StringIO()):
            train(smoke_config(tmp_path))
    assert str(tmp_path / "checkpoint.ckpt") in str(info.value)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_huge_learning_rate_ends_with_exit_code_2_and_one_line(tmp_path, capsys):
    code = main(SMOKE + ["--lr", "1e30", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err
    assert "step" in err and "lower" in err and "--lr" in err


# ----------------------------------------------------------------------------- signals and the printed command

def test_sigterm_during_training_saves_a_checkpoint_and_exits_143(tmp_path, monkeypatch):
    signal_after_step(3, signal.SIGTERM, monkeypatch)
    code, _ = run_main(SMOKE + ["--out", str(tmp_path)])
    assert code == 143
    ckpt = export.load_checkpoint(tmp_path / "checkpoint.ckpt")
    assert (ckpt["epoch"], ckpt["batch"]) == (0, 3)


def test_the_printed_resume_command_continues_the_run_exactly(smoke_run, tmp_path, monkeypatch):
    """Ctrl-C prints `python -m nanoq4.train --resume PATH`; run as printed (no other flag,
    a folder name with a space) it ends where the uninterrupted run ends."""
    out = tmp_path / "my run"
    real_step = signal_after_step(3, signal.SIGINT, monkeypatch)
    code, stdout = run_main(SMOKE + ["--out", str(out)])
    assert code == 130
    [command] = re.findall(r"continue with: (.+)", stdout)
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "nanoq4.train"], command
    monkeypatch.setattr(optim.SGD, "step", real_step)
    code, _ = run_main(argv[3:])
    assert code == 0
    assert_same_run(out, smoke_run[1])


# ----------------------------------------------------------------------------- resume settings

@pytest.fixture(scope="module")
def epoch_1_checkpoint(tmp_path_factory):
    """A LONGER run stopped (Ctrl-C) at the end of epoch 2: its checkpoint holds epoch 1. Tests
    that resume copy it first, so it stays as made."""
    folder = tmp_path_factory.mktemp("epoch1")
    real_evaluate = train_module.evaluate
    calls = []

    def evaluate_then_stop_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "evaluate", evaluate_then_stop_in_epoch_2)
        code, _ = run_main(LONGER + ["--out", str(folder)])
    assert code == 130
    return folder / "checkpoint.ckpt"


def copy_checkpoint(path, folder):
    folder.mkdir(exist_ok=True)
    return shutil.copy(path, folder / "checkpoint.ckpt")


RESUME_CHANGES = {  # flags that differ from the checkpoint's settings -> what the refusal names
    "learning rate": (["--lr", "0.05"], "lr=0.1 (given 0.05)"),
    "schedule": (["--schedule", "cosine"], "schedule='onecycle'"),
    "augmentation": (["--no-augment"], "augment=True"),
    "weight decay": (["--weight-decay", "0"], "weight_decay=0.0005"),
    "label smoothing": (["--label-smoothing", "0"], "label_smoothing=0.2"),
    "optimizer recipe": (["--recipe", "paper"], "optimizer='sgd'"),
    "flip mode": (["--flip", "alternate"], "flip='random'"),
    "batch-norm re-estimation": (["--bn-reestimate", "2"], "bn_reestimate=0"),
    "weight averaging": (["--lookahead", "2"], "lookahead=0"),
    "batch-norm momentum": (["--bn-momentum", "0.4"], "bn_momentum=0.1"),
}


@pytest.mark.parametrize("case", list(RESUME_CHANGES))
def test_resume_with_other_hyperparameters_is_refused_naming_them(case, epoch_1_checkpoint, capsys):
    flags, named = RESUME_CHANGES[case]
    before = epoch_1_checkpoint.read_bytes()
    code, _ = run_main(["--resume", str(epoch_1_checkpoint)] + flags)
    err = one_line_error(capsys)
    assert code == 2
    assert named in err
    assert "--allow-changes" in err or "cannot change" in err
    assert epoch_1_checkpoint.read_bytes() == before


@pytest.mark.parametrize("flags, named", [(["--seed", "6"], "seed=5"), (["--batch-size", "16"], "batch_size=32"),
                                          (["--epochs", "3"], "epochs=2"), (["--model", "vgg4bit"], "model=")])
def test_resume_never_changes_the_run_identity_even_when_allowed(flags, named, epoch_1_checkpoint, capsys):
    code, _ = run_main(["--resume", str(epoch_1_checkpoint), "--allow-changes"] + flags)
    err = one_line_error(capsys)
    assert code == 2
    assert named in err and "cannot change" in err


def test_allow_changes_trains_on_with_the_new_settings_and_records_them(epoch_1_checkpoint, tmp_path):
    ckpt = copy_checkpoint(epoch_1_checkpoint, tmp_path)
    code, stdout = run_main(["--resume", str(ckpt), "--lr", "0.05", "--allow-changes"])
    assert code == 0, stdout
    assert "settings changed on resume" in stdout and "lr 0.1 -> 0.05" in stdout
    config, *records = read_metrics(tmp_path)
    assert config["config"]["lr"] == 0.05
    assert [r.get("changed_settings") for r in records] == [None, {"lr": [0.1, 0.05]}]


def test_resume_with_the_same_flags_typed_again_is_accepted(epoch_1_checkpoint, tmp_path):
    ckpt = copy_checkpoint(epoch_1_checkpoint, tmp_path)
    code, stdout = run_main(LONGER + ["--lr", "0.1", "--resume", str(ckpt)])
    assert code == 0, stdout
    assert "epoch 2, batch 0" in stdout


def test_damaged_checkpoint_is_refused_on_resume(epoch_1_checkpoint, tmp_path, capsys):
    raw = bytearray(epoch_1_checkpoint.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    damaged = tmp_path / "checkpoint.ckpt"
    damaged.write_bytes(bytes(raw))
    code, _ = run_main(["--resume", str(damaged)])
    err = one_line_error(capsys)
    assert code == 2
    assert "damaged" in err and str(damaged) in err
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.ckpt"]


# ----------------------------------------------------------------------------- non-finite checkpoints

def blow_up_after_step(n, what, monkeypatch):
    """Right after the n-th optimizer step, a weight or a momentum buffer becomes NaN. That step's
    loss was computed before, so only the checkpoint guard can notice."""
    real_step = optim.SGD.step
    calls = []

    def step_then_blow_up(self):
        real_step(self)
        calls.append(1)
        if len(calls) == n:
            target = self.parameters()[0].data if what == "weights" else self.state[0][0]
            target.flat[0] = np.nan

    monkeypatch.setattr(optim.SGD, "step", step_then_blow_up)
    return real_step


@pytest.mark.parametrize("what", ["weights", "optimizer state"])
def test_blow_up_on_the_last_step_of_an_epoch_keeps_the_good_checkpoint(what, smoke_run, tmp_path, monkeypatch,
                                                                        capsys):
    real_step = blow_up_after_step(8, what, monkeypatch)  # the 4th and last step of epoch 2
    code, _ = run_main(SMOKE + ["--out", str(tmp_path)])
    err = one_line_error(capsys)
    assert code == 2
    assert f"the {what} became non-finite during epoch 2" in err
    ckpt_path = tmp_path / "checkpoint.ckpt"
    assert f"last good checkpoint {ckpt_path}" in err
    ckpt = export.load_checkpoint(ckpt_path)
    assert (ckpt["epoch"], ckpt["batch"]) == (1, 0), "the epoch-1 checkpoint must stay"
    assert all_finite(ckpt["model"]) and all_finite(ckpt["optimizer"])
    assert not (tmp_path / "model.nq4").exists()

    monkeypatch.setattr(optim.SGD, "step", real_step)  # the named checkpoint really resumes the run
    code, _ = run_main(["--resume", str(ckpt_path)])
    assert code == 0
    assert_same_run(tmp_path, smoke_run[1])


def test_blow_up_before_the_first_checkpoint_says_none_was_saved(tmp_path, monkeypatch, capsys):
    blow_up_after_step(4, "weights", monkeypatch)  # the last step of epoch 1
    code, _ = run_main(SMOKE + ["--out", str(tmp_path)])
    err = one_line_error(capsys)
    assert code == 2
    assert "no checkpoint was saved yet" in err and "--lr" in err
    assert not (tmp_path / "checkpoint.ckpt").exists()


def test_non_finite_metrics_never_replace_the_checkpoint(tmp_path, monkeypatch, capsys):
    real_evaluate = train_module.evaluate
    calls = []

    def infinite_test_loss_in_epoch_2(*args, **kwargs):
        loss, accuracy, predictions = real_evaluate(*args, **kwargs)
        calls.append(1)
        return (np.inf if len(calls) == 2 else loss), accuracy, predictions

    monkeypatch.setattr(train_module, "evaluate", infinite_test_loss_in_epoch_2)
    code, _ = run_main(SMOKE + ["--out", str(tmp_path)])
    err = one_line_error(capsys)
    assert code == 2
    assert "the metrics became non-finite during epoch 2" in err
    assert export.load_checkpoint(tmp_path / "checkpoint.ckpt")["epoch"] == 1


def test_non_finite_checkpoint_of_an_older_nanoq4_is_refused_on_resume(epoch_1_checkpoint, tmp_path, capsys):
    state = export.load_checkpoint(epoch_1_checkpoint)
    first = next(iter(state["model"]))
    state["model"][first] = np.full_like(state["model"][first], np.inf)
    export.save_checkpoint(tmp_path / "checkpoint.ckpt", **{k: v for k, v in state.items()
                                                            if k not in ("format", "version")})
    code, _ = run_main(["--resume", str(tmp_path / "checkpoint.ckpt")])
    err = one_line_error(capsys)
    assert code == 2
    assert "non-finite" in err and "model" in err


# ----------------------------------------------------------------------------- divergence

@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_huge_learning_rate_stops_as_diverged_instead_of_ending_at_chance(tmp_path, capsys):
    code, stdout = run_main(LONGER + HUGE_LR + ["--out", str(tmp_path)])
    err = one_line_error(capsys)
    assert code == 2, stdout
    assert "diverged" in err and "epoch 1" in err and "--lr" in err, err
    assert "FINAL" not in stdout and not (tmp_path / "model.nq4").exists()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_divergence_keeps_the_last_good_checkpoint(epoch_1_checkpoint, tmp_path, capsys):
    ckpt = copy_checkpoint(epoch_1_checkpoint, tmp_path)
    before = ckpt.read_bytes()
    code, stdout = run_main(["--resume", str(ckpt), "--allow-changes"] + HUGE_LR)
    err = one_line_error(capsys)
    assert code == 2, stdout
    assert "diverged" in err and f"last good checkpoint {ckpt}" in err
    assert ckpt.read_bytes() == before


def test_healthy_run_stays_far_below_the_divergence_limit(full_epoch_run):
    """The default recipe on synthetic data (32 steps to >90%): no stop, and its losses stay
    under half of the limit, so the default factor 4 is not close to a healthy run."""
    _, folder = full_epoch_run
    state = export.load_checkpoint(folder / "checkpoint.ckpt")["divergence"]
    limit = TrainConfig().divergence_factor * max(state["first"], np.log(10))
    assert len(state["recent"]) == safeguards.DIVERGENCE_WINDOW
    assert max(state["recent"]) < limit / 2, state


def test_accuracy_at_chance_after_the_warm_up_stops_the_run(tmp_path, monkeypatch, capsys):
    """The rule's wiring: with every accuracy counted as chance level and 4 steps required after
    the 2-step warm-up, epoch 1 (2 steps after it) passes and epoch 2 (6 after) stops."""
    monkeypatch.setattr(safeguards, "CHANCE_MIN_STEPS", 4)
    monkeypatch.setattr(safeguards, "CHANCE_MARGIN", 1.0)
    code, _ = run_main(SMOKE + ["--out", str(tmp_path)])
    err = one_line_error(capsys)
    assert code == 2
    assert "chance level" in err and "epoch 2" in err
    assert f"last good checkpoint {tmp_path / 'checkpoint.ckpt'}" in err
    assert export.load_checkpoint(tmp_path / "checkpoint.ckpt")["epoch"] == 1


def test_divergence_factor_0_turns_the_watch_off():
    watch = DivergenceWatch(0, 10, 0.1, 0.1)
    assert not any(watch.loss_diverged(loss) for loss in [2.3] + [1e6] * 10)
    assert not watch.at_chance(0.1, 0.1, 10 ** 6) and not watch.loss_above_limit()


def test_one_loss_spike_is_not_divergence():
    watch = DivergenceWatch(4.0, 10, 0.1, 0.1)
    losses = [2.3, 2.2, 50.0, 2.1, 2.0, 100.0, 1.9, 1.8, 1.7, 1.6, 1.5]
    assert not any(watch.loss_diverged(loss) for loss in losses)
    assert not watch.loss_above_limit(), "the spikes left the window"


def test_three_of_five_losses_above_the_limit_are_divergence_despite_lucky_steps():
    watch = DivergenceWatch(4.0, 10, 0.1, 0.1)
    fired = [watch.loss_diverged(loss) for loss in [2.3, 50.0, 1.0, 50.0, 1.0, 50.0]]
    assert fired == [False] * 5 + [True]
    assert "above 9.21" in watch.loss_report()


def test_divergence_limit_is_at_least_factor_times_ln_classes():
    """A first loss below ln(classes) (label noise aside, an untrained net is near it) must not
    make the limit tiny."""
    watch = DivergenceWatch(4.0, 10, 0.1, 0.1)
    assert not any(watch.loss_diverged(loss) for loss in [0.1, 5.0, 5.0, 5.0, 5.0])


def test_divergence_watch_state_round_trips():
    a = DivergenceWatch(4.0, 10, 0.1, 0.1)
    for loss in (2.3, 50.0, 50.0):
        a.loss_diverged(loss)
    b = DivergenceWatch(4.0, 10, 0.1, 0.1, state=a.state())
    assert a.loss_diverged(50.0) and b.loss_diverged(50.0), "the third high loss fires in both"


def test_chance_rule_needs_the_steps_after_the_warm_up_and_both_accuracies():
    watch = DivergenceWatch(4.0, 10, 0.1, 0.1)
    steps = safeguards.CHANCE_MIN_STEPS
    assert watch.at_chance(0.10, 0.11, steps)
    assert not watch.at_chance(0.10, 0.11, steps - 1)
    assert not watch.at_chance(0.30, 0.11, steps), "a run that learns its training set is not at chance"
    assert not watch.at_chance(0.10, 0.25, steps)


# ----------------------------------------------------------------------------- review fixes

def test_resolved_learning_rate_is_saved_as_a_number(smoke_run):
    """A later change of the default lr must not change what a resumed run trains with."""
    _, folder, _ = smoke_run
    assert read_metrics(folder)[0]["config"]["lr"] == TrainConfig().resolved_lr()
    assert export.load_checkpoint(folder / "checkpoint.ckpt")["config"]["lr"] == TrainConfig().resolved_lr()


def test_checkpoint_of_an_older_nanoq4_resumes_with_its_own_dropout_and_lr(epoch_1_checkpoint):
    """Configs written before `dropout` existed trained with dropout 0.5 and lr None = 0.05 (sgd)."""
    saved = dict(export.load_checkpoint(epoch_1_checkpoint)["config"])
    del saved["dropout"], saved["tta"]
    saved["lr"] = None
    cfg, changes = train_module.resumed_config(TrainConfig(resume="x"), saved, given={"resume"})
    assert (cfg.dropout, cfg.tta, cfg.resolved_lr(), changes) == (0.5, "none", 0.05, {})


def test_checkpoint_without_the_flip_and_bn_settings_resumes_with_what_it_trained_with(epoch_1_checkpoint):
    """Written before --flip and --bn-reestimate: random flips, no re-estimation; changing them needs
    --allow-changes, as for any setting the checkpoint holds."""
    saved = dict(export.load_checkpoint(epoch_1_checkpoint)["config"])
    del saved["flip"], saved["bn_reestimate"]
    cfg, _ = train_module.resumed_config(TrainConfig(resume="x", flip="alternate", bn_reestimate=5), saved,
                                         given={"resume"})
    assert (cfg.flip, cfg.bn_reestimate) == ("random", 0)
    with pytest.raises(NanoQ4Error, match="flip='random' .given 'alternate'.*--allow-changes"):
        train_module.resumed_config(TrainConfig(resume="x", flip="alternate"), saved, given={"resume", "flip"})


def test_checkpoint_without_the_lookahead_settings_resumes_with_the_lever_off(epoch_1_checkpoint):
    """Written before --lookahead, --lookahead-decay and --bn-momentum: no averaging, momentum 0.1."""
    saved = dict(export.load_checkpoint(epoch_1_checkpoint)["config"])
    del saved["lookahead"], saved["lookahead_decay"], saved["bn_momentum"]
    cfg, _ = train_module.resumed_config(TrainConfig(resume="x", lookahead=5, lookahead_decay=0.5, bn_momentum=0.4),
                                         saved, given={"resume"})
    assert (cfg.lookahead, cfg.lookahead_decay, cfg.bn_momentum) == (0, 0.95, 0.1)


def test_tta_may_change_on_resume_without_allow_changes(epoch_1_checkpoint):
    saved = export.load_checkpoint(epoch_1_checkpoint)["config"]
    other = "none" if saved["tta"] != "none" else "flip"
    cfg, changes = train_module.resumed_config(TrainConfig(resume="x", tta=other), saved, given={"resume", "tta"})
    assert cfg.tta == other and changes == {}


# ----------------------------------------------------------------------------- the default number of epochs

def settled(values, given):
    """The config a run goes with: what settle_config makes of TrainConfig(**values) before any work."""
    return train_module.settle_config(TrainConfig(**values), given, distributed.SingleProcess())[0]


@pytest.mark.parametrize("argv, epochs", [
    ([], 22), (["--dataset", "cifar10"], 22), (["--dataset", "cifar100"], 18), (["--dataset", "cifar100", "--coarse"], 18),
    (["--dataset", "synthetic"], 13), (["--dataset", "cifar10", "--epochs", "5"], 5),
    (["--dataset", "cifar100", "--epochs", "5"], 5), (["--dataset", "cifar100", "--recipe", "paper"], 150),
])
def test_without_epochs_a_run_trains_for_its_datasets_default(argv, epochs):
    """22 epochs on CIFAR-10, 18 on CIFAR-100, 13 elsewhere (README: Results); --epochs and
    --recipe paper's 150 always win. Settled into an int before any work starts."""
    values = train_module.flag_values(argv)
    cfg = settled(values, values)
    assert cfg.epochs == epochs and type(cfg.epochs) is int, f"{argv}: {cfg.epochs!r} epochs, expected {epochs}"


@pytest.mark.parametrize("dataset, epochs", [("cifar10", 22), ("cifar100", 18)])
def test_library_config_without_epochs_trains_for_its_datasets_default(dataset, epochs):
    """nanoq4.train(TrainConfig(dataset=...)): the config's None resolves as on the command line, and
    the schedule (built from a config not yet settled, as docs/make_figures.py does) lasts as long."""
    assert settled(dict(dataset=dataset), None).epochs == epochs
    assert settled(dict(dataset=dataset, epochs=3), None).epochs == 3
    lr = train_module.make_schedule(TrainConfig(dataset=dataset), STEPS)
    assert lr(epochs * STEPS - 1) > 0 and lr(epochs * STEPS) == 0, f"the schedule of {dataset} is not {epochs} epochs"


def test_resumed_run_keeps_the_number_of_epochs_of_its_checkpoint(epoch_1_checkpoint):
    """A CIFAR-100 checkpoint written when its default was 13 epochs goes on for 13, not today's 18;
    --epochs given again must agree with it, even with --allow-changes."""
    saved = dict(export.load_checkpoint(epoch_1_checkpoint)["config"], dataset="cifar100", epochs=13)
    cfg, changes = train_module.resumed_config(TrainConfig(resume="x"), saved, given={"resume"})
    assert (cfg.epochs, changes) == (13, {})
    cfg, _ = train_module.resumed_config(TrainConfig(resume="x", epochs=13), saved, given={"resume", "epochs"})
    assert cfg.epochs == 13
    with pytest.raises(NanoQ4Error, match=r"epochs=13 \(given 18\).*--epochs cannot change"):
        train_module.resumed_config(TrainConfig(resume="x", epochs=18, allow_changes=True), saved,
                                    given={"resume", "epochs"})


def test_default_number_of_epochs_is_saved_as_a_number_and_a_resumed_run_keeps_it(smoke_run, tmp_path,
                                                                                    monkeypatch):
    """A run without --epochs saves its dataset's default (here made 2 for the synthetic data) as an
    int in metrics.jsonl and the checkpoint; changing the default afterwards does not change the
    resumed run, which ends as the run with --epochs 2 typed."""
    monkeypatch.setitem(train_module.DATASET_EPOCHS, "synthetic", 2)
    at = SMOKE.index("--epochs")
    without_epochs = SMOKE[:at] + SMOKE[at + 2:]
    real_step = signal_after_step(3, signal.SIGINT, monkeypatch)
    code, _ = run_main(without_epochs + ["--out", str(tmp_path)])
    assert code == 130
    saved = export.load_checkpoint(tmp_path / "checkpoint.ckpt")["config"]["epochs"]
    assert saved == 2 and type(saved) is int, f"the checkpoint holds epochs={saved!r}"
    assert read_metrics(tmp_path)[0]["config"]["epochs"] == 2

    monkeypatch.setattr(optim.SGD, "step", real_step)
    monkeypatch.setitem(train_module.DATASET_EPOCHS, "synthetic", 3)
    code, stdout = run_main(["--resume", str(tmp_path / "checkpoint.ckpt")])
    assert code == 0, stdout
    assert "epoch 2/2:" in stdout
    assert_same_run(tmp_path, smoke_run[1])


def test_chance_rule_is_off_when_one_class_is_most_of_the_data():
    """With 90% of the images in one class a healthy run sits near 90%: not a divergence."""
    steps = safeguards.CHANCE_MIN_STEPS
    assert not DivergenceWatch(4.0, 2, 0.9, 0.9).at_chance(0.91, 0.90, steps)
    assert DivergenceWatch(4.0, 10, 0.1, 0.1).at_chance(0.10, 0.10, steps)


def test_test_loss_above_the_limit_is_seen():
    watch = DivergenceWatch(4.0, 10, 0.1, 0.1)
    watch.loss_diverged(2.3)
    assert watch.above_limit(10.0) and not watch.above_limit(9.0)
    assert not DivergenceWatch(0, 10, 0.1, 0.1).above_limit(1e9)


def test_weights_blown_up_by_an_epochs_last_steps_keep_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    """The epoch's training losses were fine but its test loss (on the weights a checkpoint would
    hold) is above the limit: the run stops and the epoch-1 checkpoint stays. SMOKE warms up for 2
    steps: epoch 1 ends 2 steps after it (rule not yet on), epoch 2 ends 6 after."""
    monkeypatch.setattr(safeguards, "CHANCE_MIN_STEPS", 5)
    real_evaluate = train_module.evaluate
    calls = []

    def second_epoch_test_loss_explodes(*args, **kwargs):
        loss, acc, preds = real_evaluate(*args, **kwargs)
        calls.append(1)
        return (1e3 if len(calls) == 2 else loss), acc, preds

    monkeypatch.setattr(train_module, "evaluate", second_epoch_test_loss_explodes)
    code, _ = run_main(SMOKE + ["--tta", "none", "--out", str(tmp_path)])
    err = one_line_error(capsys)
    assert code == 2
    assert "diverged by the end of epoch 2" in err and f"last good checkpoint {tmp_path / 'checkpoint.ckpt'}" in err
    assert export.load_checkpoint(tmp_path / "checkpoint.ckpt")["epoch"] == 1


def test_signal_during_the_final_evaluation_exits_130_and_resuming_exports(tmp_path, monkeypatch):
    real_evaluate = train_module.evaluate
    calls = []

    def ctrl_c_during_the_last_evaluation(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # epoch 2 (the last) of SMOKE with --tta none
            signal.raise_signal(signal.SIGINT)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", ctrl_c_during_the_last_evaluation)
    code, stdout = run_main(SMOKE + ["--tta", "none", "--out", str(tmp_path)])
    assert code == 130, stdout
    assert not (tmp_path / "model.nq4").exists()
    monkeypatch.setattr(train_module, "evaluate", real_evaluate)
    code, stdout = run_main(["--resume", str(tmp_path / "checkpoint.ckpt")])
    assert code == 0 and (tmp_path / "model.nq4").exists() and "FINAL" in stdout


# ----------------------------------------------------------------------------- --bn-reestimate and --flip alternate

@pytest.fixture(scope="module")
def reestimated_run(tmp_path_factory):
    """SMOKE with --bn-reestimate 3: the smoke run's training, then new batch-norm statistics."""
    folder = tmp_path_factory.mktemp("reestimated")
    code, stdout = run_main(SMOKE + ["--bn-reestimate", "3", "--out", str(folder)])
    assert code == 0, stdout
    return folder, stdout


def test_bn_reestimate_changes_only_the_batch_norm_statistics(reestimated_run, smoke_run):
    """The weights, optimizer state, dropout stream and metrics up to the last evaluation are the smoke
    run's bit for bit; every running statistic is new, and the last record says what was done."""
    folder, stdout = reestimated_run
    got, want = (export.load_checkpoint(f / "checkpoint.ckpt") for f in (folder, smoke_run[1]))
    statistics = {name for name in want["model"] if name.endswith(("running_mean", "running_var"))}
    changed = {name for name in want["model"] if not np.array_equal(got["model"][name], want["model"][name])}
    assert changed == statistics
    assert got["optimizer"]["step_count"] == want["optimizer"]["step_count"]
    for group_got, group_want in zip(got["optimizer"]["state"], want["optimizer"]["state"]):
        for s_got, s_want in zip(group_got, group_want):
            assert all(np.array_equal(a, b) for a, b in zip(s_got, s_want)), "optimizer buffers differ"
    assert got["rng"] == want["rng"]
    history, reference = without_timing(read_metrics(folder)[1:]), without_timing(read_metrics(smoke_run[1])[1:])
    assert history[0] == reference[0] and history[1]["grid"] == reference[1]["grid"]
    assert history[1]["bn_reestimate"] == {"batches": 3, "test_acc_before": reference[1]["test_acc"]}
    assert "batch-norm statistics re-estimated over 3 training batches" in stdout


def test_without_bn_reestimate_the_statistics_are_those_of_training(smoke_run):
    """The default (0) records no re-estimation: the running averages are the ones exported."""
    _, folder, stdout = smoke_run
    assert TrainConfig().bn_reestimate == 0
    assert not any("bn_reestimate" in record for record in read_metrics(folder)[1:])
    assert "re-estimated" not in stdout


def test_reestimated_final_accuracy_is_the_exported_file_s(reestimated_run):
    folder, _ = reestimated_run
    final = read_metrics(folder)[-1]
    assert evaluate_file(folder / "model.nq4", "synthetic")["accuracy"] == final["test_acc"]
    assert evaluate_file(folder / "model.nq4", "synthetic", tta=final["tta"])["accuracy"] == final["test_acc_tta"]


def test_a_stop_during_the_final_evaluation_keeps_the_reestimated_statistics(reestimated_run, tmp_path,
                                                                              monkeypatch):
    """The checkpoint written after the last epoch holds the re-estimated statistics: resuming it
    exports the uninterrupted run's model file, neither redoing nor skipping the re-estimation."""
    real_evaluate = train_module.evaluate
    calls = []

    def ctrl_c_during_the_final_evaluation(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # epoch 1; epoch 2: before the re-estimation, after it, then with TTA
            signal.raise_signal(signal.SIGINT)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", ctrl_c_during_the_final_evaluation)
    code, stdout = run_main(SMOKE + ["--bn-reestimate", "3", "--out", str(tmp_path)])
    assert code == 130, stdout
    assert not (tmp_path / "model.nq4").exists()
    monkeypatch.setattr(train_module, "evaluate", real_evaluate)
    code, stdout = run_main(["--resume", str(tmp_path / "checkpoint.ckpt")])
    assert code == 0, stdout
    assert_same_run(tmp_path, reestimated_run[0])


ALTERNATE = SMOKE + ["--flip", "alternate", "--bn-reestimate", "2"]


@pytest.fixture(scope="module")
def alternate_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("alternate")
    code, stdout = run_main(ALTERNATE + ["--out", str(folder)])
    assert code == 0, stdout
    return folder


def test_alternate_flip_reaches_the_training(alternate_run, smoke_run):
    assert read_metrics(alternate_run)[1]["train_loss"] != read_metrics(smoke_run[1])[1]["train_loss"]


def test_resume_in_the_last_epoch_with_alternate_flips_and_bn_reestimate_is_exact(alternate_run, tmp_path,
                                                                                   monkeypatch):
    """Ctrl-C in epoch 2 (the last, an odd one: every flip the other way): the resumed run replays its
    flips and re-estimates the statistics as the uninterrupted run did."""
    real_step = signal_after_step(4 + 2, signal.SIGINT, monkeypatch)
    code, _ = run_main(ALTERNATE + ["--out", str(tmp_path)])
    assert code == 130
    ckpt = export.load_checkpoint(tmp_path / "checkpoint.ckpt")
    assert (ckpt["epoch"], ckpt["batch"]) == (1, 2)
    monkeypatch.setattr(optim.SGD, "step", real_step)
    code, stdout = run_main(["--resume", str(tmp_path / "checkpoint.ckpt")])
    assert code == 0, stdout
    assert_same_run(tmp_path, alternate_run)


# ----------------------------------------------------------------------------- --lookahead and --bn-momentum

# 2 epochs of 4 steps: the first sync (after step 3) takes the slow copy, the one after step 6 averages,
# steps 7 and 8 train on from the average and are left out when it becomes the final model.
LOOKAHEAD = SMOKE + ["--lookahead", "3"]


def test_lookahead_and_bn_momentum_reach_the_run(tmp_path):
    cfg = dataclasses.replace(smoke_config(tmp_path), lookahead=3, lookahead_decay=0.9, bn_momentum=0.4)
    run = train_module.setup(cfg, None, distributed.SingleProcess())
    assert (run.lookahead.every, run.lookahead.decay_per_step, run.lookahead.total_steps) == (3, 0.9, 8)
    assert [m.momentum for m in batch_norms(run.model)] == [0.4] * 6
    default = train_module.setup(smoke_config(tmp_path / "default"), None, distributed.SingleProcess())
    assert default.lookahead is None and [m.momentum for m in batch_norms(default.model)] == [0.1] * 6


def batch_norms(model):
    return [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]


@pytest.fixture(scope="module")
def lookahead_run(tmp_path_factory):
    """LOOKAHEAD, with the weights (parameters) right after optimizer steps 3 and 6."""
    folder = tmp_path_factory.mktemp("lookahead")
    real_step = optim.SGD.step
    after = {}

    def step_and_keep_the_weights(self):
        real_step(self)
        after[self.step_count] = [p.data.copy() for p in self.parameters()]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(optim.SGD, "step", step_and_keep_the_weights)
        code, stdout = run_main(LOOKAHEAD + ["--out", str(folder)])
    assert code == 0, stdout
    return folder, stdout, after[3], after[6]


def test_the_final_model_is_the_hand_computed_average_of_steps_3_and_6(lookahead_run):
    """The sync after step 6 keeps 0.95 ** 3 * (6/8) ** 3 of the slow copy (the weights after step 3)
    and takes the rest from the weights after step 6; the run ends on that average."""
    folder, _, after_3, after_6 = lookahead_run
    decay = 0.95 ** 3 * (6 / 8) ** 3
    ckpt = export.load_checkpoint(folder / "checkpoint.ckpt")
    names = [name for name in ckpt["model"] if not name.endswith(("running_mean", "running_var"))]
    names.sort(key=lambda name: ckpt["model"][name].ndim <= 1)  # the optimizer's order: decayed weights first
    assert len(names) == len(after_3)
    for name, w3, w6 in zip(names, after_3, after_6):
        expected = (decay * w3.astype(np.float64) + (1 - decay) * w6.astype(np.float64)).astype(np.float32)
        np.testing.assert_array_equal(ckpt["model"][name], expected, err_msg=name)


def test_the_final_model_is_the_slow_copy_and_the_checkpoint_keeps_it(lookahead_run, smoke_run):
    folder, _, _, _ = lookahead_run
    ckpt = export.load_checkpoint(folder / "checkpoint.ckpt")
    assert list(ckpt["lookahead"]) == list(ckpt["model"])
    differing = [name for name in ckpt["model"] if not np.array_equal(ckpt["model"][name], ckpt["lookahead"][name])]
    assert not differing, f"the final model is not the slow copy in {differing}"
    reference = export.load_checkpoint(smoke_run[1] / "checkpoint.ckpt")
    assert "lookahead" not in reference, "the default writes no slow copy"
    assert not any(np.array_equal(ckpt["model"][k], reference["model"][k]) for k in reference["model"])


def test_lookahead_changes_nothing_before_its_first_average(lookahead_run, smoke_run):
    """The first sync only takes the slow copy: epoch 1 is the smoke run's; epoch 2 is not."""
    history = without_timing(read_metrics(lookahead_run[0])[1:])
    reference = without_timing(read_metrics(smoke_run[1])[1:])
    assert history[0] == reference[0]
    assert history[1]["train_loss"] != reference[1]["train_loss"]


def test_lookahead_is_recorded_reported_and_exported(lookahead_run):
    folder, stdout, _, _ = lookahead_run
    final = read_metrics(folder)[-1]
    assert final["lookahead"]["every"] == 3 and 0 <= final["lookahead"]["test_acc_before"] <= 1
    assert "weights averaged (lookahead every 3 steps)" in stdout
    assert "note: --lookahead without --bn-reestimate" in stdout
    assert evaluate_file(folder / "model.nq4", "synthetic")["accuracy"] == final["test_acc"]


def test_resume_before_the_averaging_sync_equals_the_uninterrupted_run(lookahead_run, tmp_path, monkeypatch):
    """Ctrl-C after step 5: the checkpoint holds the slow copy of step 3, which the resumed run's sync
    after step 6 averages with, as the uninterrupted run did."""
    real_step = signal_after_step(5, signal.SIGINT, monkeypatch)
    code, _ = run_main(LOOKAHEAD + ["--out", str(tmp_path)])
    assert code == 130
    ckpt = export.load_checkpoint(tmp_path / "checkpoint.ckpt")
    assert (ckpt["epoch"], ckpt["batch"]) == (1, 1) and ckpt["lookahead"] is not None
    monkeypatch.setattr(optim.SGD, "step", real_step)
    code, stdout = run_main(["--resume", str(tmp_path / "checkpoint.ckpt")])
    assert code == 0, stdout
    assert_same_run(tmp_path, lookahead_run[0])
    got, want = (export.load_checkpoint(f / "checkpoint.ckpt")["lookahead"] for f in (tmp_path, lookahead_run[0]))
    assert all(np.array_equal(got[k], want[k]) for k in want)
