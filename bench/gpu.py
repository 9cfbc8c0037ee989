"""Accelerator workload: embedding prefill of a Qwen3-0.6B-shaped model (random weights) in
bfloat16, against transformers on the same device and the same weights, and against the bf16
matrix-product rate measured in the same process; a parity gate; generation at 1 and 64 streams
against transformers' batched `generate`.

    python -m bench.gpu [--preset qwen3-0.6b] [--texts 512] [--max-batch-tokens 32768]
                        [--streams 1,64] [--gen-tokens 64] [--out bench/results]
    python -m bench.gpu --smoke      # the same code on the CPU with a tiny model (a test runs it)

It runs from a checkout that was never installed (see bench/checkout.py): on a host with JAX,
torch and transformers preinstalled and no network, bring the wheels bench/gpu-wheels.txt lists
into bench/wheels/ first.

Parity is gated: the engine's per-token final hidden states in the run's dtype against
transformers' in float32 on the same weights, relative to the largest value, must be within
twice transformers' own error in the same dtype (at least 1e-5); a run that fails it says so in
its targets and exits 1.

The corpus is token ids (lengths 8 to 512, log-uniform, as workload (a)), so both engines see the
same tokens without a real tokenizer. Useful FLOPs are counted as in bench.run: 2 x non-embedding
params per token plus causal attention. `--preset tiny` runs the same code on a tiny model (on the
CPU too) to check the harness; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.checkout import use_checkout

use_checkout()  # before anything imports jaxembed

from bench.peers import timed, transformers_pooled, useful_flops  # noqa: E402

PRESETS: dict[str, dict[str, Any]] = {
    # Qwen/Qwen3-0.6B's config.json.
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, rope_theta=1_000_000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
                 max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=True,
                 rope_theta=10000.0),
}


def build_model(folder: Path, preset: str, dtype: str, seed: int = 0) -> Path:
    """A random Qwen3 of the preset's shape, saved as an HF folder (safetensors, config.json,
    and a word-level tokenizer.json the loader needs but the token-id corpus never uses)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Qwen3Config, Qwen3ForCausalLM

    shape = dict(PRESETS[preset])
    theta = shape.pop("rope_theta")
    cfg = Qwen3Config(**shape, bos_token_id=None, eos_token_id=0, pad_token_id=0)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": theta}
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).to(getattr(torch, dtype)).eval()
    with torch.no_grad():  # norms around 1 and weights ~ 1/sqrt(fan_in), as trained models are
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / np.sqrt(p.shape[-1]))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    return folder


def make_ids(n: int, vocab: int, lo: int = 8, hi: int = 512, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.uniform(np.log(lo), np.log(hi), n)).astype(int)
    return [rng.integers(1, vocab, size=int(t)).tolist() for t in lengths]


def matmul_flops(dtype: str, n: int) -> float:
    """FLOP/s of an n^3 matrix product in `dtype` through JAX, best of 5."""
    import jax
    import jax.numpy as jnp

    key = jax.random.PRNGKey(0)
    a = jax.random.normal(key, (n, n), getattr(jnp, dtype))
    b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), getattr(jnp, dtype))
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, b).block_until_ready()
    return 2 * n**3 / timed(lambda: mm(a, b).block_until_ready(), repeat=5)


def jaxembed_run(folder: Path, ids: list[list[int]], dtype: str,
                 max_batch_tokens: int) -> dict[str, Any]:
    from jaxembed import EmbeddingRequest, EngineBuilder

    engine = EngineBuilder(model=folder, dtype=dtype, max_batch_tokens=max_batch_tokens,
                           progress=False, warmup=False, compilation_cache=False).build()
    try:
        def run() -> np.ndarray:
            response = engine.embed(EmbeddingRequest(input=ids))
            return np.asarray([d.embedding for d in response.data], np.float32)

        start = time.perf_counter()
        run()  # compiles the shapes this workload needs
        first_s = time.perf_counter() - start
        compiles = engine.stats.compilations
        run_s = timed(run, repeat=2)
        return {"first_pass_s": first_s, "run_s": run_s, "compilations": compiles,
                "recompilations_after_warmup": engine.stats.compilations - compiles,
                "max_batch_tokens": max_batch_tokens, "_vectors": run()[:16],
                "_cfg": engine.config}
    finally:
        engine.shutdown()


def transformers_run(folder: Path, ids: list[list[int]], dtype: str) -> dict[str, Any]:
    """transformers on the same device: length-sorted, padded batches at its best batch size,
    mean pooling over the real tokens; sdpa attention."""
    import torch
    from transformers import AutoModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    net = AutoModel.from_pretrained(folder, dtype=getattr(torch, dtype),
                                    attn_implementation="sdpa").to(device).eval()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))

    def run(batch: int, idx: list[int]) -> np.ndarray:
        return transformers_pooled(net, ids, batch, idx, device=device)

    run(8, order[:8])  # warm-up: kernels, allocator
    by_batch = {}
    for b in (8, 16, 32, 64, 128):
        try:
            by_batch[b] = timed(lambda b=b: run(b, order))
        except torch.OutOfMemoryError:
            break
    best = min(by_batch, key=by_batch.get)
    return {"device": device, "best_batch": best, "run_s_by_batch": by_batch,
            "run_s": by_batch[best], "_vectors": run(16, list(range(min(16, len(ids)))))[:16]}


def parity(folder: Path, ids: list[list[int]], dtype: str) -> dict[str, Any]:
    """Per-token final hidden states: the engine's in `dtype` and transformers' in `dtype`, each
    against transformers' float32 on the same weights, as max |error| / max |reference|."""
    import jax.numpy as jnp
    import torch
    from transformers import AutoModel

    from jaxembed import EngineBuilder, model

    device = "cuda" if torch.cuda.is_available() else "cpu"

    def theirs(torch_dtype: str) -> list[np.ndarray]:
        net = AutoModel.from_pretrained(folder, dtype=getattr(torch, torch_dtype),
                                        attn_implementation="sdpa").to(device).eval()
        with torch.inference_mode():
            out = [net(input_ids=torch.tensor([x], device=device)).last_hidden_state[0]
                   .float().cpu().numpy() for x in ids]
        del net
        return out

    reference, peer = theirs("float32"), theirs(dtype)
    engine = EngineBuilder(model=folder, dtype=dtype, progress=False, warmup=False,
                           compilation_cache=False).build()
    try:
        runner = engine.runner
        ours = []
        for x in ids:
            t = len(x)
            h = model.forward(runner.embed_params, jnp.asarray([x], jnp.int32),
                              jnp.arange(t)[None], jnp.zeros((1, t), jnp.int32), engine.config,
                              plan=engine.plan)
            ours.append(np.asarray(h[0], np.float32))
    finally:
        engine.shutdown()

    def error(got: list[np.ndarray]) -> float:
        return max(float(np.abs(g - r).max() / np.abs(r).max()) for g, r in zip(got, reference, strict=True))

    return {"sequences": len(ids), **gate(error(ours), error(peer))}


def gate(jaxembed_error: float, transformers_error: float) -> dict[str, Any]:
    """The parity gate: within twice transformers' own error in the run's dtype (at least 1e-5,
    for float32, where that error is 0)."""
    bound = max(2 * transformers_error, 1e-5)
    return {"jaxembed_error": jaxembed_error, "transformers_error": transformers_error,
            "bound": bound, "passed": jaxembed_error <= bound}


def generation(folder: Path, dtype: str, streams: list[int], tokens: int,
               prompt_len: int = 32) -> dict[str, Any]:
    """Greedy decoding of `tokens` tokens (end of text ignored) at each number of streams:
    jaxembed's aggregate tokens/s (streams submitted at once) against transformers' `generate`
    batched at the same number, on the same device."""
    import torch
    from transformers import AutoModelForCausalLM

    from jaxembed import EngineBuilder

    vocab = int(json.loads((folder / "config.json").read_text())["vocab_size"])
    prompts = make_ids(max(streams), vocab, lo=prompt_len, hi=prompt_len + 1, seed=1)
    out: dict[str, Any] = {"tokens": tokens, "prompt_tokens": prompt_len}
    engine = EngineBuilder(model=folder, dtype=dtype, max_num_seqs=max(streams),
                           max_model_len=prompt_len + tokens + 16, progress=False,
                           compilation_cache=False).build()
    try:
        def ours(n: int) -> tuple[float, int]:
            before, start = engine.stats.compilations, time.perf_counter()
            runs = [engine.generate_stream(p, temperature=0, max_tokens=tokens, ignore_eos=True)
                    for p in prompts[:n]]
            made = sum(len(r.collect(list(r)).choices[0].token_ids) for r in runs)
            return made / (time.perf_counter() - start), engine.stats.compilations - before

        for n in streams:
            # Streams submitted one after another may be prefilled in different groupings from
            # run to run: the figure is that of the first run that compiled nothing (of three).
            for _ in range(3):
                rate, compiled = ours(n)
                if not compiled:
                    break
            out[f"jaxembed_{n}"], out[f"jaxembed_{n}_compilations"] = rate, compiled
    finally:
        engine.shutdown()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype),
                                               attn_implementation="sdpa").to(device).eval()

    def theirs(n: int) -> float:
        batch = torch.tensor(prompts[:n], device=device)
        start = time.perf_counter()
        with torch.inference_mode():
            made = net.generate(batch, attention_mask=torch.ones_like(batch), do_sample=False,
                                max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=0)
        return (made.shape[1] - prompt_len) * n / (time.perf_counter() - start)

    for n in streams:
        theirs(n)
        out[f"transformers_{n}"] = theirs(n)
        out[f"speedup_{n}"] = out[f"jaxembed_{n}"] / out[f"transformers_{n}"]
    return out


def benchmark(preset: str, texts: int, max_batch_tokens: int, dtype: str | None = None,
              matmul_n: int = 8192, streams: tuple[int, ...] = (1, 64),
              gen_tokens: int = 64, parity_texts: int = 8) -> dict[str, Any]:
    import jax

    accelerated = jax.default_backend() != "cpu"
    dtype = dtype or ("bfloat16" if accelerated else "float32")
    r: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "preset": preset, "dtype": dtype,
        "backend": jax.default_backend(), "devices": [d.device_kind for d in jax.devices()],
        "jax": jax.__version__,
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_model(Path(tmp) / preset, preset, dtype)
        ids = make_ids(texts, PRESETS[preset]["vocab_size"],
                       hi=min(512, PRESETS[preset]["max_position_embeddings"]))
        tokens = sum(map(len, ids))
        r["texts"], r["tokens"] = len(ids), tokens
        r["matmul_flops"] = matmul_flops(dtype, matmul_n if accelerated else min(matmul_n, 1024))
        ours = jaxembed_run(folder, ids, dtype, max_batch_tokens)
        cfg = ours.pop("_cfg")
        flop, arithmetic = useful_flops(cfg, [len(x) for x in ids])
        ours["tokens_per_s"] = tokens / ours["run_s"]
        ours["useful_flops_per_s"] = flop / ours["run_s"]
        ours["matmul_fraction"] = ours["useful_flops_per_s"] / r["matmul_flops"]
        ours["flops_arithmetic"] = f"{arithmetic} in {ours['run_s']:.3f} s"
        r["jaxembed"] = ours
        peer = transformers_run(folder, ids, dtype)
        peer["tokens_per_s"] = tokens / peer["run_s"]
        a, b = ours.pop("_vectors"), peer.pop("_vectors")
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        peer["cosine_vs_jaxembed_min"] = float(cos.min())
        peer["jaxembed_speedup"] = ours["tokens_per_s"] / peer["tokens_per_s"]
        r["transformers"] = peer
        r["parity"] = parity(folder, ids[:parity_texts], dtype)
        r["generation"] = gen = generation(folder, dtype, list(streams), gen_tokens)
    r["targets"] = {"parity": r["parity"]["passed"],
                    "matmul_fraction_at_least_50pct": ours["matmul_fraction"] >= 0.50,
                    "at_least_2x_transformers": peer["jaxembed_speedup"] >= 2.0,
                    "no_recompilation": ours["recompilations_after_warmup"] == 0}
    many = max(streams)
    if many > 1:
        r["targets"][f"{many}_streams_at_least_5x_transformers"] = gen[f"speedup_{many}"] >= 5
    return r


def markdown(r: dict[str, Any]) -> str:
    ours, peer, gen = r["jaxembed"], r["transformers"], r["generation"]
    return "\n".join([
        f"Run {r['date']}: {r['preset']}-shaped model (random weights), {r['dtype']}, "
        f"{r['texts']} sequences of 8-512 tokens ({r['tokens']:,} tokens), JAX {r['jax']} on "
        f"{', '.join(sorted(set(r['devices'])))}.", "",
        "| embedding prefill | tokens/s | jaxembed is |", "|---|---|---|",
        f"| jaxembed ({ours['max_batch_tokens']}-token steps) | {ours['tokens_per_s']:,.0f} | |",
        f"| transformers (same device, sdpa, best batch {peer['best_batch']}) | "
        f"{peer['tokens_per_s']:,.0f} | {peer['jaxembed_speedup']:.2f}x (pooled cosine "
        f"{peer['cosine_vs_jaxembed_min']:.5f}) |", "",
        f"Useful FLOP/s: {ours['useful_flops_per_s'] / 1e12:.1f} TFLOP/s = "
        f"{ours['matmul_fraction']:.0%} of the {r['dtype']} matrix product measured in the same "
        f"process ({r['matmul_flops'] / 1e12:.1f} TFLOP/s). FLOPs: {ours['flops_arithmetic']}.",
        f"Compilations {ours['compilations']}, after warm-up "
        f"{ours['recompilations_after_warmup']}.", "",
        f"Parity ({r['parity']['sequences']} sequences, per-token final hidden states against "
        f"float32 transformers, relative to the largest value): jaxembed "
        f"{r['parity']['jaxembed_error']:.2e}, transformers in {r['dtype']} "
        f"{r['parity']['transformers_error']:.2e}, bound {r['parity']['bound']:.2e}: "
        f"{'passed' if r['parity']['passed'] else 'FAILED'}.", "",
        "| generation (greedy) | jaxembed tokens/s | transformers generate | jaxembed is |",
        "|---|---|---|---|",
        *(f"| {n} stream{'s' if n > 1 else ''} x {gen['tokens']} tokens | "
          f"{gen[f'jaxembed_{n}']:,.1f} | {gen[f'transformers_{n}']:,.1f} | "
          f"{gen[f'speedup_{n}']:.2f}x |"
          for n in sorted(int(k.split("_")[1]) for k in gen if k.startswith("speedup_"))),
        "", "Targets: " + ", ".join(f"{k} {'yes' if v else 'NO'}"
                                    for k, v in r["targets"].items()), ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="qwen3-0.6b")
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--max-batch-tokens", type=int, default=32768)
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on an accelerator, "
                                                      "float32 on a CPU")
    parser.add_argument("--streams", default="1,64",
                        help="generation: numbers of streams at once (default: 1,64)")
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--smoke", action="store_true",
                        help="the tiny preset on a few texts, 1 and 4 streams: checks the "
                             "harness end to end (on the CPU too); its figures mean nothing")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    streams = tuple(int(n) for n in args.streams.split(","))
    if args.smoke:
        args.preset, args.texts, args.max_batch_tokens = "tiny", 16, 512
        streams, args.gen_tokens = (1, 4), 8
    r = benchmark(args.preset, args.texts, args.max_batch_tokens, args.dtype,
                  matmul_n=256 if args.smoke else 8192, streams=streams,
                  gen_tokens=args.gen_tokens, parity_texts=4 if args.smoke else 8)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(r, indent=2, default=float))
    print(markdown(r))
    print(f"wrote {path}")
    return 0 if r["parity"]["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
