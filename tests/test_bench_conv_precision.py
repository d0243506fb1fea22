"""The conv rows per precision of `gpuml bench kernels` (gpuml/benchmark/precision_cases.py) and
the FP32 conv anchors' compute type, checked without a GPU: cuDNN's TF32 switch as each anchor
sees it when PyTorch dispatches its op (a TorchDispatchMode records it; PyTorch CPU runs the same
ATen ops), the agreement bounds against the operand rounding of every row's reduction length,
the fwd+bwd summary's arithmetic on a synthetic result, and ours through the public backend API
under the CUDA emulator (`--cuda-emulator`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from gpuml.backend.cpu.precision import round_operand
from gpuml.benchmark import hardware, precision_cases
from gpuml.benchmark.kernel_cases import (
    CONV_OPS,
    RESNET_CONV_LAYER,
    SEED_CONV_LAYERS,
    conv_cases,
    ours_conv_impl,
    with_cudnn_tf32,
)
from gpuml.benchmark.report import conv_fwd_bwd, kernels_markdown
from gpuml.benchmark.timing import TimingPlan
from tests.gpu_util import cuda_available

torch = pytest.importorskip("torch")
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

TINY = (2, 3, 6, 4, 3, 1, "tiny")  # N, C, H, K, R, pad, tag


class _Recorder(TorchDispatchMode):
    """Records (op, cuDNN TF32 switch, input dtypes) of every ATen op dispatched; raises on
    convolutions when told to (a failing anchor)."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.fail, self.seen = fail, []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if "convolution" in str(func):
            dtypes = {a.dtype for a in args if isinstance(a, torch.Tensor)}
            self.seen.append((str(func), torch.backends.cudnn.allow_tf32, dtypes))
            if self.fail:
                raise RuntimeError("cuDNN failed")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Any:
    from gpuml.benchmark.kernels import Env

    monkeypatch.setattr(hardware, "FLUSH_CAP_BYTES", 1 << 16)  # a tiny cache flush: nothing is timed here
    e = Env("cpu")
    if e.torch is None:
        pytest.skip("PyTorch not importable")
    before = torch.backends.cudnn.allow_tf32
    yield e
    torch.backends.cudnn.allow_tf32 = before


def _cases(precision: str) -> list:
    if precision == "fp32":
        return conv_cases(*TINY)
    return precision_cases.precision_conv_cases(precision, *TINY)


def test_with_cudnn_tf32_switches_for_the_call_and_restores_even_on_error(env: Any) -> None:
    seen = []

    def call() -> int:
        seen.append(torch.backends.cudnn.allow_tf32)
        raise RuntimeError("boom")

    for before, on in ((False, True), (True, False)):
        torch.backends.cudnn.allow_tf32 = before
        with pytest.raises(RuntimeError, match="boom"):
            with_cudnn_tf32(torch, on, call)()
        assert seen[-1] is on and torch.backends.cudnn.allow_tf32 is before


@pytest.mark.parametrize("precision,tf32,dtype", [("fp32", False, torch.float32), ("tf32", True, torch.float32),
                                                  ("bf16", False, torch.bfloat16)])
def test_conv_anchor_runs_with_its_precisions_compute_type(env: Any, precision: str, tf32: bool, dtype: Any) -> None:
    """Each anchor's ATen convolution sees cuDNN's TF32 switch on for the tf32 rows only (off for
    FP32 whatever it was before, so a stray setting cannot turn the FP32 rows into TF32 ones) and
    BF16 inputs for the bf16 rows; the switch is back as it was after the call, also after a
    failing call. The anchors are named as cuDNN with the compute type."""
    for case in _cases(precision):
        anchors = case.build(env)[1:]
        anchor = anchors[-1]
        assert anchor.lib == "torch" and anchor.name == {"fp32": "torch", **precision_cases.CUDNN_NAMES}[precision]
        for before in (not tf32, tf32):
            torch.backends.cudnn.allow_tf32 = before
            with _Recorder() as rec:
                anchor.run()
            assert rec.seen and all(on is tf32 and types == {dtype} for _, on, types in rec.seen), (case.op, rec.seen)
            assert torch.backends.cudnn.allow_tf32 is before
            with pytest.raises(RuntimeError, match="cuDNN failed"), _Recorder(fail=True):
                anchor.run()
            assert torch.backends.cudnn.allow_tf32 is before


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_precision_conv_rows_check_ours_against_the_anchor(env: Any, precision: str) -> None:
    """run_case end to end (PyTorch CPU standing in for cuDNN): three ops, named per precision,
    each anchor checked within the precision's bound; the run's own backend stays FP32 (ours gets
    a backend of its own), so FP32 rows built after these are still FP32."""
    from gpuml.benchmark.kernels import run_case

    plan = TimingPlan(warmup=0, min_repeats=1, max_repeats=1, budget_s=0.0)
    rows = [r for case in _cases(precision) for r in run_case(env, case, plan, 1e11, 1e10)]
    assert [r["op"] for r in rows] == [f"{op}_{precision}" for op in CONV_OPS]
    assert {r["family"] for r in rows} == {f"conv2d_{precision}"}
    assert all(r["anchor"] == precision_cases.CUDNN_NAMES[precision] and r["check"] == "ok" for r in rows), rows
    assert env.backend.precision == "fp32"


# ------------------------------------------------------------------------------------- bounds
def _reduction_lengths(layers: list[tuple]) -> set[int]:
    """K of each op's implicit GEMM: fwd C*R*S, bwd_data K*R*S, bwd_weight N*P*Q."""
    out = set()
    for n, c, h, k, r, pad, _ in layers:
        p = h + 2 * pad - r + 1
        out |= {c * r * r, k * r * r, n * p * p}
    return out


def _rne_tf32(x: np.ndarray) -> np.ndarray:
    u = x.astype(np.float32).view(np.uint32)
    return ((u + np.uint32(0xFFF) + ((u >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000)).view(np.float32)


def _trunc_tf32(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.float32).view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


CONV_KS = _reduction_lengths([*SEED_CONV_LAYERS, RESNET_CONV_LAYER])
#: K of the GEMM rows: squares, and the Dense products' fan-in, fan-out and batch
GEMM_KS = {256, 512, 1024, 2048, 4096, 8192, 784, 1600, 64, 10, 32}


@pytest.mark.parametrize("K", sorted(CONV_KS | GEMM_KS))
def test_bounds_cover_the_operand_rounding_and_catch_tf32_in_fp32_rows(K: int) -> None:
    """The measure max |ours - anchor| / max |anchor| for products of the rows' distributions
    (normal x 0.1 normal, plus a normal bias) at each row's reduction length (conv and GEMM; the
    GEMM rows' bounds are the same per precision), every plausible pair
    of roundings: ours exact FP32 (conv not yet on tensor cores) or rounded as our kernels round
    (tf32 ties away, bf16 nearest even); cuDNN's TF32 rounded to nearest even or truncated, its
    BF16 with the output (and bias) rounded to BF16 too. The precision bounds hold with a margin of
    3 or more, and TF32 in an FP32 row moves the result past the FP32 rows' 1e-4: a leak fails
    their check."""
    gen = np.random.default_rng(K)
    m = 24 if K < 10_000 else 12  # fewer outputs for the long weight-gradient sums (fast)
    a = gen.standard_normal((m, K)).astype(np.float32)
    b = (0.1 * gen.standard_normal((K, m))).astype(np.float32)
    bias = gen.standard_normal(m).astype(np.float32)

    def product(rnd: Any) -> np.ndarray:
        return rnd(a).astype(np.float64) @ rnd(b).astype(np.float64) + bias

    exact = product(lambda x: x)
    ours = {p: [exact, product(lambda x, p=p: round_operand(x, p))] for p in ("tf32", "bf16")}
    anchors = {"tf32": [product(_rne_tf32), product(_trunc_tf32)],
               "bf16": [round_operand((round_operand(a, "bf16").astype(np.float64)
                                       @ round_operand(b, "bf16").astype(np.float64)
                                       + round_operand(bias, "bf16")).astype(np.float32), "bf16")]}
    for p, tol in precision_cases.TOLERANCE.items():
        worst = max(_rel(o, anc) for o in ours[p] for anc in anchors[p])
        assert worst <= tol / 3, (p, K, worst)
    assert min(_rel(anc, exact) for anc in anchors["tf32"]) > 1e-4  # the FP32 rows' bound (Case default)


# ------------------------------------------------------------------------------------- fwd+bwd
def _row(family: str, op: str, shape: str, anchor: str, ours_s: float, anchor_s: float) -> dict:
    return {"family": family, "op": op, "shape": shape, "flops": 1, "bytes": 1, "metric": "flops",
            "ours_median_s": ours_s, "ours_rate": 1.0, "ours_fraction_of_floor": 0.5, "anchor": anchor,
            "anchor_median_s": anchor_s, "anchor_rate": 1.0, "ratio": anchor_s / ours_s, "check": "ok",
            "rel_err": 1e-6}


def test_fwd_bwd_summary_sums_the_three_measured_ops_per_precision() -> None:
    resnet, seed = "ResNet-like: N=64 ...", "seed CNN conv2: N=32 ..."
    rows = [_row("matmul", "gemm_square", "4096", "cuBLAS", 1.0, 1.0)]
    for fam, sfx, anchor, scale in (("conv2d", "", "torch", 1.0), ("conv2d_tf32", "_tf32", "cuDNN TF32 (torch)", 0.5)):
        rows += [_row(fam, f"conv2d_fwd{sfx}", resnet, anchor, 1e-3 * scale, 2e-3 * scale),
                 _row(fam, f"conv2d_bwd_data{sfx}", resnet, anchor, 3e-3 * scale, 1e-3 * scale),
                 _row(fam, f"conv2d_bwd_weight{sfx}", resnet, anchor, 4e-3 * scale, 2e-3 * scale)]
    # a layer with one op failed, and one with an op lacking this anchor: no entry for either
    rows += [_row("conv2d_bf16", f"{op}_bf16", resnet, "cuDNN BF16 (torch)", 1e-3, 1e-3) for op in CONV_OPS[:2]]
    rows.append({"family": "conv2d_bf16", "op": "conv2d_bwd_weight_bf16", "shape": resnet, "error": "X: y"})
    rows += [_row("conv2d", op, seed, "torch", 1e-4, 1e-4) for op in CONV_OPS[:2]]
    rows.append(_row("conv2d", "conv2d_bwd_weight", seed, "numpy", 1e-4, 1e-4))
    got = {(e["precision"], e["shape"], e["anchor"]): e for e in conv_fwd_bwd(rows)}
    assert set(got) == {("fp32", resnet, "torch"), ("tf32", resnet, "cuDNN TF32 (torch)")}
    for p, scale in (("fp32", 1.0), ("tf32", 0.5)):
        e = got[p, resnet, "torch" if p == "fp32" else "cuDNN TF32 (torch)"]
        assert e["ours_s"] == pytest.approx(8e-3 * scale) and e["anchor_s"] == pytest.approx(5e-3 * scale)
        assert e["time_ratio"] == pytest.approx(1.6) and e["speed"] == pytest.approx(0.625)
    meta = {"hardware": {"name": "GPU", "kind": "gpu", "compute_capability": "90", "sms": 132}, "device": "cuda",
            "quick": True, "date": "d", "commit": "c", "versions": {}, "command": "gpuml bench kernels",
            "peak_flops_per_s": 1e12, "peak_how": "probe", "copy_bytes_per_s": 1e9}
    md = kernels_markdown({"meta": meta, "rows": rows})
    assert "#### conv2d fwd+bwd per layer" in md
    assert f"| {resnet} | tf32 | 4.00 ms | cuDNN TF32 (torch) | 2.50 ms | 1.60 | 0.62x |" in md


# ------------------------------------------------------------------------------------- emulator
@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(), reason="needs CuPy and a CUDA GPU (or --cuda-emulator)")
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_precision_conv_rows_run_ours_through_the_public_backend(precision: str) -> None:
    """On CUDA (or the emulator) ours is the backend's conv2d_* with the precision set, whether it
    runs on tensor cores or still in FP32: its output is within the row's bound of the float64
    convolution of the same inputs (no anchor here: the emulator has no PyTorch CUDA). The run's
    backend stays FP32."""
    from types import SimpleNamespace

    from gpuml.backend import get_backend
    from gpuml.backend.cpu import CpuBackend

    be = get_backend("cuda")
    gen, drawn = np.random.default_rng(0), []

    def rand(shape: tuple[int, ...]) -> Any:
        drawn.append(be.asarray(gen.standard_normal(shape, dtype=np.float32)))
        return drawn[-1]

    env = SimpleNamespace(device="cuda", backend=be, xp=be.xp, torch=None, rand=rand)
    ref = CpuBackend(dtype="float64")
    for case in precision_cases.precision_conv_cases(precision, *TINY):
        drawn.clear()
        (ours,) = case.build(env)
        ours.run()
        got = be.to_numpy(ours.result())
        x, w, b, dy = (be.to_numpy(v).astype(np.float64) for v in (drawn[0], drawn[1] * 0.1, drawn[2], drawn[3]))
        want = ours_conv_impl(ref, case.op.removesuffix(f"_{precision}"), x, w, b, dy, TINY[5])
        want.run()
        assert _rel(got, want.result()) <= case.tolerance, case.op
    assert be.precision == "fp32"
