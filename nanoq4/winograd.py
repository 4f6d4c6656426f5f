"""Winograd F(4x4, 3x3) convolution for 3x3 / stride 1 / padding 1 layers (Lavin & Gray, 2015).

Why: im2col + GEMM spends 9 * Cin * Cout multiply-adds per output pixel. Winograd computes a
4x4 block of outputs from the 6x6 input window around it with 36 elementwise products per
(Cin, Cout) pair, i.e. 2.25 * Cin * Cout per pixel (4x fewer than im2col, 1.78x fewer than the
2x2 blocks of F(2x2, 3x3) with their 4 per pixel), at the price of three cheap linear transforms:

    Y = A^T [ (G g G^T) * (B^T d B) ] A        per tile, summed over input channels

The points. F(4x4, 3x3) multiplies two polynomials of degrees 3 and 2 by evaluating them at
4 + 3 - 1 = 6 points; these are 0, 1, -1, 2, -2 and infinity (the leading coefficient): the
integers of smallest magnitude, which keep the coefficients small. B^T (6x6) then has entries up
to 5, G (6x3) the fractions 1/4, 1/6, 1/12, 1/24, and A^T (4x6) the powers of two up to 8 (the
matrices below).

The float32 trade-off. Those coefficients amplify rounding: each transformed value is a signed sum
of up to 36 values with weights up to 25 (B) and 64 (A), where F(2x2)'s B and A hold only 0 and
+-1, so the float32 result carries more rounding error than F(2x2) or a direct sum, relative to
the output's scale. tests/test_winograd.py bounds it against float64 at VGG4bit's shapes; it stays
orders of magnitude below a 4-bit weight step (1/14 of the weight range). U is computed in
float64 and rounded once, so the fractions of G add no error of their own. Larger tiles lose
too many bits in float32 (F(6x6, 3x3) needs 8 points, so +-1/2 and +-3 or worse); F(4x4) is the
usual compromise.

Layouts (NHWC activations, (Cout, 3, 3, Cin) weights, as in nanoq4.ops):
  tiles  T = N * ceil(H/4) * ceil(W/4), numbered (image, tile row, tile column) row-major;
         tile (ti, tj) reads input rows 4ti-1 .. 4ti+4 and columns 4tj-1 .. 4tj+4 (the -1 is the
         zero padding) and produces output rows 4ti .. 4ti+3 and columns 4tj .. 4tj+3. Any H, W
         work: reads beyond the image are zeros, writes beyond it are dropped.
  V = B^T d B   (36, T, Cin)    transformed input, k = 6 * row + column of the 6x6 window
  U = G g G^T   (36, Cout, Cin) transformed weights
  M = V @ U^T   (36, T, Cout)   36 independent GEMMs, one per position k
  y = A^T M A   (N, H, W, Cout)
V, U and M are (36, rows, C) views of arrays stored with the position in the middle, (T, 36, C)
and (Cout, 36, Cin): each V[k] is a (T, C) matrix with row stride 36 * C and unit column stride,
which BLAS reads (and, for M, writes) in place, and a transform kernel writes one tile's 36 * C
values as one contiguous run. Stored position-major, (36, T, C), the 36 streams of a tile lie
4 * T * C bytes apart, alias in the L1 cache, and the input transform ran 2.5-5x slower at
VGG4bit's shapes.

Backward is the adjoint of each step, in reverse: dM = A dY A^T, then dU = dM^T @ V and
dV = dM @ U (36 GEMMs each), dw = G^T dU G and dx = the sum of B dV B^T over the overlapping
input windows. Computing dx this way shares dM with dw, so backward transforms grad_y once.

What forward keeps for backward: (x, U). U is small and independent of the batch (36 * Cin * Cout
floats: 18.3 MB for the five Winograd layers of VGG4bit), so backward reuses it instead of
transforming w again. V is not kept: it is 2.25x the size of x (6x6 windows every 4 pixels), so
keeping it would hold 321 MB more for VGG4bit at batch 256 against a 1 GB memory budget.
Backward recomputes V chunk by chunk from x (which the graph holds anyway): one more input
transform per chunk, a streaming pass over x with no GEMM work.

The batch runs in chunks of images whose V and M take ~CHUNK_BYTES (and hold at least
MIN_CHUNK_TILES tiles, so the GEMMs have enough rows), so the transforms and the GEMMs hand each
other cache-resident data and memory stays flat at any batch size. The chunks run on worker
threads, one per core, as parallel.py schedules them (that module explains why, and holds BLAS to
one thread meanwhile). Backward sums dU over the chunks by parallel.summing_groups, so that its
bits do not depend on which thread took which chunk: each group of consecutive chunks adds its
chunks' dU in order into its own (36, Cout, Cin) sum, and the groups' sums are added in group
order. With two groups per thread that is, for VGG4bit's 256 x 256-channel layer on 2 threads,
four sums of 9.4 MB where one sum per thread made two, and three additions of them instead of
one. Backward's chunks hold at least twice the bytes of that sum, so reading and writing it per
chunk stays a small share of the work. Backward's 72 GEMMs per chunk run in one Numba call to
OpenBLAS's CBLAS GEMM (backward_gemms): dU accumulates inside the GEMM (beta = 1) instead of through a scratch product
and a second pass to add it, and dV[k] = dM[k] @ U[k] follows dU[k] while dM[k] is in cache.

Transform kernels loop over tiles (`prange`: parallel when called from the main thread, serial
in a worker) with a loop over the channels innermost, which LLVM vectorizes. The two kernels that
write V or dM (36 values per tile and channel, from a 6x6 or 4x4 window of NHWC) run each 2-D
transform as two 1-D passes through a small per-tile scratch, first the window's columns, then
its 6 rows, each pass reading and writing 6 values per channel: written as one loop body with all
36 stores, LLVM left them scalar and they ran 3-5x slower. The output transform and the input
transform's adjoint vectorize as one body. `prange` matters even serially: Numba compiles a parfor body
with its arrays marked non-aliasing, which is what lets LLVM vectorize (a plain @njit version runs
several times slower). Window positions outside the image are read from a clamped in-bounds
index and multiplied by a 0/1 mask, which keeps the inner loops free of branches. Every kernel
has a plain-NumPy `*_reference` twin that spells the same transform with the explicit matrices
B^T, G, A^T below.
"""
import numpy as np
from numba import njit, prange

from . import parallel
from .parallel import NO_TRANS, ROW_MAJOR, TRANS

# The transform matrices of F(4x4, 3x3), points 0, 1, -1, 2, -2, infinity; the kernels below
# hard-code their products.
BT = np.array([[4, 0, -5, 0, 1, 0],
               [0, -4, -4, 1, 1, 0],
               [0, 4, -4, -1, 1, 0],
               [0, -2, -1, 2, 1, 0],
               [0, 2, -1, -2, 1, 0],
               [0, 4, 0, -5, 0, 1]], dtype=np.float64)
G = np.array([[1 / 4, 0, 0],
              [-1 / 6, -1 / 6, -1 / 6],
              [-1 / 6, 1 / 6, -1 / 6],
              [1 / 24, 1 / 12, 1 / 6],
              [1 / 24, -1 / 12, 1 / 6],
              [0, 0, 1]], dtype=np.float64)
AT = np.array([[1, 1, 1, 1, 1, 0],
               [0, 1, -1, 2, -2, 0],
               [0, 1, 1, 4, 4, 0],
               [0, 1, -1, 8, -8, 1]], dtype=np.float64)

TILE = 4                # output rows and columns per tile
WINDOW = TILE + 2       # input rows and columns per tile (3x3 kernel)
POSITIONS = WINDOW ** 2  # elementwise products per tile and (Cin, Cout) pair: 36 GEMMs

# V + M of one chunk of images (two chunks are live at once, one per thread, next to whatever
# else shares the L3), and the fewest tiles per chunk: the tiles are the rows of the forward
# GEMMs and the reduction length of the dU GEMMs, and BLAS runs short ones poorly.
CHUNK_BYTES = 2 << 20
MIN_CHUNK_TILES = 128


def tile_grid(h, w):
    """Number of 4x4 output tiles along H and W (the last ones reach past the image unless 4 divides)."""
    return -(-h // TILE), -(-w // TILE)


# ----------------------------------------------------------------------------- 1-D transforms
# The 2-D transforms apply a 1-D transform to the columns, then to the rows, of a 6x6 (or 4x4,
# 3x3) tile. Tuples of scalars stay in registers; inline="always" lets LLVM see one loop body.
# The integer coefficients come in as arguments of the data's dtype: a Python literal would
# turn float32 arithmetic into float64.

@njit(inline="always")
def _bt6(d, two, four, five):
    """B^T d for a 6-vector d (input transform)."""
    d0, d1, d2, d3, d4, d5 = d
    a, b = d4 - four * d2, d3 - four * d1
    c, e = d4 - d2, two * (d3 - d1)
    return four * d0 - five * d2 + d4, a + b, a - b, c + e, c - e, four * d1 - five * d3 + d5


@njit(inline="always")
def _b6_overlap_add(v, before, after, m_before, m_after, two, four, five):
    """The four in-tile outputs 4p .. 4p+3 of the 1-D input-transform adjoint B v of window p
    (which covers rows 4p-1 .. 4p+4), overlap-added with the neighbouring windows: window p-1
    adds its last output (B v)[5] = v5 to row 4p (`before`), window p+1 its first output
    (B v)[0] = 4 v0 to row 4p+3 (`after` = that v0); m_* = 0 at the border."""
    v0, v1, v2, v3, v4, v5 = v
    s12, d12, s34, d34 = v1 + v2, v1 - v2, v3 + v4, v3 - v4
    return (four * (v5 - d12) - two * d34 + m_before * before,
            -five * v0 - four * s12 - s34,
            d12 + two * d34 - five * v5,
            v0 + s12 + s34 + four * (m_after * after))


@njit(inline="always")
def _g6(g):
    """G g for a 3-vector g (weight transform), in float64."""
    g0, g1, g2 = np.float64(g[0]), np.float64(g[1]), np.float64(g[2])
    a, b, c = g0 + g2, g0 / 24 + g2 / 6, g1 / 12
    return g0 / 4, -(a + g1) / 6, -(a - g1) / 6, b + c, b - c, g2


@njit(inline="always")
def _gt6(u):
    """G^T u for a 6-vector u (adjoint of the weight transform), in float64."""
    u0, u1, u2 = np.float64(u[0]), np.float64(u[1]), np.float64(u[2])
    u3, u4, u5 = np.float64(u[3]), np.float64(u[4]), np.float64(u[5])
    s12, d12, s34, d34 = u1 + u2, u1 - u2, u3 + u4, u3 - u4
    return u0 / 4 - s12 / 6 + s34 / 24, d34 / 12 - d12 / 6, (s34 - s12) / 6 + u5


@njit(inline="always")
def _at6(m, two, four, eight):
    """A^T m for a 6-vector m (output transform)."""
    m0, m1, m2, m3, m4, m5 = m
    s12, d12, s34, d34 = m1 + m2, m1 - m2, m3 + m4, m3 - m4
    return m0 + s12 + s34, d12 + two * d34, s12 + four * s34, d12 + eight * d34 + m5


@njit(inline="always")
def _a6(g, two, four, eight):
    """A g for a 4-vector g (adjoint of the output transform)."""
    g0, g1, g2, g3 = g
    even, odd = g0 + g2, g1 + g3
    even4, odd4 = g0 + four * g2, two * g1 + eight * g3
    return g0, even + odd, even - odd, even4 + odd4, even4 - odd4, g3


# ----------------------------------------------------------------------------- tile helpers

@njit(inline="always")
def _window_index(start, size):
    """Six indices start .. start+5 of a tile's input rows (or columns), clamped into the image."""
    return (min(max(start, 0), size - 1), min(start + 1, size - 1), min(start + 2, size - 1),
            min(start + 3, size - 1), min(start + 4, size - 1), min(start + 5, size - 1))


@njit(inline="always")
def _window_mask(start, size, one):
    """0/1 masks of the same six positions: 0 where the window reaches into the padding."""
    zero = one - one
    return (one if start >= 0 else zero, one if start + 1 < size else zero,
            one if start + 2 < size else zero, one if start + 3 < size else zero,
            one if start + 4 < size else zero, one if start + 5 < size else zero)


@njit(inline="always")
def _block_index(start, size):
    """Four indices start .. start+3 of a tile's output rows (or columns), clamped into the image."""
    return start, min(start + 1, size - 1), min(start + 2, size - 1), min(start + 3, size - 1)


@njit(inline="always")
def _block_mask(start, size, one):
    """0/1 masks of the same four positions: 0 beyond the image, where the last tile is cropped."""
    zero = one - one
    return (one, one if start + 1 < size else zero, one if start + 2 < size else zero,
            one if start + 3 < size else zero)


@njit(inline="always")
def _positions(a, first, step, t, ch):
    """Six transform positions first, first + step, ... of one tile (or output channel) and
    channel of a (T, 36, C) storage array: step 6 walks a column of the 6x6 window
    (k = 6 * row + column), step 1 a row."""
    return (a[t, first, ch], a[t, first + step, ch], a[t, first + 2 * step, ch],
            a[t, first + 3 * step, ch], a[t, first + 4 * step, ch], a[t, first + 5 * step, ch])


@njit(inline="always")
def _store_row(a, row, t, ch, values):
    """Six values into positions 6 * row .. 6 * row + 5 of a (T, 36, C) (or (Cout, 36, Cin))
    storage array: for one tile they are 6 consecutive runs of C values."""
    k = 6 * row
    a[t, k, ch], a[t, k + 1, ch], a[t, k + 2, ch], a[t, k + 3, ch], a[t, k + 4, ch], a[t, k + 5, ch] = values


@njit(inline="always")
def _store_column(a, j, ch, values):
    """Six values into rows 0 .. 5 of column j of a per-tile scratch (6, columns, C)."""
    a[0, j, ch], a[1, j, ch], a[2, j, ch], a[3, j, ch], a[4, j, ch], a[5, j, ch] = values


@njit(inline="always")
def _row6(a, i, ch):
    """Row i of a per-tile scratch (6, 6, C) at one channel."""
    return a[i, 0, ch], a[i, 1, ch], a[i, 2, ch], a[i, 3, ch], a[i, 4, ch], a[i, 5, ch]


@njit(inline="always")
def _row4(a, i, ch):
    """Row i of a per-tile scratch (6, 4, C) at one channel."""
    return a[i, 0, ch], a[i, 1, ch], a[i, 2, ch], a[i, 3, ch]


@njit(inline="always")
def _store_block(a, b, rows, cols, ch, b0, b1, b2, b3):
    """A 4x4 block (rows b0 .. b3 of 4 values) into NHWC `a` at clamped rows and columns. A
    position outside the image was clamped onto an in-image one of this block with a smaller
    index; writing from the last position backwards lets the in-image value land last."""
    r0, r1, r2, r3 = rows
    c0, c1, c2, c3 = cols
    a[b, r3, c3, ch], a[b, r3, c2, ch], a[b, r3, c1, ch], a[b, r3, c0, ch] = b3[3], b3[2], b3[1], b3[0]
    a[b, r2, c3, ch], a[b, r2, c2, ch], a[b, r2, c1, ch], a[b, r2, c0, ch] = b2[3], b2[2], b2[1], b2[0]
    a[b, r1, c3, ch], a[b, r1, c2, ch], a[b, r1, c1, ch], a[b, r1, c0, ch] = b1[3], b1[2], b1[1], b1[0]
    a[b, r0, c3, ch], a[b, r0, c2, ch], a[b, r0, c1, ch], a[b, r0, c0, ch] = b0[3], b0[2], b0[1], b0[0]


# ----------------------------------------------------------------------------- storage
# Transformed arrays are stored (rows, 36, C) and handed around as (36, rows, C) views (the
# module docstring says why).

def _position_major(storage):
    """The (36, rows, C) view of a (rows, 36, C) storage array."""
    return storage.transpose(1, 0, 2)


def _storage(a, out=False):
    """The (rows, 36, C) storage behind a (36, rows, C) view. An array stored otherwise is copied
    into that layout when it is read (`out` False) and refused when a kernel is to write it."""
    storage = a.transpose(1, 0, 2)
    if storage.flags.c_contiguous:
        return storage
    if out:
        raise ValueError("winograd: `out` must be a (36, T, C) view of (T, 36, C) storage, "
                         "as _buffer and the transforms make")
    return np.ascontiguousarray(storage)


def _position_major_empty(rows, channels, dtype):
    return _position_major(np.empty((rows, POSITIONS, channels), dtype=dtype))


# ----------------------------------------------------------------------------- input transform

@njit(parallel=True, nogil=True, cache=True)
def _input_transform_kernel(x, one, v):
    n, h, w, c = x.shape
    th, tw = (h + 3) // 4, (w + 3) // 4
    two = one + one
    four, five = two + two, two + two + one
    for t in prange(n * th * tw):
        b, ti, tj = t // (th * tw), (t // tw) % th, t % tw
        r0, r1, r2, r3, r4, r5 = _window_index(4 * ti - 1, h)
        m0, m1, m2, m3, m4, m5 = _window_mask(4 * ti - 1, h, one)
        cols, col_mask = _window_index(4 * tj - 1, w), _window_mask(4 * tj - 1, w, one)
        half = np.empty((WINDOW, WINDOW, c), dtype=v.dtype)  # B^T d: [row k, window column, channel]
        for j in range(WINDOW):
            col, mc = cols[j], col_mask[j]
            # B^T d: transform the 6 rows of window column j (padding read as 0) ...
            for ch in range(c):
                _store_column(half, j, ch, _bt6((x[b, r0, col, ch] * (m0 * mc), x[b, r1, col, ch] * (m1 * mc),
                                                 x[b, r2, col, ch] * (m2 * mc), x[b, r3, col, ch] * (m3 * mc),
                                                 x[b, r4, col, ch] * (m4 * mc), x[b, r5, col, ch] * (m5 * mc)),
                                                two, four, five))
        for i in range(WINDOW):
            # ... then (B^T d) B: transform the 6 columns of each row
            for ch in range(c):
                _store_row(v, i, t, ch, _bt6(_row6(half, i, ch), two, four, five))


def input_transform(x, out=None):
    """V = B^T d B of every 6x6 input window: (N, H, W, C) -> (36, T, C), padding 1 built in."""
    n, h, w, c = x.shape
    th, tw = tile_grid(h, w)
    v = _position_major_empty(n * th * tw, c, x.dtype) if out is None else out
    _input_transform_kernel(np.ascontiguousarray(x), x.dtype.type(1), _storage(v, out=True))
    return v


def _windows_reference(x):
    """(N, H, W, C) -> (N, th, tw, 6, 6, C): the zero-padded 6x6 input window of every tile."""
    n, h, w, c = x.shape
    th, tw = tile_grid(h, w)
    xp = np.zeros((n, 4 * th + 2, 4 * tw + 2, c), dtype=x.dtype)
    xp[:, 1:h + 1, 1:w + 1] = x
    return np.stack([np.stack([xp[:, r:r + 4 * th:4, s:s + 4 * tw:4] for s in range(6)], axis=3)
                     for r in range(6)], axis=3)


def input_transform_reference(x):
    c = x.shape[3]
    bt = BT.astype(x.dtype)
    v = np.einsum("ra,ntuabc,sb->rsntuc", bt, _windows_reference(x), bt)
    return v.reshape(POSITIONS, -1, c)


@njit(parallel=True, nogil=True, cache=True)
def _input_transform_adjoint_kernel(dv, one, dx):
    n, h, w, c = dx.shape
    th, tw = (h + 3) // 4, (w + 3) // 4
    zero = one - one
    two = one + one
    four, five = two + two, two + two + one
    for t in prange(n * th * tw):  # one 4x4 block of dx per tile: a gather, so no write races
        b, ti, tj = t // (th * tw), (t // tw) % th, t % tw
        # neighbouring tiles, clamped onto this one (and masked out) at the image border
        up, down, left, right = min(ti, 1), min(th - 1 - ti, 1), min(tj, 1), min(tw - 1 - tj, 1)
        tu, td, tl, tr = t - tw * up, t + tw * down, t - left, t + right
        tul, tdl, tur, tdr = tu - left, td - left, tu + right, td + right
        mu = one if up else zero
        md = one if down else zero
        ml = one if left else zero
        mr = one if right else zero
        rows, cols = _block_index(4 * ti, h), _block_index(4 * tj, w)
        for ch in range(c):
            # B dV along each window column, overlap-added with the tiles above (their last row,
            # k = 30 + column) and below (their first row, k = column): rows 4ti .. 4ti+3 of this
            # tile's 6 columns, of the left tile's last column and of the right tile's first
            # column (the only columns of those tiles that reach this 4x4 block) ...
            p0 = _b6_overlap_add(_positions(dv, 0, 6, t, ch), dv[tu, 30, ch], dv[td, 0, ch], mu, md, two, four, five)
            p1 = _b6_overlap_add(_positions(dv, 1, 6, t, ch), dv[tu, 31, ch], dv[td, 1, ch], mu, md, two, four, five)
            p2 = _b6_overlap_add(_positions(dv, 2, 6, t, ch), dv[tu, 32, ch], dv[td, 2, ch], mu, md, two, four, five)
            p3 = _b6_overlap_add(_positions(dv, 3, 6, t, ch), dv[tu, 33, ch], dv[td, 3, ch], mu, md, two, four, five)
            p4 = _b6_overlap_add(_positions(dv, 4, 6, t, ch), dv[tu, 34, ch], dv[td, 4, ch], mu, md, two, four, five)
            p5 = _b6_overlap_add(_positions(dv, 5, 6, t, ch), dv[tu, 35, ch], dv[td, 5, ch], mu, md, two, four, five)
            p_left = _b6_overlap_add(_positions(dv, 5, 6, tl, ch), dv[tul, 35, ch], dv[tdl, 5, ch],
                                     mu, md, two, four, five)
            p_right = _b6_overlap_add(_positions(dv, 0, 6, tr, ch), dv[tur, 30, ch], dv[tdr, 0, ch],
                                      mu, md, two, four, five)
            # ... then the same along each of the 4 rows
            _store_block(dx, b, rows, cols, ch,
                         _b6_overlap_add((p0[0], p1[0], p2[0], p3[0], p4[0], p5[0]), p_left[0], p_right[0],
                                         ml, mr, two, four, five),
                         _b6_overlap_add((p0[1], p1[1], p2[1], p3[1], p4[1], p5[1]), p_left[1], p_right[1],
                                         ml, mr, two, four, five),
                         _b6_overlap_add((p0[2], p1[2], p2[2], p3[2], p4[2], p5[2]), p_left[2], p_right[2],
                                         ml, mr, two, four, five),
                         _b6_overlap_add((p0[3], p1[3], p2[3], p3[3], p4[3], p5[3]), p_left[3], p_right[3],
                                         ml, mr, two, four, five))


def input_transform_adjoint(dv, x_shape, out=None):
    """dx = sum over tiles of B dV B^T added into each tile's 6x6 input window, the padding
    dropped: (36, T, C) -> x_shape (N, H, W, C). Writes every element of `out` when given."""
    dx = np.empty(x_shape, dtype=dv.dtype) if out is None else out
    _input_transform_adjoint_kernel(_storage(dv), dv.dtype.type(1), dx)
    return dx


def input_transform_adjoint_reference(dv, x_shape):
    n, h, w, c = x_shape
    th, tw = tile_grid(h, w)
    b = BT.T.astype(dv.dtype)
    windows = np.einsum("ar,rsntuc,bs->ntuabc", b, dv.reshape(6, 6, n, th, tw, c), b)
    dxp = np.zeros((n, 4 * th + 2, 4 * tw + 2, c), dtype=dv.dtype)
    for r in range(6):
        for s in range(6):
            dxp[:, r:r + 4 * th:4, s:s + 4 * tw:4] += windows[:, :, :, r, s]
    return dxp[:, 1:h + 1, 1:w + 1]


# ----------------------------------------------------------------------------- weight transform
# Once per pass over Cout * Cin kernels, so the arithmetic runs in float64 (_g6 and _gt6 convert
# their inputs) and each result is rounded once when stored.

@njit(parallel=True, nogil=True, cache=True)
def _weight_transform_kernel(w, u):
    cout, _, _, cin = w.shape
    for co in prange(cout):
        for ci in range(cin):
            # G g: transform the 3 rows of each kernel column ...
            p0 = _g6((w[co, 0, 0, ci], w[co, 1, 0, ci], w[co, 2, 0, ci]))
            p1 = _g6((w[co, 0, 1, ci], w[co, 1, 1, ci], w[co, 2, 1, ci]))
            p2 = _g6((w[co, 0, 2, ci], w[co, 1, 2, ci], w[co, 2, 2, ci]))
            # ... then (G g) G^T row by row
            _store_row(u, 0, co, ci, _g6((p0[0], p1[0], p2[0])))
            _store_row(u, 1, co, ci, _g6((p0[1], p1[1], p2[1])))
            _store_row(u, 2, co, ci, _g6((p0[2], p1[2], p2[2])))
            _store_row(u, 3, co, ci, _g6((p0[3], p1[3], p2[3])))
            _store_row(u, 4, co, ci, _g6((p0[4], p1[4], p2[4])))
            _store_row(u, 5, co, ci, _g6((p0[5], p1[5], p2[5])))


def weight_transform(w):
    """U = G g G^T of every 3x3 kernel: (Cout, 3, 3, Cin) -> (36, Cout, Cin). Cin stays the
    fastest axis, as in w, so this is a streaming pass; the forward GEMM for position k reads
    U[k] transposed, V[k] (T, Cin) @ U[k].T (Cin, Cout), which BLAS does without a copy."""
    cout, _, _, cin = w.shape
    u = _position_major_empty(cout, cin, w.dtype)
    _weight_transform_kernel(np.ascontiguousarray(w), _storage(u, out=True))
    return u


def weight_transform_reference(w):
    u = np.einsum("ra,oabi,sb->rsoi", G, w.astype(np.float64), G)
    return u.reshape(POSITIONS, w.shape[0], w.shape[3]).astype(w.dtype)


@njit(parallel=True, nogil=True, cache=True)
def _weight_transform_adjoint_kernel(du, dw):
    cout, _, _, cin = dw.shape
    for co in prange(cout):
        for ci in range(cin):
            # G^T dU: transform the 6 rows of each column ...
            p0 = _gt6(_positions(du, 0, 6, co, ci))
            p1 = _gt6(_positions(du, 1, 6, co, ci))
            p2 = _gt6(_positions(du, 2, 6, co, ci))
            p3 = _gt6(_positions(du, 3, 6, co, ci))
            p4 = _gt6(_positions(du, 4, 6, co, ci))
            p5 = _gt6(_positions(du, 5, 6, co, ci))
            # ... then (G^T dU) G row by row
            dw[co, 0, 0, ci], dw[co, 0, 1, ci], dw[co, 0, 2, ci] = _gt6((p0[0], p1[0], p2[0], p3[0], p4[0], p5[0]))
            dw[co, 1, 0, ci], dw[co, 1, 1, ci], dw[co, 1, 2, ci] = _gt6((p0[1], p1[1], p2[1], p3[1], p4[1], p5[1]))
            dw[co, 2, 0, ci], dw[co, 2, 1, ci], dw[co, 2, 2, ci] = _gt6((p0[2], p1[2], p2[2], p3[2], p4[2], p5[2]))


def weight_transform_adjoint(du):
    """dw = G^T dU G: (36, Cout, Cin) -> (Cout, 3, 3, Cin), the adjoint of weight_transform."""
    _, cout, cin = du.shape
    dw = np.empty((cout, 3, 3, cin), dtype=du.dtype)
    _weight_transform_adjoint_kernel(_storage(du), dw)
    return dw


def weight_transform_adjoint_reference(du):
    _, cout, cin = du.shape
    dw = np.einsum("ra,rsoi,sb->oabi", G, du.reshape(6, 6, cout, cin).astype(np.float64), G)
    return dw.astype(du.dtype)


# ----------------------------------------------------------------------------- output transform

@njit(parallel=True, nogil=True, cache=True)
def _output_transform_kernel(m, one, y):
    n, h, w, c = y.shape
    th, tw = (h + 3) // 4, (w + 3) // 4
    two = one + one
    four = two + two
    eight = four + four
    for t in prange(n * th * tw):
        b, ti, tj = t // (th * tw), (t // tw) % th, t % tw
        rows, cols = _block_index(4 * ti, h), _block_index(4 * tj, w)
        for ch in range(c):
            # A^T M: transform the 6 rows of each column ...
            p0 = _at6(_positions(m, 0, 6, t, ch), two, four, eight)
            p1 = _at6(_positions(m, 1, 6, t, ch), two, four, eight)
            p2 = _at6(_positions(m, 2, 6, t, ch), two, four, eight)
            p3 = _at6(_positions(m, 3, 6, t, ch), two, four, eight)
            p4 = _at6(_positions(m, 4, 6, t, ch), two, four, eight)
            p5 = _at6(_positions(m, 5, 6, t, ch), two, four, eight)
            # ... then (A^T M) A: output rows 4ti .. 4ti+3
            _store_block(y, b, rows, cols, ch,
                         _at6((p0[0], p1[0], p2[0], p3[0], p4[0], p5[0]), two, four, eight),
                         _at6((p0[1], p1[1], p2[1], p3[1], p4[1], p5[1]), two, four, eight),
                         _at6((p0[2], p1[2], p2[2], p3[2], p4[2], p5[2]), two, four, eight),
                         _at6((p0[3], p1[3], p2[3], p3[3], p4[3], p5[3]), two, four, eight))


def output_transform(m, out):
    """Y = A^T M A of every tile into the NHWC array `out` (N, H, W, Cout); M is (36, T, Cout)."""
    _output_transform_kernel(_storage(m), m.dtype.type(1), out)
    return out


def output_transform_reference(m, y_shape):
    n, h, w, c = y_shape
    th, tw = tile_grid(h, w)
    at = AT.astype(m.dtype)
    y = np.einsum("ar,rsntuc,bs->ntaubc", at, m.reshape(6, 6, n, th, tw, c), at)
    return y.reshape(n, 4 * th, 4 * tw, c)[:, :h, :w]


@njit(parallel=True, nogil=True, cache=True)
def _output_transform_adjoint_kernel(g, one, dm):
    n, h, w, c = g.shape
    th, tw = (h + 3) // 4, (w + 3) // 4
    two = one + one
    four = two + two
    eight = four + four
    for t in prange(n * th * tw):
        b, ti, tj = t // (th * tw), (t // tw) % th, t % tw
        r0, r1, r2, r3 = _block_index(4 * ti, h)  # outputs cropped away: zero gradient
        m0, m1, m2, m3 = _block_mask(4 * ti, h, one)
        cols, col_mask = _block_index(4 * tj, w), _block_mask(4 * tj, w, one)
        half = np.empty((WINDOW, TILE, c), dtype=dm.dtype)  # A g: [row k, block column, channel]
        for j in range(TILE):
            col, mc = cols[j], col_mask[j]
            # A g: column j of the 4x4 gradient block becomes 6 rows ...
            for ch in range(c):
                _store_column(half, j, ch, _a6((g[b, r0, col, ch] * (m0 * mc), g[b, r1, col, ch] * (m1 * mc),
                                                g[b, r2, col, ch] * (m2 * mc), g[b, r3, col, ch] * (m3 * mc)),
                                               two, four, eight))
        for i in range(WINDOW):
            # ... then (A g) A^T row by row
            for ch in range(c):
                _store_row(dm, i, t, ch, _a6(_row4(half, i, ch), two, four, eight))


def output_transform_adjoint(g, out=None):
    """dM = A dY A^T of every 4x4 gradient block: (N, H, W, Cout) -> (36, T, Cout)."""
    n, h, w, c = g.shape
    th, tw = tile_grid(h, w)
    dm = _position_major_empty(n * th * tw, c, g.dtype) if out is None else out
    _output_transform_adjoint_kernel(np.ascontiguousarray(g), g.dtype.type(1), _storage(dm, out=True))
    return dm


def output_transform_adjoint_reference(g):
    n, h, w, c = g.shape
    th, tw = tile_grid(h, w)
    gp = np.zeros((n, 4 * th, 4 * tw, c), dtype=g.dtype)
    gp[:, :h, :w] = g
    a = AT.T.astype(g.dtype)
    dm = np.einsum("ra,ntaubc,sb->rsntuc", a, gp.reshape(n, th, 4, tw, 4, c), a)
    return dm.reshape(POSITIONS, -1, c)


# ----------------------------------------------------------------------------- convolution

def _float_dtype(*arrays):
    """The common dtype of the operands, float32 or float64 (float32 stays float32)."""
    dtype = np.result_type(*arrays)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"conv3x3: float32 or float64 expected, got {[a.dtype for a in arrays]}")
    return dtype


def _check_shapes(x_shape, w_shape):
    if len(x_shape) != 4 or len(w_shape) != 4 or tuple(w_shape[1:3]) != (3, 3):
        raise ValueError(f"conv3x3: expected x (N, H, W, Cin) and w (Cout, 3, 3, Cin), "
                         f"got x {tuple(x_shape)}, w {tuple(w_shape)}")
    if x_shape[3] != w_shape[3]:
        raise ValueError(f"conv3x3: input has {x_shape[3]} channels, weight expects {w_shape[3]}")


def _chunks(n, h, w, channels, itemsize, chunk_bytes, threads):
    """(first image, end image, tiles) of each chunk: about `chunk_bytes` of transformed data
    (36, tiles, channels) per chunk but at least MIN_CHUNK_TILES tiles, at least one image, and
    at least one chunk per thread."""
    th, tw = tile_grid(h, w)
    image_bytes = POSITIONS * th * tw * channels * itemsize
    chunk_bytes = max(chunk_bytes, -(-MIN_CHUNK_TILES // (th * tw)) * image_bytes)
    return [(s, e, (e - s) * th * tw) for s, e in parallel.split(n, image_bytes, chunk_bytes, threads)]


def _buffer(flat, tiles, channels):
    """A (36, tiles, channels) view of (tiles, 36, channels) storage at the front of a flat
    scratch buffer: every V[k] / M[k] handed to BLAS is a 2-D matrix with unit column stride,
    which np.matmul passes to BLAS without a copy."""
    return _position_major(flat[:POSITIONS * tiles * channels].reshape(tiles, POSITIONS, channels))


def conv3x3_forward(x, w, keep_for_backward=True, chunk_bytes=CHUNK_BYTES):
    """y = conv(x, w), 3x3, stride 1, zero padding 1, by Winograd F(4x4, 3x3).

    x (N, H, W, Cin), w (Cout, 3, 3, Cin) -> y (N, H, W, Cout), same float dtype. Returns
    (y, saved): saved = (x, U) is what conv3x3_backward needs (x to recompute V for dw, the
    transformed weights U (36, Cout, Cin) for dx), or None when keep_for_backward is False.
    """
    _check_shapes(x.shape, w.shape)
    dtype = _float_dtype(x, w)
    x, w = np.ascontiguousarray(x, dtype=dtype), np.ascontiguousarray(w, dtype=dtype)
    n, h, wd, cin = x.shape
    cout = w.shape[0]
    u = weight_transform(w)
    u_t = u.transpose(0, 2, 1)  # (36, Cin, Cout) view
    y = np.empty((n, h, wd, cout), dtype=dtype)
    threads = parallel.worker_threads()
    chunks = _chunks(n, h, wd, cin + cout, x.itemsize, chunk_bytes, threads)
    max_tiles = max(tiles for _, _, tiles in chunks)

    def worker(my_chunks):
        v_flat = np.empty(POSITIONS * max_tiles * cin, dtype=dtype)
        m_flat = np.empty(POSITIONS * max_tiles * cout, dtype=dtype)
        for s, e, tiles in my_chunks:
            v = input_transform(x[s:e], out=_buffer(v_flat, tiles, cin))
            m = np.matmul(v, u_t, out=_buffer(m_flat, tiles, cout))  # 36 GEMMs (tiles, Cin) @ (Cin, Cout)
            output_transform(m, out=y[s:e])

    parallel.run_on_threads(chunks, threads, worker, "winograd")
    return y, ((x, u) if keep_for_backward else None)


def conv3x3_backward(grad_y, saved, need_x=True, need_w=True, chunk_bytes=CHUNK_BYTES):
    """Gradients of conv3x3_forward: grad_y (N, H, W, Cout) -> (dx (N, H, W, Cin),
    dw (Cout, 3, 3, Cin)), each None when not needed. `saved` = (x, U), what conv3x3_forward
    returned with keep_for_backward=True.

    Per chunk of images: dM = A dY A^T once, then dU += dM^T @ V (V recomputed from x) and
    dV = dM @ U (backward_gemms), summed back into dx by the adjoint input transform. dU is summed
    per group of consecutive chunks (parallel.summing_groups), the groups' sums in group order;
    dw = G^T dU G at the end. The result depends on the chunking, not on which thread took what.
    """
    if not (need_x or need_w):
        return None, None
    if saved is None:
        raise ValueError("conv3x3_backward: needs what conv3x3_forward(keep_for_backward=True) saved")
    x, u = saved
    n, h, wd, cin = x.shape
    cout = u.shape[1]
    if grad_y.shape != (n, h, wd, cout):
        raise ValueError(f"conv3x3_backward: grad_y {grad_y.shape} does not match x {x.shape} "
                         f"and {cout} output channels")
    dtype = _float_dtype(grad_y, u)
    grad_y = np.ascontiguousarray(grad_y, dtype=dtype)
    x, u = np.ascontiguousarray(x, dtype=dtype), _position_major(_storage(u).astype(dtype, copy=False))
    dx = np.empty(x.shape, dtype=dtype) if need_x else None
    threads = parallel.worker_threads()
    # Each chunk reads and writes its group's (36, Cout, Cin) dU sum: keep chunks at least twice
    # that size, or the sums cost more memory traffic than the chunk (8x8, 256 channels).
    chunk_bytes = max(chunk_bytes, 2 * POSITIONS * cin * cout * grad_y.itemsize) if need_w else chunk_bytes
    chunks = _chunks(n, h, wd, cin + cout, grad_y.itemsize, chunk_bytes, threads)
    max_tiles = max(tiles for _, _, tiles in chunks)
    # dx alone is written chunk by chunk: every chunk its own group, the finest sharing of the work
    groups = parallel.summing_groups(chunks, threads) if need_w else [[chunk] for chunk in chunks]
    group_du = [None] * len(groups)

    def worker(my_groups):
        v_flat = np.empty(POSITIONS * max_tiles * cin, dtype=dtype)  # V, then dV
        m_flat = np.empty(POSITIONS * max_tiles * cout, dtype=dtype)
        for index, group in my_groups:
            du = _position_major(np.zeros((cout, POSITIONS, cin), dtype=dtype)) if need_w else None
            for s, e, tiles in group:
                dm = output_transform_adjoint(grad_y[s:e], out=_buffer(m_flat, tiles, cout))
                v = _buffer(v_flat, tiles, cin)
                if need_w:
                    input_transform(x[s:e], out=v)
                backward_gemms(dm, u, v, du, dv=need_x)  # du += dM^T @ V; V becomes dV = dM @ U
                if need_x:
                    input_transform_adjoint(v, dx[s:e].shape, out=dx[s:e])
            group_du[index] = du

    parallel.run_on_threads(list(enumerate(groups)), threads, worker, "winograd")
    if not need_w:
        return dx, None
    du, *later = group_du
    for partial_du in later:  # in group order
        du += partial_du
    return dx, weight_transform_adjoint(du)


# ----------------------------------------------------------------------------- backward GEMMs

@njit(nogil=True, cache=True)
def _backward_gemms_kernel(gemm, one, dm, u, v, du, need_w, need_x):
    tiles, _, cout = dm.shape
    cin = v.shape[2]
    # (rows, 36, C) storage: matrix k starts k * C elements in; its rows are 36 * C apart
    dm_0, u_0, v_0, du_0 = dm.ctypes.data, u.ctypes.data, v.ctypes.data, du.ctypes.data
    ld_m, ld_c = POSITIONS * cout, POSITIONS * cin
    for k in range(POSITIONS):
        dm_k = dm_0 + np.uint64(k * cout * dm.itemsize)
        v_k = v_0 + np.uint64(k * cin * v.itemsize)
        offset_c = np.uint64(k * cin * u.itemsize)
        if need_w:  # dU[k] += dM[k]^T @ V[k]: (Cout, tiles) @ (tiles, Cin), beta = 1
            gemm(ROW_MAJOR, TRANS, NO_TRANS, cout, cin, tiles,
                 one, dm_k, ld_m, v_k, ld_c, one, du_0 + offset_c, ld_c)
        if need_x:  # dV[k] = dM[k] @ U[k]: (tiles, Cout) @ (Cout, Cin), over V[k], which dU[k] has used
            gemm(ROW_MAJOR, NO_TRANS, NO_TRANS, tiles, cin, cout,
                 one, dm_k, ld_m, u_0 + offset_c, ld_c, one - one, v_k, ld_c)


def backward_gemms(dm, u, v, du=None, dv=True):
    """The GEMMs of one chunk's backward, per position k: du[k] += dM[k]^T @ V[k] (when `du` is
    given) and dV[k] = dM[k] @ U[k] written over V[k] (when `dv`). dm (36, T, Cout), u (36, Cout,
    Cin), v (36, T, Cin), du (36, Cout, Cin), all views of (rows, 36, C) storage, one dtype.
    With NumPy's OpenBLAS (parallel.blas_gemm) one call of a Numba kernel runs them all in BLAS,
    summing dU with beta = 1; elsewhere backward_gemms_reference, the same in np.matmul."""
    _, tiles, cout = dm.shape
    cin = v.shape[2]
    expected = [(POSITIONS, tiles, cout), (POSITIONS, cout, cin), (POSITIONS, tiles, cin)]
    operands = (dm, u, v) if du is None else (dm, u, v, du)
    if [a.shape for a in operands] != (expected + [expected[1]])[:len(operands)]:
        raise ValueError(f"backward_gemms: shapes {[a.shape for a in operands]} are not dM (36, T, Cout), "
                         f"U (36, Cout, Cin), V (36, T, Cin) and dU (36, Cout, Cin)")
    gemm = parallel.blas_gemm(dm.dtype)
    if gemm is None or any(a.dtype != dm.dtype for a in operands):
        return backward_gemms_reference(dm, u, v, du, dv)
    du_storage = np.empty((0, POSITIONS, 0), dm.dtype) if du is None else _storage(du, out=True)
    _backward_gemms_kernel(gemm, dm.dtype.type(1), _storage(dm), _storage(u), _storage(v, out=True),
                           du_storage, du is not None, dv)
    return du, v


def backward_gemms_reference(dm, u, v, du=None, dv=True):
    if du is not None:
        du += np.matmul(dm.transpose(0, 2, 1), v)  # dM[k]^T is a transposed view BLAS reads as is
    if dv:
        np.matmul(dm, u, out=v)
    return du, v


# ----------------------------------------------------------------------------- references

def conv3x3_forward_reference(x, w):
    """Direct convolution in plain NumPy: one (N*H*W, Cin) @ (Cin, Cout) product per kernel tap."""
    n, h, wd, cin = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = np.zeros((n, h, wd, w.shape[0]), dtype=np.result_type(x, w))
    for ki in range(3):
        for kj in range(3):
            y += xp[:, ki:ki + h, kj:kj + wd] @ w[:, ki, kj, :].T
    return y


def conv3x3_backward_reference(grad_y, x, w):
    """(dx, dw) of conv3x3_forward_reference, tap by tap: dx scatters grad_y @ w[tap] into the
    padded input, dw[tap] correlates grad_y with the shifted input."""
    n, h, wd, cin = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    dxp = np.zeros_like(xp)
    dw = np.zeros_like(w)
    g2 = grad_y.reshape(-1, w.shape[0])
    for ki in range(3):
        for kj in range(3):
            dxp[:, ki:ki + h, kj:kj + wd] += grad_y @ w[:, ki, kj, :]
            dw[:, ki, kj, :] = g2.T @ xp[:, ki:ki + h, kj:kj + wd].reshape(-1, cin)
    return dxp[:, 1:h + 1, 1:wd + 1], dw
