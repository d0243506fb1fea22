"""Read weights to initialise a model from (`model.init_from`, `Sequential.load_weights`): a run
folder, a weights .npz, a checkpoint .npz or a .safetensors export. The result is always the
host arrays keyed "layer.param" (conv2d_1.W), the names gpuml's own files use."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import numpy as np

from gpuml.errors import DataError

_SAFETENSORS_DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "I32": "<i4", "I64": "<i8", "U8": "u1"}


def read_weights(path: Path) -> dict[str, np.ndarray]:
    """The weights in `path`: a run folder (its weights.npz, else its newest checkpoint), a
    .npz of parameters or a checkpoint, or a .safetensors file."""
    path = Path(path)
    if path.is_dir():
        from gpuml.train import checkpoint as ckpt

        if (path / "weights.npz").is_file():
            path = path / "weights.npz"
        elif ckpt.list_checkpoints(path / "checkpoints"):
            return ckpt.load(ckpt.list_checkpoints(path / "checkpoints")[-1])[0]
        else:
            raise DataError(f"{path}: a folder without weights.npz or checkpoints/ (not a run folder?)")
    if not path.is_file():
        raise DataError(f"{path}: no such weights file (a run folder, .npz or .safetensors)")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            names = list(z.files)
            if "meta" in names:  # a checkpoint: its model/ arrays
                from gpuml.train import checkpoint as ckpt

                return ckpt.load(path)[0]
            return {k: z[k] for k in names}
    except (OSError, ValueError, zipfile.BadZipFile, AttributeError) as exc:
        raise DataError(f"{path}: not a readable .npz of weights ({type(exc).__name__}: {exc})") from None


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a .safetensors file (the published format: 8-byte little-endian header
    length, JSON header of dtype/shape/data_offsets, then the data), without the library."""
    try:
        data = path.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
    except (OSError, struct.error, ValueError) as exc:
        raise DataError(f"{path}: not a readable .safetensors file ({type(exc).__name__}: {exc})") from None
    out = {}
    base = 8 + n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise DataError(f"{path}: tensor {name} has dtype {entry.get('dtype')}, which gpuml does not read")
        start, stop = entry["data_offsets"]
        a = np.frombuffer(data[base + start : base + stop], dtype=dtype)
        if a.size != int(np.prod(entry["shape"], dtype=np.int64)):
            raise DataError(f"{path}: tensor {name} holds {a.size} values for shape {entry['shape']}")
        out[name] = a.reshape(entry["shape"]).astype(a.dtype.newbyteorder("="))
    return out
