"""A memory-mapped reader of the safetensors format (https://huggingface.co/docs/safetensors).

Layout: 8-byte little-endian header length N, N bytes of UTF-8 JSON mapping tensor names to
{"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the byte after the header)
plus an optional "__metadata__" object, then the data. Tensors are returned as read-only NumPy
views of the mapping (no copy) after every entry has been checked against the file size.
"""
from __future__ import annotations

import json
import mmap
import os
import struct

import numpy as np

from .errors import WeightsError

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bits; converted by to_float32
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    def __init__(self, path: str):
        self.path = path
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise WeightsError(f"{path}: file not found") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise WeightsError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > _MAX_HEADER or 8 + n > size:
                raise WeightsError(f"{path}: header length {n} does not fit the file ({size} bytes)")
            try:
                header = json.loads(f.read(n).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise WeightsError(f"{path}: header is not valid JSON ({e})") from None
            if not isinstance(header, dict):
                raise WeightsError(f"{path}: header is not a JSON object")
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else None
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        data_len = size - self._data_start
        self._entries = {}
        for name, info in header.items():
            def ints(value):
                if not isinstance(value, list) or not all(
                        isinstance(v, int) and not isinstance(v, bool) for v in value):
                    raise TypeError
                return tuple(value)
            try:
                kind = info["dtype"]
                shape = ints(info["shape"])
                begin, end = ints(info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise WeightsError(f"{path}: tensor {name!r} has a malformed header entry {info!r} "
                                   f"(needs dtype, an integer shape list and two integer "
                                   f"data_offsets)") from None
            if kind not in _DTYPES:
                raise WeightsError(f"{path}: tensor {name!r} has unsupported dtype {kind!r} "
                                   f"(supported: {', '.join(_DTYPES)})")
            dtype = _DTYPES[kind]
            if any(s < 0 for s in shape):
                raise WeightsError(f"{path}: tensor {name!r} has a negative dimension {shape}")
            expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if not 0 <= begin <= end <= data_len:
                raise WeightsError(f"{path}: tensor {name!r} data_offsets [{begin}, {end}] lie "
                                   f"outside the {data_len} data bytes of the file")
            if end - begin != expected:
                raise WeightsError(f"{path}: tensor {name!r} has {end - begin} bytes but shape "
                                   f"{list(shape)} of {info['dtype']} needs {expected}")
            self._entries[name] = (info["dtype"], dtype, shape, begin, end)

    def keys(self):
        return self._entries.keys()

    def __contains__(self, name):
        return name in self._entries

    def dtype_name(self, name: str) -> str:
        return self._entries[name][0]

    def shape(self, name: str) -> tuple:
        return self._entries[name][2]

    def raw(self, name: str) -> np.ndarray:
        """Read-only view of the tensor's stored values (BF16 as uint16 bits)."""
        _, dtype, shape, begin, end = self._entries[name]
        if end == begin:
            return np.zeros(shape, dtype)
        return np.frombuffer(self._mm, dtype=dtype, count=(end - begin) // dtype.itemsize,
                             offset=self._data_start + begin).reshape(shape)

    def to_float32(self, name: str) -> np.ndarray:
        """F32 tensors as a zero-copy view; F16 / BF16 / F64 converted to a new float32 array."""
        kind = self._entries[name][0]
        arr = self.raw(name)
        if kind == "F32":
            return arr
        if kind in ("F16", "F64"):
            return arr.astype(np.float32)
        if kind == "BF16":
            return (arr.astype(np.uint32) << 16).view(np.float32)
        raise WeightsError(f"{self.path}: tensor {name!r} has dtype {kind}, expected F32, F16 or BF16")

    def release(self, name: str) -> None:
        """Drop the tensor's pages from this process's resident set (after it was copied)."""
        if self._mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        _, _, _, begin, end = self._entries[name]
        page = mmap.PAGESIZE
        start = (self._data_start + begin + page - 1) // page * page
        stop = (self._data_start + end) // page * page
        if stop > start:
            self._mm.madvise(mmap.MADV_DONTNEED, start, stop - start)
