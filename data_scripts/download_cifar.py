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
from nanoq4.data import CIFAR_SOURCES, ensure_cifar, resolve_data_dir  # noqa: E402
from nanoq4.errors import NanoQ4Error  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("datasets", nargs="*", metavar="DATASET",
                        help=f"any of {', '.join(sorted(CIFAR_SOURCES))} (default: both)")
    parser.add_argument("--data-dir", help="data folder (default: $NANOQ4_DATA, else ./data)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    root = resolve_data_dir(args.data_dir)
    try:
        for name in args.datasets or sorted(CIFAR_SOURCES):
            folder = ensure_cifar(name, root, download=True, progress=not args.no_progress)
            print(f"{name}: {folder}")
    except NanoQ4Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
