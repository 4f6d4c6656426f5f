"""4-bit quantization math: the symmetric grid, the scale rule, fake quantization, the tanh
soft clip, int4 packing and grid statistics (paper: "True 4-Bit Quantized CNN Training on CPU").

Grid. b-bit symmetric quantization uses the integer codes -qmax..qmax with qmax = 2**(b-1) - 1,
so 4 bits give 15 levels -7..7 (the two's-complement code -8 is never produced). The scale is
recomputed at every forward from the current weights:
    c = max|W|,  s = c / qmax,  codes = clamp(rint(W / s), -qmax, qmax),  W_q = codes * s
rint rounds half to even, like torch.round. When s would be 0 (an all-zero tensor or row) the
scale is 1.0 instead, so the codes are 0 and nothing is NaN. `fake_quantize` is exactly these
formulas in plain NumPy: read it first. Training runs its fast twin `fake_quantize_fast` (two
Numba kernels, the same bits; the tests hold them equal). The straight-through estimator
(gradient of W_q passed to W unchanged) lives in the layers: nn.STE.

Layout. Axis 0 of a weight is the output channel: conv weights are (Cout, KH, KW, Cin), linear
weights (out, in). Per-channel quantization gives one scale per output channel, shape (Cout,);
per-tensor gives a 0-d scale. The quantization kernels see a weight as its C-contiguous
(Cout, rest) view and parallelize over output channels, so every per-row result is written by
exactly one thread; the soft clip and the packing kernels work on the flat array.

Nibble order of packed int4 (model files): codes are flattened in C order; byte i holds code 2i
in its LOW nibble and code 2i+1 in its HIGH nibble, each as a 4-bit two's-complement number
(-1 -> 0xF, -8 -> 0x8). Codes [1, -1] pack to the single byte 0xF1. An odd count leaves the
last byte's high nibble 0.

Every Numba kernel has a plain-NumPy twin that the tests compare it against: for the quantizer
the plain one is the definition, `fake_quantize`; elsewhere it is named `*_reference`.
Errors: NanoQ4Error for settings a user chooses (bits, alpha, k) and for diverged weights;
ValueError for programming mistakes (wrong dtypes, shapes, code ranges, buffer sizes).
"""
import math

import numpy as np
from numba import njit, prange

from .errors import NanoQ4Error

MIN_BITS, MAX_BITS = 2, 8


# ----------------------------------------------------------------------------- the definition

def qmax(bits: int) -> int:
    """Largest code of the symmetric b-bit grid: 2**(bits-1) - 1 (7 for 4 bits)."""
    is_integer = isinstance(bits, (int, np.integer)) and not isinstance(bits, bool)
    if not is_integer or not MIN_BITS <= bits <= MAX_BITS:
        raise NanoQ4Error(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    return 2 ** (int(bits) - 1) - 1


def compute_scale(w, bits=4, per_channel=False) -> np.ndarray:
    """float32 scale max|W| / qmax: shape () per tensor, (w.shape[0],) per output channel."""
    magnitudes = np.abs(_rows_view(_as_weight(w), per_channel))
    return _scale_from_max_abs(magnitudes.max(axis=1) if per_channel else magnitudes.max(), qmax(bits))


def fake_quantize(w, bits=4, per_channel=False):
    """(w_q, codes, scale): the weight snapped to the b-bit grid (w's dtype and shape; float64 in,
    float64 out for gradient checks), its int8 codes, and the float32 scale.

    The definition, line by line as in the module docstring. Training calls fake_quantize_fast,
    which returns the same bits; the tests compare the two."""
    q = qmax(bits)
    w = _as_weight(w)
    scale = compute_scale(w, bits, per_channel)
    s = scale.reshape((-1,) + (1,) * (w.ndim - 1)) if per_channel else scale  # one scale per row of axis 0
    codes = np.clip(np.rint(w / s), -q, q)
    return codes * s, codes.astype(np.int8), scale


def quantize(w, bits=4, per_channel=False):
    """(codes int8, scale float32) for export: exactly the grid training used (fake_quantize_fast)."""
    _, codes, scale = fake_quantize_fast(w, bits, per_channel)
    return codes, scale


def dequantize(codes, scale) -> np.ndarray:
    """codes * scale as float32; a (Cout,) scale broadcasts over axis 0 of the codes."""
    codes = np.asarray(codes)
    scale = np.asarray(scale, dtype=np.float32)
    if scale.ndim == 0:
        return codes.astype(np.float32) * scale
    if codes.ndim == 0 or scale.shape != (codes.shape[0],):
        raise ValueError(f"a per-channel scale of shape {scale.shape} does not match codes "
                         f"of shape {codes.shape} (one scale per row of axis 0)")
    return codes.astype(np.float32) * scale.reshape((-1,) + (1,) * (codes.ndim - 1))


def _as_weight(w):
    """w as a C-contiguous float32 or float64 array (other dtypes become float32)."""
    w = np.asarray(w)
    if w.dtype not in (np.float32, np.float64):
        w = w.astype(np.float32)
    if w.size == 0:
        raise ValueError(f"cannot quantize an empty tensor of shape {w.shape}")
    return np.ascontiguousarray(w)


def _rows_view(w, per_channel=False):
    """The (Cout, rest) view the kernels work on; a 0-d tensor is one row of one element."""
    if w.ndim == 0:
        if per_channel:
            raise ValueError("per-channel quantization needs an output-channel axis 0")
        return w.reshape(1, 1)
    return w.reshape(w.shape[0], -1)


def _scale_from_max_abs(max_abs, q):
    """Scale rule s = c / qmax in float32 for a 0-d or (Cout,) max|W|; 1.0 where c / qmax is 0."""
    scale = np.asarray(max_abs, dtype=np.float32) / np.float32(q)
    if not np.all(np.isfinite(scale)):
        raise NanoQ4Error("cannot quantize weights that hold NaN, Inf or values beyond float32: "
                          "training diverged, lower the learning rate")
    return np.where(scale > 0, scale, np.float32(1.0))


# ----------------------------------------------------------------------------- the fast twin

# Sign-bit masks of IEEE-754 floats, by the unsigned integer type of the same width.
_ABS_MASK = {np.dtype(np.float32): np.uint32(0x7FFF_FFFF),
             np.dtype(np.float64): np.uint64(0x7FFF_FFFF_FFFF_FFFF)}


@njit(parallel=True, cache=True)
def _row_max_abs_bits_kernel(bits, abs_mask):
    """Row-wise max of (bits & abs_mask) over a float array viewed as unsigned integers.

    With the sign bit cleared, IEEE-754 bit patterns sort like the values |x|, and every NaN
    sorts above +Inf: an integer max is max|x| and propagates NaN, and unlike a float compare
    with a NaN branch it vectorizes. Each row's result is written by one thread.
    """
    n_rows, n_cols = bits.shape
    out = np.empty(n_rows, dtype=bits.dtype)
    for r in prange(n_rows):
        m = bits[r, 0] & abs_mask
        for j in range(1, n_cols):
            m = max(m, bits[r, j] & abs_mask)
        out[r] = m
    return out


def _row_max_abs(rows):
    """max|x| of each row of a float32/float64 (rows, cols) array; NaN if the row holds one."""
    mask = _ABS_MASK[rows.dtype]
    return _row_max_abs_bits_kernel(rows.view(mask.dtype), mask).view(rows.dtype)


def _row_max_abs_reference(rows):
    """NumPy twin of _row_max_abs."""
    return np.abs(rows).max(axis=1)


@njit(parallel=True, cache=True)
def _fake_quantize_rows_kernel(rows, row_scale, qmax, w_q, codes):
    """One pass writing both outputs of every element: code = clamp(rint(x / s), -qmax, qmax)
    and w_q = code * s, with s = row_scale[row]. rows, w_q, codes: (rows, cols); qmax arrives
    as a float of the weight dtype so the arithmetic stays in that dtype. No fastmath: the
    rounding must match NumPy's bit for bit."""
    n_rows, n_cols = rows.shape
    for r in prange(n_rows):
        s = row_scale[r]
        for j in range(n_cols):
            q = min(max(np.rint(rows[r, j] / s), -qmax), qmax)
            codes[r, j] = np.int8(q)
            w_q[r, j] = q * s


def fake_quantize_fast(w, bits=4, per_channel=False, out=None):
    """fake_quantize computed by Numba kernels, bit for bit the same (w_q, codes, scale): what every
    quantized layer runs at every training step (nn.QuantizedWeight).

    Two passes instead of NumPy's chain of temporary arrays: one parallel max|W| per row on the weights' bit
    patterns (_row_max_abs), then one fused pass writing w_q and codes (_fake_quantize_rows_kernel).
    `out` reuses a C-contiguous w_q buffer of w's shape and dtype.
    """
    q = qmax(bits)
    w = _as_weight(w)
    rows = _rows_view(w, per_channel)
    row_max = _row_max_abs(rows)
    if per_channel:
        scale = row_scale = _scale_from_max_abs(row_max, q)
    else:
        scale = _scale_from_max_abs(row_max.max(), q)
        row_scale = np.full(rows.shape[0], scale, dtype=np.float32)
    if out is None:
        out = np.empty_like(w)
    elif not (isinstance(out, np.ndarray) and out.shape == w.shape and out.dtype == w.dtype
              and out.flags.c_contiguous and out.flags.writeable):
        raise ValueError(f"out must be a writeable C-contiguous {w.dtype} array of shape {w.shape}")
    codes = np.empty(w.shape, dtype=np.int8)
    _fake_quantize_rows_kernel(rows, row_scale, rows.dtype.type(q),
                               out.reshape(rows.shape), codes.reshape(rows.shape))
    return out, codes, scale


# ----------------------------------------------------------------------------- tanh soft clip

def _check_positive(name, value):
    if not (isinstance(value, (int, float, np.integer, np.floating)) and 0 < value < math.inf):
        raise NanoQ4Error(f"{name} must be a positive finite number, got {value!r}")


# tanh from IEEE +, -, *, / and exact operations (abs, floor, copysign, bit patterns) only, after
# Cephes (S. L. Moshier, netlib.org/cephes): tanh.c's rational x + x z P(z) / Q(z), z = x*x, below
# |x| = 0.625, and beyond it tanh = 1 - 2 / (e + 1) with e = exp(2|x|) = 2**n * exp(r) and exp.c's
# Pade form exp(r) = (Q(r*r) + r P(r*r)) / (Q(r*r) - r P(r*r)), |r| <= ln(2)/2. Both branches are
# base + num / den, so an element costs one division. Float32 weights go through it in float64 too:
# with a float64 error near 1e-16, rounding to float32 gives the correctly rounded tanh unless the
# exact value lies within 1e-16 of a rounding midpoint (never, on the tests' dense sample), and a
# correctly rounded tanh has one answer; float32 rational approximations (Eigen's) are a few ulp off.
# error_model="numpy": a division by zero would give inf rather than raise, so the loop has no
# branch and LLVM vectorizes it (4 float64 lanes on AVX2).
_TANH_P = (-9.64399179425052238628e-1, -9.92877231001918586564e1, -1.61468768441708447952e3)
_TANH_Q = (1.12811678491632931402e2, 2.23548839060100448583e3, 4.84406305325125486048e3)  # monic: z**3 + ...
_EXP_P = (1.26177193074810590878e-4, 3.02994407707441961300e-2, 9.99999999999999999910e-1)
_EXP_Q = (3.00198505138664455042e-6, 2.52448340349684104192e-3, 2.27265548208155028766e-1,
          2.00000000000000000009e0)
_LN2_HI, _LN2_LO = 6.93145751953125e-1, 1.42860682030941723212e-6  # HI has 16 bits: n * HI is exact
_LOG2_E = 1.4426950408889634074
_TANH_SMALL = 0.625
_TANH_SATURATED = 20.0  # float64 tanh rounds to 1 from 19.06 on; clamping here keeps exp(2|x|) finite


@njit(cache=True, error_model="numpy")
def _tanh_float64(x):
    """tanh of a float64, within 1.6 float64 ulp (measured against long double); from a float32
    input, rounded to float32, the correctly rounded tanh. Odd, |tanh| <= 1, NaN stays NaN.

    Why not math.tanh: that calls the C library (a different tanhf per libm, and no vectorizing).
    Only basic IEEE operations here, and no fastmath (no FMA contraction, no reordering): every
    element's bits follow from its input alone, on any CPU, vector width or thread count."""
    t = abs(x)
    if not t < _TANH_SATURATED:  # +-inf and NaN too (NaN restored at the end)
        t = _TANH_SATURATED
    z = t * t
    small_num = t * z * ((_TANH_P[0] * z + _TANH_P[1]) * z + _TANH_P[2])
    small_den = ((z + _TANH_Q[0]) * z + _TANH_Q[1]) * z + _TANH_Q[2]
    u = t + t  # exp(u) = 2**n * exp(r), r = u - n ln 2 with ln 2 in two parts (Cody-Waite)
    n = np.floor(_LOG2_E * u + 0.5)  # a float: math.floor's int would convert back and forth
    r = (u - n * _LN2_HI) - n * _LN2_LO
    rr = r * r
    p = r * ((_EXP_P[0] * rr + _EXP_P[1]) * rr + _EXP_P[2])
    q = ((_EXP_Q[0] * rr + _EXP_Q[1]) * rr + _EXP_Q[2]) * rr + _EXP_Q[3]
    # 2.0**n from its bit pattern; through int32 because AVX2 converts 4 doubles to int32 at once
    # but to int64 only one by one
    two_n = np.int64((np.int64(np.int32(n)) + 1023) << 52).view(np.float64)
    e_top, e_bottom = two_n * (q + p), q - p  # exp(u) = e_top / e_bottom, e_bottom in (1.6, 2.4)
    # tanh = 1 - 2 / (exp(u) + 1): the rounding errors of the fraction shrink with it as t grows,
    # where (e_top - e_bottom) / (e_top + e_bottom) would round twice at the size of 1.
    small = t < _TANH_SMALL
    num = small_num if small else -2.0 * e_bottom
    den = small_den if small else e_top + e_bottom
    y = (t if small else 1.0) + num / den  # num / den < 0 in both branches: y <= 1
    return math.copysign(y, x) if x == x else x


@njit(parallel=True, cache=True, error_model="numpy")
def _tanh_soft_clip_kernel(flat, alpha):
    """flat <- alpha * tanh(flat / alpha) in one parallel pass, rounding where the three NumPy
    passes of the reference do: the divide and the multiply in flat's dtype, and tanh (computed
    in float64) rounded to flat's dtype by the first store. alpha has flat's dtype."""
    for i in prange(flat.size):
        flat[i] = _tanh_float64(np.float64(flat[i] / alpha))
        flat[i] *= alpha


def _tanh_soft_clip_reference(w, alpha):
    """The formula with NumPy's tanh, on a new array: the definition that tanh_soft_clip_ matches
    within 2 ulp (float32) or 4 ulp (float64), the tanh being the only difference (tests/test_quant.py)."""
    alpha = w.dtype.type(alpha)
    return alpha * np.tanh(w / alpha)


def tanh_soft_clip_(w, alpha) -> None:
    """W <- alpha * tanh(W / alpha), in place, after every optimizer step.

    It bounds |W| by alpha (|W| == alpha only where tanh rounds to 1 in floating point) while
    leaving small weights almost unchanged, so outliers cannot stretch the quantization scale.
    w: a writeable C-contiguous float32 or float64 array (a parameter's data).
    """
    _check_positive("alpha", alpha)
    if not (isinstance(w, np.ndarray) and w.dtype in (np.float32, np.float64)
            and w.flags.c_contiguous and w.flags.writeable):
        raise ValueError("tanh_soft_clip_ works in place on a writeable C-contiguous "
                         "float32 or float64 array")
    # One Numba pass with tanh written out (_tanh_float64), not np.tanh: NumPy picks its float32 tanh
    # by CPU (its AVX2 and AVX512 versions differ in the last bits; here it is up to 1.4 ulp off), so
    # it reproduces only on the same kind of machine; math.tanh in a Numba loop would call the C
    # library's tanhf, yet other bits and no vectorizing. Built from IEEE-rounded basic operations
    # without fastmath, each result depends only on its input, on any machine and thread count, and
    # in float32 it is the correctly rounded tanh. It also reads and writes the weights once instead
    # of three times: VGG4bit's 3.25M weights took 16.6 ms median in three NumPy passes, 10.9 ms in
    # this pass (2 threads), before the float-to-int32 conversion in _tanh_float64 took a further
    # quarter off the loop's cycles (llvm-mca, Zen 3).
    _tanh_soft_clip_kernel(w.reshape(-1), w.dtype.type(alpha))


@njit(parallel=True, cache=True, fastmath={"reassoc"})
def _row_sum_squares_kernel(rows):
    """Sum of x**2 of each row, accumulated in float64. fastmath "reassoc" on purpose: it lets
    LLVM vectorize the sum; only the rounding of a float64 sum feeding an alpha changes."""
    n_rows, n_cols = rows.shape
    out = np.empty(n_rows, dtype=np.float64)
    for r in prange(n_rows):
        acc = 0.0
        for j in range(n_cols):
            v = np.float64(rows[r, j])
            acc += v * v
        out[r] = acc
    return out


def _row_sum_squares_reference(rows):
    """NumPy twin of _row_sum_squares_kernel."""
    return np.square(rows, dtype=np.float64).sum(axis=1)


def rms_alpha(w, k) -> float:
    """Relative soft-clip alpha = k * RMS(W), the RMS taken over the whole tensor.

    Why: He-initialised weights are ~0.05 in size, so the paper's absolute a = 3.0 makes
    3 * tanh(W / 3) nearly the identity and clips nothing; k * RMS(W) follows the weights'
    actual size. An all-zero tensor (RMS 0) gets alpha = k, any positive value being harmless.
    """
    _check_positive("k", k)
    w = _as_weight(w)
    rms = math.sqrt(_row_sum_squares_kernel(_rows_view(w)).sum() / w.size)
    if not math.isfinite(rms):
        raise NanoQ4Error("cannot compute a relative alpha: the weights hold NaN or Inf "
                          "(training diverged, lower the learning rate)")
    return float(k) * (rms if rms > 0 else 1.0)


# ----------------------------------------------------------------------------- int4 packing

# Two's-complement value of each 4-bit nibble 0..15: 0..7 stay, 8..15 mean -8..-1.
_NIBBLE_TO_CODE = np.array([0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1], dtype=np.int8)


def _as_flat_int8(codes, low, high):
    """Integer codes checked to lie in [low, high], as a flat C-contiguous int8 array."""
    codes = np.asarray(codes)
    if codes.dtype.kind not in "iu":
        raise ValueError(f"codes must be an integer array, got dtype {codes.dtype}")
    if codes.size and (codes.min() < low or codes.max() > high):
        raise ValueError(f"codes must lie in [{low}, {high}], "
                         f"got values in [{codes.min()}, {codes.max()}]")
    return np.ascontiguousarray(codes, dtype=np.int8).reshape(-1)


@njit(parallel=True, cache=True)
def _pack_int4_kernel(code_bytes):
    """Flat codes (their int8 bytes viewed as uint8) -> ceil(n/2) bytes, code 2i in the low
    nibble of byte i. The low 4 bits of a two's-complement byte are its two's-complement nibble."""
    n = code_bytes.size
    packed = np.empty((n + 1) // 2, dtype=np.uint8)
    for i in prange(n // 2):
        packed[i] = (code_bytes[2 * i] & 0xF) | ((code_bytes[2 * i + 1] & 0xF) << 4)
    if n % 2:
        packed[n // 2] = code_bytes[n - 1] & 0xF
    return packed


def _pack_int4_reference(codes):
    """NumPy twin of _pack_int4_kernel (takes the int8 codes)."""
    nibbles = np.asarray(codes, dtype=np.int8).reshape(-1).view(np.uint8) & 0xF
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return nibbles[0::2] | (nibbles[1::2] << 4)


@njit(parallel=True, cache=True)
def _unpack_int4_kernel(packed, n):
    """ceil(n/2) packed bytes -> n sign-extended int8 codes (inverse of _pack_int4_kernel)."""
    codes = np.empty(n, dtype=np.int8)
    for i in prange(n // 2):
        codes[2 * i] = _NIBBLE_TO_CODE[packed[i] & 0xF]
        codes[2 * i + 1] = _NIBBLE_TO_CODE[packed[i] >> 4]
    if n % 2:
        codes[n - 1] = _NIBBLE_TO_CODE[packed[n // 2] & 0xF]
    return codes


def _unpack_int4_reference(packed, n):
    """NumPy twin of _unpack_int4_kernel."""
    nibbles = np.empty(2 * packed.size, dtype=np.int8)
    nibbles[0::2] = packed & 0xF
    nibbles[1::2] = packed >> 4
    nibbles = nibbles[:n]
    return np.where(nibbles > 7, nibbles - 16, nibbles).astype(np.int8)


def _as_packed(packed, n_bytes, what):
    packed = np.ascontiguousarray(packed).reshape(-1)
    if packed.dtype != np.uint8 or packed.size != n_bytes:
        raise ValueError(f"{what} needs {n_bytes} uint8 bytes, "
                         f"got {packed.size} of dtype {packed.dtype}")
    return packed


def pack_int4(codes) -> np.ndarray:
    """Any-shape integer codes in [-8, 7] -> flat uint8 of length ceil(n/2) (nibble order in
    the module docstring). The shape is the caller's to store."""
    return _pack_int4_kernel(_as_flat_int8(codes, -8, 7).view(np.uint8))


def unpack_int4(packed, n) -> np.ndarray:
    """The first n codes of pack_int4's output, as a flat int8 array."""
    n = int(n)
    if n < 0:
        raise ValueError(f"the number of codes must be >= 0, got {n}")
    return _unpack_int4_kernel(_as_packed(packed, (n + 1) // 2, f"unpacking {n} int4 codes"), n)


def pack_codes(codes, bits) -> np.ndarray:
    """Flat uint8 storage of b-bit codes: two per byte for bits <= 4, else one int8 byte each."""
    qmax(bits)  # refuses bits outside 2..8
    if bits <= 4:
        return pack_int4(codes)
    return _as_flat_int8(codes, -128, 127).view(np.uint8).copy()


def unpack_codes(packed, n, bits) -> np.ndarray:
    """Inverse of pack_codes: n flat int8 codes."""
    qmax(bits)  # refuses bits outside 2..8
    if bits <= 4:
        return unpack_int4(packed, n)
    return _as_packed(packed, int(n), f"unpacking {n} {bits}-bit codes").view(np.int8).copy()


# ----------------------------------------------------------------------------- grid statistics

def grid_stats(codes, bits=4, prev_codes=None) -> dict:
    """How a layer uses its grid: distinct levels in use out of 2*qmax+1, the fraction of codes
    at +-qmax (saturation), and the fraction changed since prev_codes (None without them)."""
    q = qmax(bits)
    flat = _as_flat_int8(codes, -q, q)
    if flat.size == 0:
        raise ValueError("grid_stats needs at least one code")
    counts = np.bincount(flat.astype(np.intp) + q, minlength=2 * q + 1)
    flip_rate = None
    if prev_codes is not None:
        if np.shape(prev_codes) != np.shape(codes):
            raise ValueError(f"prev_codes of shape {np.shape(prev_codes)} do not match "
                             f"codes of shape {np.shape(codes)}")
        flip_rate = float(np.count_nonzero(flat != _as_flat_int8(prev_codes, -q, q)) / flat.size)
    return {
        "levels_used": int(np.count_nonzero(counts)),
        "levels_total": 2 * q + 1,
        "frac_at_max": float((counts[0] + counts[-1]) / flat.size),
        "flip_rate": flip_rate,
    }
