"""IDX files (the MNIST format), raw or gzip-compressed.

Layout (http://yann.lecun.com/exdb/mnist/): four magic bytes 0x00 0x00 <dtype code> <ndim>, then
ndim big-endian uint32 sizes, then the payload in row-major order, big-endian, nothing after it.
Every defect (wrong magic, unknown dtype code, short or over-long payload, broken gzip stream)
is a `DataError` whose one-line message starts with the file's path.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
import sys
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from gpuml.data.atomic import atomic_write
from gpuml.errors import DataError

#: IDX dtype code -> element type as stored (big-endian).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODE_FOR = {(dt.kind, dt.itemsize): code for code, dt in IDX_DTYPES.items()}
_KNOWN_CODES = ", ".join(f"0x{c:02x} {dt.name}" for c, dt in IDX_DTYPES.items())

GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """The array stored in an IDX file, in native byte order. Gzip is detected from the file's
    first bytes, not its name, so `x.gz` holding raw IDX (or the reverse) still reads."""
    path = Path(path)
    try:
        raw = open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot open ({exc.strerror or exc})") from None
    with raw:
        compressed = raw.read(2) == GZIP_MAGIC
        raw.seek(0)
        if not compressed:
            return _read_stream(raw, path, os.fstat(raw.fileno()).st_size)
        try:
            with gzip.GzipFile(fileobj=raw, mode="rb") as f:
                return _read_stream(f, path, None)
        except (OSError, EOFError, zlib.error) as exc:
            # BadGzipFile (an OSError) covers bad headers and CRC/length mismatches, EOFError a
            # stream cut short, zlib.error corrupt deflate data.
            raise DataError(f"{path}: corrupt gzip stream ({exc})") from None


def _read_stream(f: BinaryIO, path: Path, file_size: int | None) -> np.ndarray:
    """Parse one IDX stream; `file_size` (raw files only) allows size checks before allocating."""
    magic = _read_upto(f, 4)
    if len(magic) < 4:
        raise DataError(f"{path}: truncated IDX file: {len(magic)} bytes, shorter than the 4-byte magic")
    if magic[0] != 0 or magic[1] != 0:
        raise DataError(
            f"{path}: not an IDX file: magic bytes {magic.hex(' ')}, expected 00 00 <dtype> <ndim>"
        )
    code, ndim = magic[2], magic[3]
    if code not in IDX_DTYPES:
        raise DataError(f"{path}: unknown IDX dtype code 0x{code:02x} (known: {_KNOWN_CODES})")
    if ndim == 0:
        raise DataError(f"{path}: IDX header declares 0 dimensions")
    dims = _read_upto(f, 4 * ndim)
    if len(dims) < 4 * ndim:
        raise DataError(f"{path}: truncated IDX file: header declares {ndim} dimensions but ends early")
    shape = struct.unpack(f">{ndim}I", dims)
    dtype = IDX_DTYPES[code]
    nbytes = math.prod(shape) * dtype.itemsize
    what = f"shape {shape} {dtype.name} = {nbytes} payload bytes"

    if file_size is not None:
        have = file_size - 4 - 4 * ndim
        if have < nbytes:
            raise DataError(f"{path}: truncated IDX file: header declares {what}, file holds {have}")
        if have > nbytes:
            raise DataError(f"{path}: {have - nbytes} trailing bytes after the IDX payload ({what})")
    try:
        out = np.empty(shape, dtype=dtype)
    except (MemoryError, ValueError):
        raise DataError(f"{path}: IDX header declares {what}, too large to load") from None

    buf = memoryview(out.reshape(-1).view(np.uint8))
    got = 0
    while got < nbytes:
        n = f.readinto(buf[got:])
        if not n:
            break
        got += n
    if got < nbytes:
        raise DataError(f"{path}: truncated IDX file: header declares {what}, file holds {got}")
    extra = 0
    while chunk := f.read(_CHUNK):
        extra += len(chunk)
    if extra:
        raise DataError(f"{path}: {extra} trailing bytes after the IDX payload ({what})")

    if dtype.byteorder == ">" and sys.byteorder == "little":
        out.byteswap(inplace=True)
        out = out.view(dtype.newbyteorder("="))
    return out


def _read_upto(f: BinaryIO, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        b = f.read(n - got)
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def _encode(array: np.ndarray) -> tuple[bytes, np.ndarray]:
    """(header, big-endian C-contiguous payload) of `array` in IDX form."""
    arr = np.asarray(array)
    code = _CODE_FOR.get((arr.dtype.kind, arr.dtype.itemsize))
    if code is None:
        raise ValueError(
            f"IDX cannot store dtype {arr.dtype}; cast to one of {_KNOWN_CODES} "
            "(labels usually as uint8)"
        )
    if not 1 <= arr.ndim <= 255:
        raise ValueError(f"IDX stores 1 to 255 dimensions, got an array of shape {arr.shape}")
    if any(d >= 2**32 for d in arr.shape):
        raise ValueError(f"IDX dimensions must be below 2**32, got shape {arr.shape}")
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload = np.ascontiguousarray(arr, dtype=IDX_DTYPES[code])
    return header, payload


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    """Write `array` as an IDX file, gzip-compressed when `path` ends in `.gz` (with a fixed
    mtime and no stored name, so equal arrays give byte-identical files). The file appears
    under its name only once complete. Returns the path."""
    path = Path(path)
    header, payload = _encode(array)
    with atomic_write(path) as f:
        if path.suffix == ".gz":
            with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=6) as gz:
                gz.write(header)
                gz.write(memoryview(payload.reshape(-1).view(np.uint8)))
        else:
            f.write(header)
            f.write(memoryview(payload.reshape(-1).view(np.uint8)))
    return path


def idx_sha256(array: np.ndarray) -> str:
    """sha256 of the uncompressed IDX encoding of `array`: equal to the sha256 of a raw file
    that `read_idx` returned it from, however that file was compressed."""
    header, payload = _encode(array)
    h = hashlib.sha256(header)
    h.update(memoryview(payload.reshape(-1).view(np.uint8)))
    return h.hexdigest()
