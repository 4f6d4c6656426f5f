"""Modules: parameters plus a forward built from ops. Images are NHWC throughout.

Initialization follows PyTorch's defaults (Kaiming-uniform weights with a = sqrt(5), i.e.
U(-1/sqrt(fan_in), 1/sqrt(fan_in)), the same bound for biases; BatchNorm weight 1, bias 0), drawn
from one module-level generator that `manual_seed` resets and checkpoints save.
"""
from collections import OrderedDict

import numpy as np

from . import ops, profile, quant
from .errors import NanoQ4Error
from .tensor import Function, Tensor, no_grad

_rng = np.random.default_rng(0)


def manual_seed(seed):
    """Reseed the generator used by weight initialization and dropout."""
    global _rng
    _rng = np.random.default_rng(seed)


def get_rng_state():
    return _rng.bit_generator.state


def set_rng_state(state):
    _rng.bit_generator.state = state


class Parameter(Tensor):
    """A leaf tensor that an optimizer updates."""

    def __init__(self, data):
        super().__init__(np.asarray(data, dtype=np.float32), requires_grad=True)


class Module:
    """Base class: parameters, buffers (non-learned state such as BN running statistics),
    submodules, train/eval mode and state dicts, all found by walking attributes in order."""

    training = True
    buffer_names = ()

    def __call__(self, x):
        return self.forward(x)

    def forward(self, x):
        raise NotImplementedError

    def named_children(self):
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value
            elif isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    if isinstance(item, Module):
                        yield f"{name}.{i}", item

    def named_modules(self, prefix=""):
        yield prefix.rstrip("."), self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}{name}.")

    def modules(self):
        return [m for _, m in self.named_modules()]

    def named_parameters(self, prefix=""):
        for name, value in vars(self).items():
            if isinstance(value, Parameter):
                yield prefix + name, value
        for name, child in self.named_children():
            yield from child.named_parameters(f"{prefix}{name}.")

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def named_buffers(self, prefix=""):
        for name in self.buffer_names:
            yield prefix + name, getattr(self, name)
        for name, child in self.named_children():
            yield from child.named_buffers(f"{prefix}{name}.")

    def train(self, mode=True):
        for m in self.modules():
            m.training = mode
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def num_parameters(self):
        return int(sum(p.size for p in self.parameters()))

    def state_dict(self):
        state = OrderedDict((name, p.data.copy()) for name, p in self.named_parameters())
        state.update((name, b.copy()) for name, b in self.named_buffers())
        return state

    def load_state_dict(self, state):
        """Copy arrays in place; refuse missing, unexpected or mis-shaped entries by name."""
        targets = OrderedDict((name, p.data) for name, p in self.named_parameters())
        targets.update(self.named_buffers())
        missing = [k for k in targets if k not in state]
        unexpected = [k for k in state if k not in targets]
        if missing or unexpected:
            raise NanoQ4Error(f"state dict does not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]} (was it saved from another architecture?)")
        for name, target in targets.items():  # check every shape before copying anything
            value = np.asarray(state[name])
            if value.shape != target.shape:
                raise NanoQ4Error(f"state dict entry {name!r} has shape {value.shape}, the model "
                                  f"expects {target.shape} (another architecture or class count?)")
        for name, target in targets.items():
            target[...] = state[name]


def _uniform(shape, bound):
    return _rng.uniform(-bound, bound, size=shape).astype(np.float32)


class Linear(Module):
    def __init__(self, in_features, out_features, bias=True):
        bound = 1.0 / np.sqrt(in_features)
        self.weight = Parameter(_uniform((out_features, in_features), bound))
        self.bias = Parameter(_uniform((out_features,), bound)) if bias else None

    def forward(self, x):
        return ops.linear(x, self.weight, self.bias)


class Conv2d(Module):
    """Weight layout (Cout, KH, KW, Cin), matching NHWC im2col rows."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=0, bias=True):
        self.stride, self.padding = stride, padding
        fan_in = in_channels * kernel_size * kernel_size
        bound = 1.0 / np.sqrt(fan_in)
        self.weight = Parameter(_uniform((out_channels, kernel_size, kernel_size, in_channels), bound))
        self.bias = Parameter(_uniform((out_channels,), bound)) if bias else None

    def forward(self, x, add_bias=True):
        """add_bias=False leaves the bias to the layer after (nn.Sequential: a batch norm adds it in its pass)."""
        return ops.conv2d(x, self.compute_weight(), self.bias if add_bias else None, self.stride, self.padding)

    def compute_weight(self):
        """The weight the convolution computes with."""
        return self.weight


class STE(Function):
    """Straight-through estimator: forward returns the given quantized weight, backward
    passes the gradient w.r.t. the quantized weight unchanged to the latent float weight."""

    @staticmethod
    def forward(ctx, w, w_quantized):
        return w_quantized

    @staticmethod
    def backward(ctx, grad):
        # grad is dL/dW_q, computed by the conv/linear backward from the weight it used (W_q).
        # It goes to the latent float W unchanged: dW_q/dW is taken to be the identity, since
        # rint's true derivative is 0 almost everywhere and W would never move. There is one
        # gradient to return because W is the only parent (see quantized_weight).
        return grad


class QuantizedWeight:
    """Mixin for QConv2d/QLinear: the latent float32 weight is fake-quantized at every forward
    (scale max|W|/qmax recomputed each time) and the STE carries gradients back to it.
    `codes` and `scale` hold the integer weights of the last forward; `quantized_codes()`
    computes them from the current weight."""

    def setup_quantization(self, bits, per_channel):
        self.bits, self.per_channel = bits, per_channel
        self.weight.quantized = True  # the optimizer's tanh soft clip acts on these
        self.codes = self.scale = None
        self.stored = None

    def use_stored(self, codes, scale):
        """Compute with exactly these codes and scale (a model loaded from a file, for inference):
        re-deriving the scale from codes * scale could move it by one float32 ulp, and a
        prediction near a tie with it. Training the layer further would need stored = None."""
        w_q = quant.dequantize(codes, scale)
        self.weight.data[...] = w_q
        self.stored = (np.asarray(codes), np.asarray(scale, dtype=np.float32), w_q)

    def quantized_weight(self):
        """The weight the layer computes with: W_q as a Tensor whose gradient reaches self.weight."""
        if self.stored is not None:
            self.codes, self.scale, w_q = self.stored
        else:
            with profile.timed("fake_quantize"):
                w_q, self.codes, self.scale = quant.fake_quantize_fast(self.weight.data, self.bits,
                                                                       self.per_channel)
        # w_q is a plain ndarray computed from weight.data, so the rounding and max|W| record no graph,
        # and Function.apply makes parents only of Tensors: W (self.weight) is the STE's one parent and
        # w_q is its output's value. The conv/linear backward then gives dL/dW_q, which the STE hands to
        # W.grad unchanged; the scale counts as a constant of the step.
        return STE.apply(self.weight, w_q)

    def quantized_codes(self):
        return quant.quantize(self.weight.data, self.bits, self.per_channel)


class QConv2d(Conv2d, QuantizedWeight):
    """The paper's Conv4bit: a convolution whose weights are b-bit symmetric integers times a scale."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=0, bias=True, bits=4,
                 per_channel=False):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, bias)
        self.setup_quantization(bits, per_channel)

    def compute_weight(self):
        return self.quantized_weight()


class QLinear(Linear, QuantizedWeight):
    """The paper's Linear4bit."""

    def __init__(self, in_features, out_features, bias=True, bits=4, per_channel=False):
        super().__init__(in_features, out_features, bias)
        self.setup_quantization(bits, per_channel)

    def forward(self, x):
        return ops.linear(x, self.quantized_weight(), self.bias)


class _BatchNorm(Module):
    buffer_names = ("running_mean", "running_var")

    def __init__(self, num_features, eps=1e-5, momentum=0.1, relu=False):
        """relu=True fuses the ReLU that follows batch norm into the same kernel pass. `sync`:
        None (the statistics of this process's batch) or, in data-parallel training with
        --sync-bn, a function summing them over the processes (distributed.Group.sync_batch_norm)."""
        self.eps, self.momentum, self.relu = eps, momentum, relu
        self.sync = None
        self.weight = Parameter(np.ones(num_features))
        self.bias = Parameter(np.zeros(num_features))
        self.running_mean = np.zeros(num_features, dtype=np.float32)
        self.running_var = np.ones(num_features, dtype=np.float32)

    def forward(self, x, input_bias=None):
        """input_bias: the preceding convolution's bias, for this layer to add (takes_bias_of)."""
        if x.ndim != self.expected_ndim:
            raise ValueError(f"{type(self).__name__} expects {self.expected_ndim}-D input, got {x.shape}")
        return ops.batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var,
                              self.training, self.momentum, self.eps, self.relu, self.sync, input_bias)


class BatchNorm2d(_BatchNorm):
    expected_ndim = 4

    def pools_with(self, layer):
        """Whether this layer and `layer` after it run as one op (ops.batch_norm_relu_pool):
        a ReLU'd batch norm followed by a 2x2 / stride-2 max pool."""
        return self.relu and isinstance(layer, MaxPool2d) and layer.kernel_size == layer.stride == 2

    def forward_pooled(self, x, input_bias=None):
        """max_pool2d(self(x), 2), the same values, in one pass that never stores self(x)."""
        return ops.batch_norm_relu_pool(x, self.weight, self.bias, self.running_mean, self.running_var,
                                        self.training, self.momentum, self.eps, self.sync, input_bias)

    def takes_bias_of(self, layer):
        """Whether this layer adds the bias of `layer` before it, a convolution with a bias, which then
        skips its own pass over the activations for it (and backward the pass summing its gradient).
        The same bits: each x + bias is rounded as the convolution rounds it."""
        return isinstance(layer, Conv2d) and layer.bias is not None


class BatchNorm1d(_BatchNorm):
    expected_ndim = 2


def set_batch_norm_momentum(model, momentum):
    """Every batch norm's running statistics move by `momentum` (PyTorch's convention: the batch's
    share, running <- (1 - momentum) * running + momentum * batch) at each training forward."""
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.momentum = momentum


def reestimate_batch_norm(model, batches):
    """Set every batch norm's running statistics to the plain average over `batches` (model inputs)
    of the batch mean and unbiased batch variance, as PyTorch's momentum=None: training-mode
    forwards, no gradients, dropout off -> the number of batches. Why: 4-bit weights oscillate
    between grid levels up to the last step, so the running averages mix statistics of weights the
    exported model no longer has (Nagel et al. 2022)."""
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    modes = [(m, m.training) for m in model.modules()]
    momenta = [bn.momentum for bn in norms]
    model.eval()
    for bn in norms:
        bn.training = True
    count = 0
    try:
        with no_grad():
            for count, x in enumerate(batches, 1):
                for bn in norms:  # running <- running + (batch - running) / count: the mean of the batches so far
                    bn.momentum = 1.0 / count
                model(Tensor(x))
    finally:
        for m, training in modes:
            m.training = training
        for bn, momentum in zip(norms, momenta):
            bn.momentum = momentum
    return count


class ReLU(Module):
    def forward(self, x):
        return ops.relu(x)


class MaxPool2d(Module):
    def __init__(self, kernel_size=2, stride=None):
        self.kernel_size, self.stride = kernel_size, stride or kernel_size

    def forward(self, x):
        return ops.max_pool2d(x, self.kernel_size, self.stride)


class GlobalAvgPool(Module):
    def forward(self, x):
        return ops.global_avg_pool(x)


class Dropout(Module):
    def __init__(self, p=0.5):
        self.p = p

    def forward(self, x):
        return ops.dropout(x, self.p, self.training, _rng)


class Flatten(Module):
    def forward(self, x):
        return ops.flatten(x)


class Sequential(Module):
    """The layers applied in order. A BatchNorm2d(relu=True) followed by a MaxPool2d(2) (VGG's block
    ends) runs as one fused op, BatchNorm2d.forward_pooled, with the same result; a BatchNorm2d also
    adds the bias of a convolution before it (takes_bias_of). The layers stay as written, so parameter
    names, checkpoints and exports see the model as it is."""

    def __init__(self, *layers):
        self.layers = list(layers)

    def __getitem__(self, i):
        return self.layers[i]

    def __len__(self):
        return len(self.layers)

    def forward(self, x):
        i = 0
        while i < len(self.layers):
            layer, following = self.layers[i], self.layers[i + 1:i + 3]
            bias = None
            if following and isinstance(following[0], BatchNorm2d) and following[0].takes_bias_of(layer):
                x, bias = layer.forward(x, add_bias=False), layer.bias
                i += 1
                layer, following = following[0], following[1:]
            if isinstance(layer, BatchNorm2d) and following and layer.pools_with(following[0]):
                x = layer.forward_pooled(x, bias)
                i += 2
            else:
                x = layer.forward(x, bias) if bias is not None else layer(x)
                i += 1
        return x
