"""A strict, fast reader for GGUF files: metadata as a plain dict, tensors as zero-copy views.

Metadata values are Python scalars and strings, lists for arrays of strings or of arrays, and
read-only numpy arrays (views of the file) for arrays of numbers.

`gguf.GGUFReader` builds a Python object per array element, which takes seconds for a 49k-token
vocabulary. The format is simple enough to parse directly: numeric arrays become one
`np.frombuffer`, and strings are sliced out of one memory map.

Layout: magic "GGUF", version u32, tensor count u64, kv count u64; then key/value pairs; then tensor
infos (name, dims in GGML order, type, offset); then tensor data from an aligned start.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from jaxembed.weights.errors import WeightLoadError

_SCALARS: dict[int, tuple[str, int]] = {
    0: ("<u1", 1), 1: ("<i1", 1), 2: ("<u2", 2), 3: ("<i2", 2), 4: ("<u4", 4), 5: ("<i4", 4),
    6: ("<f4", 4), 7: ("?", 1), 10: ("<u8", 8), 11: ("<i8", 8), 12: ("<f8", 8),
}
_STRING, _ARRAY = 8, 9
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
# Arrays of arrays, at most this deep: the format allows nesting, no model uses more than a
# level, and a crafted file of thousands of levels would exhaust the interpreter's stack.
MAX_ARRAY_DEPTH = 4


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    name: str
    type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # row-major numpy order: the reverse of GGML's dims
    data: np.ndarray  # raw bytes (uint8), a view into the file


class GGUFFile:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:
            raise WeightLoadError(self.path, f"cannot open: {e}") from e
        self._buf = memoryview(self._mm)
        self._pos = 0
        try:
            self._parse()
        except (struct.error, IndexError, UnicodeDecodeError, ValueError, TypeError,
                OverflowError, RecursionError, MemoryError) as e:
            if isinstance(e, WeightLoadError):
                raise
            raise WeightLoadError(
                self.path, f"not a readable GGUF file (corrupt or truncated header near byte "
                f"{self._pos}: {e})") from e

    def release(self, tensor: GGUFTensor) -> None:
        """Drop a tensor's pages from this process's memory once it has been read (the file
        stays mapped; a later read faults them back in): a loader that repacks a model tensor by
        tensor then holds its result and a tensor's worth of the file, not the whole file too."""
        page = mmap.PAGESIZE
        begin = tensor.data.ctypes.data - self._mm.ctypes.data
        lo, hi = -(-begin // page) * page, (begin + tensor.data.nbytes) // page * page
        if hi > lo and hasattr(self._mm._mmap, "madvise"):  # type: ignore[attr-defined]
            self._mm._mmap.madvise(mmap.MADV_DONTNEED, lo, hi - lo)  # type: ignore[attr-defined]

    # ---- primitive reads -----------------------------------------------------------------

    def _read(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self._buf, self._pos)[0]
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._read("<Q")
        if self._pos + n > len(self._buf):
            raise ValueError(f"string of {n} bytes runs past the end of the file")
        # Leniently: a vocabulary entry holding part of a multi-byte character must not make the
        # whole file unreadable.
        s = bytes(self._buf[self._pos : self._pos + n]).decode("utf-8", errors="replace")
        self._pos += n
        return s

    def _strings(self, count: int, key: str) -> list[str]:
        """An array of strings (a vocabulary: 50k-260k entries), read in one tight loop: the
        general per-value path costs about half a second per 100k strings."""
        buf, pos, end, out = self._buf, self._pos, len(self._buf), []
        length = struct.Struct("<Q").unpack_from
        for _ in range(count):
            (n,) = length(buf, pos)
            pos += 8
            if pos + n > end:
                raise ValueError(f"string in {key!r} of {n} bytes runs past the end of the file")
            out.append(str(buf[pos : pos + n], "utf-8", "replace"))  # leniently, as _string
            pos += n
        self._pos = pos
        return out

    def _value(self, vtype: int, key: str, depth: int = 0) -> Any:
        if vtype == _STRING:
            return self._string()
        if vtype in _SCALARS:
            fmt, size = _SCALARS[vtype]
            value = np.frombuffer(self._buf, fmt, 1, self._pos)[0].item()
            self._pos += size
            return value
        if vtype == _ARRAY:
            etype, count = self._read("<I"), self._read("<Q")
            if etype in _SCALARS:
                fmt, size = _SCALARS[etype]
                if self._pos + count * size > len(self._buf):
                    raise ValueError(f"array {key!r} runs past the end of the file")
                # A read-only view of the file, not a list: a list costs a Python object per
                # element, 8-10 times the array's own bytes for a count the file chooses.
                arr = np.frombuffer(self._buf, fmt, count, self._pos)
                self._pos += count * size
                return arr
            if etype == _STRING:
                return self._strings(count, key)
            if etype != _ARRAY or depth + 1 >= MAX_ARRAY_DEPTH:
                what = f"arrays nested over {MAX_ARRAY_DEPTH} deep" if etype == _ARRAY \
                    else f"unknown value type {etype}"
                raise WeightLoadError(self.path, f"metadata key {key!r} holds an array of {what}")
            # Each nested array takes 12 bytes of header at least: a count past what the rest of
            # the file could hold is a lie, refused before looping over it.
            if count * 12 > len(self._buf) - self._pos:
                raise ValueError(f"array {key!r} of {count} arrays runs past the end of the file")
            return [self._value(etype, key, depth + 1) for _ in range(count)]
        raise WeightLoadError(self.path, f"metadata key {key!r} has unknown value type {vtype}")

    # ---- the file ------------------------------------------------------------------------

    def _parse(self) -> None:
        if bytes(self._buf[:4]) != b"GGUF":
            raise WeightLoadError(self.path, "not a GGUF file (bad magic bytes)")
        self._pos = 4
        self.version = self._read("<I")
        if self.version not in (2, 3):
            raise WeightLoadError(self.path, f"unsupported GGUF version {self.version}")
        n_tensors, n_kv = self._read("<Q"), self._read("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._read("<I"), key)
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._read("<I")
            if n_dims > MAX_DIMS:
                raise WeightLoadError(self.path, f"{n_dims} dimensions; GGML tensors have at "
                                      f"most {MAX_DIMS}", name)
            dims = [self._read("<Q") for _ in range(n_dims)]
            infos.append((name, dims, self._read("<I"), self._read("<Q")))
        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        # llama.cpp takes a power of two only (ggml's alignment rounding needs one).
        if isinstance(align, bool) or not isinstance(align, int) or align <= 0 \
                or align & (align - 1):
            raise WeightLoadError(self.path, f"general.alignment must be a positive power of two; "
                                  f"got {align!r}")
        start = -(-self._pos // align) * align
        self.tensors: dict[str, GGUFTensor] = {}
        for name, dims, raw_type, offset in infos:
            self.tensors[name] = self._tensor(name, dims, raw_type, start + offset)

    def _tensor(self, name: str, dims: list[int], raw_type: int, begin: int) -> GGUFTensor:
        if name in self.tensors:
            raise WeightLoadError(self.path, "appears twice", name)
        try:
            qtype = gguf.GGMLQuantizationType(raw_type)
        except ValueError:
            raise WeightLoadError(self.path, f"unknown GGML type id {raw_type}", name) from None
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n = math.prod(dims)
        if n % block:
            raise WeightLoadError(self.path, f"{n} elements is not a whole number of "
                                  f"{qtype.name} blocks of {block}", name)
        end = begin + n // block * type_size
        if end > len(self._mm):
            raise WeightLoadError(
                self.path, f"data ends at byte {end} but the file has {len(self._mm)} bytes "
                "(truncated file?)", name)
        return GGUFTensor(name, qtype, tuple(reversed(dims)), self._mm[begin:end])
