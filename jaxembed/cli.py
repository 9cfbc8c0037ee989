"""Command line: `jaxembed serve` runs the HTTP server, `jaxembed embed TEXT...` prints embeddings."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from jaxembed.builder import EngineBuilder


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="a GGUF file, an HF model folder, or an HF repo id (local hub cache "
                        "first); default: the embedded SmolLM2-135M-Instruct Q4_1")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest input in tokens (default: the model's context, at most 8192)")
    p.add_argument("--max-batch-tokens", type=int, default=8192,
                   help="token budget of one batched step (default: 8192)")


def _builder(args: argparse.Namespace, **extra: object) -> EngineBuilder:
    return EngineBuilder(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len,
                         max_batch_tokens=args.max_batch_tokens, **extra)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from jaxembed.server import create_app

    start = time.perf_counter()
    engine = _builder(args, served_model_names=args.served_model_name or None).build()
    logging.getLogger("jaxembed").info(
        "serving %s as %s on http://%s:%d (ready in %.1fs)", engine.checkpoint.path,
        engine.served_model_names, args.host, args.port, time.perf_counter() - start)
    app = create_app(engine, shutdown_engine=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def embed(args: argparse.Namespace) -> int:
    engine = _builder(args, warmup=False).build()
    try:
        vectors = engine.encode(args.text, embedding_type=args.embedding_type)
        for text, vec in zip(args.text, vectors, strict=True):
            head = ", ".join(f"{x:.5f}" for x in vec[: args.show])
            print(f"{text[:40]!r}: dim={vec.shape[0]} [{head}, ...]")
    finally:
        engine.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxembed", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", action="append", default=[],
                   help="a name clients use for the model (repeatable; default: the file or "
                        "folder name); 'default' always works too")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=serve)

    p = sub.add_parser("embed", help="embed texts and print their dimension and first values")
    _add_model_args(p)
    p.add_argument("text", nargs="+")
    p.add_argument("--embedding-type", default="mean", choices=["mean", "last"])
    p.add_argument("--show", type=int, default=6, help="how many values to print per text")
    p.set_defaults(func=embed)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"jaxembed: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
