"""Data parallelism without MPI: how batches are split, that a shard draws the single process's
dropout and augmentation numbers, gradient packing, and the launcher checks (tests that start
ranks with mpiexec are in test_distributed_mpi.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpuml.backend.augment import UNIFORMS_PER_SAMPLE
from gpuml.backend.cpu import CpuBackend
from gpuml.data.loader import BatchIterator, Split
from gpuml.distributed import check_resume_ranks, shard_bounds
from gpuml.distributed.gradients import PackedGradients
from gpuml.distributed.shard import check_batches, eval_part
from gpuml.errors import ConfigError
from gpuml.nn.layers import Dropout

REPO = Path(__file__).resolve().parent.parent
LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_SIZE", "PMI_RANK", "PMIX_RANK",
                 "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK")


def test_shards_tile_the_batch_in_order_first_ranks_one_more() -> None:
    for rows in range(1, 40):
        for size in range(1, min(rows, 6) + 1):
            bounds = [shard_bounds(rows, r, size) for r in range(size)]
            assert bounds[0][0] == 0 and bounds[-1][1] == rows
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            counts = [hi - lo for lo, hi in bounds]
            assert counts == [rows // size + (r < rows % size) for r in range(size)]


def test_iterator_shards_are_disjoint_parts_of_the_same_global_batches() -> None:
    be = CpuBackend(dtype="float64")
    n = 24  # batches 7, 7, 7, 3: the short one still gives every rank a sample
    split = Split(np.arange(n, dtype=np.uint8).reshape(n, 1), np.arange(n, dtype=np.int64))

    def labels(shard: tuple[int, int]) -> list[list[int]]:
        it = BatchIterator(be, split, 7, mean=0.0, std=1.0, shuffle=True,
                           rng=np.random.default_rng(5), shard=shard)
        out = []
        for _ in range(2):  # two epochs: the second permutation is the same on every rank too
            for _, y in it:
                out.append(list(y))
                assert it.shard_start == shard_bounds(it.batch_rows, *shard)[0]
        return out

    whole = labels((0, 1))
    parts = [labels((r, 3)) for r in range(3)]
    for k, batch in enumerate(whole):
        assert sum((p[k] for p in parts), []) == batch


def test_dropout_mask_of_a_shard_is_the_single_process_mask_of_those_samples() -> None:
    be = CpuBackend(dtype="float64")
    x = np.ones((9, 5, 2))
    layer = Dropout(0.5)
    layer.build((5, 2), be, np.random.default_rng(0))
    layer.seed = 11
    whole = layer.forward(x, training=True, step=7).copy()
    layer.sample_offset = 4
    part = layer.forward(x[4:], training=True, step=7).copy()
    assert np.array_equal(part, whole[4:])
    assert 0 < np.count_nonzero(whole) < whole.size  # some dropped, some kept: a real mask


def test_augmentation_of_a_shard_draws_what_the_single_process_draws() -> None:
    be = CpuBackend(dtype="float64")
    x = np.random.default_rng(0).normal(size=(6, 1, 8, 8))
    kw = dict(seed=3, max_shift=2.0, max_rotate=15.0, max_scale=0.1, hflip=True, fill=0.0)
    whole = be.augment_images(x, offset=9 << 32, **kw).copy()
    part = be.augment_images(x[2:].copy(), offset=(9 << 32) + UNIFORMS_PER_SAMPLE * 2, **kw)
    assert np.array_equal(part, whole[2:])


def test_packed_gradients_one_buffer_scaled_and_unpacked() -> None:
    be = CpuBackend(dtype="float64")
    rng = np.random.default_rng(1)
    grads = [rng.normal(size=s) for s in ((3, 4), (4,), (2, 1, 3))]
    originals = [g.copy() for g in grads]
    packed = PackedGradients(be, grads)
    assert packed.size == 12 + 4 + 6 and packed.nbytes == 8 * 22
    buf = packed.pack(0.25)
    assert np.array_equal(buf, 0.25 * np.concatenate([g.ravel() for g in originals]))
    buf *= 2.0  # what the all-reduce of two equal ranks would leave
    packed.unpack()
    for g, g0 in zip(grads, originals):
        assert np.array_equal(g, 0.5 * g0)


def test_batch_split_errors_name_the_setting() -> None:
    check_batches(100, 32, False, 1, "cfg.yaml")  # one process: anything goes
    with pytest.raises(ConfigError, match=r"trainer\.batch_size: 2 is the global batch, smaller than the 4 ranks"):
        check_batches(100, 2, False, 4, "cfg.yaml")
    with pytest.raises(ConfigError, match="last batch of each epoch holds 1 of the 97 training samples.*drop_last"):
        check_batches(97, 32, False, 2, "cfg.yaml")
    check_batches(97, 32, True, 2, "cfg.yaml")  # drop_last: the short batch is never trained on
    split = Split(np.zeros((5, 1), np.uint8), np.arange(5))
    assert [len(eval_part(split, "test", r, 2)) for r in range(2)] == [3, 2]
    with pytest.raises(ConfigError, match="the val split holds 5 samples, fewer than the 6 ranks"):
        eval_part(split, "val", 0, 6)


def test_resume_with_another_rank_count_needs_allow_config_change() -> None:
    point = (Path("run/checkpoints/step-000000005.npz"), ({}, {}, {"world_size": 2}))
    with pytest.raises(ConfigError, match="on 2 ranks, this one has 1.*--allow-config-change"):
        check_resume_ranks(point, 1, allow=False)
    check_resume_ranks(point, 1, allow=True)
    check_resume_ranks(point, 2, allow=False)
    check_resume_ranks((point[0], ({}, {}, {})), 1, allow=False)  # older checkpoints: one process


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(clean, PYTHONPATH=str(REPO), **env), cwd=REPO)


def test_one_process_never_imports_mpi4py() -> None:
    code = ("import sys; from gpuml.distributed import world; w = world(); "
            "assert type(w).__name__ == 'World' and w.size == 1, w; "
            "assert 'mpi4py' not in sys.modules, 'mpi4py imported'; print('ok')")
    for env in ({}, {"PMI_SIZE": "1", "PMI_RANK": "0"}, {"OMPI_COMM_WORLD_SIZE": "1"}):
        proc = _python(code, **env)
        assert proc.returncode == 0 and proc.stdout.strip() == "ok", (env, proc.stderr)


def test_launched_ranks_without_mpi4py_are_one_line_errors(tmp_path: Path) -> None:
    fake = tmp_path / "mpi4py"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('No module named mpi4py (hidden by the test)')\n")
    run = (f"import sys; sys.path.insert(0, {str(tmp_path)!r}); from gpuml.cli import main; "
           "sys.exit(main(['train', 'configs/smoke.yaml']))")
    rank0 = _python(run, PMI_SIZE="2", PMI_RANK="0")
    assert rank0.returncode == 1
    assert rank0.stderr.strip().splitlines() == [
        "gpuml: error: started by an MPI launcher as one of 2 ranks, but mpi4py does not import "
        "(No module named mpi4py (hidden by the test)); install the extra: pip install 'gpuml[mpi]'"]
    rank1 = _python(run, PMI_SIZE="2", PMI_RANK="1")
    assert rank1.returncode == 1 and rank1.stderr == ""  # rank 0 says it once


def test_bench_relaunch_drops_ranks_from_the_command_line() -> None:
    from gpuml.distributed.bench import without_ranks

    assert without_ranks(["bench", "train", "--ranks", "2", "--limit", "9"]) == ["bench", "train", "--limit", "9"]
    assert without_ranks(["bench", "train", "--ranks=4", "--no-torch"]) == ["bench", "train", "--no-torch"]


def test_nccl_allreduce_imports_without_cupy_and_calls_nccl_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    """The NCCL path cannot run here (no GPUs): this checks its wiring against a stand-in for
    cupy.cuda.nccl with the signatures of CuPy's nccl.pyx (allReduce(sendbuf, recvbuf, count,
    datatype, op, stream), NcclCommunicator(ndev, commId, rank))."""
    import types

    import gpuml.distributed.nccl as nccl_mod  # no cupy needed to import

    calls = []

    class Comm:
        def __init__(self, ndev, uid, rank):
            calls.append(("init", ndev, uid, rank))

        def allReduce(self, send, recv, count, dtype, op, stream):  # noqa: N802 - CuPy's name
            calls.append(("allReduce", send, recv, count, dtype, op, stream))

    nccl = types.SimpleNamespace(NcclCommunicator=Comm, get_unique_id=lambda: ("uid",), NCCL_SUM=0,
                                 NCCL_FLOAT32=7, NCCL_FLOAT64=8, NCCL_FLOAT16=6)
    cuda = types.SimpleNamespace(nccl=nccl, get_current_stream=lambda: types.SimpleNamespace(ptr=1234))
    fake = types.ModuleType("cupy")
    fake.cuda = cuda
    cuda_mod = types.ModuleType("cupy.cuda")
    cuda_mod.nccl = nccl
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setitem(sys.modules, "cupy.cuda", cuda_mod)

    class World:  # rank 1 of 2: the unique id comes from rank 0 by broadcast
        is_root, size, rank = False, 2, 1

        def bcast(self, obj):
            assert obj is None
            return ("uid-of-rank-0",)

    buf = types.SimpleNamespace(dtype=np.dtype("float32"), size=22, data=types.SimpleNamespace(ptr=0xBEEF))
    reduce = nccl_mod.NcclAllreduce(World(), buf)
    reduce(buf)
    assert calls == [("init", 2, ("uid-of-rank-0",), 1), ("allReduce", 0xBEEF, 0xBEEF, 22, 7, 0, 1234)]


def test_a_rank_other_than_0_writes_no_checkpoint_but_counts_it_as_saved(tmp_path: Path, fashion_root: Path) -> None:
    """checkpoint_every.minutes is agreed over the ranks (any rank due: all save); a rank that
    skipped the write but not the clock stayed due for ever, and every step was a checkpoint."""
    import time

    from gpuml.distributed import World
    from gpuml.train.config import load_config
    from gpuml.train.trainer import Trainer
    from tests.test_trainer import tiny_config

    class Rank1(World):
        rank = 1

    cfg = load_config(tiny_config(tmp_path, fashion_root))
    trainer = Trainer(cfg, tmp_path / "run", log=lambda msg: None)
    trainer.dist = Rank1()
    trainer.cfg["trainer"]["checkpoint_every"] = {"steps": None, "minutes": 1.0}
    trainer._last_save_t = time.perf_counter() - 120.0  # two minutes since the last one
    assert trainer._checkpoint_due()
    trainer.save_checkpoint()
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not trainer._checkpoint_due()
