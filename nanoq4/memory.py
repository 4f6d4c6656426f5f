"""Process memory: keep freed memory in the heap for reuse instead of returning it to the OS.

Why: glibc's malloc serves every block above its mmap threshold (32 MiB at most, and the
activations of a VGG4bit step at batch 256 are up to 64 MiB each) with a fresh mmap and gives it
back with munmap when it is freed. Every training step then maps its activations anew, and the
kernel faults in and zeroes every 4 KiB page of them on first touch: thousands of page faults per
step (benchmarks/bench_train_step.py counts them). Telling malloc never to use mmap
(M_MMAP_MAX = 0) and never to trim the heap (M_TRIM_THRESHOLD at its maximum) keeps those blocks
in the heap, so from the second step on the same memory is handed out again.

The price: the process keeps its peak heap size until it exits (RSS does not drop after, say,
an evaluation at a large batch); the peak itself does not change. Linux with glibc only; with
another C library (musl's mallopt does nothing) or on another system nothing changes.
"""
import ctypes

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_MAX = -4


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse (no mmap, no trimming) for the rest of
    the process. Returns True when it accepted, False where there is no such malloc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1
