"""`gpuml bench`: the CPU kernel sweep and its JSON, the timers, the work formulas, the plots, and
a tiny training benchmark next to PyTorch."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from gpuml.benchmark import formulas as fm
from gpuml.benchmark.timing import (
    TimingPlan,
    median,
    quantile,
    repeat_count,
    summarize,
    time_host,
    time_host_interleaved,
)
from gpuml.cli import main
from gpuml.errors import GpumlError


# ------------------------------------------------------------------------------------- kernels
@pytest.fixture(scope="module")
def quick_kernels(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "out.json"
    rc = main(["bench", "kernels", "--device", "cpu", "--quick", "--json", str(out)])
    assert rc == 0, "the quick sweep reported an error or a mismatch against an anchor"
    return json.loads(out.read_text())


def test_quick_kernels_json_has_rows_with_times_and_ratios(quick_kernels: dict) -> None:
    rows = quick_kernels["rows"]
    assert not [r for r in rows if "error" in r]
    for family in ("matmul", "conv2d", "maxpool2d", "softmax_xent"):
        mine = [r for r in rows if r["family"] == family]
        assert mine, f"no {family} rows"
        for r in mine:
            assert r["ours_median_s"] > 0 and math.isfinite(r["ours_median_s"])
            assert r["anchor"], f"{family} row without an anchor"
            assert r["anchor_median_s"] > 0
            assert isinstance(r["ratio"], float) and r["ratio"] > 0
            assert r["ratio"] == pytest.approx(r["anchor_median_s"] / r["ours_median_s"])
            assert r["check"] in ("ok", "n/a")
    meta = quick_kernels["meta"]
    assert meta["device"] == "cpu" and meta["quick"] is True
    assert meta["copy_bytes_per_s"] > 0 and meta["hardware"]["fp32_peak_flops"] > 0


def test_quick_kernels_rates_follow_from_the_work_formulas(quick_kernels: dict) -> None:
    gemm = next(r for r in quick_kernels["rows"] if r["op"] == "gemm_square" and r["shape"] == "256x256x256")
    assert gemm["flops"] == 2 * 256**3
    assert gemm["ours_rate"] == pytest.approx(gemm["flops"] / gemm["ours_median_s"])
    pool = next(r for r in quick_kernels["rows"] if r["op"] == "maxpool2d_fwd")
    assert pool["metric"] == "bytes"
    assert pool["ours_rate"] == pytest.approx(pool["bytes"] / pool["ours_median_s"])
    copy_rows = [r for r in quick_kernels["rows"] if str(r["anchor"]).startswith("copy")]
    assert {r["family"] for r in copy_rows} >= {"maxpool2d", "avgpool2d", "softmax_xent", "adam"}


def test_every_anchor_is_checked_against_ours(quick_kernels: dict) -> None:
    """Adam (its updates) and the softmax loss (loss and gradient) included: only copies, which
    are not implementations of the op, go unchecked."""
    rows = quick_kernels["rows"]
    for r in rows:
        if r["anchor"] and not r["anchor"].startswith("copy"):
            assert r["check"] == "ok" and r["rel_err"] is not None, r
    assert {r["family"] for r in rows if r["check"] == "ok"} >= {"matmul", "conv2d", "maxpool2d", "avgpool2d",
                                                                  "softmax_xent", "adam"}


def test_floors_rest_on_the_measured_peak(quick_kernels: dict) -> None:
    """The FP32 peak is the best GEMM rate of the run, so no GEMM row runs faster than its floor."""
    meta = quick_kernels["meta"]
    assert meta["peak_flops_per_s"] >= max(meta["best_gemm_flops_per_s"], meta["gemm_probe_flops_per_s"])
    for r in quick_kernels["rows"]:
        assert r["floor_s"] == pytest.approx(max(r["flops"] / meta["peak_flops_per_s"],
                                                 r["bytes"] / meta["copy_bytes_per_s"]))
        if r["family"] == "matmul":
            assert r["ours_fraction_of_floor"] <= 1.0 + 1e-9
    hw = meta["hardware"]
    assert hw["vector_extensions"] is not None and "vendor" in hw


@pytest.mark.parametrize("family", ["adam", "softmax_xent", "avgpool2d"])
def test_a_wrong_result_fails_its_row(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ours made wrong (Adam without its bias correction, a loss off by 1e-3, avgpool backward
    off by one part in 1e3): every anchor's check of the row says MISMATCH and problems() says it."""
    from gpuml.backend.cpu import CpuBackend
    from gpuml.benchmark import hardware
    from gpuml.benchmark import memory_cases as kc
    from gpuml.benchmark.kernels import Env, problems, run_case

    if family == "adam":
        real = CpuBackend.adam_step
        monkeypatch.setattr(CpuBackend, "adam_step", lambda self, *a, **k: real(self, *a, **{**k, "step": 1}))
        case = kc.adam_case([(3, 4), (5,)], "tiny")
    elif family == "softmax_xent":
        real_x = CpuBackend.softmax_xent

        def off_loss(self, *a, **k):
            loss, d = real_x(self, *a, **k)
            loss[()] += 1e-3
            return loss, d

        monkeypatch.setattr(CpuBackend, "softmax_xent", off_loss)
        case = kc.softmax_xent_case(4, 300)
    else:
        real_a = CpuBackend.avgpool2d_bwd
        monkeypatch.setattr(CpuBackend, "avgpool2d_bwd", lambda self, *a, **k: real_a(self, *a, **k).__imul__(1.001))
        case = next(c for c in kc.pool_cases(2, 3, 8, 2) if c.op == "avgpool2d_bwd")
    monkeypatch.setattr(hardware, "FLUSH_CAP_BYTES", 1 << 16)  # a tiny cache flush: the test times nothing
    env = Env("cpu")
    plan = TimingPlan(warmup=0, min_repeats=1, max_repeats=1, budget_s=0.0)
    rows = run_case(env, case, plan, 1e11, 1e10)
    checked = [r for r in rows if r["anchor"] and not r["anchor"].startswith("copy")]
    assert checked and all(r["check"] == "MISMATCH" for r in checked), rows
    assert len(problems(rows)) == len(checked)


def test_unknown_family_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "kernels", "--device", "cpu", "--families", "matmul,convv"]) == 2
    assert "unknown convv" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- timing
def test_median_and_quantiles() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5
    values = [5.0, 1.0, 9.0, 2.0, 7.0, 3.0]
    for q in (0.0, 0.25, 0.5, 0.75, 1.0):
        assert quantile(values, q) == pytest.approx(float(np.quantile(values, q)))
    s = summarize([0.3, 0.1, 0.2, 10.0])
    assert (s.median_s, s.min_s, s.repeats) == (0.25, 0.1, 4)
    with pytest.raises(ValueError):
        median([])


def test_repeat_count_respects_budget_and_bounds() -> None:
    assert repeat_count(0.01, 1.0, 5, 50) == 50
    assert repeat_count(0.1, 1.0, 5, 50) == 10
    assert repeat_count(2.0, 1.0, 5, 50) == 5


def test_time_host_warms_up_flushes_and_takes_the_median_of_timed_calls() -> None:
    durations = iter([0.5, 0.1, 0.3, 0.2, 0.4])  # the timed calls; warm-up calls are not timed
    now = [0.0]
    calls = {"fn": 0, "flush": 0}
    pending: list[float] = []

    def clock() -> float:
        return now[0]

    def fn() -> None:
        calls["fn"] += 1
        if calls["fn"] > 2:  # after the two warm-up calls
            pending.append(next(durations))
            now[0] += pending[-1]

    def flush() -> None:
        calls["flush"] += 1

    stats = time_host(fn, TimingPlan(warmup=2, min_repeats=5, max_repeats=5, budget_s=0.0), flush=flush, clock=clock)
    assert calls["fn"] == 7 and calls["flush"] == 5
    assert stats.repeats == 5
    assert stats.median_s == pytest.approx(0.3)
    assert stats.min_s == pytest.approx(0.1)


def test_interleaved_timing_alternates_and_keeps_each_implementation_apart() -> None:
    now = [0.0]
    order: list[str] = []

    def make(name: str, seconds: float):
        def fn() -> None:
            order.append(name)
            now[0] += seconds
        return fn

    plan = TimingPlan(warmup=1, min_repeats=3, max_repeats=100, budget_s=1.0)
    stats = time_host_interleaved({"a": make("a", 0.1), "b": make("b", 0.25)}, plan, clock=lambda: now[0])
    # warm-ups, then rounds of a, b; the slower b (0.25 s) fits 4 repeats in the 1 s budget
    assert order == ["a", "b"] + ["a", "b"] * 4
    assert stats["a"].median_s == pytest.approx(0.1) and stats["a"].repeats == 4
    assert stats["b"].median_s == pytest.approx(0.25) and stats["b"].repeats == 4


def test_interleaved_timing_settles_short_calls_untimed_before_each_block() -> None:
    now = [0.0]
    order: list[str] = []

    def make(name: str, seconds: float):
        def fn() -> None:
            order.append(name)
            now[0] += seconds
        return fn

    # 0.01 s calls, 7 repeats each: one first repeat, then 3 blocks of 2, each after an untimed call
    plan = TimingPlan(warmup=0, min_repeats=7, max_repeats=7, budget_s=0.0)
    stats = time_host_interleaved({"a": make("a", 0.01), "b": make("b", 0.01)}, plan, clock=lambda: now[0])
    assert order == ["a", "b"] + (["a"] * 3 + ["b"] * 3) * 3
    assert stats["a"].repeats == stats["b"].repeats == 7


def test_training_epochs_alternate_between_the_sides() -> None:
    from gpuml.benchmark.train import interleaved_epochs

    ran: list[str] = []

    class Side:
        def __init__(self, impl: str) -> None:
            self.impl = impl

        def epoch(self) -> None:
            ran.append(self.impl)

    sides = [Side("gpuml"), Side("torch eager")]
    assert interleaved_epochs(sides, 3) == ["gpuml", "torch eager", "torch eager", "gpuml", "gpuml", "torch eager"]
    assert ran == ["gpuml", "torch eager", "torch eager", "gpuml", "gpuml", "torch eager"]
    assert interleaved_epochs(sides, 1, reverse_first=True) == ["torch eager", "gpuml"]


# ------------------------------------------------------------------------------------- formulas
def test_gemm_formulas() -> None:
    assert fm.gemm_flops(2, 3, 4) == 48
    assert fm.gemm_bytes(2, 3, 4) == 4 * (8 + 12 + 6)
    assert fm.gemm_flops(8192, 8192, 8192) == 1_099_511_627_776


def test_conv_formulas_for_the_seed_cnn_and_a_padded_layer() -> None:
    # seed conv1: 256 x 1 x 28 x 28 -> 256 x 32 x 26 x 26, 3x3
    assert fm.conv_flops(256, 1, 28, 28, 32, 3, 3) == 99_680_256
    assert fm.conv_bytes("conv2d_fwd", 256, 1, 28, 28, 32, 3, 3) == 4 * (200_704 + 288 + 32 + 5_537_792)
    assert fm.conv_bytes("conv2d_bwd_weight", 256, 1, 28, 28, 32, 3, 3) == 4 * (200_704 + 288 + 5_537_792)
    # 3x3 pad 1 keeps 56x56: 2 * 64 * 64 * 3136 * 64 * 9
    assert fm.conv_flops(64, 64, 56, 56, 64, 3, 3, 1, 1) == 14_797_504_512
    with pytest.raises(ValueError):
        fm.conv_bytes("conv2d_bwd", 1, 1, 3, 3, 1, 3, 3)


def test_bandwidth_formulas() -> None:
    # 256 x 64 x 56 x 56 = 51,380,224 inputs; 2x2 pooling -> 12,845,056 outputs
    assert fm.pool_bytes("maxpool2d_fwd", 256, 64, 56, 56, 2, 2) == 4 * (51_380_224 + 2 * 12_845_056)
    assert fm.pool_bytes("maxpool2d_bwd", 256, 64, 56, 56, 2, 2) == 4 * (51_380_224 + 2 * 12_845_056)
    assert fm.pool_bytes("avgpool2d_fwd", 256, 64, 56, 56, 2, 2) == 4 * (51_380_224 + 12_845_056)
    assert fm.softmax_xent_bytes(256, 10) == 21_508
    mlp = [(784, 1024), (1024,), (1024, 1024), (1024,), (1024, 10), (10,)]
    assert fm.num_elements(mlp) == 1_863_690
    assert fm.adam_bytes(1_863_690) == 52_183_320


# ------------------------------------------------------------------------------------- plots
def test_plots_write_pngs(quick_kernels: dict, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from gpuml.benchmark.plots import plot_families, plot_overview

    overview = plot_overview(quick_kernels, tmp_path / "all.png")
    files = plot_families(quick_kernels, tmp_path / "fam", "kernels-cpu")
    assert {p.name for p in files} >= {"kernels-cpu-matmul.png", "kernels-cpu-conv2d.png", "kernels-cpu-adam.png"}
    for p in [overview, *files]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


# ------------------------------------------------------------------------------------- train
def test_bench_train_tiny_limit_rows_next_to_torch(tmp_path: Path, fashion_root: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUML_DATA", str(fashion_root.parent))
    out = tmp_path / "train.json"
    rc = main(["bench", "train", "--device", "cpu", "--models", "mlp", "--batch-sizes", "128",
               "--limit", "512", "--epochs", "1", "--warmup-steps", "2", "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    impls = [r["impl"] for r in rows]
    assert impls[0] == "gpuml"
    assert len(result["meta"]["epoch_order"]) == 1 and "gpuml" in result["meta"]["epoch_order"][0]
    for r in rows:
        assert r["samples_per_epoch"] == 512 and r["steps_per_epoch"] == 4
        assert r["samples_per_s"] > 0 and r["cpu_busy"] > 0
        assert r["us_per_step"] == pytest.approx(r["median_epoch_s"] / 4 * 1e6)
        assert 0.1 < r["test_accuracy"] <= 1.0
    if importlib.util.find_spec("torch") is not None:  # CI installs torch: the parity check runs there
        assert "torch eager" in impls, impls
        ours, torch_row = rows[0], rows[impls.index("torch eager")]
        # Same initial weights, data order, optimizer and loss: the runs agree up to rounding.
        assert ours["train_loss"] == pytest.approx(torch_row["train_loss"], rel=1e-3)
        assert abs(ours["test_accuracy"] - torch_row["test_accuracy"]) < 0.01
    if importlib.util.find_spec("torch") is not None:
        # PyTorch with gpuml's subnormal flush is the second anchor on CPU, in its own process: this
        # process's PyTorch still keeps subnormals (its default), so the plain row stays plain
        import torch

        ftz = rows[impls.index("torch eager FTZ")]
        assert ftz["train_loss"] == pytest.approx(rows[0]["train_loss"], rel=1e-3)
        assert abs(ftz["test_accuracy"] - rows[0]["test_accuracy"]) < 0.01
        for r in rows:
            assert r["speedup_vs_torch_eager_ftz"] == pytest.approx(ftz["median_epoch_s"] / r["median_epoch_s"])
        assert (torch.tensor([1e-39]) * 1.0).item() != 0.0


def test_torch_ftz_side_flushes_in_its_own_process(fashion_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The FTZ anchor's PyTorch flushes subnormals in all its threads (a child process that threw the
    switch before PyTorch started any); the plain anchor's child and the benchmark's own PyTorch
    keep them; a child that fails is one GpumlError line."""
    torch = pytest.importorskip("torch")
    from gpuml.benchmark.torch_child import TorchChildSide
    from gpuml.benchmark.train import bench_config

    monkeypatch.setenv("GPUML_DATA", str(fashion_root.parent))
    cfg = bench_config("mlp", "cpu", 128, 1, 256)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "12345")  # a user's own setting is kept
    plain = TorchChildSide(cfg, 256, 1, 2, flush=False)
    try:
        assert plain.impl == "torch eager" and not plain.flushes()
        assert plain.environ(["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"]) == {
            "MALLOC_MMAP_THRESHOLD_": "12345", "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}
    finally:
        plain.close()
    assert "MALLOC_TRIM_THRESHOLD_" not in __import__("os").environ  # the parent's is left as it was
    side = TorchChildSide(cfg, 256, 1, 2, flush=True)
    try:
        assert side.flushes()
        side.epoch()
        assert side.steps == 2 and side.samples == 256 and side.times[0] > 0
    finally:
        row = side.result()
    assert row["impl"] == "torch eager FTZ" and 0.0 < row["test_accuracy"] <= 1.0 and row["cpu_busy"] > 0
    assert not side._proc.is_alive()
    assert (torch.tensor([1e-39]) * 1.0).item() != 0.0  # this process: PyTorch's default, untouched
    bad = {**cfg, "data": {**cfg["data"], "dataset": "no_such_dataset"}}
    with pytest.raises(GpumlError, match="torch eager FTZ"):
        TorchChildSide(bad, 256, 1, 2, flush=True)


def test_torch_ftz_side_from_a_script_without_a_main_guard(tmp_path: Path, fashion_root: Path) -> None:
    """A user's script that calls the benchmark at top level (no `if __name__ == "__main__"`) must
    not be started over inside the FTZ child (multiprocessing's spawn re-imports __main__)."""
    pytest.importorskip("torch")
    import subprocess
    import sys

    script = tmp_path / "bench_script.py"
    script.write_text(
        "from gpuml.benchmark.torch_child import TorchChildSide\n"
        "from gpuml.benchmark.train import bench_config\n"
        "print('script body ran', flush=True)\n"
        "side = TorchChildSide(bench_config('mlp', 'cpu', 128, 1, 256), 256, 1, 1, flush=True)\n"
        "print('flushes', side.flushes(), flush=True)\n"
        "side.close()\n"
    )
    env = {**__import__("os").environ, "GPUML_DATA": str(fashion_root.parent)}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("script body ran") == 1 and "flushes True" in out.stdout
