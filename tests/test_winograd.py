"""Winograd F(2x2, 3x3) convolution (nanoq4/winograd.py): every transform kernel against its
plain-NumPy twin, each twin against the definition of its adjoint, the convolution against the
direct tap-by-tap reference (itself checked against im2col), and a float64 central-difference
gradient check. Run with NUMBA_DISABLE_JIT=1 to execute the kernels as Python."""
import threading

import numba
import numpy as np
import pytest

from nanoq4 import ops, parallel, winograd
from nanoq4.tensor import Tensor

DTYPES = [np.float32, np.float64]

# (N, H, W, Cin, Cout): square and non-square, even and odd sizes, 1..64 channels
CONV_CASES = [
    (1, 2, 2, 1, 1),
    (3, 4, 4, 3, 16),
    (1, 5, 5, 16, 3),
    (3, 7, 7, 1, 64),
    (1, 8, 8, 64, 64),
    (3, 2, 7, 16, 1),
    (1, 5, 8, 3, 3),
    (3, 8, 5, 64, 16),
    (1, 32, 32, 3, 16),
    (3, 32, 32, 16, 3),
    (1, 7, 32, 1, 64),
    (1, 4, 5, 64, 1),
]
# (N, H, W, C) for the transforms alone
TRANSFORM_SHAPES = [(1, 1, 1, 1), (1, 2, 2, 1), (2, 4, 4, 3), (1, 5, 7, 16), (3, 7, 4, 5), (2, 8, 8, 64)]


def random(shape, dtype, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def assert_close_to_scale(actual, expected, dtype, what):
    """Compare relative to the largest magnitude of the expected array (the output's scale):
    float32 Winograd rounds differently from a direct sum, float64 must agree to ~1e-10."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, expected {expected.shape}"
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {np.dtype(dtype)}"
    scale = max(float(np.abs(expected).max()), 1e-30)
    error = float(np.abs(actual.astype(np.float64) - expected).max()) / scale
    tolerance = 1e-4 if dtype == np.float32 else 1e-10
    assert error <= tolerance, f"{what}: max error {error:.3g} of the output scale > {tolerance}"


def operands(n, h, w, cin, cout, dtype=np.float64):
    """x (N, H, W, Cin), w (Cout, 3, 3, Cin) and an output gradient (N, H, W, Cout)."""
    return (random((n, h, w, cin), dtype), random((cout, 3, 3, cin), dtype, seed=1),
            random((n, h, w, cout), dtype, seed=2))


def tiles(n, h, w):
    th, tw = winograd.tile_grid(h, w)
    return n * th * tw


# ----------------------------------------------------------------------------- transforms vs twins

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("shape", TRANSFORM_SHAPES, ids=str)
def test_input_transform_matches_reference(shape, dtype):
    x = random(shape, dtype)
    v = winograd.input_transform(x)
    assert v.shape == (16, tiles(*shape[:3]), shape[3])
    assert_close_to_scale(v, winograd.input_transform_reference(x), dtype, "V")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("shape", TRANSFORM_SHAPES, ids=str)
def test_input_transform_adjoint_matches_reference(shape, dtype):
    dv = random((16, tiles(*shape[:3]), shape[3]), dtype, seed=1)
    out = np.full(shape, np.nan, dtype=dtype)  # every element must be written
    winograd.input_transform_adjoint(dv, shape, out=out)
    assert_close_to_scale(out, winograd.input_transform_adjoint_reference(dv, shape), dtype, "dx")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("shape", TRANSFORM_SHAPES, ids=str)
def test_output_transform_matches_reference(shape, dtype):
    m = random((16, tiles(*shape[:3]), shape[3]), dtype, seed=2)
    y = winograd.output_transform(m, out=np.full(shape, np.nan, dtype=dtype))
    assert_close_to_scale(y, winograd.output_transform_reference(m, shape), dtype, "Y")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("shape", TRANSFORM_SHAPES, ids=str)
def test_output_transform_adjoint_matches_reference(shape, dtype):
    g = random(shape, dtype, seed=3)
    dm = winograd.output_transform_adjoint(g)
    assert_close_to_scale(dm, winograd.output_transform_adjoint_reference(g), dtype, "dM")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("cin,cout", [(1, 1), (3, 16), (64, 3), (16, 64)])
def test_weight_transforms_match_reference(cin, cout, dtype):
    w = random((cout, 3, 3, cin), dtype, seed=4)
    assert_close_to_scale(winograd.weight_transform(w), winograd.weight_transform_reference(w), dtype, "U")
    du = random((16, cout, cin), dtype, seed=5)
    dw = winograd.weight_transform_adjoint(du)
    assert_close_to_scale(dw, winograd.weight_transform_adjoint_reference(du), dtype, "dw")


@pytest.mark.parametrize("shape", [(1, 2, 2, 1), (2, 5, 7, 3), (1, 8, 6, 4)], ids=str)
def test_reference_twins_are_adjoint_pairs(shape):
    """<T a, b> == <a, T^T b> for each transform and its adjoint, so backward is the exact
    gradient of forward, independent of how the kernels are written."""
    t = tiles(*shape[:3])
    x, v = random(shape, np.float64, 6), random((16, t, shape[3]), np.float64, 7)
    np.testing.assert_allclose(np.vdot(winograd.input_transform_reference(x), v),
                               np.vdot(x, winograd.input_transform_adjoint_reference(v, shape)), rtol=1e-12)
    np.testing.assert_allclose(np.vdot(winograd.output_transform_reference(v, shape), x),
                               np.vdot(v, winograd.output_transform_adjoint_reference(x)), rtol=1e-12)
    w, u = random((shape[3], 3, 3, 2), np.float64, 8), random((16, shape[3], 2), np.float64, 9)
    np.testing.assert_allclose(np.vdot(winograd.weight_transform_reference(w), u),
                               np.vdot(w, winograd.weight_transform_adjoint_reference(u)), rtol=1e-12)


def test_transforms_of_one_tile_are_the_textbook_matrices():
    """A single 2x2 image: its one tile's V is B^T d B of the zero-padded 4x4 window."""
    x = np.arange(1.0, 5.0).reshape(1, 2, 2, 1)
    d = np.pad(x[0, :, :, 0], 1)
    v = winograd.input_transform(x)[:, 0, 0].reshape(4, 4)
    np.testing.assert_allclose(v, winograd.BT @ d @ winograd.BT.T)
    g = np.arange(9.0).reshape(1, 3, 3, 1)
    u = winograd.weight_transform(g)[:, 0, 0].reshape(4, 4)
    np.testing.assert_allclose(u, winograd.G @ g[0, :, :, 0] @ winograd.G.T)


# ----------------------------------------------------------------------------- convolution

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_forward_reference_matches_im2col_conv(dtype):
    x, w = random((2, 5, 6, 3), dtype), random((4, 3, 3, 3), dtype, seed=1)
    expected = ops.conv2d(Tensor(x), Tensor(w), None, stride=1, padding=1).data
    assert_close_to_scale(winograd.conv3x3_forward_reference(x, w), expected, dtype, "reference y")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_forward_matches_reference(case, dtype):
    n, h, w, cin, cout = case
    x, wt = random((n, h, w, cin), dtype), random((cout, 3, 3, cin), dtype, seed=1)
    y, saved = winograd.conv3x3_forward(x, wt)
    assert_close_to_scale(y, winograd.conv3x3_forward_reference(x, wt), dtype, "y")
    assert saved is not None
    assert winograd.conv3x3_forward(x, wt, keep_for_backward=False)[1] is None


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_backward_matches_reference(case, dtype):
    n, h, w, cin, cout = case
    x, wt, g = operands(n, h, w, cin, cout, dtype)
    _, saved = winograd.conv3x3_forward(x, wt)
    dx, dw = winograd.conv3x3_backward(g, saved, x.shape, wt)
    dx_ref, dw_ref = winograd.conv3x3_backward_reference(g, x, wt)
    assert_close_to_scale(dx, dx_ref, dtype, "dx")
    assert_close_to_scale(dw, dw_ref, dtype, "dw")


def test_backward_reference_matches_im2col_conv():
    x, w, g = operands(2, 5, 6, 3, 4)
    xt, wt = Tensor(x, requires_grad=True), Tensor(w, requires_grad=True)
    ops.conv2d(xt, wt, None, stride=1, padding=1).backward(g)
    dx, dw = winograd.conv3x3_backward_reference(g, x, w)
    np.testing.assert_allclose(dx, xt.grad, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dw, wt.grad, rtol=1e-12, atol=1e-12)


def test_gradients_match_central_differences():
    """float64, every element of x and w: d<y, v>/dθ against (f(θ + eps) - f(θ - eps)) / 2 eps."""
    x, w = random((2, 3, 5, 2), np.float64), random((3, 3, 3, 2), np.float64, 1)
    v = random((2, 3, 5, 3), np.float64, 2)
    _, saved = winograd.conv3x3_forward(x, w)
    dx, dw = winograd.conv3x3_backward(v, saved, x.shape, w)
    eps = 1e-6
    for name, param, analytic in (("x", x, dx), ("w", w, dw)):
        numeric = np.empty_like(param)
        for i in range(param.size):
            saved_value = param.flat[i]
            param.flat[i] = saved_value + eps
            plus = np.vdot(winograd.conv3x3_forward(x, w, keep_for_backward=False)[0], v)
            param.flat[i] = saved_value - eps
            minus = np.vdot(winograd.conv3x3_forward(x, w, keep_for_backward=False)[0], v)
            param.flat[i] = saved_value
            numeric.flat[i] = (plus - minus) / (2 * eps)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8, err_msg=f"d<y, v>/d{name}")


def test_backward_skips_unneeded_gradients():
    x, w, g = operands(2, 4, 4, 3, 5, np.float32)
    _, saved = winograd.conv3x3_forward(x, w)
    dx_ref, dw_ref = winograd.conv3x3_backward_reference(g, x, w)
    dx, dw = winograd.conv3x3_backward(g, saved, x.shape, w, need_w=False)
    assert dw is None
    assert_close_to_scale(dx, dx_ref, np.float32, "dx only")
    dx, dw = winograd.conv3x3_backward(g, saved, x.shape, w, need_x=False)
    assert dx is None
    assert_close_to_scale(dw, dw_ref, np.float32, "dw only")
    dx, dw = winograd.conv3x3_backward(g, None, x.shape, w, need_w=False)  # dx needs nothing saved
    assert_close_to_scale(dx, dx_ref, np.float32, "dx without saved input")


@pytest.mark.parametrize("chunk_bytes", [1, 16 * 4 * 3 * 8 * 2, 1 << 30],
                         ids=["one image", "two images", "one chunk"])
def test_result_does_not_depend_on_the_chunking(chunk_bytes):
    """Chunks of images (including a short last chunk) give the same y, dx and dw as one chunk."""
    x, w, g = operands(5, 4, 4, 2, 1)
    y, saved = winograd.conv3x3_forward(x, w, chunk_bytes=chunk_bytes)
    dx, dw = winograd.conv3x3_backward(g, saved, x.shape, w, chunk_bytes=chunk_bytes)
    dx_ref, dw_ref = winograd.conv3x3_backward_reference(g, x, w)
    assert_close_to_scale(y, winograd.conv3x3_forward_reference(x, w), np.float64, "y")
    assert_close_to_scale(dx, dx_ref, np.float64, "dx")
    assert_close_to_scale(dw, dw_ref, np.float64, "dw")


def test_threaded_and_sequential_chunks_agree(monkeypatch):
    """The chunks run on several threads when BLAS can be held to one thread per call, else one
    after another on the caller's thread: same y, dx and dw either way."""
    x, w, g = operands(6, 4, 6, 3, 2)
    small = 16 * 6 * 5 * 8  # bytes of one image's V + M: one chunk per image
    y, saved = winograd.conv3x3_forward(x, w, chunk_bytes=small)
    dx, dw = winograd.conv3x3_backward(g, saved, x.shape, w, chunk_bytes=small)
    monkeypatch.setattr(parallel, "blas_available", lambda: False)  # as if BLAS were not OpenBLAS
    assert parallel.worker_threads() == 1
    y1, saved1 = winograd.conv3x3_forward(x, w, chunk_bytes=small)
    dx1, dw1 = winograd.conv3x3_backward(g, saved1, x.shape, w, chunk_bytes=small)
    for name, a, b in (("y", y, y1), ("dx", dx, dx1), ("dw", dw, dw1)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12, err_msg=name)


def test_chunks_run_on_worker_threads_when_possible():
    if not parallel.blas_available():
        pytest.skip("NumPy's BLAS thread count cannot be changed here (not OpenBLAS on Linux)")
    if numba.config.DISABLE_JIT or numba.get_num_threads() < 2:
        pytest.skip("needs compiled kernels and at least 2 Numba threads")
    x, w = random((4, 8, 8, 8), np.float32), random((8, 3, 3, 8), np.float32, 1)
    winograd.conv3x3_forward(x, w, chunk_bytes=1)
    assert parallel.worker_threads() == numba.get_num_threads()
    assert any(t.name.startswith("winograd") for t in threading.enumerate()), "no worker thread was started"


def test_blas_is_held_to_one_thread_inside_the_workers_and_restored_after(monkeypatch):
    if not parallel.blas_available():
        pytest.skip("NumPy's BLAS thread count cannot be changed here (not OpenBLAS on Linux)")
    if numba.config.DISABLE_JIT or numba.get_num_threads() < 2:
        pytest.skip("needs compiled kernels and at least 2 Numba threads")
    seen = []
    transform = winograd.output_transform
    monkeypatch.setattr(winograd, "output_transform",
                        lambda m, out: seen.append(parallel.get_blas_threads()) or transform(m, out))
    before = parallel.get_blas_threads()
    x, w = random((4, 8, 8, 8), np.float32), random((8, 3, 3, 8), np.float32, 1)
    y, saved = winograd.conv3x3_forward(x, w, chunk_bytes=1)
    winograd.conv3x3_backward(y, saved, x.shape, w, chunk_bytes=1)
    assert seen and set(seen) == {1}
    assert parallel.get_blas_threads() == before


def test_chunks_cover_the_batch_and_feed_every_thread():
    for n, threads in ((1, 2), (5, 2), (128, 2), (7, 3)):
        chunks = winograd._chunks(n, 8, 8, 64, 4, 1 << 30, threads)
        assert [s for s, _, _ in chunks] == sorted(s for s, _, _ in chunks) and chunks[0][0] == 0
        assert all(e == s2 for (_, e, _), (s2, _, _) in zip(chunks, chunks[1:])) and chunks[-1][1] == n
        assert len(chunks) >= min(n, threads), f"{n} images, {threads} threads: {len(chunks)} chunks"
        assert all(tiles == (e - s) * 16 for s, e, tiles in chunks)


def test_float32_stays_float32():
    x, w = random((1, 4, 4, 3), np.float32), random((2, 3, 3, 3), np.float32, 1)
    y, saved = winograd.conv3x3_forward(x, w)
    dx, dw = winograd.conv3x3_backward(np.ones_like(y), saved, x.shape, w)
    assert (y.dtype, dx.dtype, dw.dtype) == (np.float32,) * 3


def test_gemm_operands_are_contiguous_matrices():
    """np.matmul copies a stacked operand whose 2-D slices BLAS cannot read in place; the
    scratch views are C-contiguous (16, T, C), V^T and U^T are their exact transposes."""
    v = winograd._buffer(np.empty(16 * 10 * 3 + 7), 10, 3)
    assert v.flags.c_contiguous and v.shape == (16, 10, 3)
    assert all(v[k].flags.c_contiguous and v[k].transpose().flags.f_contiguous for k in range(16))
    assert winograd.input_transform(random((2, 3, 4, 3), np.float32)).flags.c_contiguous


def test_invalid_arguments_are_refused():
    x, w = np.zeros((1, 4, 4, 3), np.float32), np.zeros((2, 3, 3, 3), np.float32)
    with pytest.raises(ValueError, match="channels"):
        winograd.conv3x3_forward(x, np.zeros((2, 3, 3, 4), np.float32))
    with pytest.raises(ValueError, match="3, 3"):
        winograd.conv3x3_forward(x, np.zeros((2, 5, 5, 3), np.float32))
    with pytest.raises(ValueError, match="float32 or float64"):
        winograd.conv3x3_forward(x.astype(np.int32), w.astype(np.int32))
    with pytest.raises(ValueError, match="saved"):
        winograd.conv3x3_backward(np.zeros((1, 4, 4, 2), np.float32), None, x.shape, w)
    with pytest.raises(ValueError, match="grad_y"):
        winograd.conv3x3_backward(np.zeros((1, 4, 4, 5), np.float32), x, x.shape, w)
