"""Fetch CIFAR-10 and/or CIFAR-100 into the data folder: the official archives, MD5-checked,
then extracted (the same library code the trainer runs when the data is missing).

    python data_scripts/download_cifar.py cifar10 cifar100 --data-dir ~/data

Without --data-dir the folder is $NANOQ4_DATA, else ./data. Data already there is kept;
an archive placed there by hand is extracted instead of downloaded.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from nanoq4 import cli  # noqa: E402
from nanoq4.data import CIFAR_SOURCES, ensure_cifar, resolve_data_dir  # noqa: E402


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("datasets", nargs="*", metavar="DATASET",
                        help=f"any of {', '.join(sorted(CIFAR_SOURCES))} (default: both)")
    parser.add_argument("--data-dir", help="data folder (default: $NANOQ4_DATA, else ./data)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    unknown = [name for name in args.datasets if name not in CIFAR_SOURCES]
    if unknown:  # refused before anything is downloaded
        parser.error(f"unknown dataset {unknown[0]!r}; choose {' or '.join(sorted(CIFAR_SOURCES))}")

    def body():
        root = resolve_data_dir(args.data_dir)
        for name in args.datasets or sorted(CIFAR_SOURCES):
            folder = ensure_cifar(name, root, download=True, progress=not args.no_progress)
            print(f"{name}: {folder}")
        return 0

    return cli.run_command(body)


if __name__ == "__main__":
    sys.exit(main())
