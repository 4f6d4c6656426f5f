"""The command lines: `python -m nanoq4.train` (help, flags, refusals with exit code 2),
`python -m nanoq4.evaluate` and `python -m nanoq4.predict` on an exported model file."""
import contextlib
import io
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from nanoq4 import data, evaluate, export, predict
from nanoq4.train import PAPER_RECIPE, TrainConfig, config_from_args, main

QUICK = ["--dataset", "synthetic", "--model", "simpleresnet4bit", "--epochs", "1", "--max-steps-per-epoch", "4",
         "--batch-size", "32", "--no-progress"]
DOCUMENTED_FLAGS = ["--dataset", "--model", "--epochs", "--batch-size", "--optimizer", "--recipe", "--lr",
                    "--weight-decay", "--grad-clip", "--tanh-alpha", "--no-tanh-clip", "--bits", "--fp32",
                    "--label-smoothing", "--seed", "--data-dir", "--out", "--resume", "--threads", "--dropout",
                    "--tta", "--per-channel", "--no-per-channel"]


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


def test_help_hides_the_smoke_test_flag(help_text):
    assert "--max-steps-per-epoch" not in help_text.stdout


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
])
def test_switch_sets_its_config_field(flag, field, value):
    assert getattr(config_from_args([flag]), field) == value
    assert getattr(TrainConfig(), field) == (not value)


def test_valued_flags_set_their_fields():
    cfg = config_from_args(["--bits", "3", "--tanh-alpha", "1.5", "--weight-decay", "0", "--label-smoothing", "0.1",
                            "--threads", "1", "--max-steps-per-epoch", "7", "--seed", "9", "--grad-clip", "2",
                            "--dropout", "0.3", "--tta", "flip"])
    assert (cfg.dropout, cfg.tta) == (0.3, "flip")
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
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_flag_ends_with_one_line_and_exit_code_2(case, tmp_path, capsys):
    flags, fragment = BAD_FLAGS[case]
    code, _, err = run_cli(main, QUICK + ["--out", str(tmp_path / "run")] + flags, capsys)
    assert code == 2
    assert fragment in assert_one_line_error(err)


@pytest.mark.parametrize("flags", [["--optimizer", "rmsprop"], ["--recipe", "fast"], ["--epochs", "two"],
                                   ["--tta", "rotate"],
                                   ["--schedule", "linear"], ["--no-such-flag"]])
def test_argparse_refusal_exits_2(flags, capsys):
    code, _, err = run_cli(main, QUICK + flags, capsys)
    assert code == 2
    assert "error:" in err


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
