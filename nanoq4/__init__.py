"""nanoq4: true 4-bit quantized CNN training on the CPU, from scratch on NumPy + Numba.

    import nanoq4
    history = nanoq4.train(nanoq4.TrainConfig(dataset="cifar10", epochs=1))
    model = nanoq4.load_model("runs/<run>/model.nq4")      # the packed int4 file, for inference

Reading order: tensor -> ops -> kernels -> winograd -> quant -> nn -> optim -> data -> models -> train -> export
  tensor    Tensor, Function (forward/backward/apply), the iterative backward, no_grad
  ops       the differentiable ops; Conv2d dispatches to im2col + GEMM or Winograd
  kernels   Numba kernels, each with a plain-NumPy twin; winograd: F(4x4,3x3) transforms
  quant     the 4-bit grid: fake_quantize (the definition) and its fast twin, tanh clip, packing
  nn        Module, layers, QConv2d/QLinear with the straight-through estimator
  optim     SGD, AdamW, gradient clipping, the tanh-clip hook, schedules
  data      CIFAR, image folders, the augmenting batch loader; models: VGG4bit, SimpleResNet4bit
  train     TrainConfig (every setting, default and --help text) and the training loop
  export    checkpoints and the .nq4 model file; evaluate, predict, export_onnx use it
Around them: runlog (the run folder's files and lines), safeguards (what keeps a run from being
lost), tta (test-time augmentation), parallel (threads), memory (freed memory kept for reuse),
profile (NANOQ4_PROFILE=1), distributed (the same training on several MPI ranks), workers (... on
local worker processes, without MPI), cli (what the command lines share).

`nanoq4.train` is the trainer's module, as `python -m nanoq4.train` runs it, and calling it trains
(`nanoq4.train(cfg)` is `nanoq4.train.train(cfg)`); it and TrainConfig are loaded on first use, so
that running it as a program does not import it twice.
"""
import importlib

from . import ops
from .errors import NanoQ4Error
from .export import load_model
from .models import build_model, simple_resnet4bit, vgg4bit
from .nn import (BatchNorm1d, BatchNorm2d, Conv2d, Dropout, Flatten, GlobalAvgPool, Linear, MaxPool2d, Module,
                 Parameter, QConv2d, QLinear, ReLU, Sequential)
from .tensor import Function, Tensor, no_grad

__all__ = ["Tensor", "Function", "no_grad", "ops",
           "Module", "Parameter", "Conv2d", "Linear", "BatchNorm1d", "BatchNorm2d", "ReLU", "MaxPool2d",
           "GlobalAvgPool", "Dropout", "Flatten", "Sequential", "QConv2d", "QLinear",
           "build_model", "vgg4bit", "simple_resnet4bit", "train", "TrainConfig", "load_model", "NanoQ4Error"]


def __getattr__(name):
    """nanoq4.TrainConfig and nanoq4.train (the module), imported when first asked for."""
    if name in ("train", "TrainConfig"):
        trainer = importlib.import_module(f"{__name__}.train")
        return trainer if name == "train" else trainer.TrainConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
