"""nanoq4.parallel: NumPy's OpenBLAS thread count, changed and restored from inside the process;
the process's Numba and BLAS threads (--threads); chunks of work spread over worker threads."""
import sys
import threading

import numba
import numpy as np
import pytest

from nanoq4 import parallel


def numpy_uses_openblas():
    info = np.show_config(mode="dicts").get("Build Dependencies", {}).get("blas", {})
    return "openblas" in str(info.get("name", "")).lower()


# ----------------------------------------------------------------------------- BLAS threads

def test_openblas_is_found_on_linux_wheels():
    # The Winograd convolutions are much slower per training step without this: make losing it loud.
    if not (sys.platform.startswith("linux") and numpy_uses_openblas()):
        pytest.skip("only NumPy's OpenBLAS on Linux is controllable")
    assert parallel.blas_available()
    assert parallel.get_blas_threads() >= 1


@pytest.mark.skipif(not parallel.blas_available(), reason="BLAS thread count not controllable here")
def test_limit_sets_and_restores_the_thread_count():
    before = parallel.get_blas_threads()
    with parallel.blas_limit(1):
        assert parallel.get_blas_threads() == 1
        a = np.random.default_rng(0).standard_normal((300, 200))
        np.testing.assert_allclose(a @ a.T, np.einsum("ik,jk->ij", a, a), rtol=1e-10, atol=1e-10)
    assert parallel.get_blas_threads() == before


@pytest.mark.skipif(not parallel.blas_available(), reason="BLAS thread count not controllable here")
def test_limit_restores_after_an_exception():
    before = parallel.get_blas_threads()
    with pytest.raises(RuntimeError):
        with parallel.blas_limit(1):
            raise RuntimeError("boom")
    assert parallel.get_blas_threads() == before


@pytest.mark.skipif(not parallel.blas_available(), reason="BLAS thread count not controllable here")
def test_set_threads():
    before = parallel.get_blas_threads()
    try:
        parallel.set_blas_threads(1)
        assert parallel.get_blas_threads() == 1
    finally:
        parallel.set_blas_threads(before)
    assert parallel.get_blas_threads() == before


def test_without_openblas_everything_is_a_no_op(monkeypatch):
    monkeypatch.setattr(parallel, "_api", False)
    assert not parallel.blas_available() and parallel.get_blas_threads() is None
    parallel.set_blas_threads(1)
    with parallel.blas_limit(1):
        pass
    assert parallel.worker_threads() == 1, "without BLAS control the chunks run on the calling thread"


# ----------------------------------------------------------------------------- the process's threads

def test_threads_flag_sets_numba_and_blas_threads():
    numba_before, blas_before = numba.get_num_threads(), parallel.get_blas_threads()
    try:
        parallel.set_threads(1)
        assert numba.get_num_threads() == 1
        if parallel.blas_available():
            assert parallel.get_blas_threads() == 1
    finally:
        numba.set_num_threads(numba_before)
        if blas_before:
            parallel.set_blas_threads(blas_before)


# ----------------------------------------------------------------------------- worker threads over chunks

@pytest.mark.parametrize("n, item_bytes, chunk_bytes, threads", [(1, 8, 1 << 30, 2), (5, 8, 1 << 30, 2),
                                                                 (128, 8, 64, 2), (7, 8, 1, 3), (10, 100, 350, 1)])
def test_split_covers_every_item_once_and_feeds_every_thread(n, item_bytes, chunk_bytes, threads):
    chunks = parallel.split(n, item_bytes, chunk_bytes, threads)
    assert chunks[0][0] == 0 and chunks[-1][1] == n
    assert all(e == s2 for (_, e), (s2, _) in zip(chunks, chunks[1:])), "consecutive, no gap, no overlap"
    assert all(e > s for s, e in chunks), "at least one item per chunk"
    assert len(chunks) >= min(n, threads), f"{n} items, {threads} threads: {len(chunks)} chunks"
    assert all((e - s) * item_bytes <= max(chunk_bytes, item_bytes) for s, e in chunks), "about chunk_bytes each"


@pytest.mark.parametrize("n, step, threads", [(128, 42, 2), (128, 64, 2), (100, 30, 2), (7, 2, 3), (3, 1, 2),
                                              (2, 1, 3)])
def test_split_gives_every_thread_the_same_work(n, step, threads):
    """Chunk sizes differ by at most one item and their number is a multiple of the threads (as
    long as there are items for that): 128 items at most 42 per chunk are 4 x 32, not 42, 42, 42, 2."""
    sizes = [e - s for s, e in parallel.split(n, 1, step, threads)]
    assert sum(sizes) == n and max(sizes) - min(sizes) <= 1, sizes
    assert max(sizes) <= step, sizes
    assert len(sizes) % threads == 0 or len(sizes) == n, f"{len(sizes)} chunks for {threads} threads"
    assert parallel.split(0, 1, step, threads) == []


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: d.__name__)
def test_blas_gemm_accumulates_with_beta_one(dtype):
    gemm = parallel.blas_gemm(dtype)
    if gemm is None:
        pytest.skip("no CBLAS GEMM of NumPy's OpenBLAS here")
    rng = np.random.default_rng(0)
    a = rng.standard_normal((7, 5)).astype(dtype)  # used transposed: (5, 7)
    b = rng.standard_normal((7, 3)).astype(dtype)
    c = rng.standard_normal((5, 3)).astype(dtype)
    expected = c.astype(np.float64) + a.T.astype(np.float64) @ b
    gemm(parallel.ROW_MAJOR, parallel.TRANS, parallel.NO_TRANS, 5, 3, 7, 1.0, a.ctypes.data, 5,
         b.ctypes.data, 3, 1.0, c.ctypes.data, 3)
    np.testing.assert_allclose(c, expected, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-5)


def test_blas_gemm_is_none_without_openblas(monkeypatch):
    monkeypatch.setattr(parallel, "_gemms", None)
    monkeypatch.setattr(parallel, "_mapped_openblas_paths", lambda: [])
    assert parallel.blas_gemm(np.float32) is None and parallel.blas_gemm(np.float64) is None


def test_blas_gemm_is_found_on_linux_wheels():
    if not (sys.platform.startswith("linux") and numpy_uses_openblas()):
        pytest.skip("only NumPy's OpenBLAS on Linux exports the 64-bit-integer CBLAS GEMM we call")
    assert parallel.blas_gemm(np.float32) is not None and parallel.blas_gemm(np.float64) is not None


@pytest.mark.parametrize("n, threads", [(0, 2), (1, 2), (3, 2), (4, 2), (12, 2), (13, 2), (12, 3), (7, 1)])
def test_summing_groups_are_consecutive_and_two_per_thread(n, threads):
    """A timing-independent sum needs groups fixed by the chunks and the thread count alone:
    consecutive, every chunk in one, two per thread (one for a single thread), sizes within one."""
    chunks = [(i, i + 1) for i in range(n)]
    groups = parallel.summing_groups(chunks, threads)
    assert [chunk for group in groups for chunk in group] == chunks, "consecutive, each chunk once"
    assert len(groups) == min(n, 2 * threads if threads > 1 else 1), f"{len(groups)} groups"
    sizes = [len(group) for group in groups]
    assert not sizes or (min(sizes) >= 1 and max(sizes) - min(sizes) <= 1), sizes


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_run_on_threads_gives_each_chunk_to_exactly_one_worker(threads):
    def worker(my_chunks):
        return [(chunk, threading.current_thread().name) for chunk in my_chunks]

    results = parallel.run_on_threads(list(range(20)), threads, worker, name="test-worker")
    assert len(results) == min(threads, 20)
    done = sorted(chunk for result in results for chunk, _ in result)
    assert done == list(range(20))
    names = {name for result in results for _, name in result}
    if threads == 1:
        assert names == {threading.current_thread().name}, "one thread: the caller does the work"
    else:
        assert all(name.startswith("test-worker") for name in names)


def test_run_on_threads_returns_each_workers_result_and_raises_its_error():
    results = parallel.run_on_threads([1, 2, 3], 2, lambda chunks: sum(chunks), name="test-sum")
    assert len(results) == 2 and sum(results) == 6

    def failing(chunks):
        list(chunks)
        raise RuntimeError("worker failed")

    with pytest.raises(RuntimeError, match="worker failed"):
        parallel.run_on_threads([1, 2], 2, failing, name="test-fail")
