"""llama-cpp-python's OpenAI-compatible server, with mean pooling.

Its settings have no pooling option, and with llama.cpp's default for a generative GGUF the
embeddings route returns one vector per token. The peer should do the work jaxembed does (one
mean-pooled vector per input), so the model is created with mean pooling; everything else is the
stock server and its command line (`python -m bench.llamacpp_server --model ... --embedding true`).
"""

from __future__ import annotations

import functools

import llama_cpp
from llama_cpp.server.__main__ import main

_init = llama_cpp.Llama.__init__


@functools.wraps(_init)
def _mean_pooled(self: llama_cpp.Llama, *args: object, **kwargs: object) -> None:
    kwargs.setdefault("pooling_type", llama_cpp.LLAMA_POOLING_TYPE_MEAN)
    _init(self, *args, **kwargs)


llama_cpp.Llama.__init__ = _mean_pooled  # type: ignore[method-assign]

if __name__ == "__main__":
    main()
