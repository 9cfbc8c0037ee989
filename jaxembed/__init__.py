"""jaxembed: embeddings and generation from decoder LLMs on JAX/XLA, behind an OpenAI-style API."""

from jaxembed.builder import EngineBuilder
from jaxembed.config import ModelConfig, UnsupportedModelError
from jaxembed.engine import Engine, LLMEngine
from jaxembed.errors import EngineError, InvalidRequestError, ModelNotFoundError
from jaxembed.grammar import StructuredOutput
from jaxembed.options import EngineOptions
from jaxembed.protocol import (
    EmbeddingData,
    EmbeddingInput,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingType,
    EncodingFormat,
    Usage,
)
from jaxembed.sampling import SamplingParams

__all__ = [
    "EmbeddingData",
    "EmbeddingInput",
    "EmbeddingRequest",
    "EmbeddingResponse",
    "EmbeddingType",
    "EncodingFormat",
    "Engine",
    "EngineBuilder",
    "EngineOptions",
    "EngineError",
    "InvalidRequestError",
    "LLMEngine",
    "ModelConfig",
    "ModelNotFoundError",
    "SamplingParams",
    "StructuredOutput",
    "UnsupportedModelError",
    "Usage",
]
