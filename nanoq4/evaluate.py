"""`python -m nanoq4.evaluate MODEL.nq4 --dataset cifar10`: accuracy of an exported int4 model
file on a test set, per-class accuracy and the confusion matrix (text; PNG with matplotlib)."""
import os
import sys
from pathlib import Path

import numpy as np

from . import cli, data
from .errors import NanoQ4Error
from .export import load_model
from .tensor import Tensor, no_grad
from .tta import TTA_MODES, check_tta_mode, predict_logits

def confusion_matrix(labels, predictions, num_classes):
    """counts[true, predicted]."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (labels, predictions), 1)
    return counts


def evaluate_file(model_path, dataset_spec, data_dir=None, download=True, coarse=False, batch_size=250,
                  tta="none"):
    """-> dict(accuracy, per_class, confusion, classes, tta) of the model file on the dataset's test
    split (the training images are not read). The model's class names must be the dataset's."""
    check_tta_mode(tta)
    data.check_dataset_spec(dataset_spec, coarse)
    model = load_model(model_path)
    dataset = data.load_dataset(dataset_spec, data_dir, download=download, coarse=coarse,
                                image_size=model.input_size, train=False)
    check_class_names(model_path, model.class_names, dataset_spec, dataset.classes)
    with no_grad():
        logits = predict_logits(lambda xb: model.model(Tensor(xb)).data, dataset.x_test, model.mean, model.std,
                                tta, batch_size)
    predictions = logits.argmax(axis=1)
    confusion = confusion_matrix(dataset.y_test, predictions, len(model.class_names))
    per_class = np.diag(confusion) / np.maximum(confusion.sum(axis=1), 1)
    return dict(accuracy=float((predictions == dataset.y_test).mean()), per_class=per_class,
                confusion=confusion, classes=model.class_names, tta=tta)


def check_class_names(model_path, model_classes, dataset_spec, dataset_classes):
    """Label k must mean the same class to the model and the dataset, else the accuracy is wrong."""
    model_classes, dataset_classes = [str(c) for c in model_classes], [str(c) for c in dataset_classes]
    if len(model_classes) != len(dataset_classes):
        raise NanoQ4Error(f"{model_path} predicts {len(model_classes)} classes but {dataset_spec} has "
                          f"{len(dataset_classes)}; evaluate it on the dataset it was trained on")
    differ = [k for k, (a, b) in enumerate(zip(model_classes, dataset_classes)) if a != b]
    if differ:
        k = differ[0]
        raise NanoQ4Error(f"{model_path} was trained on other classes than {dataset_spec} has: class {k} is "
                          f"{model_classes[k]!r} in the model but {dataset_classes[k]!r} in the dataset "
                          f"({len(differ)} of {len(model_classes)} differ); evaluate it on the dataset it was "
                          f"trained on")


def format_report(result):
    names = [str(c)[:12] for c in result["classes"]]
    how = "" if result.get("tta", "none") == "none" else f", test-time augmentation {result['tta']}"
    lines = [f"test accuracy: {result['accuracy']:.2%} ({result['confusion'].sum()} images{how})", "",
             "per-class accuracy:"]
    lines += [f"  {name:<12} {acc:7.2%}" for name, acc in zip(names, result["per_class"])]
    if len(names) <= 20:
        lines += ["", "confusion matrix (rows: true class, columns: predicted class number):",
                  " " * 17 + "".join(f"{i:>6}" for i in range(len(names)))]
        lines += [f"{i:>3} {name:<13}" + "".join(f"{v:>6}" for v in row)
                  for i, (name, row) in enumerate(zip(names, result["confusion"]))]
    return "\n".join(lines)


def check_plot_path(path):
    """Refuse a --plot path that cannot be written before the evaluation runs."""
    path = Path(path)
    if path.is_dir():
        raise NanoQ4Error(f"--plot {path} is a folder; give a file name such as {path / 'confusion.png'}")
    folder = path.parent
    if not folder.is_dir():
        raise NanoQ4Error(f"--plot {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise NanoQ4Error(f"--plot {path}: no permission to write in {folder}")


def plot_confusion(result, path):
    """The confusion matrix as a PNG, when matplotlib is installed; an unwritable path is a NanoQ4Error."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    k = len(result["classes"])
    fig, ax = plt.subplots(figsize=(max(5, k * 0.5), max(4, k * 0.45)))
    im = ax.imshow(result["confusion"], cmap="Blues")
    if k <= 20:
        ax.set_xticks(range(k), result["classes"], rotation=90)
        ax.set_yticks(range(k), result["classes"])
    ax.set_xlabel("predicted"), ax.set_ylabel("true")
    ax.set_title(f"accuracy {result['accuracy']:.2%}")
    fig.colorbar(im)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100, format="png")
    except OSError as e:
        raise NanoQ4Error(f"cannot write the confusion plot {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    return True


def main(argv=None):
    p = cli.ArgumentParser(prog="python -m nanoq4.evaluate",
                           description="Accuracy of an exported int4 model file (.nq4) on a test set "
                                       "(only its test split is read).")
    p.add_argument("model", help="the .nq4 model file")
    p.add_argument("--dataset", default="cifar10", help=f"{data.DATASET_CHOICES} (default %(default)s)")
    p.add_argument("--data-dir", help="data folder (default $NANOQ4_DATA, else ./data)")
    p.add_argument("--coarse", action="store_true", help="CIFAR-100 coarse labels")
    p.add_argument("--no-download", action="store_true", help="never download missing data")
    p.add_argument("--tta", choices=TTA_MODES, default="none",
                   help="test-time augmentation: none, flip (2 views) or flip-translate (6 views: flip pairs of "
                        "the image and of 1-pixel shifts); use the trainer's --tta to reproduce its final number "
                        "(default %(default)s)")
    p.add_argument("--plot", help="confusion-matrix PNG path (default: next to the model, skipped when that "
                                  "folder is not writable; needs matplotlib)")
    args = p.parse_args(argv)

    def body():
        if args.plot:
            check_plot_path(args.plot)
        result = evaluate_file(args.model, args.dataset, args.data_dir, not args.no_download, args.coarse,
                               tta=args.tta)
        print(format_report(result))
        png = Path(args.plot) if args.plot else Path(args.model).with_suffix(".confusion.png")
        if not args.plot and not os.access(png.parent, os.W_OK | os.X_OK):
            return 0  # a model in a read-only folder: the plot nobody asked for is skipped
        if plot_confusion(result, png):
            print(f"\nconfusion matrix plot: {png}")
        return 0

    return cli.run_command(body)


if __name__ == "__main__":
    sys.exit(main())
