"""`gpuml export --format onnx`: the model as an ONNX graph (opset 17, float32), built with the
`onnx` package's helper API (the optional extra `gpuml[onnx]`).

Input `input` is (N, *input_shape) float32, already normalised the way training normalised it
((pixel / 255 - mean) / std, with mean and std stored in the model's metadata_props); output
`logits` is (N, classes): raw scores, no softmax. Dense is Gemm with W (in, out) as stored by
gpuml; Conv2D is Conv; pools carry their pads (AveragePool with count_include_pad=1, as gpuml
divides by the whole window); Dropout is left out (the identity at inference).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from gpuml.errors import GpumlError
from gpuml.export import export_file
from gpuml.nn import layers as L
from gpuml.nn.model import Sequential

OPSET = 17
_ACT = {"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid"}


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise GpumlError("export --format onnx needs the onnx package: pip install 'gpuml[onnx]'") from None
    return onnx


def build_onnx(model: Sequential, weights: dict[str, np.ndarray], info: dict[str, Any] | None = None) -> Any:
    """An onnx.ModelProto computing the model's logits from normalised inputs."""
    onnx = _onnx()
    from onnx import TensorProto, helper, numpy_helper

    nodes: list[Any] = []
    inits: list[Any] = []
    x = "input"

    def emit(op: str, inputs: list[str], name: str, **attrs: Any) -> None:
        nonlocal x
        out = f"{name}_{op.lower()}"
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        x = out

    def param(key: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), key))
        return key

    for layer in model.layers:
        n = layer.name
        if isinstance(layer, (L.Dense, L.Conv2D)):
            ins = [x, param(f"{n}.W", weights[f"{n}.W"])]
            if layer.use_bias:
                ins.append(param(f"{n}.b", weights[f"{n}.b"]))
            if isinstance(layer, L.Dense):
                emit("Gemm", ins, n)
            else:
                (ph, pw) = layer.padding
                emit("Conv", ins, n, kernel_shape=list(layer.kernel), strides=list(layer.stride),
                     pads=[ph, pw, ph, pw])
            if layer.activation:
                emit(_ACT[layer.activation], [x], n)
        elif isinstance(layer, (L.MaxPool2D, L.AvgPool2D)):
            (ph, pw) = layer.padding
            attrs: dict[str, Any] = {"kernel_shape": list(layer.size), "strides": list(layer.stride),
                                     "pads": [ph, pw, ph, pw]}
            if isinstance(layer, L.AvgPool2D):
                attrs["count_include_pad"] = 1
            emit("MaxPool" if isinstance(layer, L.MaxPool2D) else "AveragePool", [x], n, **attrs)
        elif isinstance(layer, L.Flatten):
            emit("Flatten", [x], n, axis=1)
        elif isinstance(layer, L.Activation):
            emit(_ACT[layer.activation], [x], n)
        elif isinstance(layer, L.Dropout):
            continue
        else:
            raise GpumlError(f"export: layer {n} ({layer.kind}) has no ONNX mapping")
    nodes.append(helper.make_node("Identity", [x], ["logits"], name="logits"))
    graph = helper.make_graph(
        nodes, "gpuml",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *model.input_shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", *model.output_shape])],
        initializer=inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="gpuml")
    proto.ir_version = min(proto.ir_version, 8)  # readable by onnxruntime releases back to 1.13
    meta = {"input": "(pixel / 255 - mean) / std", "output": "logits"}
    for key in ("mean", "std", "classes"):
        if info and key in info:
            meta[key] = json.dumps(info[key])
    helper.set_model_props(proto, meta)
    onnx.checker.check_model(proto)
    return proto


def export_onnx(model: Sequential, weights: dict[str, np.ndarray], out: Path,
                info: dict[str, Any] | None = None) -> Path:
    proto = build_onnx(model, weights, info)
    with export_file(out) as f:
        f.write(proto.SerializeToString())
    return out
