"""Specification of nanoq4.data: official CIFAR layouts read exactly, downloads verified and
all-or-nothing, augmentation kernel equal to its NumPy twin, batches deterministic per
(seed, epoch), and every bad input a one-line NanoQ4Error that names the file."""

import functools
import hashlib
import http.server
import io
import os
import pickle
import struct
import tarfile
import threading
import time
import zlib
from pathlib import Path

import numba
import numpy as np
import pytest
from PIL import Image

from nanoq4.data import (CIFAR_MEAN, CIFAR_STD, CROP_PADDING, BatchLoader, augment_batch,
                         augment_batch_reference, channel_mean_std, download_cifar, load_cifar10,
                         load_cifar100, load_dataset, load_image, load_image_folder,
                         normalization_table, normalize_images, resolve_data_dir, safe_extract,
                         synthetic_dataset, to_rgb8)
from nanoq4.errors import NanoQ4Error

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer",
                 "dog", "frog", "horse", "ship", "truck"]
CIFAR10_FILES = ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


# ---------------------------------------------------------------- official-format fixtures

def random_images(rng, n, size=32):
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def official_rows(x):
    """NHWC -> the official (N, 3072) rows: the 1024 R values, then G, then B, each row-major."""
    return np.concatenate([x[..., c].reshape(len(x), 1024) for c in range(3)], axis=1)


def dump(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(content, f, protocol=2)


def write_cifar10(root, per_batch=3, seed=0):
    """A miniature cifar-10-batches-py/ pickled like the official one; returns what it holds."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    xs, ys = [], []
    for i in range(1, 7):
        x = random_images(rng, per_batch)
        y = rng.integers(0, 10, per_batch).tolist()
        label = b"testing batch 1 of 1" if i == 6 else b"training batch %d of 5" % i
        dump(folder / ("test_batch" if i == 6 else f"data_batch_{i}"),
             {b"batch_label": label, b"labels": y, b"data": official_rows(x),
              b"filenames": [b"img_%d.png" % j for j in range(per_batch)]})
        xs.append(x)
        ys.append(y)
    dump(folder / "batches.meta", {b"num_cases_per_batch": per_batch, b"num_vis": 3072,
                                   b"label_names": [n.encode() for n in CIFAR10_NAMES]})
    return np.concatenate(xs[:5]), np.concatenate(ys[:5]), xs[5], np.array(ys[5])


def write_cifar100(root, n_train=6, n_test=4, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    splits = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = random_images(rng, n)
        fine = rng.integers(0, 100, n)
        dump(folder / split, {b"filenames": [b"f.png"] * n, b"batch_label": split.encode(),
                              b"fine_labels": fine.tolist(), b"coarse_labels": (fine // 5).tolist(),
                              b"data": official_rows(x)})
        splits[split] = (x, fine)
    dump(folder / "meta", {b"fine_label_names": [b"fine%d" % i for i in range(100)],
                           b"coarse_label_names": [b"coarse%d" % i for i in range(20)]})
    return splits


def make_archive(source_root, folder, archive):
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source_root / folder, arcname=folder)
    return hashlib.md5(archive.read_bytes()).hexdigest()


def assert_one_line_naming(exc_info, name):
    message = str(exc_info.value)
    assert "\n" not in message, f"message spans lines: {message!r}"
    assert name in message, f"{name!r} not named in {message!r}"


# ---------------------------------------------------------------- data folder and CIFAR reading

def test_data_dir_is_flag_then_env_then_dot_data(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOQ4_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "flag") == tmp_path / "flag"
    assert resolve_data_dir() == tmp_path / "env"
    monkeypatch.delenv("NANOQ4_DATA")
    assert resolve_data_dir() == Path.cwd() / "data"


def test_cifar10_official_pickles_read_pixel_for_pixel(tmp_path):
    x_train, y_train, x_test, y_test = write_cifar10(tmp_path)
    ds = load_cifar10(tmp_path)
    np.testing.assert_array_equal(ds.x_train, x_train)
    np.testing.assert_array_equal(ds.y_train, y_train)
    np.testing.assert_array_equal(ds.x_test, x_test)
    np.testing.assert_array_equal(ds.y_test, y_test)
    assert ds.classes == CIFAR10_NAMES
    assert ds.x_train.dtype == np.uint8 and ds.x_train.flags.c_contiguous
    assert ds.y_train.dtype == np.int64
    assert (ds.mean, ds.std) == (CIFAR_MEAN, CIFAR_STD)


def test_cifar100_fine_labels_by_default_coarse_on_request(tmp_path):
    splits = write_cifar100(tmp_path)
    fine = load_cifar100(tmp_path)
    coarse = load_cifar100(tmp_path, coarse=True)
    np.testing.assert_array_equal(fine.x_train, splits["train"][0])
    np.testing.assert_array_equal(fine.x_test, splits["test"][0])
    np.testing.assert_array_equal(fine.y_train, splits["train"][1])
    np.testing.assert_array_equal(coarse.y_test, splits["test"][1] // 5)
    assert len(fine.classes) == 100 and fine.classes[7] == "fine7"
    assert len(coarse.classes) == 20 and coarse.classes[3] == "coarse3"


def test_test_split_alone_leaves_the_cifar10_training_batches_unread(tmp_path):
    _, _, x_test, y_test = write_cifar10(tmp_path)
    for i in range(1, 6):
        (tmp_path / "cifar-10-batches-py" / f"data_batch_{i}").unlink()  # reading one would fail
    ds = load_dataset("cifar10", data_dir=tmp_path, download=False, train=False)
    np.testing.assert_array_equal(ds.x_test, x_test)
    np.testing.assert_array_equal(ds.y_test, y_test)
    assert ds.x_train.shape == (0, 32, 32, 3) and ds.y_train.shape == (0,)
    assert ds.classes == CIFAR10_NAMES


def test_test_split_alone_leaves_the_cifar100_training_file_unread(tmp_path):
    splits = write_cifar100(tmp_path)
    (tmp_path / "cifar-100-python" / "train").unlink()
    ds = load_dataset("cifar100", data_dir=tmp_path, download=False, coarse=True, train=False)
    np.testing.assert_array_equal(ds.y_test, splits["test"][1] // 5)
    assert len(ds.x_train) == 0 and len(ds.classes) == 20


def test_test_split_alone_of_an_image_folder_reads_only_the_train_class_names(tmp_path):
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / split / name / "0.png")
    (tmp_path / "train" / "cat" / "broken.png").write_bytes(b"not an image")  # reading it would fail
    ds = load_dataset(f"folder:{tmp_path}", train=False)
    assert ds.classes == ["cat", "dog"] and len(ds.x_train) == 0
    np.testing.assert_array_equal(ds.y_test, [0, 1])


def test_synthetic_test_split_is_the_same_without_the_training_images():
    full, alone = synthetic_dataset(), synthetic_dataset(train=False)
    np.testing.assert_array_equal(alone.x_test, full.x_test)
    np.testing.assert_array_equal(alone.y_test, full.y_test)
    assert len(alone.x_train) == 0 and alone.classes == full.classes


def test_placed_archive_is_extracted_then_loaded(tmp_path):
    source, data = tmp_path / "source", tmp_path / "data"
    x_train, *_ = write_cifar10(source)
    data.mkdir()
    make_archive(source, "cifar-10-batches-py", data / "cifar-10-python.tar.gz")
    ds = load_dataset("cifar10", data_dir=data, download=False)
    np.testing.assert_array_equal(ds.x_train, x_train)
    assert sorted(p.name for p in data.iterdir()) == CIFAR10_FILES


def test_missing_cifar_without_download_says_where_and_how(tmp_path):
    with pytest.raises(NanoQ4Error) as exc_info:
        load_dataset("cifar10", data_dir=tmp_path, download=False)
    assert_one_line_naming(exc_info, str(tmp_path))
    for hint in ("--data-dir", "NANOQ4_DATA", "cifar-10-python.tar.gz"):
        assert hint in str(exc_info.value)


# ---------------------------------------------------------------- download and extraction

class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_folder(tmp_path):
    """(folder, base URL): a local HTTP server on 127.0.0.1 serving that folder."""
    served = tmp_path / "served"
    served.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_verifies_extracts_and_loads(tmp_path, http_folder):
    served, base_url = http_folder
    x_train, y_train, x_test, _ = write_cifar10(tmp_path / "source")
    md5 = make_archive(tmp_path / "source", "cifar-10-batches-py", served / "c10.tar.gz")
    data = tmp_path / "data"
    folder = download_cifar("cifar10", data, url=f"{base_url}/c10.tar.gz", md5=md5, progress=False)
    assert folder == data / "cifar-10-batches-py"
    assert sorted(p.name for p in data.iterdir()) == CIFAR10_FILES
    ds = load_cifar10(data)
    np.testing.assert_array_equal(ds.x_train, x_train)
    np.testing.assert_array_equal(ds.x_test, x_test)


def test_corrupted_download_is_refused_and_leaves_nothing(tmp_path, http_folder):
    served, base_url = http_folder
    write_cifar10(tmp_path / "source")
    good_md5 = make_archive(tmp_path / "source", "cifar-10-batches-py", served / "c10.tar.gz")
    corrupted = bytearray((served / "c10.tar.gz").read_bytes())
    corrupted[len(corrupted) // 2] ^= 0xFF
    (served / "c10.tar.gz").write_bytes(bytes(corrupted))
    data = tmp_path / "data"
    with pytest.raises(NanoQ4Error) as exc_info:
        download_cifar("cifar10", data, url=f"{base_url}/c10.tar.gz", md5=good_md5, progress=False)
    assert_one_line_naming(exc_info, "md5")
    assert list(data.iterdir()) == []


def test_unreachable_server_error_is_one_line_with_hints(tmp_path, http_folder):
    _, base_url = http_folder
    data = tmp_path / "data"
    with pytest.raises(NanoQ4Error) as exc_info:
        download_cifar("cifar100", data, url=f"{base_url}/missing.tar.gz", progress=False)
    assert_one_line_naming(exc_info, str(data))
    for hint in ("--data-dir", "NANOQ4_DATA", "cifar-100-python.tar.gz"):
        assert hint in str(exc_info.value)
    assert list(data.iterdir()) == []


@pytest.mark.parametrize("member", ["../escaped.txt", "cifar-10-batches-py/../../escaped.txt",
                                    "/tmp/escaped.txt", "symlink"])
def test_unsafe_archive_member_is_refused_before_writing(tmp_path, member):
    archive, data = tmp_path / "evil.tar.gz", tmp_path / "data"
    data.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        ok = tarfile.TarInfo("cifar-10-batches-py/batches.meta")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        bad = tarfile.TarInfo(member)
        if member == "symlink":
            bad.type, bad.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(bad)
        else:
            bad.size = 4
            tar.addfile(bad, io.BytesIO(b"evil"))
    with pytest.raises(NanoQ4Error) as exc_info:
        safe_extract(archive, data, "cifar-10-batches-py")
    assert_one_line_naming(exc_info, member)
    assert list(data.iterdir()) == []
    assert not (tmp_path / "escaped.txt").exists()


# ---------------------------------------------------------------- bad input

def test_truncated_pickle_names_the_file(tmp_path):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(NanoQ4Error) as exc_info:
        load_cifar10(tmp_path)
    assert_one_line_naming(exc_info, "data_batch_2")


def test_missing_batch_file_names_the_file(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(NanoQ4Error) as exc_info:
        load_cifar10(tmp_path)
    assert_one_line_naming(exc_info, "data_batch_3")


def test_wrong_array_shape_names_the_file(tmp_path):
    write_cifar10(tmp_path)
    dump(tmp_path / "cifar-10-batches-py" / "test_batch",
         {b"labels": [0, 1], b"data": np.zeros((2, 3000), np.uint8)})
    with pytest.raises(NanoQ4Error) as exc_info:
        load_cifar10(tmp_path)
    assert_one_line_naming(exc_info, "test_batch")
    assert "3072" in str(exc_info.value)


class RunsCommand:
    def __reduce__(self):
        return os.system, ("touch pwned",)


def test_pickle_that_calls_functions_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_cifar10(tmp_path)
    dump(tmp_path / "cifar-10-batches-py" / "batches.meta", {b"label_names": RunsCommand()})
    with pytest.raises(NanoQ4Error) as exc_info:
        load_cifar10(tmp_path)
    assert_one_line_naming(exc_info, "batches.meta")
    assert not (tmp_path / "pwned").exists()


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(NanoQ4Error) as exc_info:
        load_dataset("imagenet")
    for choice in ("cifar10", "cifar100", "synthetic", "folder:PATH"):
        assert choice in str(exc_info.value)


def test_unreadable_image_names_the_file(tmp_path):
    broken = tmp_path / "cat.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with pytest.raises(NanoQ4Error) as exc_info:
        load_image(broken)
    assert_one_line_naming(exc_info, "cat.png")
    with pytest.raises(NanoQ4Error) as exc_info:
        load_image(tmp_path / "absent.jpg")
    assert_one_line_naming(exc_info, "absent.jpg")


def test_missing_image_folder_names_it(tmp_path):
    with pytest.raises(NanoQ4Error) as exc_info:
        load_dataset(f"folder:{tmp_path / 'photos'}")
    assert_one_line_naming(exc_info, "photos")


# ---------------------------------------------------------------- your own images

def test_load_image_gives_rgb_uint8_of_the_requested_size(tmp_path):
    rng = np.random.default_rng(0)
    exact = random_images(rng, 1)[0]
    Image.fromarray(exact).save(tmp_path / "exact.png")
    np.testing.assert_array_equal(load_image(tmp_path / "exact.png"), exact)
    Image.new("L", (50, 70), 128).save(tmp_path / "grey.jpg")
    Image.new("RGBA", (10, 10), (255, 0, 0, 40)).save(tmp_path / "alpha.webp", lossless=True)
    Image.new("P", (64, 48)).save(tmp_path / "palette.bmp")
    for name in ("grey.jpg", "alpha.webp", "palette.bmp"):
        image = load_image(tmp_path / name, size=24)
        assert image.shape == (24, 24, 3) and image.dtype == np.uint8, name
    assert (load_image(tmp_path / "alpha.webp") == [255, 0, 0]).all()


# 16-bit images: value v16 = 257 * v8 is exactly v8 in 8 bits (65535 -> 255), whether a decoder
# scales by 255/65535 or keeps the high byte; clipping at 255 would make nearly all of it white.
RAMP8 = (np.arange(32 * 32) % 256).astype(np.uint8).reshape(32, 32)


def write_png_16_bit(path, samples, color_type):
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB): samples uint16 (H, W, C),
    color_type 0 grey, 2 RGB, 6 RGBA."""
    h, w = samples.shape[:2]
    rows = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def grey_16_bit(path, how):
    ramp16 = RAMP8.astype(np.uint16) * 257
    if how == "png by hand":
        write_png_16_bit(path, ramp16[:, :, None], color_type=0)
    elif how == "I;16 saved by Pillow":
        Image.frombytes("I;16", (32, 32), ramp16.astype("<u2").tobytes()).save(path)
    else:  # "I (32-bit) saved by Pillow": how 16-bit values come back from a 32-bit TIFF
        Image.frombytes("I", (32, 32), ramp16.astype(np.int32).tobytes()).save(path)


@pytest.mark.parametrize("how, suffix", [("png by hand", ".png"), ("I;16 saved by Pillow", ".png"),
                                         ("I;16 saved by Pillow", ".tif"), ("I (32-bit) saved by Pillow", ".tif")])
def test_16_bit_greyscale_is_scaled_to_8_bits_not_clipped(tmp_path, how, suffix):
    path = tmp_path / f"grey16{suffix}"
    grey_16_bit(path, how)
    with Image.open(path) as img:
        mode = img.mode
    np.testing.assert_array_equal(load_image(path), np.repeat(RAMP8[:, :, None], 3, axis=2),
                                  err_msg=f"{how}{suffix} (opens as mode {mode})")


@pytest.mark.parametrize("color_type, channels", [(2, 3), (6, 4)], ids=["RGB", "RGBA"])
def test_16_bit_colour_is_scaled_to_8_bits(tmp_path, color_type, channels):
    rgb8 = np.stack([RAMP8, 255 - RAMP8, RAMP8 // 2], axis=2)
    samples = rgb8.astype(np.uint16) * 257
    if channels == 4:
        samples = np.concatenate([samples, np.full((32, 32, 1), 65535, np.uint16)], axis=2)
    write_png_16_bit(tmp_path / "colour16.png", samples, color_type)
    np.testing.assert_array_equal(load_image(tmp_path / "colour16.png"), rgb8)


def test_16_bit_grey_between_8_bit_steps_rounds_to_the_nearest(tmp_path):
    values = np.array([[0, 128, 32896, 65400, 65535]], dtype=np.uint16)  # 32896 = 128 * 257
    write_png_16_bit(tmp_path / "steps.png", values[:, :, None], color_type=0)
    with Image.open(tmp_path / "steps.png") as img:
        np.testing.assert_array_equal(np.asarray(to_rgb8(img))[0, :, 0], [0, 0, 128, 254, 255])


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"])
def test_every_8_bit_mode_becomes_rgb_uint8(mode):
    base = Image.fromarray(random_images(np.random.default_rng(0), 1, size=8)[0])
    rgb = to_rgb8(base.convert(mode))
    assert rgb.mode == "RGB" and rgb.size == (8, 8)
    pixels = np.asarray(rgb)
    if mode in ("RGB", "RGBA", "RGBX"):
        np.testing.assert_array_equal(pixels, np.asarray(base))
    if mode in ("1", "L", "LA"):
        assert (pixels == pixels[:, :, :1]).all(), "grey stays grey"


def test_float_images_are_read_in_0_to_255_units_clipped_and_nan_free():
    values = np.array([[-5.0, 0.0, 127.6, 255.0, 300.0, np.nan]], dtype=np.float32)
    rgb = np.asarray(to_rgb8(Image.frombytes("F", (6, 1), values.tobytes())))
    np.testing.assert_array_equal(rgb[0, :, 0], [0, 0, 128, 255, 255, 0])


def test_image_folder_dataset(tmp_path):
    rng = np.random.default_rng(0)
    images = {}
    for split, counts in (("train", {"dog": 2, "cat": 3}), ("test", {"cat": 1, "dog": 1})):
        for name, count in counts.items():
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(count):
                images[split, name, i] = random_images(rng, 1)[0]
                Image.fromarray(images[split, name, i]).save(tmp_path / split / name / f"{i}.png")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    Image.new("RGB", (100, 60), (0, 0, 255)).save(tmp_path / "train" / "dog" / "big.JPG")
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.classes == ["cat", "dog"]
    np.testing.assert_array_equal(ds.y_train, [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(ds.y_test, [0, 1])
    np.testing.assert_array_equal(ds.x_train[0], images["train", "cat", 0])
    np.testing.assert_array_equal(ds.x_test[1], images["test", "dog", 0])
    assert ds.x_train.shape == (6, 32, 32, 3) and ds.x_train.dtype == np.uint8


def test_image_folder_with_broken_image_names_it(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split / "cat").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / split / "cat" / "fine.png")
    (tmp_path / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff nope")
    with pytest.raises(NanoQ4Error) as exc_info:
        load_image_folder(tmp_path)
    assert_one_line_naming(exc_info, "broken.jpg")


# ---------------------------------------------------------------- synthetic data

def test_synthetic_is_deterministic_balanced_and_fast():
    start = time.process_time()  # CPU time: other processes on the machine do not count
    a = synthetic_dataset(seed=3)
    elapsed = time.process_time() - start
    b = synthetic_dataset(seed=3)
    c = synthetic_dataset(seed=4)
    assert elapsed < 1.0, f"generation took {elapsed:.2f} s"
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_train, c.x_train)
    assert a.x_train.shape == (2000, 32, 32, 3) and a.x_test.shape == (500, 32, 32, 3)
    assert a.x_train.dtype == np.uint8 and a.y_train.dtype == np.int64
    assert np.bincount(a.y_train).tolist() == [200] * 10
    assert a.x_train.std(axis=(1, 2)).min() > 10, "some images are nearly constant"


def test_synthetic_classes_are_learnable_and_not_memorizable():
    """A shift-invariant nearest-centroid (|FFT| of each image) separates the classes, while
    images of one class still differ from each other (random shifts and noise)."""
    ds = synthetic_dataset()

    def spectrum(x):
        centred = x.astype(np.float32) - x.mean(axis=(1, 2), keepdims=True)
        f = np.abs(np.fft.fft2(centred, axes=(1, 2))).reshape(len(x), -1)
        return f / np.linalg.norm(f, axis=1, keepdims=True)

    train, test = spectrum(ds.x_train), spectrum(ds.x_test)
    centroids = np.stack([train[ds.y_train == c].mean(axis=0) for c in range(10)])
    accuracy = np.mean(np.argmax(test @ centroids.T, axis=1) == ds.y_test)
    assert accuracy > 0.9, f"nearest-centroid accuracy {accuracy:.2f}"
    same_class = ds.x_train[ds.y_train == 0][:2].astype(int)
    assert np.abs(same_class[0] - same_class[1]).mean() > 20


# ---------------------------------------------------------------- normalization and augmentation

def augment(images, index, oy, ox, flip, table):
    out = np.empty((len(index),) + images.shape[1:], np.float32)
    augment_batch(images, index, oy, ox, flip, table, CROP_PADDING, out)
    return out


def cifar_loader(images, batch_size, labels=None, **options):
    labels = np.arange(len(images)) if labels is None else labels
    return BatchLoader(images, labels, batch_size, CIFAR_MEAN, CIFAR_STD, **options)


def test_normalize_images_is_the_formula():
    x = np.arange(256, dtype=np.uint8).repeat(3).reshape(1, 16, 16, 3)
    expected = (x / 255.0 - np.array(CIFAR_MEAN)) / np.array(CIFAR_STD)
    got = normalize_images(x, CIFAR_MEAN, CIFAR_STD)
    assert got.dtype == np.float32 and got.shape == x.shape and got.flags.c_contiguous
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_normalized_constant_images_have_the_expected_mean_and_std():
    """256 constant images, one per pixel value: per channel the output mean is
    (0.5 - mean) / std and the output std is std(values / 255) / std."""
    x = np.empty((256, 32, 32, 3), np.uint8)
    x[:] = np.arange(256, dtype=np.uint8)[:, None, None, None]
    centre = np.full(256, CROP_PADDING)
    out = augment(x, np.arange(256), centre, centre, np.zeros(256, bool),
                  normalization_table(CIFAR_MEAN, CIFAR_STD))
    values = np.arange(256) / 255
    mean, std = np.array(CIFAR_MEAN), np.array(CIFAR_STD)
    np.testing.assert_allclose(out.mean(axis=(0, 1, 2), dtype=np.float64),
                               (values.mean() - mean) / std, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=(0, 1, 2), dtype=np.float64),
                               values.std() / std, atol=1e-5)


@pytest.mark.parametrize("shape", [(32, 32), (5, 7)])
def test_kernel_equals_numpy_twin(shape):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (20,) + shape + (3,), dtype=np.uint8)
    index = rng.integers(0, 20, 50)
    oy, ox = rng.integers(0, 2 * CROP_PADDING + 1, (2, 50))
    flip = rng.random(50) < 0.5
    table = normalization_table((0.3, 0.5, 0.7), (0.2, 0.25, 0.3))
    expected = augment_batch_reference(images, index, oy, ox, flip, table, CROP_PADDING)
    np.testing.assert_array_equal(augment(images, index, oy, ox, flip, table), expected)


def test_centre_crop_without_flip_is_plain_normalization():
    images = random_images(np.random.default_rng(2), 8)
    centre = np.full(8, CROP_PADDING)
    out = augment(images, np.arange(8), centre, centre, np.zeros(8, bool),
                  normalization_table(CIFAR_MEAN, CIFAR_STD))
    np.testing.assert_array_equal(out, normalize_images(images, CIFAR_MEAN, CIFAR_STD))


def test_flip_of_a_mirrored_image_is_the_identity():
    """Mirroring is its own inverse: flipping a mirrored image at x offset 2*pad - ox gives the
    unflipped crop at ox, for every offset."""
    rng = np.random.default_rng(3)
    images = random_images(rng, 9)
    mirrored = np.ascontiguousarray(images[:, :, ::-1])
    oy = rng.integers(0, 9, 9)
    ox = np.arange(9)
    table = normalization_table(CIFAR_MEAN, CIFAR_STD)
    plain = augment(images, np.arange(9), oy, ox, np.zeros(9, bool), table)
    double = augment(mirrored, np.arange(9), oy, 2 * CROP_PADDING - ox, np.ones(9, bool), table)
    np.testing.assert_array_equal(double, plain)


def test_padding_is_zero_in_pixel_space():
    images = np.full((1, 32, 32, 3), 200, np.uint8)
    out = augment(images, np.array([0]), np.array([0]), np.array([0]), np.array([False]),
                  normalization_table(CIFAR_MEAN, CIFAR_STD))
    padded_value = (0 - np.array(CIFAR_MEAN)) / np.array(CIFAR_STD)
    np.testing.assert_allclose(out[0, :CROP_PADDING], np.broadcast_to(padded_value, (4, 32, 3)),
                               atol=1e-6)
    np.testing.assert_allclose(out[0, :, :CROP_PADDING], np.broadcast_to(padded_value, (32, 4, 3)),
                               atol=1e-6)
    assert np.all(out[0, CROP_PADDING:, CROP_PADDING:] > 0)


def test_kernel_result_does_not_depend_on_thread_count():
    images = random_images(np.random.default_rng(4), 300)
    loader = cifar_loader(images, 300, augment=True, shuffle=True)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        single = next(iter(loader))[0]
    finally:
        numba.set_num_threads(threads)
    np.testing.assert_array_equal(next(iter(loader))[0], single)


# ---------------------------------------------------------------- batches

def test_plain_batches_cover_the_data_in_order():
    images = random_images(np.random.default_rng(5), 10)
    labels = np.arange(10) % 3
    batches = list(cifar_loader(images, 4, labels))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    for x, _ in batches:
        assert x.dtype == np.float32 and x.flags.c_contiguous and x.shape[1:] == (32, 32, 3)
    np.testing.assert_array_equal(np.concatenate([x for x, _ in batches]),
                                  normalize_images(images, CIFAR_MEAN, CIFAR_STD))
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), labels)


@pytest.mark.parametrize("drop_last, sizes", [(False, [4, 4, 2]), (True, [4, 4])])
def test_last_partial_batch_kept_or_dropped(drop_last, sizes):
    images = random_images(np.random.default_rng(6), 10)
    loader = cifar_loader(images, 4, shuffle=True, drop_last=drop_last)
    assert len(loader) == len(sizes)
    assert [len(y) for _, y in loader] == sizes


def epoch_batches(loader, epoch):
    loader.set_epoch(epoch)
    return list(loader)


def test_batches_repeat_for_the_same_seed_and_epoch():
    images = random_images(np.random.default_rng(7), 50)

    def make(seed=11):
        return cifar_loader(images, 16, augment=True, shuffle=True, seed=seed)

    first, again = epoch_batches(make(), 2), epoch_batches(make(), 2)
    for (xa, ya), (xb, yb) in zip(first, again):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    other_epoch = epoch_batches(make(), 3)
    assert not np.array_equal(np.concatenate([y for _, y in first]),
                              np.concatenate([y for _, y in other_epoch]))
    other_seed = epoch_batches(make(seed=12), 2)
    assert not np.array_equal(np.concatenate([y for _, y in first]),
                              np.concatenate([y for _, y in other_seed]))


def test_augmented_images_are_padded_crops_flipped_half_the_time():
    """Each output is one of the 9 x 9 x 2 crops/flips of its image, and over an epoch both
    flips and several offsets occur."""
    rng = np.random.default_rng(8)
    images = random_images(rng, 200)
    table = normalization_table(CIFAR_MEAN, CIFAR_STD)
    offsets = np.array([(oy, ox, f) for oy in range(9) for ox in range(9) for f in (0, 1)])
    oy, ox, flip = offsets[:, 0], offsets[:, 1], offsets[:, 2].astype(bool)
    seen = set()
    for x, y in cifar_loader(images, 64, augment=True, shuffle=True):
        for image, label in zip(x[:8], y[:8]):
            same_image = np.full(len(offsets), label)
            candidates = augment_batch_reference(images, same_image, oy, ox, flip, table,
                                                 CROP_PADDING)
            match = np.flatnonzero((candidates == image).all(axis=(1, 2, 3)))
            assert len(match) >= 1, f"image {label} is not a padded crop"
            seen.add(tuple(offsets[match[0]]))
    assert {f for _, _, f in seen} == {0, 1}
    assert len({(oy, ox) for oy, ox, _ in seen}) > 5


def test_prefetch_gives_the_same_batches():
    images = random_images(np.random.default_rng(9), 70)
    plain = list(cifar_loader(images, 16, augment=True, shuffle=True, seed=5))
    prefetched = list(cifar_loader(images, 16, augment=True, shuffle=True, seed=5, prefetch=True))
    assert len(prefetched) == len(plain) == 5
    for (xa, ya), (xb, yb) in zip(plain, prefetched):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)


@pytest.mark.parametrize("prefetch", [False, True])
def test_kept_batches_are_never_overwritten(prefetch):
    """Holding on to every batch (labels are image indices here) must not corrupt earlier ones."""
    images = random_images(np.random.default_rng(10), 70)
    for x, y in list(cifar_loader(images, 16, shuffle=True, prefetch=prefetch)):
        np.testing.assert_array_equal(x, normalize_images(images[y], CIFAR_MEAN, CIFAR_STD))


def flips_by_image(loader, epoch):
    """Whether each image (by index, not by its place in the order) is mirrored in `epoch`'s plan."""
    loader.set_epoch(epoch)
    order, _, _, flip = loader._plan()
    by_image = np.empty(len(order), dtype=bool)
    by_image[order] = flip
    return by_image


@pytest.mark.parametrize("options", [{}, {"flip": "random"}], ids=["default", "random"])
def test_random_flips_are_drawn_as_before_flip_modes_existed(options):
    """Order, crop offsets, then one flip per position, all from the (seed, epoch) stream: the
    default recipe trains bit for bit as it did before --flip."""
    loader = cifar_loader(random_images(np.random.default_rng(12), 40), 16, augment=True, shuffle=True, seed=4,
                          **options)
    loader.set_epoch(3)
    rng = np.random.default_rng([4, 3])
    expected = (rng.permutation(40), rng.integers(0, 9, 40), rng.integers(0, 9, 40), rng.random(40) < 0.5)
    for name, got, want in zip(("order", "oy", "ox", "flip"), loader._plan(), expected):
        np.testing.assert_array_equal(got, want, err_msg=name)


def alternating_loader(n=300, seed=3, shuffle=True, augment=True):
    images = random_images(np.random.default_rng(13), n, size=4)
    return cifar_loader(images, 64, augment=augment, shuffle=shuffle, seed=seed, flip="alternate")


def test_alternating_flip_mirrors_each_image_the_other_way_every_epoch():
    loader = alternating_loader()
    flips = [flips_by_image(loader, epoch) for epoch in range(4)]
    for epoch in (1, 2, 3):
        np.testing.assert_array_equal(flips[epoch], ~flips[epoch - 1], err_msg=f"epoch {epoch} vs {epoch - 1}")


def test_alternating_flip_mirrors_a_random_half_in_the_first_epoch():
    share = flips_by_image(alternating_loader(n=10_000), 0).mean()
    assert abs(share - 0.5) < 0.02, f"{share:.1%} of the images mirrored in epoch 0 (4 sigma: 50 +- 2%)"


def test_alternating_flips_follow_the_image_and_the_seed_not_the_order():
    """Image i's flip in epoch e depends on (seed, e, i) alone, so a resumed run and every
    data-parallel shard replay it: the same with or without shuffling, the same plans again."""
    for epoch in (0, 1, 6):
        np.testing.assert_array_equal(flips_by_image(alternating_loader(), epoch),
                                      flips_by_image(alternating_loader(shuffle=False), epoch), err_msg=f"{epoch}")
        for got, want in zip(alternating_loader()._plan(), alternating_loader()._plan()):
            np.testing.assert_array_equal(got, want)
    assert not np.array_equal(flips_by_image(alternating_loader(seed=4), 0), flips_by_image(alternating_loader(), 0))


def test_without_augmentation_nothing_is_flipped_in_either_mode():
    loader = alternating_loader(augment=False)
    for epoch in (0, 1):
        assert not flips_by_image(loader, epoch).any()


def test_unknown_flip_mode_is_refused():
    with pytest.raises(NanoQ4Error, match="random or alternate"):
        cifar_loader(random_images(np.random.default_rng(14), 4), 2, flip="sometimes")


def test_computed_normalization_is_the_training_set_statistics():
    ds = load_dataset("synthetic", normalization="computed")
    pixels = ds.x_train.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(ds.mean, pixels.mean(axis=0), atol=1e-9)
    np.testing.assert_allclose(ds.std, pixels.std(axis=0), atol=1e-9)
    assert load_dataset("synthetic").mean == CIFAR_MEAN


# ---------------------------------------------------------------- real data (NANOQ4_DATA)

def real_data_root(folder):
    """The NANOQ4_DATA folder holding `folder`; missing data fails under CI, else skips."""
    root = os.environ.get("NANOQ4_DATA")
    if not root or not (Path(root) / folder).is_dir():
        message = (f"real data {folder}/ not found in NANOQ4_DATA={root!r}; "
                   f"run python ../shared/data/materialize.py DIR and set NANOQ4_DATA=DIR")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return Path(root)


@pytest.mark.realdata
def test_real_cifar10_counts_balance_and_mean():
    ds = load_cifar10(real_data_root("cifar-10-batches-py"))
    assert ds.x_train.shape == (50_000, 32, 32, 3) and ds.x_test.shape == (10_000, 32, 32, 3)
    assert np.bincount(ds.y_train).tolist() == [5000] * 10
    assert np.bincount(ds.y_test).tolist() == [1000] * 10
    assert ds.classes == CIFAR10_NAMES
    # published printout of data_batch_1 row 0: [59, 43, 50, ..., 140, 84, 72] (R plane first)
    assert ds.x_train[0, 0, :3, 0].tolist() == [59, 43, 50]
    assert ds.x_train[0, 31, 29:, 2].tolist() == [140, 84, 72]
    assert ds.y_train[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    mean = ds.x_train.reshape(-1, 3).mean(axis=0, dtype=np.float64) / 255
    np.testing.assert_allclose(mean, CIFAR_MEAN, atol=1e-3)
    np.testing.assert_allclose(channel_mean_std(ds.x_train)[0], mean, atol=1e-9)


@pytest.mark.realdata
def test_real_cifar100_counts_and_balance():
    root = real_data_root("cifar-100-python")
    fine = load_cifar100(root)
    assert fine.x_train.shape == (50_000, 32, 32, 3) and fine.x_test.shape == (10_000, 32, 32, 3)
    assert np.bincount(fine.y_train).tolist() == [500] * 100
    assert np.bincount(fine.y_test).tolist() == [100] * 100
    coarse = load_cifar100(root, coarse=True)
    assert np.bincount(coarse.y_train).tolist() == [2500] * 20
