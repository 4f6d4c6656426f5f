"""The default recipe on the real CIFAR-10, cut short to fit CI: VGG4bit with every default of
TrainConfig (batch 256, SGD + Nesterov, one-cycle, per-channel 4-bit scales, label smoothing,
dropout) for one epoch of RECIPE_STEPS steps, its schedule compressed into them. A regression of
the recipe (a broken lever, a slower start, a quantizer change that costs accuracy) shows up
here as lost accuracy long before a full run would show it. Needs NANOQ4_DATA (see
test_realdata_train.py)."""
import contextlib
import io
import time

import pytest

from nanoq4.train import TrainConfig, train
from test_realdata_train import cifar_folder

pytestmark = pytest.mark.realdata

RECIPE_STEPS = 50        # 12,800 images: about 2 minutes on 2 cores
MEASURED = 0.500         # accuracy of this exact run when the threshold was set (2026-12-02)
THRESHOLD = 0.44         # fails below this: a regression of ~6 points


def test_default_recipe_short_run_on_cifar10(tmp_path):
    cfg = TrainConfig(dataset="cifar10", epochs=1, max_steps_per_epoch=RECIPE_STEPS, tta="none",
                      data_dir=cifar_folder(), download=False, progress=False, out=str(tmp_path))
    # The recipe MEASURED was taken with; a change of the defaults means measuring the threshold again.
    assert (cfg.model, cfg.batch_size, cfg.resolved_lr(), cfg.per_channel, cfg.bits, cfg.label_smoothing,
            cfg.dropout, cfg.optimizer, cfg.schedule) == ("vgg4bit", 256, 0.1, True, 4, 0.2, 0.0, "sgd", "onecycle")
    start = time.perf_counter()
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        history = train(cfg)
    accuracy = history[-1]["test_acc"]
    print(f"\nVGG4bit default recipe, {RECIPE_STEPS} steps of CIFAR-10: test accuracy {accuracy:.2%} "
          f"in {time.perf_counter() - start:.0f} s")
    assert accuracy >= THRESHOLD, f"test accuracy {accuracy:.2%} (measured {MEASURED:.2%} when set)\n{log.getvalue()}"
