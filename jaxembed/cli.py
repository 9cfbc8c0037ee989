"""Command line: `jaxembed serve` runs the HTTP server, `jaxembed embed TEXT...` prints embeddings,
`jaxembed generate PROMPT` streams a continuation (or a chat answer with `--chat`)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from concurrent.futures import Future

from jaxembed import options
from jaxembed.builder import EngineBuilder
from jaxembed.errors import InvalidRequestError
from jaxembed.protocol import EmbeddingDefaults, EmbeddingType, InputType

API_KEY_ENV = "JAXEMBED_API_KEY"
# Errors in what the user gave (a missing or broken model file, a bad option): reported on one
# line, without a traceback of the code that found them.
USER_ERRORS = (FileNotFoundError, ValueError, RuntimeError)
# Idle connections are kept longer than HTTP clients keep them pooled (httpx, and so the openai
# client, drop them after 5 s): the client closes first, so a request is never sent on a connection
# the server is closing at that moment. uvicorn's own default, 5 s, races with those clients.
KEEP_ALIVE_SECONDS = 30


def _builder(args: argparse.Namespace, **extra: object) -> EngineBuilder:
    return EngineBuilder(**options.from_args(args, **extra))


def serve(args: argparse.Namespace) -> int:
    from jaxembed.fetch import resolve_model

    # Resolved up front so a mistyped path fails at once rather than after the port is bound.
    args.model = str(resolve_model(args.model))
    if args.coordinator is not None:
        from jaxembed import multihost

        multihost.initialize(args.coordinator, args.num_processes, args.process_id)
    elif args.num_processes != 1 or args.process_id != 0:
        raise ValueError("--num-processes and --process-id go with --coordinator HOST:PORT")
    builder = _builder(
        args, defaults=EmbeddingDefaults(
            embedding_type=(EmbeddingType(args.default_embedding_type)
                            if args.default_embedding_type else None),
            normalize=args.default_normalize,
            truncate_prompt_tokens=args.default_truncate_prompt_tokens,
            prompt_name=args.default_prompt_name,
            input_type=InputType(args.default_input_type) if args.default_input_type else None,
            chunked=args.default_chunked))
    if args.process_id != 0:
        return follow(builder)
    # Loading starts before the web stack is imported and the port bound, which overlap it.
    loading = builder.build_in_background()
    import uvicorn

    from jaxembed.server import create_app

    failed: list[BaseException] = []
    server: uvicorn.Server | None = None

    def load_failed(error: BaseException) -> None:
        failed.append(error)
        if server is not None:
            server.should_exit = True

    # The app logs a failed load with its traceback; for a user's error this command says what
    # is wrong itself, on one line, as it exits.
    reported_at_exit = _LoadErrorFilter(loading)
    logging.getLogger("jaxembed.server").addFilter(reported_at_exit)
    # The app answers at once (503 until the model is loaded and warm; see /health).
    app = create_app(loading, max_body_bytes=args.max_body_bytes,
                     api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                     cors_origins=args.cors_origin, request_timeout=args.request_timeout or None,
                     playground=not args.no_playground, on_load_error=load_failed)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port,
                                           log_level=args.log_level,
                                           timeout_keep_alive=KEEP_ALIVE_SECONDS))

    def stop(signum: int, frame: object) -> None:
        server.should_exit = True

    # uvicorn drains in-flight requests on SIGTERM, then (the app's shutdown) the engine finishes
    # its queue; afterwards it re-raises the signal to the handler it found. With this one in
    # place, that ends the process with status 0, as orchestrators expect of a clean stop.
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        server.run()
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        logging.getLogger("jaxembed.server").removeFilter(reported_at_exit)
    if failed:
        reason = " ".join(str(failed[0]).splitlines())
        print(f"jaxembed: error: the model failed to load: {reason}", file=sys.stderr)
        return 2
    return 0


class _LoadErrorFilter(logging.Filter):
    """Drops the log record of `loading`'s own exception when it is a user's error, which
    `serve` reports on one line instead; any other record, or error, passes."""

    def __init__(self, loading: Future[object]) -> None:
        super().__init__()
        self.loading = loading

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is None or not self.loading.done() or self.loading.cancelled():
            return True
        return not (error is self.loading.exception() and isinstance(error, USER_ERRORS))


def follow(builder: EngineBuilder) -> int:
    """A multi-host process other than 0: no server, only the steps process 0 sends, until it
    stops (on its SIGTERM, once its queue is done)."""
    engine = builder.build()
    # Process 0 decides when to stop; a SIGTERM here would leave it waiting in a collective.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        engine.follow()  # type: ignore[union-attr]
    finally:
        engine.shutdown()
    return 0


def embed_file(args: argparse.Namespace) -> int:
    from jaxembed import corpus

    engine = _builder(args, warmup=False).build()
    try:
        fields = {k: getattr(args, k) for k in (
            "embedding_type", "normalize", "dimensions", "prompt_name", "instruction",
            "input_type", "truncate_prompt_tokens", "chunked") if getattr(args, k) is not None}
        done = corpus.embed_file(engine, args.input, args.out, column=args.column,
                                 id_column=args.id_column, batch_size=args.batch_size, **fields)
    finally:
        engine.shutdown()
    resumed = f" (resumed at row {done.resumed_from})" if done.resumed_from else ""
    print(f"{done.rows} rows into {args.out}{resumed}: {done.tokens} tokens in "
          f"{done.seconds:.1f} s, {done.tokens_per_second:,.0f} tokens/s")
    return 0


def embed(args: argparse.Namespace) -> int:
    engine = _builder(args, warmup=False).build()
    try:
        vectors = engine.encode(args.text, embedding_type=args.embedding_type,
                                normalize=args.normalize, prompt_name=args.prompt_name,
                                instruction=args.instruction)
        for text, vec in zip(args.text, vectors, strict=True):
            head = ", ".join(f"{x:.5f}" for x in vec[: args.show])
            print(f"{text[:40]!r}: dim={vec.shape[0]} [{head}, ...]")
    finally:
        engine.shutdown()
    return 0


def generate(args: argparse.Namespace) -> int:
    engine = _builder(args, warmup=False).build()
    try:
        fields = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                      seed=args.seed)
        if args.chat:
            stream = engine.submit_generation(
                engine.chat_prompt([{"role": "user", "content": args.prompt}]),
                engine.sampling_params(**fields))
        else:
            stream = engine.generate_stream(args.prompt, **fields)
            print(args.prompt, end="", flush=True)
        finish = None
        for delta in stream:
            print(delta.text, end="", flush=True)
            finish = delta.finish_reason or finish
        print()
        print(f"[{stream.completion_tokens} tokens, finish: {finish}]", file=sys.stderr)
    except InvalidRequestError as e:
        print(f"jaxembed: error: {e.message}", file=sys.stderr)
        return 2
    finally:
        engine.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxembed", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    options.add_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="info")
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="join a multi-host run through jax.distributed: process 0 listens on "
                        "this address (of its host), serves HTTP and leads; the others run its "
                        "steps")
    p.add_argument("--num-processes", type=int, default=1, metavar="N",
                   help="processes in the multi-host run, one per host (with --coordinator)")
    p.add_argument("--process-id", type=int, default=0, metavar="I",
                   help="this process's rank, 0 to N-1; 0 serves HTTP (with --coordinator)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every route but /health "
                        f"(default: ${API_KEY_ENV}, else no key)")
    p.add_argument("--max-body-bytes", type=int, default=2 * 1024 * 1024,
                   help="largest request body; larger ones get 413 (default: 2 MiB)")
    options.add_arguments(p, options.SERVE_FLAGS)
    p.add_argument("--request-timeout", type=float, default=120.0,
                   help="seconds an embedding request may take, and a generation may go "
                        "without a token, before it is cancelled with 503; 0 for no limit "
                        "(default: 120)")
    p.add_argument("--cors-origin", action="append", default=[],
                   help="an origin browsers may call from (repeatable; '*' for any); "
                        "default: no CORS")
    p.add_argument("--no-playground", action="store_true",
                   help="do not serve the playground page at / and /playground")
    p.add_argument("--default-normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="L2-normalize vectors unless a request says otherwise (default: the "
                        "model's sentence-transformers config, else off)")
    p.add_argument("--default-embedding-type", choices=[t.value for t in EmbeddingType],
                   default=None, help="pooling unless a request says otherwise (default: the "
                                      "model's sentence-transformers config, else mean)")
    p.add_argument("--default-prompt-name", default=None,
                   help="a prompt of the model's to prepend unless a request names one ('' for "
                        "none; default: the model's default prompt, if any)")
    p.add_argument("--default-input-type", choices=[t.value for t in InputType], default=None,
                   help="use the model's prompt for this input type unless a request names one")
    p.add_argument("--default-truncate-prompt-tokens", type=int, default=None,
                   help="keep the last N tokens of over-long inputs (-1: the model's limit) "
                        "unless a request says otherwise (default: refuse them)")
    p.add_argument("--default-chunked", action=argparse.BooleanOptionalAction, default=None,
                   help="embed inputs past the model's limit in windows, combined into one "
                        "vector (vLLM's chunked processing), unless a request says otherwise "
                        "(default: refuse them)")
    p.set_defaults(func=serve)

    p = sub.add_parser("embed", help="embed texts and print their dimension and first values")
    options.add_arguments(p)
    p.add_argument("text", nargs="+")
    p.add_argument("--embedding-type", default=None, choices=[t.value for t in EmbeddingType],
                   help="pooling (default: the model's sentence-transformers config, else mean)")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="L2-normalize the vectors (default: the model's config, else off)")
    p.add_argument("--prompt-name", default=None, help="one of the model's prompts to prepend")
    p.add_argument("--instruction", default=None,
                   help="an instruction, placed by the model's instruction template")
    p.add_argument("--show", type=int, default=6, help="how many values to print per text")
    p.set_defaults(func=embed)

    p = sub.add_parser("embed-file", help="embed a column of a JSON lines, CSV or Parquet file "
                                          "into Parquet or .npy, resuming where a killed run "
                                          "stopped")
    options.add_arguments(p)
    p.add_argument("input", help="a .jsonl, .csv or .parquet file")
    p.add_argument("--out", required=True,
                   help=".parquet (an id and an embedding column) or .npy (the vectors in row "
                        "order)")
    p.add_argument("--column", default="text", help="the column holding the text (default: text)")
    p.add_argument("--id-column", default=None,
                   help="a column to write beside each vector (default: the row number)")
    p.add_argument("--batch-size", type=int, default=256, help="rows a batch (default: 256)")
    p.add_argument("--embedding-type", default=None,
                   choices=[t.value for t in EmbeddingType if t != EmbeddingType.None_],
                   help="pooling (default: the model's sentence-transformers config, else mean)")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="L2-normalize the vectors (default: the model's config, else off)")
    p.add_argument("--dimensions", type=int, default=None,
                   help="keep the first N values of each vector")
    p.add_argument("--prompt-name", default=None, help="one of the model's prompts to prepend")
    p.add_argument("--instruction", default=None,
                   help="an instruction, placed by the model's instruction template")
    p.add_argument("--input-type", choices=[t.value for t in InputType], default=None,
                   help="use the model's prompt for this input type")
    p.add_argument("--truncate-prompt-tokens", type=int, default=None,
                   help="keep the last N tokens of an over-long text (-1: the model's limit)")
    p.add_argument("--chunked", action=argparse.BooleanOptionalAction, default=None,
                   help="embed an over-long text in windows, combined into one vector")
    p.set_defaults(func=embed_file)

    p = sub.add_parser("generate", help="continue a prompt (or answer it, with --chat) and "
                                        "stream the text")
    options.add_arguments(p)
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message through the model's chat template")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 for greedy (the default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=generate)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"jaxembed: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
