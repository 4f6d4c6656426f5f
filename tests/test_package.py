"""The package's face (nanoq4/__init__.py): the names a reader reaches for are there, importing it
stays cheap (no MPI, no plotting, no ONNX), and `python -m nanoq4.train` still runs the trainer
module once."""
import os
import subprocess
import sys

import numpy as np
import pytest

import nanoq4
from nanoq4 import distributed, export, models, nn, tensor
from nanoq4 import train as train_module

PUBLIC = {"Tensor": tensor.Tensor, "Function": tensor.Function, "no_grad": tensor.no_grad,
          "Module": nn.Module, "Parameter": nn.Parameter, "Conv2d": nn.Conv2d, "Linear": nn.Linear,
          "BatchNorm1d": nn.BatchNorm1d, "BatchNorm2d": nn.BatchNorm2d, "ReLU": nn.ReLU, "MaxPool2d": nn.MaxPool2d,
          "GlobalAvgPool": nn.GlobalAvgPool, "Dropout": nn.Dropout, "Flatten": nn.Flatten,
          "Sequential": nn.Sequential, "QConv2d": nn.QConv2d, "QLinear": nn.QLinear,
          "build_model": models.build_model, "vgg4bit": models.vgg4bit, "simple_resnet4bit": models.simple_resnet4bit,
          "TrainConfig": train_module.TrainConfig, "load_model": export.load_model}


def clean_env():
    return {k: v for k, v in os.environ.items() if k not in distributed.LAUNCH_VARIABLES}


@pytest.mark.parametrize("name", list(PUBLIC))
def test_public_name_is_the_object_it_names(name):
    assert getattr(nanoq4, name) is PUBLIC[name]
    assert name in nanoq4.__all__


def test_train_is_the_trainer_module_with_its_train_function():
    """`nanoq4.train` stays the module (python -m nanoq4.train, `from nanoq4 import train`)."""
    assert nanoq4.train is train_module
    assert callable(nanoq4.train.train) and nanoq4.train.TrainConfig is nanoq4.TrainConfig


def test_calling_nanoq4_train_trains(tmp_path):
    """`nanoq4.train(cfg)` is `nanoq4.train.train(cfg)`: the public name trains when called."""
    cfg = nanoq4.TrainConfig(dataset="synthetic", model="simpleresnet4bit", epochs=1, max_steps_per_epoch=2,
                             batch_size=16, tta="none", progress=False, out=str(tmp_path / "run"))
    history = nanoq4.train(cfg)
    assert [h["epoch"] for h in history] == [1]
    assert (tmp_path / "run" / "model.nq4").is_file()


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        nanoq4.no_such_name  # noqa: B018


def test_a_model_runs_from_the_top_level_names():
    model = nanoq4.build_model("simpleresnet4bit", 10).eval()
    with nanoq4.no_grad():
        logits = model(nanoq4.Tensor(np.zeros((2, 32, 32, 3), np.float32)))
    assert logits.shape == (2, 10) and logits._ctx is None


def test_importing_the_package_is_cheap():
    code = ("import sys, nanoq4; print(sorted(m for m in ('mpi4py', 'matplotlib', 'onnx', 'onnxruntime', "
            "'nanoq4.train', 'nanoq4.distributed') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], env=clean_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"imported by `import nanoq4`: {result.stdout.strip()}"


def test_running_the_trainer_as_a_program_imports_it_once():
    """Were nanoq4.train imported by the package, runpy would warn on stderr before running it again."""
    result = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "nanoq4.train", "--help"],
                            env=clean_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stderr == "", result.stderr
