"""Files: training checkpoints, and the packed-int4 model file that inference runs from.

Model file (.nq4), little-endian:

    8 bytes   magic b"NANOQ4\\x00M"
    u32       format version (2; version 1 files, without the header CRC, are still read)
    u32       header length H
    u32       CRC-32 of the H header bytes (a flipped digit in a scale must not go unnoticed)
    H bytes   JSON header: architecture (model, num_classes, bits, per_channel, quantized),
              class names, input normalization, and for each tensor its dtype, shape and the
              byte offset/length of its data in the payload; plus the payload's CRC-32
    payload   quantized weights as packed codes (two 4-bit codes per byte, see quant.py) with
              one float32 scale per tensor (or per output channel); biases, BatchNorm weights
              and running statistics as float32. No latent float weights are stored.

Loading rebuilds the architecture and sets each quantized layer's weight to codes * scale;
re-quantizing that weight gives back the same codes, so the loaded model computes exactly the
integer-weight network that was exported. Every file is written to a temporary name in the
same folder, then renamed, so a crash never leaves a half-written file behind.

Training checkpoint (.ckpt), little-endian: 8 bytes magic b"NANOQ4\\x00C", u32 version (2),
u64 payload length, u32 CRC-32 of the payload, then the payload: a pickled dict of the training
state. Version 1 checkpoints (a bare pickle, no checksum) are still read.
"""
import json
import os
import pickle
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np

from . import data, ops, quant
from .nn import QuantizedWeight
from .errors import NanoQ4Error
from .models import build_model, quantized_layers
from .tensor import Tensor, no_grad

MAGIC = b"NANOQ4\x00M"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
CHECKPOINT_MAGIC = b"NANOQ4\x00C"
CHECKPOINT_FORMAT = "nanoq4-checkpoint"
CHECKPOINT_VERSION = 2
READABLE_CHECKPOINT_VERSIONS = (1, 2)


def atomic_write_bytes(path, chunks):
    """Write an iterable of bytes-like chunks to `path` via a temporary file and a rename.
    A folder that cannot be written (missing permission, full disk) is a one-line NanoQ4Error."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise NanoQ4Error(f"cannot write {path}: {e.strerror or e}; choose a writable folder") from None
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise NanoQ4Error(f"cannot write {path}: {e.strerror or e}; choose a writable folder "
                              f"with free space") from None
        raise


# ----------------------------------------------------------------------------- int4 model file

def export_model(model, path, arch, class_names, mean, std, input_size=32):
    """Write `model` (built by models.build_model(**arch)) as a packed model file; return its size.

    arch: dict(model=name, num_classes=int, quantize=bool, bits=int, per_channel=bool)."""
    q_names = {name + ".weight" for name, _ in quantized_layers(model)}
    tensors, blobs, offset = {}, [], 0

    def add(name, array, dtype, extra=None):
        nonlocal offset
        data = np.ascontiguousarray(array).tobytes()
        tensors[name] = {"dtype": dtype, "shape": list(np.shape(array)), "offset": offset, "nbytes": len(data),
                         **(extra or {})}
        blobs.append(data)
        offset += len(data)

    for name, array in model.state_dict().items():
        if name in q_names:
            bits = arch["bits"]
            codes, scale = quant.quantize(array, bits, arch.get("per_channel", False))
            add(name, quant.pack_codes(codes, bits), f"int{bits}", {"shape": list(array.shape)})
            add(name + ".scale", scale.astype("<f4"), "float32")
        else:
            add(name, array.astype("<f4"), "float32")
    payload = b"".join(blobs)
    header = {
        "architecture": arch,
        "class_names": list(class_names),
        "normalization": {"mean": [float(v) for v in mean], "std": [float(v) for v in std]},
        "input_size": input_size,
        "layout": "NHWC",
        "tensors": tensors,
        "payload_crc32": zlib.crc32(payload),
    }
    header_bytes = json.dumps(header).encode()
    prefix = MAGIC + struct.pack("<III", FORMAT_VERSION, len(header_bytes), zlib.crc32(header_bytes))
    atomic_write_bytes(path, [prefix, header_bytes, payload])
    return os.path.getsize(path)


class InferenceModel:
    """A model loaded from a .nq4 file, ready for evaluation: class names, normalization and
    batched logits/probabilities for uint8 NHWC images."""

    def __init__(self, model, header):
        self.model = model.eval()
        self.header = header
        self.arch = header["architecture"]
        self.class_names = header["class_names"]
        # the float64 values the trainer normalized with: data.normalize_images gives the same floats
        self.mean = tuple(header["normalization"]["mean"])
        self.std = tuple(header["normalization"]["std"])
        self.input_size = header["input_size"]

    def normalize(self, images_uint8):
        """uint8 NHWC images -> the float32 input the model was trained on (data.normalize_images)."""
        return data.normalize_images(images_uint8, self.mean, self.std)

    def logits(self, x, batch_size=1000):
        """x: float32 NHWC already normalized -> (N, classes) float32 logits."""
        with no_grad():
            return np.concatenate([self.model(Tensor(x[i:i + batch_size])).data
                                   for i in range(0, len(x), batch_size)])

    def predict_proba(self, images_uint8, batch_size=1000):
        """uint8 NHWC images -> softmax probabilities: exp of ops.log_softmax of the logits."""
        logits = self.logits(self.normalize(images_uint8), batch_size)
        return np.exp(ops.log_softmax(Tensor(logits)).data)


def _read_model_file(path):
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise NanoQ4Error(f"cannot read model file {path}: {e.strerror}") from None
    if len(raw) < 16 or raw[:8] != MAGIC:
        raise NanoQ4Error(f"{path} is not a nanoq4 model file (bad magic bytes); export one with "
                          f"python -m nanoq4.train or nanoq4.export.export_model")
    version, header_len = struct.unpack("<II", raw[8:16])
    if version not in READABLE_VERSIONS:
        raise NanoQ4Error(f"{path} has model format version {version}; this nanoq4 reads versions "
                          f"{', '.join(map(str, READABLE_VERSIONS))} (upgrade nanoq4 or re-export the model)")
    start = 16 if version == 1 else 20
    header_bytes = raw[start:start + header_len]
    if version >= 2 and (len(raw) < 20 or zlib.crc32(header_bytes) != struct.unpack("<I", raw[16:20])[0]):
        raise NanoQ4Error(f"{path} is corrupt or truncated (header checksum mismatch); re-export the model")
    try:
        header = json.loads(header_bytes.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise NanoQ4Error(f"{path} is corrupt or truncated (unreadable header); re-export the model") from None
    payload = raw[start + header_len:]
    if zlib.crc32(payload) != header.get("payload_crc32"):
        raise NanoQ4Error(f"{path} is corrupt or truncated (payload checksum mismatch); re-export the model")
    return header, payload


def load_model(path):
    """Load a .nq4 file for inference (no training state needed) -> InferenceModel."""
    header, payload = _read_model_file(path)
    try:
        arch = header["architecture"]
        model = build_model(arch["model"], arch["num_classes"], arch["quantize"], arch["bits"],
                            arch.get("per_channel", False))
        state, stored = {}, {}
        tensors = header["tensors"]
        for name, info in tensors.items():
            if name.endswith(".scale") and name[:-len(".scale")] in tensors:
                continue
            blob = payload[info["offset"]:info["offset"] + info["nbytes"]]
            if info["dtype"] == "float32":
                state[name] = np.frombuffer(blob, dtype="<f4").reshape(info["shape"])
            else:
                bits = int(info["dtype"][3:])
                n = int(np.prod(info["shape"]))
                codes = quant.unpack_codes(np.frombuffer(blob, dtype=np.uint8), n, bits).reshape(info["shape"])
                s_info = tensors[name + ".scale"]
                s_blob = payload[s_info["offset"]:s_info["offset"] + s_info["nbytes"]]
                scale = np.frombuffer(s_blob, dtype="<f4").reshape(s_info["shape"])
                state[name] = quant.dequantize(codes, scale)
                stored[name] = (codes, scale)
        model.load_state_dict(state)
        layers = dict(model.named_modules())
        for name, (codes, scale) in stored.items():  # compute with the file's own scales, bit for bit
            layer = layers.get(name.rsplit(".", 1)[0])
            if isinstance(layer, QuantizedWeight):
                layer.use_stored(codes, scale)
        return InferenceModel(model, header)
    except NanoQ4Error as e:
        raise NanoQ4Error(f"{path}: {e}") from None
    except (KeyError, ValueError, TypeError) as e:
        raise NanoQ4Error(f"{path} does not describe a loadable model ({type(e).__name__}: {e}); "
                          f"re-export it") from None


def model_file_sizes(model, path):
    """(float32 bytes of all parameters and buffers, bytes of the packed model file)."""
    float_bytes = 4 * sum(a.size for a in model.state_dict().values())
    return float_bytes, os.path.getsize(path)


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, **state):
    """Pickle a training state (model/optimizer state dicts, RNG states, epoch, config, ...)
    atomically, behind a CRC-32 so that a damaged file is refused instead of resuming from
    silently wrong weights. Checkpoints are trusted files you wrote yourself: pickle is not safe
    for files from strangers (the .nq4 model file is the format to share)."""
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    payload = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
    prefix = CHECKPOINT_MAGIC + struct.pack("<IQI", CHECKPOINT_VERSION, len(payload), zlib.crc32(payload))
    atomic_write_bytes(path, [prefix, payload])


def load_checkpoint(path):
    """The state dict saved by save_checkpoint; a damaged, truncated or foreign file is a one-line
    NanoQ4Error naming it."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise NanoQ4Error(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    version = 1  # a bare pickle, written before checkpoints had a header
    if raw[:8] == CHECKPOINT_MAGIC:
        if len(raw) < 24:
            raise NanoQ4Error(f"checkpoint {path} is truncated (no complete header); it cannot be resumed")
        version, length, crc = struct.unpack("<IQI", raw[8:24])
        if version != CHECKPOINT_VERSION:
            raise NanoQ4Error(f"{path} has checkpoint version {version}, this nanoq4 reads "
                              f"{', '.join(map(str, READABLE_CHECKPOINT_VERSIONS))}")
        payload = raw[24:]
        if len(payload) != length or zlib.crc32(payload) != crc:
            what = "truncated" if len(payload) < length else "damaged"
            raise NanoQ4Error(f"checkpoint {path} is {what} (checksum mismatch); it cannot be resumed")
    else:
        payload = raw
    try:
        state = pickle.loads(payload)
    except Exception:
        raise NanoQ4Error(f"{path} is not a readable nanoq4 checkpoint (corrupt or another format)") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise NanoQ4Error(f"{path} is not a nanoq4 checkpoint")
    if state.get("version") != version:  # the pickle repeats the version its header (or its lack) implies
        raise NanoQ4Error(f"{path} has checkpoint version {state.get('version')!r} (expected {version} for its "
                          f"layout); this nanoq4 reads versions {', '.join(map(str, READABLE_CHECKPOINT_VERSIONS))}")
    return state
