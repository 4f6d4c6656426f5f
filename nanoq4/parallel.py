"""Parallel execution on the CPU: how many threads Numba's kernels and NumPy's BLAS use, and how
the Winograd convolution's chunks of images are spread over the cores.

Threads of the process. `set_threads` (the trainer's --threads) sets both Numba's thread count
and BLAS's. Numba's is per calling thread; BLAS's is global to the process.

BLAS thread control. OpenBLAS reads OPENBLAS_NUM_THREADS only when it loads, so the count is
changed at run time by calling its own `openblas_set_num_threads` through ctypes (what
threadpoolctl does, without adding a dependency). The library is found among the shared objects
this process has mapped (/proc/self/maps, Linux); elsewhere, or with a BLAS other than OpenBLAS,
`blas_available()` is False and callers keep BLAS as it is.

GEMM from Numba kernels. `blas_gemm` hands out OpenBLAS's CBLAS GEMM as a ctypes function, which a
Numba kernel takes as an argument and calls in a loop without the GIL: Winograd's backward runs its
72 small GEMMs per chunk that way, in one call from Python, with beta = 1 where it accumulates.

Worker threads over chunks (winograd.py's scheduling). Parallelism there is over chunks of
images, not inside them: each of numba.get_num_threads() worker threads takes whole chunks
(transform, 16 single-threaded GEMMs, transform) and nothing synchronizes until the layer is done.
Running each chunk on all threads instead -- parallel kernels, then multi-threaded BLAS on each of
the 16 small GEMMs -- meets at a barrier thousands of times per layer; on cores shared with other
processes each barrier waits for a descheduled thread, and that version ran many times slower.
So BLAS is held to one thread (`blas_limit`) while the workers run, and each worker sets its own
Numba thread count to 1. Where the BLAS thread count cannot be changed, or Numba's threading layer
does not accept kernel launches from several threads, the chunks run one after another on the
calling thread, with parallel kernels and multi-threaded BLAS.

Sums over chunks (the weight gradient of Winograd's backward). First come first served decides
which thread takes which chunk by timing, and float addition is not associative: a worker that
summed the chunks it happened to take would make the total's bits depend on the timing, so two
runs with one seed would differ and --resume would not continue a run bit for bit. Such a sum
goes by `summing_groups` instead: a fixed number of consecutive groups of chunks, each summed in
order by the one thread that claims it (the threads claim whole groups first come first served),
and the groups' sums added in group order. The total then depends on the chunking and the thread
count, both fixed in a run, and not on timing. Two groups per thread keep some load balancing (a
thread held back takes fewer groups) for one more partial sum per thread in memory.
"""
import collections
import concurrent.futures
import contextlib
import ctypes
import os

import numba
import numpy as np  # also loads NumPy's BLAS, so it is mapped when we look


def set_threads(threads):
    """Use `threads` threads for Numba's parallel kernels and for BLAS (None: leave both as they are)."""
    if not threads:
        return
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    set_blas_threads(threads)


# ----------------------------------------------------------------------------- BLAS threads

# Exported names of the setter/getter, newest NumPy wheels first (scipy-openblas, 64-bit ints).
_SYMBOL_FORMS = [("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
                 ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
                 ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
                 ("openblas_set_num_threads", "openblas_get_num_threads")]

_api = None  # (setter, getter) once looked up; False when no OpenBLAS was found


def _mapped_openblas_paths():
    try:
        with open("/proc/self/maps") as maps:
            fields = [line.split(None, 5) for line in maps]  # address perms offset dev inode path
    except OSError:
        return []
    paths = {f[5].strip() for f in fields if len(f) == 6}
    return sorted(p for p in paths if "openblas" in p.lower() and ".so" in p)


def _lookup():
    global _api
    if _api is None:
        _api = False
        for path in _mapped_openblas_paths():
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for set_name, get_name in _SYMBOL_FORMS:
                setter, getter = getattr(lib, set_name, None), getattr(lib, get_name, None)
                if setter is not None and getter is not None:
                    setter.argtypes, setter.restype = [ctypes.c_int], None
                    getter.argtypes, getter.restype = [], ctypes.c_int
                    _api = (setter, getter)
                    return _api
    return _api


# CBLAS GEMMs with 64-bit integer arguments (ILP64), as NumPy's OpenBLAS wheels export them.
_GEMM_FORMS = [("scipy_cblas_sgemm64_", "scipy_cblas_dgemm64_"), ("cblas_sgemm64_", "cblas_dgemm64_")]
ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112  # CBLAS enum values

_gemms = None  # {dtype: CBLAS GEMM} once looked up; empty when none was found


def blas_gemm(dtype):
    """The CBLAS GEMM of NumPy's OpenBLAS for float32 or float64, as a ctypes function that Numba
    kernels take as an argument and call without the GIL or Python's per-call cost (a Python loop
    of ctypes calls pays both per GEMM); None when not found (not OpenBLAS, or not its
    64-bit-integer build). Arguments: order, transA, transB, M, N, K, alpha, A, lda, B, ldb, beta,
    C, ldc, with the matrices passed as addresses (64-bit integers: how a pointer travels on the
    64-bit platforms NumPy's wheels serve)."""
    global _gemms
    if _gemms is None:
        _gemms = _lookup_gemms()  # published whole: a worker thread never sees it half filled
    return _gemms.get(np.dtype(dtype))


def _lookup_gemms():
    if ctypes.sizeof(ctypes.c_void_p) != 8:
        return {}
    for path in _mapped_openblas_paths():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for names in _GEMM_FORMS:
            functions = [getattr(lib, name, None) for name in names]
            if None in functions:
                continue
            for function, real in zip(functions, (ctypes.c_float, ctypes.c_double)):
                i64, address = ctypes.c_int64, ctypes.c_uint64
                function.argtypes = ([ctypes.c_int] * 3 + [i64] * 3
                                     + [real, address, i64, address, i64, real, address, i64])
                function.restype = None
            return {np.dtype(np.float32): functions[0], np.dtype(np.float64): functions[1]}
    return {}


def blas_available():
    """True when NumPy's BLAS is an OpenBLAS whose thread count can be changed here."""
    return bool(_lookup())


def get_blas_threads():
    """BLAS threads now in use, or None when unknown (not OpenBLAS)."""
    api = _lookup()
    return api[1]() if api else None


def set_blas_threads(threads):
    """Use `threads` BLAS threads from now on (no effect when not blas_available())."""
    api = _lookup()
    if api:
        api[0](max(1, int(threads)))


@contextlib.contextmanager
def blas_limit(threads):
    """BLAS held to `threads` threads inside the block, restored after. The count is global to
    the process: call this from the thread that starts the work (run_on_threads does it from the
    caller, around its workers), not from the workers themselves."""
    api = _lookup()
    if not api:
        yield
        return
    before = api[1]()
    api[0](max(1, int(threads)))
    try:
        yield
    finally:
        api[0](before)


# ----------------------------------------------------------------------------- worker threads over chunks

def split(n, item_bytes, chunk_bytes, threads):
    """[(first, end), ...]: n items in consecutive chunks of at most `chunk_bytes` (`item_bytes`
    each), at least one item per chunk. The chunks are as equal as the items allow and their
    number is a multiple of `threads` (unless there are fewer items), so every thread gets the
    same work: 128 items in chunks of at most 42 would otherwise be 42, 42, 42, 2, and one of two
    threads would do 84 while the other did 44."""
    if n == 0:
        return []
    step = max(1, chunk_bytes // item_bytes)
    count = -(-n // step)
    count = min(n, -(-count // threads) * threads)
    bounds = [n * i // count for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def worker_threads():
    """Worker threads for chunked work: Numba's thread count, when BLAS can be held to one thread
    per call (blas_available()) and Numba's threading layer accepts kernel launches from several
    threads at once (omp, tbb; not workqueue). Otherwise 1: the chunks then run one after another
    on the calling thread, with parallel kernels and multi-threaded BLAS."""
    if not blas_available() or numba.get_num_threads() == 1:
        return 1
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet, so no layer is loaded
        return 1
    return numba.get_num_threads() if layer in ("omp", "tbb") else 1


_executors = {}  # (process id, thread count, name) -> ThreadPoolExecutor; a forked child makes its own


def _single_threaded_worker():
    numba.set_num_threads(1)  # per thread: this worker's kernels run serially


def summing_groups(chunks, threads, groups_per_thread=2):
    """[[chunk, ...], ...]: `chunks` in consecutive groups for a sum that must not depend on which
    thread takes which chunk (module docstring): groups_per_thread groups per thread (as equal as
    the chunks allow, at most one chunk more or less), one group for a single thread."""
    count = min(len(chunks), groups_per_thread * threads if threads > 1 else 1)
    bounds = [len(chunks) * i // count for i in range(count + 1)] if count else [0]
    return [chunks[s:e] for s, e in zip(bounds[:-1], bounds[1:])]


def run_on_threads(chunks, threads, worker, name="worker"):
    """Call worker(chunk_iterator) once per thread; the threads share `chunks` first come first
    served (a slow or descheduled thread simply takes fewer), each with one Numba thread, BLAS held
    to one thread meanwhile. One thread: worker runs on the caller. The threads are named
    name_0, name_1, ... and kept for the next call. Returns the workers' results, which depend
    on which chunks each worker took: a sum over chunks goes by summing_groups."""
    pending = collections.deque(chunks)

    def take():
        while True:
            try:
                yield pending.popleft()  # atomic: each chunk goes to exactly one thread
            except IndexError:
                return

    threads = min(threads, len(chunks))
    if threads == 1:
        return [worker(take())]
    key = (os.getpid(), threads, name)
    if key not in _executors:
        _executors[key] = concurrent.futures.ThreadPoolExecutor(
            threads, thread_name_prefix=name, initializer=_single_threaded_worker)
    with blas_limit(1):
        futures = [_executors[key].submit(worker, take()) for _ in range(threads)]
        concurrent.futures.wait(futures)
    return [f.result() for f in futures]
