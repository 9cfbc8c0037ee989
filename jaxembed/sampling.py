"""Choosing the next token: penalties, temperature, top-k, top-p, min-p and seeded sampling.

Everything runs on the device inside the decode step, over a batch of rows that each carry their
own settings, so one compiled step serves any mix of greedy and sampled requests. Nothing sorts the
vocabulary (a full sort is the slowest thing XLA does on a CPU): top-k and top-p thresholds are
found by bisection over the logit range, and the token is drawn by inverse CDF in two levels
(a block of 256 tokens, then a token in it), so a draw costs two uniforms and O(V) work.

A row's random numbers come from its seed and the index of the token being drawn, never from what
else shares the batch: a seeded request gives the same text alone or among others.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxembed.grammar import StructuredOutput

BLOCK = 256  # tokens per block of the two-level draw
TOP_LOGPROBS = 20  # the most alternatives a response may ask for (OpenAI's limit)
BISECTION_STEPS = 40  # threshold search: resolution (range) * 2**-40
# The most (token id, bias) pairs one request's logit_bias holds (OpenAI's limit): each step
# carries every row's pairs in arrays of this width.
MAX_LOGIT_BIAS = 300


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to continue one prompt. temperature 0 is greedy; top_k 0 and top_p 1 are off."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0  # OpenAI's: over the generated tokens
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # transformers': over the prompt and the generated tokens
    seed: int | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: the chosen token's and the top k alternatives'
    skip_special_tokens: bool = True
    # OpenAI's logit_bias: (token id, bias in [-100, 100]) pairs added to the model's logits
    # before anything else looks at them (-100 bans a token, 100 forces it under greedy).
    logit_bias: tuple[tuple[int, float], ...] = ()
    # What the text must be (a JSON schema, a regex, ...): the tokens each step may draw are
    # those that keep it valid.
    structured: StructuredOutput | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def row_arrays(rows: list[tuple[SamplingParams, int, int] | None],
               mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The per-row settings of a step as arrays: for each row (params, seed, tokens drawn so
    far), or None for a padding row (greedy, no penalties). mask: the tokens each row may draw,
    a bitmask int32 [B, ceil(V / 32)] (`grammar.full_mask` allows all)."""
    n = len(rows)
    out = {
        "temperature": np.zeros(n, np.float32), "top_k": np.zeros(n, np.int32),
        "top_p": np.ones(n, np.float32), "min_p": np.zeros(n, np.float32),
        "presence": np.zeros(n, np.float32), "frequency": np.zeros(n, np.float32),
        "repetition": np.ones(n, np.float32), "seed": np.zeros(n, np.uint32),
        "counter": np.zeros(n, np.int32), "logprobs": np.zeros(n, bool),
        # A row's logit_bias pairs, then (token 0, bias 0): adding nothing.
        "bias_ids": np.zeros((n, MAX_LOGIT_BIAS), np.int32),
        "bias": np.zeros((n, MAX_LOGIT_BIAS), np.float32),
    }
    for i, row in enumerate(rows):
        if row is None:
            continue
        p, seed, counter = row
        out["temperature"][i] = p.temperature
        out["top_k"][i] = p.top_k
        out["top_p"][i] = p.top_p
        out["min_p"][i] = p.min_p
        out["presence"][i] = p.presence_penalty
        out["frequency"][i] = p.frequency_penalty
        out["repetition"][i] = p.repetition_penalty
        out["seed"][i] = seed
        out["counter"][i] = counter
        out["logprobs"][i] = p.logprobs is not None
        if p.logit_bias:
            ids, values = zip(*p.logit_bias, strict=True)
            out["bias_ids"][i, : len(ids)] = ids
            out["bias"][i, : len(ids)] = values
    if mask is not None:
        out["mask"] = mask
    return out


def allowed(mask: jax.Array, v: int) -> jax.Array:
    """bool [B, V] from a token bitmask int32 [B, W] (bit t % 32 of word t // 32): a shift and
    an and over [B, W, 32], no gather."""
    bits = (mask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1
    return bits.reshape(mask.shape[0], -1)[:, :v] > 0


def add_bias(logits: jax.Array, rows: dict[str, jax.Array]) -> jax.Array:
    """logits [B, V] with each row's logit_bias added ([B, MAX_LOGIT_BIAS] ids and values; a
    row's unused entries add 0 to token 0)."""
    b = logits.shape[0]
    return logits.at[jnp.arange(b)[:, None], rows["bias_ids"]].add(rows["bias"])


def penalize(logits: jax.Array, counts: jax.Array, seen: jax.Array, rows: dict[str, jax.Array]
             ) -> jax.Array:
    """logits [B, V]; counts [B, V] of generated tokens; seen [B, V] prompt or generated."""
    rep = rows["repetition"][:, None]
    out = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    c = counts.astype(jnp.float32)
    return out - rows["frequency"][:, None] * c - rows["presence"][:, None] * (c > 0)


def _bisect(lo: jax.Array, hi: jax.Array, ok: Any) -> jax.Array:
    """The largest t in [lo, hi] (per row) with ok(t) true, given ok is true at lo and
    monotone (true below some point, false above)."""
    def body(_: int, c: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        lo, hi = c
        mid = (lo + hi) / 2
        good = ok(mid)
        return jnp.where(good, mid, lo), jnp.where(good, hi, mid)

    return jax.lax.fori_loop(0, BISECTION_STEPS, body, (lo, hi))[0]


def thresholds(z: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """The lowest logit kept by top-k, then top-p over what top-k kept, per row [B]."""
    # Tokens a grammar ruled out are -inf: the search starts at the lowest allowed one.
    lo, hi = jnp.where(z > -jnp.inf, z, jnp.inf).min(-1), z.max(-1)
    v = z.shape[-1]
    k = jnp.where((top_k > 0) & (top_k < v), top_k, v)[:, None]
    # Top-k: the largest t with at least k logits at or above it.
    thr_k = _bisect(lo, hi, lambda t: (z >= t[:, None]).sum(-1) >= k[:, 0])
    p = jnp.where(z >= thr_k[:, None], jnp.exp(z - hi[:, None]), 0.0)
    total = p.sum(-1)
    # Top-p: the largest t whose kept tokens hold at least top_p of the mass (ties kept).
    thr_p = _bisect(thr_k, hi, lambda t: jnp.where(z >= t[:, None], p, 0.0).sum(-1)
                    >= top_p * total * (1 - 1e-6))
    return jnp.where(top_p < 1.0, thr_p, thr_k)


def argmax(z: jax.Array) -> jax.Array:
    """The first index of each row's largest value, z [B, V] -> [B] int32 (as jnp.argmax, for
    rows without NaN). A max then a min over the indices where it occurs: two plain reductions,
    which XLA's CPU backend vectorizes, where its fused (value, index) reduction of jnp.argmax
    runs element by element (2 ms for 16 rows of SmolLM2's vocabulary, against 0.5)."""
    top = z.max(-1, keepdims=True)
    return jnp.where(z == top, jnp.arange(z.shape[-1], dtype=jnp.int32), z.shape[-1]).min(-1)


def _draw(p: jax.Array, u: jax.Array) -> jax.Array:
    """Inverse-CDF draw from unnormalized p [B, V] with uniforms u [B, 2]: a block, then a token
    in it."""
    b, v = p.shape
    pad = (-v) % BLOCK
    blocks = jnp.pad(p, ((0, 0), (0, pad))).reshape(b, -1, BLOCK)  # [B, NB, BLOCK]
    mass = blocks.sum(-1)  # [B, NB]
    cum = jnp.cumsum(mass, -1)
    nb = mass.shape[1]
    block = jnp.minimum((cum <= u[:, :1] * cum[:, -1:]).sum(-1), nb - 1)  # [B]
    # A block of zero mass can only be picked by rounding: step back to the last with mass.
    block = jnp.where(mass[jnp.arange(b), block] > 0, block,
                      jnp.argmax(jnp.where(mass > 0, jnp.arange(nb), -1), -1))
    inner = blocks[jnp.arange(b), block]  # [B, BLOCK]
    icum = jnp.cumsum(inner, -1)
    idx = jnp.minimum((icum <= u[:, 1:] * icum[:, -1:]).sum(-1), BLOCK - 1)
    idx = jnp.where(inner[jnp.arange(b), idx] > 0, idx, jnp.argmax(inner, -1))
    return block * BLOCK + idx


def greedy_only(rows: dict[str, Any]) -> bool:
    """Whether a step's rows (host arrays, `row_arrays`) ask for no more than the argmax: no
    temperature, no penalties, no logprobs (a logit_bias or a grammar's mask is still applied).
    The host knows it before the step runs, so an accelerator's sampling can be compiled for it
    (`sample(greedy=True)`) rather than decided on the device."""
    return bool((np.asarray(rows["temperature"]) == 0).all()
                and (np.asarray(rows["repetition"]) == 1).all()
                and not np.asarray(rows["frequency"]).any()
                and not np.asarray(rows["presence"]).any()
                and not np.asarray(rows["logprobs"]).any())


def _when(pred: jax.Array, yes: Any, no: Any, branchless: bool) -> Any:
    """yes() where pred holds, else no(): a `lax.cond`, or, branchless, yes() always (its
    result is the same per row; `no` is only the shortcut for a step no row needs it in)."""
    return yes() if branchless else jax.lax.cond(pred, yes, no)


def sample(logits: jax.Array, counts: jax.Array, seen: jax.Array, rows: dict[str, jax.Array],
           branchless: bool = False, greedy: bool = False
           ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Next tokens [B], their logprobs [B], and the top alternatives (ids, logprobs)
    [B, TOP_LOGPROBS]. Logprobs are those of the model's logits with the row's logit_bias added,
    as OpenAI's are (a banned token's falls with it), before penalties and temperature; zero
    unless some row asked for them. A grammar's mask (rows["mask"], when the step has one)
    rules tokens out of the draw but not out of the logprobs: they stay the model's, as vLLM's
    are by default.

    branchless: compute every part for every row rather than skip the parts no row asked for.
    The skips are `lax.cond`s on values the step computed, and a GPU's conditional copies its
    predicate to the host before it launches either branch: a sync in every decode step, which
    stops the host from running ahead. On a CPU the skips are free and save real work (the
    penalties' and top-k/top-p's passes over [B, V]).

    greedy: the host found every row greedy (`greedy_only`): the argmax alone, no logprobs
    (zeros). Branchless sampling would otherwise run every filter for nothing: the two
    bisections alone read [B, V] eighty times (not yet measured on a GPU; estimated there to be
    of the order of a small model's decode step at 64 rows)."""
    b, v = logits.shape
    logits = add_bias(logits, rows)
    if greedy:
        z = jnp.where(allowed(rows["mask"], v), logits, -jnp.inf) if "mask" in rows else logits
        n = min(TOP_LOGPROBS, v)
        return (argmax(z).astype(jnp.int32), jnp.zeros(b, jnp.float32),
                jnp.zeros((b, n), jnp.int32), jnp.zeros((b, n), jnp.float32))
    any_penalty = jnp.any((rows["repetition"] != 1) | (rows["frequency"] != 0)
                          | (rows["presence"] != 0))
    z = _when(any_penalty, lambda: penalize(logits, counts, seen, rows), lambda: logits,
              branchless)
    if "mask" in rows:
        z = jnp.where(allowed(rows["mask"], v), z, -jnp.inf)
    greedy = argmax(z)
    temp = rows["temperature"]
    sampled_rows = temp > 0

    def draw() -> jax.Array:
        zs = z / jnp.where(sampled_rows, temp, 1.0)[:, None]
        filtered = sampled_rows & (((rows["top_k"] > 0) & (rows["top_k"] < v))
                                   | (rows["top_p"] < 1))
        thr = _when(jnp.any(filtered),
                    lambda: jnp.where(filtered, thresholds(zs, rows["top_k"], rows["top_p"]),
                                      -jnp.inf),
                    lambda: jnp.full((b,), -jnp.inf), branchless)
        top = zs.max(-1)
        thr = jnp.maximum(thr, jnp.where(rows["min_p"] > 0, top + jnp.log(rows["min_p"]),
                                         -jnp.inf))
        p = jnp.where(zs >= thr[:, None], jnp.exp(zs - top[:, None]), 0.0)
        keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(
            rows["seed"], rows["counter"])
        u = jax.vmap(lambda k: jax.random.uniform(k, (2,)))(keys)
        return jnp.where(sampled_rows, _draw(p, u), greedy)

    tokens = _when(jnp.any(sampled_rows), draw, lambda: greedy, branchless).astype(jnp.int32)

    def with_logprobs() -> tuple[jax.Array, jax.Array, jax.Array]:
        lp = jax.nn.log_softmax(logits, -1)
        top_lp, top_ids = jax.lax.top_k(lp, min(TOP_LOGPROBS, v))
        return lp[jnp.arange(b), tokens], top_ids.astype(jnp.int32), top_lp

    def without() -> tuple[jax.Array, jax.Array, jax.Array]:
        n = min(TOP_LOGPROBS, v)
        return (jnp.zeros(b, jnp.float32), jnp.zeros((b, n), jnp.int32),
                jnp.zeros((b, n), jnp.float32))

    chosen, top_ids, top_lp = _when(jnp.any(rows["logprobs"]), with_logprobs, without,
                                    branchless)
    return tokens, chosen, top_ids, top_lp
