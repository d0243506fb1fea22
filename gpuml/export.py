"""Weight export: .npz, or .safetensors written directly from its published format (8-byte
little-endian header length, a JSON header of dtype/shape/byte offsets, then the raw
little-endian data), so exported files load with the `safetensors` library, or anything that
reads the format, without gpuml."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from gpuml.data.atomic import atomic_write
from gpuml.errors import GpumlError

_DTYPES = {np.dtype("float32"): "F32", np.dtype("float64"): "F64", np.dtype("int32"): "I32",
           np.dtype("int64"): "I64", np.dtype("uint8"): "U8"}


def safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    header: dict[str, object] = {}
    chunks, offset = [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in _DTYPES:
            raise GpumlError(f"export: {name} has dtype {a.dtype}, which safetensors export does not handle")
        data = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _DTYPES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def export_weights(weights: dict[str, np.ndarray], out: Path, fmt: str) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as f:
        if fmt == "npz":
            np.savez(f, **weights)
        elif fmt == "safetensors":
            layout = "dense W (in, out); conv W (out, in, kh, kw)"
            f.write(safetensors_bytes(weights, {"format": "gpuml", "layout": layout}))
        else:
            raise GpumlError(f"export: unknown format {fmt!r} (npz or safetensors)")
    return out
