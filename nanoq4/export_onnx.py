"""`python -m nanoq4.export_onnx MODEL.nq4 MODEL.onnx`: a .nq4 model file as an ONNX graph that
onnxruntime runs without nanoq4, its weights still 4-bit (ONNX INT4 tensors, opset 21).

The graph (eval mode, NCHW, the batch size N dynamic):
    images     float32 (N, 3, H, W): RGB pixel values 0..255, NOT normalized; a Mul and an Add compute
               (x / 255 - mean) / std with the training normalization (also in the metadata)
    conv       DequantizeLinear(INT4 codes (Cout, Cin, KH, KW), float32 scale) -> Conv; the scale is a
               scalar (per tensor) or one per output channel (axis 0)
    linear     DequantizeLinear(INT4 codes (in, out), scale per tensor or per output, axis 1) -> MatMul -> Add
    BatchNorm  BatchNormalization with the running statistics, then Relu where nanoq4 fuses one
    others     MaxPool, GlobalAveragePool + Flatten, Add + Relu (residual block); dropout is left out
    logits     float32 (N, classes), before softmax
Codes and scales are copied from the .nq4 file, never re-quantized. ONNX packs INT4 as nanoq4 does
(element 2i in the low nibble of byte i, two's complement), so a weight only has its axes reordered
from nanoq4's NHWC-friendly layout and is packed again. nanoq4 flattens NHWC feature maps in
(h, w, c) order, so the graph transposes NCHW to NHWC before Flatten: the linear layer's input
features keep the order it was trained with. Metadata (JSON values): class_names, normalization,
architecture, input.

onnxruntime pitfall: by default it fuses DequantizeLinear(int4) + MatMul into its MatMulNBits op at
accuracy level 4, which rounds the activations to int8 (relative error ~2e-3, silently). onnx_session
sets session.qdq_matmulnbits_accuracy_level = 0, which keeps them float32 like nanoq4.

Needs the optional extra: pip install "nanoq4[onnx]" (onnx, onnxruntime, ml_dtypes).
"""
import importlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from . import cli, data, nn, quant
from .errors import NanoQ4Error
from .evaluate import check_class_names
from .export import _read_model_file, atomic_write_bytes, load_model
from .models import ResidualConvBlock

OPSET = 21  # the first opset with INT4 tensors and INT4 DequantizeLinear
IR_VERSION = 10  # the IR version that came with opset 21 (onnx 1.16): runtimes of that age read the file
INPUT, OUTPUT = "images", "logits"
FLOAT_ACTIVATIONS = ("session.qdq_matmulnbits_accuracy_level", "0")  # see the module docstring
MIB = 2 ** 20


def _require(module):
    """Import a package of the onnx extra; a missing one is a one-line error naming the install command."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise NanoQ4Error(f"{module} is not installed; ONNX export and verification need the onnx extra: "
                          f'pip install "nanoq4[onnx]" (or pip install ".[onnx]" in a nanoq4 checkout)') from None


def _stored_codes(path):
    """{layer name: (int8 codes in nanoq4's layout, float32 scale)} exactly as the .nq4 file stores them
    (re-quantizing the loaded weights could move a scale by an ulp)."""
    header, payload = _read_model_file(path)
    tensors, stored = header["tensors"], {}
    for name, info in tensors.items():
        if info["dtype"] == "float32":
            continue
        s_info = tensors[name + ".scale"]
        packed = np.frombuffer(payload, np.uint8, count=info["nbytes"], offset=info["offset"])
        codes = quant.unpack_codes(packed, int(np.prod(info["shape"])), int(info["dtype"][3:]))
        scale = np.frombuffer(payload, "<f4", count=s_info["nbytes"] // 4, offset=s_info["offset"])
        stored[name[:-len(".weight")]] = (codes.reshape(info["shape"]), scale.reshape(s_info["shape"]))
    return stored


class _Graph:
    """ONNX nodes and initializers appended in forward order; each node's one output is named after it."""

    def __init__(self, onnx, model, stored, bits):
        self.onnx, self.stored, self.bits = onnx, stored, bits
        self.names = {id(m): name for name, m in model.named_modules()}
        self.nodes, self.initializers = [], []

    def node(self, op, inputs, name, **attrs):
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def floats(self, name, array):
        self.initializers.append(self.onnx.numpy_helper.from_array(np.asarray(array, dtype=np.float32), name))
        return name

    def weight(self, name, layer, axes):
        """The float weight of `layer` in ONNX layout (nanoq4's axes in the order `axes`): DequantizeLinear of
        its stored codes (INT4, two per byte, up to 4 bits; INT8 above), or float32 if it is not quantized."""
        if name not in self.stored:
            return self.floats(f"{name}.weight", layer.weight.data.transpose(axes))
        codes, scale = self.stored[name]
        codes = np.ascontiguousarray(codes.transpose(axes))
        if self.bits <= 4:
            dtype, raw = self.onnx.TensorProto.INT4, quant.pack_int4(codes).tobytes()
        else:
            dtype, raw = self.onnx.TensorProto.INT8, codes.astype(np.int8).tobytes()
        self.initializers.append(self.onnx.helper.make_tensor(f"{name}.weight.codes", dtype, codes.shape, raw,
                                                              raw=True))
        per_channel = {"axis": axes.index(0)} if scale.ndim else {}  # where the output channels went
        return self.node("DequantizeLinear", [f"{name}.weight.codes", self.floats(f"{name}.weight.scale", scale)],
                         f"{name}.weight", **per_channel)

    def normalize(self, mean, std):
        """(x / 255 - mean) / std per channel of NCHW pixels, as nanoq4's data loader normalizes."""
        mean, std = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
        scaled = self.node("Mul", [INPUT, self.floats("normalize.scale", (1 / (255 * std)).reshape(1, 3, 1, 1))],
                           "normalize.mul")
        return self.node("Add", [scaled, self.floats("normalize.shift", (-mean / std).reshape(1, 3, 1, 1))],
                         "normalize")

    def layer(self, layer, x):
        """Append `layer` applied to the NCHW tensor named x; return the name of its output."""
        name = self.names[id(layer)]
        if isinstance(layer, nn.Sequential):
            for child in layer.layers:
                x = self.layer(child, x)
            return x
        if isinstance(layer, ResidualConvBlock):  # relu(bn(conv(x)) + x)
            y = self.layer(layer.bn, self.layer(layer.conv, x))
            return self.node("Relu", [self.node("Add", [y, x], f"{name}.add")], f"{name}.relu")
        if isinstance(layer, nn.Conv2d):  # QConv2d too
            kh, kw = layer.weight.shape[1:3]
            bias = [] if layer.bias is None else [self.floats(f"{name}.bias", layer.bias.data)]
            return self.node("Conv", [x, self.weight(name, layer, (0, 3, 1, 2))] + bias, f"{name}.conv",
                             kernel_shape=[kh, kw], strides=[layer.stride] * 2, pads=[layer.padding] * 4)
        if isinstance(layer, nn.Linear):  # QLinear too; MatMul wants the weight as (in, out)
            y = self.node("MatMul", [x, self.weight(name, layer, (1, 0))], f"{name}.matmul")
            if layer.bias is None:
                return y
            return self.node("Add", [y, self.floats(f"{name}.bias", layer.bias.data)], f"{name}.add")
        if isinstance(layer, (nn.BatchNorm2d, nn.BatchNorm1d)):
            values = (layer.weight.data, layer.bias.data, layer.running_mean, layer.running_var)
            params = [self.floats(f"{name}.{p}", v) for p, v in zip(("scale", "bias", "mean", "var"), values)]
            y = self.node("BatchNormalization", [x] + params, f"{name}.batchnorm", epsilon=float(layer.eps))
            return self.node("Relu", [y], f"{name}.relu") if layer.relu else y
        if isinstance(layer, nn.ReLU):
            return self.node("Relu", [x], f"{name}.relu")
        if isinstance(layer, nn.MaxPool2d):
            k, s = layer.kernel_size, layer.stride
            return self.node("MaxPool", [x], f"{name}.maxpool", kernel_shape=[k, k], strides=[s, s])
        if isinstance(layer, nn.GlobalAvgPool):
            return self.node("Flatten", [self.node("GlobalAveragePool", [x], f"{name}.pool")], f"{name}.flatten",
                             axis=1)
        if isinstance(layer, nn.Flatten):  # nanoq4's (h, w, c) feature order: back to NHWC first
            nhwc = self.node("Transpose", [x], f"{name}.to_nhwc", perm=[0, 2, 3, 1])
            return self.node("Flatten", [nhwc], f"{name}.flatten", axis=1)
        if isinstance(layer, nn.Dropout):  # the identity in eval mode
            return x
        raise NanoQ4Error(f"cannot export layer {name} ({type(layer).__name__}) to ONNX")


def onnx_model(nq4_path):
    """The ONNX ModelProto of a .nq4 model file, checked by onnx.checker (full check)."""
    onnx = _require("onnx")
    loaded = load_model(nq4_path)
    graph = _Graph(onnx, loaded.model, _stored_codes(nq4_path), loaded.arch["bits"])
    graph.node("Identity", [graph.layer(loaded.model, graph.normalize(loaded.mean, loaded.std))], OUTPUT)
    size, helper, float32 = loaded.input_size, onnx.helper, onnx.TensorProto.FLOAT
    described_input = (f"{INPUT}: float32 (N, 3, {size}, {size}) NCHW, RGB pixel values 0..255; the graph "
                       f"normalizes them as (x / 255 - mean) / std")
    inputs = [helper.make_tensor_value_info(INPUT, float32, ["N", 3, size, size], described_input)]
    outputs = [helper.make_tensor_value_info(OUTPUT, float32, ["N", len(loaded.class_names)],
                                             f"{OUTPUT}: float32 (N, classes), before softmax")]
    model = helper.make_model(
        helper.make_graph(graph.nodes, loaded.arch["model"], inputs, outputs, graph.initializers),
        opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION, producer_name="nanoq4",
        doc_string=f"nanoq4 {loaded.arch['model']} with packed int4 weights; run it in onnxruntime with the session "
                   f"config entry {FLOAT_ACTIVATIONS[0]}={FLOAT_ACTIVATIONS[1]} (float32 activations)")
    helper.set_model_props(model, {"class_names": json.dumps(loaded.class_names),
                                   "normalization": json.dumps(loaded.header["normalization"]),
                                   "architecture": json.dumps(loaded.arch), "input": described_input})
    onnx.checker.check_model(model, full_check=True)
    return model


def export_onnx(nq4_path, onnx_path, overwrite=False):
    """Write the .nq4 model file as ONNX, atomically; return the file's size in bytes. An existing
    output is refused unless overwrite (and the model file itself always)."""
    _require("onnx")
    onnx_path = Path(onnx_path)
    if onnx_path.is_dir():
        raise NanoQ4Error(f"{onnx_path} is a folder; give a file name such as {onnx_path / 'model.onnx'}")
    if onnx_path.exists():
        if onnx_path.resolve() == Path(nq4_path).resolve():
            raise NanoQ4Error(f"{onnx_path} is the model file itself; choose another name for the ONNX file")
        if not overwrite:
            raise NanoQ4Error(f"{onnx_path} already exists; pass --overwrite to replace it")
    atomic_write_bytes(onnx_path, [onnx_model(nq4_path).SerializeToString()])
    return os.path.getsize(onnx_path)


# ----------------------------------------------------------------------------- running and verifying

def onnx_session(onnx_path):
    """An onnxruntime CPU session that computes in float32 as nanoq4 does: without the config entry,
    onnxruntime turns each int4 DequantizeLinear + MatMul into MatMulNBits at accuracy level 4, which
    rounds the activations to int8 (logits off by ~2e-3 relative, silently)."""
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    options.add_session_config_entry(*FLOAT_ACTIVATIONS)
    options.log_severity_level = 3  # errors only: no optimizer notes on stderr
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def onnx_input(images):
    """uint8 NHWC images -> the graph's input: float32 NCHW pixel values 0..255."""
    return np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2), dtype=np.float32)


def onnx_logits(session, images, batch_size=250):
    """(N, classes) logits of uint8 NHWC images from an onnxruntime session of an exported model."""
    return np.concatenate([session.run([OUTPUT], {INPUT: onnx_input(images[i:i + batch_size])})[0]
                           for i in range(0, len(images), batch_size)])


def nanoq4_logits(model, images, batch_size=250):
    """(N, classes) logits of uint8 NHWC images from a loaded .nq4 model (export.InferenceModel)."""
    return np.concatenate([model.logits(model.normalize(images[i:i + batch_size]))
                           for i in range(0, len(images), batch_size)])


def verify(nq4_path, onnx_path, images, labels=None, batch_size=250):
    """Run uint8 NHWC images through nanoq4 (from the .nq4 file) and onnxruntime (from the ONNX file) ->
    dict(images, max_abs_diff of the logits, agreement = fraction of equal predictions, and for
    "nanoq4" and "onnxruntime" each: accuracy (None without labels) and images_per_s). Each runtime
    first runs two images untimed, so Numba's kernel loading and onnxruntime's first-run planning
    are not counted."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) == 0:
        raise NanoQ4Error(f"verify needs uint8 NHWC images (N, H, W, 3) with N > 0, got {images.dtype} {images.shape}")
    model, session = load_model(nq4_path), onnx_session(onnx_path)
    result = {"images": len(images)}
    logits = {}
    for runtime, run in (("nanoq4", lambda x: nanoq4_logits(model, x, batch_size)),
                         ("onnxruntime", lambda x: onnx_logits(session, x, batch_size))):
        run(images[:2])
        start = time.perf_counter()
        logits[runtime] = run(images)
        seconds = time.perf_counter() - start
        accuracy = None if labels is None else float((logits[runtime].argmax(axis=1) == np.asarray(labels)).mean())
        result[runtime] = {"accuracy": accuracy, "images_per_s": len(images) / seconds}
    ours, theirs = logits["nanoq4"], logits["onnxruntime"]
    result["max_abs_diff"] = float(np.abs(ours - theirs).max())
    result["agreement"] = float((ours.argmax(axis=1) == theirs.argmax(axis=1)).mean())
    return result


def format_verification(result, dataset):
    lines = [f"verified on {result['images']} test images of {dataset}:"]
    for runtime in ("nanoq4", "onnxruntime"):
        r = result[runtime]
        accuracy = "" if r["accuracy"] is None else f"accuracy {r['accuracy']:.2%}, "
        lines.append(f"  {runtime:<12} {accuracy}{r['images_per_s']:.0f} images/s")
    lines.append(f"  logits differ by at most {result['max_abs_diff']:.1e}; same prediction for "
                 f"{result['agreement']:.2%} of the images")
    return "\n".join(lines)


def main(argv=None):
    p = cli.ArgumentParser(prog="python -m nanoq4.export_onnx",
                           description="Export a .nq4 model file to ONNX (opset 21, packed int4 weights) for "
                                       "onnxruntime; optionally compare both runtimes on a test set. Needs the "
                                       'onnx extra: pip install "nanoq4[onnx]".')
    p.add_argument("model", help="the .nq4 model file")
    p.add_argument("output", help="the ONNX file to write (refused if it exists, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--verify", metavar="DATASET",
                   help=f"then run the test split of DATASET ({data.DATASET_CHOICES}) through "
                        "nanoq4 and onnxruntime: accuracy and images/s of each, and how far the logits differ")
    p.add_argument("--data-dir", help="data folder for --verify (default $NANOQ4_DATA, else ./data)")
    p.add_argument("--coarse", action="store_true", help="CIFAR-100 coarse labels for --verify")
    p.add_argument("--no-download", action="store_true", help="never download missing data for --verify")
    p.add_argument("--batch-size", type=cli.int_at_least(1), default=250,
                   help="images per forward pass in --verify, both runtimes (default %(default)s)")
    args = p.parse_args(argv)

    def body():
        _require("onnx")
        if args.verify:
            data.check_dataset_spec(args.verify, args.coarse)
            _require("onnxruntime")
        size = export_onnx(args.model, args.output, args.overwrite)
        nq4_size = os.path.getsize(args.model)
        print(f"wrote {args.output}: {size / MIB:.2f} MiB (the .nq4 file: {nq4_size / MIB:.2f} MiB), "
              f"ONNX opset {OPSET}")
        if args.verify:
            model = load_model(args.model)
            dataset = data.load_dataset(args.verify, args.data_dir, download=not args.no_download,
                                        coarse=args.coarse, image_size=model.input_size, train=False)
            check_class_names(args.model, model.class_names, args.verify, dataset.classes)
            result = verify(args.model, args.output, dataset.x_test, dataset.y_test, args.batch_size)
            print(format_verification(result, args.verify))
        return 0

    return cli.run_command(body, memory_hint="lower --batch-size")


if __name__ == "__main__":
    sys.exit(main())
