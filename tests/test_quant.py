"""Specification of nanoq4.quant: the symmetric grid, the scale rule, fake quantization, the
tanh soft clip, int4 packing and grid statistics. Every Numba kernel is compared with its
NumPy twin. Sizes stay small so the file also runs under NUMBA_DISABLE_JIT=1."""
import re

import numba
import numpy as np
import pytest

from nanoq4 import quant
from nanoq4.errors import NanoQ4Error

FLOAT_DTYPES = [np.float32, np.float64]
# Odd sizes on purpose: rows that are not multiples of a SIMD width, a single row, a 0-d tensor
# (per tensor only: it has no channel axis).
SHAPES = [(7, 3, 3, 5), (13, 31), (1, 17), (5,), ()]


def he_init(shape, fan_in, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def random_weight(shape, dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.fixture(params=[quant.fake_quantize, quant.fake_quantize_fast], ids=["definition", "fast"])
def fake_quantize(request):
    """The specification holds for the plain definition and for the fast twin that training runs."""
    return request.param


# ----------------------------------------------------------------------------- bits and levels

@pytest.mark.parametrize("bits", range(2, 9))
def test_qmax_and_number_of_levels_for_bits_2_to_8(bits, fake_quantize):
    q = quant.qmax(bits)
    assert q == 2 ** (bits - 1) - 1
    w = np.linspace(-1, 1, 4001, dtype=np.float32)  # dense enough to hit every level
    _, codes, _ = fake_quantize(w, bits)
    stats = quant.grid_stats(codes, bits)
    assert stats["levels_total"] == 2 * q + 1
    assert stats["levels_used"] == 2 * q + 1, f"{bits}-bit grid should use all {2 * q + 1} levels"
    assert codes.min() == -q and codes.max() == q


@pytest.mark.parametrize("bits", [1, 9, 0, -4, 4.0, True, "4"])
def test_bits_outside_2_to_8_are_refused(bits, fake_quantize):
    with pytest.raises(NanoQ4Error, match="bits"):
        quant.qmax(bits)
    with pytest.raises(NanoQ4Error, match="bits"):
        fake_quantize(np.ones(4, np.float32), bits)


# ----------------------------------------------------------------------------- the 4-bit grid

def test_quantized_values_lie_on_the_grid_of_the_scale(fake_quantize):
    w = he_init((16, 3, 3, 8), fan_in=72)
    w_q, codes, scale = fake_quantize(w)
    assert w_q.dtype == np.float32 and codes.dtype == np.int8 and scale.dtype == np.float32
    assert w_q.shape == codes.shape == w.shape and scale.shape == ()
    assert np.abs(codes).max() <= 7
    np.testing.assert_array_equal(w_q, codes.astype(np.float32) * scale,
                                  err_msg="w_q must be exactly code * scale")


def test_rounding_error_is_at_most_half_a_step(fake_quantize):
    w = he_init((32, 64), fan_in=64)
    w_q, _, scale = fake_quantize(w)
    assert np.abs(w - w_q).max() <= 0.5 * scale * (1 + 1e-6)


def test_four_bits_give_at_most_15_distinct_values(fake_quantize):
    w_q, codes, _ = fake_quantize(random_weight((64, 100)))
    assert len(np.unique(w_q)) <= 15
    assert len(np.unique(codes)) <= 15


@pytest.mark.parametrize("sign", [1, -1])
def test_largest_magnitude_maps_to_code_plus_or_minus_7(sign, fake_quantize):
    w = random_weight((10, 20))
    w[3, 7] = sign * 10 * np.abs(w).max()
    _, codes, scale = fake_quantize(w)
    assert codes[3, 7] == sign * 7
    assert scale == np.float32(abs(w[3, 7])) / np.float32(7)


def test_ties_round_half_to_even_like_torch_round(fake_quantize):
    # max|W| = 7 gives scale 1, so W / s is exactly W.
    w = np.array([7.0, 2.5, 3.5, -2.5, 0.5, -0.5, 1.5], dtype=np.float32)
    _, codes, scale = fake_quantize(w)
    assert scale == 1.0
    np.testing.assert_array_equal(codes, [7, 2, 4, -2, 0, 0, 2])


@pytest.mark.parametrize("per_channel", [False, True])
def test_all_zero_tensor_gives_zero_codes_and_no_nan(per_channel, fake_quantize):
    w_q, codes, scale = fake_quantize(np.zeros((4, 6), np.float32), per_channel=per_channel)
    assert np.all(np.isfinite(scale)) and np.all(scale > 0)
    assert not np.isnan(w_q).any()
    assert not codes.any() and not w_q.any()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("per_channel", [False, True])
def test_diverged_weights_are_refused(bad, per_channel, fake_quantize):
    w = random_weight((4, 6))
    w[2, 3] = bad
    with pytest.raises(NanoQ4Error, match="NaN"):
        fake_quantize(w, per_channel=per_channel)


# ----------------------------------------------------------------------------- per channel

def test_per_channel_scale_is_each_rows_max_over_qmax():
    w = random_weight((6, 3, 3, 4)) * np.arange(1, 7, dtype=np.float32).reshape(6, 1, 1, 1)
    scale = quant.compute_scale(w, per_channel=True)
    assert scale.shape == (6,) and scale.dtype == np.float32
    want = np.abs(w).reshape(6, -1).max(axis=1).astype(np.float32) / np.float32(7)
    np.testing.assert_array_equal(scale, want)


def test_per_channel_every_row_reaches_code_7(fake_quantize):
    w = random_weight((6, 3, 3, 4)) * np.logspace(-3, 1, 6, dtype=np.float32).reshape(6, 1, 1, 1)
    w_q, codes, scale = fake_quantize(w, per_channel=True)
    assert np.all(np.abs(codes).reshape(6, -1).max(axis=1) == 7)
    np.testing.assert_array_equal(w_q, codes * scale.reshape(6, 1, 1, 1))
    for row in w_q:
        assert len(np.unique(row)) <= 15


def test_per_channel_zero_row_is_fine(fake_quantize):
    w = random_weight((3, 5))
    w[1] = 0
    w_q, codes, scale = fake_quantize(w, per_channel=True)
    assert np.all(np.isfinite(scale)) and scale[1] > 0
    assert not codes[1].any() and not w_q[1].any()
    assert np.abs(codes[[0, 2]]).max() == 7


def test_per_tensor_compute_scale_matches_fake_quantize(fake_quantize):
    w = random_weight((8, 9))
    assert quant.compute_scale(w) == fake_quantize(w)[2]
    assert quant.compute_scale(w).shape == ()


# ----------------------------------------------------------------------------- kernels vs twins

@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("per_channel, shape", [(False, shape) for shape in SHAPES]
                         + [(True, shape) for shape in SHAPES if shape != ()])
def test_fast_fake_quantize_equals_the_definition(dtype, per_channel, shape):
    w = random_weight(shape, dtype, seed=len(shape))
    got = quant.fake_quantize_fast(w, 4, per_channel)
    want = quant.fake_quantize(w, 4, per_channel)
    for name, g, r in zip(["w_q", "codes", "scale"], got, want):
        assert g.dtype == r.dtype and g.shape == r.shape, name
        np.testing.assert_array_equal(g, r, err_msg=f"{name} differs from the plain NumPy definition")
    assert got[0].dtype == dtype, "float64 weights (gradient checks) must give float64 w_q"


@pytest.mark.parametrize("bits", [2, 3, 5, 8])
def test_fast_fake_quantize_other_bit_widths_equal_the_definition(bits):
    w = random_weight((9, 11))
    got = quant.fake_quantize_fast(w, bits, per_channel=True)
    want = quant.fake_quantize(w, bits, per_channel=True)
    for g, r in zip(got, want):
        np.testing.assert_array_equal(g, r)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_row_max_abs_equals_its_twin_and_propagates_nan(dtype):
    rows = random_weight((5, 37), dtype)
    rows[1, 36] = -50.0
    rows[2] = -0.0
    rows[3, 5] = np.nan
    rows[4, 0] = -np.inf
    got = quant._row_max_abs(rows)
    np.testing.assert_array_equal(got, quant._row_max_abs_reference(rows))
    assert got[1] == 50.0 and got[2] == 0.0 and np.isnan(got[3]) and got[4] == np.inf


def test_out_buffer_is_reused():
    w = random_weight((4, 6))
    out = np.empty_like(w)
    w_q, _, _ = quant.fake_quantize_fast(w, out=out)
    assert w_q is out
    np.testing.assert_array_equal(out, quant.fake_quantize(w)[0])


@pytest.mark.parametrize("out", [np.empty((4, 5), np.float32), np.empty((4, 6), np.float64),
                                 np.empty((6, 4), np.float32).T])
def test_unusable_out_buffer_is_refused(out):
    with pytest.raises(ValueError, match="out"):
        quant.fake_quantize_fast(random_weight((4, 6)), out=out)


# ----------------------------------------------------------------------------- (de)quantize

@pytest.mark.parametrize("per_channel", [False, True])
def test_dequantize_of_quantize_equals_fake_quantize(per_channel, fake_quantize):
    w = random_weight((5, 3, 3, 2))
    codes, scale = quant.quantize(w, per_channel=per_channel)
    assert codes.dtype == np.int8 and scale.dtype == np.float32
    restored = quant.dequantize(codes, scale)
    assert restored.dtype == np.float32
    np.testing.assert_array_equal(restored, fake_quantize(w, per_channel=per_channel)[0])


def test_dequantize_refuses_a_scale_that_does_not_match_axis_0():
    with pytest.raises(ValueError, match="scale"):
        quant.dequantize(np.zeros((4, 5), np.int8), np.ones(5, np.float32))


# ----------------------------------------------------------------------------- tanh soft clip

def tanh(x):
    """The kernel's tanh: tanh_soft_clip_ with alpha = 1, whose divide and multiply are exact."""
    y = np.array(x, copy=True)
    quant.tanh_soft_clip_(y, 1.0)
    return y


def float32_ulps(got, want):
    """|got - want| in units of the float32 spacing at want (float64), subnormals included."""
    _, exponent = np.frexp(np.abs(want))
    return np.abs(got - want) / np.ldexp(1.0, np.maximum(exponent - 24, -149))


def float64_ulps(got, want):
    _, exponent = np.frexp(np.abs(want))
    return np.abs(got - want) / np.ldexp(1.0, np.maximum(exponent - 53, -1074))


def consecutive_float32(center, count):
    start = np.float32(center).view(np.int32)
    return np.arange(start - count // 2, start + count // 2, dtype=np.int32).view(np.float32)


# Kernels run as Python under NUMBA_DISABLE_JIT=1: there the dense samples thin out 64-fold.
THIN = 64 if numba.config.DISABLE_JIT else 1
# Every 1021st float32 from +0 to +inf (2.1M values, subnormals included), the largest float32 and
# +inf, and every float32 next to the places where tanh could go wrong: the branch switch at 0.625,
# the smallest normals, the first input whose tanh rounds to 1 (9.0109), the saturation clamp at 20.
DENSE_FLOAT32 = np.unique(np.concatenate(
    [np.arange(0, 0x7F80_0001, 1021 * THIN, dtype=np.int64).astype(np.int32).view(np.float32)]
    + [consecutive_float32(c, 2 ** 16 // THIN) for c in (0.625, 1.2e-38, 9.0109, 20.0)]
    + [np.array([np.finfo(np.float32).max, np.inf], dtype=np.float32)]))


def test_tanh_of_float32_is_correctly_rounded_on_a_dense_sample():
    """Computed in float64 and rounded once: within half a float32 ulp of float64's tanh (plus
    float64 noise), i.e. the correctly rounded float32 tanh; NumPy's float32 tanh is 1.4 ulp off here."""
    want = np.tanh(DENSE_FLOAT32.astype(np.float64))
    err = float32_ulps(tanh(DENSE_FLOAT32), want)
    worst = err.argmax()
    assert err[worst] <= 0.5 + 2.0 ** -20, f"tanh({DENSE_FLOAT32[worst]!r}) is {err[worst]:.3f} ulp off"


def test_tanh_of_float64_is_within_3_ulp():
    """1.6 ulp from the exact tanh (long double) measured here, NumPy's float64 tanh up to 1.2 ulp."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-25, 25, 20_000 // THIN), rng.uniform(-1, 1, 20_000 // THIN),
                        np.linspace(0.62, 0.63, 5_000 // THIN), np.linspace(18.0, 21.0, 5_000 // THIN)])
    err = float64_ulps(tanh(x), np.tanh(x))
    assert err.max() <= 3.0, f"tanh({x[err.argmax()]!r}) is {err.max():.2f} ulp off"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_tanh_special_values(dtype):
    info = np.finfo(dtype)
    x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, info.max, -info.max,
                  info.smallest_subnormal, -info.smallest_subnormal, info.tiny, 1e-30], dtype=dtype)
    y = tanh(x)
    np.testing.assert_array_equal(y[:4], [0.0, -0.0, 1.0, -1.0])
    assert list(np.signbit(y[:2])) == [False, True], "tanh(-0) must be -0"
    assert np.isnan(y[4])
    np.testing.assert_array_equal(y[5:7], [1.0, -1.0])
    np.testing.assert_array_equal(y[7:], x[7:], err_msg="tanh(x) rounds to x for tiny x")


def test_float32_tanh_reaches_1_exactly_where_the_correctly_rounded_one_does():
    x = consecutive_float32(9.0109, 2 ** 12)
    exact_is_one = np.tanh(x.astype(np.float64)).astype(np.float32) == 1
    assert exact_is_one.any() and not exact_is_one.all()
    np.testing.assert_array_equal(tanh(x) == 1, exact_is_one)


def test_tanh_is_odd_bounded_and_monotone_on_the_dense_float32_sample():
    y = tanh(DENSE_FLOAT32)  # sorted ascending: positive float32 bit patterns sort like values
    np.testing.assert_array_equal(tanh(-DENSE_FLOAT32), -y)
    assert np.abs(y).max() <= 1.0
    assert np.all(np.diff(y) >= 0), "tanh must not decrease"


def test_float64_tanh_is_odd_bounded_and_monotone_on_a_dense_grid():
    """Between consecutive float64 around 0.625 (branch switch) a 1-ulp step back is possible."""
    x = np.linspace(0.0, 25.0, 1_000_001 // THIN)
    y = tanh(x)
    np.testing.assert_array_equal(tanh(-x), -y)
    assert np.abs(y).max() <= 1.0 and np.all(np.diff(y) >= 0)


def test_tanh_of_an_element_depends_only_on_that_element():
    """Same bits at any position in the vector lanes, for any thread count, and in the scalar function."""
    x = random_weight(4099) * 6
    y = tanh(x)
    np.testing.assert_array_equal(tanh(x[3:]), y[3:])
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        np.testing.assert_array_equal(tanh(x), y)
    finally:
        numba.set_num_threads(threads)
    scalar = [np.float32(quant._tanh_float64(np.float64(v))) for v in x[:200]]
    np.testing.assert_array_equal(scalar, y[:200])


@pytest.mark.skipif(numba.config.DISABLE_JIT, reason="no LLVM IR without the JIT")
def test_tanh_calls_no_math_library():
    """Only exact LLVM intrinsics (fabs, floor, copysign): no libm tanh or exp whose bits vary by
    platform, and no ZeroDivisionError check (error_model="numpy"), either of which stops vectorizing."""
    fresh = numba.njit(error_model="numpy")(quant._tanh_float64.py_func)  # cached code has no IR
    fresh(0.5)
    calls = set(re.findall(r"call [^@]*@\"?([\w.$]+)", fresh.inspect_llvm(fresh.signatures[0])))
    python_wrapper = {c for c in calls if c.startswith(("Py", "numba_gil")) or "_tanh_float64" in c}
    assert calls - python_wrapper == {"llvm.fabs.f64", "llvm.floor.f64", "llvm.copysign.f64"}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("size", [1, 7, 1001])
def test_tanh_soft_clip_equals_its_numpy_twin(dtype, size):
    w = random_weight(size, dtype) * 4
    got = w.copy()
    assert quant.tanh_soft_clip_(got, 1.5) is None
    # Only the tanh differs: ours is correctly rounded in float32 (1.6 ulp in float64), NumPy's is 1.4
    # (float32) and 1.2 (float64) ulp off here, so the two tanh are 1 (float32) or 2 (float64) ulp
    # apart; the multiply by alpha can scale that to up to twice as many ulp of the product and round.
    # Measured on 1M weights, alpha 0.05 to 7: 2 and 4 ulp.
    maxulp = 2 if dtype == np.float32 else 4
    np.testing.assert_array_max_ulp(got, quant._tanh_soft_clip_reference(w, 1.5), maxulp=maxulp)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_tanh_soft_clip_rounds_like_the_three_passes(dtype):
    """Divide, tanh rounded to the dtype, multiply: each rounding where NumPy's passes make it."""
    w = random_weight(1001, dtype) * 4
    alpha = dtype(0.7)
    got = w.copy()
    quant.tanh_soft_clip_(got, 0.7)
    np.testing.assert_array_equal(got, alpha * tanh(w / alpha))


def test_tanh_soft_clip_works_in_place_on_any_shape():
    w = random_weight((3, 3, 3, 2))
    clipped = w.copy()
    quant.tanh_soft_clip_(clipped, 0.5)
    assert clipped.shape == w.shape and np.abs(clipped).max() < np.abs(w).max()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_tanh_soft_clip_bounds_magnitude_by_alpha_even_for_huge_values(dtype):
    w = np.array([1e6, -1e6, 1e30, -3e38, 5.0, -2.9, 0.0], dtype=dtype)
    quant.tanh_soft_clip_(w, 3.0)
    assert not np.isnan(w).any()
    # Strictly below alpha in exact math; tanh rounds to 1.0 for large inputs, hence <=.
    assert np.all(np.abs(w) <= 3.0)
    np.testing.assert_allclose(w[4:], 3 * np.tanh(np.array([5.0, -2.9, 0.0]) / 3), rtol=1e-6)


def test_absolute_alpha_3_is_nearly_the_identity_for_he_init_weights():
    w = he_init((64, 3, 3, 64), fan_in=576)  # std ~0.06
    clipped = w.copy()
    quant.tanh_soft_clip_(clipped, 3.0)
    # Relative change (w/3)**2 / 3: under 0.5% even for the largest of 37k weights.
    np.testing.assert_allclose(clipped, w, rtol=5e-3, atol=0)


def test_relative_alpha_actually_clips_he_init_weights():
    w = he_init((64, 3, 3, 64), fan_in=576)
    alpha = quant.rms_alpha(w, 2.0)
    clipped = w.copy()
    quant.tanh_soft_clip_(clipped, alpha)
    assert np.abs(clipped).max() < alpha < 0.8 * np.abs(w).max()


@pytest.mark.parametrize("alpha", [0, -1.0, np.nan, np.inf, None])
def test_tanh_soft_clip_refuses_a_bad_alpha(alpha):
    with pytest.raises(NanoQ4Error, match="alpha"):
        quant.tanh_soft_clip_(random_weight(4), alpha)


@pytest.mark.parametrize("w", [random_weight((4, 6)).T, random_weight(4).astype(np.int32),
                               [1.0, 2.0]])
def test_tanh_soft_clip_needs_a_contiguous_float_array(w):
    with pytest.raises(ValueError, match="in place"):
        quant.tanh_soft_clip_(w, 3.0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_rms_alpha_is_k_times_rms(dtype):
    w = random_weight((13, 3, 3, 7), dtype) * 0.05
    want = 2.5 * np.sqrt(np.mean(w.astype(np.float64) ** 2))
    assert quant.rms_alpha(w, 2.5) == pytest.approx(want, rel=1e-12)
    rows = quant._rows_view(w)
    np.testing.assert_allclose(quant._row_sum_squares_kernel(rows),
                               quant._row_sum_squares_reference(rows), rtol=1e-12)


def test_rms_alpha_of_zero_weights_is_positive_and_finite():
    alpha = quant.rms_alpha(np.zeros((3, 4), np.float32), 2.0)
    assert 0 < alpha < np.inf
    w = np.zeros(5, np.float32)
    quant.tanh_soft_clip_(w, alpha)
    assert not w.any()


@pytest.mark.parametrize("k", [0, -2.0, np.nan])
def test_rms_alpha_refuses_a_bad_k(k):
    with pytest.raises(NanoQ4Error, match="k"):
        quant.rms_alpha(random_weight(4), k)


# ----------------------------------------------------------------------------- int4 packing

@pytest.mark.parametrize("codes, packed", [
    ([1, -1], [0xF1]),            # code 0 in the low nibble, code 1 in the high nibble
    ([7, -8], [0x87]),
    ([-1], [0x0F]),               # odd tail: the high nibble stays 0
    ([0, 1, 2, 3, 4], [0x10, 0x32, 0x04]),
])
def test_pack_int4_nibble_order_by_hand(codes, packed):
    got = quant.pack_int4(np.array(codes, np.int8))
    assert got.dtype == np.uint8
    assert got.tolist() == packed, [hex(b) for b in got]


def test_pack_int4_round_trips_all_16_nibble_values():
    codes = np.arange(-8, 8, dtype=np.int8)
    packed = quant.pack_int4(codes)
    np.testing.assert_array_equal(packed, quant._pack_int4_reference(codes))
    np.testing.assert_array_equal(quant.unpack_int4(packed, 16), codes)


@pytest.mark.parametrize("n", [1, 3, 7, 1001, 2 ** 21 + 1])
def test_pack_unpack_int4_round_trip_and_twins(n):
    codes = np.random.default_rng(n).integers(-8, 8, n).astype(np.int8)
    packed = quant.pack_int4(codes)
    assert packed.shape == ((n + 1) // 2,)
    if n % 2:
        assert packed[-1] >> 4 == 0, "an odd tail must leave the last high nibble 0"
    np.testing.assert_array_equal(packed, quant._pack_int4_reference(codes))
    unpacked = quant.unpack_int4(packed, n)
    assert unpacked.dtype == np.int8
    np.testing.assert_array_equal(unpacked, codes)
    np.testing.assert_array_equal(unpacked, quant._unpack_int4_reference(packed, n))


@pytest.mark.parametrize("bits", [4, 8])
def test_unpack_codes_reads_read_only_bytes_of_a_file(bits):
    codes = np.array([1, -1, 7, -7, 3], np.int8)
    blob = quant.pack_codes(codes, bits).tobytes()
    packed = np.frombuffer(blob, dtype=np.uint8)  # read-only, as a model loader gets it
    np.testing.assert_array_equal(quant.unpack_codes(packed, codes.size, bits), codes)


@pytest.mark.parametrize("n", [511, 512])
def test_unpack_int4_of_every_byte_equals_its_twin(n):
    packed = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(quant.unpack_int4(packed, n),
                                  quant._unpack_int4_reference(packed, n))


def test_pack_int4_flattens_in_c_order():
    codes = np.arange(-7, 8, dtype=np.int8).reshape(3, 5)
    np.testing.assert_array_equal(quant.pack_int4(codes), quant.pack_int4(codes.ravel()))


@pytest.mark.parametrize("codes", [[8], [-9], [0, 100], np.array([0.5])])
def test_pack_int4_refuses_codes_outside_int4(codes):
    with pytest.raises(ValueError, match="codes"):
        quant.pack_int4(np.asarray(codes))


@pytest.mark.parametrize("packed", [np.zeros(3, np.uint8), np.zeros(5, np.uint8),
                                    np.zeros(4, np.int8)])
def test_unpack_int4_refuses_the_wrong_number_or_type_of_bytes(packed):
    with pytest.raises(ValueError, match="bytes"):
        quant.unpack_int4(packed, 7)


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_codes_round_trip_for_bits_2_to_8(bits):
    q = quant.qmax(bits)
    every_code_three_times = np.tile(np.arange(-q, q + 1, dtype=np.int8), 3)
    codes = np.random.default_rng(bits).permutation(every_code_three_times)[:-1]  # an odd count
    packed = quant.pack_codes(codes, bits)
    assert packed.dtype == np.uint8
    assert packed.size == ((codes.size + 1) // 2 if bits <= 4 else codes.size)
    np.testing.assert_array_equal(quant.unpack_codes(packed, codes.size, bits), codes)


def test_pack_codes_refuses_bits_outside_2_to_8():
    with pytest.raises(NanoQ4Error, match="bits"):
        quant.pack_codes(np.zeros(4, np.int8), 9)
    with pytest.raises(NanoQ4Error, match="bits"):
        quant.unpack_codes(np.zeros(4, np.uint8), 4, 1)


# ----------------------------------------------------------------------------- grid statistics

def test_grid_stats_on_hand_made_codes():
    codes = np.array([[-7, 0, 0], [3, 7, 7]], np.int8)
    stats = quant.grid_stats(codes)
    assert stats == {"levels_used": 4, "levels_total": 15, "frac_at_max": 0.5, "flip_rate": None}
    prev = np.array([[-7, 0, 1], [3, 7, -7]], np.int8)
    assert quant.grid_stats(codes, 4, prev)["flip_rate"] == pytest.approx(2 / 6)
    assert quant.grid_stats(codes, 4, codes)["flip_rate"] == 0.0


def test_grid_stats_for_two_bits():
    stats = quant.grid_stats(np.array([-1, 1, 1, 0], np.int8), bits=2)
    assert stats["levels_total"] == 3 and stats["levels_used"] == 3
    assert stats["frac_at_max"] == 0.75


def test_grid_stats_refuses_off_grid_codes_and_mismatched_prev():
    with pytest.raises(ValueError, match="codes"):
        quant.grid_stats(np.array([-8, 0], np.int8))
    with pytest.raises(ValueError, match="prev_codes"):
        quant.grid_stats(np.zeros(4, np.int8), 4, np.zeros(5, np.int8))
