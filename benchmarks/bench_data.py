"""How fast batches are built: gather + random crop + flip + normalize of CIFAR-sized images
from a 50,000-image uint8 array, as the trainer sees it (BatchLoader, fresh output per batch).

    python benchmarks/bench_data.py [--batch-size 128]

Other benchmarks can `from bench_data import bench_batch_ms`.
"""

import argparse
import sys
import time
from pathlib import Path

import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from nanoq4 import cli  # noqa: E402
from nanoq4.data import (CIFAR_MEAN, CIFAR_STD, CROP_PADDING, BatchLoader,  # noqa: E402
                         augment_batch, augment_batch_reference, normalization_table)

N_IMAGES = 50_000


def _training_images(n=N_IMAGES):
    return np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _median_batch_ms(loader, n_batches):
    """Median wall time per batch over n_batches consecutive batches (epochs repeat as needed),
    after one untimed batch that compiles the kernel or loads it from Numba's cache."""
    next(iter(loader))
    times = []
    epoch = 0
    while len(times) < n_batches:
        loader.set_epoch(epoch)
        start = time.perf_counter()
        for _ in loader:
            times.append(time.perf_counter() - start)
            if len(times) == n_batches:
                break
            start = time.perf_counter()
        epoch += 1
    return 1e3 * float(np.median(times))


def bench_batch_ms(batch_size=128, n_batches=200, augment=True, images=None):
    """Median milliseconds to build one shuffled float32 NHWC batch with BatchLoader, cropped
    and flipped when `augment`, from `images` (default: 50,000 random CIFAR-sized images)."""
    images = _training_images() if images is None else images
    labels = np.zeros(len(images), np.int64)
    loader = BatchLoader(images, labels, batch_size, CIFAR_MEAN, CIFAR_STD, augment=augment,
                         shuffle=True)
    return _median_batch_ms(loader, n_batches)


def _median_call_ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main():
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=cli.int_at_least(1), default=128, help="images per batch (default 128)")
    parser.add_argument("--batches", type=cli.int_at_least(1), default=300, help="timed batches per figure")
    args = parser.parse_args()
    b = args.batch_size
    images = _training_images()

    rng = np.random.default_rng(1)
    args_in = (images, rng.permutation(len(images))[:b],
               *rng.integers(0, 2 * CROP_PADDING + 1, (2, b)), rng.random(b) < 0.5,
               normalization_table(CIFAR_MEAN, CIFAR_STD), CROP_PADDING)
    out = np.empty((b, 32, 32, 3), np.float32)
    augment_batch(*args_in, out)
    if not np.array_equal(out, augment_batch_reference(*args_in)):
        raise SystemExit("augment_batch disagrees with its NumPy twin; not timing it")

    print(f"batch of {b} CIFAR images from {len(images):,} in memory, "
          f"{numba.get_num_threads()} numba threads ({numba.threading_layer()} layer)")
    rows = [
        ("BatchLoader, augmented (crop+flip+normalize)",
         bench_batch_ms(b, args.batches, augment=True, images=images)),
        ("BatchLoader, eval (normalize only)",
         bench_batch_ms(b, args.batches, augment=False, images=images)),
        ("augment_batch kernel alone, reused buffer",
         _median_call_ms(lambda: augment_batch(*args_in, out), args.batches)),
        ("augment_batch_reference (NumPy twin)",
         _median_call_ms(lambda: augment_batch_reference(*args_in), 30)),
    ]
    for name, ms in rows:
        print(f"  {name:<46} {ms:7.3f} ms/batch  {b / ms * 1e3:>11,.0f} images/s")


if __name__ == "__main__":
    main()
