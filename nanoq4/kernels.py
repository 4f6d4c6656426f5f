"""Numba kernels for the element work around the GEMMs, each next to a plain-NumPy twin.

Activation layout everywhere is NHWC (batch, height, width, channels), C-contiguous. With
channels last, one im2col row (one output pixel) is KH*KW runs of C contiguous floats, so
im2col/col2im copy whole channel vectors, and the GEMM result (N*OH*OW, Cout) already *is*
the NHWC output: no transposes around the matmul. Convolution weights are (Cout, KH, KW, Cin),
so `w.reshape(Cout, -1)` lines up with an im2col row.

Kernels parallelize over independent rows or images (`prange`), and reductions use per-thread
partial sums reduced afterwards, never a shared accumulator. The `*_reference` twins are slow
and obvious; tests compare every kernel against its twin.
"""
import os

# Numba's OpenMP workers spin-wait after every parallel region by default and fight OpenBLAS's
# threads (and any other process) for the cores, which stalls small steps on few cores.
# Passive waiting must be set before numba first loads libgomp, i.e. before any kernel runs.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numba  # noqa: E402
import numpy as np  # noqa: E402
from numba import njit, prange  # noqa: E402


def conv_output_size(size, kernel, stride, padding):
    return (size + 2 * padding - kernel) // stride + 1


# ----------------------------------------------------------------------------- im2col / col2im

@njit(parallel=True, cache=True)
def _im2col_kernel(x, kh, kw, stride, pad, oh, ow, cols):
    n, h, w, c = x.shape
    for row in prange(n * oh):
        b, i = row // oh, row % oh
        for j in range(ow):
            r = row * ow + j
            col = 0
            for ki in range(kh):
                y = i * stride - pad + ki
                for kj in range(kw):
                    xx = j * stride - pad + kj
                    if 0 <= y < h and 0 <= xx < w:
                        for ch in range(c):
                            cols[r, col + ch] = x[b, y, xx, ch]
                    else:
                        for ch in range(c):
                            cols[r, col + ch] = 0.0
                    col += c


def im2col(x, kh, kw, stride, pad, out=None):
    """(N, H, W, C) -> (N*OH*OW, KH*KW*C); column order (ki, kj, c) matches w.reshape(Cout, -1)."""
    n, h, w, c = x.shape
    oh, ow = conv_output_size(h, kh, stride, pad), conv_output_size(w, kw, stride, pad)
    if out is None:
        out = np.empty((n * oh * ow, kh * kw * c), dtype=x.dtype)
    _im2col_kernel(np.ascontiguousarray(x), kh, kw, stride, pad, oh, ow, out)
    return out


def im2col_reference(x, kh, kw, stride, pad):
    n, h, w, c = x.shape
    oh, ow = conv_output_size(h, kh, stride, pad), conv_output_size(w, kw, stride, pad)
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    patches = [xp[:, ki:ki + stride * oh:stride, kj:kj + stride * ow:stride, :]
               for ki in range(kh) for kj in range(kw)]
    return np.concatenate(patches, axis=3).reshape(n * oh * ow, kh * kw * c)


@njit(parallel=True, cache=True)
def _col2im_kernel(cols, kh, kw, stride, pad, oh, ow, dx):
    n, h, w, c = dx.shape
    for b in prange(n):  # images are independent; windows inside one image overlap
        for i in range(oh):
            for j in range(ow):
                r = (b * oh + i) * ow + j
                col = 0
                for ki in range(kh):
                    y = i * stride - pad + ki
                    for kj in range(kw):
                        xx = j * stride - pad + kj
                        if 0 <= y < h and 0 <= xx < w:
                            for ch in range(c):
                                dx[b, y, xx, ch] += cols[r, col + ch]
                        col += c


def col2im(cols, x_shape, kh, kw, stride, pad, out=None):
    """Adjoint of im2col: scatter-add (N*OH*OW, KH*KW*C) back to (N, H, W, C) (into `out`)."""
    n, h, w, c = x_shape
    oh, ow = conv_output_size(h, kh, stride, pad), conv_output_size(w, kw, stride, pad)
    dx = np.zeros(x_shape, dtype=cols.dtype) if out is None else out
    if out is not None:
        dx.fill(0)
    _col2im_kernel(np.ascontiguousarray(cols), kh, kw, stride, pad, oh, ow, dx)
    return dx


def col2im_reference(cols, x_shape, kh, kw, stride, pad):
    n, h, w, c = x_shape
    oh, ow = conv_output_size(h, kh, stride, pad), conv_output_size(w, kw, stride, pad)
    dxp = np.zeros((n, h + 2 * pad, w + 2 * pad, c), dtype=cols.dtype)
    patches = cols.reshape(n, oh, ow, kh, kw, c)
    for ki in range(kh):
        for kj in range(kw):
            dxp[:, ki:ki + stride * oh:stride, kj:kj + stride * ow:stride, :] += patches[:, :, :, ki, kj, :]
    return dxp[:, pad:pad + h, pad:pad + w, :]


# ----------------------------------------------------------------------------- max pooling

@njit(parallel=True, cache=True)
def _max_pool_kernel(x, k, stride, oh, ow, out, argmax):
    n, h, w, c = x.shape
    for row in prange(n * oh):
        b, i = row // oh, row % oh
        for j in range(ow):
            for ch in range(c):
                # start from the window's first pixel, so a window of all -inf still points
                # inside itself (as argmax does), not at pixel (0, 0) of the image
                best = x[b, i * stride, j * stride, ch]
                best_idx = i * stride * w + j * stride
                for ki in range(k):
                    y = i * stride + ki
                    for kj in range(k):
                        xx = j * stride + kj
                        v = x[b, y, xx, ch]
                        if v > best:
                            best = v
                            best_idx = y * w + xx
                out[b, i, j, ch] = best
                argmax[b, i, j, ch] = best_idx


def max_pool(x, k, stride):
    """(N, H, W, C) -> pooled output and, per output, the flat index y*W+x of its maximum
    (first maximum in window order on ties), which backward scatters the gradient to."""
    n, h, w, c = x.shape
    oh, ow = (h - k) // stride + 1, (w - k) // stride + 1
    out = np.empty((n, oh, ow, c), dtype=x.dtype)
    argmax = np.empty((n, oh, ow, c), dtype=np.int32)
    _max_pool_kernel(np.ascontiguousarray(x), k, stride, oh, ow, out, argmax)
    return out, argmax


def max_pool_reference(x, k, stride):
    n, h, w, c = x.shape
    oh, ow = (h - k) // stride + 1, (w - k) // stride + 1
    windows = np.stack([x[:, ki:ki + stride * oh:stride, kj:kj + stride * ow:stride, :]
                        for ki in range(k) for kj in range(k)], axis=0)
    first = windows.argmax(axis=0)  # window position of the first maximum
    ki, kj = first // k, first % k
    ys = np.arange(oh)[None, :, None, None] * stride + ki
    xs = np.arange(ow)[None, None, :, None] * stride + kj
    return windows.max(axis=0), (ys * w + xs).astype(np.int32)


@njit(parallel=True, cache=True)
def _max_pool_backward_kernel(grad, argmax, dx):
    n, oh, ow, c = grad.shape
    w = dx.shape[2]
    for b in prange(n):  # overlapping windows (stride < k) may hit one pixel twice: stay per image
        for i in range(oh):
            for j in range(ow):
                for ch in range(c):
                    idx = argmax[b, i, j, ch]
                    dx[b, idx // w, idx % w, ch] += grad[b, i, j, ch]


def max_pool_backward(grad, argmax, x_shape):
    dx = np.zeros(x_shape, dtype=grad.dtype)
    _max_pool_backward_kernel(np.ascontiguousarray(grad), argmax, dx)
    return dx


def max_pool_backward_reference(grad, argmax, x_shape):
    n, h, w, c = x_shape
    dx = np.zeros((n, h * w, c), dtype=grad.dtype)
    b = np.arange(n)[:, None, None, None]
    ch = np.arange(c)[None, None, None, :]
    np.add.at(dx, (np.broadcast_to(b, grad.shape), argmax, np.broadcast_to(ch, grad.shape)), grad)
    return dx.reshape(x_shape)


# ----------------------------------------------------------------------------- batch norm

def _row_chunks(m):
    """Split m rows into a few chunks per thread, for per-thread partial reductions."""
    chunks = max(1, min(m, 4 * numba.get_num_threads()))
    return chunks, (m + chunks - 1) // chunks


@njit(parallel=True, cache=True)
def _channel_sums_kernel(x, bias, chunks, step):
    m, c = x.shape
    partial = np.zeros((chunks, 2, c), dtype=np.float64)
    for t in prange(chunks):
        for r in range(t * step, min(m, (t + 1) * step)):
            for ch in range(c):
                xb = x[r, ch]
                if bias is not None:  # a None argument: Numba compiles the branch away
                    xb = xb + bias[ch]
                v = np.float64(xb)  # square in float64 too: E[x^2] - mean^2 cancels
                partial[t, 0, ch] += v
                partial[t, 1, ch] += v * v
    return partial.sum(axis=0)


def channel_sums(x2d, bias=None):
    """Per-column sum and sum of squares of a (M, C) array (of x + bias, see scale_shift) as float64
    (2, C): what batch norm synchronized across data-parallel ranks adds up."""
    chunks, step = _row_chunks(x2d.shape[0])
    return _channel_sums_kernel(x2d, _as_bias(bias, x2d.dtype), chunks, step)


def _as_bias(bias, dtype):
    return None if bias is None else np.ascontiguousarray(bias, dtype=dtype)


def mean_var_from_sums(sums, m):
    """Mean and biased variance per column from channel_sums of m rows."""
    mean = sums[0] / m
    var = np.maximum(sums[1] / m - mean * mean, 0.0)
    return mean, var


def channel_mean_var(x2d):
    """Per-column mean and biased variance of a (M, C) array, accumulated in float64."""
    return mean_var_from_sums(channel_sums(x2d), x2d.shape[0])


def channel_mean_var_reference(x2d):
    x = x2d.astype(np.float64)
    return x.mean(axis=0), x.var(axis=0)


@njit(parallel=True, cache=True)
def _scale_shift_kernel(x, bias, scale, shift, relu, out):
    m, c = x.shape
    for r in prange(m):
        for ch in range(c):
            xb = x[r, ch]
            if bias is not None:  # a None argument: Numba compiles the branch away
                xb = xb + bias[ch]
            v = xb * scale[ch] + shift[ch]
            out[r, ch] = max(v, 0.0) if relu else v


def scale_shift(x2d, scale, shift, relu=False, bias=None):
    """out = x * scale + shift per column (the affine part of batch norm), optionally ReLU'd. `bias`
    (per column), here and in the other batch-norm kernels, is added to x first, rounded as x + bias
    alone would be: the preceding convolution's bias, whose own pass over the activations this saves."""
    out = np.empty_like(x2d)
    bias = _as_bias(bias, x2d.dtype)
    _scale_shift_kernel(x2d, bias, scale.astype(x2d.dtype), shift.astype(x2d.dtype), relu, out)
    return out


@njit(parallel=True, cache=True)
def _bn_backward_sums_kernel(dy, x, bias, y, mean, relu, chunks, step):
    m, c = x.shape
    partial = np.zeros((chunks, 2, c), dtype=np.float64)
    for t in prange(chunks):
        for r in range(t * step, min(m, (t + 1) * step)):
            for ch in range(c):
                g = dy[r, ch]
                if relu and y[r, ch] <= 0.0:
                    g = 0.0
                xb = x[r, ch]
                if bias is not None:
                    xb = xb + bias[ch]
                partial[t, 0, ch] += g
                partial[t, 1, ch] += g * (xb - mean[ch])
    return partial.sum(axis=0)


@njit(parallel=True, cache=True)
def _bn_backward_dx_kernel(dy, x, bias, y, mean, relu, a, b, d, dx):
    m, c = x.shape
    for r in prange(m):
        for ch in range(c):
            g = dy[r, ch]
            if relu and y[r, ch] <= 0.0:
                g = 0.0
            xb = x[r, ch]
            if bias is not None:
                xb = xb + bias[ch]
            dx[r, ch] = a[ch] * g - b[ch] * (xb - mean[ch]) - d[ch]


def batch_norm_backward(dy, x, y, mean, inv_std, gamma, relu, sync=None, bias=None):
    """Gradients of y = [relu](gamma * (x - mean) * inv_std + beta) with batch statistics,
    for (M, C) arrays: returns dx, dgamma, dbeta. `y` is the forward output (for the ReLU mask).

    dx = gamma*inv_std * (g - mean(g) - xhat * mean(g*xhat)), where g is dy masked by the ReLU.
    With `sync` (statistics over several data-parallel ranks: sums, m -> their totals over the
    ranks) the means run over the global batch; dgamma and dbeta stay this rank's part, which
    the gradient sum over the ranks completes. With `bias` the input is x + bias (scale_shift).
    """
    m = x.shape[0]
    chunks, step = _row_chunks(m)
    bias = _as_bias(bias, x.dtype)
    sums = _bn_backward_sums_kernel(dy, x, bias, y, mean.astype(x.dtype), relu, chunks, step)
    a, b, d, dgamma, dbeta = _bn_backward_coefficients(sums, m, inv_std, gamma, sync)
    dx = np.empty_like(x)
    _bn_backward_dx_kernel(dy, x, bias, y, mean.astype(x.dtype), relu, a.astype(x.dtype), b.astype(x.dtype),
                           d.astype(x.dtype), dx)
    return dx, dgamma.astype(x.dtype), dbeta.astype(x.dtype)


def _bn_backward_coefficients(sums, m, inv_std, gamma, sync):
    """From this rank's sums of g and g*(x - mean) over its m rows: the per-channel a, b, d of
    dx = a*g - b*(x - mean) - d (means over the global batch under `sync`), and dgamma, dbeta."""
    dbeta = sums[0]
    dgamma = sums[1] * inv_std  # sum(g * xhat)
    if sync is not None:
        sums, m = sync(sums, m)
    a = gamma * inv_std
    b = a * inv_std * (sums[1] * inv_std) / m  # coefficient of (x - mean): a * xhat * mean(g*xhat) / (x-mean)
    d = a * sums[0] / m
    return a, b, d, dgamma, dbeta


def batch_norm_backward_reference(dy, x, y, mean, inv_std, gamma, relu):
    g = np.where(y > 0, dy, 0.0) if relu else dy
    xhat = (x - mean) * inv_std
    dbeta = g.sum(axis=0)
    dgamma = (g * xhat).sum(axis=0)
    dx = gamma * inv_std * (g - dbeta / len(x) - xhat * dgamma / len(x))
    return dx, dgamma, dbeta


# ----------------------------------------------------------------------------- batch norm + ReLU + 2x2 max pool
#
# VGG's blocks end in BN-ReLU then a 2x2 max pool. Fused, the full-size activation between them and
# its full-size gradient are never stored: forward reads x once and writes the pooled quarter, with
# each maximum's window position 0..3 (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right) in a
# uint8 and, for training, the input x at each maximum. Each value is computed by the same float32
# expression as scale_shift, max_pool and the batch-norm backward kernels, so the results are those
# of the unfused chain bit for bit. An odd last row or column is in no window, as in max_pool.
#
# Backward needs, per pixel, g: the pooled gradient if the pixel is its window's maximum and its
# ReLU is on, else 0. The ReLU at the maximum is on exactly when the pooled output is > 0 (it is
# max(v, 0) of that pixel's v), so the pooled output and the window position give g without x, and
# the per-channel sums of g and g * (x - mean) need only the pooled arrays and x at the maxima: a
# quarter of the data. Only dx, which every pixel has, reads x in full.

@njit(parallel=True, cache=True)
def _bn_relu_pool_kernel(x, bias, scale, shift, out, argmax, x_max):
    # bias and x_max may be None: Numba compiles the branches on them away, so each variant runs
    # as a plain loop over channels
    n, h, w, c = x.shape
    oh, ow = out.shape[1], out.shape[2]
    for row in prange(n * oh):
        img, i = row // oh, row % oh
        for j in range(ow):
            for ch in range(c):
                xv = x[img, 2 * i, 2 * j, ch]
                xb = xv
                if bias is not None:
                    xb = xv + bias[ch]
                best, best_pos, best_x = max(xb * scale[ch] + shift[ch], 0.0), 0, xb
                for pos in range(1, 4):  # the first maximum wins a tie, as in max_pool
                    xv = x[img, 2 * i + pos // 2, 2 * j + pos % 2, ch]
                    xb = xv
                    if bias is not None:
                        xb = xv + bias[ch]
                    v = max(xb * scale[ch] + shift[ch], 0.0)
                    if v > best:
                        best, best_pos, best_x = v, pos, xb
                out[img, i, j, ch] = best
                argmax[img, i, j, ch] = best_pos
                if x_max is not None:
                    x_max[img, i, j, ch] = best_x


def batch_norm_relu_pool(x, scale, shift, keep_x_max=False, bias=None):
    """max_pool(relu(x * scale + shift), 2, 2) of NHWC x in one pass: the pooled (N, H//2, W//2, C)
    output, and as uint8 the window position 0..3 of each maximum (first maximum on ties); with
    `keep_x_max` also x (+ bias) at each maximum (N, H//2, W//2, C), which the backward wants. `bias`
    as in scale_shift."""
    n, h, w, c = x.shape
    out = np.empty((n, h // 2, w // 2, c), dtype=x.dtype)
    argmax = np.empty(out.shape, dtype=np.uint8)
    x_max = np.empty(out.shape, dtype=x.dtype) if keep_x_max else None
    bias = _as_bias(bias, x.dtype)
    _bn_relu_pool_kernel(np.ascontiguousarray(x), bias, scale.astype(x.dtype), shift.astype(x.dtype), out, argmax,
                         x_max)
    return (out, argmax, x_max) if keep_x_max else (out, argmax)


def window_position(flat_argmax, w):
    """max_pool's flat index y*W+x of a 2x2/stride-2 maximum -> its position 0..3 in the window."""
    return (2 * (flat_argmax // w % 2) + flat_argmax % w % 2).astype(np.uint8)


def batch_norm_relu_pool_reference(x, scale, shift):
    y = np.maximum(x * scale.astype(x.dtype) + shift.astype(x.dtype), 0)
    out, flat_argmax = max_pool_reference(y, 2, 2)
    return out, window_position(flat_argmax, x.shape[2])


def unpool_2x2(grad, argmax, x_shape):
    """Adjoint of 2x2 max pooling: each pooled gradient at its window position (uint8 0..3), zeros
    elsewhere, as (N, H, W, C)."""
    dy = np.zeros(x_shape, dtype=grad.dtype)
    oh, ow = grad.shape[1], grad.shape[2]
    for pos in range(4):
        dy[:, pos // 2:2 * oh:2, pos % 2:2 * ow:2, :] = np.where(argmax == pos, grad, 0)
    return dy


@njit(parallel=True, cache=True)
def _bn_relu_pool_backward_sums_kernel(grad, argmax, out, x_max, mean, h, w, chunks, step):
    # The sums of _bn_backward_sums_kernel over the unpooled gradient, the same bits: the same chunks of
    # pixels r = (img*h + y)*w + xx, and within a chunk, per channel, the same terms in the same order
    # (pixel rows one after another; in a row each window has at most one nonzero term, so windows in
    # order are pixels in order). A term whose g is 0 adds 0.0 or nothing, and neither changes a float64
    # sum that started at +0.0 (it is never -0.0).
    n, oh, ow, c = grad.shape
    partial = np.zeros((chunks, 2, c), dtype=np.float64)
    for t in prange(chunks):
        total, weighted = np.zeros(c), np.zeros(c)
        first, end = t * step, min(n * h * w, (t + 1) * step)
        for line in range(first // w, (end + w - 1) // w):  # pixel rows this chunk touches
            img, y = line // h, line % h
            i, half = y // 2, y % 2
            if i >= oh:
                continue  # the last row of an odd height: in no window
            x0, x1 = max(first - line * w, 0), min(end - line * w, w)  # the chunk's pixels of this row
            for j in range(x0 // 2, min(ow, (x1 + 1) // 2)):
                for ch in range(c):
                    pos = argmax[img, i, j, ch]
                    xx = 2 * j + pos % 2
                    here = (pos // 2 == half) & (xx >= x0) & (xx < x1) & (out[img, i, j, ch] > 0.0)
                    g = 0.0  # float64 under Numba, as in _bn_backward_sums_kernel
                    if here:
                        g = grad[img, i, j, ch]
                    total[ch] += g
                    weighted[ch] += g * (x_max[img, i, j, ch] - mean[ch])
        partial[t, 0] = total
        partial[t, 1] = weighted
    return partial.sum(axis=0)


@njit(parallel=True, cache=True)
def _bn_relu_pool_backward_dx_kernel(grad, argmax, out, x, bias, mean, a, b, d, dx):
    n, h, w, c = x.shape
    oh, ow = grad.shape[1], grad.shape[2]
    for row in prange(n * h):
        img, y = row // h, row % h
        for xx in range(w):
            i, j, pos = y // 2, xx // 2, 2 * (y % 2) + xx % 2
            pooled = i < oh and j < ow
            for ch in range(c):
                g = 0.0  # the gradient reaching this pixel's ReLU output (float64, as in _bn_backward_dx_kernel)
                if pooled and (argmax[img, i, j, ch] == pos) & (out[img, i, j, ch] > 0.0):
                    g = grad[img, i, j, ch]
                xb = x[img, y, xx, ch]
                if bias is not None:
                    xb = xb + bias[ch]
                dx[img, y, xx, ch] = a[ch] * g - b[ch] * (xb - mean[ch]) - d[ch]


def batch_norm_relu_pool_backward(grad, argmax, out, x_max, x, mean, inv_std, gamma, sync=None, bias=None):
    """Gradients of batch_norm_relu_pool with batch statistics, from its forward's output `out`,
    window positions `argmax` and `x_max` (keep_x_max): dx (N, H, W, C), dgamma, dbeta, those of
    batch_norm_backward(relu=True) of the unpooled gradient, with the same `sync` and `bias`. The
    per-channel sums read only pooled arrays; dx is the one pass over x."""
    n, h, w, c = x.shape
    x = np.ascontiguousarray(x)
    grad = np.ascontiguousarray(grad)
    mean32 = mean.astype(x.dtype)
    chunks, step = _row_chunks(n * h * w)
    sums = _bn_relu_pool_backward_sums_kernel(grad, argmax, out, x_max, mean32, h, w, chunks, step)
    a, b, d, dgamma, dbeta = _bn_backward_coefficients(sums, n * h * w, inv_std, gamma, sync)
    dx = np.empty_like(x)
    _bn_relu_pool_backward_dx_kernel(grad, argmax, out, x, _as_bias(bias, x.dtype), mean32, a.astype(x.dtype),
                                     b.astype(x.dtype), d.astype(x.dtype), dx)
    return dx, dgamma.astype(x.dtype), dbeta.astype(x.dtype)


def batch_norm_relu_pool_backward_reference(grad, argmax, x, scale, shift, mean, inv_std, gamma):
    c = x.shape[-1]
    y = np.maximum(x * scale.astype(x.dtype) + shift.astype(x.dtype), 0)
    dy = unpool_2x2(grad, argmax, x.shape)
    dx, dgamma, dbeta = batch_norm_backward_reference(dy.reshape(-1, c), x.reshape(-1, c), y.reshape(-1, c),
                                                      mean, inv_std, gamma, relu=True)
    return dx.reshape(x.shape), dgamma, dbeta


# ----------------------------------------------------------------------------- optimizer updates

@njit(parallel=True, cache=True, fastmath=False)
def _sgd_kernel(w, grad, buf, lr, momentum, nesterov, weight_decay, first):
    for i in prange(w.size):
        g = grad[i] + weight_decay * w[i]
        if momentum != 0.0:
            b = g if first else momentum * buf[i] + g
            buf[i] = b
            g = g + momentum * b if nesterov else b
        w[i] -= lr * g


def sgd_update(w, grad, buf, lr, momentum, nesterov, weight_decay, first):
    """One fused pass of PyTorch's SGD over flat arrays (buf: momentum buffer, written in place)."""
    _sgd_kernel(w.reshape(-1), grad.reshape(-1), buf.reshape(-1), lr, momentum, nesterov, weight_decay, first)


def sgd_update_reference(w, grad, buf, lr, momentum, nesterov, weight_decay, first):
    g = grad + weight_decay * w
    if momentum:
        buf[...] = g if first else momentum * buf + g
        g = g + momentum * buf if nesterov else buf.copy()
    w -= lr * g


@njit(parallel=True, cache=True, fastmath=False)
def _adamw_kernel(w, grad, m, v, lr, beta1, beta2, eps, weight_decay, bias1, bias2):
    decay = 1.0 - lr * weight_decay
    for i in prange(w.size):
        g = grad[i]
        mi = beta1 * m[i] + (1.0 - beta1) * g
        vi = beta2 * v[i] + (1.0 - beta2) * g * g
        m[i] = mi
        v[i] = vi
        w[i] = w[i] * decay - (lr / bias1) * mi / (np.sqrt(vi / bias2) + eps)


def adamw_update(w, grad, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """One fused pass of AdamW (decoupled decay, bias-corrected moments m and v, in place)."""
    _adamw_kernel(w.reshape(-1), grad.reshape(-1), m.reshape(-1), v.reshape(-1), lr, beta1, beta2, eps,
                  weight_decay, 1.0 - beta1 ** step, 1.0 - beta2 ** step)


def adamw_update_reference(w, grad, m, v, lr, beta1, beta2, eps, weight_decay, step):
    w *= 1 - lr * weight_decay
    m[...] = beta1 * m + (1 - beta1) * grad
    v[...] = beta2 * v + (1 - beta2) * grad * grad
    w -= (lr / (1 - beta1 ** step)) * m / (np.sqrt(v / (1 - beta2 ** step)) + eps)
