"""Weight export: .npz, or .safetensors written directly from its published format (8-byte
little-endian header length, a JSON header of dtype/shape/byte offsets, then the raw
little-endian data), so exported files load with the `safetensors` library, or anything that
reads the format, without gpuml. `--format torch` writes PyTorch names and layouts (and
`read_torch_safetensors` reads them back); ONNX is in gpuml.export_onnx."""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from gpuml.data.atomic import atomic_write
from gpuml.errors import DataError, GpumlError
from gpuml.nn import layers as L
from gpuml.nn.model import Sequential

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


@contextlib.contextmanager
def export_file(out: Path) -> Iterator[BinaryIO]:
    """atomic_write into `out`, its folder created; a path that cannot be written (a folder, a
    file where a folder should be, no permission) is one GpumlError naming it."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise GpumlError(f"{out}: cannot write the export ({out.parent} or a folder above it is a file)") from None
    except OSError as exc:
        raise GpumlError(f"{out}: cannot create its folder ({exc.strerror or exc})") from None
    try:
        with atomic_write(out) as f:
            yield f
    except OSError as exc:
        raise GpumlError(f"{out}: cannot write the export ({exc.strerror or exc})") from None


def export_weights(weights: dict[str, np.ndarray], out: Path, fmt: str) -> Path:
    with export_file(out) as f:
        if fmt == "npz":
            np.savez(f, **weights)
        elif fmt == "safetensors":
            layout = "dense W (in, out); conv W (out, in, kh, kw)"
            f.write(safetensors_bytes(weights, {"format": "gpuml", "layout": layout}))
        else:
            raise GpumlError(f"export: unknown format {fmt!r} (npz or safetensors)")
    return out


# ---------------------------------------------------------------------------------- torch
# `--format torch`: a safetensors file whose tensors load with strict=True into the
# torch.nn.Sequential that `layer_specs` describes (Dense -> Linear with weight (out, in);
# Conv2D -> Conv2d, weight (out, in, kh, kw) as in gpuml; a fused activation becomes its own
# module, so it takes an index, as do Flatten, pools and Dropout). Metadata (all JSON strings):
# gpuml_layers (the module list), gpuml_names (torch name -> gpuml name), input_shape.

_TORCH_ACT = {"relu": "ReLU", "tanh": "Tanh", "sigmoid": "Sigmoid"}


def layer_specs(model: Sequential) -> list[dict[str, Any]]:
    """The model as torch.nn modules in order: {"type": "Conv2d", ...constructor kwargs...,
    "gpuml": layer name}; activations and Flatten/Dropout get entries of their own."""
    out: list[dict[str, Any]] = []
    for layer in model.layers:
        kind = layer.kind
        if isinstance(layer, L.Dense):
            out.append({"type": "Linear", "in_features": layer.input_shape[0],
                        "out_features": layer.units, "bias": layer.use_bias, "gpuml": layer.name})
        elif isinstance(layer, L.Conv2D):
            out.append({"type": "Conv2d", "in_channels": layer.input_shape[0], "out_channels": layer.filters,
                        "kernel_size": list(layer.kernel), "stride": list(layer.stride),
                        "padding": list(layer.padding), "bias": layer.use_bias, "gpuml": layer.name})
        elif isinstance(layer, (L.MaxPool2D, L.AvgPool2D)):
            spec = {"type": "MaxPool2d" if isinstance(layer, L.MaxPool2D) else "AvgPool2d",
                    "kernel_size": list(layer.size), "stride": list(layer.stride),
                    "padding": list(layer.padding), "gpuml": layer.name}
            if isinstance(layer, L.AvgPool2D):
                spec["count_include_pad"] = True  # gpuml divides by the full window
            out.append(spec)
        elif isinstance(layer, L.Flatten):
            out.append({"type": "Flatten", "gpuml": layer.name})
        elif isinstance(layer, L.Dropout):
            out.append({"type": "Dropout", "p": layer.rate, "gpuml": layer.name})
        elif isinstance(layer, L.Activation):
            out.append({"type": _TORCH_ACT[layer.activation], "gpuml": layer.name})
        else:
            raise GpumlError(f"export: layer {layer.name} ({kind}) has no PyTorch equivalent here")
        act = getattr(layer, "activation", None)
        if isinstance(layer, (L.Dense, L.Conv2D)) and act:
            out.append({"type": _TORCH_ACT[act], "gpuml": layer.name})
    return out


def torch_state(model: Sequential, weights: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors under torch names `<index>.weight` / `<index>.bias`, torch name -> gpuml name)."""
    tensors, names = {}, {}
    for i, spec in enumerate(layer_specs(model)):
        if spec["type"] not in ("Linear", "Conv2d") or f"{spec['gpuml']}.W" not in weights:
            continue
        w = weights[f"{spec['gpuml']}.W"]
        tensors[f"{i}.weight"] = np.ascontiguousarray(w.T if spec["type"] == "Linear" else w)
        names[f"{i}.weight"] = f"{spec['gpuml']}.W"
        if spec["bias"]:
            tensors[f"{i}.bias"] = weights[f"{spec['gpuml']}.b"]
            names[f"{i}.bias"] = f"{spec['gpuml']}.b"
    return tensors, names


def export_torch(model: Sequential, weights: dict[str, np.ndarray], out: Path) -> Path:
    """Write the torch-layout safetensors file (see the section comment)."""
    tensors, names = torch_state(model, weights)
    meta = {"format": "pt", "gpuml_format": "torch", "gpuml_layers": json.dumps(layer_specs(model)),
            "gpuml_names": json.dumps(names), "input_shape": json.dumps(list(model.input_shape))}
    with export_file(out) as f:
        f.write(safetensors_bytes(tensors, meta))
    return out


_NP_DTYPES = {v: k for k, v in _DTYPES.items()}


def read_safetensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; DataError naming the file when it is not one."""
    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        (n,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8:8 + n])
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise TypeError("__metadata__ must map names to strings")
        base, tensors = 8 + n, {}
        for name, t in header.items():
            start, stop = t["data_offsets"]
            dtype = _NP_DTYPES[t["dtype"]].newbyteorder("<")
            a = np.frombuffer(blob[base + start: base + stop], dtype=dtype).reshape(t["shape"])
            tensors[name] = a.astype(a.dtype.newbyteorder("="))
    except (struct.error, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a safetensors file gpuml can read ({type(exc).__name__}: {exc})") from None
    return tensors, meta


def read_torch_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """The gpuml state dict (`layer.W` / `layer.b`, Dense W back to (in, out)) of a file
    written by `gpuml export --format torch`."""
    tensors, meta = read_safetensors(path)
    if "gpuml_names" not in meta:
        raise DataError(f"{path}: no gpuml_names in its metadata: not written by gpuml export --format torch "
                        "(a plain PyTorch state_dict does not say which gpuml layer each tensor belongs to)")
    try:
        names = json.loads(meta["gpuml_names"])
    except ValueError:
        names = None
    if not isinstance(names, dict) or not all(isinstance(v, str) for v in names.values()):
        raise DataError(f"{path}: its gpuml_names metadata is not a JSON object of tensor -> layer names")
    missing = sorted(set(names) - set(tensors))
    if missing:
        raise DataError(f"{path}: tensors {', '.join(missing)} named in its metadata are missing")
    # Only Dense weights are 2-D; conv weights share gpuml's (out, in, kh, kw) layout.
    return {g: np.ascontiguousarray(tensors[t].T if tensors[t].ndim == 2 else tensors[t]) for t, g in names.items()}


def torch_sequential(path: str | Path) -> Any:
    """A torch.nn.Sequential built from a `--format torch` file's metadata, weights loaded
    (strict). Needs torch; for users moving a gpuml model into PyTorch."""
    import torch

    tensors, meta = read_safetensors(path)
    if "gpuml_layers" not in meta:
        raise DataError(f"{path}: no gpuml_layers in its metadata: not written by gpuml export --format torch")
    modules = []
    for spec in json.loads(meta["gpuml_layers"]):
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in spec.items() if k not in ("type", "gpuml")}
        modules.append(getattr(torch.nn, spec["type"])(**kwargs))
    model = torch.nn.Sequential(*modules)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, strict=True)
    return model.eval()
