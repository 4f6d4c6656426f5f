"""Winograd F(2x2, 3x3) convolution for 3x3 / stride 1 / padding 1 layers (Lavin & Gray, 2015).

Why: im2col + GEMM spends 9 * Cin * Cout multiply-adds per output pixel; Winograd computes a
2x2 block of outputs from a 4x4 input window with 16 elementwise products per (Cin, Cout) pair,
i.e. 4 * Cin * Cout per pixel (2.25x fewer), at the price of three cheap linear transforms:

    Y = A^T [ (G g G^T) * (B^T d B) ] A        per tile, summed over input channels

Layouts (NHWC activations, (Cout, 3, 3, Cin) weights, as in nanoq4.ops):
  tiles  T = N * ceil(H/2) * ceil(W/2), numbered (image, tile row, tile column) row-major;
         tile (ti, tj) reads input rows 2ti-1 .. 2ti+2 and columns 2tj-1 .. 2tj+2 (the -1 is the
         zero padding) and produces output rows 2ti, 2ti+1 and columns 2tj, 2tj+1. Odd H or W
         are supported: reads beyond the image are zeros, writes beyond it are dropped.
  V = B^T d B   (16, T, Cin)    transformed input, k = 4 * row + column of the 4x4 tile
  U = G g G^T   (16, Cout, Cin) transformed weights (Cin fastest, as in w)
  M = V @ U^T   (16, T, Cout)   16 independent GEMMs on contiguous 2-D matrices (U[k]^T is
                                a transposed view, which BLAS reads in place)
  y = A^T M A   (N, H, W, Cout)

Backward is the adjoint of each step, in reverse: dM = A dY A^T, then dU = dM^T @ V and
dV = dM @ U (16 GEMMs each), dw = G^T dU G and dx = the sum of B dV B^T over the overlapping
input windows. Computing dx this way shares dM with dw, so backward transforms grad_y once
(the "flipped-weight forward convolution" route would transform it twice, and ran slower).

The batch runs in chunks of images whose V and M take ~CHUNK_BYTES, so the transforms and the
GEMMs hand each other cache-resident data and memory stays flat at any batch size. Backward
recomputes V of each chunk from x (cheaper than keeping the 4x larger V of the whole batch in
memory); the object saved for backward is therefore x itself. The chunks run on worker threads,
one per core, as parallel.py schedules them (that module explains why, and holds BLAS to one
thread meanwhile).

Transform kernels loop over tiles (`prange`: parallel when called from the main thread, serial
in a worker) with the channel loop innermost, contiguous in both NHWC and the (16, T, C)
layouts. `prange` matters even serially: Numba compiles a parfor body with its arrays marked
non-aliasing, which is what lets LLVM vectorize a loop with 16 input and 16 output streams (a
plain @njit version ran several times slower). Window positions outside the image are read from
a clamped in-bounds index and multiplied by a 0/1 mask, which keeps the inner loop free of
branches. Every kernel has a plain-NumPy `*_reference` twin that spells the same transform with
the explicit matrices B^T, G, A^T below.
"""
import numpy as np
from numba import njit, prange

from . import parallel

# The transform matrices of F(2x2, 3x3); the kernels below hard-code their products.
BT = np.array([[1, 0, -1, 0],
               [0, 1, 1, 0],
               [0, -1, 1, 0],
               [0, 1, 0, -1]], dtype=np.float64)
G = np.array([[1, 0, 0],
              [0.5, 0.5, 0.5],
              [0.5, -0.5, 0.5],
              [0, 0, 1]], dtype=np.float64)
AT = np.array([[1, 1, 1, 0],
               [0, 1, -1, -1]], dtype=np.float64)

# V + M of one chunk of images. Two chunks are live at once (one per thread) next to whatever
# else shares the L3; of 2, 4 and 8 MiB, 2 MiB ran fastest on the VGG shapes.
CHUNK_BYTES = 2 << 20


def tile_grid(h, w):
    """Number of 2x2 output tiles along H and W (the last one is half outside for odd sizes)."""
    return (h + 1) // 2, (w + 1) // 2


# ----------------------------------------------------------------------------- 1-D transforms
# The 2-D transforms apply a 1-D transform to the columns, then to the rows, of a 4x4 (or 3x3,
# 2x2) tile. Tuples of scalars stay in registers; inline="always" lets LLVM see one loop body.

@njit(inline="always")
def _bt(d0, d1, d2, d3):
    """B^T d for a 4-vector d (input transform)."""
    return d0 - d2, d1 + d2, d2 - d1, d1 - d3


@njit(inline="always")
def _g(g0, g1, g2, half):
    """G g for a 3-vector g (weight transform)."""
    return g0, half * (g0 + g1 + g2), half * (g0 - g1 + g2), g2


@njit(inline="always")
def _gt(u0, u1, u2, u3, half):
    """G^T u for a 4-vector u (adjoint of the weight transform)."""
    return u0 + half * (u1 + u2), half * (u1 - u2), half * (u1 + u2) + u3


@njit(inline="always")
def _at(m0, m1, m2, m3):
    """A^T m for a 4-vector m (output transform)."""
    return m0 + m1 + m2, m1 - m2 - m3


@njit(inline="always")
def _a(g0, g1):
    """A g for a 2-vector g (adjoint of the output transform)."""
    return g0, g0 + g1, g0 - g1, -g1


@njit(inline="always")
def _window(start, size, one):
    """Four clamped in-bounds indices start..start+3 and their 0/1 masks (0 = padding)."""
    i0, i1, i2, i3 = start, start + 1, start + 2, start + 3
    zero = one - one
    return (min(max(i0, 0), size - 1), min(i1, size - 1), min(i2, size - 1), min(i3, size - 1),
            one if i0 >= 0 else zero, one if i1 < size else zero,
            one if i2 < size else zero, one if i3 < size else zero)


# ----------------------------------------------------------------------------- input transform

@njit(parallel=True, nogil=True, cache=True)
def _input_transform_kernel(x, one, v):
    n, h, w, c = x.shape
    th, tw = (h + 1) // 2, (w + 1) // 2
    for t in prange(n * th * tw):
        b, ti, tj = t // (th * tw), (t // tw) % th, t % tw
        r0, r1, r2, r3, mr0, mr1, mr2, mr3 = _window(2 * ti - 1, h, one)
        c0, c1, c2, c3, mc0, mc1, mc2, mc3 = _window(2 * tj - 1, w, one)
        for ch in range(c):
            # B^T d: combine the 4 rows of each window column (padding read as 0) ...
            p0 = _bt(x[b, r0, c0, ch] * (mr0 * mc0), x[b, r1, c0, ch] * (mr1 * mc0),
                     x[b, r2, c0, ch] * (mr2 * mc0), x[b, r3, c0, ch] * (mr3 * mc0))
            p1 = _bt(x[b, r0, c1, ch] * (mr0 * mc1), x[b, r1, c1, ch] * (mr1 * mc1),
                     x[b, r2, c1, ch] * (mr2 * mc1), x[b, r3, c1, ch] * (mr3 * mc1))
            p2 = _bt(x[b, r0, c2, ch] * (mr0 * mc2), x[b, r1, c2, ch] * (mr1 * mc2),
                     x[b, r2, c2, ch] * (mr2 * mc2), x[b, r3, c2, ch] * (mr3 * mc2))
            p3 = _bt(x[b, r0, c3, ch] * (mr0 * mc3), x[b, r1, c3, ch] * (mr1 * mc3),
                     x[b, r2, c3, ch] * (mr2 * mc3), x[b, r3, c3, ch] * (mr3 * mc3))
            # ... then (B^T d) B: combine the 4 columns of each row
            q = _bt(p0[0], p1[0], p2[0], p3[0])
            v[0, t, ch], v[1, t, ch], v[2, t, ch], v[3, t, ch] = q
            q = _bt(p0[1], p1[1], p2[1], p3[1])
            v[4, t, ch], v[5, t, ch], v[6, t, ch], v[7, t, ch] = q
            q = _bt(p0[2], p1[2], p2[2], p3[2])
            v[8, t, ch], v[9, t, ch], v[10, t, ch], v[11, t, ch] = q
            q = _bt(p0[3], p1[3], p2[3], p3[3])
            v[12, t, ch], v[13, t, ch], v[14, t, ch], v[15, t, ch] = q


def input_transform(x, out=None):
    """V = B^T d B of every 4x4 input window: (N, H, W, C) -> (16, T, C), padding 1 built in."""
    n, h, w, c = x.shape
    th, tw = tile_grid(h, w)
    v = np.empty((16, n * th * tw, c), dtype=x.dtype) if out is None else out
    _input_transform_kernel(np.ascontiguousarray(x), x.dtype.type(1), v)
    return v


def _windows_reference(x):
    """(N, H, W, C) -> (N, th, tw, 4, 4, C): the zero-padded 4x4 input window of every tile."""
    n, h, w, c = x.shape
    th, tw = tile_grid(h, w)
    xp = np.zeros((n, 2 * th + 2, 2 * tw + 2, c), dtype=x.dtype)
    xp[:, 1:h + 1, 1:w + 1] = x
    return np.stack([np.stack([xp[:, r:r + 2 * th:2, s:s + 2 * tw:2] for s in range(4)], axis=3)
                     for r in range(4)], axis=3)


def input_transform_reference(x):
    n, h, w, c = x.shape
    bt = BT.astype(x.dtype)
    v = np.einsum("ra,ntuabc,sb->rsntuc", bt, _windows_reference(x), bt)
    return v.reshape(16, -1, c)


@njit(inline="always")
def _overlap_add(v0, v1, v2, v3, before, after, m_before, m_after):
    """The two in-tile outputs 2p, 2p+1 of the 1-D input-transform adjoint (B v), overlap-added:
    window p covers rows 2p-1 .. 2p+2, so row 2p also gets (B v)[3] = -v3 of window p-1
    (`before`) and row 2p+1 gets (B v)[0] = v0 of window p+1 (`after`); m_* = 0 at the border."""
    return v1 - v2 + v3 - m_before * before, v1 + v2 - v0 + m_after * after


@njit(parallel=True, nogil=True, cache=True)
def _input_transform_adjoint_kernel(dv, one, dx):
    n, h, w, c = dx.shape
    th, tw = (h + 1) // 2, (w + 1) // 2
    zero = one - one
    for t in prange(n * th * tw):  # one 2x2 block of dx per tile: a gather, so no write races
        b, ti, tj = t // (th * tw), (t // tw) % th, t % tw
        # neighbouring tiles, clamped onto this one (and masked out) at the image border
        up, down, left, right = min(ti, 1), min(th - 1 - ti, 1), min(tj, 1), min(tw - 1 - tj, 1)
        tu, td, tl, tr = t - tw * up, t + tw * down, t - left, t + right
        tul, tdl, tur, tdr = tu - left, td - left, tu + right, td + right
        mu = one if up else zero
        md = one if down else zero
        ml = one if left else zero
        mr = one if right else zero
        i0, j0 = 2 * ti, 2 * tj
        i1, j1 = min(i0 + 1, h - 1), min(j0 + 1, w - 1)  # clamped: odd sizes crop the last tile
        for ch in range(c):
            # B dV along rows, overlap-added with the tiles above and below: rows 2ti, 2ti+1 of
            # each of this tile's 4 window columns, of column 3 of the left tile and column 0 of
            # the right tile (the only columns of those tiles that reach this 2x2 block) ...
            p0 = _overlap_add(dv[0, t, ch], dv[4, t, ch], dv[8, t, ch], dv[12, t, ch],
                              dv[12, tu, ch], dv[0, td, ch], mu, md)
            p1 = _overlap_add(dv[1, t, ch], dv[5, t, ch], dv[9, t, ch], dv[13, t, ch],
                              dv[13, tu, ch], dv[1, td, ch], mu, md)
            p2 = _overlap_add(dv[2, t, ch], dv[6, t, ch], dv[10, t, ch], dv[14, t, ch],
                              dv[14, tu, ch], dv[2, td, ch], mu, md)
            p3 = _overlap_add(dv[3, t, ch], dv[7, t, ch], dv[11, t, ch], dv[15, t, ch],
                              dv[15, tu, ch], dv[3, td, ch], mu, md)
            p_left = _overlap_add(dv[3, tl, ch], dv[7, tl, ch], dv[11, tl, ch], dv[15, tl, ch],
                                dv[15, tul, ch], dv[3, tdl, ch], mu, md)
            p_right = _overlap_add(dv[0, tr, ch], dv[4, tr, ch], dv[8, tr, ch], dv[12, tr, ch],
                                 dv[12, tur, ch], dv[0, tdr, ch], mu, md)
            # ... then the same along columns
            top = _overlap_add(p0[0], p1[0], p2[0], p3[0], p_left[0], p_right[0], ml, mr)
            bottom = _overlap_add(p0[1], p1[1], p2[1], p3[1], p_left[1], p_right[1], ml, mr)
            # as in the output transform: the in-image value of a clamped pair is written last
            dx[b, i1, j1, ch] = bottom[1]
            dx[b, i1, j0, ch] = bottom[0]
            dx[b, i0, j1, ch] = top[1]
            dx[b, i0, j0, ch] = top[0]


def input_transform_adjoint(dv, x_shape, out=None):
    """dx = sum over tiles of B dV B^T added into each tile's 4x4 input window, the padding
    dropped: (16, T, C) -> x_shape (N, H, W, C). Writes every element of `out` when given."""
    dx = np.empty(x_shape, dtype=dv.dtype) if out is None else out
    _input_transform_adjoint_kernel(dv, dv.dtype.type(1), dx)
    return dx


def input_transform_adjoint_reference(dv, x_shape):
    n, h, w, c = x_shape
    th, tw = tile_grid(h, w)
    b = BT.T.astype(dv.dtype)
    windows = np.einsum("ar,rsntuc,bs->ntuabc", b, dv.reshape(4, 4, n, th, tw, c), b)
    dxp = np.zeros((n, 2 * th + 2, 2 * tw + 2, c), dtype=dv.dtype)
    for r in range(4):
        for s in range(4):
            dxp[:, r:r + 2 * th:2, s:s + 2 * tw:2] += windows[:, :, :, r, s]
    return dxp[:, 1:h + 1, 1:w + 1]


# ----------------------------------------------------------------------------- weight transform

@njit(parallel=True, nogil=True, cache=True)
def _weight_transform_kernel(w, half, u):
    cout, _, _, cin = w.shape
    for co in prange(cout):
        for ci in range(cin):
            # G g: combine the 3 rows of each kernel column ...
            p0 = _g(w[co, 0, 0, ci], w[co, 1, 0, ci], w[co, 2, 0, ci], half)
            p1 = _g(w[co, 0, 1, ci], w[co, 1, 1, ci], w[co, 2, 1, ci], half)
            p2 = _g(w[co, 0, 2, ci], w[co, 1, 2, ci], w[co, 2, 2, ci], half)
            # ... then (G g) G^T row by row
            u[0, co, ci], u[1, co, ci], u[2, co, ci], u[3, co, ci] = _g(p0[0], p1[0], p2[0], half)
            u[4, co, ci], u[5, co, ci], u[6, co, ci], u[7, co, ci] = _g(p0[1], p1[1], p2[1], half)
            u[8, co, ci], u[9, co, ci], u[10, co, ci], u[11, co, ci] = _g(p0[2], p1[2], p2[2], half)
            u[12, co, ci], u[13, co, ci], u[14, co, ci], u[15, co, ci] = _g(p0[3], p1[3], p2[3], half)


def weight_transform(w):
    """U = G g G^T of every 3x3 kernel: (Cout, 3, 3, Cin) -> (16, Cout, Cin). Cin stays the
    fastest axis, as in w, so this is a streaming pass; the forward GEMM for tile position k
    reads U[k] transposed, V[k] (T, Cin) @ U[k].T (Cin, Cout), which BLAS does without a copy."""
    cout, kh, kw, cin = w.shape
    u = np.empty((16, cout, cin), dtype=w.dtype)
    _weight_transform_kernel(np.ascontiguousarray(w), w.dtype.type(0.5), u)
    return u


def weight_transform_reference(w):
    g = G.astype(w.dtype)
    return np.einsum("ra,oabi,sb->rsoi", g, w, g).reshape(16, w.shape[0], w.shape[3])


@njit(parallel=True, nogil=True, cache=True)
def _weight_transform_adjoint_kernel(du, half, dw):
    cout, _, _, cin = dw.shape
    for co in prange(cout):
        for ci in range(cin):
            # G^T dU: combine the 4 rows of each column ...
            p0 = _gt(du[0, co, ci], du[4, co, ci], du[8, co, ci], du[12, co, ci], half)
            p1 = _gt(du[1, co, ci], du[5, co, ci], du[9, co, ci], du[13, co, ci], half)
            p2 = _gt(du[2, co, ci], du[6, co, ci], du[10, co, ci], du[14, co, ci], half)
            p3 = _gt(du[3, co, ci], du[7, co, ci], du[11, co, ci], du[15, co, ci], half)
            # ... then (G^T dU) G row by row
            dw[co, 0, 0, ci], dw[co, 0, 1, ci], dw[co, 0, 2, ci] = _gt(p0[0], p1[0], p2[0], p3[0], half)
            dw[co, 1, 0, ci], dw[co, 1, 1, ci], dw[co, 1, 2, ci] = _gt(p0[1], p1[1], p2[1], p3[1], half)
            dw[co, 2, 0, ci], dw[co, 2, 1, ci], dw[co, 2, 2, ci] = _gt(p0[2], p1[2], p2[2], p3[2], half)


def weight_transform_adjoint(du):
    """dw = G^T dU G: (16, Cout, Cin) -> (Cout, 3, 3, Cin), the adjoint of weight_transform."""
    _, cout, cin = du.shape
    dw = np.empty((cout, 3, 3, cin), dtype=du.dtype)
    _weight_transform_adjoint_kernel(np.ascontiguousarray(du), du.dtype.type(0.5), dw)
    return dw


def weight_transform_adjoint_reference(du):
    g = G.astype(du.dtype)
    _, cout, cin = du.shape
    return np.einsum("ra,rsoi,sb->oabi", g, du.reshape(4, 4, cout, cin), g)


# ----------------------------------------------------------------------------- output transform

@njit(parallel=True, nogil=True, cache=True)
def _output_transform_kernel(m, y):
    n, h, w, c = y.shape
    th, tw = (h + 1) // 2, (w + 1) // 2
    for t in prange(n * th * tw):
        b, ti, tj = t // (th * tw), (t // tw) % th, t % tw
        i0, j0 = 2 * ti, 2 * tj
        i1, j1 = min(i0 + 1, h - 1), min(j0 + 1, w - 1)  # clamped: odd sizes crop the last tile
        for ch in range(c):
            # A^T M: combine the 4 rows of each column ...
            p0 = _at(m[0, t, ch], m[4, t, ch], m[8, t, ch], m[12, t, ch])
            p1 = _at(m[1, t, ch], m[5, t, ch], m[9, t, ch], m[13, t, ch])
            p2 = _at(m[2, t, ch], m[6, t, ch], m[10, t, ch], m[14, t, ch])
            p3 = _at(m[3, t, ch], m[7, t, ch], m[11, t, ch], m[15, t, ch])
            top = _at(p0[0], p1[0], p2[0], p3[0])  # ... then (A^T M) A: output rows 2ti, 2ti+1
            bottom = _at(p0[1], p1[1], p2[1], p3[1])
            # An output outside the image was clamped onto an in-image one of this tile; writing
            # in this order lets the in-image value land last.
            y[b, i1, j1, ch] = bottom[1]
            y[b, i1, j0, ch] = bottom[0]
            y[b, i0, j1, ch] = top[1]
            y[b, i0, j0, ch] = top[0]


def output_transform(m, out):
    """Y = A^T M A of every tile into the NHWC array `out` (N, H, W, Cout); M is (16, T, Cout)."""
    _output_transform_kernel(m, out)
    return out


def output_transform_reference(m, y_shape):
    n, h, w, c = y_shape
    th, tw = tile_grid(h, w)
    at = AT.astype(m.dtype)
    y = np.einsum("ar,rsntuc,bs->ntaubc", at, m.reshape(4, 4, n, th, tw, c), at)
    return y.reshape(n, 2 * th, 2 * tw, c)[:, :h, :w]


@njit(parallel=True, nogil=True, cache=True)
def _output_transform_adjoint_kernel(g, one, dm):
    n, h, w, c = g.shape
    th, tw = (h + 1) // 2, (w + 1) // 2
    zero = one - one
    for t in prange(n * th * tw):
        b, ti, tj = t // (th * tw), (t // tw) % th, t % tw
        i0, j0 = 2 * ti, 2 * tj
        i1, j1 = min(i0 + 1, h - 1), min(j0 + 1, w - 1)
        mi1 = one if i0 + 1 < h else zero  # outputs cropped away have zero gradient
        mj1 = one if j0 + 1 < w else zero
        for ch in range(c):
            # A g: each column of the 2x2 gradient tile becomes 4 rows ...
            p0 = _a(g[b, i0, j0, ch], g[b, i1, j0, ch] * mi1)
            p1 = _a(g[b, i0, j1, ch] * mj1, g[b, i1, j1, ch] * (mi1 * mj1))
            # ... then (A g) A^T row by row
            dm[0, t, ch], dm[1, t, ch], dm[2, t, ch], dm[3, t, ch] = _a(p0[0], p1[0])
            dm[4, t, ch], dm[5, t, ch], dm[6, t, ch], dm[7, t, ch] = _a(p0[1], p1[1])
            dm[8, t, ch], dm[9, t, ch], dm[10, t, ch], dm[11, t, ch] = _a(p0[2], p1[2])
            dm[12, t, ch], dm[13, t, ch], dm[14, t, ch], dm[15, t, ch] = _a(p0[3], p1[3])


def output_transform_adjoint(g, out=None):
    """dM = A dY A^T of every 2x2 gradient tile: (N, H, W, Cout) -> (16, T, Cout)."""
    n, h, w, c = g.shape
    th, tw = tile_grid(h, w)
    dm = np.empty((16, n * th * tw, c), dtype=g.dtype) if out is None else out
    _output_transform_adjoint_kernel(np.ascontiguousarray(g), g.dtype.type(1), dm)
    return dm


def output_transform_adjoint_reference(g):
    n, h, w, c = g.shape
    th, tw = tile_grid(h, w)
    gp = np.zeros((n, 2 * th, 2 * tw, c), dtype=g.dtype)
    gp[:, :h, :w] = g
    a = AT.T.astype(g.dtype)
    dm = np.einsum("ra,ntaubc,sb->rsntuc", a, gp.reshape(n, th, 2, tw, 2, c), a)
    return dm.reshape(16, -1, c)


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
    (16, tiles, channels) per chunk, at least one image, and at least one chunk per thread."""
    th, tw = tile_grid(h, w)
    return [(s, e, (e - s) * th * tw) for s, e in parallel.split(n, 16 * th * tw * channels * itemsize,
                                                                  chunk_bytes, threads)]


def _buffer(flat, tiles, channels):
    """A C-contiguous (16, tiles, channels) view of the front of a flat scratch buffer, so every
    V[k] / M[k] handed to BLAS is one contiguous 2-D matrix (no copy inside np.matmul)."""
    return flat[:16 * tiles * channels].reshape(16, tiles, channels)


def conv3x3_forward(x, w, keep_for_backward=True, chunk_bytes=CHUNK_BYTES):
    """y = conv(x, w), 3x3, stride 1, zero padding 1, by Winograd F(2x2, 3x3).

    x (N, H, W, Cin), w (Cout, 3, 3, Cin) -> y (N, H, W, Cout), same float dtype. Returns
    (y, saved): saved is what conv3x3_backward needs for dw (x itself, since backward recomputes
    V chunk by chunk), or None when keep_for_backward is False.
    """
    _check_shapes(x.shape, w.shape)
    dtype = _float_dtype(x, w)
    x, w = np.ascontiguousarray(x, dtype=dtype), np.ascontiguousarray(w, dtype=dtype)
    n, h, wd, cin = x.shape
    cout = w.shape[0]
    u_t = weight_transform(w).transpose(0, 2, 1)  # (16, Cin, Cout) view of (16, Cout, Cin)
    y = np.empty((n, h, wd, cout), dtype=dtype)
    threads = parallel.worker_threads()
    chunks = _chunks(n, h, wd, cin + cout, x.itemsize, chunk_bytes, threads)
    max_tiles = max(tiles for _, _, tiles in chunks)

    def worker(my_chunks):
        v_flat = np.empty(16 * max_tiles * cin, dtype=dtype)
        m_flat = np.empty(16 * max_tiles * cout, dtype=dtype)
        for s, e, tiles in my_chunks:
            v = input_transform(x[s:e], out=_buffer(v_flat, tiles, cin))
            m = np.matmul(v, u_t, out=_buffer(m_flat, tiles, cout))  # 16 GEMMs (tiles, Cin) @ (Cin, Cout)
            output_transform(m, out=y[s:e])

    parallel.run_on_threads(chunks, threads, worker, "winograd")
    return y, (x if keep_for_backward else None)


def conv3x3_backward(grad_y, saved, x_shape, w, need_x=True, need_w=True, chunk_bytes=CHUNK_BYTES):
    """Gradients of conv3x3_forward: grad_y (N, H, W, Cout) -> (dx (N, H, W, Cin), dw (Cout, 3, 3, Cin)),
    each None when not needed. `saved` is the object conv3x3_forward returned (x, for dw).

    Per chunk of images: dM = A dY A^T once, then dU += dM^T @ V (V recomputed from x) and
    dV = dM @ U, summed back into dx by the adjoint input transform. Each thread accumulates
    its own dU; dw = G^T (sum of those) G at the end.
    """
    if not (need_x or need_w):
        return None, None
    if need_w and saved is None:
        raise ValueError("conv3x3_backward: dw needs the input saved by "
                         "conv3x3_forward(keep_for_backward=True)")
    _check_shapes(x_shape, w.shape)
    n, h, wd, cin = x_shape
    cout = w.shape[0]
    if grad_y.shape != (n, h, wd, cout):
        raise ValueError(f"conv3x3_backward: grad_y {grad_y.shape} does not match x {tuple(x_shape)} "
                         f"and w {w.shape}")
    dtype = _float_dtype(grad_y, w)
    grad_y, w = np.ascontiguousarray(grad_y, dtype=dtype), np.ascontiguousarray(w, dtype=dtype)
    x = np.ascontiguousarray(saved, dtype=dtype) if need_w else None
    u = weight_transform(w) if need_x else None  # (16, Cout, Cin)
    dx = np.empty(x_shape, dtype=dtype) if need_x else None
    threads = parallel.worker_threads()
    # Each chunk adds a (16, Cout, Cin) partial dU into its thread's sum: keep chunks at least
    # twice that size, or the sums cost more memory traffic than the chunk (8x8, 256 channels).
    chunk_bytes = max(chunk_bytes, 2 * 16 * cin * cout * grad_y.itemsize) if need_w else chunk_bytes
    chunks = _chunks(n, h, wd, cin + cout, grad_y.itemsize, chunk_bytes, threads)
    max_tiles = max(tiles for _, _, tiles in chunks)

    def worker(my_chunks):
        v_flat = np.empty(16 * max_tiles * cin, dtype=dtype)  # V, then dV
        m_flat = np.empty(16 * max_tiles * cout, dtype=dtype)
        du = partial_du = None
        for s, e, tiles in my_chunks:
            dm = output_transform_adjoint(grad_y[s:e], out=_buffer(m_flat, tiles, cout))
            if need_w:
                v = input_transform(x[s:e], out=_buffer(v_flat, tiles, cin))
                # 16 GEMMs (Cout, tiles) @ (tiles, Cin); dM[k]^T is a transposed view BLAS reads as is
                if du is None:
                    du = np.matmul(dm.transpose(0, 2, 1), v)
                    partial_du = np.empty_like(du)
                else:
                    du += np.matmul(dm.transpose(0, 2, 1), v, out=partial_du)
            if need_x:
                dv = np.matmul(dm, u, out=_buffer(v_flat, tiles, cin))  # (tiles, Cout) @ (Cout, Cin)
                input_transform_adjoint(dv, dx[s:e].shape, out=dx[s:e])
        return du

    partial_dus = parallel.run_on_threads(chunks, threads, worker, "winograd")
    du, *others = [du for du in partial_dus if du is not None] or [None]
    for partial_du in others:
        du += partial_du
    return dx, (weight_transform_adjoint(du) if need_w else None)


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
