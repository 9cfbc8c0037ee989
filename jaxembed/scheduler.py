"""Plan embedding steps: pack sequences into a small bounded set of (rows x length) shapes.

Everything here is plain data and pure functions, so a step can be logged, tested, or broadcast to
other hosts as-is. A step holds several sequences per row ("packing"): segment ids keep them apart
in attention, and positions restart per sequence, so packing never changes a result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxembed.protocol import EmbeddingType
from jaxembed.steps import EmbedStep, TokenStep

# Sequences per row are capped so that the per-step pooling outputs have a static size.
MAX_SEQS_PER_ROW = 64
MIN_LENGTH_BUCKET = 16
# The coarse ladder's shortest row, and its step: lengths 512, 2048, 8192, ..., and step sizes
# (rows x length) of 512, 2048, 8192, ... tokens, up to the budget (see `Buckets.coarse`).
COARSE_BASE = 512
COARSE_STEP = 4
FINE = "fine"
COARSE = "coarse"
LADDERS = (FINE, COARSE)


@dataclasses.dataclass(frozen=True)
class Buckets:
    """The shapes a step may take: row lengths, and row counts under a token budget.

    Two ladders. The fine one (`build`, a CPU's) has many shapes, each compiled when a step
    first needs it: lengths double from 16, and rows take 1, 2, 3, 4, 6, 8, 12, ... under the
    budget, so that little of a step is padding (a CPU pays for every padded token). The coarse
    one (`coarse`, an accelerator's) has a few shapes, all compiled at start-up."""

    lengths: tuple[int, ...]
    max_batch_tokens: int
    # The row counts each length takes, in `lengths`' order (the coarse ladder); empty: every
    # `row_buckets` count under the budget (the fine ladder).
    rows: tuple[tuple[int, ...], ...] = ()

    @classmethod
    def build(cls, max_model_len: int, max_batch_tokens: int) -> Buckets:
        """The fine ladder."""
        lengths = []
        n = MIN_LENGTH_BUCKET
        while n < max_model_len:
            lengths.append(n)
            n *= 2
        lengths.append(max_model_len)
        return cls(tuple(lengths), max_batch_tokens)

    @classmethod
    def coarse(cls, max_model_len: int, max_batch_tokens: int) -> Buckets:
        """The coarse ladder: rows of 512, 2048, 8192, ... tokens (4x apart, up to the context,
        and the context itself), and at each length the row counts that make steps of 512,
        2048, 8192, ... tokens (4x apart) and of the whole budget. With a 16k budget and an 8k
        context that is 9 shapes: (1, 4, 16, 32) x 512, (1, 4, 8) x 2048, (1, 2) x 8192; 9 at
        a 32k budget too, 6 at 8k.

        Why so few: packing puts many short texts in one row (up to MAX_SEQS_PER_ROW), so a
        row's length only bounds the longest text of a step, and under load the room a long
        text leaves in its row is filled by short ones: few lengths waste little. And an
        accelerator's step is bound by reading the weights, not by its arithmetic, up to a
        few hundred tokens (an H100 does about 300 bf16 flops for each byte it reads, and a
        step does one flop per byte of bf16 weights for each token): a 512-token step costs
        about what a 16-token one does, so nothing shorter is worth a shape, and padding costs
        only past that. Rows 4x apart bound a partly filled step at 4x its tokens, and under load
        steps fill the largest. What a few shapes buy is that each is compiled (and
        cached on disk) before the server says ready, so steady serving never waits on the
        compiler, where the fine ladder's 91 shapes of an 8k budget and context can only be
        compiled as traffic first meets them."""
        lengths = []
        n = COARSE_BASE
        while n < max_model_len:
            lengths.append(n)
            n *= COARSE_STEP
        lengths.append(max_model_len)
        rows = []
        for length in lengths:
            top = max(1, max_batch_tokens // length)
            counts = {1, top}
            t = COARSE_BASE
            while t < max_batch_tokens:
                counts.add(min(max(1, t // length), top))
                t *= COARSE_STEP
            rows.append(tuple(sorted(counts)))
        return cls(tuple(lengths), max_batch_tokens, tuple(rows))

    @classmethod
    def for_plan(cls, plan: Any, ladder: str | None = None) -> Buckets:
        """The ladder named (FINE or COARSE), or by default the plan's: coarse on an
        accelerator, fine on a CPU."""
        check_ladder(ladder)
        coarse = ladder == COARSE if ladder is not None else plan.accelerated
        make = cls.coarse if coarse else cls.build
        return make(plan.max_model_len, plan.max_batch_tokens)

    @property
    def is_coarse(self) -> bool:
        """Whether every shape is few enough to be compiled at start-up."""
        return bool(self.rows)

    def length_for(self, n_tokens: int) -> int:
        for length in self.lengths:
            if length >= n_tokens:
                return length
        raise ValueError(f"{n_tokens} tokens exceed the longest bucket {self.lengths[-1]}")

    def max_rows(self, length: int) -> int:
        return max(1, self.max_batch_tokens // length)

    def row_counts(self, length: int) -> tuple[int, ...]:
        """The row counts a step of rows of `length` may take (one of `lengths`)."""
        if self.rows:
            return self.rows[self.lengths.index(length)]
        return tuple(row_buckets(self.max_rows(length)))

    def rows_for(self, n_rows: int, length: int) -> int:
        """The smallest row count of that length holding n_rows (fine: 1, 2, 3, 4, 6, 8, 12,
        ...), capped by budget."""
        counts = self.row_counts(length)
        return next((b for b in counts if b >= n_rows), counts[-1])

    def seq_slots(self, rows: int, length: int) -> int:
        return rows * min(length, MAX_SEQS_PER_ROW)

    def shapes(self) -> list[tuple[int, int]]:
        """Every (rows, length) a step can take."""
        return [(b, t) for t in self.lengths for b in self.row_counts(t)]


def check_ladder(ladder: str | None) -> None:
    """Refuse a ladder name other than FINE, COARSE or None (the plan's)."""
    if ladder not in (None, *LADDERS):
        raise ValueError(f"buckets must be one of {LADDERS} (or unset); got {ladder!r}")


def row_buckets(cap: int) -> list[int]:
    """Powers of two and their 1.5x midpoints up to cap, plus cap: empty rows waste at most 1/3."""
    out, p = [], 1
    while p <= cap:
        out.append(p)
        if p >= 2 and p * 3 // 2 <= cap:
            out.append(p * 3 // 2)
        p *= 2
    if out[-1] != cap:
        out.append(cap)
    return sorted(set(out))


def plan_step(pending: Sequence[tuple[int, np.ndarray]], buckets: Buckets,
              skip: Mapping[int, int] | None = None,
              pooling: Mapping[int, EmbeddingType] | None = None
              ) -> tuple[EmbedStep, list[int]]:
    """Pack as many pending sequences as fit one step; return it and the ids left over.

    `pending` holds (id, token ids) pairs. The longest sequence sets the row length; sequences are
    placed first-fit in decreasing length order, so short ones fill the gaps left by long ones.
    `skip` maps an id to how many of its leading tokens are left out of its pooling (a prompt the
    model was trained to exclude). A sequence that is all prompt pools to zero in the mean, as in
    sentence-transformers, and its first token stands for it in `cls` pooling. `pooling` maps an
    id to how its sequence is pooled (default: the mean).
    """
    skip, pooling = skip or {}, pooling or {}
    order = sorted(range(len(pending)), key=lambda i: -len(pending[i][1]))
    length = buckets.length_for(len(pending[order[0]][1]))
    max_rows = buckets.max_rows(length)
    seq_cap = min(length, MAX_SEQS_PER_ROW)
    rows: list[list[int]] = []  # indexes into pending, per row
    room: list[int] = []
    left: list[int] = []
    for i in order:
        n = len(pending[i][1])
        row = next((r for r in range(len(rows)) if room[r] >= n and len(rows[r]) < seq_cap), None)
        if row is None and len(rows) < max_rows:
            rows.append([])
            room.append(length)
            row = len(rows) - 1
        if row is None:
            left.append(pending[i][0])
            continue
        rows[row].append(i)
        room[row] -= n

    n_rows = buckets.rows_for(len(rows), length)
    slots = buckets.seq_slots(n_rows, length)
    tokens = np.zeros((n_rows, length), np.int32)
    positions = np.zeros((n_rows, length), np.int32)
    segments = np.zeros((n_rows, length), np.int32)
    seq_index = np.full((n_rows, length), slots, np.int32)
    last_index = np.zeros(slots, np.int32)
    first_index = np.zeros(slots, np.int32)
    pick_index = np.full(slots, -1, np.int32)
    ids = []
    for r, members in enumerate(rows):
        col = 0
        for seg, i in enumerate(members, start=1):
            seq = pending[i][1]
            n = len(seq)
            slot = len(ids)
            tokens[r, col : col + n] = seq
            positions[r, col : col + n] = np.arange(n)
            segments[r, col : col + n] = seg
            left_out = min(skip.get(pending[i][0], 0), n)
            seq_index[r, col + left_out : col + n] = slot
            last_index[slot] = r * length + col + n - 1
            first_index[slot] = r * length + col + (left_out if left_out < n else 0)
            kind = pooling.get(pending[i][0], EmbeddingType.Mean)
            pick_index[slot] = {EmbeddingType.Last: last_index[slot],
                                EmbeddingType.Cls: first_index[slot]}.get(kind, -1)
            ids.append(pending[i][0])
            col += n
    step = EmbedStep(tokens, positions, segments, seq_index, pick_index, last_index,
                     first_index, tuple(ids))
    return step, left


def plan_token_step(pending: Sequence[tuple[int, np.ndarray]], buckets: Buckets,
                    skip: Mapping[int, int] | None = None, score: bool = False
                    ) -> tuple[TokenStep, list[int]]:
    """`plan_step`'s packing, for sequences that want every token back: their final hidden states
    (from the first pooled token: a prompt left out of pooling is left out here too) or, with
    `score`, each token's log-probability given those before it (tokens 1 .. n - 1 of a sequence
    of n, scored at positions 0 .. n - 2)."""
    step, left = plan_step(pending, buckets, skip)
    lengths = {sid: len(seq) for sid, seq in pending}
    seg = step.segment_ids
    targets = np.zeros_like(step.tokens)  # [B, T]: the next token of the same sequence
    targets[:, :-1] = np.where((seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0),
                               step.tokens[:, 1:], 0)
    spans = []
    for slot, sid in enumerate(step.sequences):
        last, first = int(step.last_index[slot]), int(step.first_index[slot])
        n = lengths[sid]
        spans.append((last - n + 1, n - 1) if score else (first, last - first + 1))
    token_step = TokenStep(step.tokens, step.positions, seg, targets, int(score), tuple(spans),
                           step.sequences)
    return token_step, left
