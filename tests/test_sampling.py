"""The token choice on its own: thresholds, draws, penalties and seeds, against plain references;
and the host side of streaming: incremental detokenization and stop strings."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from jaxembed import sampling
from jaxembed.generation import IncrementalDetokenizer, StopStrings
from jaxembed.sampling import SamplingParams


def rows(params: list[SamplingParams], seed: int = 0, counter: int = 0) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v) for k, v in
            sampling.row_arrays([(p, seed, counter) for p in params]).items()}


def kept_by_sorting(z: np.ndarray, top_k: int, top_p: float) -> set[int]:
    """The textbook definition: sort, cut to k, then keep the smallest head holding top_p."""
    order = np.argsort(-z, kind="stable")
    if 0 < top_k < len(z):
        order = order[:top_k]
    if top_p < 1:
        p = np.exp(z[order] - z[order].max())
        p /= p.sum()
        before = np.cumsum(p) - p
        order = order[before < top_p]
    return set(order.tolist())


@pytest.mark.parametrize("top_k,top_p", [(1, 1.0), (5, 1.0), (40, 1.0), (0, 0.5), (0, 0.9),
                                         (10, 0.8), (299, 0.95), (0, 0.999)])
def test_thresholds_keep_what_sorting_keeps(top_k: int, top_p: float) -> None:
    rng = np.random.default_rng(top_k * 100 + int(top_p * 1000))
    z = (rng.standard_normal((4, 300)) * 3).astype(np.float32)
    thr = np.asarray(sampling.thresholds(jnp.asarray(z), jnp.full(4, top_k), jnp.full(4, top_p)))
    for r in range(4):
        assert set(np.flatnonzero(z[r] >= thr[r]).tolist()) == kept_by_sorting(z[r], top_k, top_p)


def draws(logits: np.ndarray, p: SamplingParams, n: int) -> np.ndarray:
    """n draws for one row of logits, each with its own counter (as successive tokens have)."""
    v = logits.shape[0]
    batch = jnp.asarray(np.repeat(logits[None], n, 0))
    r = {k: jnp.asarray(a) for k, a in sampling.row_arrays([(p, 7, i) for i in range(n)]).items()}
    zeros = jnp.zeros((n, v), jnp.int32)
    tokens, *_ = jax.jit(sampling.sample)(batch, zeros, zeros.astype(bool), r)
    return np.asarray(tokens)


def test_draws_follow_the_distribution() -> None:
    # A vocabulary over several blocks, with the mass spread across them.
    v = 3 * sampling.BLOCK + 17
    logits = np.full(v, -30.0, np.float32)
    hot = [3, 300, 301, 700, v - 1]
    logits[hot] = np.log([0.1, 0.2, 0.3, 0.15, 0.25])
    got = draws(logits, SamplingParams(temperature=1.0), 4000)
    assert set(got.tolist()) <= set(hot)
    freq = np.array([(got == h).mean() for h in hot])
    np.testing.assert_allclose(freq, [0.1, 0.2, 0.3, 0.15, 0.25], atol=0.03)


def test_filters_restrict_the_draws() -> None:
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.06, 0.04], np.float32))
    assert set(draws(logits, SamplingParams(top_k=2), 500).tolist()) == {0, 1}
    assert set(draws(logits, SamplingParams(top_p=0.65), 500).tolist()) == {0, 1}
    # min_p keeps tokens at least 0.4 times as likely as the best: 0.4, 0.3, 0.2
    assert set(draws(logits, SamplingParams(min_p=0.4), 500).tolist()) == {0, 1, 2}
    # A low temperature sharpens towards the best token.
    cold = draws(logits, SamplingParams(temperature=0.05), 200)
    assert (cold == 0).mean() > 0.95


def test_greedy_rows_take_the_argmax_beside_sampled_rows() -> None:
    rng = np.random.default_rng(0)
    z = rng.standard_normal((3, 500)).astype(np.float32)
    zeros = jnp.zeros(z.shape, jnp.int32)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0),
              SamplingParams(temperature=0)]
    tokens, *_ = sampling.sample(jnp.asarray(z), zeros, zeros.astype(bool), rows(params))
    tokens = np.asarray(tokens)
    assert tokens[0] == z[0].argmax() and tokens[2] == z[2].argmax()


def test_a_seeded_draw_does_not_depend_on_its_batch() -> None:
    rng = np.random.default_rng(1)
    z = rng.standard_normal((4, 700)).astype(np.float32)
    p = SamplingParams(temperature=1.0, top_p=0.9)
    zeros = jnp.zeros(z.shape, jnp.int32)
    table = sampling.row_arrays([(p, 11, 5), (p, 12, 5), (p, 11, 6), (p, 13, 0)])
    together = np.asarray(sampling.sample(jnp.asarray(z), zeros, zeros.astype(bool),
                                          {k: jnp.asarray(a) for k, a in table.items()})[0])
    for r in range(4):
        alone = {k: jnp.asarray(a[r:r + 1]) for k, a in table.items()}
        got = sampling.sample(jnp.asarray(z[r:r + 1]), zeros[:1], zeros[:1].astype(bool), alone)
        assert int(got[0][0]) == together[r]


def test_repetition_penalty_matches_transformers() -> None:
    rng = np.random.default_rng(2)
    z = rng.standard_normal((2, 50)).astype(np.float32) * 4
    seen_ids = np.array([[3, 7, 7, 20], [0, 1, 49, 2]])
    seen = np.zeros(z.shape, bool)
    for r in range(2):
        seen[r, seen_ids[r]] = True
    want = RepetitionPenaltyLogitsProcessor(1.3)(torch.from_numpy(seen_ids),
                                                 torch.from_numpy(z.copy())).numpy()
    got = sampling.penalize(jnp.asarray(z), jnp.zeros(z.shape, jnp.int32), jnp.asarray(seen),
                            rows([SamplingParams(repetition_penalty=1.3)] * 2))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


def test_presence_and_frequency_penalties_follow_openai() -> None:
    z = np.zeros((1, 6), np.float32)
    counts = np.array([[0, 1, 3, 0, 2, 0]], np.int32)
    got = sampling.penalize(jnp.asarray(z), jnp.asarray(counts), jnp.asarray(counts > 0),
                            rows([SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)]))
    # OpenAI: logit - count * frequency - (count > 0) * presence
    np.testing.assert_allclose(np.asarray(got), -(counts * 0.25 + (counts > 0) * 0.5))


def test_logprobs_are_the_models_own() -> None:
    rng = np.random.default_rng(3)
    z = rng.standard_normal((2, 300)).astype(np.float32)
    zeros = jnp.zeros(z.shape, jnp.int32)
    params = [SamplingParams(temperature=0, logprobs=3, repetition_penalty=2.0)] * 2
    tokens, chosen, top_ids, top_lp = sampling.sample(jnp.asarray(z), zeros,
                                                      zeros.astype(bool), rows(params))
    lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    for r in range(2):
        np.testing.assert_allclose(float(chosen[r]), lp[r, int(tokens[r])], rtol=1e-5)
        np.testing.assert_array_equal(np.asarray(top_ids[r, :3]), np.argsort(-lp[r])[:3])
        np.testing.assert_allclose(np.asarray(top_lp[r, :3]), np.sort(lp[r])[::-1][:3],
                                   rtol=1e-5)


BATCHES = {
    "greedy": [SamplingParams(temperature=0)] * 3,
    "plain draws": [SamplingParams(temperature=0.7)] * 3,
    "every filter": [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=20),
                     SamplingParams(temperature=0.8, top_p=0.7, min_p=0.05, logprobs=2,
                                    repetition_penalty=1.3, frequency_penalty=0.5)],
    "logprobs only": [SamplingParams(temperature=0, logprobs=4), SamplingParams(temperature=0),
                      SamplingParams(temperature=0, presence_penalty=1.0)],
}


@pytest.mark.parametrize("name", sorted(BATCHES))
def test_branchless_sampling_draws_what_the_skipping_one_draws(name: str) -> None:
    """An accelerator's sampling computes every filter for every row (no conditionals, whose
    predicate a GPU reads back to the host); it must choose the same tokens, with the same
    logprobs for the rows that asked, as the CPU's, which skips what no row needs."""
    rng = np.random.default_rng(4)
    z = jnp.asarray(rng.standard_normal((3, 400)).astype(np.float32) * 3)
    counts = jnp.asarray(rng.integers(0, 3, (3, 400)).astype(np.int32))
    table = rows(BATCHES[name], seed=9, counter=2)
    skipping = sampling.sample(z, counts, counts > 0, table)
    branchless = jax.jit(sampling.sample, static_argnums=4)(z, counts, counts > 0, table, True)
    np.testing.assert_array_equal(np.asarray(branchless[0]), np.asarray(skipping[0]))
    asked = np.asarray(table["logprobs"])
    for got, want in zip(branchless[1:], skipping[1:], strict=True):
        np.testing.assert_allclose(np.asarray(got)[asked], np.asarray(want)[asked], rtol=1e-6)
    traced = jax.make_jaxpr(sampling.sample, static_argnums=4)
    assert "cond" not in primitives(traced(z, counts, counts > 0, table, True).jaxpr)
    assert "cond" in primitives(traced(z, counts, counts > 0, table, False).jaxpr)


def test_a_greedy_step_compiled_apart_draws_the_argmax_under_bias_and_mask() -> None:
    """The host finds a step's rows all greedy (`greedy_only`) before it runs; the greedy variant
    then draws what the full sampling draws, a logit_bias and a grammar's mask applied."""
    rng = np.random.default_rng(5)
    z = jnp.asarray(rng.standard_normal((4, 300)).astype(np.float32))
    zeros = jnp.zeros(z.shape, jnp.int32)
    params = [SamplingParams(temperature=0, logit_bias=[(7, 100.0)]),
              SamplingParams(temperature=0)] * 2
    mask = np.full((4, 10), -1, np.int32)
    mask[2, :] = 0
    mask[2, 3] = 1 << 5  # row 2 may draw token 101 only
    table = {k: jnp.asarray(v) for k, v in sampling.row_arrays(
        [(p, 0, 0) for p in params], mask).items()}
    assert sampling.greedy_only(table)
    full = sampling.sample(z, zeros, zeros.astype(bool), table, True)
    greedy = jax.jit(sampling.sample, static_argnums=(4, 5))(z, zeros, zeros.astype(bool),
                                                             table, True, True)
    np.testing.assert_array_equal(np.asarray(greedy[0]), np.asarray(full[0]))
    assert list(np.asarray(greedy[0])[:3]) == [7, int(np.argmax(z[1])), 101]
    for other in (dict(temperature=0.5), dict(repetition_penalty=1.1),
                  dict(frequency_penalty=0.1), dict(presence_penalty=0.1), dict(logprobs=1)):
        mixed = [SamplingParams(temperature=0), SamplingParams(**{"temperature": 0, **other})]
        assert not sampling.greedy_only(sampling.row_arrays([(p, 0, 0) for p in mixed]))


def primitives(jaxpr: jax.extend.core.Jaxpr) -> set[str]:
    """The names of every primitive in a jaxpr and the jaxprs nested in it."""
    out = set()
    for eqn in jaxpr.eqns:
        out.add(eqn.primitive.name)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            out |= primitives(sub)
    return out


# ---- text --------------------------------------------------------------------------------


def test_stop_strings_hold_back_what_may_start_one() -> None:
    s = StopStrings(["STOP", "\n\n"])
    assert s.add("Hello ") == ("Hello ", False)
    assert s.add("ST") == ("", False)  # could become STOP
    assert s.add("AR") == ("STAR", False)  # it did not
    assert s.add(" the end\n") == (" the end", False)
    assert s.add("\nmore") == ("", True)  # "\n\n" hit across two pieces; nothing after it
    s = StopStrings(["STOP"])
    assert s.add("xxST") == ("xx", False)
    assert s.add("OPyy") == ("", True)
    assert s.text.startswith("xxSTOP")
    s = StopStrings(["abc"])
    assert s.add("ab") == ("", False)
    assert s.flush() == "ab"  # the end releases everything held


def test_incremental_text_never_splits_a_character(smollm2_engine) -> None:  # noqa: ANN001
    tok = smollm2_engine.tokenizer
    text = "Emoji 🙂😉👍 and 日本語 and café, then naïve text."
    ids = tok.encode(text, add_special_tokens=False).ids
    prompt = tok.encode("Say:", add_special_tokens=False).ids
    assert len(ids) > len(text.split())  # several characters span tokens
    d = IncrementalDetokenizer(tok, prompt, skip_special=True)
    pieces = [d.add(i) for i in ids] + [d.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids)
    # Each emoji arrives whole, in one piece.
    assert any("🙂" in p for p in pieces) and not any(p.endswith("\ud83d") for p in pieces)


def test_argmax_is_the_first_index_of_the_largest():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((6, 1000)).astype(np.float32)
    z[1, [7, 500]] = 9.0  # a tie: the first wins, as in np.argmax
    z[2] = -np.inf
    z[2, 999] = 0.0
    z[3, 0] = np.inf
    z[4] = 1.0  # every value tied
    got = np.asarray(jax.jit(sampling.argmax)(jnp.asarray(z)))
    assert got.tolist() == np.argmax(z, -1).tolist() and got[1] == 7
