"""Greedy generation against transformers' greedy `generate`, token for token.

The models: tiny random Llama, Qwen3 and Gemma 3 models (`families.SPECS`, every variant on, built
as safetensors), and the real SmolLM2-135M-Instruct Q4_1 GGUF, which transformers dequantizes and
runs itself. transformers runs in float32 with eager attention and a KV cache (its own decode path),
with stopping switched off, and returns its raw logits at every step.

Prompts plus generated tokens run well past the sliding window of Gemma 3's local layers
(`families.WINDOW`), so our decode steps with a window are compared, not only full attention.

The tie rule. Where the reference's two best logits at a step are closer than `TIE_GAP`, float
rounding may pick either, so our token may be either of the two. The comparison then goes on from
the reference's token: our generation restarts from the prompt plus the reference's tokens so far,
fed as token ids. Any other difference fails: a different token where the gap is larger, or one
outside the reference's top 2.

Controls prove the comparison can fail: a reference with noise in one weight matrix (or, for
Gemma 3, with the window switched off) must not match our generation. Batch invariance (on
Gemma 3): prompts of different lengths generated together, whether admitted in one step or joining
mid-decode, give exactly the tokens each gives alone.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import families as F
import numpy as np
import pytest
import torch

from jaxembed import Engine, EngineBuilder
from jaxembed.generation import FinishReason, TokenLogprob

FAMILIES = ("llama", "qwen3", "gemma3")
TIE_GAP = 1e-3  # the reference's top-2 logit gap below which either token is right
LOGPROB_ATOL = 1e-3  # our logprobs against the reference's log-softmax, along the greedy path
TOP_LOGPROBS = 20  # alternatives compared per step
NEW_TOKENS = 32
# One prompt within Gemma 3's window of 16 (the window is crossed while decoding) and one past it
# (crossed in the prefill already); with 32 new tokens, 44 and 52 positions in all.
PROMPT_LENGTHS = (12, 20)
SMOLLM2_MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one "
                                                "sentence, then name two museums there."}]


class GreedyMismatch(AssertionError):
    """Our greedy token differs from the reference's where the reference has no near tie."""


class LogprobMismatch(AssertionError):
    """Our logprobs along the greedy path differ from the reference's log-softmax."""


# ---- the reference and the comparison -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Reference:
    """transformers' greedy continuation: its tokens and its raw logits [steps, vocab]."""

    tokens: list[int]
    logits: np.ndarray

    def top2(self, step: int) -> tuple[list[int], float]:
        row = self.logits[step]
        best = np.argsort(row)[::-1][:2]
        return [int(i) for i in best], float(row[best[0]] - row[best[1]])


def reference_greedy(model: Any, prompt: Sequence[int], n: int) -> Reference:
    """transformers' `generate` with do_sample=False: n tokens, never stopping early."""
    ids = torch.tensor([[int(t) for t in prompt]])
    pad = model.config.pad_token_id
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=n, eos_token_id=None,
                             pad_token_id=0 if pad is None else pad, output_logits=True,
                             output_scores=True, return_dict_in_generate=True)
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    logits = torch.stack(out.logits)[:, 0].float().numpy()
    # Self-checks: no stop token ended it, and no logits processor changed a choice.
    assert len(tokens) == n, f"transformers stopped after {len(tokens)} of {n} tokens"
    assert tokens == logits.argmax(-1).tolist(), "transformers' tokens are not its argmax"
    return Reference(tokens, logits)


def our_greedy(engine: Engine, prompt: Sequence[int], n: int, logprobs: bool = False
               ) -> tuple[list[int], list[TokenLogprob]]:
    result = engine.generate([int(t) for t in prompt], temperature=0, max_tokens=n,
                             ignore_eos=True, logprobs=TOP_LOGPROBS if logprobs else None)
    choice = result.choices[0]
    assert len(choice.token_ids) == n and choice.finish_reason == FinishReason.LENGTH, (
        f"asked for {n} tokens, got {len(choice.token_ids)} ({choice.finish_reason})")
    return choice.token_ids, choice.logprobs


def check_logprobs(ours: TokenLogprob, ref_logits: np.ndarray, step: int) -> None:
    ref = torch.log_softmax(torch.as_tensor(ref_logits, dtype=torch.float64), -1).numpy()
    assert len(ours.top) == min(TOP_LOGPROBS, ref.shape[0])
    worst = max(abs(lp - ref[i]) for i, lp in [(ours.token_id, ours.logprob), *ours.top])
    if worst > LOGPROB_ATOL or abs(ours.top[0][1] - ref.max()) > LOGPROB_ATOL:
        raise LogprobMismatch(f"step {step}: our logprobs differ from the reference's by "
                              f"{worst:.3g} (tolerance {LOGPROB_ATOL})")


def assert_greedy_matches(engine: Engine, ref: Reference, prompt: Sequence[int],
                          logprobs: bool = False) -> list[int]:
    """Hold our greedy tokens to the reference's under the tie rule; the tied steps."""
    n, start, ties = len(ref.tokens), 0, []
    while start < n:
        ours, lps = our_greedy(engine, [*prompt, *ref.tokens[:start]], n - start, logprobs)
        restart = None
        for k, token in enumerate(ours):
            step = start + k
            if logprobs:
                check_logprobs(lps[k], ref.logits[step], step)
            if token == ref.tokens[step]:
                continue
            top2, gap = ref.top2(step)
            if gap >= TIE_GAP or token not in top2:
                raise GreedyMismatch(
                    f"step {step}: our token {token}, the reference's {ref.tokens[step]}; its "
                    f"top 2 are {top2} with a logit gap of {gap:.3g} (a tie is < {TIE_GAP}). "
                    f"Ours from there: {ours[k:]}, the reference's: {ref.tokens[step:]}")
            ties.append(step)
            restart = step + 1  # go on from the reference's token
            break
        if restart is None:
            break
        start = restart
    return ties


# ---- the tiny family models, built once per module ----------------------------------------------


@dataclasses.dataclass
class Family:
    name: str
    folder: Path
    engine: Engine
    reference: Any  # transformers' causal LM over the same safetensors
    vocab: int

    def prompt(self, length: int, seed: int = 0) -> list[int]:
        """Random ids past the special tokens (0-2), fixed per family, length and seed."""
        rng = np.random.default_rng([FAMILIES.index(self.name), length, seed])
        return rng.integers(3, self.vocab, length).tolist()


def load_reference(folder: Path, **config: Any) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager", **config).eval()


@pytest.fixture(scope="module")
def family_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Family]]:
    root = tmp_path_factory.mktemp("generation")
    made: dict[str, Family] = {}
    vocab = len(json.loads(F.tokenizer_json())["model"]["vocab"])
    for name in FAMILIES:
        folder = F.build_family(name, root / name, seed=F.FAMILY_NAMES.index(name) + 1)
        engine = EngineBuilder(model=folder, dtype="float32", warmup=False, progress=False,
                               compilation_cache=False, max_num_seqs=4).build()
        made[name] = Family(name, folder, engine, load_reference(folder), vocab)
    yield made
    for fam in made.values():
        fam.engine.shutdown()


@pytest.fixture(scope="module")
def references() -> dict[tuple, Reference]:
    """The reference's continuations, computed once per (family, prompt)."""
    return {}


def family_reference(fam: Family, refs: dict[tuple, Reference], prompt: list[int]) -> Reference:
    key = (fam.name, tuple(prompt))
    if key not in refs:
        refs[key] = reference_greedy(fam.reference, prompt, NEW_TOKENS)
    return refs[key]


# ---- 1. tiny models against transformers --------------------------------------------------------


def test_families_have_what_the_comparison_needs(family_models):
    gemma3 = family_models["gemma3"]
    cfg = json.loads((gemma3.folder / "config.json").read_text())
    assert cfg["sliding_window"] == F.WINDOW
    assert min(PROMPT_LENGTHS) < F.WINDOW < max(PROMPT_LENGTHS)
    assert min(PROMPT_LENGTHS) + NEW_TOKENS > 2 * F.WINDOW
    for fam in family_models.values():
        # The models have stop tokens, so the comparison relies on neither side stopping at one.
        assert fam.engine.stop_token_ids and fam.engine.config.vocab_size == fam.vocab


@pytest.mark.parametrize("length", PROMPT_LENGTHS)
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers(family_models, references, family, length):
    fam = family_models[family]
    prompt = fam.prompt(length)
    ref = family_reference(fam, references, prompt)
    ties = assert_greedy_matches(fam.engine, ref, prompt)
    assert len(ties) <= 2, f"{len(ties)} near ties at steps {ties}: suspiciously many"


@pytest.mark.parametrize("family", FAMILIES)
def test_logprobs_along_greedy_path_match_transformers(family_models, references, family):
    """Stronger than the tokens: the log-softmax of every step, to LOGPROB_ATOL."""
    fam = family_models[family]
    prompt = fam.prompt(max(PROMPT_LENGTHS))
    assert_greedy_matches(fam.engine, family_reference(fam, references, prompt), prompt,
                          logprobs=True)


# ---- 2. the real SmolLM2 GGUF against transformers reading the same file -------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_path: Path, smollm2_transformers: Any) -> Iterator[tuple[Engine, Any]]:
    # The reference path (dequantized at load); test_quantized_models holds the quantized one
    # to it.
    engine = EngineBuilder(model=smollm2_path, dtype="float32", warmup=False, progress=False,
                           compilation_cache=False, max_num_seqs=4, max_model_len=512,
                           quantize="none").build()
    yield engine, smollm2_transformers[0]
    engine.shutdown()


@pytest.fixture(scope="module")
def smollm2_reference(smollm2) -> tuple[list[int], Reference]:
    engine, model = smollm2
    prompt = engine.chat_prompt(SMOLLM2_MESSAGES).tolist()
    return prompt, reference_greedy(model, prompt, NEW_TOKENS)


def test_smollm2_chat_greedy_matches_transformers(smollm2, smollm2_reference):
    engine, _ = smollm2
    prompt, ref = smollm2_reference
    bos = engine.checkpoint.tokenizer.bos_token_id
    assert bos is not None and prompt.count(bos) >= 1 and prompt[0] == bos
    ties = assert_greedy_matches(engine, ref, prompt, logprobs=True)
    assert len(ties) <= 2, f"{len(ties)} near ties at steps {ties}: suspiciously many"


def test_smollm2_chat_stops_where_the_reference_ends(smollm2, smollm2_reference):
    """`chat` (stop tokens on) gives the reference's tokens up to its first stop token."""
    engine, _ = smollm2
    prompt, ref = smollm2_reference
    stops = [i for i, t in enumerate(ref.tokens) if t in engine.stop_token_ids]
    assert stops, "the reference never reaches a stop token in 32 tokens: pick another prompt"
    end = stops[0] + 1
    if any(ref.top2(step)[1] < TIE_GAP for step in range(end)):
        pytest.skip("a near tie before the stop token: either continuation is right")
    result = engine.chat(SMOLLM2_MESSAGES, temperature=0, max_tokens=NEW_TOKENS)
    assert result.choices[0].token_ids == ref.tokens[:end]
    assert result.choices[0].finish_reason == FinishReason.STOP
    assert result.prompt_tokens == len(prompt)


# ---- 3. the tie rule itself ----------------------------------------------------------------------


def test_tie_rule_accepts_the_runner_up_only_on_a_near_tie(family_models, references):
    """References edited at one step so that our token is a near tie, or a clear loss, or out of
    the top 2."""
    fam = family_models["llama"]
    prompt = fam.prompt(min(PROMPT_LENGTHS))
    ref = family_reference(fam, references, prompt)
    step = 5
    ours = ref.tokens[step]
    other = ref.top2(step)[0][1]
    # The reference prefers `other` by a hair and goes on from it: we must restart from it.
    cont = reference_greedy(fam.reference, [*prompt, *ref.tokens[:step], other],
                            NEW_TOKENS - step - 1)
    assert cont.tokens != ref.tokens[step + 1:], "the restart would not be tested"
    logits = np.concatenate([ref.logits[: step + 1], cont.logits])
    logits[step, other] = logits[step, ours] + TIE_GAP / 2
    tokens = [*ref.tokens[:step], other, *cont.tokens]
    assert assert_greedy_matches(fam.engine, Reference(tokens, logits), prompt) == [step]
    # The same with a clear margin must fail.
    logits[step, other] = logits[step, ours] + 10 * TIE_GAP
    with pytest.raises(GreedyMismatch, match=f"step {step}: our token {ours}"):
        assert_greedy_matches(fam.engine, Reference(tokens, logits), prompt)
    # A near tie between two other tokens, ours third, must fail too.
    third = int(np.argsort(ref.logits[step])[::-1][2])
    logits[step, third] = logits[step, other] - TIE_GAP / 2
    with pytest.raises(GreedyMismatch, match=f"step {step}: our token {ours}"):
        assert_greedy_matches(fam.engine, Reference(tokens, logits), prompt)


# ---- 4. negative controls: the comparison fails on a different model ----------------------------


def perturbed(model: Any, noise: float) -> Any:
    """A copy of `model` with noise added to one weight matrix (layer 1's attention output), of
    `noise` times its standard deviation. Noise rather than a scale: Gemma's norm after the
    attention would undo a scale."""
    out = copy.deepcopy(model)
    weight = out.model.layers[1].self_attn.o_proj.weight
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        weight.add_(noise * weight.std() * torch.randn(weight.shape, generator=g))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_a_perturbed_weight_fails_the_comparison(family_models, family):
    fam = family_models[family]
    prompt = fam.prompt(max(PROMPT_LENGTHS))
    # Tokens: noise of 20% of one matrix's spread changes a greedy choice.
    wrong = reference_greedy(perturbed(fam.reference, 0.2), prompt, NEW_TOKENS)
    with pytest.raises(GreedyMismatch):
        assert_greedy_matches(fam.engine, wrong, prompt)
    # Logprobs: 1% is already far outside their tolerance (about 0.02 at the first step).
    wrong = reference_greedy(perturbed(fam.reference, 0.01), prompt, NEW_TOKENS)
    with pytest.raises(LogprobMismatch):
        assert_greedy_matches(fam.engine, wrong, prompt, logprobs=True)


def test_gemma3_without_its_window_fails_the_comparison(family_models):
    """Our decode steps past the window use it: a reference with it off must not match."""
    fam = family_models["gemma3"]
    no_window = load_reference(fam.folder, sliding_window=4096)
    for length in PROMPT_LENGTHS:
        prompt = fam.prompt(length)
        wrong = reference_greedy(no_window, prompt, NEW_TOKENS)
        with pytest.raises(GreedyMismatch):
            assert_greedy_matches(fam.engine, wrong, prompt)


# ---- 5. batch invariance -------------------------------------------------------------------------


def stream_tokens(stream: Iterator[Any], at_most: int | None = None) -> list[int]:
    out: list[int] = []
    for delta in stream:
        out.extend(delta.token_ids)
        if at_most is not None and len(out) >= at_most:
            break
    return out


# Gemma 3 only, to keep the file quick (each family compiles its own batched shapes): it has the
# most to get wrong, rows at different positions relative to its window sharing a decode step.
@pytest.mark.parametrize("family", ["gemma3"])
def test_greedy_is_batch_invariant(family_models, family):
    fam = family_models[family]
    engine = fam.engine
    prompts = [fam.prompt(n, seed=1) for n in (5, 13, 21)]
    fields = dict(temperature=0, max_tokens=24, ignore_eos=True)
    alone = [engine.generate(p, **fields).choices[0].token_ids for p in prompts]

    # Admitted together: one prefill step of three rows, then decode steps of three rows.
    before = engine.stats_snapshot()
    with engine.paused():
        streams = [engine.generate_stream(p, **fields) for p in prompts]
    assert [stream_tokens(s) for s in streams] == alone
    decode_steps = engine.stats_snapshot().decode_steps - before.decode_steps
    assert decode_steps < len(prompts) * (fields["max_tokens"] - 1), "nothing was batched"

    # Joining mid-decode: the first is decoding when the others arrive, and its later decode
    # steps share rows with them at other positions.
    before = engine.stats_snapshot()
    first = engine.generate_stream(prompts[0], **fields)
    head = stream_tokens(first, at_most=2)
    with engine.paused():
        assert engine.stats_snapshot().generation_requests == before.generation_requests, (
            "the first request finished before the others came: nothing to join")
        later = [engine.generate_stream(p, **fields) for p in prompts[1:]]
    got = [head + stream_tokens(first), *(stream_tokens(s) for s in later)]
    assert got == alone

    # From threads, all at once (batched however the engine takes them).
    results: list[list[int] | None] = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def run(i: int) -> None:
        barrier.wait()
        results[i] = engine.generate(prompts[i], **fields).choices[0].token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert results == alone


# ---- 5. a prompt's own log-probabilities (echo with logprobs, evaluation harnesses) -------------


def reference_prompt_logprobs(model: Any, prompt: Sequence[int]) -> np.ndarray:
    """transformers' log-softmax at every prompt position but the last, float64 [n - 1, V]: row
    j is the distribution of token j + 1."""
    with torch.no_grad():
        logits = model(torch.tensor([[int(t) for t in prompt]])).logits[0, :-1]
    return torch.log_softmax(logits.double(), -1).numpy()


def assert_prompt_logprobs_match(ours: Sequence[TokenLogprob | None], ref: np.ndarray,
                                 prompt: Sequence[int]) -> None:
    assert ours[0] is None and len(ours) == len(prompt)  # nothing comes before the first
    for j, e in enumerate(ours[1:]):
        assert e is not None and e.token_id == prompt[j + 1]
        assert len(e.top) == min(TOP_LOGPROBS, ref.shape[1])
        best = [t for t, _ in e.top] == [int(i) for i in np.argsort(-ref[j])[:len(e.top)]]
        worst = max(abs(lp - ref[j][t]) for t, lp in [(e.token_id, e.logprob), *e.top])
        if worst > LOGPROB_ATOL or not (best or _near_tie(ref[j], e.top)):
            raise LogprobMismatch(f"prompt token {j + 1}: our logprobs differ from the "
                                  f"reference's by {worst:.3g} (tolerance {LOGPROB_ATOL})")


def _near_tie(ref: np.ndarray, top: Sequence[tuple[int, float]]) -> bool:
    """Our alternatives are the reference's best, in an order only near ties change."""
    return all(abs(ref[t] - lp) <= LOGPROB_ATOL for t, lp in top) and \
        sorted(ref[[t for t, _ in top]])[0] >= np.sort(ref)[::-1][len(top) - 1] - LOGPROB_ATOL


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_logprobs_match_transformers(family_models, family):
    """Every prompt token's log-probability and its top 20, as transformers' forward gives them,
    past Gemma 3's window; several prompts scored in one step each score as alone; a control
    with 1% noise in one matrix fails."""
    fam = family_models[family]
    prompts = [fam.prompt(max(PROMPT_LENGTHS), seed=1), fam.prompt(5, seed=2),
               fam.prompt(min(PROMPT_LENGTHS), seed=3)]
    refs = [reference_prompt_logprobs(fam.reference, p) for p in prompts]
    alone = fam.engine.prompt_logprobs(prompts[0])
    assert_prompt_logprobs_match(alone, refs[0], prompts[0])
    together = fam.engine.submit_scores([np.asarray(p, np.int32) for p in prompts]).result()
    for p, ref, scores in zip(prompts, refs, together, strict=True):
        assert_prompt_logprobs_match([None, *scores.entries(np.asarray(p), TOP_LOGPROBS)],
                                     ref, p)
    # Packed beside others in a larger step: the same scores, to float rounding.
    np.testing.assert_allclose(together[0].logprobs, [e.logprob for e in alone[1:]], atol=1e-5)
    with pytest.raises(LogprobMismatch):
        assert_prompt_logprobs_match(
            alone, reference_prompt_logprobs(perturbed(fam.reference, 0.01), prompts[0]),
            prompts[0])
