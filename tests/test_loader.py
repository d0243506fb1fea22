"""load_dataset (limit, validation split, statistics) and BatchIterator (shuffling, visits,
buffers, exact resume) on a fake backend and, when it imports, the CPU backend."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gpuml.data.datasets import DATASETS, DataFile, DatasetSpec
from gpuml.data.idx import idx_sha256, write_idx
from gpuml.data.loader import BatchIterator, Split, load_dataset, pixel_stats
from gpuml.errors import ConfigError, DataError

N_TRAIN, N_TEST = 50, 10


class FakeBackend:
    """Just the public methods BatchIterator may use, in NumPy, counting transfers."""

    name = "fake"

    def __init__(self) -> None:
        self.dtype = np.dtype(np.float32)
        self.transfers: list[tuple[np.dtype, tuple[int, ...]]] = []
        self.allocations = 0

    def asarray(self, x, dtype=None):
        a = np.array(x, dtype=dtype, copy=True)
        self.transfers.append((a.dtype, a.shape))
        return a

    def to_numpy(self, x):
        return np.array(x)

    def empty(self, shape, dtype=None):
        self.allocations += 1
        return np.empty(shape, dtype=self.dtype if dtype is None else dtype)

    def upload_(self, dst, host):
        dst[...] = host
        self.transfers.append((dst.dtype, dst.shape))
        return dst

    def gather_batch(self, images, labels, indices, *, mean, std, out_x=None, out_y=None, start=0,
                     start_counter=None, count=None):
        assert out_x is not None and out_y is not None, "the iterator must pass its buffers"
        start += 0 if start_counter is None else int(start_counter[0])
        indices = indices[start:] if count is None else indices[start:start + count]
        out_x[...] = (images[indices] / 255.0 - mean) / std
        out_y[...] = labels[indices]
        return out_x, out_y


def _real_backend(device: str):
    try:
        from gpuml.backend import get_backend

        return get_backend(device)
    except ImportError as exc:
        pytest.skip(f"{device} backend not importable: {exc}")


@pytest.fixture(params=["fake", "cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def backend(request):
    return FakeBackend() if request.param == "fake" else _real_backend(request.param)


MEAN, STD = 0.4, 0.3


def _split(n=N_TRAIN) -> Split:
    """Sample i: every pixel equals i (so a batch names its samples), label i % 10."""
    images = np.repeat(np.arange(n, dtype=np.uint8), 16).reshape(n, 1, 4, 4)
    return Split(images, np.arange(n, dtype=np.int64) % 10)


def _ids(backend, x, y) -> list[int]:
    x, y = backend.to_numpy(x), backend.to_numpy(y)
    ids = np.rint((x[:, 0, 0, 0].astype(np.float64) * STD + MEAN) * 255).astype(int)
    assert y.dtype == np.int32 and (y == ids % 10).all()
    return ids.tolist()


def _epochs(backend, it, count) -> list[list[int]]:
    return [[i for x, y in it for i in _ids(backend, x, y)] for _ in range(count)]


def _iterator(backend, split=None, bs=16, **kw) -> BatchIterator:
    return BatchIterator(backend, split or _split(), bs, mean=MEAN, std=STD, **kw)


# ---------------------------------------------------------------------------- load_dataset


@pytest.fixture
def tiny_root(tmp_path, monkeypatch):
    """A registered dataset 'tiny_loader' in tmp_path/data: train sample i has pixels 5*i % 256."""
    root = tmp_path / "data"
    root.mkdir()
    train = (np.arange(N_TRAIN, dtype=np.int64)[:, None, None] * 5 % 256 + np.zeros((1, 4, 4), np.int64))
    arrays = {
        "train_images": train.astype(np.uint8),
        "train_labels": (np.arange(N_TRAIN) % 10).astype(np.uint8),
        "test_images": np.full((N_TEST, 4, 4), 7, np.uint8),
        "test_labels": (np.arange(N_TEST) % 10).astype(np.uint8),
    }
    names = {"train_images": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
             "test_images": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz"}
    files = {}
    for key, arr in arrays.items():
        write_idx(root / names[key], arr)
        files[key] = DataFile(names[key], 0, "0" * 64, idx_sha256(arr))
    spec = DatasetSpec("tiny_loader", files, (), tuple("abcdefghij"), (1, 4, 4))
    monkeypatch.setitem(DATASETS, "tiny_loader", spec)
    return root, arrays


@pytest.mark.parametrize(
    "limit, val_split, n_train, n_val",
    [(None, 0, 50, 0), (30, 0, 30, 0), (30, 5, 25, 5), (30, 0.2, 24, 6), (None, 0.1, 45, 5)],
)
def test_limit_and_val_split(tiny_root, limit, val_split, n_train, n_val):
    root, arrays = tiny_root
    ds = load_dataset("tiny_loader", root, limit=limit, val_split=val_split, download=False)
    images = arrays["train_images"]
    assert ds.train.images.shape == (n_train, 1, 4, 4) and ds.train.images.dtype == np.uint8
    assert ds.train.labels.dtype == np.int64
    np.testing.assert_array_equal(ds.train.images[:, 0], images[:n_train])
    if n_val:  # the end of the limited training set
        np.testing.assert_array_equal(ds.val.images[:, 0], images[n_train : n_train + n_val])
        np.testing.assert_array_equal(ds.val.labels, arrays["train_labels"][n_train : n_train + n_val])
    else:
        assert ds.val is None
    assert len(ds.test) == N_TEST and ds.num_classes == 10 and ds.classes[1] == "b"
    assert ds.folder == root


@pytest.mark.parametrize(
    "kw",
    [dict(limit=30, val_split=30), dict(val_split=50), dict(val_split=1.0), dict(val_split=-1),
     dict(val_split=0.001), dict(val_split=True), dict(val_split="5"), dict(limit=0), dict(limit=51),
     dict(limit=True), dict(limit=2.5)],
)
def test_bad_limit_or_val_split(tiny_root, kw):
    with pytest.raises(ConfigError, match="data.limit|data.val_split"):
        load_dataset("tiny_loader", tiny_root[0], download=False, **kw)


def test_stats_come_from_the_training_split_only(tiny_root):
    root, arrays = tiny_root
    ds = load_dataset("tiny_loader", root, limit=40, val_split=10, download=False)
    px = arrays["train_images"][:30].astype(np.float64) / 255
    assert ds.mean == pytest.approx(px.mean(), abs=1e-12)
    assert ds.std == pytest.approx(px.std(), abs=1e-12)
    everything = arrays["train_images"].astype(np.float64) / 255
    assert abs(ds.mean - everything.mean()) > 0.01


def test_pixel_stats_exact():
    img = np.random.default_rng(3).integers(0, 256, (3000, 1, 28, 28), dtype=np.uint8)
    mean, std = pixel_stats(img)
    assert mean == pytest.approx(img.mean() / 255, rel=1e-12)
    assert std == pytest.approx((img / 255.0).std(), rel=1e-12)


# ---------------------------------------------------------------------------- BatchIterator


def test_every_sample_once_per_epoch(backend):
    it = _iterator(backend, shuffle=True, rng=np.random.default_rng(0))
    assert len(it) == 4
    sizes = [len(backend.to_numpy(y)) for _, y in it]
    assert sizes == [16, 16, 16, 2] and it.epoch == 1
    e2, e3 = _epochs(backend, it, 2)
    assert sorted(e2) == sorted(e3) == list(range(N_TRAIN))
    assert e2 != e3 and e2 != list(range(N_TRAIN))


def test_values_are_normalised(backend):
    it = _iterator(backend)
    x, _ = next(iter(it))
    x = backend.to_numpy(x)
    assert x.dtype == np.float32 and x.shape == (16, 1, 4, 4)
    expected = (np.arange(16, dtype=np.float64)[:, None, None, None] / 255 - MEAN) / STD
    np.testing.assert_allclose(x, np.broadcast_to(expected, x.shape), rtol=1e-6, atol=1e-6)


def test_drop_last(backend):
    it = _iterator(backend, shuffle=True, rng=np.random.default_rng(1), drop_last=True)
    assert len(it) == 3
    for epoch in _epochs(backend, it, 3):
        assert len(epoch) == 48 and len(set(epoch)) == 48


def test_no_shuffle_keeps_order(backend):
    it = _iterator(backend)
    assert _epochs(backend, it, 2) == [list(range(N_TRAIN))] * 2


def test_shuffle_reproducible_from_the_seed(backend):
    runs = [_epochs(backend, _iterator(backend, shuffle=True, rng=np.random.default_rng(s)), 3)
            for s in (123, 123, 124)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


# Stopping mid-epoch leaves 18 samples of it, then a full epoch; stopping at its end leaves two
# full epochs.
@pytest.mark.parametrize("stop_after, remaining", [(2, 18 + N_TRAIN), (4, 2 * N_TRAIN)])
def test_resume_is_exact(backend, stop_after, remaining):
    a = _iterator(backend, shuffle=True, rng=np.random.default_rng(5))
    _epochs(backend, a, 1)
    for k, _ in enumerate(a, 1):
        if k == stop_after:
            break
    state = json.loads(json.dumps(a.state_dict()))  # checkpoints store it as plain data
    rest_a = [i for x, y in a for i in _ids(backend, x, y)] + _epochs(backend, a, 1)[0]

    b = _iterator(backend, shuffle=True, rng=np.random.default_rng(999))
    b.load_state_dict(state)
    assert (b.epoch, b.cursor) == (2, stop_after)
    rest_b = [i for x, y in b for i in _ids(backend, x, y)] + _epochs(backend, b, 1)[0]
    assert rest_a == rest_b
    assert len(rest_a) == remaining


def test_breaking_out_continues_where_it_stopped(backend):
    it = _iterator(backend)
    first = next(iter(it))
    _ids(backend, *first)
    rest = [i for x, y in it for i in _ids(backend, x, y)]
    assert rest == list(range(16, N_TRAIN))


def test_resume_refuses_a_different_setup(backend):
    a = _iterator(backend, shuffle=True, rng=np.random.default_rng(0))
    next(iter(a))
    b = _iterator(backend, bs=8, shuffle=True, rng=np.random.default_rng(0))
    with pytest.raises(DataError, match="batch_size was 16, now 8"):
        b.load_state_dict(a.state_dict())


def test_bad_arguments(backend):
    with pytest.raises(ValueError, match="rng"):
        _iterator(backend, shuffle=True)
    with pytest.raises(ConfigError):
        _iterator(backend, bs=0)
    with pytest.raises(ConfigError, match="leaves no batch"):
        _iterator(backend, bs=64, drop_last=True)


def test_one_transfer_per_epoch_and_reused_buffers():
    fake = FakeBackend()
    it = _iterator(fake, shuffle=True, rng=np.random.default_rng(0))
    assert fake.transfers == [(np.dtype(np.uint8), (N_TRAIN, 1, 4, 4)), (np.dtype(np.int32), (N_TRAIN,))]
    seen = []
    for _ in range(3):
        seen.append([(id(x), id(y)) for x, y in it])
    # one int64 permutation per epoch, nothing per batch
    assert fake.transfers[2:] == [(np.dtype(np.int64), (N_TRAIN,))] * 3
    # one (x, y) pair per batch size (16 and the tail of 2), reused every epoch
    assert fake.allocations == 4
    assert seen[0] == seen[1] == seen[2]
    assert len(set(seen[0])) == 2


def test_val_split_error_says_what_to_set(tiny_root):
    with pytest.raises(ConfigError) as e:
        load_dataset("tiny_loader", tiny_root[0], limit=30, val_split=30, download=False)
    msg = str(e.value)
    assert "takes 30 of the 30 training samples (data.limit=30)" in msg
    assert "--set data.val_split=0.1" in msg and "a count below 30" in msg


@pytest.mark.parametrize("name", ["mlp", "cnn", "smoke", "mnist_mlp", "mnist_cnn"])
def test_seed_configs_fit_any_limit(fashion_root, name):
    """The README's `--set data.limit=5000` works with every seed config (an int val_split of
    5000 left nothing to train on), and the full dataset keeps the 5,000-image validation split."""
    from gpuml.train.config import load_config
    from tests.conftest import CONFIGS

    limit = 500 if name == "smoke" else 5000  # smoke.yaml used to take 500 for validation
    cfg = load_config(CONFIGS / f"{name}.yaml", [f"data.limit={limit}"])
    val_split = cfg["data"]["val_split"]
    ds = load_dataset("fashion_mnist", fashion_root, limit=limit, val_split=val_split, download=False, verify=False)
    assert len(ds.train) + len(ds.val) == limit and 0 < len(ds.val) < len(ds.train)
    if name != "smoke":
        full = load_dataset("fashion_mnist", fashion_root, val_split=val_split, download=False, verify=False)
        assert (len(full.train), len(full.val)) == (55000, 5000)
