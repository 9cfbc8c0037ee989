"""The generation scheduler: KV cache slots, and the prefill and decode steps that fill them.

Each choice of a request is a `Sequence`: it waits for a free slot, joins a prefill step (one
prompt a row, its first token sampled), then gains a token in every decode step until a stop token,
a stop string or its length ends it. Decode steps run one ahead: the next step is dispatched,
fed this one's tokens still on the device, before this one's are read back, detokenized and
streamed (`may_run_ahead`). Step shapes come from a small set, all compiled by `warmup`.

A sequence under a grammar (structured outputs) draws only the tokens its `Constraint` allows,
which depend on the token before. A step with such rows runs as two programs: the forward is
dispatched (fed the last step's tokens, still on the device), the host reads those tokens,
advances the grammars and builds the masks while the forward runs, then the sampling program
draws with them. Free and constrained sequences share the steps.
Runs on the engine thread only.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import operator
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jaxembed import grammar, sampling
from jaxembed.errors import EngineUnavailableError
from jaxembed.generation import (
    Delta,
    FinishReason,
    IncrementalDetokenizer,
    StopStrings,
    TokenLogprob,
)
from jaxembed.grammar import Constraint
from jaxembed.plan import GPU_KERNELS
from jaxembed.runner import ModelRunner, Pending
from jaxembed.scheduler import Buckets
from jaxembed.stats import StatsRecorder
from jaxembed.steps import DecodeStep, PrefillStep
from jaxembed.work import GenerationWork

log = logging.getLogger("jaxembed.generation")

# Below this KV length a decode step's attention is a sliver of a step that reads every weight.
MIN_DECODE_LENGTH = 128
# Prefills of prompts up to this many tokens are compiled ahead, in every group size.
WARM_PREFILL_LENGTH = 128


@dataclasses.dataclass
class SeqState:
    """One choice of a generation request, from waiting for a slot to finished."""

    work: GenerationWork
    index: int
    seed: int
    detok: IncrementalDetokenizer
    stops: StopStrings
    slot: int = -1
    pos: int = 0  # tokens in its cache rows; the next token is written here
    last: int = 0  # the last token drawn, fed to the next decode step
    out: list[int] = dataclasses.field(default_factory=list)
    constraint: Constraint | None = None  # its grammar, if it has one


@dataclasses.dataclass(frozen=True)
class _Ahead:
    """A decode step dispatched before the last one's tokens were read: for these sequences (in
    row order), either whole (`out`) or its forward only (`pending`, to sample once the masks
    are built)."""

    seqs: list[SeqState]
    out: Any = None
    pending: Pending | None = None


def row_counts(max_num_seqs: int) -> tuple[int, ...]:
    """Rows of decode (and prefill) steps: powers of two up to the slots, and the slots."""
    return tuple(sorted({*(1 << i for i in range(max_num_seqs.bit_length())
                           if 1 << i <= max_num_seqs), max_num_seqs}))


class GenerationScheduler:
    def __init__(self, runner: ModelRunner, buckets: Buckets, tokenizer: Any,
                 stats: StatsRecorder, on_done: Callable[[], None]) -> None:
        """on_done: called once a request's last choice has ended (to free its queue place)."""
        plan = runner.plan
        self.runner, self.buckets, self.tokenizer, self.stats = runner, buckets, tokenizer, stats
        self._on_done = on_done
        self.max_num_seqs, self.max_model_len = plan.max_num_seqs, plan.max_model_len
        # Decode shapes: rows in powers of two, and cache lengths from 128, so that a server
        # sees few of them: each compiles in seconds on a CPU.
        self.row_counts = row_counts(self.max_num_seqs)
        self.decode_rows = tuple(sorted({max(r, plan.min_decode_rows) for r in self.row_counts}))
        self.decode_lengths = tuple(n for n in buckets.lengths
                                    if n >= min(MIN_DECODE_LENGTH, self.max_model_len))
        if plan.decode_attention == GPU_KERNELS:
            # The kernel reads each row's own positions whatever the step's KV length: one
            # length serves every step, a third of the programs to compile at start-up.
            self.decode_lengths = self.decode_lengths[-1:]
        self.vocab_size = runner.config.vocab_size
        self.free_slots = list(range(self.max_num_seqs))
        self.active: dict[int, SeqState] = {}  # slot -> its sequence
        self.waiting: collections.deque[SeqState] = collections.deque()
        self._ahead: _Ahead | None = None
        self.run_ahead = True  # tests turn it off to compare
        self.ahead_steps = 0  # how many steps were dispatched ahead

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.active)

    @property
    def running_sequences(self) -> int:
        return len(self.active)

    @property
    def can_admit(self) -> bool:
        return bool(self.waiting and self.free_slots)

    def add(self, work: GenerationWork) -> None:
        skip = work.params.skip_special_tokens
        for i, seed in enumerate(work.seeds):
            self.waiting.append(SeqState(
                work, i, seed, IncrementalDetokenizer(self.tokenizer, work.prompt, skip),
                StopStrings(work.params.stop),
                constraint=work.constraints[i] if work.constraints else None))

    def drop_cancelled(self) -> None:
        kept: collections.deque[SeqState] = collections.deque()
        for seq in self.waiting:
            if seq.work.cancelled:
                self._end(seq, cancelled=True)
            else:
                kept.append(seq)
        self.waiting = kept
        for seq in list(self.active.values()):
            if seq.work.cancelled:
                self._end(seq, cancelled=True)

    def prefill_rows(self, prompts: int, length: int) -> int:
        """Rows of a prefill step for that many prompts: on the fine ladder powers of two, as
        decode steps, so a burst of requests admitted in groups of any size meets shapes that
        warm-up compiled; on the coarse one the embedding steps' row counts, all compiled."""
        if self.buckets.is_coarse:
            return self.buckets.rows_for(prompts, length)
        cap = self.buckets.max_rows(length)
        return min(next((b for b in self.row_counts if b >= prompts), cap), cap)

    def prefill_shapes(self, max_length: int | None = None) -> list[tuple[int, int]]:
        """Every (rows, length) a prefill step can take (of prompts up to max_length tokens): a
        step admits at most one prompt a free slot and `max_rows` of its length."""
        return sorted({(self.prefill_rows(n, length), length)
                       for length in self.buckets.lengths
                       if max_length is None or length <= max_length
                       for n in range(1, min(self.max_num_seqs,
                                             self.buckets.max_rows(length)) + 1)},
                      key=lambda s: (s[1], s[0]))

    def decode_shapes(self) -> list[tuple[int, int]]:
        """Every (rows, KV length) a decode step can take."""
        return [(rows, kv_len) for rows in self.decode_rows for kv_len in self.decode_lengths]

    def warmup(self, structured: bool = False) -> None:
        """Compile every decode shape (slots x KV length) and the prefills of prompts in any
        group size, so that steady generation never waits for the compiler: on the coarse
        ladder every prefill shape, on the fine one those of prompts up to 128 tokens;
        structured: the two programs of steps under a grammar too (as many shapes again).
        Where the plan compiles greedy steps apart (`sampling.greedy_only`), both kinds."""
        scratch = self.runner.scratch_slot
        for rows, kv_len in self.decode_shapes():
            for step in self._kinds(DecodeStep.empty(rows, kv_len, scratch)):
                self.runner.run(step)
            if structured and self.runner.channel is None:
                for step in self._kinds(DecodeStep.empty(rows, kv_len, scratch)):
                    pending = self.runner.forward(step)
                    self.runner.sample(pending, {
                        **step.rows, "mask": grammar.full_mask(rows, self.vocab_size)})
        longest = None if self.buckets.is_coarse else WARM_PREFILL_LENGTH
        for rows, length in self.prefill_shapes(longest):
            for step in self._kinds(PrefillStep.empty(rows, length, scratch, self.vocab_size)):
                self.runner.run(step)
        self.runner.sync()

    def _kinds(self, step: Any) -> list[Any]:
        """A padding step (greedy rows), and where the plan compiles greedy steps apart, the
        same step with sampled rows."""
        if not self.runner.plan.branchless_sampling:
            return [step]
        sampled = {**step.rows, "temperature": np.ones_like(step.rows["temperature"])}
        return [step, dataclasses.replace(step, rows=sampled)]

    # ---- steps -----------------------------------------------------------------------------

    def prefill_step(self) -> None:
        """Admit waiting prompts into free slots: one prefill step, one prompt per row."""
        batch: list[SeqState] = []
        longest = 0
        for seq in self.waiting:
            n = max(longest, len(seq.work.prompt))
            length = self.buckets.length_for(n)
            if len(batch) == len(self.free_slots) or len(batch) + 1 > self.buckets.max_rows(
                    length):
                break
            batch.append(seq)
            longest = n
        for _ in batch:
            self.waiting.popleft()
        start = time.perf_counter()
        try:
            step = self._plan_prefill(batch, self.buckets.length_for(longest))
            out = self.runner.run(step)
            self.stats.add(prefill_steps=1)  # before its tokens reach anyone, as in `_emit`
            self._emit(batch, out)
        except Exception as e:  # a failed step fails its requests, never the engine
            log.exception("prefill step of %d prompts failed", len(batch))
            self._recover()
            self._fail(batch, e)
            return
        self.stats.add(busy_seconds=time.perf_counter() - start)

    def _plan_prefill(self, batch: list[SeqState], length: int) -> PrefillStep:
        """The step for these sequences, each given a slot."""
        step = PrefillStep.empty(self.prefill_rows(len(batch), length), length,
                                 self.runner.scratch_slot, self.vocab_size)
        tokens, positions, segments, slots, last_col = (
            a.copy() for a in (step.tokens, step.positions, step.segment_ids, step.slots,
                               step.last_col))
        for r, seq in enumerate(batch):
            n = len(seq.work.prompt)
            tokens[r, :n] = seq.work.prompt
            positions[r, :n] = np.arange(n)
            segments[r, :n] = 1
            seq.slot = self.free_slots.pop(0)
            self.active[seq.slot] = seq
            seq.pos = n
            slots[r] = seq.slot
            last_col[r] = n - 1
        padded = [*batch, *[None] * (len(slots) - len(batch))]
        # A prefill always carries masks: one program for free and constrained prompts.
        rows = sampling.row_arrays(
            [None if s is None else (s.work.params, s.seed, 0) for s in padded],
            self._masks(padded))
        return PrefillStep(tokens, positions, segments, slots, last_col, rows)

    def decode_step(self) -> None:
        """A token for every running sequence. The step's tokens are read back (and detokenized,
        checked against stops, streamed) while the next step already runs."""
        seqs = [self.active[s] for s in sorted(self.active)]
        ahead, self._ahead = self._ahead, None
        rows = seqs
        start = time.perf_counter()
        try:
            # A step dispatched last time, for the sequences running then (unless all of them
            # have ended since).
            if ahead is not None and any(self.active.get(s.slot) is s for s in ahead.seqs):
                rows = ahead.seqs
                out = ahead.out if ahead.pending is None else self._sample(rows, ahead.pending)
            elif self._split(seqs):
                out = self._sample(seqs, self.runner.forward(self._plan_decode(seqs)))
            else:
                out = self.runner.run(self._plan_decode(seqs, masks=self._constrained(seqs)))
            # The sequences each row is still for: one that stopped or was cancelled since this
            # step was dispatched gets nothing from it; one admitted since gets its token next.
            live = [s if self.active.get(s.slot) is s else None for s in rows]
            same = len(rows) == len(seqs) and all(map(operator.is_, rows, seqs))
            if same and self.may_run_ahead(seqs):
                step = self._plan_decode(seqs, fed=out[0])
                self._ahead = _Ahead(seqs, pending=self.runner.forward(step)) \
                    if self._split(seqs) else _Ahead(seqs, out=self.runner.run(step))
                self.ahead_steps += 1
            for seq in live:
                if seq is not None:
                    seq.pos += 1
            self.stats.add(decode_steps=1)  # before its tokens reach anyone, as in `_emit`
            self._emit(live, out)
        except Exception as e:
            log.exception("decode step of %d sequences failed", len(rows))
            self._ahead = None
            self._recover()
            self._fail([s for s in rows if self.active.get(s.slot) is s], e)
            return
        self.stats.add(busy_seconds=time.perf_counter() - start)

    @staticmethod
    def _constrained(seqs: Sequence[SeqState | None]) -> bool:
        return any(s is not None and s.constraint is not None for s in seqs)

    def _split(self, seqs: Sequence[SeqState]) -> bool:
        """Whether these sequences decode in two programs (some row is under a grammar; one
        process only: a multi-host leader runs whole steps, masks in their rows)."""
        return self._constrained(seqs) and self.runner.channel is None

    def _masks(self, rows: Sequence[SeqState | None]) -> np.ndarray:
        """The tokens each row may draw next: all of them for a free or padding row."""
        mask = grammar.full_mask(len(rows), self.vocab_size)
        for r, seq in enumerate(rows):
            if seq is not None and seq.constraint is not None:
                seq.constraint.fill(mask[r])
        return mask

    def _sample(self, rows: Sequence[SeqState], pending: Pending) -> Any:
        """Draw a dispatched forward's tokens. Its masks are built now, from each grammar as
        the tokens read so far left it, while the device still runs the forward."""
        live = [s if self.active.get(s.slot) is s else None for s in rows]
        n = next(b for b in self.decode_rows if b >= len(rows))
        live += [None] * (n - len(live))
        settings = sampling.row_arrays(
            [None if s is None else (s.work.params, s.seed, len(s.out)) for s in live],
            self._masks(live))
        return self.runner.sample(pending, settings)

    def may_run_ahead(self, seqs: Sequence[SeqState]) -> bool:
        """Whether to dispatch the step after this one before this one's tokens are read.

        Its input tokens are this step's output, on the device: the host's work on a step
        (reading the tokens back, detokenizing, stop checks, streaming, preparing the next
        inputs) overlaps the device's next step instead of adding to it. Whatever the host then
        finds, the step is right for every sequence that goes on: one that stops meanwhile gets
        nothing from it (its slot's cache and counts are reset when the slot is reused), and
        its draw for a sequence that goes on is the one a step dispatched later would make.
        Not when a sequence ends on this step by length (the next step would be wasted, and
        could run past the cache), nor on a multi-host leader, whose followers get host
        arrays."""
        return self.run_ahead and self.runner.channel is None and all(
            len(s.out) + 1 < s.work.params.max_tokens and s.pos + 1 < self.max_model_len
            for s in seqs)

    def _plan_decode(self, seqs: Sequence[SeqState], fed: jax.Array | None = None,
                     masks: bool = False) -> DecodeStep:
        """A decode step for seqs (their rows in this order); fed: the tokens to feed, the
        output of the step before it that has not been read yet (each sequence then one
        position further on); masks: its rows carry their grammars' masks (a whole step
        under a grammar, read after the step before)."""
        ahead = int(fed is not None)
        rows = next(b for b in self.decode_rows if b >= len(seqs))
        tokens = np.zeros(rows, np.int32)
        positions = np.zeros(rows, np.int32)
        slots = np.full(rows, self.runner.scratch_slot, np.int32)
        for r, seq in enumerate(seqs):
            tokens[r], positions[r], slots[r] = seq.last, seq.pos + ahead, seq.slot
        kv_len = next(n for n in self.decode_lengths if n > int(positions.max()))
        padded = [*seqs, *[None] * (rows - len(seqs))]
        sampling_rows = sampling.row_arrays(
            [None if s is None else (s.work.params, s.seed, len(s.out) + ahead)
             for s in padded], self._masks(padded) if masks else None)
        return DecodeStep(tokens if fed is None else fed, positions, slots, sampling_rows,
                          kv_len)

    # ---- results -------------------------------------------------------------------------

    def _emit(self, seqs: Sequence[SeqState | None], out: Sequence[jax.Array]) -> None:
        """Stream each row's token to its sequence (None: a row whose sequence ended)."""
        tokens, chosen, top_ids, top_lp = (np.asarray(x) for x in out)
        # Counted before any token is streamed: a caller who has its last token reads figures
        # that include it.
        self.stats.add(generated_tokens=sum(seq is not None for seq in seqs))
        for r, seq in enumerate(seqs):
            if seq is None:
                continue
            token = int(tokens[r])
            seq.out.append(token)
            seq.last = token
            p = seq.work.params
            logprobs: tuple[TokenLogprob, ...] = ()
            if p.logprobs is not None:
                top = tuple((int(i), float(v)) for i, v in
                            zip(top_ids[r, : p.logprobs], top_lp[r, : p.logprobs], strict=True))
                logprobs = (TokenLogprob(token, float(chosen[r]), top),)
            finish, hit, text = None, False, ""
            if token in seq.work.stop_ids:
                finish = FinishReason.STOP
            else:
                text, hit = seq.stops.add(seq.detok.add(token))
                # A grammar's text ends where it is complete: no end token is drawn for it.
                if hit or (seq.constraint is not None and self._grammar_done(seq, token)):
                    finish = FinishReason.STOP
            if finish is None and (len(seq.out) >= p.max_tokens or seq.pos >= self.max_model_len):
                finish = FinishReason.LENGTH
            if finish is not None and not hit:  # release what was held back
                tail, hit = seq.stops.add(seq.detok.flush())
                text += tail
                if hit:
                    finish = FinishReason.STOP
                else:
                    text += seq.stops.flush()
            seq.work.stream.push(Delta(seq.index, text, (token,), logprobs, finish))
            if finish is not None:
                self._end(seq)

    @staticmethod
    def _grammar_done(seq: SeqState, token: int) -> bool:
        """Advance the sequence's grammar by its token: True once the text is complete (nothing
        may follow it), so the sequence ends without drawing an end token."""
        c = seq.constraint
        assert c is not None
        if not c.advance(token):  # the mask allowed only what the grammar accepts
            log.error("the grammar refused token %d it allowed: %s", token, c.error)
            return True
        return c.done

    def _end(self, seq: SeqState, cancelled: bool = False) -> None:
        """A choice is done: free its slot; the request is done with its last choice."""
        if seq.slot >= 0:
            self.active.pop(seq.slot, None)
            self.free_slots.append(seq.slot)
            seq.slot = -1
        work = seq.work
        work.open -= 1
        if work.open == 0:
            self.stats.add(**{"cancelled" if cancelled else "generation_requests": 1})
            self._on_done()

    def _fail(self, seqs: Sequence[SeqState], error: Exception) -> None:
        for seq in seqs:
            if seq.work.open > 0 and not seq.work.cancelled:
                seq.work.stream.fail(error)
                seq.work.stream.cancel()
            self._end(seq, cancelled=True)

    def fail_all(self, error: Exception) -> None:
        """Fail every waiting and running sequence (after an error the engine loop could not
        pin on one step); their slots are freed, and the cache dropped if a step lost it."""
        self._ahead = None
        self.runner.recover()
        seqs = [*self.waiting, *self.active.values()]
        self.waiting.clear()
        self._fail(seqs, error)

    def _recover(self) -> None:
        """After a failed step: if the runner lost the cache, every running sequence lost its
        rows (the ones of the failed step are failed with it)."""
        if self.runner.recover():
            self._ahead = None
            for seq in list(self.active.values()):
                seq.work.stream.fail(EngineUnavailableError(
                    "the engine lost this request's cache after a failed step; retry it"))
                seq.work.stream.cancel()
