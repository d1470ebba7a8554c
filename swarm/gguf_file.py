"""A small GGUF reader and writer: validate files and cut them into shards byte-exactly.

The reader checks what llama.cpp would otherwise trip over (bad magic, unknown versions, counts and
strings that run past the end, tensor data beyond the file) so bad files fail here with a clear
message. The writer copies metadata entries verbatim unless told otherwise, so a shard keeps every
value with its original type, and writes in a fixed order so the same input gives the same bytes.
"""

from __future__ import annotations

import functools
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Sequence

import numpy as np

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from .errors import ModelFileError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
_MAX_COUNT = 1 << 24  # far beyond any real model's tensor or metadata count
_MAX_ARRAY = 1 << 24  # items in one metadata array (vocabularies hold a few hundred thousand)
_MAX_NAME = 1 << 16  # bytes of a metadata key or tensor name (ggml's tensor names are at most 64)

# value type -> struct format of one scalar
_SCALAR = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}


@dataclass
class KV:
    """One metadata entry; `raw` is its exact encoding (key included) in the source file."""

    key: str
    vtype: GGUFValueType
    value: Any
    raw: bytes = b""
    item_type: GGUFValueType | None = None  # element type when vtype is ARRAY


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: ne[0] is the row length
    ggml_type: int
    offset: int  # relative to the data section
    nbytes: int

    @property
    def row_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(self.ggml_type)]
        return self.shape[0] // block * size


@dataclass
class GGUFFile:
    path: Path
    version: int
    kvs: dict[str, KV]
    tensors: list[TensorInfo]
    alignment: int
    data_start: int
    file_size: int = 0
    _by_name: dict[str, TensorInfo] = field(default_factory=dict, repr=False)

    def get(self, key: str, default: Any = None) -> Any:
        kv = self.kvs.get(key)
        return default if kv is None else kv.value

    @property
    def arch(self) -> str:
        return str(self.get("general.architecture", ""))

    def tensor(self, name: str) -> TensorInfo | None:
        if not self._by_name:
            self._by_name = {t.name: t for t in self.tensors}
        return self._by_name.get(name)


class _Cursor:
    """Bounds-checked reads from a memory map; every overrun becomes a ModelFileError."""

    def __init__(self, buf: mmap.mmap | bytes, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.buf):
            raise ModelFileError(
                f"{self.path} is truncated or corrupt: a header field at byte {self.pos} runs past the "
                f"end of the file ({len(self.buf)} bytes); download or copy the file again"
            )
        out = self.buf[self.pos:end]
        self.pos = end
        return out

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self, limit: int | None = None) -> str:
        at = self.pos
        n = self.unpack("<Q")
        if limit is not None and n > limit:
            raise ModelFileError(f"{self.path} is corrupt: a name at byte {at} claims {n} bytes (names are at most "
                                 f"{limit}); download or copy the file again")
        raw = self.take(n)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            # Some vocabularies hold invalid UTF-8 pieces; keep them readable, the raw bytes are kept anyway.
            return raw.decode("utf-8", errors="surrogateescape")

    def _strings(self, count: int) -> "StringArray":
        buf, pos, end = self.buf, self.pos, len(self.buf)
        first = pos
        self._fits(count, 8)  # every string has its 8-byte length at least: checked before the index is made
        starts = np.empty(count, dtype=np.int64)
        unpack_len = struct.Struct("<Q").unpack_from
        for i in range(count):
            if pos + 8 > end:
                self.pos = pos
                self.take(8)  # raises the truncation error
            (n,) = unpack_len(buf, pos)
            pos += 8
            if pos + n > end:
                self.pos = pos
                self.take(n)
            starts[i] = pos - first
            pos += n
        self.pos = pos
        return StringArray(bytes(buf[first:pos]), starts)

    def _fits(self, count: int, item_size: int) -> None:
        """Refuse an array whose declared count cannot be there: more items than the bytes left hold (at
        `item_size` bytes each at least), or more than any model has; checked before anything is sized by it."""
        left = len(self.buf) - self.pos
        if count * item_size > left:
            more_than = f"the {left} bytes left in the file hold"
        elif count > _MAX_ARRAY:
            more_than = "any model has"
        else:
            return
        raise ModelFileError(f"{self.path} is truncated or corrupt: an array at byte {self.pos} claims {count} items, "
                             f"more than {more_than}; download or copy the file again")

    def value(self, vtype: GGUFValueType) -> tuple[Any, GGUFValueType | None]:
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype]), None
        if vtype == GGUFValueType.STRING:
            return self.string(), None
        if vtype == GGUFValueType.ARRAY:
            item = _value_type(self.unpack("<I"), self.path)
            if item == GGUFValueType.ARRAY:
                raise ModelFileError(f"{self.path} is corrupt or unsupported: it nests arrays in its metadata")
            count = self.unpack("<Q")
            if item in _SCALAR:
                fmt = _SCALAR[item]
                size = struct.calcsize(fmt)
                self._fits(count, size)
                raw = self.take(size * count)
                return list(struct.unpack(f"<{count}{fmt[1]}", raw)), item
            if item == GGUFValueType.STRING:  # vocabularies: hundreds of thousands of strings
                return self._strings(count), item
            return [self.value(item)[0] for _ in range(count)], item
        raise ModelFileError(f"{self.path} is corrupt: unknown metadata value type {vtype}")


class StringArray(Sequence):
    """A metadata string array kept in its encoded form; items are decoded when read.

    Vocabularies hold hundreds of thousands of strings; as Python objects they would cost tens of
    megabytes per parsed header.
    """

    def __init__(self, raw: bytes, starts: np.ndarray):
        self._raw, self._starts = raw, starts

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        start = int(self._starts[i])
        (n,) = struct.unpack_from("<Q", self._raw, start - 8)
        return self._raw[start:start + n].decode("utf-8", errors="surrogateescape")


def _value_type(code: int, path: Path) -> GGUFValueType:
    try:
        return GGUFValueType(code)
    except ValueError:
        raise ModelFileError(f"{path} is corrupt: unknown metadata value type {code}") from None


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse and validate a GGUF file's header; tensor data is checked for extent, not read.

    Results are remembered per (path, size, mtime): treat the returned object as read-only.
    """
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ModelFileError(f"model file {path} does not exist") from None
    except OSError as e:
        raise ModelFileError(f"cannot open model file {path}: {e.strerror}") from None
    return _read_cached(path.resolve(), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _read_cached(path: Path, _size: int, _mtime_ns: int) -> GGUFFile:
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ModelFileError(f"cannot open model file {path}: {e.strerror}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise ModelFileError(f"{path} is not a GGUF model: it is only {size} bytes long")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(_Cursor(buf, path), path, size)


def parse_gguf_header(buf: bytes, path: Path, size: int) -> GGUFFile:
    """Parse a GGUF header from its first bytes (`size`: the whole file's length); ModelFileError if too few."""
    return _parse(_Cursor(buf, path), path, size)


def _parse(cur: _Cursor, path: Path, size: int) -> GGUFFile:
    if cur.take(4) != MAGIC:
        raise ModelFileError(f"{path} is not a GGUF model (wrong magic bytes); llama.cpp needs a .gguf file")
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise ModelFileError(f"{path} is GGUF version {version}; only versions 2 and 3 are supported")
    n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
    if n_tensors > _MAX_COUNT or n_kv > _MAX_COUNT:
        raise ModelFileError(f"{path} is corrupt: it claims {n_tensors} tensors and {n_kv} metadata entries")

    kvs: dict[str, KV] = {}
    for _ in range(n_kv):
        start = cur.pos
        key = cur.string(_MAX_NAME)
        vtype = _value_type(cur.unpack("<I"), path)
        value, item = cur.value(vtype)
        kvs[key] = KV(key, vtype, value, bytes(cur.buf[start:cur.pos]), item)

    tensors = []
    for _ in range(n_tensors):
        name = cur.string(_MAX_NAME)
        n_dims = cur.unpack("<I")
        if not 1 <= n_dims <= 4:
            raise ModelFileError(f"{path} is corrupt: tensor {name!r} has {n_dims} dimensions")
        shape = tuple(cur.unpack("<Q") for _ in range(n_dims))
        gtype = cur.unpack("<I")
        offset = cur.unpack("<Q")
        try:
            block, tsize = GGML_QUANT_SIZES[GGMLQuantizationType(gtype)]
        except (ValueError, KeyError):
            raise ModelFileError(f"{path} is corrupt: tensor {name!r} has unknown type {gtype}") from None
        n_el = 1
        for d in shape:
            n_el *= d
        if shape[0] % block:
            raise ModelFileError(f"{path} is corrupt: tensor {name!r} rows are not whole blocks")
        tensors.append(TensorInfo(name, shape, gtype, offset, n_el // block * tsize))

    alignment = kvs["general.alignment"].value if "general.alignment" in kvs else DEFAULT_ALIGNMENT
    if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
        raise ModelFileError(f"{path} is corrupt: general.alignment {alignment} is not a power of two")
    data_start = _align(cur.pos, alignment)
    for t in tensors:
        end = data_start + t.offset + t.nbytes
        if end > size:
            raise ModelFileError(
                f"{path} is truncated: tensor {t.name!r} ends at byte {end} but the file has {size} bytes; "
                "the download or copy was cut short, fetch the file again"
            )
    return GGUFFile(path, version, kvs, tensors, alignment, data_start, size)


def _align(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


# ---------------------------------------------------------------- writing


def encode_kv(key: str, vtype: GGUFValueType, value: Any, item_type: GGUFValueType | None = None) -> bytes:
    """Encode one metadata entry (key included)."""
    return _enc_str(key) + struct.pack("<I", vtype) + _enc_value(vtype, value, item_type)


def _enc_str(s: str) -> bytes:
    raw = s.encode("utf-8", errors="surrogateescape")
    return struct.pack("<Q", len(raw)) + raw


def _enc_value(vtype: GGUFValueType, value: Any, item_type: GGUFValueType | None) -> bytes:
    if vtype in _SCALAR:
        return struct.pack(_SCALAR[vtype], value)
    if vtype == GGUFValueType.STRING:
        return _enc_str(value)
    if vtype == GGUFValueType.ARRAY:
        assert item_type is not None
        head = struct.pack("<IQ", item_type, len(value))
        return head + b"".join(_enc_value(item_type, v, None) for v in value)
    raise ValueError(f"cannot encode GGUF value type {vtype}")


@dataclass
class TensorSource:
    """A tensor to write: its header fields and where its bytes come from in a source file."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    src_offset: int  # absolute offset in the source file
    nbytes: int


def gguf_layout(
    kv_blobs: Iterable[bytes], tensors: list[TensorSource], alignment: int = DEFAULT_ALIGNMENT
) -> list[bytes | TensorSource]:
    """A GGUF v3 file as the pieces written in order: literal bytes, and tensors whose bytes come from a source."""
    kv_blobs = list(kv_blobs)
    head = bytearray(MAGIC + struct.pack("<IQQ", 3, len(tensors), len(kv_blobs)))
    for blob in kv_blobs:
        head += blob
    offset = 0
    for t in tensors:
        head += _enc_str(t.name) + struct.pack("<I", len(t.shape))
        head += struct.pack(f"<{len(t.shape)}Q", *t.shape)
        head += struct.pack("<IQ", t.ggml_type, offset)
        offset = _align(offset + t.nbytes, alignment)
    head += b"\0" * (_align(len(head), alignment) - len(head))
    pieces: list[bytes | TensorSource] = [bytes(head)]
    written = 0
    for t in tensors:
        pieces.append(t)
        written += t.nbytes
        pad = _align(written, alignment) - written
        if pad:
            pieces.append(b"\0" * pad)
        written += pad
    return pieces


def write_gguf(
    out: BinaryIO,
    source: BinaryIO,
    kv_blobs: Iterable[bytes],
    tensors: list[TensorSource],
    alignment: int = DEFAULT_ALIGNMENT,
) -> None:
    """Write a GGUF v3 file: metadata blobs as given, tensors copied from `source`."""
    for piece in gguf_layout(kv_blobs, tensors, alignment):
        if isinstance(piece, bytes):
            out.write(piece)
            continue
        source.seek(piece.src_offset)
        left = piece.nbytes
        while left:
            chunk = source.read(min(left, 16 << 20))
            if not chunk:
                raise ModelFileError(f"source file ended while copying tensor {piece.name!r}")
            out.write(chunk)
            left -= len(chunk)
