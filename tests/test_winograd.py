"""Winograd F(4x4, 3x3) convolution (nanoq4/winograd.py): every transform kernel against its
plain-NumPy twin, each twin against the definition of its adjoint, the matrices against the
one-tile textbook identity, the convolution against the direct tap-by-tap reference (itself
checked against im2col), its float32 error against float64 at VGG4bit's shapes, and a float64
central-difference gradient check. Run with NUMBA_DISABLE_JIT=1 to execute the kernels as Python."""
import itertools
import threading
import time

import numba
import numpy as np
import pytest

from nanoq4 import ops, parallel, winograd
from nanoq4.tensor import Tensor

DTYPES = [np.float32, np.float64]

# (N, H, W, Cin, Cout): square and non-square, sizes divisible by the 4x4 tile and not (the last
# tile cropped by 1, 2 or 3 rows or columns), one tile to a grid of tiles, 1..64 channels
CONV_CASES = [
    (1, 2, 2, 1, 1),
    (3, 4, 4, 3, 16),
    (1, 5, 5, 16, 3),
    (3, 7, 7, 1, 64),
    (1, 8, 8, 64, 64),
    (3, 2, 7, 16, 1),
    (1, 5, 8, 3, 3),
    (3, 8, 5, 64, 16),
    (2, 12, 9, 4, 5),
    (1, 32, 32, 3, 16),
    (3, 32, 32, 16, 3),
    (1, 7, 32, 1, 64),
    (1, 4, 5, 64, 1),
]
# (N, H, W, C) for the transforms alone: the 12x11 and 13x10 grids have tiles with neighbours on
# every side
TRANSFORM_SHAPES = [(1, 1, 1, 1), (1, 2, 2, 1), (2, 4, 4, 3), (1, 5, 7, 16), (3, 7, 4, 5), (2, 8, 8, 64),
                    (2, 12, 11, 3), (1, 13, 10, 2)]


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


P = winograd.POSITIONS  # 36 transform positions per 6x6 tile


# ----------------------------------------------------------------------------- transforms vs twins

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("shape", TRANSFORM_SHAPES, ids=str)
def test_input_transform_matches_reference(shape, dtype):
    x = random(shape, dtype)
    v = winograd.input_transform(x)
    assert v.shape == (P, tiles(*shape[:3]), shape[3])
    assert_close_to_scale(v, winograd.input_transform_reference(x), dtype, "V")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("shape", TRANSFORM_SHAPES, ids=str)
def test_input_transform_adjoint_matches_reference(shape, dtype):
    dv = random((P, tiles(*shape[:3]), shape[3]), dtype, seed=1)
    out = np.full(shape, np.nan, dtype=dtype)  # every element must be written
    winograd.input_transform_adjoint(dv, shape, out=out)
    assert_close_to_scale(out, winograd.input_transform_adjoint_reference(dv, shape), dtype, "dx")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("shape", TRANSFORM_SHAPES, ids=str)
def test_output_transform_matches_reference(shape, dtype):
    m = random((P, tiles(*shape[:3]), shape[3]), dtype, seed=2)
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
    du = random((P, cout, cin), dtype, seed=5)
    dw = winograd.weight_transform_adjoint(du)
    assert_close_to_scale(dw, winograd.weight_transform_adjoint_reference(du), dtype, "dw")


def stored(rows, channels, dtype, seed):
    """A random (36, rows, C) view of (rows, 36, C) storage, as the transforms write."""
    return random((rows, P, channels), dtype, seed).transpose(1, 0, 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("t,cin,cout", [(1, 1, 1), (7, 3, 5), (130, 16, 9), (20, 64, 33)], ids=str)
def test_backward_gemms_match_reference(t, cin, cout, dtype):
    """The BLAS kernel adds dM^T @ V into a dU that already holds a sum (beta = 1, not 0) and
    writes dM @ U over V only after dU has read it; T, Cin and Cout differ, so a swapped leading
    dimension or offset shows."""
    if parallel.blas_gemm(dtype) is None:
        pytest.skip("no CBLAS GEMM of NumPy's OpenBLAS here: backward_gemms is its reference")
    dm, u, v = stored(t, cout, dtype, 10), stored(cout, cin, dtype, 11), stored(t, cin, dtype, 12)
    du = stored(cout, cin, dtype, 13)
    du_ref, dv_ref = winograd.backward_gemms_reference(dm, u, v.copy(), du.copy())
    du_out, dv_out = winograd.backward_gemms(dm, u, v, du)
    assert du_out is du and dv_out is v, "results land in the arrays passed in"
    assert_close_to_scale(du, du_ref, dtype, "dU")
    assert_close_to_scale(v, dv_ref, dtype, "dV")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_backward_gemms_do_only_what_is_asked(dtype):
    dm, u = stored(9, 4, dtype, 10), stored(4, 3, dtype, 11)
    v, du = stored(9, 3, dtype, 12), stored(4, 3, dtype, 13)
    v_before, du_before = v.copy(), du.copy()
    winograd.backward_gemms(dm, u, v, du, dv=False)
    np.testing.assert_array_equal(v, v_before, err_msg="dv=False: V must stay as it was")
    assert_close_to_scale(du, du_before + np.matmul(dm.transpose(0, 2, 1), v_before), dtype, "dU only")
    du_before = du.copy()
    winograd.backward_gemms(dm, u, v, None)
    assert_close_to_scale(v, np.matmul(dm, u), dtype, "dV only")
    np.testing.assert_array_equal(du, du_before)


def test_backward_gemms_refuse_mismatched_shapes():
    """The BLAS kernel reads and writes through raw addresses: a wrong shape must stop before it."""
    dm, u = stored(9, 4, np.float32, 10), stored(4, 3, np.float32, 11)
    v, du = stored(9, 3, np.float32, 12), stored(4, 3, np.float32, 13)
    with pytest.raises(ValueError, match="shapes"):
        winograd.backward_gemms(dm, u, stored(8, 3, np.float32, 12), du)
    with pytest.raises(ValueError, match="shapes"):
        winograd.backward_gemms(dm, stored(3, 4, np.float32, 11), v, du)
    with pytest.raises(ValueError, match="shapes"):
        winograd.backward_gemms(dm, u, v, stored(3, 4, np.float32, 13))


def test_backward_without_blas_gemm_uses_numpy_and_agrees(monkeypatch):
    """Where parallel.blas_gemm finds no CBLAS GEMM, backward runs its GEMMs in np.matmul."""
    x, w, g = operands(3, 8, 7, 5, 6, np.float32)
    _, saved = winograd.conv3x3_forward(x, w)
    dx, dw = winograd.conv3x3_backward(g, saved)
    monkeypatch.setattr(parallel, "blas_gemm", lambda dtype: None)
    called = []
    reference = winograd.backward_gemms_reference
    monkeypatch.setattr(winograd, "backward_gemms_reference", lambda *a, **k: called.append(1) or reference(*a, **k))
    dx1, dw1 = winograd.conv3x3_backward(g, saved)
    assert called, "the NumPy twin must run when there is no BLAS GEMM"
    np.testing.assert_allclose(dx1, dx, rtol=1e-5, atol=1e-5 * float(np.abs(dx).max()))
    np.testing.assert_allclose(dw1, dw, rtol=1e-5, atol=1e-5 * float(np.abs(dw).max()))


@pytest.mark.parametrize("shape", [(1, 2, 2, 1), (2, 5, 7, 3), (1, 8, 6, 4), (1, 13, 9, 2)], ids=str)
def test_reference_twins_are_adjoint_pairs(shape):
    """<T a, b> == <a, T^T b> for each transform and its adjoint, so backward is the exact
    gradient of forward, independent of how the kernels are written."""
    t = tiles(*shape[:3])
    x, v = random(shape, np.float64, 6), random((P, t, shape[3]), np.float64, 7)
    np.testing.assert_allclose(np.vdot(winograd.input_transform_reference(x), v),
                               np.vdot(x, winograd.input_transform_adjoint_reference(v, shape)), rtol=1e-12)
    np.testing.assert_allclose(np.vdot(winograd.output_transform_reference(v, shape), x),
                               np.vdot(v, winograd.output_transform_adjoint_reference(x)), rtol=1e-12)
    w, u = random((shape[3], 3, 3, 2), np.float64, 8), random((P, shape[3], 2), np.float64, 9)
    np.testing.assert_allclose(np.vdot(winograd.weight_transform_reference(w), u),
                               np.vdot(w, winograd.weight_transform_adjoint_reference(u)), rtol=1e-12)


def test_matrices_compute_a_4x4_block_of_the_convolution():
    """The definition the kernels rest on: for any 6x6 window d and 3x3 kernel g,
    A^T [(G g G^T) * (B^T d B)] A is the 4x4 'valid' correlation of d with g."""
    rng = np.random.default_rng(10)
    d, g = rng.standard_normal((6, 6)), rng.standard_normal((3, 3))
    y = winograd.AT @ ((winograd.G @ g @ winograd.G.T) * (winograd.BT @ d @ winograd.BT.T)) @ winograd.AT.T
    direct = np.array([[np.sum(d[i:i + 3, j:j + 3] * g) for j in range(4)] for i in range(4)])
    np.testing.assert_allclose(y, direct, rtol=1e-12, atol=1e-12)


def test_transforms_of_one_tile_are_the_textbook_matrices():
    """A single 4x4 image: its one tile's V is B^T d B of the zero-padded 6x6 window."""
    x = np.arange(1.0, 17.0).reshape(1, 4, 4, 1)
    d = np.pad(x[0, :, :, 0], 1)
    v = winograd.input_transform(x)[:, 0, 0].reshape(6, 6)
    np.testing.assert_allclose(v, winograd.BT @ d @ winograd.BT.T)
    g = np.arange(9.0).reshape(1, 3, 3, 1)
    u = winograd.weight_transform(g)[:, 0, 0].reshape(6, 6)
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
    saved_x, saved_u = saved  # the input and the transformed weights, for backward
    np.testing.assert_array_equal(saved_x, x)
    np.testing.assert_array_equal(saved_u, winograd.weight_transform(wt))
    assert winograd.conv3x3_forward(x, wt, keep_for_backward=False)[1] is None


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_backward_matches_reference(case, dtype):
    n, h, w, cin, cout = case
    x, wt, g = operands(n, h, w, cin, cout, dtype)
    _, saved = winograd.conv3x3_forward(x, wt)
    dx, dw = winograd.conv3x3_backward(g, saved)
    dx_ref, dw_ref = winograd.conv3x3_backward_reference(g, x, wt)
    assert_close_to_scale(dx, dx_ref, dtype, "dx")
    assert_close_to_scale(dw, dw_ref, dtype, "dw")


# (N, size, Cin, Cout): VGG4bit's widest layers at 32x32 and 8x8
VGG_SHAPES = [(2, 32, 64, 64), (8, 8, 256, 256)]
# float32 error bounds there: the largest |error| relative to the largest |value|, and the
# error's norm relative to the value's norm
MAX_ERROR_F32, RMS_ERROR_F32 = 5e-5, 1e-5


@pytest.mark.parametrize("case", VGG_SHAPES, ids=str)
def test_float32_error_against_float64_is_small_at_vgg_shapes(case):
    """The float32 price of F(4x4)'s larger coefficients, bounded: 4-bit weights (a scale times
    integers -7..7) and ReLU'd activations, as in training, against the float64 direct
    convolution of the same float32 operands. The bounds are a few times what F(4x4) gives and
    far below what any wrong coefficient gives (errors of the order of the output itself)."""
    n, size, cin, cout = case
    rng = np.random.default_rng(11)
    x = np.maximum(rng.standard_normal((n, size, size, cin)), 0).astype(np.float32)
    w = (rng.integers(-7, 8, size=(cout, 3, 3, cin)) / (7 * np.sqrt(9 * cin))).astype(np.float32)
    g = rng.standard_normal((n, size, size, cout)).astype(np.float32)
    y, saved = winograd.conv3x3_forward(x, w)
    dx, dw = winograd.conv3x3_backward(g, saved)
    x64, w64, g64 = (a.astype(np.float64) for a in (x, w, g))
    dx_ref, dw_ref = winograd.conv3x3_backward_reference(g64, x64, w64)
    for name, actual, expected in (("y", y, winograd.conv3x3_forward_reference(x64, w64)),
                                   ("dx", dx, dx_ref), ("dw", dw, dw_ref)):
        difference = actual.astype(np.float64) - expected
        largest = float(np.abs(difference).max() / np.abs(expected).max())
        rms = float(np.linalg.norm(difference) / np.linalg.norm(expected))
        assert largest <= MAX_ERROR_F32 and rms <= RMS_ERROR_F32, (
            f"{name}: largest error {largest:.2g} of the output scale (bound {MAX_ERROR_F32}), "
            f"rms {rms:.2g} (bound {RMS_ERROR_F32})")


def test_backward_reference_matches_im2col_conv():
    x, w, g = operands(2, 5, 6, 3, 4)
    xt, wt = Tensor(x, requires_grad=True), Tensor(w, requires_grad=True)
    ops.conv2d(xt, wt, None, stride=1, padding=1).backward(g)
    dx, dw = winograd.conv3x3_backward_reference(g, x, w)
    np.testing.assert_allclose(dx, xt.grad, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dw, wt.grad, rtol=1e-12, atol=1e-12)


def test_gradients_match_central_differences():
    """float64, every element of x and w: d<y, v>/dθ against (f(θ + eps) - f(θ - eps)) / 2 eps.
    6x5 images: a 2x2 grid of tiles, the last row and column of tiles cropped."""
    x, w = random((2, 6, 5, 2), np.float64), random((3, 3, 3, 2), np.float64, 1)
    v = random((2, 6, 5, 3), np.float64, 2)
    _, saved = winograd.conv3x3_forward(x, w)
    dx, dw = winograd.conv3x3_backward(v, saved)
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
    dx, dw = winograd.conv3x3_backward(g, saved, need_w=False)
    assert dw is None
    assert_close_to_scale(dx, dx_ref, np.float32, "dx only")
    dx, dw = winograd.conv3x3_backward(g, saved, need_x=False)
    assert dx is None
    assert_close_to_scale(dw, dw_ref, np.float32, "dw only")
    assert winograd.conv3x3_backward(g, saved, need_x=False, need_w=False) == (None, None)


def test_backward_reuses_the_transformed_weights_of_forward(monkeypatch):
    """dx = ... dM @ U with forward's U: backward never transforms w again."""
    x, w, g = operands(2, 5, 6, 3, 4)
    _, saved = winograd.conv3x3_forward(x, w)

    def no_weight_transform(w):
        raise AssertionError("backward must reuse U from forward")
    monkeypatch.setattr(winograd, "weight_transform", no_weight_transform)
    dx, dw = winograd.conv3x3_backward(g, saved)
    dx_ref, dw_ref = winograd.conv3x3_backward_reference(g, x, w)
    assert_close_to_scale(dx, dx_ref, np.float64, "dx")
    assert_close_to_scale(dw, dw_ref, np.float64, "dw")


def test_backward_chunks_hold_twice_the_partial_du(monkeypatch):
    """Every chunk's partial dU (36, Cout, Cin) is added into its group's sum, so when dw is
    needed backward's chunks hold at least twice those bytes (the sums stay a small share of the
    memory traffic); for dx alone the chunks stay as small as asked."""
    monkeypatch.setattr(winograd, "MIN_CHUNK_TILES", 1)
    seen = []
    run = parallel.run_on_threads
    monkeypatch.setattr(parallel, "run_on_threads",
                        lambda chunks, threads, worker, name="worker": seen.append(chunks) or
                        run(chunks, threads, worker, name))
    n, cin, cout = 64, 16, 16
    x, w, g = operands(n, 4, 4, cin, cout)  # one tile per image
    _, saved = winograd.conv3x3_forward(x, w, chunk_bytes=1)
    image_bytes, partial_bytes = P * (cin + cout) * 8, P * cout * cin * 8
    seen.clear()
    _, dw = winograd.conv3x3_backward(g, saved, chunk_bytes=1)
    chunks = [chunk for _, group in seen[0] for chunk in group]  # the workers take (index, group)
    assert len(chunks) > 1 and all((e - s) * image_bytes >= 2 * partial_bytes for s, e, _ in chunks[:-1])
    assert_close_to_scale(dw, winograd.conv3x3_backward_reference(g, x, w)[1], np.float64, "dw")
    seen.clear()
    winograd.conv3x3_backward(g, saved, need_w=False, chunk_bytes=1)
    assert [[e - s for s, e, _ in group] for _, group in seen[0]] == [[1]] * n, "dx alone: a group per chunk"


@pytest.mark.parametrize("chunk_bytes", [1, P * 1 * 3 * 8 * 2, 1 << 30],
                         ids=["one image", "two images", "one chunk"])
def test_result_does_not_depend_on_the_chunking(monkeypatch, chunk_bytes):
    """Chunks of images (including a short last chunk) give the same y, dx and dw as one chunk."""
    monkeypatch.setattr(winograd, "MIN_CHUNK_TILES", 1)  # chunks of 1 tile per 4x4 image allowed
    x, w, g = operands(5, 4, 4, 2, 1)
    y, saved = winograd.conv3x3_forward(x, w, chunk_bytes=chunk_bytes)
    dx, dw = winograd.conv3x3_backward(g, saved, chunk_bytes=chunk_bytes)
    dx_ref, dw_ref = winograd.conv3x3_backward_reference(g, x, w)
    assert_close_to_scale(y, winograd.conv3x3_forward_reference(x, w), np.float64, "y")
    assert_close_to_scale(dx, dx_ref, np.float64, "dx")
    assert_close_to_scale(dw, dw_ref, np.float64, "dw")


def test_threaded_and_sequential_chunks_agree(monkeypatch):
    """The chunks run on several threads when BLAS can be held to one thread per call, else one
    after another on the caller's thread: same y, dx and dw either way."""
    monkeypatch.setattr(winograd, "MIN_CHUNK_TILES", 1)
    x, w, g = operands(6, 4, 6, 3, 2)
    small = P * 2 * 5 * 8  # bytes of one image's V + M (2 tiles, 3 + 2 channels): one chunk per image
    y, saved = winograd.conv3x3_forward(x, w, chunk_bytes=small)
    dx, dw = winograd.conv3x3_backward(g, saved, chunk_bytes=small)
    monkeypatch.setattr(parallel, "blas_available", lambda: False)  # as if BLAS were not OpenBLAS
    assert parallel.worker_threads() == 1
    y1, saved1 = winograd.conv3x3_forward(x, w, chunk_bytes=small)
    dx1, dw1 = winograd.conv3x3_backward(g, saved1, chunk_bytes=small)
    for name, a, b in (("y", y, y1), ("dx", dx, dx1), ("dw", dw, dw1)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12, err_msg=name)


def dealing(assignment):
    """A stand-in for parallel.run_on_threads that gives the workers the items (chunks, or groups
    of them) as `assignment(items, threads)` says, one list per worker, and runs the workers one
    after another on the caller: an assignment first come first served can produce when the
    threads run at other speeds."""
    def run_on_threads(items, threads, worker, name="worker"):
        return [worker(iter(mine)) for mine in assignment(list(items), min(threads, len(items)))]
    return run_on_threads


ASSIGNMENTS = {  # each worker takes its items in order, as first come first served hands them out
    "in turn": lambda items, threads: [items[i::threads] for i in range(threads)],
    "in blocks": lambda items, threads: [items[len(items) * i // threads:len(items) * (i + 1) // threads]
                                         for i in range(threads)],
    "one late worker": lambda items, threads: [items[:-1], items[-1:]] + [[]] * (threads - 2),
    "one worker alone": lambda items, threads: [items] + [[]] * (threads - 1),
}


@pytest.mark.parametrize("threads", [2, 3])
def test_gradients_do_not_depend_on_which_thread_takes_which_chunk(monkeypatch, threads):
    """The threads take chunks first come first served, so which thread gets which chunk is up to
    timing; y, dx and dw must come out bit for bit the same under every assignment, or two runs
    with one seed differ and --resume does not continue a run exactly."""
    monkeypatch.setattr(winograd, "MIN_CHUNK_TILES", 1)
    monkeypatch.setattr(parallel, "worker_threads", lambda: threads)
    n, h, cin, cout = 24, 8, 8, 8
    x, w, g = operands(n, h, h, cin, cout, np.float32)
    du_bytes = P * cin * cout * 4  # backward's chunks hold twice this: 2 images of 4 tiles here
    chunks = winograd._chunks(n, h, h, cin + cout, 4, 2 * du_bytes, threads)
    assert len(chunks) >= 4 * threads, f"{len(chunks)} chunks: too few to deal in different ways"
    results = {}
    for name, assignment in ASSIGNMENTS.items():
        monkeypatch.setattr(parallel, "run_on_threads", dealing(assignment))
        y, saved = winograd.conv3x3_forward(x, w, chunk_bytes=1)
        dx, dw = winograd.conv3x3_backward(g, saved, chunk_bytes=1)
        results[name] = {"y": y, "dx": dx, "dw": dw}
    first, *others = ASSIGNMENTS
    for name in others:
        for what, expected in results[first].items():
            actual = results[name][what]
            differ = int(np.count_nonzero(actual != expected))
            assert differ == 0, (f"{what}: {differ} of {actual.size} values differ between the chunk "
                                 f"assignments '{first}' and '{name}' ({threads} threads)")


def with_a_held_thread(run, before_item):
    """parallel.run_on_threads, where the first worker to start sleeps before taking its item
    number `before_item` (0: its first), as when the OS deschedules it: the others take more."""
    def run_on_threads(items, threads, worker, name="worker"):
        started = []

        def maybe_held(my_items):
            if started:  # another worker was first; two sleeping at once would not matter
                return worker(my_items)
            started.append(threading.current_thread().name)

            def taken():
                for count in itertools.count():
                    if count == before_item:
                        time.sleep(0.3)
                    item = next(my_items, None)
                    if item is None:
                        return
                    yield item
            return worker(taken())
        return run(items, threads, maybe_held, name)
    return run_on_threads


def test_gradients_are_the_same_when_a_thread_is_held_back(monkeypatch):
    """On real worker threads: whether a thread is held back before its first or its second chunk
    (so that it sums one chunk or none while another sums the rest), dw keeps its bits."""
    monkeypatch.setattr(winograd, "MIN_CHUNK_TILES", 1)
    x, w, g = operands(24, 8, 8, 8, 8, np.float32)
    _, saved = winograd.conv3x3_forward(x, w, chunk_bytes=1)
    if numba.config.DISABLE_JIT or parallel.worker_threads() < 2:
        pytest.skip("needs compiled kernels on several worker threads (OpenBLAS, omp or tbb)")
    run = parallel.run_on_threads
    dws = []
    for before_item in (0, 1):
        monkeypatch.setattr(parallel, "run_on_threads", with_a_held_thread(run, before_item))
        dws.append(winograd.conv3x3_backward(g, saved, chunk_bytes=1)[1])
    differ = int(np.count_nonzero(dws[0] != dws[1]))
    assert differ == 0, (f"dw: {differ} of {dws[0].size} values differ between a thread held back "
                         f"before its first chunk and one held back before its second")


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
    winograd.conv3x3_backward(y, saved, chunk_bytes=1)
    assert seen and set(seen) == {1}
    assert parallel.get_blas_threads() == before


def test_chunks_cover_the_batch_and_feed_every_thread():
    for n, threads in ((1, 2), (5, 2), (128, 2), (7, 3)):
        chunks = winograd._chunks(n, 8, 8, 64, 4, 1 << 30, threads)
        assert [s for s, _, _ in chunks] == sorted(s for s, _, _ in chunks) and chunks[0][0] == 0
        assert all(e == s2 for (_, e, _), (s2, _, _) in zip(chunks, chunks[1:])) and chunks[-1][1] == n
        assert len(chunks) >= min(n, threads), f"{n} images, {threads} threads: {len(chunks)} chunks"
        assert all(tiles == (e - s) * 4 for s, e, tiles in chunks), "an 8x8 image is 2x2 tiles"


def test_chunks_hold_enough_tiles_for_the_gemms():
    """However small chunk_bytes, a chunk gets MIN_CHUNK_TILES tiles when the batch has them
    (GEMM rows), unless that would leave a thread without a chunk."""
    for h, n in ((32, 128), (16, 128), (8, 128), (8, 1024)):
        chunks = winograd._chunks(n, h, h, 128, 4, 1, threads=2)
        per_thread = -(-n // 2) * (h // 4) ** 2
        assert all(tiles >= min(winograd.MIN_CHUNK_TILES, per_thread) for _, e, tiles in chunks[:-1]), \
            f"{h}x{h}, batch {n}: {[tiles for *_, tiles in chunks]}"


def test_float32_stays_float32():
    x, w = random((1, 4, 4, 3), np.float32), random((2, 3, 3, 3), np.float32, 1)
    y, saved = winograd.conv3x3_forward(x, w)
    dx, dw = winograd.conv3x3_backward(np.ones_like(y), saved)
    assert (y.dtype, dx.dtype, dw.dtype) == (np.float32,) * 3


def test_gemm_operands_are_matrices_blas_reads_in_place():
    """np.matmul copies a stacked operand whose 2-D slices BLAS cannot read in place: the scratch
    views are (36, T, C) views of (T, 36, C) storage, so every V[k] has unit column stride and
    row stride 36 * C, and V[k]^T is its exact transpose; the transforms return the same views."""
    flat = np.empty(P * 10 * 3 + 7)
    v = winograd._buffer(flat, 10, 3)
    assert v.shape == (P, 10, 3) and v.transpose(1, 0, 2).flags.c_contiguous
    assert np.shares_memory(v, flat) and v.transpose(1, 0, 2).base is not None
    assert all(v[k].strides == (P * 3 * 8, 8) and v[k].transpose().strides == (8, P * 3 * 8) for k in range(P))
    for made in (winograd.input_transform(random((2, 3, 4, 3), np.float32)),
                 winograd.output_transform_adjoint(random((2, 3, 4, 3), np.float32)),
                 winograd.weight_transform(random((2, 3, 3, 3), np.float32))):
        assert made.transpose(1, 0, 2).flags.c_contiguous


def test_transforms_refuse_an_out_they_cannot_write_in_place():
    """A kernel writes (T, 36, C) storage; a plain (36, T, C) array as `out` would come back
    silently unwritten if it were copied, so it is refused."""
    x = random((1, 8, 4, 3), np.float32)  # 2 tiles
    with pytest.raises(ValueError, match="out"):
        winograd.input_transform(x, out=np.empty((P, 2, 3), np.float32))
    with pytest.raises(ValueError, match="out"):
        winograd.output_transform_adjoint(x, out=np.empty((P, 2, 3), np.float32))


def test_invalid_arguments_are_refused():
    x, w = np.zeros((1, 4, 4, 3), np.float32), np.zeros((2, 3, 3, 3), np.float32)
    with pytest.raises(ValueError, match="channels"):
        winograd.conv3x3_forward(x, np.zeros((2, 3, 3, 4), np.float32))
    with pytest.raises(ValueError, match="3, 3"):
        winograd.conv3x3_forward(x, np.zeros((2, 5, 5, 3), np.float32))
    with pytest.raises(ValueError, match="float32 or float64"):
        winograd.conv3x3_forward(x.astype(np.int32), w.astype(np.int32))
    with pytest.raises(ValueError, match="saved"):
        winograd.conv3x3_backward(np.zeros((1, 4, 4, 2), np.float32), None)
    _, saved = winograd.conv3x3_forward(x, w)
    with pytest.raises(ValueError, match="grad_y"):
        winograd.conv3x3_backward(np.zeros((1, 4, 4, 5), np.float32), saved)
