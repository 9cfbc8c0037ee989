"""Generation in the engine and over HTTP, on the real SmolLM2: continuous batching, sampling,
stops, cancellation, the OpenAI routes with the official client, and bad input."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from litestar.testing import TestClient

from jaxembed import Engine, EngineBuilder, InvalidRequestError
from jaxembed.generation import ChatTemplate
from jaxembed.server.app import create_app

from live import serve_in_thread
from test_server import assert_openai_error
from test_serving import bos_model_dir

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a land far away, there lived a",
    "def fibonacci(n):",
    "List three colors:",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "In 1492,",
    "Water boils at",
    "My favourite book is about a young wizard who goes to a school of magic and",
]


def wait_idle(engine: Engine, timeout: float = 30.0) -> None:
    """Until no sequence holds a slot (a cancelled one is freed at the next step)."""
    deadline = time.monotonic() + timeout
    scheduler = engine.cores[0].scheduler
    while scheduler.has_work:
        assert time.monotonic() < deadline, "the engine kept sequences it should have freed"
        time.sleep(0.02)
    assert sorted(scheduler.free_slots) == list(range(engine.max_num_seqs))


def greedy(engine: Engine, prompt: str, n: int = 12) -> list[int]:
    return engine.generate(prompt, temperature=0, max_tokens=n, ignore_eos=True
                           ).choices[0].token_ids


# ---- the engine ----------------------------------------------------------------------------


def test_logit_bias_bans_and_forces_tokens(smollm2_engine: Engine) -> None:
    """-100 bans a token: greedy text goes around it; 100 forces one under greedy decoding."""
    prompt = "The capital of France is"
    plain = greedy(smollm2_engine, prompt)
    banned = plain[0]
    around = smollm2_engine.generate(prompt, temperature=0, max_tokens=12, ignore_eos=True,
                                     logit_bias={str(banned): -100}).choices[0].token_ids
    assert around[0] != banned and banned not in around
    forced = 1234
    assert forced not in plain
    got = smollm2_engine.generate(prompt, temperature=0, max_tokens=6, ignore_eos=True,
                                  logit_bias={forced: 100}).choices[0].token_ids
    assert got == [forced] * 6
    # Sampled too: a banned token is never drawn, whatever the seed.
    for seed in range(4):
        drawn = smollm2_engine.generate(prompt, temperature=1.0, seed=seed, max_tokens=8,
                                        logit_bias={str(banned): -100}).choices[0].token_ids
        assert banned not in drawn


def test_logprobs_are_taken_after_the_bias(smollm2_engine: Engine) -> None:
    """As OpenAI's: a token's logprob is that of the biased logits (before penalties and
    temperature), so a forced token's is near 0 and a banned one leaves the top alternatives."""
    prompt = "The capital of France is"
    first = smollm2_engine.generate(prompt, temperature=0, max_tokens=1, logprobs=20)
    token = first.choices[0].token_ids[0]
    assert 1234 not in [t for t, _ in first.choices[0].logprobs[0].top]  # unlikely unbiased
    forced = smollm2_engine.generate(prompt, temperature=0, max_tokens=1, logprobs=5,
                                     logit_bias={1234: 100}).choices[0]
    assert forced.token_ids == [1234] and forced.logprobs[0].logprob > -1e-3
    banned = smollm2_engine.generate(prompt, temperature=0, max_tokens=1, logprobs=20,
                                     logit_bias={token: -100}).choices[0]
    assert token not in [t for t, _ in banned.logprobs[0].top]


def test_a_biased_stream_leaves_the_others_in_its_step_alone(smollm2_engine: Engine) -> None:
    prompts = ["The capital of France is", "def fibonacci(n):"]
    alone = [greedy(smollm2_engine, p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        free = pool.submit(greedy, smollm2_engine, prompts[1])
        biased = pool.submit(lambda: smollm2_engine.generate(
            prompts[0], temperature=0, max_tokens=12, ignore_eos=True,
            logit_bias={alone[0][0]: -100}).choices[0].token_ids)
        assert free.result() == alone[1]
        assert biased.result()[0] != alone[0][0]


def test_concurrent_requests_get_what_they_get_alone(smollm2_engine: Engine) -> None:
    e = smollm2_engine
    lengths = [6, 14, 9, 20, 3, 11, 16, 8]  # they finish at different steps
    alone = [greedy(e, p, n) for p, n in zip(PROMPTS, lengths, strict=True)]
    texts = ["a text to embed while generation runs", "and another, longer one " * 5]
    embedded_alone = e.encode(texts)
    steps_before = e.stats_snapshot().decode_steps
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS) + 1) as pool:
        futures = [pool.submit(greedy, e, p, n) for p, n in zip(PROMPTS, lengths, strict=True)]
        time.sleep(0.5)  # the generations are under way
        embedded = pool.submit(e.encode, texts).result()
        together = [f.result() for f in futures]
    assert together == alone
    np.testing.assert_allclose(embedded, embedded_alone, rtol=1e-5, atol=1e-5)
    # They shared steps: far fewer than one step per token of each request.
    assert e.stats_snapshot().decode_steps - steps_before < sum(lengths)
    wait_idle(e)


def test_steps_dispatched_ahead_change_no_output(smollm2_engine: Engine) -> None:
    # The engine dispatches a decode step before the last one's tokens are read; its tokens
    # must be the ones a step dispatched afterwards would draw, whatever happens in between:
    # sequences stopping (by stop string, end of text or length), joining, sampling with a
    # seed and with penalties (which count each fed token once).
    e = smollm2_engine
    requests = [(PROMPTS[0], dict(temperature=0, max_tokens=20, ignore_eos=True)),
                (PROMPTS[1], dict(temperature=0.8, top_p=0.9, seed=7, max_tokens=24)),
                (PROMPTS[2], dict(temperature=0, max_tokens=18, repetition_penalty=1.3,
                                  frequency_penalty=0.4, ignore_eos=True)),
                (PROMPTS[3], dict(temperature=0, max_tokens=30, stop=[","])),
                (PROMPTS[4], dict(temperature=1.0, seed=3, max_tokens=9, n=2)),
                (PROMPTS[5], dict(temperature=0, max_tokens=5))]

    def run(i: int) -> list[tuple]:
        time.sleep(0.05 * i)  # they join at different steps
        out = e.generate(requests[i][0], **requests[i][1])
        return [(c.token_ids, c.text, c.finish_reason) for c in out.choices]

    def run_all() -> tuple[list, list]:
        alone = [run(0), run(3)]
        with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
            return alone, list(pool.map(run, range(len(requests))))

    scheduler = e.cores[0].scheduler
    scheduler.run_ahead = False
    try:
        want = run_all()
    finally:
        scheduler.run_ahead = True
    before, steps = scheduler.ahead_steps, e.stats_snapshot().decode_steps
    got = run_all()
    ahead, steps = scheduler.ahead_steps - before, e.stats_snapshot().decode_steps - steps
    assert ahead > steps / 2  # most steps ran ahead
    assert got == want
    wait_idle(e)


def _penalized_greedy(hf: Any, prompt: list[int], n: int, repetition: float = 1.0,
                      frequency: float = 0.0, presence: float = 0.0) -> list[int]:
    """The reference: transformers' logits, penalized as sampling.penalize says (repetition over
    the prompt and the generated tokens, as transformers' processor; frequency and presence over
    the generated ones, as OpenAI's), then the argmax."""
    import torch

    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            z = hf(torch.tensor([ids])).logits[0, -1].double().numpy()
            seen = np.zeros_like(z, bool)
            seen[ids] = True
            z = np.where(seen, np.where(z > 0, z / repetition, z * repetition), z)
            counts = np.bincount(out, minlength=len(z)) if out else np.zeros(len(z))
            z = z - frequency * counts - presence * (counts > 0)
            out.append(int(np.argmax(z)))
            ids.append(out[-1])
    return out


@pytest.mark.parametrize("penalties", [{"repetition_penalty": 1.8},
                                       {"frequency_penalty": 1.5, "presence_penalty": 0.5}])
def test_penalties_follow_the_tokens_generated(tiny_engine: Engine, tiny_llama_dir: Path,
                                               penalties: dict[str, float]) -> None:
    # End to end: the engine's per-slot counts of prompt and generated tokens, updated in every
    # decode step, alone (one-row steps) and beside another request (two rows).
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, torch_dtype="float32").eval()
    prompts = [[5, 9, 9, 14, 3, 7], [11, 2, 30, 30, 30]]
    n = 16
    want = [_penalized_greedy(hf, p, n, penalties.get("repetition_penalty", 1.0),
                              penalties.get("frequency_penalty", 0.0),
                              penalties.get("presence_penalty", 0.0)) for p in prompts]
    plain = [_penalized_greedy(hf, p, n) for p in prompts]
    assert want != plain  # the penalties change the text, so the comparison can fail
    kw = dict(temperature=0, max_tokens=n, ignore_eos=True, **penalties)
    alone = [tiny_engine.generate(p, **kw).choices[0].token_ids for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda p: tiny_engine.generate(p, **kw).choices[0].token_ids,
                                 prompts))
    assert alone == want
    assert together == want


def test_steady_serving_does_not_compile(smollm2_engine: Engine) -> None:
    e = smollm2_engine

    def workload() -> None:
        # Submitted while paused, so both passes batch the same way (not by thread timing).
        with e.paused():
            streams = [e.generate_stream(p, temperature=0, max_tokens=n, ignore_eos=True)
                       for p, n in zip(PROMPTS[:4], (10, 4, 7, 10), strict=True)]
        for s in streams:
            list(s)

    workload()  # first pass: whatever shapes it needs are compiled now
    before = e.stats_snapshot().compilations
    workload()
    assert e.stats_snapshot().compilations == before


def test_generation_warm_up_compiles_every_decode_shape(tiny_llama_dir: Path) -> None:
    """On a fresh engine (no prompt has run yet, so no cache exists), then nothing compiles."""
    e = EngineBuilder(model=tiny_llama_dir, warmup=False, progress=False, compilation_cache=False,
                      max_num_seqs=2, max_model_len=256).build()
    try:
        e.warmup_generation()
        before = e.stats_snapshot().compilations
        scheduler = e.cores[0].scheduler
        assert before >= len(scheduler.decode_rows) * len(scheduler.decode_lengths)
        for prompt, n in (("hello", 5), ("a somewhat longer prompt than that", 3)):
            r = e.generate(prompt, temperature=0, max_tokens=n, ignore_eos=True)
            assert len(r.choices[0].token_ids) == n
        # Two prompts admitted together (queued while paused): a two-row prefill, warmed too.
        with e.paused():
            pair = [e.submit_generation(e.prepare_prompt(p), e.sampling_params(
                temperature=0, max_tokens=2, ignore_eos=True)) for p in ("one", "two")]
        assert all(len(s.collect(list(s)).choices[0].token_ids) == 2 for s in pair)
        assert e.stats.prefill_steps == 3
        assert e.stats_snapshot().compilations == before
    finally:
        e.shutdown()


def test_seeded_sampling_repeats_alone_and_among_others(smollm2_engine: Engine) -> None:
    e = smollm2_engine
    kw: dict[str, Any] = dict(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=16,
                              ignore_eos=True)
    first = e.generate(PROMPTS[1], **kw).text
    assert e.generate(PROMPTS[1], **kw).text == first
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        others = [pool.submit(greedy, e, p, 20) for p in PROMPTS[2:5]]
        assert pool.submit(e.generate, PROMPTS[1], **kw).result().text == first
        [f.result() for f in others]
    other_seeds = {e.generate(PROMPTS[1], **{**kw, "seed": s}).text for s in range(4)}
    assert len(other_seeds) > 1  # the seed matters


def test_n_choices_are_independent_and_repeatable(smollm2_engine: Engine) -> None:
    e = smollm2_engine
    r = e.generate(PROMPTS[3], n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.text for c in r.choices}) > 1
    again = e.generate(PROMPTS[3], n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]
    assert r.completion_tokens == 30


def test_stop_strings_end_the_text_before_them(smollm2_engine: Engine) -> None:
    e = smollm2_engine
    full = e.generate(PROMPTS[1], temperature=0, max_tokens=24, ignore_eos=True)
    text = full.text
    stop = text[10:14]
    assert stop.strip() and text.find(stop) == 10
    r = e.generate(PROMPTS[1], temperature=0, max_tokens=24, ignore_eos=True, stop=(stop,))
    assert r.text == text[:10]
    assert r.choices[0].finish_reason == "stop"
    assert len(r.choices[0].token_ids) < 24  # the slot was freed early


def test_eos_and_length_finish(smollm2_engine: Engine) -> None:
    e = smollm2_engine
    r = e.chat([{"role": "user", "content": "What is the capital of France?"}], temperature=0,
               max_tokens=40)
    c = r.choices[0]
    assert c.finish_reason == "stop" and c.token_ids[-1] in e.stop_token_ids
    assert "Paris" in c.text and "<|im_end|>" not in c.text
    r = e.generate(PROMPTS[0], temperature=0, max_tokens=3, ignore_eos=True)
    assert r.choices[0].finish_reason == "length" and len(r.choices[0].token_ids) == 3


def test_a_closed_stream_frees_its_slot(smollm2_engine: Engine) -> None:
    e = smollm2_engine
    stream = e.generate_stream(PROMPTS[0], temperature=0, max_tokens=500, ignore_eos=True)
    first = next(iter(stream))
    assert first.token_ids
    stream.close()
    wait_idle(e)
    assert e.stats_snapshot().generated_tokens > 0


def test_async_generation_matches_the_sync_one(smollm2_engine: Engine) -> None:
    import asyncio

    e = smollm2_engine
    want = e.generate(PROMPTS[2], temperature=0, max_tokens=8, ignore_eos=True)

    async def run() -> tuple[str, list[str]]:
        whole = await e.agenerate(PROMPTS[2], temperature=0, max_tokens=8, ignore_eos=True)
        stream = await e.agenerate_stream(PROMPTS[2], temperature=0, max_tokens=8,
                                          ignore_eos=True)
        return whole.text, [d.text async for d in stream]

    text, pieces = asyncio.run(run())
    assert text == want.text == "".join(pieces)
    wait_idle(e)


def test_prompt_plus_max_tokens_must_fit_the_context(smollm2_engine: Engine) -> None:
    from jaxembed.errors import InvalidRequestError

    e = smollm2_engine
    with pytest.raises(InvalidRequestError, match="context") as info:
        e.generate("hello", max_tokens=e.max_model_len)
    assert info.value.param == "max_tokens"
    with pytest.raises(InvalidRequestError) as info:
        e.generate([1] * (e.max_model_len + 1), max_tokens=1)
    assert info.value.param == "prompt"


# ---- HTTP ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(smollm2_engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(smollm2_engine)) as c:
        yield c


@pytest.fixture(scope="module")
def live_api(smollm2_engine: Engine) -> Iterator[str]:
    with serve_in_thread(create_app(smollm2_engine)) as url:
        yield url


@pytest.fixture(scope="module")
def oai(live_api: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_api, api_key="unused", max_retries=0)


def test_openai_completions(oai: openai.OpenAI, smollm2_engine: Engine) -> None:
    r = oai.completions.create(model="default", prompt=PROMPTS[0], max_tokens=8, temperature=0,
                               logprobs=2)
    want = smollm2_engine.generate(PROMPTS[0], temperature=0, max_tokens=8)
    c = r.choices[0]
    assert c.text == want.text and c.finish_reason == want.choices[0].finish_reason
    assert r.usage.prompt_tokens == len(smollm2_engine.prepare_prompt(PROMPTS[0]))
    assert r.usage.completion_tokens == len(want.choices[0].token_ids)
    assert "".join(c.logprobs.tokens) == c.text
    assert all(len(t) == 2 for t in c.logprobs.top_logprobs)
    assert r.object == "text_completion" and r.model == smollm2_engine.model_name


def test_openai_completions_several_prompts_and_echo(oai: openai.OpenAI) -> None:
    r = oai.completions.create(model="default", prompt=PROMPTS[:2], max_tokens=4, temperature=0,
                               n=2, echo=True)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in r.choices}
    assert by_index[0].startswith(PROMPTS[0]) and by_index[2].startswith(PROMPTS[1])
    assert by_index[0] == by_index[1]  # greedy: both choices agree


def test_echo_is_the_prompt_as_sent(client: TestClient, smollm2_engine: Engine) -> None:
    """A text comes back exactly (a special token written in it too); token ids come back
    decoded, their special tokens kept when skip_special_tokens is false."""
    def echoed(prompt: object, **fields: Any) -> str:
        body = {"prompt": prompt, "echo": True, "max_tokens": 1, "temperature": 0, **fields}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    for text in ["<|im_start|>Hello,", "  Naïve   café 🙂\n\tdone"]:
        assert echoed(text).startswith(text)
    ids = smollm2_engine.tokenizer.encode("<|im_start|>Hello,", add_special_tokens=False).ids
    assert echoed(ids, skip_special_tokens=False).startswith("<|im_start|>Hello,")
    assert echoed(ids).startswith("Hello,")


def test_echo_with_logprobs_scores_the_prompt(client: TestClient, smollm2_engine: Engine
                                               ) -> None:
    """OpenAI's legacy shape: tokens, token_logprobs, top_logprobs and text_offset cover the
    prompt, then the completion; the first prompt token has null for both; the prompt's values
    are the engine's scores of it (held to transformers in test_generation_parity)."""
    prompt = "Hello, my name is"
    ids = smollm2_engine.prepare_prompt(prompt)
    n = len(ids)
    scored = smollm2_engine.prompt_logprobs(prompt, 2)
    texts = [smollm2_engine.tokenizer.decode([int(i)], skip_special_tokens=False) for i in ids]

    def complete(**fields: Any) -> dict:
        body = {"prompt": prompt, "echo": True, "logprobs": 2, "temperature": 0, **fields}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()

    def check_prompt_part(lp: dict) -> None:
        assert lp["tokens"][:n] == texts
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        np.testing.assert_allclose(lp["token_logprobs"][1:n], [e.logprob for e in scored[1:]],
                                   atol=1e-5)
        for got, e in zip(lp["top_logprobs"][1:n], scored[1:], strict=True):
            assert len(got) == 2 and max(got.values()) == pytest.approx(e.top[0][1], abs=1e-5)
        assert lp["text_offset"][:n] == np.cumsum([0, *map(len, texts[:-1])]).tolist()

    r = complete(max_tokens=3)
    choice, lp = r["choices"][0], r["choices"][0]["logprobs"]
    assert r["usage"]["prompt_tokens"] == n and r["usage"]["completion_tokens"] == 3
    assert choice["text"].startswith(prompt) and len(lp["tokens"]) == n + 3
    check_prompt_part(lp)
    assert lp["text_offset"][n] == len(prompt)  # the completion's offsets follow the echo
    generated = smollm2_engine.generate(prompt, temperature=0, max_tokens=3, logprobs=2)
    assert lp["token_logprobs"][n:] == pytest.approx(
        [e.logprob for e in generated.choices[0].logprobs], abs=1e-5)

    # max_tokens 0 scores the prompt alone: nothing is generated.
    r = complete(max_tokens=0, n=2)
    assert r["usage"] == {"prompt_tokens": n, "completion_tokens": 0, "total_tokens": n}
    assert [c["text"] for c in r["choices"]] == [prompt, prompt]
    assert all(c["finish_reason"] == "length" for c in r["choices"])
    check_prompt_part(r["choices"][1]["logprobs"])
    assert len(r["choices"][1]["logprobs"]["tokens"]) == n

    # Streamed: the echo's event carries the prompt's log-probabilities.
    r = client.post("/v1/completions", json={"prompt": prompt, "echo": True, "logprobs": 2,
                                             "max_tokens": 2, "temperature": 0,
                                             "stream": True})
    events = [json.loads(line[6:]) for line in r.text.splitlines()
              if line.startswith("data: {")]
    first = events[0]["choices"][0]
    assert first["text"] == prompt and len(first["logprobs"]["tokens"]) == n
    check_prompt_part(first["logprobs"])
    assert sum(len(e["choices"][0]["logprobs"]["tokens"]) for e in events[1:]) == 2

    # Token-id prompts, several at once, scored in one step: each as alone.
    other = smollm2_engine.prepare_prompt("The capital of France is").tolist()
    r = client.post("/v1/completions", json={"prompt": [ids.tolist(), other], "echo": True,
                                             "logprobs": 0, "max_tokens": 0}).json()
    assert r["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(
        [e.logprob for e in scored[1:]], abs=1e-5)
    assert r["choices"][1]["logprobs"]["token_logprobs"][1:] == pytest.approx(
        [e.logprob for e in smollm2_engine.prompt_logprobs(other)[1:]], abs=1e-5)
    assert r["choices"][1]["logprobs"]["top_logprobs"][1] == {}  # logprobs 0: no alternatives


def test_openai_chat(oai: openai.OpenAI, smollm2_engine: Engine) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = oai.chat.completions.create(model="default", messages=messages, temperature=0,
                                    max_tokens=30, logprobs=True, top_logprobs=3)
    want = smollm2_engine.chat(messages, temperature=0, max_tokens=30)
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content == want.text
    assert c.finish_reason == "stop"
    assert r.usage.prompt_tokens == len(smollm2_engine.chat_prompt(messages))
    assert len(c.logprobs.content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 for t in c.logprobs.content)


def test_chat_prompt_has_exactly_one_bos(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A template that writes BOS itself, over a tokenizer that adds one too: tokenizing the
    rendered text must not add a second."""
    path = bos_model_dir(tiny_llama_dir, tmp_path / "tiny-chat")
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{{ bos_token }}{% for m in messages %}{{ m.role }}: "
                               "{{ m.content }}\n{% endfor %}")
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    e = EngineBuilder(model=path, warmup=False, progress=False, compilation_cache=False,
                      max_num_seqs=2).build()
    try:
        bos = e.checkpoint.tokenizer.bos_token_id
        assert e.tokenize(["x"])[0][0] == bos  # the tokenizer adds BOS to plain text
        ids = list(e.chat_prompt([{"role": "user", "content": "hello there"}]))
        assert ids[0] == bos and ids.count(bos) == 1
        r = e.chat([{"role": "user", "content": "hello"}], temperature=0, max_tokens=3,
                   ignore_eos=True)
        assert len(r.choices[0].token_ids) == 3
    finally:
        e.shutdown()


def test_openai_chat_stream_with_emoji(oai: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Write three smiley emojis."}]
    whole = oai.chat.completions.create(model="default", messages=messages, temperature=0,
                                        max_tokens=20)
    stream = oai.chat.completions.create(model="default", messages=messages, temperature=0,
                                         max_tokens=20, stream=True,
                                         stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            if ch.delta.content:
                pieces.append(ch.delta.content)
            finish = ch.finish_reason or finish
    text = "".join(pieces)
    assert text == whole.choices[0].message.content
    assert any(ord(ch) > 0x1F000 for ch in text)  # the model wrote emoji (3 tokens each)
    assert all("\ufffd" not in p for p in pieces)
    assert finish == "length" and usage.completion_tokens == 20


def test_openai_seeded_sampling_repeats(oai: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(model="default", prompt=PROMPTS[1], max_tokens=16, temperature=1.0,
                              top_p=0.9, seed=99)
    assert oai.completions.create(**kw).choices[0].text == \
        oai.completions.create(**kw).choices[0].text


def test_a_client_leaving_mid_stream_frees_its_slot(live_api: str,
                                                     smollm2_engine: Engine) -> None:
    body = {"prompt": PROMPTS[0], "max_tokens": 1000, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{live_api}/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert '"text_completion"' in first
    wait_idle(smollm2_engine)
    assert smollm2_engine.stats_snapshot().cancelled >= 1


CHAT = [{"role": "user", "content": "hi"}]
BAD = [
    ("completions", {"prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ("completions", {"prompt": "hi", "max_tokens": 10**9}, "max_tokens"),
    ("completions", {"prompt": "hi", "temperature": -0.5}, "temperature"),
    ("completions", {"prompt": "hi", "top_p": 0}, "top_p"),
    ("completions", {"prompt": "hi", "top_p": 1.5}, "top_p"),
    ("completions", {"prompt": "hi", "n": 0}, "n"),
    ("completions", {"prompt": "hi", "logprobs": 6}, "logprobs"),
    ("completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),  # 0 needs echo
    ("completions", {"prompt": "fox " * 3000, "max_tokens": 0, "echo": True}, "prompt"),
    ("completions", {"prompt": "hi", "seed": 2**63}, "seed"),
    ("chat/completions", {"messages": CHAT, "seed": -2**63 - 1}, "seed"),
    ("completions", {"prompt": ""}, "prompt"),
    ("completions", {"prompt": []}, "prompt"),
    ("completions", {"prompt": [10**9]}, "prompt"),
    ("completions", {"prompt": "fox " * 3000}, "prompt"),
    ("completions", {"prompt": "hi", "stop": [""]}, "stop"),
    ("completions", {"prompt": "hi", "suffix": "x"}, "suffix"),
    ("completions", {"prompt": "hi", "logit_bias": {"1": 101}}, "logit_bias"),
    ("completions", {"prompt": "hi", "logit_bias": {"1": -100.5}}, "logit_bias"),
    ("completions", {"prompt": "hi", "logit_bias": {"one": 5}}, "logit_bias"),
    ("completions", {"prompt": "hi", "logit_bias": {"-1": 5}}, "logit_bias"),
    ("completions", {"prompt": "hi", "logit_bias": {"49152": 5}}, "logit_bias"),
    ("completions", {"prompt": "hi", "logit_bias": {"1": "5"}}, "logit_bias"),
    ("completions", {"prompt": "hi", "logit_bias": {str(i): 1 for i in range(301)}},
     "logit_bias"),
    ("chat/completions", {"messages": CHAT, "logit_bias": {"1": 1e9}}, "logit_bias"),
    ("completions", {"prompt": "hi", "stream_options": {"include_usage": True}},
     "stream_options"),
    ("completions", {"prompt": "hi", "bogus": 1}, "bogus"),
    ("chat/completions", {"messages": []}, "messages"),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ("chat/completions", {"messages": [{"content": "hi"}]}, "messages"),
    ("chat/completions", {"messages": ["hi"]}, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages"),
    ("chat/completions", {"messages": CHAT, "max_completion_tokens": 0},
     "max_completion_tokens"),
    ("chat/completions", {"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 21}, "logprobs"),
    ("chat/completions", {"messages": CHAT, "tools": [{"type": "function"}]}, "tools"),
    # Names the renderer sets itself: a keyword given twice, or a helper replaced by a value.
    *(("chat/completions", {"messages": CHAT, "chat_template_kwargs": kw}, "chat_template_kwargs")
      for kw in ({"bos_token": 1}, {"messages": []}, {"add_generation_prompt": 1},
                 {"raise_exception": "x"})),
    ("chat/completions", {"messages": [{"role": "user", "content": "fox " * 3000}]},
     "prompt"),
]


@pytest.mark.parametrize("route,body,param", BAD, ids=[f"{r}:{p}:{i}" for i, (r, _, p) in
                                                       enumerate(BAD)])
def test_bad_generation_input(client: TestClient, route: str, body: dict, param: str) -> None:
    assert_openai_error(client.post(f"/v1/{route}", json=body), 400, param)


def test_still_serves_after_bad_input(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_a_generation_that_gets_no_token_in_time_is_cancelled(smollm2_engine: Engine
                                                              ) -> None:
    engine = smollm2_engine
    # No step runs while paused: no token comes.
    with TestClient(create_app(engine, request_timeout=0.3)) as c, engine.paused():
        r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4})
        err = assert_openai_error(r, 503)
        assert err["code"] == "timeout" and "0.3 s" in err["message"]
        r = c.post("/v1/chat/completions",
                   json={"messages": CHAT, "max_tokens": 4, "stream": True})
        assert r.status_code == 200  # the stream had begun: the error is its last event
        events = [json.loads(line[6:]) for line in r.text.splitlines()
                  if line.startswith("data: {")]
        assert events[-1]["error"]["code"] == "timeout"
        assert r.text.rstrip().endswith("data: [DONE]")
    wait_idle(engine)  # both were cancelled: no slot is held
    assert engine.generate("hi", max_tokens=2, ignore_eos=True).choices[0].token_ids


def test_the_generation_limit_is_on_silence_not_length() -> None:
    from jaxembed.errors import RequestTimeoutError
    from jaxembed.generation import Delta, GenerationStream

    async def main() -> None:
        loop = asyncio.get_running_loop()
        steady = GenerationStream(1, 3, loop)
        steady.idle_timeout = 0.5

        def produce() -> None:  # 30 tokens 50 ms apart: 1.5 s in all, three times the limit
            for i in range(30):
                time.sleep(0.05)
                steady.push(Delta(0, "x", (i,), finish_reason="length" if i == 29 else None))

        producer = loop.run_in_executor(None, produce)
        start = time.perf_counter()
        got = [d async for d in steady]
        await producer
        assert len(got) == 30 and time.perf_counter() - start > 1.0  # and no timeout
        silent = GenerationStream(1, 3, loop)
        silent.idle_timeout = 0.2
        with pytest.raises(RequestTimeoutError, match="0.2 s"):
            [d async for d in silent]
        assert silent.cancelled  # the engine frees its slot at its next step

    asyncio.run(main())


def test_a_model_without_chat_template_serves_completions_only(gemma3_path: Path) -> None:
    engine = EngineBuilder(model=gemma3_path, warmup=False, progress=False,
                           compilation_cache=False, max_num_seqs=2).build()
    try:
        assert engine.chat_template is None
        with TestClient(create_app(engine)) as c:
            r = c.post("/v1/chat/completions", json={"messages": CHAT})
            assert_openai_error(r, 400, "messages")
            assert "chat template" in r.json()["error"]["message"]
            r = c.post("/v1/completions", json={"prompt": "The sky is", "max_tokens": 3,
                                                "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] >= 1
    finally:
        engine.shutdown()


def test_metrics_count_generation(client: TestClient, smollm2_engine: Engine) -> None:
    before = smollm2_engine.stats_snapshot().generated_tokens
    assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3,
                                                "ignore_eos": True}).status_code == 200
    text = client.get("/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["jaxembed_tokens_generated_total"] >= before + 3
    assert values['jaxembed_generation_steps_total{kind="decode"}'] >= 2
    assert values["jaxembed_sequences_capacity"] == smollm2_engine.max_num_seqs


@pytest.mark.parametrize("source", ["{{ 1 / 0 }}", "{{ messages[0]['content'] + 1 }}",
                                    "{{ messages.nope() }}", "{{ raise_exception('no') }}"])
def test_whatever_a_template_raises_is_a_bad_request(source: str) -> None:
    with pytest.raises(InvalidRequestError, match="chat template") as e:
        ChatTemplate(source).render([{"role": "user", "content": "hi"}])
    assert e.value.param == "messages"
