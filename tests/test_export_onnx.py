"""ONNX export (nanoq4/export_onnx.py): the graph stores the .nq4 file's codes as packed INT4 (decoded
here by hand from the ONNX spec), passes onnx.checker's full check, and onnxruntime's logits equal
nanoq4's from the same .nq4 file within 1e-4 for VGG4bit (whose NHWC flatten order the NCHW graph must
keep) and SimpleResNet4bit, with per-tensor and per-channel scales. Tests needing onnx or onnxruntime
skip without the `onnx` extra; the error for a missing extra is tested either way."""
import json
import math
import re
import sys

import numpy as np
import pytest

from nanoq4 import data, export, export_onnx, models, nn, quant
from nanoq4.tensor import Tensor, no_grad
from test_cli import assert_one_line_error, no_model_loading, run_cli
from test_export import MEAN, MIB, STD

CLASSES10 = [f"class{i}" for i in range(10)]
CASES = [("vgg4bit", False), ("vgg4bit", True), ("simpleresnet4bit", False), ("simpleresnet4bit", True)]
IDS = [f"{name}-{'per-channel' if per_channel else 'per-tensor'}" for name, per_channel in CASES]
TOLERANCE = 1e-4


def pixels(n, seed):
    """Random uint8 NHWC images."""
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def model_like_a_trained_one(name, per_channel, seed=0):
    """A random 4-bit model in which every stored number moves the logits, so a wrong layout cannot
    hide: each weight's output channels scaled by different factors (distinct per-channel scales),
    random BatchNorm weights and biases, and running statistics taken from one batch (momentum 1 for
    one train-mode forward), so activations keep their size through the layers and the logits vary
    from image to image. (A fresh model's running statistics shrink the activations layer after
    layer until the logits are nearly the last bias, whatever the image.)"""
    nn.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = models.build_model(name, 10, quantize=True, bits=4, per_channel=per_channel)
    for _, layer in models.quantized_layers(model):
        w = layer.weight.data
        w *= rng.uniform(0.25, 2.0, (w.shape[0],) + (1,) * (w.ndim - 1)).astype(np.float32)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            m.weight.data[...] = rng.uniform(0.5, 1.5, m.weight.shape)
            m.bias.data[...] = rng.uniform(-0.3, 0.3, m.bias.shape)
            m.momentum = 1.0
    with no_grad():
        model.train()(Tensor(data.normalize_images(pixels(32, seed=100 + seed), MEAN, STD)))
    arch = dict(model=name, num_classes=10, quantize=True, bits=4, per_channel=per_channel)
    return model.eval(), arch


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """exported(name, per_channel) -> (model, .nq4 path, .onnx path), each case built once."""
    pytest.importorskip("onnx")
    cache = {}

    def get(name, per_channel):
        if (name, per_channel) not in cache:
            model, arch = model_like_a_trained_one(name, per_channel)
            folder = tmp_path_factory.mktemp(f"{name}-{'channel' if per_channel else 'tensor'}")
            export.export_model(model, folder / "model.nq4", arch, CLASSES10, MEAN, STD)
            export_onnx.export_onnx(folder / "model.nq4", folder / "model.onnx")
            cache[name, per_channel] = model, folder / "model.nq4", folder / "model.onnx"
        return cache[name, per_channel]
    return get


def nanoq4_logits(nq4_path, raw):
    return export.load_model(nq4_path).logits(data.normalize_images(raw, MEAN, STD))


# ----------------------------------------------------------------------------- same logits

@pytest.mark.parametrize("name, per_channel", CASES, ids=IDS)
def test_onnxruntime_logits_equal_nanoq4_logits_from_the_same_file(exported, name, per_channel):
    pytest.importorskip("onnxruntime")
    _, nq4, onnx_path = exported(name, per_channel)
    raw = pixels(16, seed=1)
    expected = nanoq4_logits(nq4, raw)
    got = export_onnx.onnx_logits(export_onnx.onnx_session(onnx_path), raw)
    spread = float(expected.std(axis=0).mean())
    diff = float(np.abs(got - expected).max())
    print(f"\n{name} per_channel={per_channel}: max |onnxruntime - nanoq4| = {diff:.1e}, logit spread {spread:.3f}")
    assert spread > 10 * TOLERANCE, "the logits barely depend on the image: this test could not catch a wrong layout"
    assert got.shape == expected.shape == (16, 10)
    assert diff <= TOLERANCE
    np.testing.assert_array_equal(got.argmax(axis=1), expected.argmax(axis=1))


def test_the_vgg_comparison_would_catch_a_wrong_flatten_order(exported):
    """Flattening the NCHW map directly (no transpose) would feed the 4096-feature linear layer in
    (c, h, w) order instead of nanoq4's (h, w, c): the same as permuting that layer's input columns,
    which moves the logits far beyond the tolerance of the test above."""
    _, nq4, _ = exported("vgg4bit", False)
    model = export.load_model(nq4)
    x = data.normalize_images(pixels(16, seed=1), MEAN, STD)
    right = model.logits(x)
    linear = model.model.layers[16]
    assert isinstance(linear, nn.QLinear) and linear.weight.shape == (512, 4096)
    w = linear.weight.data
    w[...] = w.reshape(512, 4, 4, 256).transpose(0, 3, 1, 2).reshape(512, 4096).copy()
    linear.stored = None  # compute with the permuted weight, not the file's codes
    assert np.abs(model.logits(x) - right).max() > 100 * TOLERANCE


def test_any_batch_size_runs_with_the_same_logits_per_image(exported):
    pytest.importorskip("onnxruntime")
    _, _, onnx_path = exported("vgg4bit", True)
    session = export_onnx.onnx_session(onnx_path)
    raw = pixels(5, seed=2)
    together = export_onnx.onnx_logits(session, raw)
    one_by_one = export_onnx.onnx_logits(session, raw, batch_size=1)
    assert together.shape == one_by_one.shape == (5, 10)
    np.testing.assert_allclose(one_by_one, together, rtol=0, atol=TOLERANCE)


def test_session_keeps_float32_activations(monkeypatch):
    """The session option that stops onnxruntime from running the int4 MatMuls with int8 activations."""
    ort = pytest.importorskip("onnxruntime")
    seen = {}

    def fake_session(path, options, providers=None):
        seen.update(path=path, options=options, providers=providers)
        return "session"

    monkeypatch.setattr(ort, "InferenceSession", fake_session)
    assert export_onnx.onnx_session("model.onnx") == "session"
    assert seen["options"].get_session_config_entry("session.qdq_matmulnbits_accuracy_level") == "0"
    assert seen["providers"] == ["CPUExecutionProvider"]


# ----------------------------------------------------------------------------- what the file holds

@pytest.mark.parametrize("name, per_channel", CASES, ids=IDS)
def test_onnx_checker_full_check_passes(exported, name, per_channel):
    onnx = pytest.importorskip("onnx")
    onnx.checker.check_model(onnx.load(exported(name, per_channel)[2]), full_check=True)


def int4_values(tensor):
    """An ONNX INT4 initializer decoded by hand from the spec: element 2i in the low nibble of byte i,
    element 2i+1 in the high nibble, each a 4-bit two's-complement number."""
    raw = np.frombuffer(tensor.raw_data, dtype=np.uint8)
    nibbles = np.stack([raw & 0x0F, raw >> 4], axis=1).reshape(-1)[:math.prod(tensor.dims)].astype(np.int8)
    return np.where(nibbles > 7, nibbles - 16, nibbles).reshape(tuple(tensor.dims))


@pytest.mark.parametrize("name, per_channel", CASES, ids=IDS)
def test_every_quantized_weight_is_packed_int4_holding_the_trained_codes_and_scales(exported, name, per_channel):
    onnx = pytest.importorskip("onnx")
    model, _, onnx_path = exported(name, per_channel)
    initializers = {t.name: t for t in onnx.load(onnx_path).graph.initializer}
    for layer_name, layer in models.quantized_layers(model):
        codes, scale = quant.quantize(layer.weight.data, 4, per_channel)
        onnx_layout = (0, 3, 1, 2) if codes.ndim == 4 else (1, 0)  # conv (Cout, Cin, KH, KW), MatMul (in, out)
        stored = initializers[f"{layer_name}.weight.codes"]
        assert stored.data_type == onnx.TensorProto.INT4, layer_name
        assert len(stored.raw_data) == (codes.size + 1) // 2, f"{layer_name}: two codes per byte"
        np.testing.assert_array_equal(int4_values(stored), codes.transpose(onnx_layout), err_msg=layer_name)
        stored_scale = onnx.numpy_helper.to_array(initializers[f"{layer_name}.weight.scale"])
        np.testing.assert_array_equal(stored_scale, scale, err_msg=f"{layer_name}: scale")


@pytest.mark.parametrize("name", ["vgg4bit", "simpleresnet4bit"])
def test_only_vectors_are_stored_as_float(exported, name):
    """Biases, scales, BatchNorm vectors and the input normalization are float32; every one of them
    is smaller than the smallest weight, so no weight is stored expanded."""
    onnx = pytest.importorskip("onnx")
    model, _, onnx_path = exported(name, False)
    smallest_weight = min(layer.weight.size for _, layer in models.quantized_layers(model))
    floats = [t for t in onnx.load(onnx_path).graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    largest = max(floats, key=lambda t: math.prod(t.dims))
    assert math.prod(largest.dims) < smallest_weight, f"{largest.name} {list(largest.dims)} is stored as float32"


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
def test_vgg_onnx_file_stays_close_to_the_nq4_file(exported, per_channel):
    _, nq4, onnx_path = exported("vgg4bit", per_channel)
    onnx_bytes, nq4_bytes = onnx_path.stat().st_size, nq4.stat().st_size
    print(f"\nVGG4bit per_channel={per_channel}: ONNX {onnx_bytes / MIB:.3f} MiB, .nq4 {nq4_bytes / MIB:.3f} MiB")
    assert onnx_bytes <= 1.8 * MIB


def test_metadata_names_classes_normalization_and_input_and_the_batch_is_dynamic(exported):
    onnx = pytest.importorskip("onnx")
    model = onnx.load(exported("simpleresnet4bit", False)[2])
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["class_names"]) == CLASSES10
    assert json.loads(props["normalization"]) == {"mean": list(MEAN), "std": list(STD)}
    assert json.loads(props["architecture"])["model"] == "simpleresnet4bit"
    assert "NCHW" in props["input"] and "0..255" in props["input"]
    (images,), (logits,) = model.graph.input, model.graph.output
    assert (images.name, logits.name) == ("images", "logits")
    in_dims, out_dims = images.type.tensor_type.shape.dim, logits.type.tensor_type.shape.dim
    assert in_dims[0].dim_param and [d.dim_value for d in in_dims[1:]] == [3, 32, 32]
    assert out_dims[0].dim_param and out_dims[1].dim_value == 10
    assert {o.domain: o.version for o in model.opset_import} == {"": 21}


# ----------------------------------------------------------------------------- verify

def test_verify_compares_accuracy_and_speed_of_both_runtimes(exported):
    pytest.importorskip("onnxruntime")
    _, nq4, onnx_path = exported("simpleresnet4bit", True)
    raw, labels = pixels(40, seed=3), np.arange(40) % 10
    result = export_onnx.verify(nq4, onnx_path, raw, labels, batch_size=16)
    assert result["images"] == 40
    assert result["max_abs_diff"] <= TOLERANCE
    assert result["agreement"] == 1.0
    expected = float((nanoq4_logits(nq4, raw).argmax(axis=1) == labels).mean())
    assert result["nanoq4"]["accuracy"] == result["onnxruntime"]["accuracy"] == pytest.approx(expected)
    assert result["nanoq4"]["images_per_s"] > 0 and result["onnxruntime"]["images_per_s"] > 0


# ----------------------------------------------------------------------------- command line

@pytest.fixture
def nq4_file(tmp_path):
    """A small model file (SimpleResNet4bit); making it needs neither onnx nor onnxruntime."""
    model, arch = model_like_a_trained_one("simpleresnet4bit", False)
    path = tmp_path / "model.nq4"
    export.export_model(model, path, arch, CLASSES10, MEAN, STD)
    return path


def test_help_documents_every_flag(capsys):
    code, out, _ = run_cli(export_onnx.main, ["--help"], capsys)
    assert code == 0
    for flag in ("--overwrite", "--verify", "--data-dir", "--coarse", "--no-download", "--batch-size"):
        assert flag in out, flag


def test_cli_writes_the_onnx_file_and_reports_both_sizes(nq4_file, capsys):
    pytest.importorskip("onnx")
    out = nq4_file.parent / "model.onnx"
    code, stdout, err = run_cli(export_onnx.main, [str(nq4_file), str(out)], capsys)
    assert code == 0, err
    assert re.search(rf"wrote {re.escape(str(out))}: \d+\.\d\d MiB \(the \.nq4 file: \d+\.\d\d MiB\)", stdout), stdout
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.nq4", "model.onnx"], "a temporary file was left"


def test_cli_refuses_to_overwrite_an_existing_file_without_the_flag(nq4_file, capsys):
    pytest.importorskip("onnx")
    out = nq4_file.parent / "model.onnx"
    out.write_bytes(b"previous")
    code, _, err = run_cli(export_onnx.main, [str(nq4_file), str(out)], capsys)
    assert code == 2 and "--overwrite" in assert_one_line_error(err)
    assert out.read_bytes() == b"previous"
    code, _, err = run_cli(export_onnx.main, [str(nq4_file), str(out), "--overwrite"], capsys)
    assert code == 0, err
    assert out.read_bytes() != b"previous"


DAMAGES = {
    "truncated": lambda raw: raw[:-7],
    "truncated into the header": lambda raw: raw[:40],
    "flipped payload byte": lambda raw: raw[:-1] + bytes([raw[-1] ^ 0x01]),
    "not a model file": lambda raw: b"NOTNANOQ" + raw[8:],
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_cli_refuses_a_damaged_model_file_in_one_line_naming_it(nq4_file, capsys, damage):
    pytest.importorskip("onnx")
    nq4_file.write_bytes(DAMAGES[damage](nq4_file.read_bytes()))
    out = nq4_file.parent / "model.onnx"
    code, _, err = run_cli(export_onnx.main, [str(nq4_file), str(out)], capsys)
    assert code == 2 and str(nq4_file) in assert_one_line_error(err)
    assert not out.exists()


def test_cli_unwritable_output_is_a_one_line_error(nq4_file, capsys):
    pytest.importorskip("onnx")
    blocker = nq4_file.parent / "not_a_folder"
    blocker.write_bytes(b"")  # a file where the folder should be: fails even when running as root
    out = blocker / "model.onnx"
    code, _, err = run_cli(export_onnx.main, [str(nq4_file), str(out)], capsys)
    line = assert_one_line_error(err)
    assert code == 2 and str(out) in line and "writable" in line


def test_cli_refuses_bad_requests_before_reading_the_model(nq4_file, capsys, monkeypatch):
    pytest.importorskip("onnx")
    monkeypatch.setattr(export_onnx, "load_model", no_model_loading)
    out = str(nq4_file.parent / "model.onnx")
    cases = [
        ([str(nq4_file), str(nq4_file.parent)], "folder"),
        ([str(nq4_file), str(nq4_file), "--overwrite"], "model file itself"),
        ([str(nq4_file), out, "--verify", "imagenet"], "imagenet"),
        ([str(nq4_file), out, "--verify", "cifar10", "--coarse"], "coarse"),
        ([str(nq4_file), out, "--verify", "synthetic", "--batch-size", "0"], "--batch-size"),
    ]
    for argv, fragment in cases:
        code, _, err = run_cli(export_onnx.main, argv, capsys)
        assert code == 2 and fragment in assert_one_line_error(err), argv
    assert sorted(p.name for p in nq4_file.parent.iterdir()) == ["model.nq4"]


@pytest.mark.parametrize("missing, extra_flags", [("onnx", []), ("onnxruntime", ["--verify", "synthetic"])])
def test_a_missing_extra_is_a_one_line_error_naming_the_install_command(nq4_file, capsys, monkeypatch, missing,
                                                                        extra_flags):
    if missing == "onnxruntime":
        pytest.importorskip("onnx")  # else the message is about onnx, which is checked first
    monkeypatch.setitem(sys.modules, missing, None)  # importing it now fails, as when it is not installed
    out = nq4_file.parent / "model.onnx"
    code, _, err = run_cli(export_onnx.main, [str(nq4_file), str(out)] + extra_flags, capsys)
    line = assert_one_line_error(err)
    assert code == 2 and f"{missing} is not installed" in line and 'pip install "nanoq4[onnx]"' in line
    assert not out.exists()


def test_cli_verify_prints_accuracy_and_speed_of_both_runtimes(tmp_path, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model, arch = model_like_a_trained_one("simpleresnet4bit", True)
    nq4 = tmp_path / "model.nq4"
    classes = data.synthetic_dataset(n_train=1, n_test=1, train=False).classes
    export.export_model(model, nq4, arch, classes, MEAN, STD)
    code, out, err = run_cli(export_onnx.main, [str(nq4), str(tmp_path / "model.onnx"), "--verify", "synthetic"],
                             capsys)
    assert code == 0, err
    assert "verified on 500 test images of synthetic" in out
    for runtime in ("nanoq4", "onnxruntime"):
        assert re.search(rf"^  {runtime} +accuracy \d+\.\d\d%, \d+ images/s$", out, re.M), out
    assert re.search(r"logits differ by at most \S+; same prediction for \d+\.\d\d% of the images", out), out
