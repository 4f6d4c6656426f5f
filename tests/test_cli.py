"""The command lines: `python -m nanoq4.train` (help, flags, refusals with exit code 2 before
any work, the run-folder guard, exit codes of signals), `python -m nanoq4.evaluate` and
`python -m nanoq4.predict` on an exported model file."""
import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nanoq4 import cli, data, evaluate, export, models, nn, predict, safeguards
from nanoq4.errors import NanoQ4Error
from nanoq4.train import PAPER_RECIPE, TrainConfig, build_parser, config_from_args, main
from test_data import CIFAR10_NAMES, write_cifar10, write_png_16_bit

QUICK = ["--dataset", "synthetic", "--model", "simpleresnet4bit", "--epochs", "1", "--max-steps-per-epoch", "4",
         "--batch-size", "32", "--no-progress"]
DOCUMENTED_FLAGS = ["--dataset", "--model", "--epochs", "--batch-size", "--optimizer", "--recipe", "--lr",
                    "--weight-decay", "--grad-clip", "--tanh-alpha", "--no-tanh-clip", "--bits", "--fp32",
                    "--label-smoothing", "--seed", "--data-dir", "--out", "--resume", "--threads", "--dropout",
                    "--tta", "--per-channel", "--no-per-channel", "--overwrite", "--allow-changes",
                    "--divergence-factor", "--flip", "--bn-reestimate", "--lookahead", "--lookahead-decay",
                    "--bn-momentum", "--workers", "--sync-bn", "--no-sync-bn"]


def run_cli(entry, argv, capsys):
    """(exit code, stdout, stderr) of a CLI main() run in this process; argparse's own exit
    (SystemExit) counts as its exit code."""
    try:
        code = entry(argv)
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert lines[0].startswith("error: ")
    return lines[0]


def no_data_loading(*args, **kwargs):
    raise AssertionError("data was loaded before every flag was checked")


def no_model_loading(*args, **kwargs):
    raise AssertionError("the model file was read before every flag was checked")


# ----------------------------------------------------------------------------- help

@pytest.fixture(scope="module")
def help_text():
    result = subprocess.run([sys.executable, "-m", "nanoq4.train", "--help"], capture_output=True, text=True,
                            timeout=120)
    return result


def test_help_exits_0(help_text):
    assert help_text.returncode == 0, help_text.stderr


@pytest.mark.parametrize("flag", DOCUMENTED_FLAGS)
def test_help_mentions_flag(help_text, flag):
    assert re.search(rf"{re.escape(flag)}\b", help_text.stdout), f"{flag} missing from --help"


def test_help_recommends_bn_reestimate_and_fast_bn_momentum_with_lookahead(help_text):
    """The averaged weights are exported with batch-norm statistics that fit them only when re-estimated."""
    text = " ".join(help_text.stdout.split())
    lookahead = text[text.rindex("--lookahead STEPS"):text.rindex("--lookahead-decay DECAY")]
    assert "--bn-reestimate N" in lookahead and "--bn-momentum 0.4" in lookahead, lookahead


def test_help_names_the_default_number_of_epochs_of_each_dataset(help_text):
    """--epochs has no single default: 24 passes over the training set on CIFAR-10, 18 on CIFAR-100, else 13."""
    text = " ".join(help_text.stdout.split())
    epochs = text[text.rindex("--epochs EPOCHS"):text.rindex("--batch-size BATCH_SIZE")]
    assert "(default 13; 22 for cifar10; 18 for cifar100)" in epochs, epochs


def test_help_hides_the_smoke_test_flag(help_text):
    assert "--max-steps-per-epoch" not in help_text.stdout


SETTINGS = [f for f in dataclasses.fields(TrainConfig) if not f.metadata.get("hidden")]


@pytest.mark.parametrize("field", SETTINGS, ids=lambda f: f.name)
def test_every_setting_has_a_documented_flag(help_text, field):
    """The flags are generated from TrainConfig: each field is a flag (a switch for a bool) whose help
    is the field's own text."""
    flag = "--" + field.name.replace("_", "-")
    if field.type is bool and field.default and not field.metadata.get("both"):
        flag = "--no-" + flag[2:]
    action = next(a for a in build_parser()._actions if flag in a.option_strings)
    assert action.dest == field.name and field.metadata["help"] in action.help
    assert re.search(rf"{re.escape(flag)}\b", help_text.stdout), f"{flag} missing from --help"


@pytest.mark.parametrize("field", [f for f in SETTINGS if f.type is not bool and f.default is not None],
                         ids=lambda f: f.name)
def test_help_shows_the_config_default(field):
    action = next(a for a in build_parser()._actions if a.dest == field.name)
    assert action.help.endswith(f"(default {field.default})")


@pytest.mark.parametrize("parser", ["train", "evaluate", "export_onnx"])
def test_the_dataset_choices_are_spelled_in_one_place(parser, capsys):
    """--dataset (train, evaluate) and --verify (export_onnx) name the choices data.py accepts."""
    from nanoq4 import export_onnx
    entry = {"train": main, "evaluate": evaluate.main, "export_onnx": export_onnx.main}[parser]
    code, out, _ = run_cli(entry, ["--help"], capsys)
    assert code == 0 and data.DATASET_CHOICES in " ".join(out.split())


def test_no_flag_has_an_argparse_default():
    """A flag that was not typed must read None, so that --resume takes that setting from the checkpoint."""
    assert [a.dest for a in build_parser()._actions if a.dest != "help" and a.default is not None] == []


@pytest.mark.parametrize("entry", [evaluate.main, predict.main], ids=["evaluate", "predict"])
def test_evaluate_and_predict_help_exit_0(entry, capsys):
    code, out, _ = run_cli(entry, ["--help"], capsys)
    assert code == 0 and "model" in out


# ----------------------------------------------------------------------------- flags -> TrainConfig

def test_no_flags_give_the_default_config():
    assert config_from_args([]) == TrainConfig()


def test_paper_recipe_sets_the_paper_settings():
    cfg = config_from_args(["--recipe", "paper"])
    for key, value in PAPER_RECIPE.items():
        assert getattr(cfg, key) == value, key
    assert (cfg.optimizer, cfg.lr, cfg.grad_clip, cfg.schedule, cfg.epochs) == ("adamw", 1e-3, 0.5, "cosine", 150)


def test_paper_recipe_keeps_the_papers_model_and_loss_settings():
    """The default recipe's levers (per-channel scales, smoothing, lower dropout, TTA, batch 256)
    must not leak into --recipe paper."""
    cfg = config_from_args(["--recipe", "paper"])
    assert (cfg.per_channel, cfg.label_smoothing, cfg.dropout, cfg.tta, cfg.batch_size) == (False, 0.0, 0.5, "none", 128)
    assert (cfg.tanh_clip, cfg.tanh_alpha, cfg.tanh_relative, cfg.weight_decay) == (True, 3.0, None, 5e-4)


def test_per_channel_switch_both_ways():
    assert config_from_args(["--per-channel"]).per_channel is True
    assert config_from_args(["--no-per-channel"]).per_channel is False
    assert config_from_args(["--recipe", "paper", "--per-channel"]).per_channel is True


def test_explicit_flags_override_the_recipe():
    cfg = config_from_args(["--recipe", "paper", "--epochs", "3", "--lr", "0.01"])
    assert (cfg.epochs, cfg.lr, cfg.optimizer) == (3, 0.01, "adamw")


@pytest.mark.parametrize("flag, field, value", [
    ("--no-tanh-clip", "tanh_clip", False), ("--fp32", "fp32", True), ("--no-per-channel", "per_channel", False),
    ("--no-download", "download", False), ("--no-progress", "progress", False), ("--no-augment", "augment", False),
    ("--overwrite", "overwrite", True), ("--allow-changes", "allow_changes", True),
])
def test_switch_sets_its_config_field(flag, field, value):
    assert getattr(config_from_args([flag]), field) == value
    assert getattr(TrainConfig(), field) == (not value)


def test_valued_flags_set_their_fields():
    cfg = config_from_args(["--bits", "3", "--tanh-alpha", "1.5", "--weight-decay", "0", "--label-smoothing", "0.1",
                            "--threads", "1", "--max-steps-per-epoch", "7", "--seed", "9", "--grad-clip", "2",
                            "--dropout", "0.3", "--tta", "flip", "--flip", "alternate", "--bn-reestimate", "5",
                            "--lookahead", "5", "--lookahead-decay", "0.9", "--bn-momentum", "0.4"])
    assert (cfg.dropout, cfg.tta, cfg.flip, cfg.bn_reestimate) == (0.3, "flip", "alternate", 5)
    assert (cfg.lookahead, cfg.lookahead_decay, cfg.bn_momentum) == (5, 0.9, 0.4)
    assert (cfg.bits, cfg.tanh_alpha, cfg.weight_decay, cfg.label_smoothing) == (3, 1.5, 0.0, 0.1)
    assert (cfg.threads, cfg.max_steps_per_epoch, cfg.seed, cfg.grad_clip) == (1, 7, 9, 2.0)


def test_resume_without_a_path_uses_the_checkpoint_in_out(tmp_path):
    cfg = config_from_args(["--resume", "--out", str(tmp_path)])
    assert cfg.resume == str(tmp_path / "checkpoint.ckpt")


# ----------------------------------------------------------------------------- refusals: exit code 2

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short run (4 steps, default seed) whose model file the evaluate/predict tests use."""
    folder = tmp_path_factory.mktemp("quick")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(QUICK + ["--out", str(folder)]) == 0
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return folder, metrics[-1]


BAD_FLAGS = {
    "unknown dataset": (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    "missing image folder": (["--dataset", "folder:/nonexistent/images"], "/nonexistent/images"),
    "unknown model": (["--model", "resnet50"], "unknown model 'resnet50'"),
    "zero epochs": (["--epochs", "0"], "--epochs"),
    "bits 9": (["--bits", "9"], "bits"),
    "bits 1": (["--bits", "1"], "bits"),
    "batch of one": (["--batch-size", "1"], "--batch-size"),
    "grad clip 0": (["--grad-clip", "0"], "--grad-clip"),
    "label smoothing 1": (["--label-smoothing", "1"], "--label-smoothing"),
    "dropout 1": (["--dropout", "1"], "--dropout"),
    "negative dropout": (["--dropout", "-0.1"], "--dropout"),
    "bn re-estimation beyond an epoch": (["--bn-reestimate", "100"], "at most 63"),
    "lookahead beyond the run": (["--lookahead", "5"], "more than the run's 4 steps"),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_flag_ends_with_one_line_and_exit_code_2(case, tmp_path, capsys):
    flags, fragment = BAD_FLAGS[case]
    code, _, err = run_cli(main, QUICK + ["--out", str(tmp_path / "run")] + flags, capsys)
    assert code == 2
    assert fragment in assert_one_line_error(err)


@pytest.mark.parametrize("flags", [["--optimizer", "rmsprop"], ["--recipe", "fast"], ["--epochs", "two"],
                                   ["--schedule", "linear"], ["--no-such-flag"], ["--threads", "1.5"],
                                   ["--lr", "fast"], ["--seed", ""], ["--tta", "rotate"], ["--flip", "sometimes"],
                                   ["--bn-reestimate", "all"], ["--lookahead", "often"], ["--bn-momentum", "fast"]])
def test_argparse_refusal_is_one_line_and_exit_code_2(flags, capsys):
    code, _, err = run_cli(main, QUICK + flags, capsys)
    assert code == 2
    assert_one_line_error(err)


# Every numeric flag outside its domain (NaN and infinities included): refused before the data is
# read or a folder is made.
OUT_OF_DOMAIN = {
    "lr 0": (["--lr", "0"], "--lr"),
    "lr negative": (["--lr", "-0.1"], "--lr"),
    "lr nan": (["--lr", "nan"], "--lr"),
    "lr infinite": (["--lr", "inf"], "--lr"),
    "lr overflowing to infinity": (["--lr", "1e999"], "--lr"),
    "seed negative": (["--seed", "-1"], "--seed"),
    "threads 0": (["--threads", "0"], "--threads"),
    "threads negative": (["--threads", "-2"], "--threads"),
    "threads beyond the cores": (["--threads", str(safeguards.available_cores() + 1)], "--threads"),
    "grad clip negative": (["--grad-clip", "-1"], "--grad-clip"),
    "grad clip infinite": (["--grad-clip", "inf"], "--grad-clip"),
    "grad clip nan": (["--grad-clip", "nan"], "--grad-clip"),
    "warm-up negative": (["--warmup-epochs", "-1"], "--warmup-epochs"),
    "warm-up nan": (["--warmup-epochs", "nan"], "--warmup-epochs"),
    "weight decay negative": (["--weight-decay", "-1e-4"], "--weight-decay"),
    "weight decay infinite": (["--weight-decay", "inf"], "--weight-decay"),
    "tanh alpha 0": (["--tanh-alpha", "0"], "--tanh-alpha"),
    "tanh alpha infinite": (["--tanh-alpha", "inf"], "--tanh-alpha"),
    "tanh relative negative": (["--tanh-relative", "-3"], "--tanh-relative"),
    "label smoothing negative": (["--label-smoothing", "-0.1"], "--label-smoothing"),
    "label smoothing nan": (["--label-smoothing", "nan"], "--label-smoothing"),
    "dropout 1": (["--dropout", "1"], "--dropout"),
    "dropout negative": (["--dropout", "-0.5"], "--dropout"),
    "epochs negative": (["--epochs", "-3"], "--epochs"),
    "epochs beyond counting": (["--epochs", "1" + "0" * 400], "--epochs"),
    "batch size 0": (["--batch-size", "0"], "--batch-size"),
    "bits 0": (["--bits", "0"], "--bits"),
    "max steps 0": (["--max-steps-per-epoch", "0"], "--max-steps-per-epoch"),
    "divergence factor below 1": (["--divergence-factor", "0.5"], "--divergence-factor"),
    "divergence factor nan": (["--divergence-factor", "nan"], "--divergence-factor"),
    "bn re-estimation negative": (["--bn-reestimate", "-1"], "--bn-reestimate"),
    "lookahead negative": (["--lookahead", "-5"], "--lookahead"),
    "lookahead decay 1": (["--lookahead-decay", "1"], "--lookahead-decay"),
    "lookahead decay nan": (["--lookahead-decay", "nan"], "--lookahead-decay"),
    "bn momentum 0": (["--bn-momentum", "0"], "--bn-momentum"),
    "bn momentum above 1": (["--bn-momentum", "1.5"], "--bn-momentum"),
    "coarse labels of synthetic data": (["--coarse"], "coarse"),
    "empty out": (["--out", ""], "--out"),
}


@pytest.mark.parametrize("case", list(OUT_OF_DOMAIN))
def test_flag_out_of_its_domain_is_refused_before_any_work(case, tmp_path, monkeypatch, capsys):
    flags, fragment = OUT_OF_DOMAIN[case]
    monkeypatch.setattr(data, "load_dataset", no_data_loading)
    code, _, err = run_cli(main, QUICK + ["--out", str(tmp_path / "run")] + flags, capsys)
    assert code == 2
    assert fragment in assert_one_line_error(err)
    assert not (tmp_path / "run").exists(), "a refused run must leave no folder"


def test_library_config_of_the_wrong_type_is_refused_naming_the_flag(tmp_path):
    from nanoq4.train import train
    for field, value in (("epochs", 2.5), ("batch_size", "32"), ("lr", "0.1"), ("seed", True), ("bn_reestimate", 0.5),
                         ("flip", "sometimes"), ("lookahead", 2.5), ("lookahead_decay", "0.9"), ("bn_momentum", None)):
        cfg = TrainConfig(dataset="synthetic", out=str(tmp_path / "run"), **{field: value})
        with pytest.raises(NanoQ4Error, match="--" + field.replace("_", "-")):
            train(cfg)
    assert not (tmp_path / "run").exists()


def test_evaluate_and_predict_refuse_bad_flags_before_reading_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "load_dataset", no_data_loading)
    monkeypatch.setattr(evaluate, "load_model", no_model_loading)
    monkeypatch.setattr(predict, "load_model", no_model_loading)
    model, image = str(tmp_path / "model.nq4"), str(tmp_path / "cat.png")
    cases = [
        (predict.main, [model, image, "--top", "0"], "--top"),
        (predict.main, [model, image, "--top", "-3"], "--top"),
        (predict.main, [model, image, "--top", "many"], "--top"),
        (predict.main, [model], "images"),
        (evaluate.main, [model, "--tta", "rotate"], "--tta"),
        (evaluate.main, [model, "--dataset", "imagenet"], "imagenet"),
        (evaluate.main, [model, "--dataset", "cifar10", "--coarse"], "coarse"),
        (evaluate.main, [model, "--dataset", "synthetic", "--plot", str(tmp_path / "missing" / "c.png")], "--plot"),
        (evaluate.main, [model, "--dataset", "synthetic", "--plot", str(tmp_path)], "--plot"),
    ]
    for entry, argv, fragment in cases:
        code, _, err = run_cli(entry, argv, capsys)
        assert code == 2, argv
        assert fragment in assert_one_line_error(err), argv


def test_download_script_refuses_an_unknown_dataset_before_downloading(tmp_path, capsys):
    path = Path(__file__).resolve().parents[1] / "data_scripts" / "download_cifar.py"
    spec = importlib.util.spec_from_file_location("download_cifar", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    code, _, err = run_cli(script.main, ["cifar10", "imagenet", "--data-dir", str(tmp_path / "data")], capsys)
    assert code == 2
    assert "imagenet" in assert_one_line_error(err)
    assert not (tmp_path / "data").exists()


# ----------------------------------------------------------------------------- the run folder

def test_out_that_is_a_file_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "load_dataset", no_data_loading)
    (tmp_path / "notes.txt").write_text("mine")
    for out in (tmp_path / "notes.txt", tmp_path / "notes.txt" / "run"):
        code, _, err = run_cli(main, QUICK + ["--out", str(out)], capsys)
        assert code == 2
        line = assert_one_line_error(err)
        assert str(tmp_path / "notes.txt") in line and "--out" in line
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere")
def test_out_in_a_read_only_folder_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "load_dataset", no_data_loading)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, _, err = run_cli(main, QUICK + ["--out", str(locked / "run")], capsys)
    finally:
        locked.chmod(0o700)
    assert code == 2
    assert "permission" in assert_one_line_error(err)
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("held", ["checkpoint.ckpt", "metrics.jsonl", "model.nq4"])
def test_new_run_into_a_folder_holding_a_run_is_refused_and_touches_nothing(held, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / held).write_bytes(b"the earlier run's file")
    monkeypatch.setattr(data, "load_dataset", no_data_loading)
    code, _, err = run_cli(main, QUICK + ["--out", str(run)], capsys)
    assert code == 2
    line = assert_one_line_error(err)
    assert "--resume" in line and "another --out" in line and "--overwrite" in line
    assert [p.name for p in run.iterdir()] == [held]
    assert (run / held).read_bytes() == b"the earlier run's file"


def test_overwrite_replaces_the_run_in_the_folder(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("checkpoint.ckpt", "metrics.jsonl", "model.nq4", "curves.png", "notes.txt"):
        (run / name).write_bytes(b"old")
    code, _, err = run_cli(main, QUICK + ["--out", str(run), "--overwrite", "--max-steps-per-epoch", "1"], capsys)
    assert code == 0, err
    assert export.load_checkpoint(run / "checkpoint.ckpt")["epoch"] == 1
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["config"]["overwrite"] is True
    export.load_model(run / "model.nq4")
    assert not (run / "curves.png").exists() or (run / "curves.png").read_bytes() != b"old"
    assert (run / "notes.txt").read_bytes() == b"old", "only the run's own files are replaced"


# ----------------------------------------------------------------------------- exit codes

@pytest.mark.parametrize("raised, code", [(cli.Interrupted(signal.SIGTERM), 143), (cli.Interrupted(signal.SIGINT), 130),
                                          (KeyboardInterrupt(), 130), (NanoQ4Error("bad input; fix it"), 2),
                                          (MemoryError(), 2)], ids=["SIGTERM", "SIGINT", "Ctrl-C", "error", "memory"])
def test_command_exit_codes(raised, code, capsys):
    def body():
        raise raised
    assert cli.run_command(body) == code
    err = capsys.readouterr().err
    if code == 2:
        assert_one_line_error(err)


def test_sigterm_while_the_data_loads_exits_143_leaving_no_folder(tmp_path, monkeypatch, capsys):
    def terminated_while_loading(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
        raise AssertionError("SIGTERM did not stop the run")

    monkeypatch.setattr(data, "load_dataset", terminated_while_loading)
    code, _, _ = run_cli(main, QUICK + ["--out", str(tmp_path / "run")], capsys)
    assert code == 143
    assert not (tmp_path / "run").exists()


def test_missing_cifar_folder_without_download_exits_2_naming_the_folder(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(main, ["--dataset", "cifar10", "--no-download", "--data-dir", str(empty),
                                  "--model", "simpleresnet4bit", "--no-progress", "--out", str(tmp_path / "run")], capsys)
    assert code == 2
    line = assert_one_line_error(err)
    assert "CIFAR-10 not found" in line and str(empty) in line


def test_resume_from_a_non_checkpoint_exits_2(tmp_path, capsys):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"this is not a checkpoint")
    code, _, err = run_cli(main, QUICK + ["--out", str(tmp_path / "run"), "--resume", str(junk)], capsys)
    assert code == 2
    assert str(junk) in assert_one_line_error(err)


def test_resume_from_a_missing_checkpoint_exits_2(tmp_path, capsys):
    code, _, err = run_cli(main, QUICK + ["--out", str(tmp_path), "--resume"], capsys)
    assert code == 2
    assert str(tmp_path / "checkpoint.ckpt") in assert_one_line_error(err)


def test_resume_of_a_checkpoint_trained_with_another_model_exits_2(trained, tmp_path, capsys):
    folder, _ = trained
    flags = [f if f != "simpleresnet4bit" else "vgg4bit" for f in QUICK]
    code, _, err = run_cli(main, flags + ["--out", str(tmp_path), "--resume", str(folder / "checkpoint.ckpt")], capsys)
    assert code == 2
    line = assert_one_line_error(err)
    assert "model='simpleresnet4bit'" in line and "same flags" in line


def test_resume_without_a_path_or_out_exits_2(capsys):
    code, _, err = run_cli(main, QUICK + ["--resume"], capsys)
    assert code == 2
    assert "--out" in assert_one_line_error(err)


def test_bad_dataset_leaves_no_run_folder_behind(tmp_path, monkeypatch, capsys):
    """Without --out the run folder would be runs/<time>-...: it is made only once the data loaded."""
    monkeypatch.chdir(tmp_path)
    code, _, _ = run_cli(main, ["--dataset", "imagenet", "--model", "simpleresnet4bit", "--no-progress"], capsys)
    assert code == 2
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- evaluate

def test_evaluate_prints_accuracy_per_class_and_confusion(trained, tmp_path, capsys):
    folder, final = trained
    code, out, _ = run_cli(evaluate.main, [str(folder / "model.nq4"), "--dataset", "synthetic",
                                           "--plot", str(tmp_path / "confusion.png")], capsys)
    assert code == 0
    assert f"test accuracy: {final['test_acc']:.2%} (500 images)" in out
    assert "per-class accuracy:" in out
    assert "confusion matrix" in out
    assert len(re.findall(r"^\s+\d+ pattern\d", out, flags=re.M)) == 10, "one confusion row per class"


@pytest.fixture(scope="module")
def evaluation(trained):
    folder, _ = trained
    return evaluate.evaluate_file(folder / "model.nq4", "synthetic")


def test_evaluate_file_accuracy_equals_the_trainer_final_test_accuracy(trained, evaluation):
    _, final = trained
    assert evaluation["accuracy"] == final["test_acc"]


def test_evaluate_file_confusion_counts_every_test_image(evaluation):
    result = evaluation
    confusion = result["confusion"]
    assert confusion.shape == (10, 10) and confusion.sum() == 500
    np.testing.assert_allclose(result["per_class"], np.diag(confusion) / confusion.sum(axis=1))
    assert result["accuracy"] == pytest.approx(np.trace(confusion) / 500)


def test_evaluate_uses_the_test_images_the_trainer_used_whatever_the_seed(tmp_path, monkeypatch):
    """--seed varies the training run, not the synthetic images, so a model trained with
    --seed 1 is evaluated on the test set the trainer reported."""
    seen = {}
    real_load = data.load_dataset

    def spy(*args, **kwargs):
        dataset = real_load(*args, **kwargs)
        seen.setdefault("train" if "train" not in seen else "evaluate", dataset)
        return dataset

    monkeypatch.setattr(data, "load_dataset", spy)
    flags = QUICK + ["--seed", "1", "--max-steps-per-epoch", "1", "--out", str(tmp_path)]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(flags) == 0
    evaluate.evaluate_file(tmp_path / "model.nq4", "synthetic")
    np.testing.assert_array_equal(seen["evaluate"].x_test, seen["train"].x_test)


def test_evaluate_refuses_a_dataset_with_another_class_count(trained, tmp_path, capsys):
    folder, _ = trained
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (tmp_path / "images" / split / name).mkdir(parents=True)
            Image.new("RGB", (32, 32), (10, 20, 30)).save(tmp_path / "images" / split / name / "0.png")
    code, _, err = run_cli(evaluate.main, [str(folder / "model.nq4"), "--dataset", f"folder:{tmp_path / 'images'}"],
                           capsys)
    assert code == 2
    assert "10 classes" in assert_one_line_error(err)


def test_evaluate_missing_model_exits_2_naming_it(tmp_path, capsys):
    missing = tmp_path / "missing.nq4"
    code, _, err = run_cli(evaluate.main, [str(missing), "--dataset", "synthetic"], capsys)
    assert code == 2
    assert str(missing) in assert_one_line_error(err)


def cifar_model_file(path):
    """An untrained SimpleResNet4bit exported with the CIFAR-10 class names."""
    nn.manual_seed(0)
    model = models.build_model("simpleresnet4bit", 10)
    arch = dict(model="simpleresnet4bit", num_classes=10, quantize=True, bits=4, per_channel=False)
    export.export_model(model, path, arch, CIFAR10_NAMES, data.CIFAR_MEAN, data.CIFAR_STD)
    return path


def test_evaluate_reads_only_the_test_split(tmp_path, capsys):
    write_cifar10(tmp_path / "data", per_batch=6)
    for i in range(1, 6):
        (tmp_path / "data" / "cifar-10-batches-py" / f"data_batch_{i}").unlink()  # reading one would fail
    model = cifar_model_file(tmp_path / "model.nq4")
    code, out, err = run_cli(evaluate.main, [str(model), "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"),
                                             "--no-download", "--plot", str(tmp_path / "confusion.png")], capsys)
    assert code == 0, err
    assert "(6 images)" in out


def test_evaluate_refuses_a_model_trained_on_other_class_names(trained, tmp_path, capsys):
    folder, _ = trained
    write_cifar10(tmp_path)
    code, _, err = run_cli(evaluate.main, [str(folder / "model.nq4"), "--dataset", "cifar10", "--data-dir",
                                           str(tmp_path), "--no-download"], capsys)
    assert code == 2
    line = assert_one_line_error(err)
    assert "'pattern0'" in line and "'airplane'" in line


# ----------------------------------------------------------------------------- predict

@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    """Three synthetic test images saved losslessly as PNG, with their pixels."""
    folder = tmp_path_factory.mktemp("png")
    x = data.synthetic_dataset().x_test[:3]
    paths = []
    for i, img in enumerate(x):
        paths.append(folder / f"img{i}.png")
        Image.fromarray(img).save(paths[-1])
    return paths, x


def model_predictions(model_path, pixels):
    model = export.load_model(model_path)
    return model.logits(data.normalize_images(pixels, model.mean, model.std)).argmax(axis=1)


def parse_predictions(out):
    """{image path: [(probability, class name), ...]} from predict's output."""
    result, current = {}, None
    for line in out.splitlines():
        m = re.match(r"^\s+([\d.]+)%\s+(\S+)$", line)
        if m:
            result[current].append((float(m.group(1)) / 100, m.group(2)))
        elif line.strip():
            current = line.strip()
            result[current] = []
    return result


def test_predict_prints_the_top_5_classes_of_each_image(trained, pngs, capsys):
    folder, _ = trained
    paths, _ = pngs
    code, out, _ = run_cli(predict.main, [str(folder / "model.nq4")] + [str(p) for p in paths], capsys)
    assert code == 0
    parsed = parse_predictions(out)
    assert list(parsed) == [str(p) for p in paths]
    for ranked in parsed.values():
        assert len(ranked) == 5
        probs = [p for p, _ in ranked]
        assert probs == sorted(probs, reverse=True)
        assert sum(probs) <= 1 + 5 * 5e-5, "printed with 2 decimals: allow their rounding"


def test_predict_top_class_is_the_model_prediction(trained, pngs):
    folder, _ = trained
    paths, pixels = pngs
    results = predict.predict_files(folder / "model.nq4", paths)
    expected = model_predictions(folder / "model.nq4", pixels)
    names = export.load_model(folder / "model.nq4").class_names
    assert [ranked[0][0] for _, ranked in results] == [names[i] for i in expected]


def test_predict_probabilities_sum_to_at_most_one(trained, pngs):
    folder, _ = trained
    for _, ranked in predict.predict_files(folder / "model.nq4", pngs[0]):
        total = sum(p for _, p in ranked)
        assert 0 < total <= 1 + 1e-6


def test_predict_top_flag_limits_the_list(trained, pngs, capsys):
    folder, _ = trained
    code, out, _ = run_cli(predict.main, [str(folder / "model.nq4"), str(pngs[0][0]), "--top", "2"], capsys)
    assert code == 0
    assert len(parse_predictions(out)[str(pngs[0][0])]) == 2


def test_predict_resizes_images_of_other_sizes(trained, tmp_path):
    folder, _ = trained
    big = tmp_path / "big.jpg"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(big)
    [(path, ranked)] = predict.predict_files(folder / "model.nq4", [big])
    assert path == big and len(ranked) == 5


def test_predict_missing_image_exits_2_naming_it(trained, tmp_path, capsys):
    folder, _ = trained
    missing = tmp_path / "missing.png"
    code, _, err = run_cli(predict.main, [str(folder / "model.nq4"), str(missing)], capsys)
    assert code == 2
    assert str(missing) in assert_one_line_error(err)


def test_predict_unreadable_image_exits_2(trained, tmp_path, capsys):
    folder, _ = trained
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    code, _, err = run_cli(predict.main, [str(folder / "model.nq4"), str(broken)], capsys)
    assert code == 2
    assert str(broken) in assert_one_line_error(err)


def test_predict_with_a_damaged_model_exits_2(tmp_path, pngs, capsys):
    bad = tmp_path / "bad.nq4"
    bad.write_bytes(b"garbage")
    code, _, err = run_cli(predict.main, [str(bad), str(pngs[0][0])], capsys)
    assert code == 2
    assert str(bad) in assert_one_line_error(err)


def test_predict_reports_each_unreadable_image_and_predicts_the_rest(trained, pngs, tmp_path, capsys):
    folder, _ = trained
    paths, _ = pngs
    model = str(folder / "model.nq4")
    missing, broken = tmp_path / "missing.png", tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not a jpeg")
    code, out, err = run_cli(predict.main, [model, str(paths[0]), str(missing), str(broken), str(paths[1])], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines), err
    assert str(missing) in lines[0] and str(broken) in lines[1]
    _, alone, _ = run_cli(predict.main, [model, str(paths[0]), str(paths[1])], capsys)
    assert out == alone, "the readable images are predicted as if given alone"


def test_predict_gives_a_16_bit_image_the_classes_of_its_8_bit_twin(trained, pngs, tmp_path):
    folder, _ = trained
    paths, pixels = pngs
    sixteen = tmp_path / "img0_16bit.png"
    write_png_16_bit(sixteen, pixels[0].astype(np.uint16) * 257, color_type=2)
    [(_, ranked16)] = predict.predict_files(folder / "model.nq4", [sixteen])
    [(_, ranked8)] = predict.predict_files(folder / "model.nq4", [paths[0]])
    assert [name for name, _ in ranked16] == [name for name, _ in ranked8]
    np.testing.assert_allclose([p for _, p in ranked16], [p for _, p in ranked8], rtol=1e-5)
