"""A strict, zero-copy reader for `.safetensors` files.

The format is an 8-byte little-endian header length, a JSON header mapping tensor names to
`{"dtype", "shape", "data_offsets"}`, then the raw bytes. Reading it ourselves (over `np.memmap`)
lets every inconsistency be reported with the file and tensor named, and gives bfloat16 through
`ml_dtypes` where `safetensors.numpy` has none.
"""

from __future__ import annotations

import json
import math
import reprlib
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxembed.weights.errors import WeightLoadError

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}

MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsFile:
    """Tensors of one file as read-only numpy views, by name (`names()`, `get(name)`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:
            raise WeightLoadError(self.path, f"cannot open: {e}") from e
        size = self._mm.shape[0]
        if size < 8:
            raise WeightLoadError(self.path, "file is too short to be safetensors (truncated?)")
        header_len = int(np.frombuffer(self._mm[:8].tobytes(), dtype="<u8")[0])
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise WeightLoadError(
                self.path, f"header length {header_len} does not fit in a file of {size} bytes"
            )
        try:
            header = json.loads(bytes(self._mm[8 : 8 + header_len]))
        # ValueError: JSONDecodeError, and an integer of more digits than Python converts;
        # RecursionError: arrays nested thousands deep.
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise WeightLoadError(self.path, f"header is not valid JSON: {e}") from e
        if not isinstance(header, dict):
            raise WeightLoadError(self.path, "header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self._start = 8 + header_len
        self._data_size = size - self._start
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            self._entries[name] = self._check_entry(name, entry)
        self._check_layout()

    def _check_entry(self, name: str, entry: object) -> tuple[np.dtype, tuple[int, ...], int, int]:
        try:
            dtype_name, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (TypeError, KeyError, ValueError) as e:
            raise WeightLoadError(self.path, f"malformed header entry: {e}", name) from e
        # JSON gives strings, floats and booleans too, which int() would take or turn.
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise WeightLoadError(self.path, f"shape must be a list of non-negative integers; "
                                  f"got {reprlib.repr(shape)}", name)
        if not (_is_count(begin) and _is_count(end)):
            raise WeightLoadError(self.path, f"data_offsets must be two non-negative integers; "
                                  f"got {reprlib.repr([begin, end])}", name)
        shape = tuple(shape)
        dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        if dtype is None:
            raise WeightLoadError(self.path, f"unsupported dtype {reprlib.repr(dtype_name)}", name)
        if not _fits_numpy(shape, dtype.itemsize):
            raise WeightLoadError(self.path, f"shape {reprlib.repr(list(shape))} is too large "
                                  "for an array", name)
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected or begin < 0:
            raise WeightLoadError(
                self.path,
                f"data_offsets [{begin}, {end}) hold {end - begin} bytes, but {dtype_name}"
                f"{reprlib.repr(list(shape))} needs {expected}",
                name,
            )
        if end > self._data_size:
            raise WeightLoadError(
                self.path,
                f"data ends at byte {end} but the file has only {self._data_size} bytes of data "
                "(truncated file?)",
                name,
            )
        return dtype, shape, begin, end

    def _check_layout(self) -> None:
        """The tensors' byte ranges tile the data exactly, in some order, as the format's own
        reader requires: no range overlaps another (two tensors sharing bytes), none leaves a gap,
        and together they end where the file does."""
        at, previous = 0, None
        for name, (_, _, begin, end) in sorted(self._entries.items(),
                                               key=lambda kv: (kv[1][2], kv[1][3])):
            if begin != at:
                what = "overlaps" if begin < at else "leaves a gap after"
                raise WeightLoadError(
                    self.path, f"data_offsets [{begin}, {end}) {what} the tensor before it "
                    f"({previous!r}, ending at byte {at})", name)
            at, previous = end, name
        if at != self._data_size:
            raise WeightLoadError(self.path, f"the tensors' data ends at byte {at}, but the file "
                                  f"holds {self._data_size} bytes of data")

    def names(self) -> list[str]:
        return list(self._entries)

    def element_count(self) -> int:
        """How many values its tensors hold together."""
        return sum(math.prod(shape) for _, shape, _, _ in self._entries.values())

    def get(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self._entries[name]
        raw = self._mm[self._start + begin : self._start + end]
        return raw.view(dtype).reshape(shape)


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _fits_numpy(shape: tuple[int, ...], itemsize: int) -> bool:
    """Whether numpy can make an array of this shape: its non-zero dims and item size must
    multiply to an int64 (an empty array too: a zero does not make room for the other dims)."""
    return math.prod(d for d in shape if d) * itemsize < 2**63


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of an HF folder: one `model.safetensors`, or those a sharded index names."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightLoadError(index, f"not a valid safetensors index: {e}") from e
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (folder / f).is_file():
                raise WeightLoadError(folder / f, "named in the index but missing")
        return [folder / f for f in files]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    raise WeightLoadError(folder, "no model.safetensors or model.safetensors.index.json found")
