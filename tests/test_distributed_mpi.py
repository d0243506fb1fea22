"""Data-parallel runs started by `mpiexec -n 2` on this machine (CPU, loopback): the same end as
one process, the failure modes (a rank killed, raising, hanging: every rank stops, no hang), and
resume. Skipped without the `mpi` extra (mpi4py and an mpiexec); CI installs it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.test_trainer import checkpoint_meta, tiny_config, weights

pytest.importorskip("mpi4py", reason="the mpi extra is not installed: pip install -e '.[mpi]'")
REPO = Path(__file__).resolve().parent.parent
MPIEXEC = shutil.which("mpiexec", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
if MPIEXEC is None:
    pytest.skip("no mpiexec (the mpi extra brings MPICH's)", allow_module_level=True)
# Open MPI refuses root unless told; MPICH ignores these.
ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "PYTHONPATH": str(REPO)}


def mpirun(ranks: int, *args: str, module: str = "gpuml.cli", timeout: float = 300,
           env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable, "-m", module, *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=dict(os.environ, **ENV, **(env or {})))
    return proc, time.monotonic() - t0


def one_process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpuml.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env=dict(os.environ, **ENV))


def config(tmp_path: Path, fashion_root: Path, dtype: str, **over) -> Path:
    # 500 training samples in global batches of 33: the last batch (5) splits 3 + 2, the others
    # 17 + 16, so uneven shards are checked; dropout and augmentation draw per sample.
    over = {"trainer__epochs": 2, **over}
    return tiny_config(tmp_path, fashion_root, dtype=dtype, data__limit=600, data__val_split=100,
                       data__augment={"shift": 1, "rotate": 10}, trainer__batch_size=33, **over)


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def compare_runs(one: Path, two: Path) -> float:
    """The largest relative difference of weights, test loss and per-epoch losses."""
    wa, wb = weights(one), weights(two)
    assert wa.keys() == wb.keys()
    worst = max(relative(wb[k], wa[k]) for k in wa)
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (one, two))
    worst = max(worst, abs(sb["test_loss"] - sa["test_loss"]) / abs(sa["test_loss"]))
    ma, mb = ([json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines()] for r in (one, two))
    for ra, rb in zip(ma, mb, strict=True):
        for key in ("train_loss", "val_loss"):
            worst = max(worst, abs(rb[key] - ra[key]) / abs(ra[key]))
    return worst


def test_two_ranks_end_where_one_process_ends_float64(tmp_path: Path, fashion_root: Path) -> None:
    cfg = config(tmp_path, fashion_root, "float64")
    assert one_process("train", cfg, "--out", tmp_path / "one", "--no-progress").returncode == 0
    proc, _ = mpirun(2, "train", cfg, "--out", tmp_path / "two", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"; 2 ranks.* \(rank 0 pid \d+ on .*, rank 1 pid", proc.stderr.splitlines()[0])
    assert proc.stderr.count("epoch 1/2") == 1  # rank 0 alone logs
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2
    # Only the order of the per-sample sums differs (two partial sums added by the all-reduce).
    assert compare_runs(tmp_path / "one", tmp_path / "two") < 1e-9


def test_two_ranks_end_near_one_process_float32(tmp_path: Path, fashion_root: Path) -> None:
    cfg = config(tmp_path, fashion_root, "float32")
    assert one_process("train", cfg, "--out", tmp_path / "one", "--no-progress").returncode == 0
    proc, _ = mpirun(2, "train", cfg, "--out", tmp_path / "two", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    # float32 rounding of differently ordered sums, carried through 32 Adam steps (measured
    # 2.8e-7 on this config with MPICH; float64 gave 4.7e-16).
    assert compare_runs(tmp_path / "one", tmp_path / "two") < 1e-5


def first_line_pids(stderr: str) -> dict[int, int]:
    return {int(r): int(p) for r, p in re.findall(r"rank (\d+) pid (\d+)", stderr.splitlines()[0])}


def test_kill_9_of_one_rank_ends_the_job(tmp_path: Path, fashion_root: Path) -> None:
    cfg = config(tmp_path, fashion_root, "float64", trainer__epochs=50)
    proc, seconds = mpirun(2, "1", "5", f"signal:{signal.SIGKILL}", "train", cfg, "--out", tmp_path / "run",
                           "--no-progress", module="tests.rank_fault", timeout=120)
    assert proc.returncode != 0
    assert seconds < 60
    pid = first_line_pids(proc.stderr)[1]  # the log's first line says which pid is rank 1
    if "MPICH" in proc.stderr:  # hydra names the dead process by pid
        assert f"PID {pid}" in proc.stdout + proc.stderr


def test_an_error_on_one_rank_stops_every_rank_naming_it(tmp_path: Path, fashion_root: Path) -> None:
    cfg = config(tmp_path, fashion_root, "float64", trainer__epochs=50)
    proc, seconds = mpirun(2, "1", "5", "raise", "train", cfg, "--out", tmp_path / "run", "--no-progress",
                           module="tests.rank_fault", timeout=120)
    assert proc.returncode == 8  # RunError's code, through MPI_Abort
    assert "gpuml: error: rank 1 of 2: injected failure on this rank" in proc.stderr
    assert seconds < 60


def test_a_hung_rank_is_ended_by_the_watchdog(tmp_path: Path, fashion_root: Path) -> None:
    cfg = config(tmp_path, fashion_root, "float64", trainer__epochs=50)
    proc, seconds = mpirun(2, "1", "5", "hang", "train", cfg, "--out", tmp_path / "run", "--no-progress",
                           module="tests.rank_fault", timeout=120, env={"GPUML_MPI_TIMEOUT": "3"})
    assert proc.returncode != 0
    assert "rank 0 of 2 waited 3 s in all-reduce" in proc.stderr
    assert seconds < 60


def test_the_same_error_on_every_rank_is_printed_once(tmp_path: Path, fashion_root: Path) -> None:
    cfg = config(tmp_path, fashion_root, "float64")
    proc, _ = mpirun(2, "train", cfg, "--set", "trainer.batch_size=1", "--out", tmp_path / "run")
    assert proc.returncode == 2
    assert ("gpuml: error: --set trainer.batch_size: 1 is the global batch, smaller than the 2 ranks: every rank "
            "needs at least one sample (start at most 1 rank, or use a larger batch)") in proc.stderr.splitlines()
    assert proc.stderr.count("gpuml: error:") == 1


@pytest.mark.slow  # four mpiexec runs: 7 s on an idle 2-core machine, 14 s on a busy one
def test_sigterm_on_one_rank_stops_all_and_resume_equals_uninterrupted(tmp_path: Path, fashion_root: Path) -> None:
    cfg = config(tmp_path, fashion_root, "float64")
    full, _ = mpirun(2, "train", cfg, "--out", tmp_path / "full", "--no-progress")
    assert full.returncode == 0, full.stderr
    run = tmp_path / "run"
    # rank 1 alone gets SIGTERM during step 7: every rank stops after it, rank 0 checkpoints
    stopped, _ = mpirun(2, "1", "7", f"signal:{signal.SIGTERM}", "train", cfg, "--out", run, "--no-progress",
                        module="tests.rank_fault")
    assert stopped.returncode == 143, stopped.stderr
    assert stopped.stderr.count("terminated at epoch 1, step 7") == 1
    assert checkpoint_meta(run / "checkpoints" / "step-000000007.npz")["world_size"] == 2
    # one process may not continue a 2-rank run unless told
    refused = one_process("train", "--resume", run)
    assert refused.returncode == 2
    assert "was written by a run on 2 ranks, this one has 1" in refused.stderr
    resumed, _ = mpirun(2, "train", "--resume", run, "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    wa, wb = weights(tmp_path / "full"), weights(run)
    for k in wa:
        assert np.array_equal(wa[k], wb[k]), k


def test_python_api_fit_under_mpiexec(tmp_path: Path) -> None:
    script = tmp_path / "fit.py"
    script.write_text(
        "import sys\nimport numpy as np\nimport gpuml\nfrom gpuml import layers as L\n"
        "rng = np.random.default_rng(0)\n"
        "x = rng.integers(0, 256, size=(90, 1, 6, 6), dtype=np.uint8); y = rng.integers(0, 3, size=90)\n"
        "m = gpuml.Sequential([L.Flatten(), L.Dense(8, activation='relu'), L.Dropout(0.3), L.Dense(3)])\n"
        "m.compile(optimizer='adam')\n"
        "m.fit(x, y, epochs=2, batch_size=25, device='cpu', dtype='float64', verbose=0, run_dir=sys.argv[1],\n"
        "      validation_split=0.2)\n")
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one")], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, **ENV))
    assert one.returncode == 0, one.stderr
    two = subprocess.run([MPIEXEC, "-n", "2", sys.executable, str(script), str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, **ENV))
    assert two.returncode == 0, two.stderr
    wa, wb = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in wa:
        assert relative(wb[k], wa[k]) < 1e-9, k


def test_fewer_gpus_than_local_ranks_and_one_gpu_for_all_are_errors() -> None:
    code = (
        "import sys, types\n"
        "fake = types.ModuleType('cupy')\n"
        "fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: 1))\n"
        "sys.modules['cupy'] = fake\n"
        "import gpuml.backend as b\n"
        "b.cuda_status = lambda: (True, '1 GPU(s)')\n"
        "from gpuml.distributed.mpi import MpiWorld\n"
        "from gpuml.errors import DeviceError\n"
        "w = MpiWorld.__new__(MpiWorld); w.size = w.local_size = 2; w.local_rank = 1\n"
        "for device in ('cuda', 'auto', 'cuda:0'):\n"
        "    try:\n"
        "        w.device(device)\n"
        "    except DeviceError as exc:\n"
        "        print(exc)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, **ENV), cwd=REPO)
    lines = proc.stdout.splitlines()
    assert len(lines) == 3, proc.stderr
    assert re.fullmatch(r"2 ranks on \S+ but 1 GPU: one GPU per rank; start at most 1 rank per machine, "
                        r"or use device: cpu", lines[0])
    assert lines[1] == lines[0]  # auto finds the GPU: the same rule
    assert lines[2].startswith("device 'cuda:0' puts every one of the 2 ranks on one GPU")


def test_bench_train_ranks_reports_the_allreduce(tmp_path: Path, fashion_root: Path) -> None:
    cfg = config(tmp_path, fashion_root, "float32")
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "gpuml.cli", "bench", "train", "--ranks", "2", "--device", "cpu", "--models", str(cfg),
         "--batch-sizes", "20", "--limit", "200", "--no-torch", "--warmup-steps", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=dict(os.environ, **ENV))
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["ranks"] == 2 and row["allreduce_us_per_step"] > 0
    assert row["allreduce_bytes"] == 4 * (784 * 32 + 32 + 32 * 10 + 10)  # the tiny MLP's float32 gradients
    assert "2 ranks, all-reduce" in proc.stderr
