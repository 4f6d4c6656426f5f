"""`python -m nanoq4.predict MODEL.nq4 image.png [more ...]`: the top-5 classes of each image
according to an exported int4 model file. Pillow reads the image and resizes it to 32x32."""
import argparse
import sys

import numpy as np

from .data import load_image
from .errors import NanoQ4Error
from .export import load_model


def predict_files(model_path, image_paths, top=5):
    """-> [(path, [(class name, probability), ...]), ...] best first."""
    model = load_model(model_path)
    images = np.stack([load_image(p, model.input_size) for p in image_paths])
    probs = model.predict_proba(images)
    results = []
    for path, p in zip(image_paths, probs):
        best = np.argsort(-p, kind="stable")[:top]
        results.append((path, [(model.class_names[i], float(p[i])) for i in best]))
    return results


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m nanoq4.predict",
                                description="Top-5 classes of image files from an exported int4 model file.")
    p.add_argument("model", help="the .nq4 model file")
    p.add_argument("images", nargs="+", help="image files (any format Pillow reads)")
    p.add_argument("--top", type=int, default=5, help="how many classes to show (default %(default)s)")
    args = p.parse_args(argv)
    try:
        results = predict_files(args.model, args.images, args.top)
    except NanoQ4Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, ranked in results:
        print(path)
        for name, prob in ranked:
            print(f"  {prob:7.2%}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
