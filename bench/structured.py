"""Structured outputs: what a JSON-schema constraint costs a stream, against free streams in the
same run, and how often the constrained text validates.

    python -m bench.run --workloads structured [--model M.gguf] [--streams 16]
    python -m bench.structured [--streams 4] [--seeds 4]

- `single`: one stream, greedy: free (past any end of text) and under the schema; decode
  tokens/s of each, (tokens - 1) / (last token - first token), best of `repeat`.
- `aggregate`: `streams` requests at once: all free, all constrained, and half of each (the
  constrained share their steps with the free ones). Each stream's own decode rate (after its
  first token, so prefills and differing lengths do not weigh in), averaged per kind: in the
  mixed batch beside the same kind's alone. Total tokens/s over the wall time too.
- `mask_us`: the host's work per constrained token: llguidance filling a token mask, replayed
  over the constrained outputs (median and 99th percentile).
- `validity`: the constrained outputs at temperature 1 over `seeds` seeds, and the greedy one,
  parsed and checked against the schema (`jsonschema`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "pattern": "^[a-z]{1,10}@[a-z]{1,10}\\.com$"},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
    },
    "required": ["name", "age", "email", "tags"],
    "additionalProperties": False,
}
SCHEMA = {"type": "object", "properties": {"people": {"type": "array", "items": PERSON,
                                                      "minItems": 4, "maxItems": 4}},
          "required": ["people"], "additionalProperties": False}
ASK = "List four people as JSON: each with a name, age, email and tags."


def _valid(text: str) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), SCHEMA)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def _timed(engine: Any, prompt: str, **fields: Any) -> dict[str, Any]:
    """One request: its text, tokens and decode rate (the first token is the prefill's)."""
    start = time.perf_counter()
    stamps, ids, text = [], [], ""
    for d in engine.generate_stream(prompt, **fields):
        stamps.append(time.perf_counter())
        ids += d.token_ids
        text += d.text
    n = len(ids)
    rate = (n - 1) / (stamps[-1] - stamps[0]) if n > 1 and stamps[-1] > stamps[0] else 0.0
    return {"tokens": n, "decode_tokens_per_s": rate, "text": text, "ids": ids,
            "wall_s": time.perf_counter() - start}


def _aggregate(engine: Any, jobs: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """All jobs at once (a barrier starts them together); tokens/s overall and per kind."""
    gate = threading.Barrier(len(jobs) + 1)

    def one(job: tuple[str, dict[str, Any]]) -> dict[str, Any]:
        gate.wait()
        return _timed(engine, job[0], **job[1])

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(one, j) for j in jobs]
        gate.wait()
        start = time.perf_counter()
        done = [f.result() for f in futures]
        wall = time.perf_counter() - start
    kinds: dict[str, list[dict[str, Any]]] = {}
    for (_, fields), d in zip(jobs, done, strict=True):
        kinds.setdefault("constrained" if "structured" in fields else "free", []).append(d)
    return {"wall_s": wall, "tokens_per_s": sum(d["tokens"] for d in done) / wall,
            **{f"{k}_stream_decode_tokens_per_s": float(np.mean(
                [d["decode_tokens_per_s"] for d in v])) for k, v in kinds.items()},
            **{f"{k}_tokens": sum(d["tokens"] for d in v) for k, v in kinds.items()},
            "_done": done, "_jobs": jobs}


def structured_benchmark(model: Path, streams: int = 16, tokens: int = 128, seeds: int = 16,
                         repeat: int = 3) -> dict[str, Any]:
    from jaxembed import EngineBuilder, StructuredOutput

    engine = EngineBuilder(model=model, warmup=False, progress=False,
                           max_num_seqs=max(16, streams)).build()
    try:
        prompt = engine.render_chat([{"role": "user", "content": ASK}]) \
            if engine.chat_template is not None else ASK + "\n"
        spec = StructuredOutput(json=SCHEMA)
        free = dict(temperature=0, max_tokens=tokens, ignore_eos=True)
        bound = dict(temperature=0, max_tokens=4 * tokens, structured=spec)
        for fields in (free, bound):  # untimed: compiles the shapes and the grammar
            _timed(engine, prompt, **fields)
        single = {
            "free": max((_timed(engine, prompt, **free) for _ in range(repeat)),
                        key=lambda d: d["decode_tokens_per_s"]),
            "constrained": max((_timed(engine, prompt, **bound) for _ in range(repeat)),
                               key=lambda d: d["decode_tokens_per_s"]),
        }
        sampled = [dict(temperature=1.0, seed=s, max_tokens=4 * tokens, structured=spec)
                   for s in range(streams)]
        free_jobs = [(prompt, dict(free, max_tokens=tokens)) for _ in range(streams)]
        mixes = {
            "free": free_jobs,
            "constrained": [(prompt, f) for f in sampled],
            "mixed": [free_jobs[i] if i % 2 == 0 else (prompt, sampled[i])
                      for i in range(streams)],
        }
        for jobs in mixes.values():  # untimed: the shapes each mix meets
            _aggregate(engine, jobs)
        aggregate = {name: max((_aggregate(engine, jobs) for _ in range(repeat)),
                               key=lambda d: d["tokens_per_s"])
                     for name, jobs in mixes.items()}
        # Validity: every constrained output of the timed passes and more seeds.
        texts = [single["constrained"]["text"]]
        texts += [d["text"] for d in aggregate["constrained"]["_done"]]
        for s in range(streams, max(seeds, streams)):
            texts.append(_timed(engine, prompt, temperature=1.0, seed=s,
                                max_tokens=4 * tokens, structured=spec)["text"])
        ids = [d["ids"] for d in aggregate["constrained"]["_done"]]
        mask = _mask_cost(engine, spec, ids)
        compiled_after = engine.stats_snapshot().compilations
    finally:
        engine.shutdown()
    for name in aggregate:
        for k in ("_done", "_jobs"):
            aggregate[name].pop(k)
    r: dict[str, Any] = {
        "model": model.name, "streams": streams, "repeat": repeat,
        "single": {k: {f: v[f] for f in ("tokens", "decode_tokens_per_s")}
                   for k, v in single.items()},
        "aggregate": aggregate, "mask_us": mask,
        "validity": {"valid": sum(map(_valid, texts)), "outputs": len(texts)},
        "compilations": compiled_after,
    }
    r["single"]["constrained_vs_free"] = (r["single"]["constrained"]["decode_tokens_per_s"]
                                          / r["single"]["free"]["decode_tokens_per_s"])
    rate = "stream_decode_tokens_per_s"
    free, bound, mixed = aggregate["free"], aggregate["constrained"], aggregate["mixed"]
    r["aggregate"]["constrained_vs_free"] = bound[f"constrained_{rate}"] / free[f"free_{rate}"]
    # Sharing steps: each kind in the mixed batch against the same kind alone.
    r["aggregate"]["mixed_free_vs_all_free"] = mixed[f"free_{rate}"] / free[f"free_{rate}"]
    r["aggregate"]["mixed_constrained_vs_all_constrained"] = (
        mixed[f"constrained_{rate}"] / bound[f"constrained_{rate}"])
    return r


def _mask_cost(engine: Any, spec: Any, outputs: list[list[int]]) -> dict[str, float]:
    """Microseconds to fill one token mask, replaying each output through a fresh matcher."""
    from jaxembed.grammar import full_mask

    grammars = engine.generation.grammars
    compiled = grammars.compile(spec)  # each constraint copies its matcher
    row = full_mask(1, grammars.vocab_size)[0]
    times = []
    for ids in outputs:
        c = grammars.constraint(compiled)
        for t in ids:
            start = time.perf_counter()
            c.fill(row)
            times.append(time.perf_counter() - start)
            if not c.advance(t) or c.done:
                break
    us = np.array(times) * 1e6
    return {"tokens": len(times), "median": float(np.median(us)),
            "p99": float(np.percentile(us, 99)), "first": float(us[0]) if len(us) else 0.0}


def markdown(s: dict[str, Any]) -> list[str]:
    """Lines of the structured-outputs section of the results page."""
    one, agg, m, v = s["single"], s["aggregate"], s["mask_us"], s["validity"]
    return [
        f"Structured outputs ({s['model']}): a JSON schema of four people (strings, a bounded "
        f"integer, an e-mail pattern, an enum array), against free streams in the same run; "
        f"best of {s['repeat']}.", "",
        "| | free | under the JSON schema | constrained / free |", "|---|---|---|---|",
        f"| 1 stream, greedy: decode tokens/s | {one['free']['decode_tokens_per_s']:.1f} | "
        f"{one['constrained']['decode_tokens_per_s']:.1f} | {one['constrained_vs_free']:.2f}x |",
        f"| {s['streams']} streams of one kind: each stream's decode tokens/s (total tokens/s) "
        f"| {agg['free']['free_stream_decode_tokens_per_s']:.1f} "
        f"({agg['free']['tokens_per_s']:.1f}) | "
        f"{agg['constrained']['constrained_stream_decode_tokens_per_s']:.1f} "
        f"({agg['constrained']['tokens_per_s']:.1f}) | {agg['constrained_vs_free']:.2f}x |",
        f"| {s['streams']} streams, half of each: each stream's decode tokens/s (against its "
        f"kind alone) | {agg['mixed']['free_stream_decode_tokens_per_s']:.1f} "
        f"({agg['mixed_free_vs_all_free']:.2f}x) | "
        f"{agg['mixed']['constrained_stream_decode_tokens_per_s']:.1f} "
        f"({agg['mixed_constrained_vs_all_constrained']:.2f}x) | |", "",
        f"Token mask on the host: median {m['median']:.0f} us, p99 {m['p99']:.0f} us, first "
        f"{m['first']:.0f} us, over {m['tokens']} tokens. Valid against the schema: "
        f"{v['valid']} of {v['outputs']} outputs (temperature 1 over seeds, and greedy).",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    from jaxembed.fetch import resolve_model

    r = structured_benchmark(resolve_model(args.model), args.streams, args.tokens, args.seeds,
                             args.repeat)
    print(json.dumps(r, indent=2))
    print("\n".join(markdown(r)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
