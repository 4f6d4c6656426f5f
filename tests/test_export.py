"""Files (nanoq4/export.py): the packed-int4 model file (.nq4) and its inference model, training
checkpoints, and atomic writes. The formats are read here by hand from their documented layouts:
.nq4: 8-byte magic, u32 version, u32 header length, JSON header, payload (CRC-32 in the header);
.ckpt: 8-byte magic, u32 version, u64 payload length, u32 payload CRC-32, pickled payload."""
import json
import os
import pickle
import struct
import zlib

import numpy as np
import pytest

from nanoq4 import data, export, models, nn, quant
from nanoq4.errors import NanoQ4Error
from nanoq4.tensor import Tensor, no_grad

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CLASSES10 = [f"class{i}" for i in range(10)]
MIB = 2 ** 20


def images(n=8, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 32, 32, 3)).astype(np.float32)


def model_with_running_stats(name="simpleresnet4bit", num_classes=10, quantize=True, bits=4, per_channel=False):
    """A randomly initialised model whose BatchNorm running statistics moved off 0/1 by a few
    train-mode forwards, as after some training."""
    nn.manual_seed(0)
    model = models.build_model(name, num_classes, quantize=quantize, bits=bits, per_channel=per_channel)
    model.train()
    with no_grad():
        for seed in range(3):
            model(Tensor(images(8, seed=100 + seed)))
    arch = dict(model=name, num_classes=num_classes, quantize=quantize, bits=bits, per_channel=per_channel)
    return model, arch


def export_to(tmp_path, model, arch, filename="model.nq4"):
    path = tmp_path / filename
    export.export_model(model, path, arch, [f"class{i}" for i in range(arch["num_classes"])], MEAN, STD)
    return path


def read_layout(path):
    """(header dict, payload bytes) parsed by hand from the documented layout."""
    raw = path.read_bytes()
    version, header_len = struct.unpack("<II", raw[8:16])
    start = 16 if version == 1 else 20  # version 2 adds the header's CRC-32 after its length
    header = json.loads(raw[start:start + header_len])
    return raw[:8], version, header, raw[start + header_len:]


def eval_logits(model, x):
    with no_grad():
        return model.eval()(Tensor(x)).data


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    model, arch = model_with_running_stats("vgg4bit")
    return model, export_to(tmp_path_factory.mktemp("vgg"), model, arch)


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory):
    model, arch = model_with_running_stats()
    return model, export_to(tmp_path_factory.mktemp("resnet"), model, arch)


# ----------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("which", ["vgg_file", "resnet_file"])
def test_round_trip_logits_match_the_trained_model(which, request):
    model, path = request.getfixturevalue(which)
    x = images(16, seed=1)
    expected = eval_logits(model, x)
    got = export.load_model(path).logits(x)
    assert np.abs(got - expected).max() <= 1e-4
    np.testing.assert_array_equal(got.argmax(axis=1), expected.argmax(axis=1))


def test_round_trip_restores_batch_norm_running_statistics(resnet_file):
    model, path = resnet_file
    loaded = export.load_model(path).model.state_dict()
    for name, value in model.state_dict().items():
        if "running" in name:
            initial = 0.0 if name.endswith("running_mean") else 1.0
            assert not np.allclose(value, initial), f"{name}: the fixture should have moved it"
            np.testing.assert_array_equal(loaded[name], value, err_msg=name)


def test_loaded_quantized_weights_are_the_grid_weights_the_model_trained_on(resnet_file):
    model, path = resnet_file
    loaded = dict(models.quantized_layers(export.load_model(path).model))
    for name, layer in models.quantized_layers(model):
        w_q, codes, _ = quant.fake_quantize(layer.weight.data)
        np.testing.assert_array_equal(loaded[name].weight.data, w_q, err_msg=name)
        np.testing.assert_array_equal(loaded[name].quantized_codes()[0], codes,
                                      err_msg=f"{name}: re-quantizing the loaded weight must give the same codes")
        np.testing.assert_array_equal(loaded[name].quantized_weight().data, w_q,
                                      err_msg=f"{name}: the loaded layer must compute with exactly w_q")


def test_a_layer_using_stored_codes_computes_with_them_where_requantizing_would_move_the_scale():
    """Scale with float32 mantissa 9586988: re-deriving it from max|codes * s| / 7 gives s plus or
    minus one ulp, so a loaded model that re-quantized its weights would not compute the trained
    network bit for bit; use_stored keeps the file's codes and scale as they are."""
    layer = models.quantized_layers(models.build_model("simpleresnet4bit"))[0][1]
    s = np.float32(9586988 * 2.0 ** -23 * 2.0 ** -7)
    codes = np.random.default_rng(0).integers(-7, 8, size=layer.weight.data.shape).astype(np.int8)
    codes.flat[0] = 7
    exact = quant.dequantize(codes, s)
    assert quant.compute_scale(exact) != s, "this scale should be one that re-quantization moves"
    layer.use_stored(codes, s)
    np.testing.assert_array_equal(layer.quantized_weight().data, exact)
    np.testing.assert_array_equal(layer.codes, codes)
    assert layer.scale == s


def test_loaded_layers_compute_with_the_files_codes_and_scales(resnet_file):
    model, path = resnet_file
    loaded = dict(models.quantized_layers(export.load_model(path).model))
    for name, layer in models.quantized_layers(model):
        codes, scale = layer.quantized_codes()
        stored_codes, stored_scale, _ = loaded[name].stored
        np.testing.assert_array_equal(stored_codes, codes, err_msg=name)
        np.testing.assert_array_equal(stored_scale, scale, err_msg=name)


def test_stored_codes_unpack_to_quantize_of_the_latent_weights(resnet_file):
    model, path = resnet_file
    _, _, header, payload = read_layout(path)
    tensors = header["tensors"]
    for name, layer in models.quantized_layers(model):
        info, s_info = tensors[name + ".weight"], tensors[name + ".weight.scale"]
        codes, scale = quant.quantize(layer.weight.data)
        blob = np.frombuffer(payload[info["offset"]:info["offset"] + info["nbytes"]], np.uint8)
        stored = quant.unpack_int4(blob, codes.size).reshape(info["shape"])
        np.testing.assert_array_equal(stored, codes, err_msg=name)
        stored_scale = np.frombuffer(payload[s_info["offset"]:s_info["offset"] + s_info["nbytes"]], "<f4")
        np.testing.assert_array_equal(stored_scale, np.atleast_1d(scale).reshape(-1), err_msg=name)


def test_file_holds_no_latent_float_weights(resnet_file):
    model, path = resnet_file
    _, _, header, _ = read_layout(path)
    tensors = header["tensors"]
    for name, layer in models.quantized_layers(model):
        info = tensors[name + ".weight"]
        assert info["dtype"] == "int4", name
        assert info["nbytes"] == (layer.weight.size + 1) // 2, f"{name}: two codes per byte"


def test_file_starts_with_magic_and_version_and_checksums_its_payload(resnet_file):
    _, path = resnet_file
    magic, version, header, payload = read_layout(path)
    assert magic == b"NANOQ4\x00M" and version == 2
    raw = path.read_bytes()
    header_len, header_crc = struct.unpack("<II", raw[12:20])
    assert header_crc == zlib.crc32(raw[20:20 + header_len])
    assert header["payload_crc32"] == zlib.crc32(payload)
    assert header["layout"] == "NHWC"
    assert header["class_names"] == CLASSES10
    assert header["normalization"] == {"mean": list(MEAN), "std": list(STD)}


def test_vgg_file_is_at_most_1_6_mib(vgg_file):
    model, path = vgg_file
    float_bytes, file_bytes = export.model_file_sizes(model, path)
    print(f"\nVGG4bit float32 {float_bytes / MIB:.2f} MiB, int4 file {file_bytes / MIB:.3f} MiB, "
          f"ratio x{float_bytes / file_bytes:.2f}")
    assert float_bytes == 4 * sum(v.size for v in model.state_dict().values())
    assert 12.3 * MIB < float_bytes < 12.5 * MIB
    assert file_bytes == os.path.getsize(path)
    assert file_bytes <= 1.6 * MIB


@pytest.mark.parametrize("bits, per_channel", [(4, True), (2, False), (3, False), (8, False), (3, True)])
def test_other_bit_widths_and_per_channel_scales_round_trip(tmp_path, bits, per_channel):
    model, arch = model_with_running_stats(bits=bits, per_channel=per_channel)
    path = export_to(tmp_path, model, arch)
    loaded = export.load_model(path)
    x = images(8, seed=1)
    expected = eval_logits(model, x)
    got = loaded.logits(x)
    assert np.abs(got - expected).max() <= 1e-4
    np.testing.assert_array_equal(got.argmax(axis=1), expected.argmax(axis=1))
    layer = dict(models.quantized_layers(loaded.model))["layers.0"]
    assert (layer.bits, layer.per_channel) == (bits, per_channel)


@pytest.mark.parametrize("bits, bytes_per_code", [(2, 0.5), (3, 0.5), (8, 1.0)])
def test_codes_take_half_a_byte_up_to_4_bits_and_a_byte_above(tmp_path, bits, bytes_per_code):
    model, arch = model_with_running_stats(bits=bits)
    _, _, header, _ = read_layout(export_to(tmp_path, model, arch))
    info = header["tensors"]["layers.0.weight"]
    assert info["dtype"] == f"int{bits}"
    assert info["nbytes"] == int(np.ceil(model.layers[0].weight.size * bytes_per_code))


def test_per_channel_file_stores_one_scale_per_output_channel(tmp_path):
    model, arch = model_with_running_stats(per_channel=True)
    _, _, header, _ = read_layout(export_to(tmp_path, model, arch))
    assert header["tensors"]["layers.0.weight.scale"]["shape"] == [16]


def test_fp32_model_round_trips_exactly(tmp_path):
    model, arch = model_with_running_stats(quantize=False)
    path = export_to(tmp_path, model, arch)
    x = images(8, seed=1)
    np.testing.assert_array_equal(export.load_model(path).logits(x), eval_logits(model, x))


def test_inference_model_probabilities_normalize_uint8_images(resnet_file):
    model, path = resnet_file
    loaded = export.load_model(path)
    raw = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    probs = loaded.predict_proba(raw)
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-5)
    x = ((raw / 255.0 - np.array(MEAN)) / np.array(STD)).astype(np.float32)
    np.testing.assert_array_equal(probs.argmax(axis=1), eval_logits(model, x).argmax(axis=1))


def test_inference_model_normalizes_with_the_trainers_float64_values(resnet_file):
    """One normalization: the file's mean/std as written (float64), through data.normalize_images."""
    _, path = resnet_file
    loaded = export.load_model(path)
    assert loaded.mean == MEAN and loaded.std == STD
    raw = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(loaded.normalize(raw), data.normalize_images(raw, MEAN, STD))


def test_inference_model_probabilities_are_the_softmax_of_the_logits(resnet_file):
    _, path = resnet_file
    loaded = export.load_model(path)
    raw = np.random.default_rng(2).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    z = loaded.logits(loaded.normalize(raw)).astype(np.float64)
    softmax = np.exp(z - z.max(axis=1, keepdims=True))
    np.testing.assert_allclose(loaded.predict_proba(raw), softmax / softmax.sum(axis=1, keepdims=True), rtol=1e-5)


# ----------------------------------------------------------------------------- refusals

def corrupt_magic(raw):
    return b"NOTNANOQ" + raw[8:]


def truncate_tail(raw):
    return raw[:-7]


def truncate_into_header(raw):
    return raw[:40]


def flip_payload_byte(raw):
    raw = bytearray(raw)
    raw[-1] ^= 0x01
    return bytes(raw)


def future_version(raw):
    return raw[:8] + struct.pack("<I", 3) + raw[12:]


def flip_header_digit(raw):
    """A self-consistent JSON header with one digit changed (a tensor's byte offset, say):
    still parses, so only the header checksum can catch it."""
    header_len = struct.unpack("<I", raw[12:16])[0]
    header = raw[20:20 + header_len]
    i = header.index(b'"nbytes": ') + len(b'"nbytes": ')
    digit = header[i:i + 1]
    flipped = header[:i] + (b"9" if digit != b"9" else b"8") + header[i + 1:]
    return raw[:20] + flipped + raw[20 + header_len:]


REFUSALS = {
    "wrong magic": (corrupt_magic, "not a nanoq4 model file"),
    "truncated payload": (truncate_tail, "corrupt or truncated"),
    "truncated header": (truncate_into_header, "corrupt or truncated"),
    "flipped payload byte": (flip_payload_byte, "checksum"),
    "wrong format version": (future_version, "version 3"),
    "flipped header digit": (flip_header_digit, "header checksum"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_damaged_file_is_refused_with_a_one_line_message_naming_it(resnet_file, tmp_path, case):
    corrupt, fragment = REFUSALS[case]
    _, good = resnet_file
    bad = tmp_path / "damaged.nq4"
    bad.write_bytes(corrupt(good.read_bytes()))
    with pytest.raises(NanoQ4Error) as info:
        export.load_model(bad)
    message = str(info.value)
    assert str(bad) in message
    assert fragment in message
    assert "\n" not in message


def test_missing_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "nowhere.nq4"
    with pytest.raises(NanoQ4Error) as info:
        export.load_model(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.nq4"
    path.write_bytes(b"")
    with pytest.raises(NanoQ4Error, match="not a nanoq4 model file"):
        export.load_model(path)


def write_with_other_class_count(good, path):
    """A self-consistent file (valid checksum) whose architecture says 7 classes while its
    tensors hold 10."""
    _, _, header, payload = read_layout(good)
    header["architecture"]["num_classes"] = 7
    body = json.dumps(header).encode()
    path.write_bytes(b"NANOQ4\x00M" + struct.pack("<II", 1, len(body)) + body + payload)


def test_tensors_that_do_not_fit_the_architecture_are_refused(resnet_file, tmp_path):
    path = tmp_path / "other_arch.nq4"
    write_with_other_class_count(resnet_file[1], path)
    with pytest.raises(NanoQ4Error, match="shape"):
        export.load_model(path)


def test_tensors_that_do_not_fit_the_architecture_are_refused_naming_the_file(resnet_file, tmp_path):
    path = tmp_path / "other_arch.nq4"
    write_with_other_class_count(resnet_file[1], path)
    with pytest.raises(NanoQ4Error) as info:
        export.load_model(path)
    assert str(path) in str(info.value)


def test_header_without_architecture_is_refused(tmp_path):
    """A valid checksum over a header that lacks the architecture: a refusal, not a KeyError."""
    payload = b""
    body = json.dumps({"payload_crc32": zlib.crc32(payload), "tensors": {}}).encode()
    path = tmp_path / "no_arch.nq4"
    path.write_bytes(b"NANOQ4\x00M" + struct.pack("<II", 1, len(body)) + body + payload)
    with pytest.raises(NanoQ4Error) as info:
        export.load_model(path)
    assert str(path) in str(info.value)


# ----------------------------------------------------------------------------- atomic writes

def chunks_failing_after_first():
    yield b"first part of the file"
    raise OSError("disk full (simulated)")


def test_failed_write_leaves_no_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.nq4"
    with pytest.raises(NanoQ4Error, match="simulated"):
        export.atomic_write_bytes(target, chunks_failing_after_first())
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_previous_file(tmp_path):
    target = tmp_path / "out.nq4"
    target.write_bytes(b"previous version")
    with pytest.raises(NanoQ4Error):
        export.atomic_write_bytes(target, chunks_failing_after_first())
    assert target.read_bytes() == b"previous version"
    assert list(tmp_path.iterdir()) == [target]


def test_export_failing_mid_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def failing_fsync(fd):
        raise OSError("fsync failed (simulated)")
    monkeypatch.setattr(export.os, "fsync", failing_fsync)
    model, arch = model_with_running_stats()
    with pytest.raises(NanoQ4Error, match="simulated"):
        export_to(tmp_path, model, arch)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_folder_is_a_one_line_error_naming_the_file(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_bytes(b"")  # a file where the folder should be: fails even when running as root
    target = blocker / "model.nq4"
    with pytest.raises(NanoQ4Error) as info:
        export.atomic_write_bytes(target, [b"x"])
    assert str(target) in str(info.value) and "writable" in str(info.value) and "\n" not in str(info.value)


def test_version_1_files_without_header_checksum_still_load(resnet_file, tmp_path):
    model, good = resnet_file
    _, _, header, payload = read_layout(good)
    body = json.dumps(header).encode()
    old = tmp_path / "v1.nq4"
    old.write_bytes(b"NANOQ4\x00M" + struct.pack("<II", 1, len(body)) + body + payload)
    x = np.random.default_rng(0).standard_normal((4, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(export.load_model(old).logits(x), export.load_model(good).logits(x))


def test_successful_write_leaves_only_the_target_with_the_usual_permissions(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    export.atomic_write_bytes(target, [b"ab", b"cd"])
    assert target.read_bytes() == b"abcd"
    assert list(target.parent.iterdir()) == [target]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


# ----------------------------------------------------------------------------- checkpoints

def test_checkpoint_round_trip_keeps_every_entry(tmp_path):
    model, _ = model_with_running_stats()
    path = tmp_path / "run.ckpt"
    state = dict(model=model.state_dict(), epoch=3, batch=5, history=[{"epoch": 1, "test_acc": 0.5}],
                 config={"model": "simpleresnet4bit"}, rng=nn.get_rng_state())
    export.save_checkpoint(path, **state)
    loaded = export.load_checkpoint(path)
    assert loaded["format"] == "nanoq4-checkpoint" and loaded["version"] == 2
    for key in ("epoch", "batch", "history", "config", "rng"):
        assert loaded[key] == state[key], key
    assert list(loaded["model"]) == list(state["model"])
    for name, value in state["model"].items():
        np.testing.assert_array_equal(loaded["model"][name], value, err_msg=name)


def test_checkpoint_restores_a_model(tmp_path):
    model, _ = model_with_running_stats()
    export.save_checkpoint(tmp_path / "run.ckpt", model=model.state_dict())
    nn.manual_seed(1)
    fresh = models.build_model("simpleresnet4bit")
    fresh.load_state_dict(export.load_checkpoint(tmp_path / "run.ckpt")["model"])
    x = images(4)
    np.testing.assert_array_equal(eval_logits(fresh, x), eval_logits(model, x))


def write_truncated_checkpoint(path):
    export.save_checkpoint(path, model={"w": np.ones(100, np.float32)})
    path.write_bytes(path.read_bytes()[:-20])


def write_corrupt_checkpoint(path):
    export.save_checkpoint(path, model={"w": np.ones(100, np.float32)})
    raw = bytearray(path.read_bytes())
    raw[0] = 0x00
    path.write_bytes(bytes(raw))


def test_checkpoint_starts_with_magic_version_length_and_checksum(tmp_path):
    path = tmp_path / "run.ckpt"
    export.save_checkpoint(path, model={"w": np.arange(10, dtype=np.float32)}, epoch=1)
    raw = path.read_bytes()
    version, length, crc = struct.unpack("<IQI", raw[8:24])
    assert raw[:8] == b"NANOQ4\x00C" and version == 2
    assert length == len(raw) - 24 and crc == zlib.crc32(raw[24:])
    assert pickle.loads(raw[24:])["epoch"] == 1


def test_checkpoint_with_one_flipped_bit_in_its_weights_is_refused(tmp_path):
    """A flipped bit inside a float array still unpickles (to a wrong weight): only the checksum
    catches it."""
    path = tmp_path / "run.ckpt"
    weights = np.full(1000, 0.25, dtype=np.float32)
    export.save_checkpoint(path, model={"w": weights})
    raw = bytearray(path.read_bytes())
    at = bytes(raw).index(weights.tobytes()) + 2000
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))
    damaged = pickle.loads(bytes(raw[24:]))["model"]["w"]
    assert damaged[500] != 0.25, "the flipped bit must unpickle to a wrong weight, else this test proves nothing"
    with pytest.raises(NanoQ4Error, match="damaged") as info:
        export.load_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_version_1_checkpoints_without_a_checksum_still_load(tmp_path):
    path = tmp_path / "old.ckpt"
    path.write_bytes(pickle.dumps({"format": "nanoq4-checkpoint", "version": 1, "epoch": 3}))
    assert export.load_checkpoint(path)["epoch"] == 3


def write_checkpoint_with_a_future_header(path):
    export.save_checkpoint(path, model={"w": np.ones(10, np.float32)})
    raw = bytearray(path.read_bytes())
    raw[8:12] = struct.pack("<I", 3)
    path.write_bytes(bytes(raw))


BAD_CHECKPOINTS = {
    "random bytes": lambda p: p.write_bytes(os.urandom(64)),
    "a model file": lambda p: p.write_bytes(b"NANOQ4\x00M" + b"\x00" * 32),
    "a pickle of something else": lambda p: p.write_bytes(pickle.dumps({"epoch": 1})),
    "a pickle of a list": lambda p: p.write_bytes(pickle.dumps([1, 2, 3])),
    "truncated": write_truncated_checkpoint,
    "corrupt first byte": write_corrupt_checkpoint,
    "future version": lambda p: p.write_bytes(pickle.dumps({"format": "nanoq4-checkpoint", "version": 99})),
    "future header version": write_checkpoint_with_a_future_header,
    "header cut short": lambda p: p.write_bytes(b"NANOQ4\x00C\x02\x00"),
    "bare pickle claiming version 2": lambda p: p.write_bytes(pickle.dumps({"format": "nanoq4-checkpoint",
                                                                           "version": 2})),
    "empty": lambda p: p.write_bytes(b""),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_non_checkpoint_file_is_refused_naming_it(tmp_path, case):
    path = tmp_path / "bad.ckpt"
    BAD_CHECKPOINTS[case](path)
    with pytest.raises(NanoQ4Error) as info:
        export.load_checkpoint(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_checkpoint_is_refused_naming_it(tmp_path):
    path = tmp_path / "missing.ckpt"
    with pytest.raises(NanoQ4Error, match="cannot read checkpoint") as info:
        export.load_checkpoint(path)
    assert str(path) in str(info.value)
