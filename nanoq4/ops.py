"""Differentiable ops, each a Function with its forward and hand-written backward side by side.

Shapes: images are NHWC, conv weights (Cout, KH, KW, Cin), linear weights (out, in) as in
PyTorch. Lowercase functions at the bottom (`conv2d`, `batch_norm`, ...) are the public API;
arithmetic operators on Tensor are attached here too.
"""
import os

import numpy as np

from . import kernels, winograd
from .tensor import Function, Tensor


def unbroadcast(grad, shape):
    """Sum a gradient over the axes NumPy broadcasting added or stretched, back to `shape`."""
    while grad.ndim > len(shape):
        grad = grad.sum(axis=0)
    for axis, size in enumerate(shape):
        if size == 1 and grad.shape[axis] != 1:
            grad = grad.sum(axis=axis, keepdims=True)
    return grad


# ----------------------------------------------------------------------------- elementwise

class Add(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.shapes = (a.shape, b.shape)
        return a + b

    @staticmethod
    def backward(ctx, grad):
        return unbroadcast(grad, ctx.shapes[0]), unbroadcast(grad, ctx.shapes[1])


class Sub(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.shapes = (a.shape, b.shape)
        return a - b

    @staticmethod
    def backward(ctx, grad):
        return unbroadcast(grad, ctx.shapes[0]), unbroadcast(-grad, ctx.shapes[1])


class Mul(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved
        return unbroadcast(grad * b, a.shape), unbroadcast(grad * a, b.shape)


class ReLU(Function):
    @staticmethod
    def forward(ctx, x):
        out = np.maximum(x, 0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved
        return grad * (out > 0)


# ----------------------------------------------------------------------------- reductions, shapes

class Sum(Function):
    @staticmethod
    def forward(ctx, x, axis=None, keepdims=False):
        ctx.shape, ctx.axis, ctx.keepdims = x.shape, axis, keepdims
        return np.asarray(x.sum(axis=axis, keepdims=keepdims))

    @staticmethod
    def backward(ctx, grad):
        if ctx.axis is not None and not ctx.keepdims:
            grad = np.expand_dims(grad, ctx.axis)
        return np.broadcast_to(grad, ctx.shape).copy()


class Reshape(Function):
    @staticmethod
    def forward(ctx, x, shape):
        ctx.shape = x.shape
        return x.reshape(shape)

    @staticmethod
    def backward(ctx, grad):
        return grad.reshape(ctx.shape)


class GlobalAvgPool(Function):
    """(N, H, W, C) -> (N, C), the mean over all positions."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.mean(axis=(1, 2), dtype=x.dtype)

    @staticmethod
    def backward(ctx, grad):
        n, h, w, c = ctx.shape
        return np.broadcast_to((grad / (h * w))[:, None, None, :], ctx.shape).copy()


# ----------------------------------------------------------------------------- dense layers

class MatMul(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a @ b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved
        return grad @ b.T, a.T @ grad


class Linear(Function):
    """y = x @ w.T + b with x (N, in), w (out, in), b (out,) or None."""

    @staticmethod
    def forward(ctx, x, w, b=None):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        out = x @ w.T
        if b is not None:
            out += b
        return out

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved
        dx = grad @ w if ctx.needs_input_grad[0] else None
        dw = grad.T @ x
        return (dx, dw, grad.sum(axis=0)) if ctx.has_bias else (dx, dw)


# ----------------------------------------------------------------------------- convolution

class Conv2d(Function):
    """2-D convolution (N,H,W,Cin) * (Cout,KH,KW,Cin) -> (N,OH,OW,Cout), zero padding, by one of
    two algorithms with the same result: Winograd F(4x4, 3x3) for wide 3x3 / stride 1 / padding 1
    layers (uses_winograd), im2col + GEMM for every other. forward picks one, and backward asks the
    same one for dx and dW; each saves what its own backward needs in ctx. The bias is added here."""

    @staticmethod
    def forward(ctx, x, w, b=None, stride=1, padding=0):
        if w.shape[3] != x.shape[3]:
            raise ValueError(f"conv2d: input has {x.shape[3]} channels, weight expects {w.shape[3]}")
        ctx.algorithm = Winograd3x3 if uses_winograd(w.shape, stride, padding) else Im2colGemm
        ctx.has_bias = b is not None
        out = ctx.algorithm.forward(ctx, x, w, stride, padding)
        if b is not None:
            out += b
        return out

    @staticmethod
    def backward(ctx, grad):
        dx, dw = ctx.algorithm.backward(ctx, grad, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return (dx, dw, grad.reshape(-1, grad.shape[-1]).sum(axis=0)) if ctx.has_bias else (dx, dw)


# 3x3 / stride 1 / padding 1 convolutions with at least this many input channels run as Winograd
# F(4x4, 3x3) (4x fewer multiplications; see winograd.py). Below it the transforms cost more
# than they save (VGG's 3-channel first layer runs slower as Winograd). NANOQ4_WINOGRAD=0 turns
# it off, for comparisons.
WINOGRAD_MIN_CIN = 64 if os.environ.get("NANOQ4_WINOGRAD", "1") != "0" else None


def uses_winograd(w_shape, stride, padding):
    """Whether conv2d with this (Cout, KH, KW, Cin) weight runs as Winograd F(4x4, 3x3)."""
    _, kh, kw, cin = w_shape
    return (WINOGRAD_MIN_CIN is not None and kh == kw == 3 and stride == 1 and padding == 1
            and cin >= WINOGRAD_MIN_CIN)


class Winograd3x3:
    """Conv2d's algorithm for 3x3 / stride 1 / padding 1 layers: winograd.py, which computes each
    4x4 output block from a 6x6 input window with 4x fewer multiplications than im2col.
    ctx.saved = (x, U): the input (backward recomputes its transform V from it, cheaper in memory
    than keeping V, 2.25x the input) and the transformed weights U (36, Cout, Cin), reused by
    backward instead of transforming the weight again."""

    @staticmethod
    def forward(ctx, x, w, stride, padding):
        out, saved = winograd.conv3x3_forward(x, w)
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx, grad, need_x, need_w):
        return winograd.conv3x3_backward(grad, ctx.saved, need_x=need_x, need_w=need_w)


CONV_CHUNK_BYTES = 128 << 20  # im2col buffer per chunk of images: bounds memory at any batch size


class Im2colGemm:
    """Conv2d's algorithm for any kernel size, stride and padding: im2col + GEMM.

    Each output pixel's receptive field is one row of the im2col matrix `cols` (K = KH*KW*Cin
    values, kernels.py), and y = cols @ W^T with W the (Cout, K) weight matrix. The batch is
    processed in chunks of images whose im2col matrix fits in CONV_CHUNK_BYTES, so memory stays
    flat at any batch size (smaller chunks run slower: BLAS wants tall GEMMs). Backward recomputes
    each chunk's patches (cheaper than keeping them all: 9x the input for a 3x3 kernel) for
    dW^T = cols^T @ dY and scatters dcols = dY @ W back with col2im, skipped when the input needs
    no gradient (the image batch). Except: a batch in one chunk whose patches are no larger than
    the output (K <= Cout: VGG's first layer, 27 <= 64) keeps them in ctx.cols for dW, which saves
    backward a pass over the input (ctx.cols is dropped when backward has used it).
    ctx.saved = (x, wmat): the input and the (Cout, K) weight matrix; ctx.geometry = (w.shape,
    stride, padding, OH, OW).
    """

    @staticmethod
    def forward(ctx, x, w, stride, padding):
        n, h, wd, cin = x.shape
        cout, kh, kw, _ = w.shape
        oh = kernels.conv_output_size(h, kh, stride, padding)
        ow = kernels.conv_output_size(wd, kw, stride, padding)
        wmat = w.reshape(cout, -1)
        wmat_t = np.ascontiguousarray(wmat.T)  # (K, Cout): a plain row-major GEMM operand
        out = np.empty((n * oh * ow, cout), dtype=np.result_type(x, w))
        ctx.cols = None
        for s, e, cols in _conv_chunks(x, kh, kw, stride, padding, oh, ow):
            np.matmul(cols, wmat_t, out=out[s * oh * ow:e * oh * ow])
            if e - s == n and ctx.needs_input_grad[1] and wmat.shape[1] <= cout:
                ctx.cols = cols  # one chunk no larger than the output: backward's dW reuses it
        ctx.save_for_backward(x, wmat)
        ctx.geometry = (w.shape, stride, padding, oh, ow)
        return out.reshape(n, oh, ow, cout)

    @staticmethod
    def backward(ctx, grad, need_x, need_w):
        x, wmat = ctx.saved
        w_shape, stride, padding, oh, ow = ctx.geometry
        cout, kh, kw, cin = w_shape
        g = grad.reshape(-1, cout)
        # dW is accumulated transposed, (K, Cout) = cols^T @ dY: OpenBLAS runs this orientation
        # much faster than dY^T @ cols, whose long reduction it barely parallelizes.
        dw_t = np.zeros(wmat.shape[::-1], dtype=g.dtype) if need_w else None
        dx = np.empty(x.shape, dtype=g.dtype) if need_x else None
        partial_dw_t = np.empty_like(dw_t) if need_w else None
        dcols = None
        chunks = ([(0, x.shape[0], ctx.cols)] if ctx.cols is not None
                  else _conv_chunks(x, kh, kw, stride, padding, oh, ow, need_cols=need_w))
        ctx.cols = None
        for s, e, cols in chunks:
            g_chunk = g[s * oh * ow:e * oh * ow]
            if need_w:
                np.matmul(cols.T, g_chunk, out=partial_dw_t)
                dw_t += partial_dw_t
            if need_x:
                if dcols is None or dcols.shape[0] < len(g_chunk):
                    dcols = np.empty((len(g_chunk), wmat.shape[1]), dtype=g.dtype)
                np.matmul(g_chunk, wmat, out=dcols[:len(g_chunk)])
                if kh == kw == 1 and stride == 1 and padding == 0:
                    dx[s:e] = dcols[:len(g_chunk)].reshape(dx[s:e].shape)
                else:
                    kernels.col2im(dcols[:len(g_chunk)], dx[s:e].shape, kh, kw, stride, padding, out=dx[s:e])
        dw = np.ascontiguousarray(dw_t.T).reshape(w_shape) if need_w else None
        return dx, dw


def _conv_chunks(x, kh, kw, stride, padding, oh, ow, need_cols=True):
    """Yield (first image, end image, im2col rows of those images), reusing one buffer.
    A 1x1/stride-1/unpadded convolution needs no im2col: its rows are the pixels themselves."""
    n, cin = x.shape[0], x.shape[3]
    k = kh * kw * cin
    pointwise = kh == kw == 1 and stride == 1 and padding == 0
    per_chunk = max(1, CONV_CHUNK_BYTES // (oh * ow * k * x.itemsize))
    buffer = np.empty((min(n, per_chunk) * oh * ow, k), dtype=x.dtype) if need_cols and not pointwise else None
    for s in range(0, n, per_chunk):
        e = min(n, s + per_chunk)
        if not need_cols:
            cols = None
        elif pointwise:
            cols = x[s:e].reshape(-1, k)
        else:
            cols = kernels.im2col(x[s:e], kh, kw, stride, padding, out=buffer[:(e - s) * oh * ow])
        yield s, e, cols


# ----------------------------------------------------------------------------- pooling

class MaxPool2d(Function):
    @staticmethod
    def forward(ctx, x, kernel_size=2, stride=None):
        out, argmax = kernels.max_pool(x, kernel_size, stride or kernel_size)
        ctx.save_for_backward(argmax)
        ctx.shape = x.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        (argmax,) = ctx.saved
        return kernels.max_pool_backward(grad, argmax, ctx.shape)


# ----------------------------------------------------------------------------- normalization

class BatchNorm(Function):
    """Batch norm over every axis but the last (channels): (N, C) or (N, H, W, C).

    Training uses batch statistics and updates the running ones in place (momentum 0.1,
    unbiased running variance, as PyTorch); eval uses the running statistics. `relu=True`
    fuses the following ReLU into the same pass (forward and backward). `sync` (data-parallel
    training with --sync-bn) sums the per-channel statistics over the ranks: (sums, m) -> totals.
    `input_bias` (C,) or None: normalize x + input_bias, each sum rounded as on its own: the
    preceding convolution's bias (nn.Sequential), added in this op's passes instead of a pass of its
    own; its gradient is the sum of dx over every axis but the last, as the convolution computes it.
    """

    @staticmethod
    def forward(ctx, x, gamma, beta, running_mean, running_var, input_bias=None, training=True, momentum=0.1,
                eps=1e-5, relu=False, sync=None):
        x2 = x.reshape(-1, x.shape[-1])
        mean, inv_std = _normalization_statistics(x2, running_mean, running_var, training, momentum, eps, sync,
                                                  input_bias)
        scale = gamma * inv_std
        y = kernels.scale_shift(x2, scale, beta - mean * scale, relu, bias=input_bias)
        ctx.save_for_backward(x2, y, mean, inv_std, gamma, input_bias)
        ctx.training, ctx.relu, ctx.shape, ctx.sync = training, relu, x.shape, sync
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx, grad):
        x2, y, mean, inv_std, gamma, input_bias = ctx.saved
        g = grad.reshape(x2.shape)
        if ctx.training:
            dx, dgamma, dbeta = kernels.batch_norm_backward(g, x2, y, mean, inv_std, gamma, ctx.relu, ctx.sync,
                                                            bias=input_bias)
        else:
            xb = x2 if input_bias is None else x2 + input_bias
            dx, dgamma, dbeta = _batch_norm_eval_backward(g, xb, y, mean, inv_std, gamma, ctx.relu)
        return (dx.reshape(ctx.shape), dgamma, dbeta) + _input_bias_grad(dx, input_bias)


def _input_bias_grad(dx, input_bias):
    """(d input_bias,) or (): dx summed over every axis but the last, as Conv2d.backward sums its bias's."""
    return () if input_bias is None else (dx.reshape(-1, dx.shape[-1]).sum(axis=0),)


def _normalization_statistics(x2, running_mean, running_var, training, momentum, eps, sync, bias=None):
    """(mean, 1/sqrt(var + eps)) per channel of (M, C) x2 (+ bias), float64: in training those of the batch
    (of the global batch under `sync`), which also move the running statistics in place; in eval
    the running statistics."""
    m = x2.shape[0]
    if training:
        sums = kernels.channel_sums(x2, bias)
        if sync is not None:
            sums, m = sync(sums, m)
        if m < 2:
            raise ValueError("batch_norm in training mode needs more than one value per channel")
        mean, var = kernels.mean_var_from_sums(sums, m)
        running_mean *= 1 - momentum
        running_mean += momentum * mean
        running_var *= 1 - momentum
        running_var += momentum * var * (m / (m - 1))
    else:
        mean, var = running_mean.astype(np.float64), running_var.astype(np.float64)
    return mean, 1.0 / np.sqrt(var + eps)


def _batch_norm_eval_backward(g, x2, y, mean, inv_std, gamma, relu):
    """Batch norm's gradients in eval mode, for (M, C) arrays: the statistics are constants, so it
    is a per-channel affine map (y, the forward output, gives the ReLU mask)."""
    if relu:
        g = np.where(y > 0, g, 0).astype(g.dtype)
    dx = (g * (gamma * inv_std).astype(g.dtype))
    dgamma = (g * ((x2 - mean) * inv_std)).sum(axis=0).astype(g.dtype)
    dbeta = g.sum(axis=0)
    return dx, dgamma, dbeta


class BatchNormReluPool(Function):
    """max_pool2d(batch_norm(x, relu=True), 2) of NHWC x as one op: the same values as BatchNorm
    followed by MaxPool2d, bit for bit (statistics, running-statistics update and `sync` as there),
    without the full-size activation between them or its gradient (kernels.batch_norm_relu_pool).
    An odd last row or column is left out of the pooling, as max_pool2d does, but not of the
    statistics. `input_bias` as in BatchNorm."""

    @staticmethod
    def forward(ctx, x, gamma, beta, running_mean, running_var, input_bias=None, training=True, momentum=0.1,
                eps=1e-5, sync=None):
        if x.ndim != 4:
            raise ValueError(f"batch_norm_relu_pool expects NHWC input, got shape {x.shape}")
        mean, inv_std = _normalization_statistics(x.reshape(-1, x.shape[-1]), running_mean, running_var,
                                                  training, momentum, eps, sync, input_bias)
        scale = gamma * inv_std
        shift = beta - mean * scale
        if training and any(ctx.needs_input_grad):
            out, argmax, x_max = kernels.batch_norm_relu_pool(x, scale, shift, keep_x_max=True, bias=input_bias)
            ctx.save_for_backward(x, argmax, out, x_max, mean, inv_std, gamma, input_bias)
        else:
            out, argmax = kernels.batch_norm_relu_pool(x, scale, shift, bias=input_bias)
            ctx.save_for_backward(x, argmax, mean, inv_std, gamma, scale, shift, input_bias)
        ctx.training, ctx.sync = training, sync
        return out

    @staticmethod
    def backward(ctx, grad):
        if ctx.training:
            x, argmax, out, x_max, mean, inv_std, gamma, input_bias = ctx.saved
            dx, dgamma, dbeta = kernels.batch_norm_relu_pool_backward(grad, argmax, out, x_max, x, mean, inv_std,
                                                                      gamma, ctx.sync, bias=input_bias)
            return (dx, dgamma, dbeta) + _input_bias_grad(dx, input_bias)
        # eval (rare: no training step runs it): the unfused path's arithmetic on the unpooled gradient
        x, argmax, mean, inv_std, gamma, scale, shift, input_bias = ctx.saved
        x2 = x.reshape(-1, x.shape[-1])
        if input_bias is not None:
            x2 = x2 + input_bias
        dy = kernels.unpool_2x2(grad, argmax, x.shape).reshape(x2.shape)
        y = kernels.scale_shift(x2, scale, shift, relu=True)
        dx, dgamma, dbeta = _batch_norm_eval_backward(dy, x2, y, mean, inv_std, gamma, relu=True)
        dx = dx.reshape(x.shape)
        return (dx, dgamma, dbeta) + _input_bias_grad(dx, input_bias)


class Dropout(Function):
    """Inverted dropout: zero with probability p, scale survivors by 1/(1-p); identity in eval."""

    @staticmethod
    def forward(ctx, x, p=0.5, training=True, rng=None):
        if not training or p == 0.0:
            ctx.mask = None
            return x
        rng = rng if rng is not None else np.random.default_rng()
        mask = (rng.random(x.shape, dtype=np.float32) >= p).astype(x.dtype) / x.dtype.type(1.0 - p)
        ctx.mask = mask
        return x * mask

    @staticmethod
    def backward(ctx, grad):
        return grad if ctx.mask is None else grad * ctx.mask


# ----------------------------------------------------------------------------- losses

def _log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


class LogSoftmax(Function):
    @staticmethod
    def forward(ctx, x):
        out = _log_softmax(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved
        return grad - np.exp(out) * grad.sum(axis=-1, keepdims=True)


class CrossEntropy(Function):
    """Mean cross-entropy of (N, K) logits against integer labels, with optional label
    smoothing: the target is (1 - eps) one-hot + eps / K uniform, as PyTorch defines it."""

    @staticmethod
    def forward(ctx, logits, labels, label_smoothing=0.0):
        labels = np.asarray(labels)
        n, k = logits.shape
        if labels.shape != (n,):
            raise ValueError(f"cross_entropy: labels shape {labels.shape}, expected ({n},)")
        logp = _log_softmax(logits)
        nll = -logp[np.arange(n), labels]
        loss = (1 - label_smoothing) * nll - label_smoothing * logp.mean(axis=1)
        ctx.save_for_backward(logp, labels)
        ctx.label_smoothing = label_smoothing
        return np.asarray(loss.mean(), dtype=logits.dtype)

    @staticmethod
    def backward(ctx, grad):
        logp, labels = ctx.saved
        n, k = logp.shape
        eps = ctx.label_smoothing
        dlogits = np.exp(logp) - eps / k
        dlogits[np.arange(n), labels] -= 1 - eps
        return dlogits * (grad / n)


# ----------------------------------------------------------------------------- public functions

def _as_tensor(x, like):
    return x if isinstance(x, Tensor) else Tensor(np.asarray(x, dtype=like.dtype))


def add(a, b):
    return Add.apply(_as_tensor(a, b), _as_tensor(b, a))


def sub(a, b):
    return Sub.apply(_as_tensor(a, b), _as_tensor(b, a))


def mul(a, b):
    return Mul.apply(_as_tensor(a, b), _as_tensor(b, a))


def relu(x):
    return ReLU.apply(x)


def sum(x, axis=None, keepdims=False):  # noqa: A001 (shadowing is deliberate: nanoq4.ops.sum)
    return Sum.apply(x, axis=axis, keepdims=keepdims)


def mean(x, axis=None, keepdims=False):
    count = x.size if axis is None else int(np.prod([x.shape[a] for a in np.atleast_1d(axis)]))
    return mul(sum(x, axis, keepdims), 1.0 / count)


def reshape(x, shape):
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    return Reshape.apply(x, shape=shape)


def flatten(x):
    """(N, ...) -> (N, prod(...)). For NHWC features the order is (h, w, c)."""
    return reshape(x, (x.shape[0], -1))


def matmul(a, b):
    return MatMul.apply(a, b)


def linear(x, weight, bias=None):
    return Linear.apply(x, weight, bias)


def conv2d(x, weight, bias=None, stride=1, padding=0):
    return Conv2d.apply(x, weight, bias, stride=stride, padding=padding)


def max_pool2d(x, kernel_size=2, stride=None):
    return MaxPool2d.apply(x, kernel_size=kernel_size, stride=stride)


def global_avg_pool(x):
    return GlobalAvgPool.apply(x)


def batch_norm(x, weight, bias, running_mean, running_var, training=True, momentum=0.1, eps=1e-5,
               relu=False, sync=None, input_bias=None):
    return BatchNorm.apply(x, weight, bias, running_mean, running_var, input_bias, training=training,
                           momentum=momentum, eps=eps, relu=relu, sync=sync)


def batch_norm_relu_pool(x, weight, bias, running_mean, running_var, training=True, momentum=0.1, eps=1e-5,
                         sync=None, input_bias=None):
    return BatchNormReluPool.apply(x, weight, bias, running_mean, running_var, input_bias, training=training,
                                   momentum=momentum, eps=eps, sync=sync)


def dropout(x, p=0.5, training=True, rng=None):
    return Dropout.apply(x, p=p, training=training, rng=rng)


def log_softmax(x):
    return LogSoftmax.apply(x)


def cross_entropy(logits, labels, label_smoothing=0.0):
    return CrossEntropy.apply(logits, labels, label_smoothing=label_smoothing)


Tensor.__add__ = add
Tensor.__radd__ = lambda self, other: add(other, self)
Tensor.__sub__ = sub
Tensor.__rsub__ = lambda self, other: sub(other, self)
Tensor.__mul__ = mul
Tensor.__rmul__ = lambda self, other: mul(other, self)
Tensor.__neg__ = lambda self: mul(self, -1.0)
Tensor.__matmul__ = matmul
Tensor.sum = sum
Tensor.mean = mean
Tensor.reshape = lambda self, *shape: reshape(self, shape[0] if len(shape) == 1 else shape)
Tensor.flatten = flatten
Tensor.relu = relu
