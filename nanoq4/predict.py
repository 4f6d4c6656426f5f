"""`python -m nanoq4.predict MODEL.nq4 image.png [more ...]`: the top-5 classes of each image
according to an exported int4 model file. Pillow reads the image (any mode, 16-bit included:
data.to_rgb8) and resizes it to 32x32. Unreadable images are reported one line each on stderr,
the others still predicted, and the exit code is 2 if any image was unreadable."""
import sys

import numpy as np

from . import cli
from .data import load_image
from .errors import NanoQ4Error
from .export import load_model


def predict_files(model_path, image_paths, top=5, unreadable=None):
    """-> [(path, [(class name, probability), ...]), ...] best first, for each readable image.
    unreadable: a list that collects (path, NanoQ4Error) of images that cannot be read; without
    it the first such image raises."""
    if int(top) < 1:
        raise NanoQ4Error(f"--top must be >= 1, got {top}")
    model = load_model(model_path)
    paths, images = [], []
    for path in image_paths:
        try:
            images.append(load_image(path, model.input_size))
        except NanoQ4Error as e:
            if unreadable is None:
                raise
            unreadable.append((path, e))
            continue
        paths.append(path)
    if not images:
        return []
    probs = model.predict_proba(np.stack(images))
    results = []
    for path, p in zip(paths, probs):
        best = np.argsort(-p, kind="stable")[:top]
        results.append((path, [(model.class_names[i], float(p[i])) for i in best]))
    return results


def main(argv=None):
    p = cli.ArgumentParser(prog="python -m nanoq4.predict",
                           description="Top-5 classes of image files from an exported int4 model file. "
                                       "Unreadable images are reported on stderr, the others still "
                                       "predicted; the exit code is then 2.")
    p.add_argument("model", help="the .nq4 model file")
    p.add_argument("images", nargs="+", help="image files (any format and mode Pillow reads, 16-bit included)")
    p.add_argument("--top", type=cli.int_at_least(1), default=5,
                   help="how many classes to show, >= 1 (default %(default)s)")
    args = p.parse_args(argv)

    def body():
        unreadable = []
        for path, ranked in predict_files(args.model, args.images, args.top, unreadable):
            print(path)
            for name, prob in ranked:
                print(f"  {prob:7.2%}  {name}")
        for _, error in unreadable:
            print(f"error: {error}", file=sys.stderr)
        return 2 if unreadable else 0

    return cli.run_command(body)


if __name__ == "__main__":
    sys.exit(main())
