"""The OpenAI-compatible HTTP server over an `Engine`."""

from .app import create_app

__all__ = ["create_app"]
