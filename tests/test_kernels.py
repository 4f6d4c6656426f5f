"""Every Numba kernel in nanoq4/kernels.py against its plain-NumPy twin, over a sweep of shapes,
in float32 and float64. Run with NUMBA_DISABLE_JIT=1 to execute the kernels as Python."""
import numpy as np
import pytest

from nanoq4 import kernels

DTYPES = [np.float32, np.float64]
TOL = {np.float32: dict(rtol=1e-5, atol=1e-5), np.float64: dict(rtol=1e-12, atol=1e-12)}

# (N, H, W, C, kernel, stride, padding)
WINDOW_CASES = [
    (1, 1, 1, 1, 1, 1, 0),
    (1, 5, 5, 1, 3, 1, 0),
    (2, 7, 5, 3, 3, 2, 1),
    (1, 6, 7, 2, 5, 1, 2),
    (3, 8, 8, 4, 3, 1, 1),
    (2, 9, 6, 2, 5, 2, 0),
    (1, 4, 4, 5, 1, 2, 0),
    (2, 5, 4, 3, 1, 1, 2),
    (1, 3, 3, 1, 3, 3, 2),   # windows mostly in the padding
    (2, 16, 16, 8, 3, 1, 1),
]


def random(shape, dtype, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def output_size(h, w, k, stride, pad):
    return kernels.conv_output_size(h, k, stride, pad), kernels.conv_output_size(w, k, stride, pad)


@pytest.mark.parametrize("h,k,stride,pad,expected", [(32, 3, 1, 1, 32), (7, 3, 2, 1, 4), (5, 5, 1, 0, 1),
                                                    (6, 1, 2, 0, 3), (3, 3, 3, 2, 2)])
def test_conv_output_size(h, k, stride, pad, expected):
    assert kernels.conv_output_size(h, k, stride, pad) == expected


# ----------------------------------------------------------------------------- im2col / col2im

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("case", WINDOW_CASES, ids=str)
def test_im2col_matches_reference(case, dtype):
    n, h, w, c, k, stride, pad = case
    x = random((n, h, w, c), dtype)
    cols = kernels.im2col(x, k, k, stride, pad)
    expected = kernels.im2col_reference(x, k, k, stride, pad)
    oh, ow = output_size(h, w, k, stride, pad)
    assert cols.shape == (n * oh * ow, k * k * c) == expected.shape
    assert cols.dtype == dtype
    np.testing.assert_array_equal(cols, expected)


def test_im2col_overwrites_a_dirty_output_buffer():
    x = random((2, 5, 5, 3), np.float32)
    out = np.full((2 * 5 * 5, 27), np.nan, dtype=np.float32)
    kernels.im2col(x, 3, 3, 1, 1, out=out)
    np.testing.assert_array_equal(out, kernels.im2col_reference(x, 3, 3, 1, 1))


def test_im2col_accepts_a_non_contiguous_input():
    x = random((2, 6, 6, 4), np.float64)[:, ::2, :, 1:]
    np.testing.assert_array_equal(kernels.im2col(x, 3, 3, 1, 1), kernels.im2col_reference(x, 3, 3, 1, 1))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("case", WINDOW_CASES, ids=str)
def test_col2im_matches_reference(case, dtype):
    n, h, w, c, k, stride, pad = case
    oh, ow = output_size(h, w, k, stride, pad)
    cols = random((n * oh * ow, k * k * c), dtype, seed=1)
    dx = kernels.col2im(cols, (n, h, w, c), k, k, stride, pad)
    assert dx.shape == (n, h, w, c) and dx.dtype == dtype
    np.testing.assert_allclose(dx, kernels.col2im_reference(cols, (n, h, w, c), k, k, stride, pad), **TOL[dtype])


@pytest.mark.parametrize("case", WINDOW_CASES, ids=str)
def test_col2im_is_the_adjoint_of_im2col(case):
    n, h, w, c, k, stride, pad = case
    oh, ow = output_size(h, w, k, stride, pad)
    x = random((n, h, w, c), np.float64, seed=2)
    cols = random((n * oh * ow, k * k * c), np.float64, seed=3)
    lhs = np.sum(kernels.im2col(x, k, k, stride, pad) * cols)
    rhs = np.sum(x * kernels.col2im(cols, x.shape, k, k, stride, pad))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- max pooling

# (N, H, W, C, kernel, stride)
POOL_CASES = [(1, 2, 2, 1, 2, 2), (2, 7, 5, 3, 2, 2), (2, 7, 7, 4, 3, 2), (1, 5, 6, 2, 2, 1),
              (3, 9, 9, 1, 3, 3), (2, 16, 16, 8, 2, 2), (1, 4, 4, 2, 4, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("case", POOL_CASES, ids=str)
def test_max_pool_matches_reference(case, dtype):
    n, h, w, c, k, stride = case
    x = random((n, h, w, c), dtype)
    out, argmax = kernels.max_pool(x, k, stride)
    ref_out, ref_argmax = kernels.max_pool_reference(x, k, stride)
    assert out.dtype == dtype and argmax.dtype == np.int32
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_array_equal(argmax, ref_argmax)


@pytest.mark.parametrize("case", POOL_CASES, ids=str)
def test_max_pool_ties_pick_the_first_maximum_like_the_reference(case):
    n, h, w, c, k, stride = case
    x = np.random.default_rng(4).integers(0, 3, size=(n, h, w, c)).astype(np.float32)  # many ties
    out, argmax = kernels.max_pool(x, k, stride)
    ref_out, ref_argmax = kernels.max_pool_reference(x, k, stride)
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_array_equal(argmax, ref_argmax)


@pytest.mark.parametrize("case", POOL_CASES, ids=str)
def test_max_pool_windows_of_minus_infinity_point_inside_themselves(case):
    n, h, w, c, k, stride = case
    x = np.random.default_rng(6).standard_normal((n, h, w, c)).astype(np.float32)
    x[np.random.default_rng(7).random(x.shape) < 0.7] = -np.inf  # many windows entirely -inf
    out, argmax = kernels.max_pool(x, k, stride)
    ref_out, ref_argmax = kernels.max_pool_reference(x, k, stride)
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_array_equal(argmax, ref_argmax)


def test_max_pool_argmax_indexes_the_maximum():
    x = random((2, 7, 7, 3), np.float64, seed=5)
    out, argmax = kernels.max_pool(x, 3, 2)
    flat = x.reshape(2, 49, 3)
    picked = np.take_along_axis(flat, argmax.reshape(2, -1, 3), axis=1).reshape(out.shape)
    np.testing.assert_array_equal(picked, out)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("case", POOL_CASES, ids=str)
def test_max_pool_backward_matches_reference(case, dtype):
    n, h, w, c, k, stride = case
    x = random((n, h, w, c), dtype)
    _, argmax = kernels.max_pool_reference(x, k, stride)
    grad = random(argmax.shape, dtype, seed=6)
    dx = kernels.max_pool_backward(grad, argmax, x.shape)
    assert dx.dtype == dtype
    np.testing.assert_allclose(dx, kernels.max_pool_backward_reference(grad, argmax, x.shape), **TOL[dtype])


# ----------------------------------------------------------------------------- batch norm

# (M rows, C channels); M covers fewer rows than threads*4 chunks, uneven chunks, and many rows
BN_CASES = [(1, 1), (2, 3), (3, 1), (7, 5), (17, 4), (64, 16), (1000, 3), (4099, 8)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("case", BN_CASES, ids=str)
def test_channel_mean_var_matches_reference(case, dtype):
    x = random(case, dtype) * 2.0 + 3.0
    mean, var = kernels.channel_mean_var(x)
    ref_mean, ref_var = kernels.channel_mean_var_reference(x)
    assert mean.dtype == var.dtype == np.float64
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(var, ref_var, rtol=1e-5 if dtype == np.float32 else 1e-9, atol=1e-9)


def test_channel_mean_var_of_a_constant_column_is_zero_not_negative():
    x = np.full((100, 2), 0.1, dtype=np.float32)
    _, var = kernels.channel_mean_var(x)
    assert np.all(var >= 0.0)
    np.testing.assert_allclose(var, 0.0, atol=1e-9)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("case", BN_CASES[1:], ids=str)
def test_scale_shift_matches_numpy(case, dtype, relu):
    x = random(case, dtype)
    scale, shift = random(case[1:], np.float64, 1), random(case[1:], np.float64, 2)
    out = kernels.scale_shift(x, scale, shift, relu)
    expected = x * scale.astype(dtype) + shift.astype(dtype)
    expected = np.maximum(expected, 0) if relu else expected
    assert out.dtype == dtype
    np.testing.assert_allclose(out, expected, **TOL[dtype])


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("case", BN_CASES[1:], ids=str)
def test_batch_norm_backward_matches_reference(case, dtype, relu):
    x = random(case, dtype) * 1.5 + 0.5
    dy = random(case, dtype, seed=1)
    gamma = np.random.default_rng(2).uniform(0.5, 1.5, case[1]).astype(dtype)
    beta = np.random.default_rng(3).uniform(-0.5, 0.5, case[1])
    mean, var = kernels.channel_mean_var(x)
    inv_std = 1.0 / np.sqrt(var + 1e-5)
    y = kernels.scale_shift(x, gamma * inv_std, beta - mean * gamma * inv_std, relu)
    got = kernels.batch_norm_backward(dy, x, y, mean, inv_std, gamma, relu)
    want = kernels.batch_norm_backward_reference(dy, x, y, mean, inv_std, gamma, relu)
    for name, a, b in zip(("dx", "dgamma", "dbeta"), got, want):
        assert a.dtype == dtype, f"{name} is {a.dtype}"
        scale = np.abs(b).max() + 1.0
        tol = 1e-4 if dtype == np.float32 else 1e-10
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale, err_msg=name)
    if relu and case[0] >= 7:  # the mask really was exercised
        assert (y <= 0).any() and (y > 0).any()


# ----------------------------------------------------------------------------- batch norm + ReLU + 2x2 max pool

# (N, H, W, C): even sizes as in VGG, odd ones (the last row/column is in no window), one pixel
BN_POOL_CASES = [(1, 2, 2, 1), (2, 4, 6, 3), (3, 7, 5, 4), (2, 8, 8, 16), (1, 1, 3, 2)]


def bn_pool_affine(c, dtype=np.float64, seed=1):
    """scale, shift as batch norm builds them (float64), pushing about a third of the values below 0."""
    rng = np.random.default_rng(seed)
    return rng.uniform(0.5, 1.5, c).astype(dtype), rng.uniform(-0.7, 0.3, c).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("case", BN_POOL_CASES, ids=str)
def test_batch_norm_relu_pool_matches_reference(case, dtype):
    x = random(case, dtype)
    scale, shift = bn_pool_affine(case[-1])
    out, argmax = kernels.batch_norm_relu_pool(x, scale, shift)
    ref_out, ref_argmax = kernels.batch_norm_relu_pool_reference(x, scale, shift)
    assert out.shape == (case[0], case[1] // 2, case[2] // 2, case[3]) and out.dtype == dtype
    assert argmax.dtype == np.uint8 and argmax.shape == out.shape
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_array_equal(argmax, ref_argmax)


@pytest.mark.parametrize("case", BN_POOL_CASES, ids=str)
def test_batch_norm_relu_pool_ties_pick_the_first_maximum(case):
    """Small integers tie often, and a window of negatives is all zeros after the ReLU: position 0."""
    x = np.random.default_rng(4).integers(-3, 3, size=case).astype(np.float32)
    scale, shift = np.ones(case[-1]), np.zeros(case[-1])
    out, argmax = kernels.batch_norm_relu_pool(x, scale, shift)
    ref_out, ref_argmax = kernels.batch_norm_relu_pool_reference(x, scale, shift)
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_array_equal(argmax, ref_argmax)
    negative = np.full(case, -1.0, np.float32)
    _, argmax = kernels.batch_norm_relu_pool(negative, scale, shift)
    np.testing.assert_array_equal(argmax, 0)


@pytest.mark.parametrize("case", BN_POOL_CASES, ids=str)
def test_batch_norm_relu_pool_keeps_the_input_at_each_maximum(case):
    x = random(case, np.float32)
    scale, shift = bn_pool_affine(case[-1])
    out, argmax = kernels.batch_norm_relu_pool(x, scale, shift)
    kept_out, kept_argmax, x_max = kernels.batch_norm_relu_pool(x, scale, shift, keep_x_max=True)
    np.testing.assert_array_equal(kept_out, out)
    np.testing.assert_array_equal(kept_argmax, argmax)
    n, oh, ow, c = out.shape
    ys = 2 * np.arange(oh)[None, :, None, None] + argmax // 2
    xs = 2 * np.arange(ow)[None, None, :, None] + argmax % 2
    want = x[np.arange(n)[:, None, None, None], ys, xs, np.arange(c)]
    assert x_max.dtype == x.dtype
    np.testing.assert_array_equal(x_max, want)


def test_window_position_counts_row_by_row():
    x = np.zeros((1, 2, 4, 1), np.float32)
    x[0, 0, 1, 0] = x[0, 1, 2, 0] = 1.0  # top-right of the first window, bottom-left of the second
    _, argmax = kernels.batch_norm_relu_pool(x, np.ones(1), np.zeros(1))
    assert argmax.ravel().tolist() == [1, 2]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("case", BN_POOL_CASES, ids=str)
def test_batch_norm_relu_pool_backward_matches_reference(case, dtype):
    x = random(case, dtype) * 1.5 + 0.5
    c = case[-1]
    mean, var = kernels.channel_mean_var(x.reshape(-1, c))
    inv_std = 1.0 / np.sqrt(var + 1e-5)
    gamma, beta = bn_pool_affine(c, dtype, seed=2)
    scale = gamma * inv_std
    shift = beta - mean * scale
    out, argmax, x_max = kernels.batch_norm_relu_pool(x, scale, shift, keep_x_max=True)
    grad = random(argmax.shape, dtype, seed=3)
    got = kernels.batch_norm_relu_pool_backward(grad, argmax, out, x_max, x, mean, inv_std, gamma)
    want = kernels.batch_norm_relu_pool_backward_reference(grad, argmax, x, scale, shift, mean, inv_std, gamma)
    for name, a, b in zip(("dx", "dgamma", "dbeta"), got, want):
        assert a.dtype == dtype and a.shape == b.shape, f"{name} is {a.dtype} {a.shape}"
        tol = 1e-4 if dtype == np.float32 else 1e-10
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * (np.abs(b).max() + 1.0), err_msg=name)


def test_unpool_2x2_puts_each_gradient_at_its_window_position():
    grad = np.array([1.0, 2.0], np.float32).reshape(1, 1, 2, 1)
    dy = kernels.unpool_2x2(grad, np.array([3, 1], np.uint8).reshape(1, 1, 2, 1), (1, 3, 5, 1))
    expected = np.zeros((3, 5))
    expected[1, 1], expected[0, 3] = 1.0, 2.0
    np.testing.assert_array_equal(dy[0, :, :, 0], expected)


# ----------------------------------------------------------------------------- optimizer updates

needs_optimizer_kernels = pytest.mark.skipif(not hasattr(kernels, "adamw_update"),
                                             reason="fused optimizer kernels not in kernels.py")


@needs_optimizer_kernels
@pytest.mark.parametrize("momentum,nesterov,weight_decay", [(0.0, False, 0.0), (0.9, False, 0.0),
                                                            (0.9, True, 5e-4), (0.5, False, 0.1)])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("shape", [(1,), (7,), (4, 3, 3, 5)], ids=str)
def test_sgd_update_matches_reference_over_two_steps(shape, dtype, momentum, nesterov, weight_decay):
    w, buf = random(shape, dtype), np.zeros(shape, dtype)
    w_ref, buf_ref = w.copy(), buf.copy()
    for step in range(2):
        grad = random(shape, dtype, seed=step + 1)
        kernels.sgd_update(w, grad, buf, 0.1, momentum, nesterov, weight_decay, step == 0)
        kernels.sgd_update_reference(w_ref, grad, buf_ref, 0.1, momentum, nesterov, weight_decay, step == 0)
    np.testing.assert_allclose(w, w_ref, **TOL[dtype])
    if momentum:
        np.testing.assert_allclose(buf, buf_ref, **TOL[dtype])


@needs_optimizer_kernels
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("shape", [(1,), (7,), (4, 3, 3, 5)], ids=str)
def test_adamw_update_matches_reference_over_two_steps(shape, dtype, weight_decay):
    w, m, v = random(shape, dtype), np.zeros(shape, dtype), np.zeros(shape, dtype)
    w_ref, m_ref, v_ref = w.copy(), m.copy(), v.copy()
    for step in (1, 2):
        grad = random(shape, dtype, seed=step)
        kernels.adamw_update(w, grad, m, v, 0.01, 0.9, 0.999, 1e-8, weight_decay, step)
        kernels.adamw_update_reference(w_ref, grad, m_ref, v_ref, 0.01, 0.9, 0.999, 1e-8, weight_decay, step)
    for name, a, b in (("w", w, w_ref), ("m", m, m_ref), ("v", v, v_ref)):
        np.testing.assert_allclose(a, b, **TOL[dtype], err_msg=name)
