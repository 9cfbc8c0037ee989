"""Request and response types shared by the Python API and the HTTP server (OpenAI's shapes):
embeddings, tokenize and detokenize. Completions and chat on the wire are the server's own
(`jaxembed.server.wire`): the Python API returns `GenerationResult` and streams `Delta`s."""

from __future__ import annotations

import base64
import dataclasses
import enum

import msgspec
import numpy as np

from jaxembed.errors import InvalidRequestError

# OpenAI's limit on inputs per request.
MAX_INPUTS = 2048

TokenIds = list[int]
RawInput = str | list[str | int | list[int]]


class EncodingFormat(enum.StrEnum):
    Float = "float"
    Base64 = "base64"  # little-endian float32 bytes, base64-encoded
    # A bit per component, set where it is positive, packed 8 to a byte (the first component in
    # the high bit; zeros pad the last byte), base64-encoded: sentence-transformers'
    # `quantize_embeddings` precisions and Cohere's embedding types of these names. "ubinary"
    # sends the bytes as they are (uint8); "binary" each minus 128 (int8).
    Binary = "binary"
    UBinary = "ubinary"


class EmbeddingType(enum.StrEnum):
    """Pooling of the final hidden states."""

    Mean = "mean"  # over every token fed to the model
    Last = "last"  # the last real token
    Cls = "cls"  # the first token: meaningful only where it attends to the whole input
    # No pooling: every token's final hidden state, [tokens, D] an input (llama.cpp's pooling
    # "none"), for late interaction and analysis.
    None_ = "none"


class InputType(enum.StrEnum):
    """What an input is for, as retrieval models distinguish it: picks the model's prompt of that
    name (`query`; `document`, or its other usual names `passage`, `doc`, `corpus`)."""

    Query = "query"
    Document = "document"


class EmbeddingInput:
    """Constructors for the four input forms; each returns the plain value OpenAI's API takes."""

    @staticmethod
    def String(text: str) -> str:  # noqa: N802 (named like the variants of an enum)
        return text

    @staticmethod
    def Strings(texts: list[str]) -> list[str]:  # noqa: N802
        return list(texts)

    @staticmethod
    def Tokens(ids: list[int]) -> list[int]:  # noqa: N802
        return [int(i) for i in ids]

    @staticmethod
    def TokensBatch(batch: list[list[int]]) -> list[list[int]]:  # noqa: N802
        return [[int(i) for i in ids] for ids in batch]


class EmbeddingRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """OpenAI's embeddings request, plus `embedding_type`, `normalize`, `truncate_prompt_tokens`
    and the prompt fields (`prompt_name`, `instruction`, `input_type`; at most one of them).

    The extensions default to None, meaning the server's default (`EmbeddingDefaults`), then the
    model's own (its sentence-transformers configuration), so one served model can be configured
    once and still be overridden per request.
    """

    input: RawInput
    model: str = "default"
    encoding_format: EncodingFormat = EncodingFormat.Float
    embedding_type: EmbeddingType | None = None  # None: the server's default, else mean
    dimensions: int | None = None
    normalize: bool | None = None  # L2-normalize each vector; None: the server's default, else off
    # Keep the last N tokens of each input (special tokens the tokenizer adds stay), or -1 for the
    # model's limit; None: the server's default, else over-long inputs are refused.
    truncate_prompt_tokens: int | None = None
    # A prompt prepended to each text input: one of the model's named prompts ("" for none),
    # free-text instructions formatted by the model's instruction template, or the prompt the
    # model has for that kind of input. None for all three: the server's, else the model's default.
    prompt_name: str | None = None
    instruction: str | None = None
    input_type: InputType | None = None
    # Embed an input past the model's limit in windows and combine them (vLLM's chunked
    # processing); None: the server's default, else such inputs are refused.
    chunked: bool | None = None
    user: str | None = None


@dataclasses.dataclass(frozen=True)
class EmbeddingDefaults:
    """Values for the request fields left unset (None). A request's own value wins.

    The server's flags give one set and the model's sentence-transformers configuration another;
    the server's wins over the model's, and the model's over the built-in defaults."""

    embedding_type: EmbeddingType | None = None
    normalize: bool | None = None
    truncate_prompt_tokens: int | None = None
    prompt_name: str | None = None
    input_type: InputType | None = None
    chunked: bool | None = None


class EmbeddingData(msgspec.Struct, kw_only=True):
    object: str = "embedding"
    embedding: list[float | list[float]] | str  # a vector a token for embedding_type "none"
    index: int


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class TokenizeRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """vLLM's `/tokenize` body: the token ids the embedding path would feed for `prompt`."""

    prompt: str
    model: str = "default"
    add_special_tokens: bool = True
    # The embeddings route's prompt fields, resolved as it resolves them (with the server's and
    # the model's defaults), so the ids include any prompt that route would prepend.
    prompt_name: str | None = None
    instruction: str | None = None
    input_type: InputType | None = None


class TokenizeResponse(msgspec.Struct, kw_only=True):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    tokens: list[int]
    model: str = "default"


class DetokenizeResponse(msgspec.Struct, kw_only=True):
    prompt: str


# ---- input normalization ---------------------------------------------------------------------


def split_input(raw: object) -> tuple[list[str] | None, list[TokenIds] | None]:
    """Classify `input` as texts or token-id sequences (exactly one is returned, the other None).

    JSON lets a list mix kinds; OpenAI's API does not, so a mixed list is refused here with the
    position of the first offending item.
    """
    if isinstance(raw, str):
        return [raw], None
    if isinstance(raw, tuple | np.ndarray):
        raw = list(raw.tolist() if isinstance(raw, np.ndarray) else raw)
    if not isinstance(raw, list):
        raise InvalidRequestError(
            "'input' must be a string, a list of strings, a list of token ids, or a list of "
            f"lists of token ids; got {type(raw).__name__}", param="input")
    if not raw:
        raise InvalidRequestError("'input' is an empty list; send at least one item",
                                  param="input", code="empty_input")
    if len(raw) > MAX_INPUTS:
        raise InvalidRequestError(
            f"'input' has {len(raw)} items; at most {MAX_INPUTS} are allowed per request, "
            "so split it into several requests", param="input", code="too_many_inputs")
    first = raw[0]
    if isinstance(first, str):
        kind, ok = "strings", lambda x: isinstance(x, str)
    elif _is_int(first):
        kind, ok = "token ids", _is_int
    elif isinstance(first, list | tuple):
        kind, ok = "lists of token ids", lambda x: isinstance(x, list | tuple)
    else:
        raise InvalidRequestError(
            f"input[0] is a {type(first).__name__}; items must be strings, token ids (integers) "
            "or lists of token ids", param="input")
    for i, item in enumerate(raw):
        if not ok(item):
            raise InvalidRequestError(
                f"input[{i}] is a {type(item).__name__}, but input[0] made this a list of {kind}; "
                "all items must be of one kind", param="input")
    if kind == "strings":
        return list(raw), None
    if kind == "token ids":
        return None, [[int(t) for t in raw]]
    seqs = []
    for i, seq in enumerate(raw):
        bad = next((j for j, t in enumerate(seq) if not _is_int(t)), None)
        if bad is not None:
            raise InvalidRequestError(
                f"input[{i}][{bad}] is a {type(seq[bad]).__name__}; token ids must be integers",
                param="input")
        seqs.append([int(t) for t in seq])
    return None, seqs


def _is_int(x: object) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def pack_signs(vec: np.ndarray, signed: bool) -> np.ndarray:
    """[D] float -> [ceil(D / 8)] bytes of sign bits, as sentence-transformers packs them:
    uint8, or with `signed` int8 (each byte minus 128)."""
    packed = np.packbits(vec > 0)
    return (packed.astype(np.int16) - 128).astype(np.int8) if signed else packed


def encode_vector(vec: np.ndarray, fmt: EncodingFormat) -> list[float] | str:
    if fmt == EncodingFormat.Base64:
        return base64.b64encode(np.ascontiguousarray(vec, dtype="<f4").tobytes()).decode("ascii")
    if fmt in (EncodingFormat.Binary, EncodingFormat.UBinary):
        packed = pack_signs(vec, signed=fmt == EncodingFormat.Binary)
        return base64.b64encode(packed.tobytes()).decode("ascii")
    return vec.tolist()


# ---- rerank, score, classify --------------------------------------------------------------


class RerankDocument(msgspec.Struct, kw_only=True):
    text: str


class RerankRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The Cohere/Jina rerank body vLLM, TEI and llama.cpp serve: documents scored against a
    query, returned best first. `instruction` fills a rerank prompt's {instruction}."""

    query: str
    documents: list[str | RerankDocument]
    model: str = "default"
    top_n: int | None = None  # the best this many (None: all)
    return_documents: bool = True
    instruction: str | None = None
    user: str | None = None


class RerankResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class RerankUsage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    total_tokens: int


class RerankResponse(msgspec.Struct, kw_only=True):
    id: str
    model: str
    results: list[RerankResult]
    usage: RerankUsage


class ScoreRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """vLLM's score body: text_1 against each text_2 (one against many), or pairwise (lists of
    one length)."""

    text_1: str | list[str]
    text_2: str | list[str]
    model: str = "default"
    instruction: str | None = None
    user: str | None = None


class ScoreData(msgspec.Struct, kw_only=True):
    index: int
    object: str = "score"
    score: float


class ScoreResponse(msgspec.Struct, kw_only=True):
    id: str
    object: str = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: Usage


class ClassifyRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """vLLM's classify body: texts, each classified by the model's head."""

    input: str | list[str]
    model: str = "default"
    user: str | None = None


class ClassifyData(msgspec.Struct, kw_only=True):
    index: int
    label: str
    probs: list[float]
    num_classes: int


class ClassifyResponse(msgspec.Struct, kw_only=True):
    id: str
    object: str = "list"
    created: int
    model: str
    data: list[ClassifyData]
    usage: Usage
