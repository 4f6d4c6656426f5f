"""How many threads NumPy's BLAS (OpenBLAS) uses, set from inside the process.

Why: winograd.py runs one chunk of images per core, and each chunk's small GEMMs must then use
a single BLAS thread; left at two threads, the two chunks' GEMMs fight over the same cores and
meet at a barrier thousands of times per layer (measured 1.8x slower per training step).
OpenBLAS reads OPENBLAS_NUM_THREADS only when it loads, so the count is changed at run time by
calling its own `openblas_set_num_threads` through ctypes (what threadpoolctl does, without
adding a dependency). The library is found among the shared objects this process has mapped
(/proc/self/maps, Linux); elsewhere, or with a BLAS other than OpenBLAS, `available()` is False
and callers keep BLAS as it is.
"""
import contextlib
import ctypes

import numpy as np  # noqa: F401  (loads NumPy's BLAS, so it is mapped when we look)

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


def available():
    """True when NumPy's BLAS is an OpenBLAS whose thread count can be changed here."""
    return bool(_lookup())


def get_threads():
    """BLAS threads now in use, or None when unknown (not OpenBLAS)."""
    api = _lookup()
    return api[1]() if api else None


def set_threads(threads):
    """Use `threads` BLAS threads from now on (no effect when not available())."""
    api = _lookup()
    if api:
        api[0](max(1, int(threads)))


@contextlib.contextmanager
def limit(threads):
    """BLAS held to `threads` threads inside the block, restored after. The count is global to
    the process: call this from the thread that starts the work (winograd does it from the
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
