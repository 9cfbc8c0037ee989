"""Accelerator workload: embedding prefill of a Qwen3-0.6B-shaped model (random weights) in
bfloat16, against transformers on the same device and the same weights, and against the bf16
matrix-product rate measured in the same process.

    python -m bench.gpu [--preset qwen3-0.6b] [--texts 512] [--max-batch-tokens 32768]
                        [--out bench/results]

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

from bench.peers import timed, transformers_pooled, useful_flops

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


def benchmark(preset: str, texts: int, max_batch_tokens: int, dtype: str | None = None,
              matmul_n: int = 8192) -> dict[str, Any]:
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
        r["matmul_flops"] = matmul_flops(dtype, matmul_n if accelerated else 1024)
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
    r["targets"] = {"matmul_fraction_at_least_40pct": ours["matmul_fraction"] >= 0.40,
                    "at_least_2x_transformers": peer["jaxembed_speedup"] >= 2.0}
    return r


def markdown(r: dict[str, Any]) -> str:
    ours, peer = r["jaxembed"], r["transformers"]
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
        f"{ours['recompilations_after_warmup']}.", ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="qwen3-0.6b")
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--max-batch-tokens", type=int, default=32768)
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on an accelerator, "
                                                      "float32 on a CPU")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    r = benchmark(args.preset, args.texts, args.max_batch_tokens, args.dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(r, indent=2, default=float))
    print(markdown(r))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
