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
