"""Dataset registry: lookup order, downloads from a local HTTP server, checksums, real data."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
import shutil
import socket
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from gpuml.data import datasets
from gpuml.data.datasets import DATASETS, FILE_KEYS, DataFile, DatasetSpec, fetch_dataset, get_spec
from gpuml.data.idx import idx_sha256, read_idx, write_idx
from gpuml.data.loader import load_dataset
from gpuml.errors import ConfigError, DataError

NAMES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No $GPUML_DATA, HOME in tmp_path, the system dataset folder in tmp_path."""
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("GPUML_DATA", raising=False)
    monkeypatch.setattr(datasets, "SYSTEM_DATASET_DIRS", (tmp_path / "sys",))
    return tmp_path


@pytest.fixture
def tiny(isolated, monkeypatch):
    """A registered 4x4-pixel dataset 'tiny_set' whose published .gz files are in ./published."""
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (40, 4, 4), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, 40, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (8, 4, 4), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, 8, dtype=np.uint8),
    }
    published = isolated / "published"
    published.mkdir()
    files = {}
    for key, arr in arrays.items():
        data = write_idx(published / NAMES[key], arr).read_bytes()
        files[key] = DataFile(NAMES[key], len(data), hashlib.sha256(data).hexdigest(), idx_sha256(arr))
    spec = DatasetSpec("tiny_set", files, ("http://127.0.0.1:9/",), tuple("abcdefghij"), (1, 4, 4))
    monkeypatch.setitem(DATASETS, "tiny_set", spec)
    return spec, published, arrays


def _use_mirrors(monkeypatch, name, *mirrors):
    monkeypatch.setitem(DATASETS, name, dataclasses.replace(DATASETS[name], mirrors=mirrors))


def _place(src: Path, dst: Path, keys=FILE_KEYS) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for k in keys:
        shutil.copy(src / NAMES[k], dst / NAMES[k])
    return dst


def _closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/"


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


class _Handler(SimpleHTTPRequestHandler):
    """Serves ./good and ./bad as files; /cut/X sends half of good/X then hangs up; /hang/X
    stalls past the client's timeout."""

    requests: list[str] = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).requests.append(self.path)
        kind, _, name = self.path.lstrip("/").partition("/")
        if kind == "cut":
            data = (Path(self.directory) / "good" / name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        if kind == "hang":
            time.sleep(2.0)
            return
        super().do_GET()


@pytest.fixture
def server(tiny):
    """(base url, request log); ./good holds the published files, ./bad wrong bytes under the
    same names."""
    _, published, _ = tiny
    www = published.parent / "www"
    shutil.copytree(published, www / "good")
    (www / "bad").mkdir()
    for name in NAMES.values():
        (www / "bad" / name).write_bytes(b"not the dataset" * 100)
    _Handler.requests = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(www)))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", _Handler.requests
    httpd.shutdown()
    httpd.server_close()


# ---------------------------------------------------------------------------- registry


def test_registry():
    for name in ("fashion_mnist", "mnist"):
        spec = get_spec(name)
        assert spec.shape == (1, 28, 28) and spec.num_classes == 10
        assert [spec.files[k].name for k in FILE_KEYS] == list(NAMES.values())
        hashes = [h for f in spec.files.values() for h in (f.sha256, f.raw_sha256)]
        assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes)
        assert len(set(hashes)) == 8
    assert get_spec("fashion_mnist").mirrors[0] == "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
    assert get_spec("mnist").mirrors[0].startswith("https://ossci-datasets.s3.amazonaws.com/")
    assert get_spec("mnist").mirrors[1].startswith("https://storage.googleapis.com/cvdf-datasets/")
    assert get_spec("fashion_mnist").classes[0] == "T-shirt/top"


def test_unknown_dataset_suggests_a_name():
    with pytest.raises(ConfigError, match="did you mean 'fashion_mnist'"):
        get_spec("fashion-mnist")


# ---------------------------------------------------------------------------- the real files


def _real_fashion_folder() -> Path | None:
    env = os.environ.get("GPUML_DATA")
    if not env:
        return None
    for sub in ("fashion_mnist", "fashion-mnist"):
        if all((Path(env) / sub / n).is_file() for n in NAMES.values()):
            return Path(env) / sub
    return None


@pytest.mark.skipif(_real_fashion_folder() is None, reason="$GPUML_DATA holds no fashion-mnist/")
def test_real_fashion_mnist(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    ds = load_dataset("fashion_mnist", download=False)  # verifies every file's content hash
    assert ds.folder == _real_fashion_folder()
    assert ds.train.images.shape == (60000, 1, 28, 28) and ds.train.images.dtype == np.uint8
    assert ds.test.images.shape == (10000, 1, 28, 28)
    assert ds.train.labels.dtype == np.int64
    assert np.bincount(ds.train.labels).tolist() == [6000] * 10
    assert np.bincount(ds.test.labels).tolist() == [1000] * 10
    assert ds.mean == pytest.approx(0.2860, abs=1e-4) and ds.std == pytest.approx(0.3530, abs=1e-4)
    spec = get_spec("fashion_mnist")
    labels = read_idx(ds.folder / NAMES["test_labels"])
    assert idx_sha256(labels) == spec.files["test_labels"].raw_sha256


# ---------------------------------------------------------------------------- lookup


def test_lookup_order(tiny, monkeypatch):
    spec, published, _ = tiny
    tmp = published.parent
    root = _place(published, tmp / "root")
    env = _place(published, tmp / "env" / "tiny_set")
    cache = _place(published, tmp / "home" / ".cache" / "gpuml" / "tiny_set")
    system = _place(published, tmp / "sys" / "tiny-set")
    monkeypatch.setenv("GPUML_DATA", str(tmp / "env"))
    for expected in (root, env, cache, system):
        assert fetch_dataset("tiny_set", root, download=False).folder == expected
        shutil.rmtree(expected)


def test_root_and_env_layouts(tiny, monkeypatch):
    spec, published, _ = tiny
    tmp = published.parent
    # data.root naming the parent of a dashed folder; $GPUML_DATA with the registry name
    dashed = _place(published, tmp / "parent" / "tiny-set")
    assert fetch_dataset("tiny_set", tmp / "parent", download=False).folder == dashed
    env = _place(published, tmp / "env" / "tiny_set")
    monkeypatch.setenv("GPUML_DATA", str(tmp / "env"))
    assert fetch_dataset("tiny_set", download=False).folder == env
    # an incomplete folder earlier in the order is skipped
    partial = _place(published, tmp / "partial", keys=FILE_KEYS[:3])
    assert fetch_dataset("tiny_set", partial, download=False).folder == env


def test_uncompressed_files_accepted(tiny):
    spec, published, arrays = tiny
    root = published.parent / "raw"
    root.mkdir()
    for key, arr in arrays.items():
        write_idx(root / NAMES[key].removesuffix(".gz"), arr)
    ds = load_dataset("tiny_set", root, download=False)
    assert ds.folder == root
    np.testing.assert_array_equal(ds.test.images[:, 0], arrays["test_images"])


def test_modified_local_file_fails_verification(tiny):
    spec, published, arrays = tiny
    root = _place(published, published.parent / "root")
    changed = arrays["train_labels"].copy()
    changed[0] = (changed[0] + 1) % 10
    write_idx(root / NAMES["train_labels"], changed)
    with pytest.raises(DataError) as info:
        load_dataset("tiny_set", root, download=False)
    msg = str(info.value)
    assert "checksum mismatch" in msg and str(root / NAMES["train_labels"]) in msg
    assert spec.files["train_labels"].raw_sha256 in msg and idx_sha256(changed) in msg
    assert load_dataset("tiny_set", root, download=False, verify=False).train.labels[0] == changed[0]


def test_not_found_offline_lists_every_place(isolated, monkeypatch):
    monkeypatch.setenv("GPUML_DATA", str(isolated / "env"))
    with pytest.raises(DataError) as info:
        fetch_dataset("fashion_mnist", isolated / "root", download=False)
    msg = str(info.value)
    assert "\n" not in msg
    for place in (
        isolated / "root",
        isolated / "env" / "fashion_mnist",
        isolated / "home" / ".cache" / "gpuml" / "fashion_mnist",
        isolated / "sys" / "fashion-mnist",
    ):
        assert str(place) in msg
    for hint in ("http://fashion-mnist.s3-website", "dataset-fashion-mnist", "data.root", "$GPUML_DATA"):
        assert hint in msg
    assert not (isolated / "env").exists()


# ---------------------------------------------------------------------------- downloads


def test_download_verifies_and_lands_in_gpuml_data(tiny, server, monkeypatch):
    spec, published, arrays = tiny
    url, requests = server
    monkeypatch.setenv("GPUML_DATA", str(published.parent / "env"))
    _use_mirrors(monkeypatch, "tiny_set", url + "/good/")
    files = fetch_dataset("tiny_set", progress=False)
    assert files.folder == published.parent / "env" / "tiny_set"
    assert _leftovers(files.folder) == sorted(NAMES.values())
    for name in NAMES.values():
        assert (files.folder / name).read_bytes() == (published / name).read_bytes()
    assert len(requests) == 4
    ds = load_dataset("tiny_set", progress=False)  # found on disk now: no new request
    assert len(requests) == 4
    np.testing.assert_array_equal(ds.train.labels, arrays["train_labels"])


def test_download_defaults_to_user_cache_and_completes_a_partial_folder(tiny, server, monkeypatch):
    spec, published, _ = tiny
    url, requests = server
    _use_mirrors(monkeypatch, "tiny_set", url + "/good/")
    cache = _place(published, published.parent / "home" / ".cache" / "gpuml" / "tiny_set", FILE_KEYS[:2])
    assert fetch_dataset("tiny_set", progress=False).folder == cache
    assert sorted(requests) == sorted(f"/good/{NAMES[k]}" for k in FILE_KEYS[2:])


def test_bad_checksum_leaves_no_file(tiny, server, monkeypatch):
    spec, published, _ = tiny
    url, _ = server
    _use_mirrors(monkeypatch, "tiny_set", url + "/bad/")
    with pytest.raises(DataError) as info:
        fetch_dataset("tiny_set", progress=False)
    msg = str(info.value)
    f = spec.files["train_images"]
    got = hashlib.sha256(b"not the dataset" * 100).hexdigest()
    assert f"sha256 mismatch for {f.name}: expected {f.sha256}, got {got}" in msg
    assert not (published.parent / "home" / ".cache" / "gpuml" / "tiny_set").exists()


def test_dead_mirror_falls_through_to_the_next(tiny, server, monkeypatch):
    spec, published, _ = tiny
    url, _ = server
    _use_mirrors(monkeypatch, "tiny_set", _closed_port_url(), url + "/good/")
    files = fetch_dataset("tiny_set", progress=False)
    assert _leftovers(files.folder) == sorted(NAMES.values())


def test_all_mirrors_dead_is_one_error_naming_everything(tiny, monkeypatch):
    spec, published, _ = tiny
    dead = [_closed_port_url(), _closed_port_url()]
    _use_mirrors(monkeypatch, "tiny_set", *dead)
    with pytest.raises(DataError) as info:
        fetch_dataset("tiny_set", published.parent / "root", progress=False)
    msg = str(info.value)
    assert "\n" not in msg
    for text in (*dead, str(published.parent / "root"), str(published.parent / "sys" / "tiny-set"),
                 str(published.parent / "home" / ".cache" / "gpuml" / "tiny_set"), "Download failed"):
        assert text in msg
    assert _leftovers(published.parent / "home" / ".cache" / "gpuml" / "tiny_set") == []


def test_mirror_failing_midway_leaves_no_partial_file(tiny, server, monkeypatch):
    spec, published, _ = tiny
    url, _ = server
    dest = published.parent / "home" / ".cache" / "gpuml" / "tiny_set"
    _use_mirrors(monkeypatch, "tiny_set", url + "/cut/")
    with pytest.raises(DataError, match=r"connection closed after \d+ of \d+ bytes"):
        fetch_dataset("tiny_set", progress=False)
    assert _leftovers(dest) == []
    _use_mirrors(monkeypatch, "tiny_set", url + "/cut/", url + "/good/")
    fetch_dataset("tiny_set", progress=False)
    assert _leftovers(dest) == sorted(NAMES.values())
    assert (dest / NAMES["train_images"]).read_bytes() == (published / NAMES["train_images"]).read_bytes()


def test_stalled_mirror_times_out(tiny, server, monkeypatch):
    spec, published, _ = tiny
    url, _ = server
    _use_mirrors(monkeypatch, "tiny_set", url + "/hang/", url + "/good/")
    t0 = time.monotonic()
    fetch_dataset("tiny_set", timeout=0.2, progress=False)
    assert time.monotonic() - t0 < 1.9  # four stalls of 0.2 s, not the server's 2 s
