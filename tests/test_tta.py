"""Test-time augmentation (nanoq4/evaluate.py): the views against plain loops, the weighted
logits against a hand computation, and the trainer's final TTA accuracy reproduced exactly by
`evaluate` on the exported model file."""
import contextlib
import io
import json

import numpy as np
import pytest

from nanoq4 import data, evaluate, tta
from nanoq4.errors import NanoQ4Error
from nanoq4.train import main

RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, size=(5, 6, 7, 3), dtype=np.uint8)


def shift_reference(images, dy, dx):
    """Plain loops: out[n, i, j] = images[n, i + dy, j + dx], zero outside."""
    out = np.zeros_like(images)
    n, h, w, _ = images.shape
    for i in range(h):
        for j in range(w):
            if 0 <= i + dy < h and 0 <= j + dx < w:
                out[:, i, j] = images[:, i + dy, j + dx]
    return out


@pytest.mark.parametrize("dy, dx", [(0, 0), (-1, -1), (1, 1), (2, -1), (-3, 2)])
def test_shift_images_matches_plain_loops(dy, dx):
    np.testing.assert_array_equal(tta.shift_images(IMAGES, dy, dx), shift_reference(IMAGES, dy, dx))


def test_shift_moves_content_up_left_for_positive_offsets():
    out = tta.shift_images(IMAGES, 1, 1)
    np.testing.assert_array_equal(out[:, 0, 0], IMAGES[:, 1, 1])
    assert not out[:, -1, :].any() and not out[:, :, -1].any()


@pytest.mark.parametrize("mode, count", [("none", 1), ("flip", 2), ("flip-translate", 6)])
def test_views_count_and_weights_sum_to_one(mode, count):
    views = tta.tta_views(IMAGES, mode)
    assert len(views) == count
    assert sum(w for w, _ in views) == pytest.approx(1.0)
    assert all(v.shape == IMAGES.shape and v.dtype == np.uint8 for _, v in views)


def test_flip_views_are_the_image_and_its_mirror():
    (w0, v0), (w1, v1) = tta.tta_views(IMAGES, "flip")
    np.testing.assert_array_equal(v0, IMAGES)
    np.testing.assert_array_equal(v1, IMAGES[:, :, ::-1])
    assert w0 == w1 == 0.5


def test_flip_translate_views_are_the_flip_pairs_of_the_image_and_two_shifts():
    views = tta.tta_views(IMAGES, "flip-translate")
    expected = []
    for weight, base in ((0.25, IMAGES), (0.125, shift_reference(IMAGES, -1, -1)),
                         (0.125, shift_reference(IMAGES, 1, 1))):
        expected += [(weight, base), (weight, base[:, :, ::-1])]
    for (w, v), (we, ve) in zip(views, expected):
        assert w == we
        np.testing.assert_array_equal(v, ve)


def test_unknown_mode_is_a_one_line_error():
    with pytest.raises(NanoQ4Error, match="choose one of: none, flip, flip-translate"):
        tta.tta_views(IMAGES, "rotate")


@pytest.mark.parametrize("mode", ["none", "flip", "flip-translate"])
def test_predict_logits_is_the_weighted_sum_of_each_views_logits(mode):
    """A 'model' whose logits depend on pixel positions, so every view gives different logits."""
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    weights = np.random.default_rng(1).standard_normal((6 * 7 * 3, 4)).astype(np.float32)
    forward = lambda x: x.reshape(len(x), -1) @ weights
    expected = sum(np.float32(w) * forward(data.normalize_images(v, mean, std))
                   for w, v in tta.tta_views(IMAGES, mode))
    got = tta.predict_logits(forward, IMAGES, mean, std, mode, batch_size=2)
    assert got.dtype == np.float32 and got.shape == (5, 4)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- trainer and evaluate agree

QUICK = ["--dataset", "synthetic", "--model", "simpleresnet4bit", "--epochs", "1", "--max-steps-per-epoch", "6",
         "--batch-size", "32", "--no-progress"]


@pytest.fixture(scope="module")
def tta_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tta")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(QUICK + ["--tta", "flip-translate", "--out", str(folder)]) == 0
    final = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])
    return folder, final, out.getvalue()


def test_final_record_holds_the_tta_accuracy_and_the_plain_one(tta_run):
    _, final, stdout = tta_run
    assert 0 <= final["test_acc_tta"] <= 1 and 0 <= final["test_acc"] <= 1
    assert (f"FINAL test accuracy (epoch 1): {final['test_acc_tta']:.2%} with test-time augmentation "
            f"flip-translate ({final['test_acc']:.2%} without)") in stdout


@pytest.mark.parametrize("mode, key", [("flip-translate", "test_acc_tta"), ("none", "test_acc")])
def test_evaluate_on_the_model_file_reproduces_the_trainer_exactly(tta_run, mode, key):
    folder, final, _ = tta_run
    result = evaluate.evaluate_file(folder / "model.nq4", "synthetic", tta=mode)
    assert result["accuracy"] == final[key]


def test_evaluate_cli_reports_the_tta_accuracy(tta_run, capsys):
    folder, final, _ = tta_run
    assert evaluate.main([str(folder / "model.nq4"), "--dataset", "synthetic", "--tta", "flip-translate",
                          "--plot", str(folder / "c.png")]) == 0
    out = capsys.readouterr().out
    assert (f"test accuracy: {final['test_acc_tta']:.2%} (500 images, test-time augmentation flip-translate)"
            in out)


def test_run_without_tta_has_no_tta_record(tmp_path):
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(QUICK + ["--tta", "none", "--out", str(tmp_path)]) == 0
    final = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert "test_acc_tta" not in final


@pytest.mark.parametrize("mode", ["rotate", "", None])
def test_unknown_mode_is_refused_naming_the_modes(mode):
    with pytest.raises(NanoQ4Error, match="flip-translate"):
        tta.check_tta_mode(mode)
    with pytest.raises(NanoQ4Error, match="flip-translate"):
        tta.tta_views(np.zeros((1, 4, 4, 3), np.uint8), mode)


@pytest.mark.parametrize("mode", tta.TTA_MODES)
def test_known_modes_are_accepted(mode):
    tta.check_tta_mode(mode)
