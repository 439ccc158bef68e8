"""Backends behind one small contract: local Transformers engines and OpenAI-compatible upstreams (vLLM too)."""

from backends.base import Backend, build_backend

__all__ = ["Backend", "build_backend"]
