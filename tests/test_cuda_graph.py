"""trainer.cuda_graph (issue 9): the training and evaluation steps captured as CUDA graphs and
replayed give the same bits as the eager steps, and a capture that cannot work is reported.

Each test trains a tiny model for a few steps twice, graph on and off, from the same seed, and
compares the weights, optimizer state and metrics bit for bit. Under --cuda-emulator the capture
is the emulator's (tests/cuda_emulator): a capture that allocates, synchronises or copies from
pageable memory fails there as on a GPU, and a replay after a buffer was freed fails too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.gpu_util import GPU


def gpu(test: Any) -> Any:
    for mark in GPU:
        test = mark(test)
    return test

N_TRAIN, N_TEST = 44, 12  # batch 8: five full batches and a partial one of 4


def _dataset(n: int = N_TRAIN, seed: int = 0) -> Any:
    from gpuml.data.datasets import DatasetSpec
    from gpuml.data.loader import Dataset, Split, pixel_stats

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n + N_TEST, 1, 6, 6), dtype=np.uint8)
    labels = rng.integers(0, 3, n + N_TEST)
    train, test = Split(images[:n], labels[:n]), Split(images[n:], labels[n:])
    val = Split(images[n - 10:n], labels[n - 10:n])
    spec = DatasetSpec("random", {}, (), ("a", "b", "c"), (1, 6, 6))
    return Dataset(spec, Path("."), train, val, test, *pixel_stats(train.images))


def _config(graph: str, device: str = "cuda", **trainer: Any) -> dict[str, Any]:
    from gpuml.train.config import validate

    raw = {
        "device": device, "seed": 3,
        "model": {"input_shape": [1, 6, 6], "layers": [
            {"type": "flatten"}, {"type": "dense", "units": 8, "activation": "relu"},
            {"type": "dropout", "rate": 0.25}, {"type": "dense", "units": 3}]},
        "optimizer": {"name": "adam", "lr": 0.01},
        "trainer": {"epochs": 3, "batch_size": 8, "eval_batch_size": 8, "cuda_graph": graph,
                    "checkpoint_every": {"minutes": None}, "progress": False, **trainer},
    }  # fmt: skip
    for key in list(trainer):
        if "__" in key:  # section__key: a nested override
            section, sub = key.split("__")
            raw["trainer"].pop(key)
            raw.setdefault(section, {})[sub] = trainer[key]
    return validate(raw)


def _train(tmp_path: Path, graph: str, name: str, data: Any = None, **trainer: Any) -> tuple[Any, dict]:
    from gpuml.train.trainer import Trainer

    logs: list[str] = []
    t = Trainer(_config(graph, **trainer), tmp_path / name, log=logs.append, dataset=data or _dataset())
    summary = t.fit(progress=False)
    return t, {"summary": summary, "history": t.history, "logs": logs}


def _state(t: Any) -> dict[str, np.ndarray]:
    out = {f"model.{k}": np.asarray(v) for k, v in t.model.state_dict().items()}
    out.update({f"optim.{k}": np.asarray(v) for k, v in t.optimizer.state_dict().items()})
    return out


def _same(a: Any, b: Any) -> None:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert np.array_equal(sa[k], sb[k]), k


def _metrics(run: dict) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("seconds", "samples_per_second")} for row in run["history"]]


@gpu
def test_graph_on_matches_eager_bit_for_bit_with_partial_batch_dropout_and_eval(tmp_path: Path) -> None:
    on, run_on = _train(tmp_path, "on", "on")
    off, run_off = _train(tmp_path, "off", "off")
    # batch 8 of 44 samples: full batches, a partial one of 4, the val split (10: 8 + 2) and test
    assert on.steps.runner.captures >= 4
    assert off.steps.runner.captures == 0
    _same(on, off)
    assert _metrics(run_on) == _metrics(run_off)
    assert run_on["summary"]["test_loss"] == run_off["summary"]["test_loss"]
    assert run_on["summary"]["test_accuracy"] == run_off["summary"]["test_accuracy"]
    assert not any("warning" in line for line in run_on["logs"])


@gpu
def test_graph_with_augmentation_clipping_and_schedule(tmp_path: Path) -> None:
    extra = {"grad_clip_norm": 0.05, "data__augment": {"shift": 1, "rotate": 10.0, "hflip": True},
             "schedule__name": "cosine", "drop_last": False}
    on, run_on = _train(tmp_path, "on", "on", **extra)
    off, run_off = _train(tmp_path, "off", "off", **extra)
    _same(on, off)
    assert _metrics(run_on) == _metrics(run_off)
    lrs = [row["lr"] for row in run_on["history"]]
    assert len(set(lrs)) == len(lrs)  # the schedule moved, and the graph followed it


@gpu
def test_graph_recaptures_on_a_new_batch_size(tmp_path: Path) -> None:
    from gpuml.backend import get_backend
    from gpuml.backend.cuda.graph import GraphRunner

    be = get_backend("cuda")
    runner = GraphRunner(be, "on")
    out = be.zeros((4,))
    ones = {n: be.asarray(np.ones(n, np.float32)) for n in (4, 2)}

    def step(n: int) -> None:
        be.add_(out[:n], ones[n])

    with runner.stream():
        for n in (4, 4, 4, 2, 2, 2, 4):
            runner.run(("add", n), lambda n=n: step(n))
        assert runner.captures == 2  # one graph per batch shape, each after one eager run
        got = be.to_numpy(out)
    assert got.tolist() == [7.0, 7.0, 4.0, 4.0]


@gpu
def test_graph_keeps_its_buffers_and_pins_the_optimizer_table(tmp_path: Path) -> None:
    """A replay must never write through a pointer whose buffer was freed: the graph holds every
    array it launched with, and the tensor-table LRU skips a table a live graph points to."""
    import gc

    from gpuml.backend.cuda import optim

    on, _ = _train(tmp_path, "on", "on", epochs=1)
    be = on.backend
    tables = be._tensor_tables
    pinned = [t for t in tables.values() if t.pins]
    assert pinned, "the captured step's optimizer table is pinned"
    for i in range(optim.MAX_TABLES + 2):  # more than the LRU holds: unpinned tables go
        be.global_norm([be.zeros((i + 1,))])
    gc.collect()
    assert all(t in tables.values() for t in pinned)
    before = _state(on)
    on.cfg["trainer"]["epochs"] = 2
    on.fit(progress=False)  # replays the graphs captured in the first epoch
    assert any(not np.array_equal(before[k], v) for k, v in _state(on).items())


@gpu
def test_graph_resume_from_a_checkpoint_taken_in_graph_mode(tmp_path: Path) -> None:
    from gpuml.train.trainer import Trainer

    full, run_full = _train(tmp_path, "on", "full")
    # the same run stopped after epoch 1 (its checkpoint written in graph mode), then resumed
    first, _ = _train(tmp_path, "on", "resumed", epochs=1)
    del first
    resumed = Trainer(_config("on"), tmp_path / "resumed", log=lambda m: None, dataset=_dataset(), resume=True)
    resumed.resume_latest()
    resumed.fit(progress=False)
    _same(resumed, full)
    assert _metrics({"history": resumed.history}) == _metrics(run_full)


def _allocating_one_hot(monkeypatch: pytest.MonkeyPatch) -> None:
    """MSE's targets made by an op that allocates its output inside the step."""
    from gpuml.backend.cuda.backend import CudaBackend

    real = CudaBackend.one_hot

    def one_hot(self, labels, num_classes, *, out=None):
        return real(self, labels, num_classes)  # no out=: a fresh array every call

    monkeypatch.setattr(CudaBackend, "one_hot", one_hot)


@gpu
def test_graph_auto_falls_back_to_eager_with_one_warning_naming_the_op(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    off, run_off = _train(tmp_path, "off", "off", epochs=2, loss__name="mse")
    _allocating_one_hot(monkeypatch)
    auto, run_auto = _train(tmp_path, "auto", "auto", epochs=2, loss__name="mse")
    warnings = [line for line in run_auto["logs"] if "warning" in line]
    assert len(warnings) == 1, run_auto["logs"]
    assert "could not be captured" in warnings[0] and "one_hot" in warnings[0], warnings[0]
    assert "\n" not in warnings[0]
    _same(auto, off)
    assert _metrics(run_auto) == _metrics(run_off)


@gpu
def test_graph_on_is_an_error_naming_the_op_that_cannot_be_captured(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from gpuml.errors import DeviceError

    _allocating_one_hot(monkeypatch)
    with pytest.raises(DeviceError, match=r"trainer.cuda_graph is on but .*one_hot.*allocation") as info:
        _train(tmp_path, "on", "on", epochs=2, loss__name="mse")
    assert "\n" not in str(info.value)


@gpu
def test_graph_with_mse_loss_captures_its_one_hot_targets(tmp_path: Path) -> None:
    """MSE on integer labels builds one-hot targets inside the step: allocation-free (a cached
    buffer), so the step captures and matches eager."""
    on, run_on = _train(tmp_path, "on", "on", epochs=2, loss__name="mse")
    off, run_off = _train(tmp_path, "off", "off", epochs=2, loss__name="mse")
    assert on.steps.runner.captures >= 2
    _same(on, off)
    assert _metrics(run_on) == _metrics(run_off)


def test_cuda_graph_on_with_the_cpu_backend_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    from gpuml.errors import ConfigError
    from gpuml.train.trainer import Trainer

    for value in ("on", True):  # YAML reads a bare `on` as true
        with pytest.raises(ConfigError, match=r"trainer\.cuda_graph: on needs the CUDA backend") as info:
            Trainer(_config(value, device="cpu"), tmp_path / "run", log=lambda m: None, dataset=_dataset())
        assert "\n" not in str(info.value)
    for value in ("auto", "off", False):  # auto on a CPU is eager, as off
        Trainer(_config(value, device="cpu"), tmp_path / str(value), log=lambda m: None, dataset=_dataset())


# ----------------------------------------------------------------- the emulator's capture
def _emulator() -> Any:
    import cupy

    if "emulator" not in cupy.__version__:
        pytest.skip("checks the CPU emulator's capture (tests/cuda_emulator), not a GPU")
    return cupy


@gpu
def test_graph_emulator_records_and_replays_launches_and_pinned_copies() -> None:
    from gpuml.backend import get_backend

    cupy = _emulator()
    be = get_backend("cuda")
    dst, src = be.zeros((3,)), be.asarray(np.ones(3, np.float32))
    pinned = np.frombuffer(cupy.cuda.alloc_pinned_memory(12), np.float32, 3)
    hyper = be.zeros((3,))
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        be.add_(dst, src, alpha=2.0)
        hyper.set(pinned)
        graph = stream.end_capture()
    assert be.to_numpy(dst).tolist() == [0.0] * 3  # nothing runs at capture time
    for value in (5.0, 7.0):
        pinned[...] = value  # the replay reads the pinned buffer as it is then
        graph.launch(stream)
        assert be.to_numpy(hyper).tolist() == [value] * 3
    assert be.to_numpy(dst).tolist() == [4.0] * 3


@gpu
@pytest.mark.parametrize("what", ["allocate", "synchronize", "pageable copy", "read back"])
def test_graph_emulator_capture_fails_on_what_a_gpu_refuses(what: str) -> None:
    from gpuml.backend import get_backend

    cupy = _emulator()
    be = get_backend("cuda")
    dst = be.zeros((3,))
    ops = {"allocate": lambda: be.zeros((3,)), "synchronize": be.synchronize,
           "pageable copy": lambda: dst.set(np.ones(3, np.float32)), "read back": lambda: be.to_numpy(dst)}
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        with pytest.raises(cupy.cuda.runtime.CUDARuntimeError, match="not permitted when stream is capturing"):
            ops[what]()
        with pytest.raises(cupy.cuda.runtime.CUDARuntimeError, match="Invalidated"):
            stream.end_capture()
    assert not stream.is_capturing()


@gpu
def test_graph_emulator_replay_after_a_buffer_was_freed_fails() -> None:
    import gc

    from gpuml.backend import get_backend

    cupy = _emulator()
    be = get_backend("cuda")
    dst, src = be.zeros((3,)), be.asarray(np.ones(3, np.float32))
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        be.add_(dst, src)
        graph = stream.end_capture()
    graph.launch(stream)
    del src
    gc.collect()
    with pytest.raises(cupy.cuda.driver.CUDADriverError, match="freed after the graph was captured"):
        graph.launch(stream)


@gpu
def test_graph_optimizer_hyperparameters_come_from_pinned_memory_in_eager_steps() -> None:
    """Outside the trainer's step table, an optimizer update refreshes its hyperparameters by a
    copy from a pinned staging slot: capturable (a copy from a fresh pageable array is not, and
    may synchronise the stream in eager steps too)."""
    from gpuml.backend import get_backend

    cupy = _emulator()
    be = get_backend("cuda")
    p, g = be.asarray(np.ones(4, np.float32)), be.asarray(np.full(4, 2.0, np.float32))
    be.sgd_step([p], [g], lr=0.5)  # eager: builds the tensor table and its staging ring
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        be.sgd_step([p], [g], lr=0.25)
        graph = stream.end_capture()
        graph.launch(stream)
    assert be.to_numpy(p).tolist() == [1.0 - 0.5 * 2 - 0.25 * 2] * 4
