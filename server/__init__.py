"""The OpenAI-compatible HTTP server over an `LLMEngine`."""

from .app import create_app

__all__ = ["create_app"]
