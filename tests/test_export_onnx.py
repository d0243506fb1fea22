"""`gpuml export --format onnx`: the graph run by onnxruntime (CPU) gives gpuml's logits.
Needs the `onnx` extra (onnx, onnxruntime); skipped without it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gpuml.cli import main
from gpuml.export_onnx import OPSET, export_onnx
from tests.test_export_torch import gpuml_model, run_logits, tiny_run

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits"]
    return session.run(["logits"], {"input": x})[0]


def test_onnx_matches_gpuml_logits_for_every_layer_type(tmp_path):
    model, weights, x, logits = gpuml_model()
    path = export_onnx(model, weights, tmp_path / "m.onnx", {"mean": 0.25, "std": 0.5, "classes": ["a", "b", "c"]})
    np.testing.assert_allclose(_run(path, x), logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_run(path, x[:1]), logits[:1], rtol=1e-5, atol=1e-5)  # the batch axis is free
    proto = onnx.load(str(path))
    assert proto.opset_import[0].version == OPSET
    ops = [n.op_type for n in proto.graph.node]
    assert "Dropout" not in ops and ops.count("Conv") == 2 and ops.count("Gemm") == 2
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["output"] == "logits" and json.loads(props["classes"]) == ["a", "b", "c"]
    assert json.loads(props["mean"]) == 0.25


def test_cli_export_onnx(tmp_path, capsys):
    run = tiny_run(tmp_path)
    capsys.readouterr()
    assert main(["export", str(run), "--format", "onnx"]) == 0
    assert capsys.readouterr().out.strip() == str(run / "model.onnx")
    logits, xn = run_logits(run, np.random.default_rng(2).random((7, 3, 8, 8)))
    np.testing.assert_allclose(_run(run / "model.onnx", xn), logits, rtol=1e-5, atol=1e-5)
