"""Test-time augmentation: predict from the weighted logits of several views of each test
image. The trainer's final evaluation and `python -m nanoq4.evaluate` on the exported file both
go through predict_logits, so the two report the same accuracy."""
import numpy as np

from . import data
from .errors import NanoQ4Error

# Test-time augmentation: the prediction is a weighted sum of the logits of several views of
# each test image. "flip" averages the image and its mirror image (training flips at random,
# so both are in-distribution); "flip-translate" gives half the weight to that pair and half to
# the pairs of the image shifted one pixel up-left and one pixel down-right, zero-filled like
# the training crops. Each view costs one forward pass over the test set.
TTA_MODES = ("none", "flip", "flip-translate")


def shift_images(images, dy, dx):
    """out[:, i, j] = images[:, i + dy, j + dx], zero where that falls outside (uint8 NHWC)."""
    out = np.zeros_like(images)
    h, w = images.shape[1:3]
    out[:, max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)] = \
        images[:, max(dy, 0):h - max(-dy, 0), max(dx, 0):w - max(-dx, 0)]
    return out


def check_tta_mode(mode):
    """Refuse a mode that is not one of TTA_MODES, as one line naming them."""
    if mode not in TTA_MODES:
        raise NanoQ4Error(f"unknown test-time augmentation {mode!r}; choose one of: {', '.join(TTA_MODES)}")


def tta_views(images, mode):
    """[(weight, uint8 NHWC images)] whose weighted logits make the prediction; weights sum to 1."""
    check_tta_mode(mode)
    if mode == "none":
        return [(1.0, images)]
    pair = lambda x, weight: [(weight, x), (weight, x[:, :, ::-1])]
    if mode == "flip":
        return pair(images, 0.5)
    return pair(images, 0.25) + pair(shift_images(images, -1, -1), 0.125) + pair(shift_images(images, 1, 1), 0.125)


def predict_logits(forward, images, mean, std, tta="none", batch_size=250):
    """(N, classes) float32 logits of uint8 NHWC images under `tta`. forward maps a normalized
    float32 NHWC batch to logits. The trainer and `evaluate` both go through here, so a model
    file reproduces the trainer's final accuracy exactly."""
    total = None
    for weight, view in tta_views(images, tta):
        loader = data.BatchLoader(view, np.zeros(len(view), dtype=np.int64), batch_size, mean, std)
        logits = np.concatenate([forward(xb) for xb, _ in loader]) * np.float32(weight)
        total = logits if total is None else total + logits
    return total
