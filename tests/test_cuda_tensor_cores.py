"""The tensor-core GEMM (kernels/gemm_tc_<precision>.cu: TF32 / BF16 mma.sync, FP32 sums) against
CpuBackend(float64) with the same precision, i.e. the same operand rounding (cvt.rna to tf32,
round-to-nearest-even to bf16, gpuml/backend/cpu/precision.py) and exact sums. The operands then
agree bit for bit, so the bound is the FP32 summation bound of gemm_tol(K); a kernel that skipped
or changed the rounding (the mma reads only the top bits: truncation) is off by ~2^-11 (tf32) or
~2^-8 (bf16) relative and fails it. Shapes are not tile multiples, outputs start as NaN; shapes
with leading dimensions % 4 == 0 take the 16-byte cp.async and ldmatrix paths, the others the
4-byte copies. Under --cuda-emulator the warp-level instructions are mma_emu.h's model.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.gpu_util import GPU, gemm_tol, nan_filled, rand_f32, rel_err

pytestmark = GPU

#: relative size of one operand rounding: half an ulp of the format's 10 / 7 mantissa bits
ROUNDING = {"tf32": 2.0**-11, "bf16": 2.0**-8}
#: the small tile (gemm_tiles.h; 3 stages) for all but the last two: (40, 70, 600) splits K in 4
#: (the last block of each tile adds the slices), and an 11 x 12 grid of 128 x 128 tiles takes
#: the large tile (2 stages)
SHAPES = [(130, 70, 50), (64, 136, 40), (1, 9, 3), (129, 33, 0), (40, 70, 600),
          pytest.param(1290, 1500, 20, marks=pytest.mark.slow)]  # 3-4 s each on the emulator
TRANS = [(False, False), (False, True), (True, False), (True, True)]


def _backends(precision: str):
    from gpuml.backend.cpu import CpuBackend
    from gpuml.backend.cuda import CudaBackend

    cuda, cpu = CudaBackend(), CpuBackend(dtype="float64")
    cuda.set_precision(precision)
    cpu.set_precision(precision)
    return cuda, cpu



def _matmul_case(precision: str, M: int, N: int, K: int, trans_a: bool, trans_b: bool) -> None:
    cuda, cpu = _backends(precision)
    gen = np.random.default_rng(M * 131 + N * 7 + K)
    a = rand_f32(gen, *((K, M) if trans_a else (M, K)))
    b = rand_f32(gen, *((N, K) if trans_b else (K, N)))
    bias = rand_f32(gen, N)
    kw = dict(trans_a=trans_a, trans_b=trans_b)
    out = nan_filled(cuda, (M, N))
    got = cuda.matmul(cuda.asarray(a), cuda.asarray(b), bias=cuda.asarray(bias), activation="relu", out=out, **kw)
    assert got is out
    want = cpu.matmul(a.astype(np.float64), b.astype(np.float64), bias=bias.astype(np.float64), activation="relu", **kw)
    assert rel_err(cuda.to_numpy(got), want) <= gemm_tol(K)
    if K >= 20:  # the rounding is really there: the unrounded FP32 product is further off
        exact = np.maximum((a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b) + bias, 0)
        err = rel_err(cuda.to_numpy(got), exact)
        assert gemm_tol(K) < err <= 4 * ROUNDING[precision]


@pytest.mark.parametrize("trans_a,trans_b", TRANS, ids=["nn", "nt", "tn", "tt"])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_matmul_tf32_matches_rounded_reference(M: int, N: int, K: int, trans_a: bool, trans_b: bool) -> None:
    _matmul_case("tf32", M, N, K, trans_a, trans_b)


@pytest.mark.parametrize("trans_a,trans_b", TRANS, ids=["nn", "nt", "tn", "tt"])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_matmul_bf16_matches_rounded_reference(M: int, N: int, K: int, trans_a: bool, trans_b: bool) -> None:
    _matmul_case("bf16", M, N, K, trans_a, trans_b)


@pytest.mark.parametrize("M,N,K", [(70, 130, 36), (20, 130, 300)], ids=["one-slice", "split-k"])
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_matmul_tf32_bf16_fused_epilogues(precision: str, M: int, N: int, K: int) -> None:
    """accumulate, relu_mask (ReLU backward into dx) and col_sums (bias gradient next to dW), the
    sums in FP32 from the unrounded operand as gemm.cu computes them; with split-K too."""
    from gpuml.backend.cuda import launch

    assert (launch.gemm_tc_plan(M, N, K, True, False, precision).splits > 1) == (K == 300)
    cuda, cpu = _backends(precision)
    gen = np.random.default_rng(3)
    x, dy, c0, mask = rand_f32(gen, K, M), rand_f32(gen, K, N), rand_f32(gen, M, N), rand_f32(gen, M, N)
    out = cuda.asarray(c0)
    cuda.matmul(cuda.asarray(x), cuda.asarray(dy), trans_a=True, accumulate=True, out=out)
    want = cpu.matmul(x.astype(np.float64), dy.astype(np.float64), trans_a=True, accumulate=True,
                      out=c0.astype(np.float64))
    assert rel_err(cuda.to_numpy(out), want) <= gemm_tol(K)
    sums = nan_filled(cuda, (N,))
    out = nan_filled(cuda, (M, N))
    cuda.matmul(cuda.asarray(x), cuda.asarray(dy), trans_a=True, relu_mask=cuda.asarray(mask), col_sums=sums, out=out)
    sums_c = np.empty(N)
    want = cpu.matmul(x.astype(np.float64), dy.astype(np.float64), trans_a=True, relu_mask=mask.astype(np.float64),
                      col_sums=sums_c)
    assert rel_err(cuda.to_numpy(out), want) <= gemm_tol(K)
    assert rel_err(cuda.to_numpy(sums), dy.astype(np.float64).sum(axis=0)) <= gemm_tol(M)


def test_precision_bf16_before_sm80_is_an_error_naming_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from gpuml.backend.cuda import CudaBackend
    from gpuml.errors import DeviceError

    cuda = CudaBackend()

    class Volta:
        compute_capability = "70"

    monkeypatch.setattr(cuda.xp.cuda, "Device", lambda *_: Volta())
    message = r"precision: bf16 needs .*\(sm_80\).*cuda:\d+ is .+, compute capability 7\.0$"
    with pytest.raises(DeviceError, match=message):
        cuda.set_precision("bf16")
    assert cuda.precision == "fp32"


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_mlp_training_steps_tf32_bf16_match_rounded_reference(precision: str) -> None:
    """The e2e MLP steps of test_cuda_e2e_mlp (forward, dx, dW through gemm_tc; the rest FP32)
    against the CPU reference rounding the same operands."""
    from tests.test_cuda_e2e_mlp import train_both

    got_losses, got_params, want_losses, want_params = train_both(*_backends(precision))
    # FP32 differences upstream can flip an operand's rounding (one TF32/BF16 step on that element)
    # and that compounds over 5 steps: a quarter of one rounding (seen: 5.5e-5 tf32, 1.5e-7 bf16)
    bound = ROUNDING[precision] / 4
    assert rel_err(got_losses, want_losses) <= bound
    assert got_losses[-1] < got_losses[0]
    for g, w in zip(got_params, want_params, strict=True):
        assert rel_err(g, w) <= bound


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_trainer_tf32_bf16_graph_replay_gives_the_eager_bits(precision: str, tmp_path) -> None:
    """precision in the config reaches the CUDA backend, and the tensor-core launches capture and
    replay in the step graph like the FP32 ones (same bits as eager)."""
    from gpuml.train.trainer import Trainer
    from tests.test_cuda_graph import _config, _dataset, _same

    runs = {}
    for graph in ("on", "off"):
        cfg = _config(graph)
        cfg["precision"] = precision
        logs: list[str] = []
        t = Trainer(cfg, tmp_path / graph, log=logs.append, dataset=_dataset())
        t.fit(progress=False)
        assert t.backend.precision == precision and f"precision: {precision}" in logs[0]
        # the kernels the backend fetched for its launches (DevicePlumbing._launch's memo)
        assert any(family.startswith("gemm_tc_") for family, _ in t.backend._kernel_memo), "no tensor-core kernel ran"
        runs[graph] = t
    _same(runs["on"], runs["off"])



@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_trainer_cnn_tf32_bf16_runs_the_conv_tensor_cores_and_replays(precision: str, tmp_path) -> None:
    """A conv layer in a tf32 / bf16 run takes kernels/conv2d_<precision>.cu (precision covers
    convolutions too), and its launches capture and replay in the step graph with the eager bits."""
    from gpuml.train.trainer import Trainer
    from tests.test_cuda_graph import _config, _dataset, _same

    runs = {}
    for graph in ("on", "off"):
        cfg = _config(graph)
        cfg["precision"] = precision
        cfg["model"]["layers"] = [{"type": "conv2d", "filters": 4, "kernel": 3, "padding": 1, "activation": "relu"},
                                  {"type": "maxpool2d", "size": 2}, {"type": "flatten"}, {"type": "dense", "units": 3}]
        t = Trainer(cfg, tmp_path / graph, log=lambda _: None, dataset=_dataset())
        t.fit(progress=False)
        families = {family for family, _ in t.backend._kernel_memo}
        assert f"conv2d_{precision}" in families and "conv2d" not in families, families
        runs[graph] = t
    _same(runs["on"], runs["off"])
