"""One epoch of SimpleResNet4bit on the real CIFAR-10 (needs the official python-format data in
the folder named by NANOQ4_DATA, e.g. `python ../shared/data/materialize.py "$NANOQ4_DATA"`).
Missing data skips the test locally and fails it under CI, so a CI run cannot pass silently."""
import contextlib
import io
import os
import time

import pytest

from nanoq4.train import TrainConfig, train

pytestmark = pytest.mark.realdata


def cifar_folder():
    """The NANOQ4_DATA folder; without it, a skip locally and a failure under CI."""
    folder = os.environ.get("NANOQ4_DATA")
    if not folder:
        message = "NANOQ4_DATA is not set: point it at a folder holding cifar-10-batches-py/"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return folder


def test_one_epoch_of_simple_resnet_on_cifar10_reaches_40_percent(tmp_path):
    data_dir = cifar_folder()
    cfg = TrainConfig(dataset="cifar10", model="simpleresnet4bit", epochs=1, data_dir=data_dir, download=False,
                      progress=False, out=str(tmp_path), tta="none")  # TTA: test_realdata_recipe.py
    start = time.perf_counter()
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        history = train(cfg)
    elapsed = time.perf_counter() - start
    accuracy = history[-1]["test_acc"]
    print(f"\nSimpleResNet4bit, 1 epoch of CIFAR-10: test accuracy {accuracy:.2%} in {elapsed:.0f} s")
    assert accuracy >= 0.40, f"test accuracy {accuracy:.2%} after one epoch\n{log.getvalue()}"
