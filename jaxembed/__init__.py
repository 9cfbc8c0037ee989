"""jaxembed: embeddings and generation from decoder LLMs on JAX/XLA, behind an OpenAI-style API."""

from jaxembed.builder import EngineBuilder
from jaxembed.config import ModelConfig, UnsupportedModelError
from jaxembed.engine import LLMEngine
from jaxembed.errors import EngineError, InvalidRequestError, ModelNotFoundError
from jaxembed.protocol import (
    EmbeddingData,
    EmbeddingInput,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingType,
    EncodingFormat,
    Usage,
)
from jaxembed.replicas import ReplicaRouter

__all__ = [
    "EmbeddingData",
    "EmbeddingInput",
    "EmbeddingRequest",
    "EmbeddingResponse",
    "EmbeddingType",
    "EncodingFormat",
    "EngineBuilder",
    "EngineError",
    "InvalidRequestError",
    "LLMEngine",
    "ModelConfig",
    "ModelNotFoundError",
    "ReplicaRouter",
    "UnsupportedModelError",
    "Usage",
]
