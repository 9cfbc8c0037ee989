"""The device steps as plain data: an embedding step (one vector a sequence), a token step (every
token's state or score), a prefill step and a decode step.

Schedulers plan them, the model runner runs them. Each has an empty form (padding only, of a given
shape: what warm-up compiles) and a message form (a kind, named host arrays and static ints: what
a multi-host leader sends its followers, who rebuild the same step with `from_message`).
Arrays are int32 unless noted; B rows, T tokens a row.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np

from jaxembed import grammar, sampling

Message = tuple[str, dict[str, Any], dict[str, int]]


def _padding_rows(n: int, vocab_size: int | None = None) -> dict[str, np.ndarray]:
    """Sampling settings of padding rows (greedy, no penalties); with a vocabulary size, a mask
    allowing every token too."""
    mask = None if vocab_size is None else grammar.full_mask(n, vocab_size)
    return sampling.row_arrays([None] * n, mask)


class _Packed:
    """What the packed steps (EmbedStep, TokenStep) share: rows of several sequences."""

    INPUTS: ClassVar[tuple[str, ...]]
    tokens: np.ndarray
    segment_ids: np.ndarray

    @property
    def real_tokens(self) -> int:
        return int((self.segment_ids > 0).sum())

    @property
    def padded_tokens(self) -> int:
        return int(self.tokens.size)

    def inputs(self) -> tuple[np.ndarray, ...]:
        """The arrays the compiled step takes, in its order."""
        return tuple(getattr(self, k) for k in self.INPUTS)


@dataclasses.dataclass(frozen=True)
class EmbedStep(_Packed):
    """Packed sequences [B, T] run through the model and pooled; several may share a row. Each
    sequence is pooled as its request asks, on the device: one vector a sequence comes back."""

    KIND: ClassVar[str] = "embed"
    INPUTS: ClassVar[tuple[str, ...]] = ("tokens", "positions", "segment_ids", "seq_index",
                                         "pick_index")
    tokens: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray  # 0 is padding; 1, 2, ... the sequences of a row
    # Which planned sequence each token is pooled into; `slots` (the padding slot) for padding
    # and for the leading tokens a sequence leaves out of its mean (a prompt), which still attend.
    seq_index: np.ndarray
    # [slots] per sequence, the flat index (row * length + col) of the one token it is pooled
    # as (its last, or its first pooled one), or -1: the mean of its pooled tokens.
    pick_index: np.ndarray
    # The planner's record of each sequence's last and first pooled token ([slots]; host only).
    last_index: np.ndarray | None = None
    first_index: np.ndarray | None = None
    sequences: tuple[int, ...] = ()  # the caller's ids of the sequences, in slot order

    @classmethod
    def empty(cls, rows: int, length: int, slots: int) -> EmbedStep:
        zeros = np.zeros((rows, length), np.int32)
        return cls(zeros, zeros, zeros, np.full((rows, length), slots, np.int32),
                   np.full(slots, -1, np.int32))


    def message(self) -> Message:
        return self.KIND, {k: getattr(self, k) for k in self.INPUTS}, {}

    @classmethod
    def from_message(cls, arrays: dict[str, Any], static: dict[str, int]) -> EmbedStep:
        return cls(**{k: arrays[k] for k in cls.INPUTS})


@dataclasses.dataclass(frozen=True)
class TokenStep(_Packed):
    """Packed sequences [B, T] run through the model with every token's result coming back: its
    final hidden state, float32 [B, T, D] (`score` 0), or (`score` 1) the log-probability of
    `targets` (the token after it in its sequence) and the most likely next tokens: float32
    [B, T], int32 [B, T, K], float32 [B, T, K]. Packed as an EmbedStep is."""

    KIND: ClassVar[str] = "tokens"
    INPUTS: ClassVar[tuple[str, ...]] = ("tokens", "positions", "segment_ids", "targets")
    tokens: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray
    targets: np.ndarray  # the next token in the same sequence; 0 after a sequence's last
    score: int
    # Host only, per sequence in slot order: the flat index (row * T + col) of its first
    # returned token and how many it has.
    spans: tuple[tuple[int, int], ...] = ()
    sequences: tuple[int, ...] = ()

    @classmethod
    def empty(cls, rows: int, length: int, score: int) -> TokenStep:
        zeros = np.zeros((rows, length), np.int32)
        return cls(zeros, zeros, zeros, zeros, score)


    def message(self) -> Message:
        return self.KIND, {k: getattr(self, k) for k in self.INPUTS}, {"score": self.score}

    @classmethod
    def from_message(cls, arrays: dict[str, Any], static: dict[str, int]) -> TokenStep:
        return cls(**{k: arrays[k] for k in cls.INPUTS}, score=static["score"])


@dataclasses.dataclass(frozen=True)
class PrefillStep:
    """One prompt per row [B, T], its keys and values written to cache slot `slots[r]` from
    position 0, and a first token sampled for each row. Its rows always carry a token mask
    (`sampling.row_arrays`): a prompt under a grammar draws its first token here, and one
    compiled program serves both kinds (the mask costs little beside a prompt's forward)."""

    KIND: ClassVar[str] = "prefill"
    tokens: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray  # 1 for the prompt, 0 for padding
    slots: np.ndarray  # [B] cache slots; padding rows write to the scratch slot
    last_col: np.ndarray  # [B] the column of each row's last prompt token
    rows: dict[str, np.ndarray]  # per-row sampling settings (`sampling.row_arrays`)

    @classmethod
    def empty(cls, rows: int, length: int, scratch_slot: int, vocab_size: int) -> PrefillStep:
        z = np.zeros((rows, length), np.int32)
        return cls(z, z, z, np.full(rows, scratch_slot, np.int32), np.zeros(rows, np.int32),
                   _padding_rows(rows, vocab_size))

    def message(self) -> Message:
        return self.KIND, {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, {}

    @classmethod
    def from_message(cls, arrays: dict[str, Any], static: dict[str, int]) -> PrefillStep:
        return cls(**arrays)


@dataclasses.dataclass(frozen=True)
class DecodeStep:
    """A token for each of B running sequences, attending over its slot's first `kv_len`
    positions (a compile-time size). `tokens` is host data, or on the device: the output of the
    step before, not read back yet (see `GenerationScheduler.may_run_ahead`)."""

    KIND: ClassVar[str] = "decode"
    tokens: Any  # [B]
    positions: np.ndarray  # [B] where each token goes in its slot
    slots: np.ndarray  # [B]; padding rows write to the scratch slot
    rows: dict[str, np.ndarray]
    kv_len: int

    @classmethod
    def empty(cls, rows: int, kv_len: int, scratch_slot: int) -> DecodeStep:
        z = np.zeros(rows, np.int32)
        return cls(z, z, np.full(rows, scratch_slot, np.int32), _padding_rows(rows), kv_len)

    def message(self) -> Message:
        return self.KIND, {"tokens": np.asarray(self.tokens), "positions": self.positions,
                           "slots": self.slots, "rows": self.rows}, {"kv_len": self.kv_len}

    @classmethod
    def from_message(cls, arrays: dict[str, Any], static: dict[str, int]) -> DecodeStep:
        return cls(arrays["tokens"], arrays["positions"], arrays["slots"], arrays["rows"],
                   static["kv_len"])


Step = EmbedStep | TokenStep | PrefillStep | DecodeStep
STEP_TYPES: dict[str, type[EmbedStep] | type[TokenStep] | type[PrefillStep] | type[DecodeStep]] = {
    t.KIND: t for t in (EmbedStep, TokenStep, PrefillStep, DecodeStep)}


def from_message(kind: str, arrays: dict[str, Any], static: dict[str, int]) -> Step:
    """The step a leader's message describes (arrays as `multihost.unflatten` gives them)."""
    if kind not in STEP_TYPES:
        raise ValueError(f"unknown step kind {kind!r}")
    return STEP_TYPES[kind].from_message(arrays, static)
