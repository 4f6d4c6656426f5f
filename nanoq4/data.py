"""Datasets and batches: CIFAR-10/100 (official python layout), image folders, synthetic
images, and a deterministic batch loader whose crop/flip/normalize runs as one Numba pass.

Images are held once in memory as uint8 NHWC (N, H, W, 3); batches come out as float32 NHWC.
Everything random is drawn from numpy Generators seeded by (seed, epoch), never inside kernels.
"""

import hashlib
import http.client
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from numba import njit, prange
from PIL import Image, ImageOps
from tqdm import tqdm

from .errors import NanoQ4Error

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
CROP_PADDING = 4  # pixels of zero padding around each image before the random crop
DOWNLOAD_TIMEOUT_S = 20
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DATASET_CHOICES = "cifar10, cifar100, synthetic or folder:PATH"
FLIP_MODES = ("random", "alternate")  # how the augmentation's horizontal flips are drawn (see alternating_flips)


@dataclass
class Dataset:
    """A train/test split held in memory: images uint8 (N, H, W, 3) C-contiguous, labels int64."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list
    mean: tuple  # per-channel normalization in [0, 1] units
    std: tuple

    @property
    def num_classes(self):
        return len(self.classes)


def _one_line(exc):
    """First line of an exception's text, so every NanoQ4Error message stays one line."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


# ---------------------------------------------------------------- data folder, download, archives

@dataclass(frozen=True)
class _CifarSource:
    title: str
    folder: str  # what the official archive extracts to
    archive: str
    url: str
    md5: str  # published on https://www.cs.toronto.edu/~kriz/cifar.html


CIFAR_SOURCES = {
    "cifar10": _CifarSource("CIFAR-10", "cifar-10-batches-py", "cifar-10-python.tar.gz",
                            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                            "c58f30108f718f92721af3b95e74349a"),
    "cifar100": _CifarSource("CIFAR-100", "cifar-100-python", "cifar-100-python.tar.gz",
                             "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                             "eb9058c3a382ffc7106e4002c42a8d85"),
}


def resolve_data_dir(data_dir=None):
    """The data folder: the --data-dir value, else $NANOQ4_DATA, else ./data (made absolute so
    error messages say exactly where we looked)."""
    chosen = data_dir or os.environ.get("NANOQ4_DATA") or "data"
    return Path(chosen).expanduser().absolute()


def _cifar_source(name):
    if name not in CIFAR_SOURCES:
        raise NanoQ4Error(f"unknown CIFAR dataset {name!r}; choose {' or '.join(CIFAR_SOURCES)}")
    return CIFAR_SOURCES[name]


def _how_to_provide(source, root):
    return (f"pass --data-dir DIR or set NANOQ4_DATA to a folder holding {source.folder}/ "
            f"or {source.archive}, or place {source.archive} in {root}")


def ensure_cifar(name, root, download=True, progress=True):
    """Path of the extracted official folder for `name` ("cifar10"/"cifar100") under `root`:
    found as is, else extracted from an archive placed there, else downloaded (if allowed)."""
    source = _cifar_source(name)
    root = Path(root)
    if (root / source.folder).is_dir():
        return root / source.folder
    if (root / source.archive).is_file():
        return safe_extract(root / source.archive, root, source.folder)
    if download:
        return download_cifar(name, root, progress=progress)
    raise NanoQ4Error(f"{source.title} not found: looked for {root / source.folder} and "
                      f"{root / source.archive}; {_how_to_provide(source, root)}")


def download_cifar(name, root, url=None, md5=None, progress=True):
    """Download the official archive into `root`, check its MD5, then extract it; returns the
    extracted folder. The archive only takes its final name once the checksum has passed, so
    an interrupted or corrupted download never looks like data."""
    source = _cifar_source(name)
    root = Path(root)
    url = url or source.url
    md5 = md5 or source.md5
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NanoQ4Error(f"cannot create data folder {root}: {_one_line(e)}") from e
    part = tempfile.NamedTemporaryFile(dir=root, prefix=f".{source.archive}.", suffix=".part",
                                       delete=False)
    try:
        with part:
            # URLError, refused connections and timeouts are OSErrors; a dropped connection
            # is an http.client.IncompleteRead, a malformed URL a ValueError
            try:
                digest = _fetch(url, part, progress)
            except (OSError, ValueError, http.client.HTTPException) as e:
                if isinstance(e, urllib.error.HTTPError):
                    e.close()  # an HTTP error status carries the open response
                reason = _one_line(getattr(e, "reason", e))
                raise NanoQ4Error(f"cannot download {url} ({reason}); {source.title} was looked "
                                  f"for in {root}: {_how_to_provide(source, root)}") from e
        if digest != md5:
            raise NanoQ4Error(f"download of {url} is corrupted (md5 {digest}, expected {md5}); "
                              f"it was deleted, try again or {_how_to_provide(source, root)}")
        os.chmod(part.name, 0o644)  # temporary files are created private
        os.replace(part.name, root / source.archive)
    finally:
        Path(part.name).unlink(missing_ok=True)
    return safe_extract(root / source.archive, root, source.folder)


def _fetch(url, file, progress):
    """Stream `url` into an open binary file with a tqdm bar; returns the MD5 hex digest."""
    digest = hashlib.md5()
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
        size = response.headers.get("Content-Length")
        with tqdm(total=int(size) if size else None, unit="B", unit_scale=True,
                  unit_divisor=1024, desc=url.rsplit("/", 1)[-1], disable=not progress) as bar:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                file.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    return digest.hexdigest()


def safe_extract(archive, root, folder):
    """Extract `folder` from a .tar.gz into `root`, all or nothing. Every member is checked first
    (plain files and folders only; no absolute paths, no `..`), everything is written into a
    temporary folder inside `root`, and `folder` is renamed into place only when complete."""
    archive, root = Path(archive), Path(root)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for member in members:
                path = PurePosixPath(member.name)
                plain = member.isfile() or member.isdir()  # no links, devices or fifos
                if path.is_absolute() or ".." in path.parts or not plain:
                    raise NanoQ4Error(f"{archive}: refusing unsafe archive member {member.name!r}")
            staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=root))
            try:
                for member in members:
                    target = staging.joinpath(*PurePosixPath(member.name).parts)
                    if member.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(member) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                if not (staging / folder).is_dir():
                    raise NanoQ4Error(f"{archive}: no {folder}/ inside; is it the right archive?")
                (staging / folder).rename(root / folder)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise NanoQ4Error(f"cannot extract {archive}: {_one_line(e)}") from e
    return root / folder


# ---------------------------------------------------------------- CIFAR pickles

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays: a pickle may name any callable (os.system)
    and call it while loading, and CIFAR files come from the network."""

    ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_pickle(path):
    """A CIFAR pickle as a dict with bytes keys (the official files were written by Python 2)."""
    try:
        with open(path, "rb") as f:
            content = _ArrayUnpickler(f, encoding="bytes").load()
    except FileNotFoundError as e:
        raise NanoQ4Error(f"missing file {path}") from e
    except Exception as e:  # corrupt pickles raise anything: EOFError, UnpicklingError, ...
        raise NanoQ4Error(f"cannot read {path}: {_one_line(e)}") from e
    if not isinstance(content, dict):
        raise NanoQ4Error(f"{path}: expected a pickled dict, got {type(content).__name__}")
    return content


def _read_names(path, key):
    names = _read_pickle(path).get(key)
    if not isinstance(names, list) or not names:
        raise NanoQ4Error(f"{path}: missing the list {key!r} of class names")
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names]


def _read_batch(path, label_key, num_classes):
    """One official batch file as (data uint8 (N, 3072) in R, G, B planes, labels int64 (N,))."""
    content = _read_pickle(path)
    data = content.get(b"data")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3072):
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise NanoQ4Error(f"{path}: b'data' must be a uint8 array of shape (N, 3072), got {got}")
    try:
        labels = np.asarray(content.get(label_key), dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise NanoQ4Error(f"{path}: {label_key!r} is not a list of integer labels") from e
    if labels.shape != (len(data),):
        raise NanoQ4Error(f"{path}: {label_key!r} has shape {labels.shape}, "
                          f"expected ({len(data)},)")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise NanoQ4Error(f"{path}: labels must lie in 0..{num_classes - 1}, "
                          f"found {labels.min()}..{labels.max()}")
    return data, labels


def _planes_to_nhwc(data, out):
    """Write (N, 3072) rows of R, G, B 32x32 planes into uint8 out (N, 32, 32, 3). One strided
    copy per channel avoids the slow gather of copying a 4-D transpose."""
    planes = data.reshape(len(data), 3, 1024)
    pixels = out.reshape(len(data), 1024, 3)
    for c in range(3):
        pixels[:, :, c] = planes[:, c]


def _no_images(size=32):
    """The empty split of a dataset loaded with train=False (evaluation reads only the test split)."""
    return np.empty((0, size, size, 3), dtype=np.uint8), np.empty(0, dtype=np.int64)


def _read_split(paths, label_key, num_classes):
    batches = [_read_batch(p, label_key, num_classes) for p in paths]
    x = np.empty((sum(len(data) for data, _ in batches), 32, 32, 3), dtype=np.uint8)
    start = 0
    for data, _ in batches:
        _planes_to_nhwc(data, x[start:start + len(data)])
        start += len(data)
    return x, np.concatenate([labels for _, labels in batches])


def load_cifar10(root, train=True):
    """CIFAR-10 from `root`/cifar-10-batches-py (or the official archive placed in `root`);
    train=False leaves the five training batches unread."""
    folder = ensure_cifar("cifar10", root, download=False)
    classes = _read_names(folder / "batches.meta", b"label_names")
    x_train, y_train = (_read_split([folder / f"data_batch_{i}" for i in range(1, 6)], b"labels", len(classes))
                        if train else _no_images())
    x_test, y_test = _read_split([folder / "test_batch"], b"labels", len(classes))
    return Dataset("cifar10", x_train, y_train, x_test, y_test, classes, CIFAR_MEAN, CIFAR_STD)


def load_cifar100(root, coarse=False, train=True):
    """CIFAR-100 from `root`/cifar-100-python: 100 fine labels, or the 20 superclasses;
    train=False leaves the training file unread."""
    folder = ensure_cifar("cifar100", root, download=False)
    kind = "coarse" if coarse else "fine"
    classes = _read_names(folder / "meta", f"{kind}_label_names".encode())
    label_key = f"{kind}_labels".encode()
    x_train, y_train = _read_split([folder / "train"], label_key, len(classes)) if train else _no_images()
    x_test, y_test = _read_split([folder / "test"], label_key, len(classes))
    name = "cifar100-coarse" if coarse else "cifar100"
    return Dataset(name, x_train, y_train, x_test, y_test, classes, CIFAR_MEAN, CIFAR_STD)


# ---------------------------------------------------------------- your own images

def _check_size(size):
    if int(size) < 1:
        raise NanoQ4Error(f"image size must be >= 1, got {size}")


# Pillow holds 16-bit greyscale as I;16* (PNG, TIFF) or I (fromarray of uint16, signed TIFF), and
# its own convert("RGB") clips those at 255; they are scaled from 0..65535 instead. 16-bit RGB(A)
# files already open as 8-bit RGB(A) (Pillow keeps each sample's high byte).
SIXTEEN_BIT_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb8(img):
    """A Pillow image of any mode as 8-bit RGB: 16-bit grey scaled (not clipped), float (F) in
    Pillow's 0..255 units, alpha dropped, palettes/CMYK/YCbCr/LAB/HSV converted."""
    if img.mode in SIXTEEN_BIT_GREY_MODES:
        grey = np.clip(np.asarray(img, dtype=np.float64), 0, 65535)
        return Image.fromarray(np.rint(grey * (255 / 65535)).astype(np.uint8)).convert("RGB")
    if img.mode == "F":
        grey = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
        return Image.fromarray(np.rint(np.clip(grey, 0, 255)).astype(np.uint8)).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError:  # a mode without a direct route to RGB (e.g. PA, La): go through RGBA
        return img.convert("RGBA").convert("RGB")


def load_image(path, size=32):
    """Any image Pillow reads, upright (EXIF), as RGB uint8 (size, size, 3) (see to_rgb8),
    resized bicubically."""
    _check_size(size)
    try:
        with Image.open(path) as img:
            rgb = to_rgb8(ImageOps.exif_transpose(img))
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
            return np.array(rgb, dtype=np.uint8)
    except FileNotFoundError as e:
        raise NanoQ4Error(f"missing image file {path}") from e
    except Exception as e:  # decoders raise many types on broken files (OSError, SyntaxError...)
        raise NanoQ4Error(f"cannot read image {path}: {_one_line(e)}") from e


def _image_files(folder):
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _read_image_split(split_dir, classes, size):
    if not split_dir.is_dir():
        raise NanoQ4Error(f"missing folder {split_dir}; expected {split_dir}/<class>/*.png")
    unknown = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and p.name not in classes
                     and not p.name.startswith("."))
    if unknown:
        raise NanoQ4Error(f"{split_dir}: class folders {unknown} are not in the train classes")
    files, labels = [], []
    for label, name in enumerate(classes):
        if (split_dir / name).is_dir():
            found = _image_files(split_dir / name)
            files += found
            labels += [label] * len(found)
    if not files:
        raise NanoQ4Error(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {split_dir}/<class>/")
    x = np.empty((len(files), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(files):
        x[i] = load_image(path, size)
    return x, np.array(labels, dtype=np.int64)


def load_image_folder(root, size=32, train=True):
    """root/train/<class>/*.png|jpg|jpeg|bmp|webp and root/test/<class>/...; the labels follow
    the sorted train folder names (train=False reads only those names, not the train images)."""
    _check_size(size)
    root = Path(root).expanduser()
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise NanoQ4Error(f"missing folder {train_dir}; an image dataset needs "
                          f"{root}/train/<class>/*.png and {root}/test/<class>/*.png")
    classes = sorted(p.name for p in train_dir.iterdir()
                     if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise NanoQ4Error(f"no class folders in {train_dir}")
    x_train, y_train = _read_image_split(train_dir, classes, size) if train else _no_images(size)
    x_test, y_test = _read_image_split(root / "test", classes, size)
    return Dataset(f"folder:{root}", x_train, y_train, x_test, y_test, classes,
                   CIFAR_MEAN, CIFAR_STD)


# ---------------------------------------------------------------- synthetic images

def synthetic_dataset(n_train=2000, n_test=500, num_classes=10, size=32, seed=0, train=True):
    """Images a small CNN learns to >90% in a few epochs: class c is a fixed smooth colour field
    plus coloured stripes at its own angle and frequency; each image shows that pattern shifted
    at random (it tiles, so shifts wrap around), with a colour cast and pixel noise. Train
    and test draw from separate streams, so the test set does not depend on n_train (nor on
    train=False, which skips the training images)."""
    if min(n_train, n_test) < 1 or num_classes < 2 or size < 1:
        raise NanoQ4Error("synthetic data needs n_train, n_test, size >= 1 and num_classes >= 2")
    class_rng, train_rng, test_rng = (np.random.default_rng(s)
                                      for s in np.random.SeedSequence(seed).spawn(3))
    k = num_classes
    # whole cycles per image along (rows, cols) keep each wave periodic over the image:
    # three slow waves make the colour field, one fast wave at the class's own angle the stripes
    slow = class_rng.integers(-1, 2, (k, 3, 2))
    angle = np.pi * (np.arange(k) + class_rng.uniform(0, 0.5, k)) / k
    direction = np.stack([np.sin(angle), np.cos(angle)], axis=1)
    fast = np.rint(class_rng.uniform(3, 6, k)[:, None] * direction)
    cycles = np.concatenate([slow, fast[:, None, :]], axis=1)  # (k, 4 waves, 2)
    amplitude = np.concatenate([class_rng.uniform(-40, 40, (k, 3, 3)),
                                class_rng.uniform(-60, 60, (k, 1, 3))], axis=1)  # (k, 4, rgb)
    phase = class_rng.uniform(0, 2 * np.pi, (k, 4))
    rows, cols = np.mgrid[0:size, 0:size] / size
    waves = np.cos(2 * np.pi * (cycles[..., 0, None, None] * rows
                                + cycles[..., 1, None, None] * cols)
                   + phase[..., None, None])  # (k, 4, size, size)
    patterns = (class_rng.uniform(70, 185, (k, 1, 1, 3))
                + np.einsum("kwhv,kwc->khvc", waves, amplitude)).astype(np.float32)

    def sample(n, rng):
        y = rng.permutation(np.arange(n) % k)
        dy, dx = rng.integers(0, size, (2, n, 1))
        shifted_rows = (np.arange(size) - dy) % size  # (n, size)
        shifted_cols = (np.arange(size) - dx) % size
        img = patterns[y[:, None, None], shifted_rows[:, :, None], shifted_cols[:, None, :]]
        img += rng.uniform(-25, 25, (n, 1, 1, 3)).astype(np.float32)  # colour cast
        img += 8 * rng.standard_normal(img.shape, dtype=np.float32)
        return np.clip(np.rint(img), 0, 255).astype(np.uint8), y.astype(np.int64)

    x_train, y_train = sample(n_train, train_rng) if train else _no_images(size)
    x_test, y_test = sample(n_test, test_rng)
    classes = [f"pattern{c}" for c in range(k)]
    return Dataset("synthetic", x_train, y_train, x_test, y_test, classes, CIFAR_MEAN, CIFAR_STD)


# ---------------------------------------------------------------- normalization and augmentation

def normalization_table(mean, std):
    """(3, 256) float32 lookup: table[c, v] = (v / 255 - mean[c]) / std[c], rounded once, so the
    kernel, its twin and normalize_images agree bit for bit."""
    mean = np.asarray(mean, dtype=np.float64)
    std = np.asarray(std, dtype=np.float64)
    valid = np.all(np.isfinite(mean)) and np.all(std > 0)
    if mean.shape != (3,) or std.shape != (3,) or not valid:
        raise NanoQ4Error(f"mean and std need 3 finite values each (std > 0), got {mean}, {std}")
    return ((np.arange(256) / 255.0 - mean[:, None]) / std[:, None]).astype(np.float32)


def normalize_images(x_uint8, mean, std):
    """uint8 (..., 3) images -> float32 (x / 255 - mean) / std, same shape (NHWC stays NHWC)."""
    x = np.asarray(x_uint8)
    if x.dtype != np.uint8 or x.ndim < 1 or x.shape[-1] != 3:
        raise NanoQ4Error(f"expected uint8 images with 3 channels last, got {x.dtype} {x.shape}")
    return normalization_table(mean, std)[np.arange(3), x]


def channel_mean_std(x_uint8):
    """Exact per-channel mean and std of uint8 NHWC images in [0, 1] units, from 256-bin
    histograms (no float copy of the whole training set)."""
    values = np.arange(256) / 255.0
    mean, std = [], []
    for c in range(3):
        counts = np.bincount(x_uint8[..., c].ravel(), minlength=256)
        m = counts @ values / counts.sum()
        mean.append(float(m))
        std.append(float(np.sqrt(counts @ (values - m) ** 2 / counts.sum())))
    return tuple(mean), tuple(std)


@njit(nogil=True, cache=True)
def _augment_image(src, oy, ox, flip, table, pad, dst):
    """dst[i, j] = table[c, padded[oy + i, ox + j']] with padded = src zero-padded by `pad`
    and j' = W-1-j when flipped: crop, flip and normalize in one read of each pixel."""
    h, w = dst.shape[0], dst.shape[1]
    for i in range(h):
        sy = i + oy - pad
        for j in range(w):
            sx = (w - 1 - j if flip else j) + ox - pad
            if 0 <= sy < src.shape[0] and 0 <= sx < src.shape[1]:
                for c in range(3):
                    dst[i, j, c] = table[c, src[sy, sx, c]]
            else:
                for c in range(3):
                    dst[i, j, c] = table[c, 0]


@njit(parallel=True, nogil=True, cache=True)
def augment_batch(images, index, oy, ox, flip, table, pad, out):
    """out[b] = normalized crop of images[index[b]] zero-padded by `pad`, taken at offset
    (oy[b], ox[b]) in [0, 2*pad], mirrored left-right where flip[b]. images uint8 NHWC,
    out float32 (B, H, W, 3). No bounds checks on index: BatchLoader guarantees them."""
    for b in prange(index.shape[0]):
        _augment_image(images[index[b]], oy[b], ox[b], flip[b], table, pad, out[b])


@njit(nogil=True, cache=True)
def _augment_batch_serial(images, index, oy, ox, flip, table, pad, out):
    """augment_batch on one thread, for the prefetch thread: Numba's workqueue threading layer
    aborts when two Python threads launch parallel kernels at once."""
    for b in range(index.shape[0]):
        _augment_image(images[index[b]], oy[b], ox[b], flip[b], table, pad, out[b])


def augment_batch_reference(images, index, oy, ox, flip, table, pad):
    """Plain-NumPy twin of augment_batch (pad, gather, mirror, look up); returns a new array."""
    n, h, w = len(index), images.shape[1], images.shape[2]
    padded = np.pad(images[index], ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows = oy[:, None] + np.arange(h)
    cols = ox[:, None] + np.where(flip[:, None], np.arange(w)[::-1], np.arange(w))
    crops = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return table[np.arange(3), crops]


def alternating_flips(seed, epoch, n):
    """Whether each of n images (by index) is mirrored in `epoch` under airbench's alternating
    flip: a random half in epoch 0, then each image the other way from the epoch before, so any
    two consecutive epochs show every image both ways (random flips repeat a view half the time).
    A function of (seed, epoch, index) alone: a resumed run and every data-parallel rank agree."""
    # entropy (seed, 0, 1): a stream apart from every epoch's (seed, epoch), which numpy pads with zeros
    first = np.random.default_rng([seed, 0, 1]).random(n) < 0.5
    return first ^ bool(epoch % 2)


# ---------------------------------------------------------------- batches

class BatchLoader:
    """Yields (x float32 (B, H, W, 3) C-contiguous, y int64 (B,)) over one epoch. The order,
    crop offsets and flips depend only on (seed, epoch), so runs repeat exactly whatever the
    thread count. Each batch is a fresh array, so a kept batch is never overwritten. `flip`:
    "random" mirrors each image with probability 0.5 every epoch, "alternate" as alternating_flips.

    Data-parallel training: with `shards` > 1 the loader yields shard `shard` of each (global)
    batch of `batch_size` images, a contiguous slice; the shards of one batch are disjoint and
    together are the batch, augmentation included, that one process would see. A last partial
    batch too small to give every shard 2 images (batch norm needs 2) is left out."""

    def __init__(self, x, y, batch_size, mean, std, augment=False, shuffle=False, seed=0,
                 drop_last=False, prefetch=False, shard=0, shards=1, flip="random"):
        x = np.ascontiguousarray(x)
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3 or len(x) == 0:
            raise NanoQ4Error(f"images must be uint8 (N, H, W, 3) with N > 0, "
                              f"got {x.dtype} {x.shape}")
        y = np.asarray(y, dtype=np.int64)
        if y.shape != (len(x),):
            raise NanoQ4Error(f"labels must have shape ({len(x)},), got {y.shape}")
        if int(batch_size) < 1 or int(seed) < 0:
            raise NanoQ4Error(f"batch_size must be >= 1 and seed >= 0, got {batch_size}, {seed}")
        if not 0 <= int(shard) < int(shards):
            raise NanoQ4Error(f"shard must lie in 0..shards-1, got shard {shard} of {shards}")
        if flip not in FLIP_MODES:
            raise NanoQ4Error(f"unknown flip mode {flip!r}; choose {' or '.join(FLIP_MODES)}")
        self.x, self.y = x, y
        self.shard, self.shards = int(shard), int(shards)
        self.batch_size = int(batch_size)
        self.table = normalization_table(mean, std)
        self.augment, self.shuffle, self.drop_last, self.flip = augment, shuffle, drop_last, flip
        self.prefetch = prefetch
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch):
        """Choose the epoch whose order and augmentation the next iteration replays."""
        if int(epoch) < 0:
            raise NanoQ4Error(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def __len__(self):
        n, b = len(self.y), self.batch_size
        if self.shards > 1 and 0 < n % b < 2 * self.shards:
            return n // b
        return n // b if self.drop_last else -(-n // b)

    def global_batch_len(self, k):
        """Images in batch k over all shards (this shard holds about 1/shards of them)."""
        return min(self.batch_size, len(self.y) - k * self.batch_size)

    def _plan(self):
        """The epoch's image order, crop offsets and flips, one entry per position."""
        rng = np.random.default_rng([self.seed, self.epoch])
        n = len(self.y)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.augment:
            oy = rng.integers(0, 2 * CROP_PADDING + 1, n)
            ox = rng.integers(0, 2 * CROP_PADDING + 1, n)
            if self.flip == "random":
                flip = rng.random(n) < 0.5
            else:  # drawn per image, then put in this epoch's order
                flip = alternating_flips(self.seed, self.epoch, n)[order]
        else:  # the centre crop of the padded image is the image itself
            oy = ox = np.full(n, CROP_PADDING, dtype=np.int64)
            flip = np.zeros(n, dtype=np.bool_)
        return order, oy, ox, flip

    def _batch(self, plan, k, kernel):
        order, oy, ox, flip = plan
        start, count = k * self.batch_size, self.global_batch_len(k)
        pick = slice(start + self.shard * count // self.shards, start + (self.shard + 1) * count // self.shards)
        index = order[pick]
        out = np.empty((len(index),) + self.x.shape[1:], dtype=np.float32)
        kernel(self.x, index, oy[pick], ox[pick], flip[pick], self.table, CROP_PADDING, out)
        return out, self.y[index]

    def __iter__(self):
        plan = self._plan()
        if not self.prefetch:
            for k in range(len(self)):
                yield self._batch(plan, k, augment_batch)
            return
        # build batch k+1 on a background thread while the caller works on batch k
        with ThreadPoolExecutor(max_workers=1) as pool:
            upcoming = None
            for k in range(len(self)):
                current = upcoming or pool.submit(self._batch, plan, k, _augment_batch_serial)
                if k + 1 < len(self):
                    upcoming = pool.submit(self._batch, plan, k + 1, _augment_batch_serial)
                yield current.result()


# ---------------------------------------------------------------- one entry point

def check_dataset_spec(spec, coarse=False):
    """Refuse a dataset name load_dataset cannot load, before any file is read."""
    is_folder = isinstance(spec, str) and spec.startswith("folder:") and spec[len("folder:"):]
    if not (spec in CIFAR_SOURCES or spec == "synthetic" or is_folder):
        raise NanoQ4Error(f"unknown dataset {spec!r}; choose {DATASET_CHOICES}")
    if coarse and spec != "cifar100":
        raise NanoQ4Error(f"coarse labels exist only for cifar100, not {spec!r}")


def load_dataset(spec, data_dir=None, download=True, coarse=False, image_size=32,
                 normalization="paper", seed=0, train=True):
    """The dataset named by `spec` ("cifar10" | "cifar100" | "synthetic" | "folder:PATH"), with
    mean/std set by `normalization`: "paper" (CIFAR_MEAN/STD) or "computed" (from x_train).
    train=False leaves the training images unread (x_train, y_train empty): evaluation needs
    only the test split and the class names."""
    if normalization not in ("paper", "computed"):
        raise NanoQ4Error(f"unknown normalization {normalization!r}; choose paper or computed")
    if normalization == "computed" and not train:
        raise NanoQ4Error("computed normalization needs the training images (train=True)")
    check_dataset_spec(spec, coarse)
    if spec in CIFAR_SOURCES:
        if image_size != 32:
            raise NanoQ4Error(f"CIFAR images are 32x32; image_size {image_size} is not supported")
        root = resolve_data_dir(data_dir)
        ensure_cifar(spec, root, download=download)
        dataset = (load_cifar10(root, train) if spec == "cifar10"
                   else load_cifar100(root, coarse=coarse, train=train))
    elif spec == "synthetic":
        dataset = synthetic_dataset(size=image_size, seed=seed, train=train)
    else:
        dataset = load_image_folder(spec[len("folder:"):], size=image_size, train=train)
    if normalization == "computed":
        dataset.mean, dataset.std = channel_mean_std(dataset.x_train)
    return dataset
