"""IDX reader/writer: round trips and every way a file can be broken."""

from __future__ import annotations

import gzip
import hashlib
import struct

import numpy as np
import pytest

from gpuml.data.idx import idx_sha256, read_idx, write_idx
from gpuml.errors import DataError


def _raw_idx(code: int, shape: tuple[int, ...], payload: bytes) -> bytes:
    return bytes([0, 0, code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape) + payload


def _expect_error(path, *words: str) -> str:
    with pytest.raises(DataError) as info:
        read_idx(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg
    return msg


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
@pytest.mark.parametrize("suffix", [".idx", ".gz"])
def test_round_trip(tmp_path, dtype, suffix):
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    if info is not None:
        a = rng.integers(info.min, info.max, size=(5, 3, 7), endpoint=True, dtype=dtype)
    else:
        a = rng.standard_normal((5, 3, 7)).astype(dtype)
    path = write_idx(tmp_path / f"a{suffix}", a)
    b = read_idx(path)
    assert b.dtype == np.dtype(dtype) and b.dtype.isnative
    assert b.shape == a.shape
    np.testing.assert_array_equal(a, b)
    assert b.flags.writeable and b.flags.c_contiguous


def test_round_trip_1d_and_empty(tmp_path):
    labels = np.arange(10, dtype=np.uint8)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "l.gz", labels)), labels)
    empty = np.zeros((0, 28, 28), dtype=np.uint8)
    assert read_idx(write_idx(tmp_path / "e", empty)).shape == (0, 28, 28)


def test_bytes_are_the_idx_format(tmp_path):
    a = np.array([[1, 2, 3], [4, 5, 6]], dtype=">i2")
    raw = write_idx(tmp_path / "a", a).read_bytes()
    assert raw == _raw_idx(0x0B, (2, 3), a.tobytes())
    assert idx_sha256(a) == hashlib.sha256(raw).hexdigest()
    # sha of the decompressed content, whatever the compression
    gz = write_idx(tmp_path / "a.gz", a).read_bytes()
    assert hashlib.sha256(gzip.decompress(gz)).hexdigest() == idx_sha256(a)


def test_gzip_output_is_deterministic_and_detected_by_content(tmp_path):
    a = np.arange(100, dtype=np.uint8).reshape(10, 10)
    p1, p2 = write_idx(tmp_path / "x.gz", a), write_idx(tmp_path / "y.gz", a)
    assert p1.read_bytes() == p2.read_bytes()
    # gzip data under a name without .gz, raw data under a .gz name
    (tmp_path / "plain").write_bytes(p1.read_bytes())
    (tmp_path / "fake.gz").write_bytes(gzip.decompress(p1.read_bytes()))
    np.testing.assert_array_equal(read_idx(tmp_path / "plain"), a)
    np.testing.assert_array_equal(read_idx(tmp_path / "fake.gz"), a)


def test_write_leaves_no_temporary_files(tmp_path):
    write_idx(tmp_path / "a.gz", np.zeros((4, 4), np.uint8))
    assert [p.name for p in tmp_path.iterdir()] == ["a.gz"]


def test_write_rejects_unstorable_dtype(tmp_path):
    with pytest.raises(ValueError, match="int64"):
        write_idx(tmp_path / "a", np.zeros(3, dtype=np.int64))
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_payload(tmp_path, gz):
    data = _raw_idx(0x08, (10, 28, 28), bytes(10 * 28 * 28 - 1))
    path = tmp_path / ("t.gz" if gz else "t")
    path.write_bytes(gzip.compress(data) if gz else data)
    _expect_error(path, "truncated", "7840")


@pytest.mark.parametrize("gz", [False, True])
def test_trailing_bytes(tmp_path, gz):
    data = _raw_idx(0x08, (2, 3), bytes(6)) + b"junk"
    path = tmp_path / ("t.gz" if gz else "t")
    path.write_bytes(gzip.compress(data) if gz else data)
    _expect_error(path, "4 trailing bytes")


def test_truncated_header(tmp_path):
    (tmp_path / "h").write_bytes(b"\x00\x00")
    _expect_error(tmp_path / "h", "truncated")
    (tmp_path / "d").write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">I", 5))
    _expect_error(tmp_path / "d", "truncated", "3 dimensions")


def test_wrong_magic(tmp_path):
    (tmp_path / "m").write_bytes(b"\x01\x02\x08\x01" + struct.pack(">I", 1) + b"\x00")
    _expect_error(tmp_path / "m", "not an IDX file", "01 02 08 01")


def test_bad_dtype_code(tmp_path):
    (tmp_path / "c").write_bytes(_raw_idx(0x0A, (1,), b"\x00"))
    _expect_error(tmp_path / "c", "dtype code 0x0a")


def test_zero_dimensions(tmp_path):
    (tmp_path / "z").write_bytes(bytes([0, 0, 8, 0]))
    _expect_error(tmp_path / "z", "0 dimensions")


def test_absurd_header_is_a_data_error(tmp_path):
    # A corrupt header claiming ~2**64 bytes must not surface as MemoryError.
    data = _raw_idx(0x08, (2**32 - 1, 2**32 - 1), b"\x00" * 16)
    (tmp_path / "big.gz").write_bytes(gzip.compress(data))
    _expect_error(tmp_path / "big.gz")


def test_corrupt_gzip_stream(tmp_path):
    a = np.random.default_rng(1).integers(0, 256, size=(50, 28, 28), dtype=np.uint8)
    good = write_idx(tmp_path / "good.gz", a).read_bytes()
    mid = bytearray(good)
    for i in range(len(mid) // 2, len(mid) // 2 + 16):
        mid[i] ^= 0xFF
    (tmp_path / "mid.gz").write_bytes(bytes(mid))
    _expect_error(tmp_path / "mid.gz", "corrupt gzip")

    bad_crc = bytearray(good)
    bad_crc[-8] ^= 0xFF  # the CRC32 in the trailer
    (tmp_path / "crc.gz").write_bytes(bytes(bad_crc))
    _expect_error(tmp_path / "crc.gz", "corrupt gzip")

    (tmp_path / "cut.gz").write_bytes(good[: len(good) // 2])
    _expect_error(tmp_path / "cut.gz", "corrupt gzip")


def test_missing_file(tmp_path):
    _expect_error(tmp_path / "nope.gz", "no such file")
