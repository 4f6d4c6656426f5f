"""nanoq4: true 4-bit quantized CNN training on the CPU, from scratch on NumPy + Numba.

Reading order: tensor -> ops -> kernels -> quant -> nn -> optim -> data -> models -> tta -> safeguards -> train
-> export (evaluate, predict, export_onnx: the model file in use)
(cli: what the command lines share; distributed: the same training on several MPI ranks).
"""
from .errors import NanoQ4Error
from .tensor import Function, Tensor, no_grad
from . import ops
