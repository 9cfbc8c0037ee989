"""Step shapes: the coarse ladder (an accelerator's) is a few shapes, every one compiled by the
warm-up, so that steady serving compiles nothing; the fine ladder (a CPU's) compiles on use.

The ladders are checked as plain data (every step the planners can make is one of their shapes,
and the coarse one has few), then on a tiny model built on the CPU with the coarse ladder: its
compile count after start-up does not move under varied embedding and generation traffic, where
an engine on the fine ladder compiles under the same kind of traffic (so the check can fail).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from jaxembed import EmbeddingType, Engine, EngineBuilder, StructuredOutput
from jaxembed.gen_scheduler import GenerationScheduler
from jaxembed.plan import GPU_KERNELS, XLA
from jaxembed.scheduler import Buckets, plan_step, plan_token_step
from jaxembed.stats import StatsRecorder
from jaxembed.steps import DecodeStep, EmbedStep, PrefillStep

from tiny_models import build_llama

# An accelerator's defaults: the context, a 16k token budget, the KV cache slots.
CONTEXT, BUDGET, SLOTS = 8192, 16384, 64


def _scheduler(buckets: Buckets, slots: int, min_decode_rows: int = 1,
               decode_attention: str = XLA) -> GenerationScheduler:
    """A generation scheduler over a stand-in runner: enough to ask which shapes it plans."""
    plan = SimpleNamespace(max_num_seqs=slots, max_model_len=buckets.lengths[-1],
                           min_decode_rows=min_decode_rows, decode_attention=decode_attention)
    runner = SimpleNamespace(plan=plan, config=SimpleNamespace(vocab_size=384),
                             scratch_slot=slots, channel=None)
    return GenerationScheduler(runner, buckets, None, StatsRecorder(),  # type: ignore[arg-type]
                               on_done=lambda: None)


# ---- the ladders as data ---------------------------------------------------------------------


def test_the_coarse_ladder_is_a_few_shapes() -> None:
    b = Buckets.coarse(CONTEXT, BUDGET)
    assert b.is_coarse and b.lengths == (512, 2048, 8192)
    assert b.shapes() == [(1, 512), (4, 512), (16, 512), (32, 512),
                          (1, 2048), (4, 2048), (8, 2048), (1, 8192), (2, 8192)]
    # Token totals of its steps: 512, 2048, 8192 and the budget.
    assert sorted({r * t for r, t in b.shapes()}) == [512, 2048, 8192, BUDGET]
    g = _scheduler(b, SLOTS)
    assert g.prefill_shapes() == b.shapes()  # prefills take the embedding steps' shapes
    assert len(g.decode_shapes()) == 21  # rows 1, 2, 4, ..., 64 x KV lengths 512, 2048, 8192
    # Against the fine ladder of the same context and budget, and of today's 8k budget.
    assert len(Buckets.build(CONTEXT, BUDGET).shapes()) > 90
    assert len(Buckets.build(CONTEXT, 8192).shapes()) == 91
    assert len(_scheduler(Buckets.build(CONTEXT, BUDGET), SLOTS).decode_shapes()) == 49


@pytest.mark.parametrize("context", [256, 512, 1000, 2048, 4096, 8192, 32768, 40960])
@pytest.mark.parametrize("budget", [2048, 8192, 16384, 32768])
def test_the_coarse_ladder_stays_small_whatever_the_limits(context: int, budget: int) -> None:
    b = Buckets.coarse(context, budget)
    shapes = b.shapes()
    assert len(shapes) == len(set(shapes)) <= 12
    assert b.lengths[-1] == context and list(b.lengths) == sorted(set(b.lengths))
    for length in b.lengths:
        counts = b.row_counts(length)
        assert counts[0] == 1 and list(counts) == sorted(set(counts))
        assert counts[-1] == b.max_rows(length)  # the largest step fills the budget
        assert all(r * length <= budget for r in counts) or counts == (1,)
    for slots in (1, 3, 16, 64):
        g = _scheduler(b, slots)
        assert set(g.prefill_shapes()) <= set(shapes)
        assert len(g.decode_shapes()) <= 7 * 5


@pytest.mark.parametrize("buckets", [
    Buckets.coarse(CONTEXT, BUDGET), Buckets.coarse(1024, 2048), Buckets.coarse(3000, 16384),
    Buckets.build(2048, 1024)], ids=["coarse-8k-16k", "coarse-1k-2k", "coarse-3000", "fine"])
def test_every_step_the_planners_make_is_a_ladder_shape(buckets: Buckets) -> None:
    shapes = set(buckets.shapes())
    longest = buckets.lengths[-1]
    assert {buckets.length_for(n) for n in range(1, longest + 1)} == set(buckets.lengths)
    for length in buckets.lengths:
        for rows in range(1, buckets.max_rows(length) + 1):
            assert (buckets.rows_for(rows, length), length) in shapes
    # The embedding planner, over random mixes until every sequence is placed.
    rng = np.random.default_rng(0)
    planned: set[tuple[int, int]] = set()
    for _ in range(40):
        top = int(rng.choice(buckets.lengths))
        lengths = rng.integers(1, top + 1, int(rng.integers(1, 120)))
        lengths[rng.random(len(lengths)) < 0.7] %= 40  # mostly short, as texts are
        pending = [(i, np.ones(max(int(n), 1), np.int32)) for i, n in enumerate(lengths)]
        while pending:
            step, left = plan_step(pending, buckets)
            tokens, _ = plan_token_step(pending, buckets, score=bool(rng.integers(2)))
            assert step.tokens.shape in shapes and tokens.tokens.shape == step.tokens.shape
            planned.add(step.tokens.shape)
            kept = set(left)
            pending = [p for p in pending if p[0] in kept]
    assert len(planned) > len(shapes) // 2
    # Generation: a prefill admits n prompts (at most the free slots, and `max_rows` of its
    # length) in `prefill_rows(n, length)` rows; a decode step's rows and KV length.
    for slots in (1, 4, 16, 64):
        g = _scheduler(buckets, slots, min_decode_rows=2 if slots > 1 else 1)
        prefills = set(g.prefill_shapes())
        for length in buckets.lengths:
            for n in range(1, min(slots, buckets.max_rows(length)) + 1):
                assert (g.prefill_rows(n, length), length) in prefills
        if buckets.is_coarse:
            assert prefills <= shapes
        decodes = set(g.decode_shapes())
        for running in range(1, slots + 1):
            rows = next(b for b in g.decode_rows if b >= running)
            for pos in range(0, longest, 7):
                kv_len = next(n for n in g.decode_lengths if n > pos)
                assert (rows, kv_len) in decodes


def test_the_gpu_decode_kernel_needs_one_kv_length() -> None:
    """XLA's decode attention reads the step's first kv_len positions, so steps take the
    ladder's lengths; the GPU kernel reads each row's own, so one length (the context) serves
    every step: a third of the decode programs to compile at start-up."""
    buckets = Buckets.coarse(CONTEXT, BUDGET)
    xla = _scheduler(buckets, SLOTS)
    gpu = _scheduler(buckets, SLOTS, decode_attention=GPU_KERNELS)
    assert xla.decode_lengths == (512, 2048, 8192) and gpu.decode_lengths == (CONTEXT,)
    assert len(gpu.decode_shapes()) * 3 == len(xla.decode_shapes())


def test_the_plan_picks_the_ladder() -> None:
    accelerator = SimpleNamespace(accelerated=True, max_model_len=CONTEXT,
                                  max_batch_tokens=BUDGET)
    cpu = SimpleNamespace(accelerated=False, max_model_len=2048, max_batch_tokens=1024)
    assert Buckets.for_plan(accelerator) == Buckets.coarse(CONTEXT, BUDGET)
    assert Buckets.for_plan(cpu) == Buckets.build(2048, 1024)  # a CPU's, as before
    assert Buckets.for_plan(cpu, "coarse") == Buckets.coarse(2048, 1024)
    assert Buckets.for_plan(accelerator, "fine") == Buckets.build(CONTEXT, BUDGET)
    with pytest.raises(ValueError, match="buckets must be one of"):
        Buckets.for_plan(cpu, "tiny")
    with pytest.raises(ValueError, match="buckets must be one of"):
        EngineBuilder(model="/nonexistent", buckets="tiny").build()  # before anything loads


def test_the_coarse_ladder_packs_a_loaded_queue_with_little_padding() -> None:
    # The benchmark's corpus: lengths spread log-uniformly from 8 to 512 tokens.
    lengths = np.exp(np.random.default_rng(0).uniform(np.log(8), np.log(512), 2048)).astype(int)
    buckets = Buckets.coarse(CONTEXT, BUDGET)
    pending = [(i, np.zeros(int(n), np.int32)) for i, n in enumerate(lengths)]
    real = padded = 0
    while pending:
        step, left = plan_step(pending, buckets)
        real, padded = real + step.real_tokens, padded + step.padded_tokens
        kept = set(left)
        pending = [p for p in pending if p[0] in kept]
    assert 1 - real / padded < 0.05


# ---- an engine on the coarse ladder: everything compiled at start-up ---------------------------

# A context of 1024 and a 2048-token budget: rows of 512 and 1024, steps of (1, 4) x 512 and
# (1, 2) x 1024 tokens; 2 KV cache slots.
TEST_CONTEXT, TEST_BUDGET, TEST_SLOTS = 1024, 2048, 2


@pytest.fixture(scope="module")
def long_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a context long enough for two coarse lengths."""
    return build_llama(tmp_path_factory.mktemp("models") / "tiny-llama-1k", seed=3,
                       max_position_embeddings=TEST_CONTEXT)


def _build(folder: Path, ladder: str) -> Engine:
    return EngineBuilder(model=folder, dtype="float32", buckets=ladder,
                         max_model_len=TEST_CONTEXT, max_batch_tokens=TEST_BUDGET,
                         max_num_seqs=TEST_SLOTS, progress=False,
                         compilation_cache=False).build()


@pytest.fixture(scope="module")
def coarse_engine(long_llama_dir: Path) -> Iterator[Engine]:
    """Built as on an accelerator: the coarse ladder, and the warm-up that compiles it all."""
    engine = _build(long_llama_dir, "coarse")
    yield engine
    engine.shutdown()


def _record_shapes(engine: Engine) -> Counter[tuple[str, int, int]]:
    """Count each step the runner runs from now on, by (kind, rows, length or KV length)."""
    runner, seen = engine.runner, Counter[tuple[str, int, int]]()
    run, forward = runner.run, runner.forward

    def kind(step: Any) -> tuple[str, int, int]:
        if isinstance(step, DecodeStep):
            return "decode", len(step.positions), step.kv_len
        name = {EmbedStep: "embed", PrefillStep: "prefill"}.get(type(step)) or (
            "scores" if step.score else "hidden")
        return name, *step.tokens.shape

    def recording_run(step: Any) -> Any:
        seen[kind(step)] += 1
        return run(step)

    def recording_forward(step: DecodeStep) -> Any:
        seen[("forward", *kind(step)[1:])] += 1
        return forward(step)

    runner.run, runner.forward = recording_run, recording_forward  # type: ignore[method-assign]
    return seen


def _embedding_traffic(e: Engine, rng: np.random.Generator) -> None:
    """Requests of every size: one token to the context, one sequence to hundreds (queued
    together, so they share steps), every pooling, token embeddings and prompt scores."""
    vocab = e.config.vocab_size

    def seqs(n: int, top: int) -> list[np.ndarray]:
        lengths = rng.integers(1, top + 1, n)
        return [rng.integers(3, vocab, int(k)).astype(np.int32) for k in lengths]

    for n, top in [(1, 1), (1, 17), (1, 511), (1, 512), (1, 513), (1, TEST_CONTEXT),
                   (2, 300), (3, TEST_CONTEXT), (7, 64), (20, 200), (5, 900)]:
        for pooling in (EmbeddingType.Mean, EmbeddingType.Cls, EmbeddingType.Last):
            out = e.submit(seqs(n, top), pooling).result()
            assert out.shape == (n, e.hidden_size) and np.isfinite(out).all()
    # Many at once, queued while paused: they fill the largest steps of each length.
    with e.paused():
        futures = [e.submit(seqs(n, top), pooling) for n, top, pooling in [
            (300, 40, EmbeddingType.Mean), (40, 500, EmbeddingType.Last),
            (9, TEST_CONTEXT, EmbeddingType.Cls), (1, 3, EmbeddingType.Mean)]]
    assert [len(f.result()) for f in futures] == [300, 40, 9, 1]
    # Every token's state (token embeddings) and every token's score (prompt logprobs).
    for n, top in [(1, 5), (3, 600), (12, 100), (4, TEST_CONTEXT)]:
        batch = seqs(n, top)
        states = e.submit(batch, EmbeddingType.None_).result()
        assert [len(s) for s in states] == [len(s) for s in batch]
        scores = e.submit_scores(batch).result()
        assert [len(s.logprobs) for s in scores] == [len(s) - 1 for s in batch]
    # Through the front end, from texts, in threads.
    texts = [f"text {i} " * (1 + 37 * i % 90) for i in range(40)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda i: e.encode(texts[i::4]), range(4)))
    assert sum(len(o) for o in outs) == 40
    assert len(e.encode(texts, pooling=None)) == 40


def _generation_traffic(e: Engine, rng: np.random.Generator) -> None:
    """Prompts short and long, a decode across the first KV length, one stream and several
    (queued while paused, so they share prefill and decode steps), a grammar's steps too."""
    vocab = e.config.vocab_size

    def prompt(n: int) -> list[int]:
        return [int(t) for t in rng.integers(3, vocab, n)]

    kw: dict[str, Any] = dict(temperature=0, ignore_eos=True)
    for n, tokens in [(1, 3), (30, 5), (500, 20), (700, 6), (TEST_CONTEXT - 4, 4)]:
        r = e.generate(prompt(n), max_tokens=tokens, **kw)
        assert len(r.choices[0].token_ids) == tokens
    for group in ([5, 9], [600, 20], [510, 3]):
        with e.paused():
            streams = [e.generate_stream(prompt(n), max_tokens=8, **kw) for n in group]
        assert [len(s.collect(list(s)).choices[0].token_ids) for s in streams] == [8] * len(group)
    r = e.generate(prompt(40), max_tokens=6, n=2, temperature=1.0, seed=5, ignore_eos=True)
    assert len(r.choices) == 2
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        done = list(pool.map(lambda n: e.generate(prompt(n), max_tokens=4, **kw), (3, 50, 520)))
    assert all(len(d.choices[0].token_ids) == 4 for d in done)
    # Under a grammar, alone and beside a free stream.
    text = e.generate(prompt(20), max_tokens=12, temperature=0,
                      structured=StructuredOutput(regex=r"[ab]{3}")).text
    assert re.fullmatch(r"[ab]{3}", text)
    with e.paused():
        streams = [e.generate_stream(prompt(8), max_tokens=10, temperature=0,
                                     structured=StructuredOutput(regex=r"[0-9]{4}")),
                   e.generate_stream(prompt(15), max_tokens=10, **kw)]
    results = [s.collect(list(s)) for s in streams]
    assert re.fullmatch(r"[0-9]{4}", results[0].text)


def test_steady_serving_compiles_nothing_after_a_coarse_start_up(coarse_engine: Engine) -> None:
    e = coarse_engine
    assert not e.plan.accelerated and e.buckets.is_coarse  # the accelerator's ladder, on a CPU
    shapes = e.buckets.shapes()
    assert shapes == [(1, 512), (4, 512), (1, 1024), (2, 1024)]
    g = e.cores[0].scheduler
    # Start-up compiled every program in every shape: pooled, every token's states, scores;
    # prefills; decode steps whole and in two programs (under a grammar: a forward per shape,
    # and a sampling program per row count).
    compiled = e.stats_snapshot().compilations
    assert compiled == (3 * len(shapes) + len(g.prefill_shapes()) + 2 * len(g.decode_shapes())
                        + len(g.decode_rows))
    seen = _record_shapes(e)
    rng = np.random.default_rng(0)
    _embedding_traffic(e, rng)
    _generation_traffic(e, rng)
    assert e.stats_snapshot().compilations == compiled
    # And the traffic met the shapes: every embedding one, and several of generation's.
    assert {(r, t) for kind, r, t in seen if kind == "embed"} == set(shapes)
    assert {(r, t) for kind, r, t in seen if kind in ("hidden", "scores")} <= set(shapes)
    assert len({s for s in seen if s[0] == "prefill"}) >= 3
    assert {kv for kind, _, kv in seen if kind == "decode"} == {512, 1024}
    assert {r for kind, r, _ in seen if kind == "decode"} == {1, 2}
    assert any(kind == "forward" for kind, _, _ in seen)


def test_the_fine_ladder_compiles_under_the_same_traffic(long_llama_dir: Path) -> None:
    """The control: a CPU's engine (fine ladder, its warm-up of short single rows) compiles as
    traffic meets new shapes, so the count above could have moved."""
    e = _build(long_llama_dir, "fine")
    try:
        assert not e.buckets.is_coarse and len(e.buckets.shapes()) > 12
        before = e.stats_snapshot().compilations
        rng = np.random.default_rng(1)
        vocab = e.config.vocab_size
        for n in (200, 700):
            e.submit([rng.integers(3, vocab, n).astype(np.int32)]).result()
        assert e.stats_snapshot().compilations == before + 2  # (1, 256) and (1, 1024)
    finally:
        e.shutdown()


def test_each_replica_and_plan_gets_the_same_ladder(coarse_engine: Engine) -> None:
    """An accelerator's plan of this engine picks the coarse ladder by itself."""
    plan = dataclasses.replace(coarse_engine.plan, backend="gpu")
    assert Buckets.for_plan(plan) == coarse_engine.buckets
    assert Buckets.for_plan(coarse_engine.plan) == Buckets.build(TEST_CONTEXT, TEST_BUDGET)
    assert all(c.batcher.buckets is coarse_engine.buckets for c in coarse_engine.cores)


def test_small_ladders_cover_small_contexts() -> None:
    """A context under the first coarse length is one length, still with a few row counts."""
    for context, budget in itertools.product((128, 256, 511), (1024, 16384)):
        b = Buckets.coarse(context, budget)
        assert b.lengths == (context,)
        assert b.row_counts(context)[-1] == budget // context
