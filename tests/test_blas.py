"""nanoq4.blas: NumPy's OpenBLAS thread count, changed and restored from inside the process."""
import sys

import numpy as np
import pytest

from nanoq4 import blas


def numpy_uses_openblas():
    info = np.show_config(mode="dicts").get("Build Dependencies", {}).get("blas", {})
    return "openblas" in str(info.get("name", "")).lower()


def test_openblas_is_found_on_linux_wheels():
    # The Winograd convolutions are ~1.8x slower per training step without this: make losing it loud.
    if not (sys.platform.startswith("linux") and numpy_uses_openblas()):
        pytest.skip("only NumPy's OpenBLAS on Linux is controllable")
    assert blas.available()
    assert blas.get_threads() >= 1


@pytest.mark.skipif(not blas.available(), reason="BLAS thread count not controllable here")
def test_limit_sets_and_restores_the_thread_count():
    before = blas.get_threads()
    with blas.limit(1):
        assert blas.get_threads() == 1
        a = np.random.default_rng(0).standard_normal((300, 200))
        np.testing.assert_allclose(a @ a.T, np.einsum("ik,jk->ij", a, a), rtol=1e-10, atol=1e-10)
    assert blas.get_threads() == before


@pytest.mark.skipif(not blas.available(), reason="BLAS thread count not controllable here")
def test_limit_restores_after_an_exception():
    before = blas.get_threads()
    with pytest.raises(RuntimeError):
        with blas.limit(1):
            raise RuntimeError("boom")
    assert blas.get_threads() == before


@pytest.mark.skipif(not blas.available(), reason="BLAS thread count not controllable here")
def test_set_threads():
    before = blas.get_threads()
    try:
        blas.set_threads(1)
        assert blas.get_threads() == 1
    finally:
        blas.set_threads(before)
    assert blas.get_threads() == before


def test_without_openblas_everything_is_a_no_op(monkeypatch):
    monkeypatch.setattr(blas, "_api", False)
    assert not blas.available() and blas.get_threads() is None
    blas.set_threads(1)
    with blas.limit(1):
        pass
