"""The engine: Python API shapes, pooling, batch invariance, threads, compile counts, shutdown."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxembed import (
    EmbeddingInput,
    EmbeddingRequest,
    EmbeddingType,
    EncodingFormat,
    Engine,
    EngineBuilder,
    InvalidRequestError,
    ModelNotFoundError,
    kernels,
    kv_cache,
    model,
    plan,
)
from jaxembed.errors import EngineError, EngineOverloadedError, EngineUnavailableError
from jaxembed.protocol import EmbeddingDefaults
from jaxembed.scheduler import Buckets, plan_step, plan_token_step

from parity import assert_close_pooled

TEXTS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog. " * 6,
    "a",
    "def add(a, b):\n    return a + b\n",
    "Naïve café résumé — déjà vu. 日本語 🙂🚀",
    "Numbers like 3.14159 and 2048 appear in text too. " * 3,
]


def invariant(a: np.ndarray, b: np.ndarray) -> None:
    """Batch invariance: max|diff| <= 1e-5 * max|v|."""
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


def test_python_api_shape(tiny_engine):
    req = EmbeddingRequest(model="default", input=EmbeddingInput.String("Hello, world!"),
                           encoding_format=EncodingFormat.Float, embedding_type=EmbeddingType.Mean)
    resp = tiny_engine.embed(req)
    assert resp.object == "list" and resp.model == tiny_engine.model_name
    assert len(resp.data) == 1 and resp.data[0].object == "embedding" and resp.data[0].index == 0
    assert len(resp.data[0].embedding) == tiny_engine.embedding_size
    n = len(tiny_engine.tokenize(["Hello, world!"])[0])
    assert resp.usage.prompt_tokens == resp.usage.total_tokens == n


def test_plain_values_and_forms_agree(tiny_engine):
    by_text = tiny_engine.embed(EmbeddingRequest(input=TEXTS[:3]))
    ids = tiny_engine.tokenize(TEXTS[:3])
    by_ids = tiny_engine.embed(EmbeddingRequest(input=ids))
    one = tiny_engine.embed(EmbeddingRequest(input=ids[1]))
    plain = tiny_engine.embed("hello world")
    v_text = np.array([d.embedding for d in by_text.data])
    v_ids = np.array([d.embedding for d in by_ids.data])
    invariant(v_ids, v_text)
    invariant(np.array(one.data[0].embedding), v_text[1])
    invariant(np.array(plain.data[0].embedding), v_text[0])
    assert by_ids.usage.prompt_tokens == sum(map(len, ids))


def test_mean_and_last_pooling_match_transformers(tiny_engine, tiny_llama_dir):
    from transformers import AutoModel

    ref = AutoModel.from_pretrained(tiny_llama_dir, attn_implementation="eager").eval()
    mean = tiny_engine.encode(TEXTS, embedding_type="mean")
    last = tiny_engine.encode(TEXTS, embedding_type=EmbeddingType.Last)
    for i, ids in enumerate(tiny_engine.tokenize(TEXTS)):
        with torch.no_grad():
            h = ref(torch.tensor([ids])).last_hidden_state[0].numpy()
        assert_close_pooled(mean[i], h.mean(0))
        assert_close_pooled(last[i], h[-1])
    assert not np.allclose(mean, last)


def test_base64_is_little_endian_float32(tiny_engine):
    f = tiny_engine.embed(EmbeddingRequest(input=TEXTS[:2]))
    b = tiny_engine.embed(EmbeddingRequest(input=TEXTS[:2], encoding_format="base64"))
    for df, db in zip(f.data, b.data, strict=True):
        decoded = np.frombuffer(base64.b64decode(db.embedding), dtype="<f4")
        np.testing.assert_array_equal(decoded, np.asarray(df.embedding, dtype=np.float32))


def test_dimensions_truncate(tiny_engine):
    full = tiny_engine.encode(TEXTS[0])
    resp = tiny_engine.embed(EmbeddingRequest(input=TEXTS[0], dimensions=8))
    np.testing.assert_allclose(resp.data[0].embedding, full[:8], rtol=1e-6)


def test_batch_invariance_alone_vs_mixed_batch(tiny_engine):
    alone = np.stack([tiny_engine.encode([t])[0] for t in TEXTS])
    batch = tiny_engine.encode(TEXTS[::-1] + TEXTS)  # mixed lengths, duplicates, other order
    for i in range(len(TEXTS)):
        invariant(batch[len(TEXTS) + i], alone[i])
        invariant(batch[len(TEXTS) - 1 - i], alone[i])


def test_batch_invariance_across_threads(tiny_engine):
    alone = {t: tiny_engine.encode([t])[0] for t in TEXTS}
    steps_before = tiny_engine.stats.steps
    jobs = [TEXTS[i % len(TEXTS)] for i in range(48)]
    barrier = threading.Barrier(8)

    def call(i: int) -> tuple[str, np.ndarray]:
        if i < 8:
            barrier.wait()
        return jobs[i], tiny_engine.encode([jobs[i]])[0]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(len(jobs))))
    for text, vec in results:
        invariant(vec, alone[text])
    # Concurrent calls share steps: fewer steps than calls.
    assert tiny_engine.stats.steps - steps_before < len(jobs)


def test_aembed_from_an_event_loop(tiny_engine):
    async def main() -> list:
        return await asyncio.gather(*(tiny_engine.aembed(EmbeddingRequest(input=t)) for t in TEXTS))

    out = asyncio.run(main())
    for t, r in zip(TEXTS, out, strict=True):
        invariant(np.array(r.data[0].embedding), tiny_engine.encode(t))


def test_large_request_is_split_across_steps(tiny_engine):
    texts = [f"text number {i} " * (1 + i % 7) for i in range(300)]
    steps = tiny_engine.stats.steps
    out = tiny_engine.encode(texts)
    assert out.shape == (300, tiny_engine.embedding_size)
    assert tiny_engine.stats.steps - steps > 1  # the 512-token budget forces several steps
    invariant(out[123], tiny_engine.encode(texts[123]))


def test_compile_count_is_bounded_by_the_shape_set(tiny_engine):
    before = tiny_engine.stats.compilations
    for _ in range(3):
        tiny_engine.encode(TEXTS)
    tiny_engine.encode(TEXTS)
    # Repeating the same work compiles nothing new.
    first = tiny_engine.stats.compilations
    tiny_engine.encode(TEXTS)
    assert tiny_engine.stats.compilations == first >= before
    assert tiny_engine.stats.compilations <= len(tiny_engine.buckets.shapes())


@pytest.mark.parametrize("bad, code", [
    ("", "empty_input"),
    ([], "empty_input"),
    (["ok", ""], "empty_input"),
    (["a", 1], "invalid_value"),
    ([[1, 2], "a"], "invalid_value"),
    ([[1, -1]], "invalid_token_id"),
    ([10**6], "invalid_token_id"),
    ([[]], "empty_input"),
    (3.5, "invalid_value"),
    ({"text": "x"}, "invalid_value"),
    ([True, False], "invalid_value"),
])
def test_bad_input_is_rejected_with_a_clear_message(tiny_engine, bad, code):
    with pytest.raises(InvalidRequestError) as e:
        tiny_engine.embed(EmbeddingRequest(input=bad))
    assert e.value.code == code and e.value.param == "input" and len(e.value.message) > 15


def test_too_long_and_unknown_model(tiny_engine):
    with pytest.raises(InvalidRequestError, match="limit of 256") as e:
        tiny_engine.embed(EmbeddingRequest(input=[[1] * 257]))
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(ModelNotFoundError, match="not served"):
        tiny_engine.embed(EmbeddingRequest(input="x", model="gpt-4"))
    with pytest.raises(InvalidRequestError, match="dimensions"):
        tiny_engine.embed(EmbeddingRequest(input="x", dimensions=0))
    assert tiny_engine.encode("still serving").shape == (tiny_engine.embedding_size,)


def test_shutdown_finishes_queued_work(tiny_llama_dir):
    engine = EngineBuilder(model=tiny_llama_dir, warmup=False, progress=False,
                           compilation_cache=False, max_batch_tokens=64).build()
    futures = [engine.submit(engine.prepare(TEXTS).sequences) for _ in range(5)]
    engine.shutdown()
    assert all(f.done() and f.result().shape == (len(TEXTS), engine.embedding_size)
               for f in futures)
    assert not any(c.thread.is_alive() for c in engine.cores)
    with pytest.raises(Exception, match="shut down"):
        engine.encode("too late")


def test_plan_step_packs_without_overflow():
    buckets = Buckets.build(256, 256)
    rng = np.random.default_rng(0)
    pending = [(i, rng.integers(0, 9, rng.integers(1, 120)).astype(np.int32)) for i in range(40)]
    seen: set[int] = set()
    left = [p[0] for p in pending]
    while left:
        todo = [p for p in pending if p[0] in set(left)]
        step, left = plan_step(todo, buckets)
        rows, length = step.tokens.shape
        assert rows * length <= 256 or rows == 1
        assert (rows, length) in buckets.shapes()
        for slot, sid in enumerate(step.sequences):
            seq = pending[sid][1]
            flat = step.tokens.reshape(-1)
            mask = step.seq_index.reshape(-1) == slot
            np.testing.assert_array_equal(flat[mask], seq)
            assert step.last_index[slot] == np.flatnonzero(mask)[-1]
            seen.add(sid)
    assert seen == set(range(40))


def test_a_token_step_returns_each_sequence_its_own_tokens():
    """Packed several a row: each sequence's span covers its own tokens (from its first pooled
    one, for states) or its positions before its last (for scores), whose targets are the
    tokens after them in the same sequence, never a neighbour's."""
    buckets = Buckets.build(256, 256)
    rng = np.random.default_rng(1)
    pending = [(i, rng.integers(3, 900, rng.integers(1, 40)).astype(np.int32)) for i in range(12)]
    skip = {3: 2, 5: 1}
    states, _ = plan_token_step(pending, buckets, skip)
    scores, _ = plan_token_step(pending, buckets, skip, score=True)
    assert states.sequences == scores.sequences and len(states.sequences) >= 8
    assert (states.score, scores.score) == (0, 1)
    assert int((states.segment_ids.max(1) > 1).sum()) >= 1  # some row holds several
    flat, goal = scores.tokens.reshape(-1), scores.targets.reshape(-1)
    for slot, sid in enumerate(states.sequences):
        seq = pending[sid][1]
        a, n = states.spans[slot]
        np.testing.assert_array_equal(flat[a : a + n], seq[skip.get(sid, 0):])
        a, n = scores.spans[slot]
        assert n == len(seq) - 1
        np.testing.assert_array_equal(flat[a : a + n], seq[:-1])
        np.testing.assert_array_equal(goal[a : a + n], seq[1:])
        assert goal[a + n] == 0  # after its last token: nothing of the next sequence


def _padding(lengths: np.ndarray, buckets: Buckets) -> float:
    """Padded minus real tokens over padded, planning steps until every sequence is placed."""
    pending = [(i, np.zeros(int(n), np.int32)) for i, n in enumerate(lengths)]
    real = padded = 0
    left = [p[0] for p in pending]
    while left:
        kept = set(left)
        step, left = plan_step([p for p in pending if p[0] in kept], buckets)
        real, padded = real + step.real_tokens, padded + step.padded_tokens
    return 1 - real / padded


def test_plan_step_packs_mixed_lengths_with_little_padding():
    # The benchmark's corpus shape: lengths spread log-uniformly from 8 to 512 tokens.
    lengths = np.exp(np.random.default_rng(0).uniform(np.log(8), np.log(512), 512)).astype(int)
    buckets = Buckets.build(2048, 1024)
    assert _padding(lengths, buckets) < 0.02
    # The same sequences one per row, as a planner that did not pack would place them.
    unpacked = sum(buckets.length_for(n) for n in lengths)
    assert 1 - lengths.sum() / unpacked > 0.2


@contextlib.contextmanager
def kernels_off():
    """Engines built inside run XLA's own ops, as where the kernels cannot run."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(kernels, "available", lambda: False)
        yield


@pytest.fixture(params=[True, False], ids=["bf16-kernel", "xla-dot"])
def kernel(request, monkeypatch) -> bool:
    """Whether engines built in the test use the CPU kernels (skipped where they cannot run);
    without them an engine runs XLA's own ops."""
    if not request.param:
        monkeypatch.setattr(kernels, "available", lambda: False)
    elif not kernels.available():
        pytest.skip(f"the CPU kernels cannot run here: {kernels.unavailable_reason()}")
    return request.param


def test_embeddings_with_bfloat16_projections(tiny_engine, kernel):
    engine = Engine(tiny_engine.checkpoint, max_batch_tokens=512,
                       embed_matmul_dtype="bfloat16")
    try:
        narrowed = engine.runner.embed_params
        for group, names in (("layers", ("wq", "wk", "wv", "wo")),
                             ("mlp", ("w_gate", "w_up", "w_down"))):
            for name in names:
                got = narrowed[group][name]
                want = engine.params[group][name].astype(jnp.bfloat16)
                if kernel:  # the stacked weights, packed for kernels.matmul
                    assert isinstance(got, kernels.Packed)
                    got = got.unpacked()
                assert got.dtype == jnp.bfloat16
                np.testing.assert_array_equal(got, want)
                assert engine.params[group][name].dtype == jnp.float32  # generation's own
        assert narrowed["embed"] is engine.params["embed"]  # the rest is shared, not copied
        want, got = tiny_engine.encode(TEXTS), engine.encode(TEXTS)
        cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
        assert cos.min() > 0.999
        assert np.abs(got - want).max() > 1e-6  # the narrow products did run
        kw = dict(temperature=0, max_tokens=6, ignore_eos=True)
        assert (engine.generate("hello there", **kw).choices[0].token_ids
                == tiny_engine.generate("hello there", **kw).choices[0].token_ids)
    finally:
        engine.shutdown()
    with pytest.raises(ValueError, match="'bfloat16'"):
        Engine(tiny_engine.checkpoint, embed_matmul_dtype="int8")



def test_decoding_with_bfloat16_projections(tiny_engine, kernel):
    engine = Engine(tiny_engine.checkpoint, max_batch_tokens=512, max_num_seqs=4,
                       decode_matmul_dtype="bfloat16")
    try:
        assert engine.plan.decode_weights.packed == kernel
        # Without the kernel a single bf16 row takes XLA's slow path: one stream decodes in
        # 2-row steps.
        assert engine.cores[0].scheduler.decode_rows == ((1, 2, 4) if kernel else (2, 4))
        prompts = ["hello there", "one two three four five six"]
        kw = dict(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)
        alone = [engine.generate(p, **kw).choices[0] for p in prompts]
        with ThreadPoolExecutor(len(prompts)) as pool:
            together = [r.choices[0] for r in pool.map(lambda p: engine.generate(p, **kw),
                                                       prompts)]
        assert [c.token_ids for c in together] == [c.token_ids for c in alone]
        weights = engine.runner.decode_weights
        layer, ffn = weights.layers[0]
        assert layer["attn_norm"].dtype == jnp.float32  # only the projections narrow
        cfg = engine.config
        head = model.output_head(engine.params, cfg).astype(jnp.bfloat16)
        got_head = weights.head
        if kernel:  # every weight of the tiny model has a shape the kernel takes
            assert all(isinstance(w, kernels.Packed) for w in (layer["wq"], ffn["w_down"], got_head))
            got_head = got_head.unpacked()
            np.testing.assert_array_equal(ffn["w_down"].unpacked(),
                                          engine.params["mlp"]["w_down"][0].astype(jnp.bfloat16))
        else:
            assert layer["wq"].dtype == ffn["w_down"].dtype == jnp.bfloat16
        assert got_head.dtype == jnp.bfloat16
        np.testing.assert_array_equal(got_head, head)
        assert engine.params["layers"]["wq"].dtype == jnp.float32  # embeddings and prefill's
        kv = engine.runner.state.kv
        assert kv.dtype == kv_cache.BF16_BITS and engine.plan.kv_dtype == plan.BF16_BITS
        # Against float32, token by token while the texts agree: the first token comes from the
        # (float32) prefill, the rest from narrowed decode steps, close but not equal.
        compared, differ = 0, 0.0
        for p, got in zip(prompts, alone, strict=True):
            want = tiny_engine.generate(p, **kw).choices[0]
            assert got.token_ids[0] == want.token_ids[0]
            assert got.logprobs[0].logprob == pytest.approx(want.logprobs[0].logprob, abs=1e-5)
            for i in range(1, len(want.token_ids)):
                if got.token_ids[:i] != want.token_ids[:i]:
                    break
                a, b = got.logprobs[i].logprob, want.logprobs[i].logprob
                assert a == pytest.approx(b, abs=0.05), (p, i)
                compared, differ = compared + 1, max(differ, abs(a - b))
        assert compared >= 4 and differ > 1e-6  # the narrow products did run
    finally:
        engine.shutdown()
    with pytest.raises(ValueError, match="decode_matmul_dtype"):
        Engine(tiny_engine.checkpoint, decode_matmul_dtype="float16")


def test_float32_decoding_in_the_kernel(tiny_engine, kernel):
    # Float32 decode steps multiply in kernels.matmul too, from float32 weights packed for it:
    # the same tokens and, to float32 rounding, the same log-probabilities as XLA's products.
    engine = Engine(tiny_engine.checkpoint, max_batch_tokens=512, max_num_seqs=4)
    try:
        assert engine.plan.decode_weights.packed == kernel
        kw = dict(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
        got = engine.generate("one two three four five six", **kw).choices[0]
        weights = engine.runner.decode_weights
        layer, ffn = weights.layers[0]
        if kernel:
            assert layer["wq"].kind == ffn["w_down"].kind == weights.head.kind == "float32"
            np.testing.assert_array_equal(ffn["w_down"].unpacked(),
                                          engine.params["mlp"]["w_down"][0])
            np.testing.assert_array_equal(weights.head.unpacked(),
                                          model.output_head(engine.params, engine.config))
        else:
            assert layer["wq"].ndim == 2 and weights.head is None
        assert engine.runner.state.kv.dtype == jnp.float32
    finally:
        engine.shutdown()
    with kernels_off():
        xla = Engine(tiny_engine.checkpoint, max_batch_tokens=512, max_num_seqs=4)
    try:
        assert not xla.plan.decode_weights.packed
        want = xla.generate("one two three four five six", **kw).choices[0]
    finally:
        xla.shutdown()
    assert got.token_ids == want.token_ids
    for a, b in zip(got.logprobs, want.logprobs, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)

# ---- the contract's extensions: normalize, dimensions, pooling choice, truncation, defaults ----


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_normalize_and_dimensions(tiny_engine):
    full = tiny_engine.encode(TEXTS)
    normed = tiny_engine.embed(EmbeddingRequest(input=TEXTS, normalize=True))
    got = np.array([d.embedding for d in normed.data])
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)
    invariant(got, unit(full))
    # A cut vector is re-normalized only when normalization is in effect.
    cut = tiny_engine.embed(EmbeddingRequest(input=TEXTS, normalize=True, dimensions=8))
    invariant(np.array([d.embedding for d in cut.data]), unit(full[:, :8]))
    plain = tiny_engine.embed(EmbeddingRequest(input=TEXTS, normalize=False, dimensions=8))
    invariant(np.array([d.embedding for d in plain.data]), full[:, :8])
    invariant(tiny_engine.encode(TEXTS, normalize=True), unit(full))


def test_server_defaults_and_precedence(tiny_engine):
    defaults = EmbeddingDefaults(normalize=True, embedding_type=EmbeddingType.Last,
                                 truncate_prompt_tokens=4)
    engine = Engine(tiny_engine.checkpoint, max_batch_tokens=512, defaults=defaults)
    try:
        text = TEXTS[1]
        ids = tiny_engine.tokenize([text])[0]
        last4 = last_vectors(tiny_engine, [ids[-4:]])[0]
        # Unset fields take the server's defaults...
        resp = engine.embed(EmbeddingRequest(input=text))
        invariant(np.array(resp.data[0].embedding), unit(last4))
        assert resp.usage.prompt_tokens == 4
        # ...and a request's own values win over them.
        resp = engine.embed(EmbeddingRequest(input=text, normalize=False, embedding_type="mean",
                                             truncate_prompt_tokens=-1))
        invariant(np.array(resp.data[0].embedding), tiny_engine.encode(text))
        assert resp.usage.prompt_tokens == len(ids)
    finally:
        engine.shutdown()


def last_vectors(engine, seqs) -> np.ndarray:
    return engine.submit([np.asarray(s, np.int32) for s in seqs], EmbeddingType.Last).result()


def test_cls_needs_a_bidirectional_model(tiny_engine):
    assert tiny_engine.is_causal
    with pytest.raises(InvalidRequestError, match="causal") as e:
        tiny_engine.embed(EmbeddingRequest(input="x", embedding_type="cls"))
    assert e.value.param == "embedding_type" and "'mean' or 'last'" in e.value.message
    with pytest.raises(ValueError, match="bad server default.*cls"):
        Engine(tiny_engine.checkpoint, defaults=EmbeddingDefaults(embedding_type="cls"))


def test_truncation_keeps_the_last_tokens(tiny_engine):
    limit = tiny_engine.max_model_len
    ids = [int(t) for t in np.random.default_rng(3).integers(1, 300, limit + 40)]
    want = tiny_engine.submit([np.asarray(ids[-limit:], np.int32)]).result()[0]
    resp = tiny_engine.embed(EmbeddingRequest(input=ids, truncate_prompt_tokens=-1))
    invariant(np.array(resp.data[0].embedding), want)
    assert resp.usage.prompt_tokens == limit  # usage counts what was embedded
    resp = tiny_engine.embed(EmbeddingRequest(input=[ids, ids[:3]], truncate_prompt_tokens=5))
    assert resp.usage.prompt_tokens == 5 + 3  # shorter inputs are left whole
    invariant(np.array(resp.data[0].embedding),
              tiny_engine.submit([np.asarray(ids[-5:], np.int32)]).result()[0])
    with pytest.raises(InvalidRequestError, match="context_length|limit of"):
        tiny_engine.embed(EmbeddingRequest(input=ids))


@pytest.mark.parametrize("bad", [0, -2, 10**9, 1.5, "4", True])
def test_bad_truncation_values(tiny_engine, bad):
    with pytest.raises(InvalidRequestError) as e:
        tiny_engine.embed(EmbeddingRequest(input="x", truncate_prompt_tokens=bad))
    assert e.value.param == "truncate_prompt_tokens" and "-1" in e.value.message


@pytest.mark.parametrize("field, bad", [
    ("normalize", "yes"), ("normalize", 1), ("dimensions", 2.0), ("dimensions", True),
    ("encoding_format", "hex"), ("embedding_type", "max"),
])
def test_python_api_checks_field_types(tiny_engine, field, bad):
    with pytest.raises(InvalidRequestError) as e:
        tiny_engine.embed(EmbeddingRequest(input="x", **{field: bad}))
    assert e.value.param == field


def test_lone_surrogate_text_is_refused(tiny_engine):
    with pytest.raises(InvalidRequestError, match="surrogate") as e:
        tiny_engine.embed(EmbeddingRequest(input=["ok", "bad \ud800"]))
    assert e.value.param == "input" and "input[1]" in e.value.message


def test_request_token_limit(tiny_engine):
    engine = Engine(tiny_engine.checkpoint, max_batch_tokens=512, max_request_tokens=10)
    try:
        with pytest.raises(InvalidRequestError, match="limit of 10") as e:
            engine.embed(EmbeddingRequest(input=[[1] * 6, [2] * 6]))
        assert e.value.code == "request_too_large"
        assert engine.embed(EmbeddingRequest(input=[[1] * 6, [2] * 4])).usage.prompt_tokens == 10
    finally:
        engine.shutdown()


# ---- queue bound, pause, cancellation, timing --------------------------------------------------


@pytest.fixture
def small_queue_engine(tiny_engine):
    """An engine over the shared weights whose queue holds three requests."""
    engine = Engine(tiny_engine.checkpoint, max_batch_tokens=512, max_queued_requests=3)
    yield engine
    engine.shutdown()


def test_queue_bound_and_pause(small_queue_engine):
    engine = small_queue_engine
    seqs = engine.prepare(TEXTS[:2]).sequences
    steps = engine.stats.steps
    with engine.paused():
        futures = [engine.submit(seqs) for _ in range(3)]
        assert engine.queue_depth == 3
        with pytest.raises(EngineOverloadedError) as e:
            engine.submit(seqs)
        assert e.value.status == 429 and e.value.retry_after
        assert engine.stats.rejected == 1
        assert not any(f.done() for f in futures) and engine.stats.steps == steps
    for f in futures:
        assert f.result(timeout=60).shape == (2, engine.embedding_size)
        t = f.timing
        assert t.started is not None and t.finished is not None
        assert t.queue_seconds > 0 and t.inference_seconds > 0
    assert engine.queue_depth == 0
    engine.submit(seqs).result(timeout=60)  # recovered


def test_cancelled_work_is_dropped_before_it_runs(small_queue_engine):
    engine = small_queue_engine
    a, b = engine.prepare(["first text"]).sequences, engine.prepare(["second one"]).sequences
    before = engine.stats_snapshot()
    with engine.paused():
        fa, fb = engine.submit(a), engine.submit(b)
        assert fa.cancel()
        assert engine.queue_depth == 1  # a cancelled request frees its place at once
    fb.result(timeout=60)
    after = engine.stats_snapshot()
    assert after.cancelled - before.cancelled == 1
    assert after.sequences - before.sequences == 1
    assert after.requests - before.requests == 1


def test_aembed_cancellation_drops_the_work(small_queue_engine):
    engine = small_queue_engine

    async def main() -> None:
        task = asyncio.ensure_future(engine.aembed(EmbeddingRequest(input="gone soon")))
        while engine.queue_depth == 0:  # until the request is queued
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with engine.paused():
        asyncio.run(main())
        assert engine.queue_depth == 0
    assert engine.encode("after").shape == (engine.embedding_size,)
    assert engine.stats.cancelled == 1


def test_shutdown_ends_a_pause_and_finishes_the_queue(tiny_engine):
    engine = Engine(tiny_engine.checkpoint, max_batch_tokens=512)
    engine.pause()
    futures = [engine.submit(engine.prepare([t]).sequences) for t in TEXTS]
    assert engine.ready
    engine.shutdown()
    assert not engine.ready and all(f.done() and not f.exception() for f in futures)
    with pytest.raises(EngineUnavailableError) as e:
        engine.submit(engine.prepare(["late"]).sequences)
    assert e.value.status == 503


def test_an_error_outside_a_step_fails_its_requests_not_the_engine(tiny_engine, monkeypatch):
    """A bug past a step's own handling (in planning, say) fails the work in flight with a
    500-class error; the engine thread lives on, so later requests are served and /health
    stays true."""
    core = tiny_engine.cores[0]

    def boom() -> None:
        raise RuntimeError("a planning bug")

    monkeypatch.setattr(core.batcher, "step", boom)
    with pytest.raises(EngineError) as e:
        tiny_engine.encode(["fails"])
    assert e.value.status == 500 and "retry" in str(e.value)
    monkeypatch.setattr(core.scheduler, "prefill_step", boom)
    with pytest.raises(EngineError):
        tiny_engine.generate("fails too", max_tokens=2, temperature=0)
    monkeypatch.undo()
    assert tiny_engine.ready and core.thread.is_alive()
    assert tiny_engine.encode(["served"]).shape == (1, tiny_engine.embedding_size)
    r = tiny_engine.generate("served", max_tokens=2, temperature=0, ignore_eos=True)
    assert len(r.choices[0].token_ids) == 2


def test_a_step_returns_one_vector_per_sequence_pooled_as_asked(tiny_engine):
    """Each sequence is pooled on the device as its request asks; one [slots, D] array comes
    back, not every pooling of every slot."""
    texts = ["first text here", "a second, longer text for the same step", "third"]
    ids = tiny_engine.tokenize(texts)
    kinds = [EmbeddingType.Mean, EmbeddingType.Last, EmbeddingType.Mean]
    step, left = plan_step([(i, np.asarray(t, np.int32)) for i, t in enumerate(ids)],
                           tiny_engine.buckets, pooling=dict(enumerate(kinds)))
    assert not left
    out = tiny_engine.runner.run(step)
    assert out.shape == (len(step.pick_index), tiny_engine.embedding_size)
    got = np.asarray(out)
    for slot, sid in enumerate(step.sequences):
        want = tiny_engine.encode(texts[sid], kinds[sid].value)
        np.testing.assert_allclose(got[slot], want, rtol=1e-5, atol=1e-5)


def test_chunked_processing_embeds_long_inputs_in_windows(tiny_engine: Engine,
                                                          tiny_llama_dir) -> None:
    """An input past the limit, with 'chunked': windows of the limit's length, combined as
    vLLM does (mean: weighted by each window's tokens; last: the last window's), each window
    the vector it gets alone; usage counts every token run. With an overlap, later windows
    start early and leave the overlap out of their pooling: every token is pooled once."""
    limit = tiny_engine.max_model_len
    rng = np.random.default_rng(3)
    ids = rng.integers(3, tiny_engine.config.vocab_size, 2 * limit + 37).tolist()
    windows = [ids[:limit], ids[limit : 2 * limit], ids[2 * limit :]]

    def vectors(**fields: object) -> np.ndarray:
        r = tiny_engine.embed(EmbeddingRequest(input=[ids], chunked=True, **fields))
        assert r.usage.prompt_tokens == len(ids)
        return np.asarray(r.data[0].embedding)

    alone = np.asarray([d.embedding for d in tiny_engine.embed(windows).data])
    weights = np.array([len(w) for w in windows], float)
    np.testing.assert_allclose(vectors(), weights @ alone / weights.sum(), atol=1e-5)
    last = tiny_engine.embed(EmbeddingRequest(input=[windows[-1]], embedding_type="last"))
    np.testing.assert_allclose(vectors(embedding_type="last"), last.data[0].embedding,
                               atol=1e-5)
    normalized = vectors(normalize=True)
    assert abs(np.linalg.norm(normalized) - 1) < 1e-5
    with pytest.raises(InvalidRequestError) as e:  # unasked, it is refused as before
        tiny_engine.embed(EmbeddingRequest(input=[ids]))
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(InvalidRequestError) as e:
        tiny_engine.embed(EmbeddingRequest(input=[ids], chunked=True, embedding_type="none"))
    assert e.value.param == "chunked"

    overlap = 16
    engine = EngineBuilder(model=tiny_llama_dir, dtype="float32", warmup=False, progress=False,
                           compilation_cache=False, chunk_overlap=overlap).build()
    try:
        r = engine.embed(EmbeddingRequest(input=[ids], chunked=True))
        starts = [0, limit - overlap, 2 * limit - 2 * overlap]
        parts = [ids[a : a + limit] for a in starts]
        assert sum(len(p) for p in parts) - 2 * overlap == len(ids)  # each token pooled once
        assert r.usage.prompt_tokens == sum(len(p) for p in parts)
        pooled = engine.submit([np.asarray(p, np.int32) for p in parts],
                               skip=[0, overlap, overlap]).result()
        counts = np.array([len(parts[0]), limit - overlap, len(parts[2]) - overlap], float)
        np.testing.assert_allclose(r.data[0].embedding, counts @ pooled / counts.sum(),
                                   atol=1e-5)
        # The overlap is context: the windows' vectors differ from the plain split's.
        assert not np.allclose(r.data[0].embedding, vectors(), atol=1e-4)
    finally:
        engine.shutdown()


def test_a_token_step_crosses_hosts_as_a_message():
    from jaxembed.steps import TokenStep, from_message

    buckets = Buckets.build(256, 256)
    pending = [(0, np.arange(3, 20, dtype=np.int32)), (1, np.arange(5, 9, dtype=np.int32))]
    for score in (False, True):
        step, _ = plan_token_step(pending, buckets, score=score)
        kind, arrays, static = step.message()
        again = from_message(kind, arrays, static)
        assert isinstance(again, TokenStep) and again.score == int(score)
        for a, b in zip(again.inputs(), step.inputs(), strict=True):
            np.testing.assert_array_equal(a, b)


def test_embedding_steps_stall_a_decoding_stream_by_at_most_one_step(tiny_engine, monkeypatch):
    """A burst of embeddings many steps long, queued while a stream decodes: the engine loop runs
    at most one embedding step between two decode steps, so the stream keeps its pace, and the
    embeddings still finish while it runs."""
    core = tiny_engine.cores[0]
    events: list[str] = []

    def spy(name: str, method):
        def run() -> None:
            events.append(name)
            method()
        monkeypatch.setattr(core.scheduler if name == "decode" else core.batcher,
                            "step" if name == "embed" else "decode_step", run)

    spy("embed", core.batcher.step)
    spy("decode", core.scheduler.decode_step)
    rng = np.random.default_rng(0)
    # 512-token steps here: 48 sequences of 200 tokens take 24 of them, at least.
    burst = [rng.integers(5, 250, 200).astype(np.int32) for _ in range(48)]
    stream = tiny_engine.generate_stream("hello there", max_tokens=60, temperature=0,
                                         ignore_eos=True)
    first = next(iter(stream))  # the stream is decoding
    future = tiny_engine.submit(burst)
    assert future.result(timeout=120).shape == (48, tiny_engine.hidden_size)
    rest = list(stream)
    assert first is not None and rest
    monkeypatch.undo()
    decodes = [i for i, e in enumerate(events) if e == "decode"]
    embeds = [i for i, e in enumerate(events) if e == "embed"]
    assert len(embeds) >= 24 and len(decodes) >= 24
    # While the stream ran, no two embedding steps came without a decode step between them.
    during = events[decodes[0]:decodes[-1]]
    runs = "".join("E" if e == "embed" else "D" for e in during)
    assert "EE" not in runs, runs
    assert runs.count("E") >= 24, "the control: the burst ran while the stream decoded"
