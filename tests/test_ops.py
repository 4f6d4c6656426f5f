"""Every op in nanoq4/ops.py: backward against float64 central differences over awkward shapes,
and forward values against independent NumPy references written here (direct loops, formulas).
"""
import numpy as np
import pytest

from gradcheck import check_gradients
from nanoq4 import ops
from nanoq4.tensor import Tensor


def leaf(shape, seed=0, dtype=np.float64):
    return Tensor(np.random.default_rng(seed).standard_normal(shape).astype(dtype), requires_grad=True)


def away_from_zero(shape, seed=0, margin=0.1):
    """Values with |v| >= margin, so a central difference never straddles the ReLU kink."""
    rng = np.random.default_rng(seed)
    magnitude = margin + rng.uniform(0.0, 1.5, size=shape)
    return Tensor(np.where(rng.random(shape) < 0.5, -magnitude, magnitude), requires_grad=True)


def distinct(shape, seed=0):
    """Values 0.1 apart in random order: no ties inside a pooling window, even after +-eps."""
    size = int(np.prod(shape))
    values = np.random.default_rng(seed).permutation(size).reshape(shape) * 0.1 - 0.05 * size
    return Tensor(values.astype(np.float64), requires_grad=True)


# ----------------------------------------------------------------------------- references

def conv2d_reference(x, w, b, stride, padding):
    """Direct convolution: one dot product over (ki, kj, cin) per output position and channel."""
    n, h, wd, cin = x.shape
    cout, kh, kw, _ = w.shape
    oh = (h + 2 * padding - kh) // stride + 1
    ow = (wd + 2 * padding - kw) // stride + 1
    out = np.zeros((n, oh, ow, cout))
    for img in range(n):
        for i in range(oh):
            for j in range(ow):
                for o in range(cout):
                    acc = 0.0 if b is None else float(b[o])
                    for ki in range(kh):
                        for kj in range(kw):
                            y, xx = i * stride - padding + ki, j * stride - padding + kj
                            if 0 <= y < h and 0 <= xx < wd:
                                acc += float(np.dot(x[img, y, xx, :].astype(np.float64),
                                                    w[o, ki, kj, :].astype(np.float64)))
                    out[img, i, j, o] = acc
    return out


def max_pool_reference(x, k, stride):
    n, h, w, c = x.shape
    oh, ow = (h - k) // stride + 1, (w - k) // stride + 1
    out = np.empty((n, oh, ow, c), dtype=x.dtype)
    for i in range(oh):
        for j in range(ow):
            window = x[:, i * stride:i * stride + k, j * stride:j * stride + k, :]
            out[:, i, j, :] = window.max(axis=(1, 2))
    return out


def batch_norm_reference(x, gamma, beta, mean, var, eps, relu):
    y = gamma * (x - mean) / np.sqrt(var + eps) + beta
    return np.maximum(y, 0.0) if relu else y


# ----------------------------------------------------------------------------- elementwise, broadcasting

BROADCAST_SHAPES = [
    ((3, 4), (3, 4)),
    ((3, 1), (1, 4)),
    ((5, 3), (3,)),        # (N, C) + (C,)
    ((2, 3, 4), (3, 1)),   # leading axis added and one stretched
    ((3, 4), ()),          # 0-d tensor
]


@pytest.mark.parametrize("op", [ops.add, ops.sub, ops.mul], ids=["add", "sub", "mul"])
@pytest.mark.parametrize("shapes", BROADCAST_SHAPES, ids=str)
def test_binary_op_gradients_with_broadcasting(op, shapes):
    a, b = leaf(shapes[0], seed=1), leaf(shapes[1], seed=2)
    check_gradients(op, [a, b])


@pytest.mark.parametrize("fn", [
    lambda x: x + 2.5, lambda x: 2.5 + x, lambda x: x - 2.5, lambda x: 2.5 - x,
    lambda x: x * 2.5, lambda x: 2.5 * x, lambda x: -x,
], ids=["add", "radd", "sub", "rsub", "mul", "rmul", "neg"])
def test_python_scalar_operands(fn):
    x = leaf((3, 2))
    check_gradients(fn, [x])


def test_python_scalar_operands_values():
    x = Tensor(np.array([1.0, -2.0]))
    np.testing.assert_allclose((2.5 - x).data, [1.5, 4.5])
    np.testing.assert_allclose((-x).data, [-1.0, 2.0])
    np.testing.assert_allclose((x * 3.0 + 1.0).data, [4.0, -5.0])


def test_relu_gradient():
    check_gradients(ops.relu, [away_from_zero((4, 5))])


def test_relu_values():
    np.testing.assert_array_equal(ops.relu(Tensor(np.array([-1.0, 0.0, 2.0]))).data, [0.0, 0.0, 2.0])


# ----------------------------------------------------------------------------- reductions and shapes

@pytest.mark.parametrize("reduce", [ops.sum, ops.mean], ids=["sum", "mean"])
@pytest.mark.parametrize("axis,keepdims", [
    (None, False), (None, True), (0, False), (1, True), (-1, False), ((0, 2), False), ((0, 2), True),
])
def test_reduction_gradients(reduce, axis, keepdims):
    x = leaf((2, 3, 4))
    check_gradients(lambda x: reduce(x, axis=axis, keepdims=keepdims), [x])


@pytest.mark.parametrize("axis,keepdims", [(None, False), (1, True), ((0, 2), False), (-1, False)])
def test_reduction_values(axis, keepdims):
    x = np.random.default_rng(0).standard_normal((2, 3, 4))
    np.testing.assert_allclose(ops.sum(Tensor(x), axis, keepdims).data, x.sum(axis=axis, keepdims=keepdims))
    np.testing.assert_allclose(ops.mean(Tensor(x), axis, keepdims).data, x.mean(axis=axis, keepdims=keepdims))


@pytest.mark.parametrize("shape,new_shape", [((2, 3, 4), (6, 4)), ((2, 3, 4), (4, -1)), ((5,), (1, 5, 1))])
def test_reshape_gradient(shape, new_shape):
    check_gradients(lambda x: ops.reshape(x, new_shape), [leaf(shape)])


def test_tensor_reshape_method_accepts_ints_and_a_tuple():
    x = Tensor(np.arange(6.0))
    assert x.reshape(2, 3).shape == (2, 3)
    assert x.reshape((3, 2)).shape == (3, 2)
    assert x.reshape(-1).shape == (6,)


def test_flatten_gradient_and_nhwc_order():
    x = leaf((2, 3, 3, 2))
    check_gradients(ops.flatten, [x])
    np.testing.assert_array_equal(ops.flatten(x).data, x.data.reshape(2, 18))  # (h, w, c) order


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 1, 1, 1), (3, 4, 4, 1)])
def test_global_avg_pool(shape):
    x = leaf(shape)
    check_gradients(ops.global_avg_pool, [x])
    np.testing.assert_allclose(ops.global_avg_pool(x).data, x.data.mean(axis=(1, 2)))


# ----------------------------------------------------------------------------- dense layers

@pytest.mark.parametrize("shapes", [((3, 4), (4, 5)), ((1, 3), (3, 1)), ((6, 2), (2, 7))], ids=str)
def test_matmul_gradient(shapes):
    check_gradients(ops.matmul, [leaf(shapes[0], 1), leaf(shapes[1], 2)])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n,fin,fout", [(4, 3, 5), (1, 6, 1)])
def test_linear_gradient_and_values(bias, n, fin, fout):
    x, w = leaf((n, fin), 1), leaf((fout, fin), 2)
    inputs = [x, w] + ([leaf((fout,), 3)] if bias else [])
    check_gradients(ops.linear, inputs)
    expected = x.data @ w.data.T + (inputs[2].data if bias else 0.0)
    np.testing.assert_allclose(ops.linear(*inputs).data, expected)


def test_linear_skips_input_gradient_when_not_needed():
    x = Tensor(np.ones((2, 3)))
    w = leaf((4, 3))
    ops.linear(x, w).sum().backward()
    assert x.grad is None
    np.testing.assert_allclose(w.grad, np.full((4, 3), 2.0))


# ----------------------------------------------------------------------------- convolution

# (N, H, W, Cin, Cout, kernel, stride, padding, bias)
CONV_CASES = [
    (1, 5, 5, 1, 1, 3, 1, 0, True),    # N=1, C=1
    (2, 7, 5, 2, 3, 3, 2, 1, True),    # odd H and W, stride 2, padding 1
    (1, 6, 7, 3, 2, 5, 1, 2, False),   # kernel 5, padding 2
    (1, 9, 9, 2, 3, 5, 2, 0, True),    # kernel 5, stride 2
    (2, 6, 5, 1, 2, 3, 2, 2, False),   # padding 2 with stride 2
    (2, 5, 5, 3, 4, 1, 1, 0, True),    # 1x1: the reshape fast path
    (2, 5, 6, 2, 3, 1, 2, 0, False),   # 1x1 with stride 2 goes through im2col
    (1, 4, 5, 2, 2, 1, 1, 2, True),    # 1x1 with padding 2: a zero border
    (1, 3, 3, 2, 2, 3, 1, 1, True),    # output as large as the input
]


def conv_inputs(case, seed=0):
    n, h, w, cin, cout, k, stride, pad, bias = case
    x = leaf((n, h, w, cin), seed)
    weight = leaf((cout, k, k, cin), seed + 1)
    b = leaf((cout,), seed + 2) if bias else None
    return x, weight, b, stride, pad


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv2d_gradients(case):
    x, w, b, stride, pad = conv_inputs(case)
    inputs = [x, w] + ([b] if b is not None else [])
    check_gradients(lambda x, w, b=None: ops.conv2d(x, w, b, stride, pad), inputs,
                    names=["input", "weight", "bias"])


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv2d_forward_matches_direct_loops(case):
    x, w, b, stride, pad = conv_inputs(case)
    out = ops.conv2d(x, w, b, stride, pad).data
    expected = conv2d_reference(x.data, w.data, None if b is None else b.data, stride, pad)
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", [CONV_CASES[1], CONV_CASES[5]], ids=str)
def test_conv2d_forward_float32(case):
    x, w, b, stride, pad = conv_inputs(case)
    x32, w32, b32 = (Tensor(t.data.astype(np.float32)) for t in (x, w, b))
    out = ops.conv2d(x32, w32, b32, stride, pad).data
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, conv2d_reference(x.data, w.data, b.data, stride, pad), atol=1e-5)


@pytest.mark.parametrize("case", [CONV_CASES[1], CONV_CASES[5], (3, 5, 5, 2, 3, 3, 1, 1, True)], ids=str)
def test_conv2d_processed_in_many_chunks(monkeypatch, case):
    # A batch split into one-image chunks (if the implementation chunks at all) gives the same
    # values and gradients.
    monkeypatch.setattr(ops, "CONV_CHUNK_BYTES", 1, raising=False)
    x, w, b, stride, pad = conv_inputs(case)
    expected = conv2d_reference(x.data, w.data, b.data, stride, pad)
    np.testing.assert_allclose(ops.conv2d(x, w, b, stride, pad).data, expected, rtol=1e-12, atol=1e-12)
    check_gradients(lambda x, w, b: ops.conv2d(x, w, b, stride, pad), [x, w, b])


# VGG's first layer in small: 3 input channels, K = 27 patch values <= 32 output channels
FIRST_LAYER_CASE = (2, 6, 5, 3, 32, 3, 1, 1, True)


def test_conv2d_first_layer_keeps_its_patches_for_the_weight_gradient():
    x, w, b, stride, pad = conv_inputs(FIRST_LAYER_CASE)
    x.requires_grad = False  # the image batch
    out = ops.conv2d(x, w, b, stride, pad)
    ctx = out._ctx
    assert ctx.algorithm is ops.Im2colGemm
    assert ctx.cols is not None and ctx.cols.shape == (2 * 6 * 5, 27), "K <= Cout in one chunk: patches kept"
    out.backward(np.ones(out.shape))
    assert ctx.cols is None, "backward drops the kept patches"
    check_gradients(lambda w, b: ops.conv2d(x, w, b, stride, pad), [w, b], names=["weight", "bias"])


def test_conv2d_kept_patches_give_the_bits_of_recomputed_ones():
    x, w, b, stride, pad = conv_inputs(FIRST_LAYER_CASE)
    x32 = Tensor(x.data.astype(np.float32))
    grad = np.random.default_rng(3).standard_normal((2, 6, 5, 32)).astype(np.float32)
    dws = []
    for keep in (True, False):
        w32 = Tensor(w.data.astype(np.float32), requires_grad=True)
        out = ops.conv2d(x32, w32, None, stride, pad)
        if not keep:
            out._ctx.cols = None  # backward recomputes the patches
        out.backward(grad)
        dws.append(w32.grad)
    np.testing.assert_array_equal(dws[0], dws[1])


@pytest.mark.parametrize("case", [CONV_CASES[1], CONV_CASES[3]], ids=str)
def test_conv2d_keeps_no_patches_wider_than_the_output_or_without_a_weight_gradient(case):
    x, w, b, stride, pad = conv_inputs(case)
    assert ops.conv2d(x, w, b, stride, pad)._ctx.cols is None  # K = 18 or 50 > Cout = 3
    x, w, b, stride, pad = conv_inputs(FIRST_LAYER_CASE)
    w.requires_grad = False
    assert ops.conv2d(x, w, b, stride, pad)._ctx.cols is None  # dW not needed


def test_conv2d_weight_gradient_when_input_is_constant():
    x, w, b, stride, pad = conv_inputs(CONV_CASES[1])
    x.requires_grad = False
    check_gradients(lambda w, b: ops.conv2d(x, w, b, stride, pad), [w, b])
    assert x.grad is None


# ---- Winograd route: 3x3 / stride 1 / padding 1 with Cin >= ops.WINOGRAD_MIN_CIN

WINOGRAD_CASES = [
    (2, 6, 6, 64, 5, 3, 1, 1, True),   # the routing threshold itself, bias
    (1, 5, 7, 64, 3, 3, 1, 1, False),  # odd H and W: half-outside tiles
    (3, 4, 4, 70, 2, 3, 1, 1, True),   # Cin above the threshold, several images
]


def test_conv2d_routes_only_wide_3x3_same_convolutions():
    assert ops.WINOGRAD_MIN_CIN == 64
    assert ops.uses_winograd((8, 3, 3, 64), 1, 1)
    assert not ops.uses_winograd((8, 3, 3, 63), 1, 1)   # narrow input (VGG's first layer): im2col
    assert not ops.uses_winograd((8, 3, 3, 64), 2, 1)   # stride 2
    assert not ops.uses_winograd((8, 3, 3, 64), 1, 0)   # no padding
    assert not ops.uses_winograd((8, 5, 5, 64), 1, 2)   # 5x5


@pytest.mark.parametrize("case, algorithm", [(WINOGRAD_CASES[0], ops.Winograd3x3), (CONV_CASES[1], ops.Im2colGemm)],
                         ids=["wide 3x3", "other"])
def test_conv2d_dispatches_to_one_algorithm_whose_context_holds_its_own_state(case, algorithm):
    x, w, b, stride, pad = conv_inputs(case)
    ctx = ops.conv2d(x, w, b, stride, pad)._ctx
    assert ctx.algorithm is algorithm and ctx.has_bias == (b is not None)
    saved_x, saved_w = ctx.saved
    assert saved_x.shape == x.shape
    if algorithm is ops.Winograd3x3:  # the transformed weight U, which backward reuses
        np.testing.assert_array_equal(saved_w, ops.winograd.weight_transform(w.data))
    else:  # the (Cout, KH*KW*Cin) weight matrix of the GEMMs, and the output size
        np.testing.assert_array_equal(saved_w, w.data.reshape(w.shape[0], -1))
        assert ctx.geometry[0] == w.shape and ctx.geometry[1:3] == (stride, pad)


@pytest.mark.parametrize("case", WINOGRAD_CASES, ids=str)
def test_conv2d_winograd_route_matches_direct_loops(monkeypatch, case):
    called = []
    forward = ops.winograd.conv3x3_forward
    monkeypatch.setattr(ops.winograd, "conv3x3_forward", lambda *a, **k: called.append(1) or forward(*a, **k))
    x, w, b, stride, pad = conv_inputs(case)
    out = ops.conv2d(x, w, b, stride, pad).data
    assert called, "this case must take the Winograd route"
    expected = conv2d_reference(x.data, w.data, None if b is None else b.data, stride, pad)
    np.testing.assert_allclose(out, expected, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("case", WINOGRAD_CASES, ids=str)
def test_conv2d_winograd_route_gradients(case):
    x, w, b, stride, pad = conv_inputs(case)
    inputs = [x, w] + ([b] if b is not None else [])
    check_gradients(lambda x, w, b=None: ops.conv2d(x, w, b, stride, pad), inputs,
                    names=["input", "weight", "bias"])


def test_conv2d_winograd_route_weight_gradient_when_input_is_constant():
    x, w, b, stride, pad = conv_inputs(WINOGRAD_CASES[0])
    x.requires_grad = False
    check_gradients(lambda w, b: ops.conv2d(x, w, b, stride, pad), [w, b])
    assert x.grad is None


@pytest.mark.parametrize("case", WINOGRAD_CASES[:2], ids=str)
def test_conv2d_winograd_route_equals_im2col_route_in_float32(monkeypatch, case):
    x, w, b, stride, pad = conv_inputs(case)
    x32, w32 = (Tensor(t.data.astype(np.float32), requires_grad=True) for t in (x, w))
    grad = np.random.default_rng(5).standard_normal(x.shape[:3] + (w.shape[0],)).astype(np.float32)

    def run():
        xt, wt = (Tensor(t.data, requires_grad=True) for t in (x32, w32))
        out = ops.conv2d(xt, wt, None, stride, pad)
        (out * Tensor(grad)).sum().backward()
        return out.data, xt.grad, wt.grad

    winograd_results = run()
    monkeypatch.setattr(ops, "WINOGRAD_MIN_CIN", None)
    im2col_results = run()
    for a, e in zip(winograd_results, im2col_results):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, e, atol=2e-5 * np.abs(e).max())


def test_conv2d_rejects_channel_mismatch():
    with pytest.raises(ValueError, match="channels"):
        ops.conv2d(leaf((1, 4, 4, 3)), leaf((2, 3, 3, 2)))


# ----------------------------------------------------------------------------- pooling

# (shape NHWC, kernel, stride)
POOL_CASES = [
    ((1, 4, 4, 1), 2, 2),
    ((2, 7, 5, 3), 2, 2),   # odd sizes: the last row/column is dropped
    ((2, 7, 7, 2), 3, 2),   # overlapping windows
    ((1, 5, 6, 2), 2, 1),   # stride 1, heavy overlap
    ((1, 6, 6, 1), 3, 3),
]


@pytest.mark.parametrize("shape,k,stride", POOL_CASES, ids=str)
def test_max_pool2d_gradient(shape, k, stride):
    check_gradients(lambda x: ops.max_pool2d(x, k, stride), [distinct(shape)])


@pytest.mark.parametrize("shape,k,stride", POOL_CASES, ids=str)
def test_max_pool2d_forward_matches_loops(shape, k, stride):
    x = distinct(shape, seed=3)
    np.testing.assert_array_equal(ops.max_pool2d(x, k, stride).data, max_pool_reference(x.data, k, stride))


def test_max_pool2d_gradient_goes_only_to_the_maximum():
    x = Tensor(np.array([[1.0, 5.0], [3.0, 2.0]]).reshape(1, 2, 2, 1), requires_grad=True)
    ops.max_pool2d(x, 2).sum().backward()
    np.testing.assert_array_equal(x.grad.reshape(2, 2), [[0.0, 1.0], [0.0, 0.0]])


def test_max_pool2d_default_stride_is_the_kernel():
    assert ops.max_pool2d(distinct((1, 6, 6, 1)), 3).shape == (1, 2, 2, 1)


# ----------------------------------------------------------------------------- batch norm

def bn_inputs(shape, seed, relu, training, margin=1e-3):
    """x, gamma, beta and running stats; with relu, redraw until every pre-activation is at least
    `margin` from the kink (eps-sized perturbations then never cross it)."""
    c = shape[-1]
    for attempt in range(100):
        rng = np.random.default_rng(seed + 1000 * attempt)
        x = rng.standard_normal(shape) * 1.5 + 0.3
        gamma = rng.uniform(0.5, 1.5, c)
        beta = rng.uniform(-0.5, 0.5, c)
        running_mean = rng.uniform(-0.2, 0.2, c)
        running_var = rng.uniform(0.5, 2.0, c)
        x2 = x.reshape(-1, c)
        mean, var = (x2.mean(axis=0), x2.var(axis=0)) if training else (running_mean, running_var)
        pre = gamma * (x2 - mean) / np.sqrt(var + 1e-5) + beta
        if not relu or np.abs(pre).min() > margin:
            break
    tensors = [Tensor(a, requires_grad=True) for a in (x, gamma, beta)]
    return tensors, running_mean, running_var


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 3, 3, 2), (6, 3), (2, 1)], ids=str)
def test_batch_norm_gradients(shape, relu, training):
    (x, gamma, beta), rm, rv = bn_inputs(shape, seed=0, relu=relu, training=training)
    check_gradients(lambda x, g, b: ops.batch_norm(x, g, b, rm.copy(), rv.copy(), training=training, relu=relu),
                    [x, gamma, beta], names=["x", "gamma", "beta"])


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (6, 3)], ids=str)
def test_batch_norm_training_forward_and_running_stats(shape, relu):
    (x, gamma, beta), rm0, rv0 = bn_inputs(shape, seed=1, relu=False, training=True)
    rm, rv = rm0.copy(), rv0.copy()
    out = ops.batch_norm(x, gamma, beta, rm, rv, training=True, momentum=0.1, eps=1e-5, relu=relu)
    x2 = x.data.reshape(-1, shape[-1])
    m = x2.shape[0]
    mean = x2.sum(axis=0) / m
    var = ((x2 - mean) ** 2).sum(axis=0) / m              # biased, used to normalize
    expected = batch_norm_reference(x2, gamma.data, beta.data, mean, var, 1e-5, relu)
    np.testing.assert_allclose(out.data.reshape(-1, shape[-1]), expected, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(rm, 0.9 * rm0 + 0.1 * mean, rtol=1e-9)
    unbiased = ((x2 - mean) ** 2).sum(axis=0) / (m - 1)   # unbiased, stored in running_var
    np.testing.assert_allclose(rv, 0.9 * rv0 + 0.1 * unbiased, rtol=1e-9)


@pytest.mark.parametrize("relu", [False, True])
def test_batch_norm_eval_uses_running_stats_and_leaves_them(relu):
    (x, gamma, beta), rm, rv = bn_inputs((3, 2, 2, 4), seed=2, relu=False, training=False)
    rm_before, rv_before = rm.copy(), rv.copy()
    out = ops.batch_norm(x, gamma, beta, rm, rv, training=False, relu=relu)
    expected = batch_norm_reference(x.data, gamma.data, beta.data, rm, rv, 1e-5, relu)
    np.testing.assert_allclose(out.data, expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(rm, rm_before)
    np.testing.assert_array_equal(rv, rv_before)


def test_batch_norm_float32_running_stats_update_in_place():
    x = Tensor(np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32) + 2.0)
    gamma, beta = Tensor(np.ones(3, np.float32)), Tensor(np.zeros(3, np.float32))
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    out = ops.batch_norm(x, gamma, beta, rm, rv, training=True)
    assert out.dtype == np.float32 and rm.dtype == np.float32 and rv.dtype == np.float32
    np.testing.assert_allclose(rm, 0.1 * x.data.mean(axis=0), rtol=1e-5)


def test_batch_norm_training_needs_two_values_per_channel():
    with pytest.raises(ValueError, match="more than one value"):
        ops.batch_norm(leaf((1, 3)), leaf((3,)), leaf((3,)), np.zeros(3), np.ones(3), training=True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(2, 4, 4, 3), (1, 5, 3, 2)], ids=str)  # odd: a row, a column in no window
def test_batch_norm_relu_pool_gradients(shape, training):
    (x, gamma, beta), rm, rv = bn_inputs(shape, seed=3, relu=True, training=training)
    check_gradients(lambda x, g, b: ops.batch_norm_relu_pool(x, g, b, rm.copy(), rv.copy(), training=training),
                    [x, gamma, beta], names=["x", "gamma", "beta"])


@pytest.mark.parametrize("pooled, training", [(False, True), (False, False), (True, True)],
                         ids=["bn-train", "bn-eval", "bn-relu-pool-train"])
def test_batch_norm_input_bias_gradients(pooled, training):
    """The preceding convolution's bias, added inside the op (nn.Sequential), gets its gradient too."""
    (x, gamma, beta), rm, rv = bn_inputs((2, 4, 4, 3), seed=5, relu=pooled, training=training)
    bias = Tensor(np.random.default_rng(9).uniform(-0.5, 0.5, 3), requires_grad=True)
    op = ops.batch_norm_relu_pool if pooled else ops.batch_norm
    check_gradients(lambda x, g, b, c: op(x, g, b, rm.copy(), rv.copy(), training=training, input_bias=c),
                    [x, gamma, beta, bias], names=["x", "gamma", "beta", "input_bias"])


def test_batch_norm_relu_pool_forward_matches_formula_and_loops():
    (x, gamma, beta), rm, rv = bn_inputs((2, 4, 6, 3), seed=4, relu=False, training=True)
    out = ops.batch_norm_relu_pool(x, gamma, beta, rm, rv, training=True)
    x2 = x.data.reshape(-1, 3)
    y = batch_norm_reference(x.data, gamma.data, beta.data, x2.mean(axis=0), x2.var(axis=0), 1e-5, relu=True)
    np.testing.assert_allclose(out.data, max_pool_reference(y, 2, 2), rtol=1e-9, atol=1e-12)


def test_batch_norm_relu_pool_wants_nhwc():
    with pytest.raises(ValueError, match="NHWC"):
        ops.batch_norm_relu_pool(leaf((6, 3)), leaf((3,)), leaf((3,)), np.zeros(3), np.ones(3))


# ----------------------------------------------------------------------------- dropout

def test_dropout_gradient_equals_the_mask():
    p = 0.3
    x = away_from_zero((20, 30), seed=4)  # nonzero, so out / x recovers the mask
    fn = lambda x: ops.dropout(x, p=p, training=True, rng=np.random.default_rng(7))  # noqa: E731
    check_gradients(fn, [x])
    out = fn(x)
    mask = out.data / x.data
    x.grad = None
    out.sum().backward()
    np.testing.assert_allclose(x.grad, mask, rtol=1e-12)
    survivors = mask != 0
    np.testing.assert_allclose(mask[survivors], 1 / (1 - p), rtol=1e-12)
    assert abs((~survivors).mean() - p) < 0.06, "dropped fraction far from p"


def test_dropout_is_identity_in_eval_and_with_p_zero():
    x = leaf((4, 5))
    for y in (ops.dropout(x, p=0.5, training=False), ops.dropout(x, p=0.0, training=True)):
        np.testing.assert_array_equal(y.data, x.data)
    check_gradients(lambda x: ops.dropout(x, p=0.5, training=False), [x])


# ----------------------------------------------------------------------------- losses

@pytest.mark.parametrize("shape", [(4, 5), (1, 3), (2, 3, 4)], ids=str)
def test_log_softmax_gradient_and_values(shape):
    x = leaf(shape)
    check_gradients(ops.log_softmax, [x])
    out = ops.log_softmax(x).data
    expected = x.data - np.log(np.exp(x.data).sum(axis=-1, keepdims=True))
    np.testing.assert_allclose(out, expected, rtol=1e-12)


def test_log_softmax_is_stable_for_large_logits():
    out = ops.log_softmax(Tensor(np.array([[1000.0, 0.0]]))).data
    np.testing.assert_allclose(out, [[0.0, -1000.0]])


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_cross_entropy_gradient_and_values(smoothing):
    logits = leaf((5, 4))
    labels = np.array([0, 3, 1, 1, 2])
    check_gradients(lambda z: ops.cross_entropy(z, labels, label_smoothing=smoothing), [logits])
    z = logits.data
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    target = np.full((5, 4), smoothing / 4)
    target[np.arange(5), labels] += 1 - smoothing
    expected = -(target * logp).sum(axis=1).mean()
    np.testing.assert_allclose(ops.cross_entropy(logits, labels, smoothing).item(), expected, rtol=1e-12)


def test_cross_entropy_rejects_wrong_label_shape():
    with pytest.raises(ValueError, match="labels shape"):
        ops.cross_entropy(leaf((5, 4)), np.zeros((5, 1), dtype=int))


# ----------------------------------------------------------------------------- float32 stays float32

FLOAT32_CASES = {
    "add": lambda x: ops.add(x, x * 2.0),
    "relu": ops.relu,
    "mean": lambda x: ops.mean(x, axis=(1, 2)),
    "flatten": ops.flatten,
    "conv": lambda x: ops.conv2d(x, Tensor(np.ones((2, 3, 3, 3), np.float32)), None, 2, 1),
    "conv1x1": lambda x: ops.conv2d(x, Tensor(np.ones((2, 1, 1, 3), np.float32))),
    "max_pool": lambda x: ops.max_pool2d(x, 2),
    "gap": ops.global_avg_pool,
    "bn_train": lambda x: ops.batch_norm(x, Tensor(np.ones(3, np.float32)), Tensor(np.zeros(3, np.float32)),
                                         np.zeros(3, np.float32), np.ones(3, np.float32), relu=True),
    "bn_eval": lambda x: ops.batch_norm(x, Tensor(np.ones(3, np.float32)), Tensor(np.zeros(3, np.float32)),
                                        np.zeros(3, np.float32), np.ones(3, np.float32), training=False),
    "bn_relu_pool": lambda x: ops.batch_norm_relu_pool(x, Tensor(np.ones(3, np.float32)),
                                                       Tensor(np.zeros(3, np.float32)), np.zeros(3, np.float32),
                                                       np.ones(3, np.float32)),
    "dropout": lambda x: ops.dropout(x, 0.5, rng=np.random.default_rng(0)),
    "log_softmax": ops.log_softmax,
    "linear": lambda x: ops.linear(ops.flatten(x), Tensor(np.ones((2, 48), np.float32)),
                                   Tensor(np.ones(2, np.float32))),
    "cross_entropy": lambda x: ops.cross_entropy(ops.flatten(x), np.array([0, 47])),
}


@pytest.mark.parametrize("name", list(FLOAT32_CASES))
def test_float32_in_float32_out_and_gradients(name):
    x = leaf((2, 4, 4, 3), dtype=np.float32)
    out = FLOAT32_CASES[name](x)
    assert out.dtype == np.float32, f"{name} forward returned {out.dtype}"
    out.backward(np.ones(out.shape, np.float32))
    assert x.grad.dtype == np.float32, f"{name} backward returned {x.grad.dtype}"
    assert x.grad.shape == x.shape
