"""What the server says about itself: the model list, health, and the served model's description
(/info, which the playground reads), made from `Engine.describe`."""

from __future__ import annotations

import importlib.metadata

import msgspec

from jaxembed.engine import Engine


class ModelCard(msgspec.Struct, kw_only=True):
    id: str
    created: int
    object: str = "model"
    owned_by: str = "jaxembed"
    tasks: list[str] = msgspec.field(default_factory=list)  # what the model supports


class ModelList(msgspec.Struct, kw_only=True):
    data: list[ModelCard]
    object: str = "list"


class Health(msgspec.Struct, kw_only=True):
    status: str = "ok"


class EmbeddingInfo(msgspec.Struct, kw_only=True):
    embedding_size: int
    embedding_type: str  # the pooling a request gets when it names none
    normalize: bool
    dimensions: list[int]  # the Matryoshka sizes the model declares; empty: any size
    prompts: list[str]  # the names a request may give as prompt_name


class GenerationInfo(msgspec.Struct, kw_only=True):
    chat_template: bool
    max_num_seqs: int
    # The form the chat template teaches tool calls in ('hermes', 'llama3_json'); null: the
    # template renders no tools, and a chat request with 'tools' is a 400.
    tool_calls: str | None = None


class ScoringInfo(msgspec.Struct, kw_only=True):
    """How /v1/rerank, /v1/score and /classify score: the model's classifier, or (none) the
    cosine of embeddings."""

    classifier: bool
    num_labels: int  # 0 without a classifier
    labels: list[str]
    activation: str | None  # of a one-label score
    source: str


class ServerInfo(msgspec.Struct, kw_only=True):
    """What the playground (and operators) need to know about the served model."""

    model: str
    served_model_names: list[str]
    family: str
    format: str
    dtype: str
    quantized: list[str]  # the GGML types of the weights held in their blocks; empty: none
    backend: str
    max_model_len: int
    attention: str
    embeddings: EmbeddingInfo
    generation: GenerationInfo
    scoring: ScoringInfo
    tasks: list[str]  # vLLM's names: embed, token_embed, generate, score, rerank, classify
    version: str


def server_info(engine: Engine) -> ServerInfo:
    info = engine.describe()
    return ServerInfo(
        model=info.model, served_model_names=list(info.served_model_names), family=info.family,
        format=info.format, dtype=info.dtype, quantized=list(info.quantized),
        backend=info.backend,
        max_model_len=info.max_model_len,
        attention="causal" if info.causal else "bidirectional",
        embeddings=EmbeddingInfo(
            embedding_size=info.embedding_size, embedding_type=info.embedding_type,
            normalize=info.normalize, dimensions=list(info.dimensions),
            prompts=list(info.prompts)),
        generation=GenerationInfo(chat_template=info.chat_template,
                                  max_num_seqs=info.max_num_seqs,
                                  tool_calls=engine.generation.tool_format),
        scoring=_scoring(engine), tasks=list(engine.tasks), version=version())


def _scoring(engine: Engine) -> ScoringInfo:
    c = engine.classifier
    if c is None:
        return ScoringInfo(classifier=False, num_labels=0, labels=[], activation=None,
                           source="the cosine similarity of embeddings")
    return ScoringInfo(classifier=True, num_labels=c.num_labels, labels=list(c.labels),
                       activation=c.activation if c.num_labels == 1 else None, source=c.source)


def version() -> str:
    try:
        return importlib.metadata.version("jaxembed")
    except importlib.metadata.PackageNotFoundError:
        return "0"
