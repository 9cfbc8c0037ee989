"""Plan embedding steps: pack sequences into a small bounded set of (rows x length) shapes.

Everything here is plain data and pure functions, so a step can be logged, tested, or broadcast to
other hosts as-is. A step holds several sequences per row ("packing"): segment ids keep them apart
in attention, and positions restart per sequence, so packing never changes a result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from jaxembed.protocol import EmbeddingType
from jaxembed.steps import EmbedStep, TokenStep

# Sequences per row are capped so that the per-step pooling outputs have a static size.
MAX_SEQS_PER_ROW = 64
MIN_LENGTH_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Buckets:
    """The shapes a step may take: row lengths, and row counts under a token budget."""

    lengths: tuple[int, ...]
    max_batch_tokens: int

    @classmethod
    def build(cls, max_model_len: int, max_batch_tokens: int) -> Buckets:
        lengths = []
        n = MIN_LENGTH_BUCKET
        while n < max_model_len:
            lengths.append(n)
            n *= 2
        lengths.append(max_model_len)
        return cls(tuple(lengths), max_batch_tokens)

    def length_for(self, n_tokens: int) -> int:
        for length in self.lengths:
            if length >= n_tokens:
                return length
        raise ValueError(f"{n_tokens} tokens exceed the longest bucket {self.lengths[-1]}")

    def max_rows(self, length: int) -> int:
        return max(1, self.max_batch_tokens // length)

    def rows_for(self, n_rows: int, length: int) -> int:
        """The smallest row bucket (1, 2, 3, 4, 6, 8, 12, ...) holding n_rows, capped by budget."""
        cap = self.max_rows(length)
        for b in row_buckets(cap):
            if b >= n_rows:
                return b
        return cap

    def seq_slots(self, rows: int, length: int) -> int:
        return rows * min(length, MAX_SEQS_PER_ROW)

    def shapes(self) -> list[tuple[int, int]]:
        """Every (rows, length) a step can take."""
        return [(b, t) for t in self.lengths for b in row_buckets(self.max_rows(t))]


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
