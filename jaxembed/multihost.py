"""Several hosts, one model: process 0 serves and plans each step; the others run the same step.

`jax.distributed.initialize` joins the processes into one runtime whose mesh spans the devices of
all of them. A jitted step over that mesh runs only when every process calls it, with the same
inputs, in the same order (multi-controller SPMD). The engine's steps are plain data (a kind, a few
named host arrays, a few static ints), so process 0, the leader, sends each one to the others, the
followers, before running it itself; a follower does nothing but receive steps and run them.

The transport is the runtime's own collective: `broadcast_one_to_all` of a fixed-size byte
buffer (one compiled shape; a longer step goes in several chunks). No other channel, port or
serializer is involved, and on a CPU the collectives are gloo over TCP.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import jax
import numpy as np

log = logging.getLogger("jaxembed.multihost")

CHUNK_BYTES = 1 << 16  # a decode step is ~1 KiB; a full prefill step of 8192 tokens ~200 KiB
_HEADER = 8  # per chunk: payload bytes (uint32), then 1 if more chunks follow (uint32)

# Step kinds besides the engine's own: `IDLE` keeps the followers' wait short while the leader
# has no work (a collective that waits for hours may hit a transport timeout); `STOP` ends them.
IDLE = "idle"
STOP = "stop"

Message = tuple[str, dict[str, np.ndarray], dict[str, int]]


def initialize(coordinator: str, num_processes: int, process_id: int) -> None:
    """Join the processes (the same call in each). The coordinator, HOST:PORT, is an address
    of process 0's host that the others reach; process 0 listens on it."""
    if num_processes < 2:
        raise ValueError(f"--num-processes must be at least 2 with --coordinator; got "
                         f"{num_processes}")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id must be between 0 and {num_processes - 1}; got "
                         f"{process_id}")
    # CPU collectives (tests, CPU clusters) go over gloo; accelerators use their own.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
    log.info("process %d of %d joined: %d local devices, %d in all", process_id, num_processes,
             jax.local_device_count(), jax.device_count())


def encode(kind: str, arrays: dict[str, np.ndarray], static: dict[str, int]) -> bytes:
    """A step as bytes: a JSON header (kind, static ints, each array's name, dtype and shape),
    then the arrays' raw bytes in that order."""
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    header = json.dumps({"kind": kind, "static": static,
                         "arrays": [[k, v.dtype.str, list(v.shape)] for k, v in arrays.items()]})
    head = header.encode()
    return b"".join([len(head).to_bytes(4, "little"), head,
                     *(v.tobytes() for v in arrays.values())])


def decode(data: bytes) -> Message:
    n = int.from_bytes(data[:4], "little")
    header = json.loads(data[4 : 4 + n])
    arrays, offset = {}, 4 + n
    for name, dtype, shape in header["arrays"]:
        dt = np.dtype(dtype)
        size = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        arrays[name] = np.frombuffer(data, dt, size // dt.itemsize, offset).reshape(shape).copy()
        offset += size
    return header["kind"], arrays, {k: int(v) for k, v in header["static"].items()}


def chunks(data: bytes) -> list[np.ndarray]:
    """Fixed-size buffers [CHUNK_BYTES + 8] uint8 carrying `data`, the last one flagged."""
    out = []
    for start in range(0, max(len(data), 1), CHUNK_BYTES):
        part = data[start : start + CHUNK_BYTES]
        buf = np.zeros(CHUNK_BYTES + _HEADER, np.uint8)
        more = start + CHUNK_BYTES < len(data)
        buf[:_HEADER] = np.frombuffer(np.array([len(part), more], "<u4").tobytes(), np.uint8)
        buf[_HEADER : _HEADER + len(part)] = np.frombuffer(part, np.uint8)
        out.append(buf)
    return out


def unchunk(buf: np.ndarray) -> tuple[bytes, bool]:
    """(payload, more follow) of one buffer."""
    n, more = np.frombuffer(buf[:_HEADER].tobytes(), "<u4")
    return buf[_HEADER : _HEADER + int(n)].tobytes(), bool(more)


class StepChannel:
    """Steps from the leader (process 0) to every follower. Both sides must call in lockstep:
    each `send` on the leader meets one `receive` on every follower."""

    def __init__(self) -> None:
        self.leader = jax.process_index() == 0

    def _broadcast(self, buf: np.ndarray) -> np.ndarray:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.broadcast_one_to_all(buf, is_source=self.leader))

    def send(self, kind: str, arrays: dict[str, np.ndarray] | None = None,
             static: dict[str, int] | None = None) -> None:
        assert self.leader, "only process 0 sends steps"
        for buf in chunks(encode(kind, arrays or {}, static or {})):
            self._broadcast(buf)

    def receive(self) -> Message:
        assert not self.leader, "process 0 sends steps; the others receive them"
        parts, more = [], True
        while more:
            part, more = unchunk(self._broadcast(np.zeros(CHUNK_BYTES + _HEADER, np.uint8)))
            parts.append(part)
        return decode(b"".join(parts))


def flatten(arrays: dict[str, Any]) -> dict[str, np.ndarray]:
    """One level of nesting ({"rows": {"seed": ...}}) as dotted names ("rows.seed")."""
    out = {}
    for k, v in arrays.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": np.asarray(vv) for kk, vv in v.items()})
        else:
            out[k] = np.asarray(v)
    return out


def unflatten(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in arrays.items():
        head, _, tail = k.partition(".")
        if tail:
            out.setdefault(head, {})[tail] = v
        else:
            out[k] = v
    return out
