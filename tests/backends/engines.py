"""What the local engine's tests share: the tiny model's backend and requests built as the app decodes them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from backends.transformers_engine import TransformersBackend
from config.schema import TransformersModel
from protocol.openai import ChatCompletionRequest, CompletionRequest, ParsedRequest, decode_request

__all__ = ["chat", "completion", "tiny"]


def tiny(folder: Path, **fields: Any) -> TransformersBackend:
    # a long context (rotary positions have no limit): long requests hold their slot while a test looks
    fields.setdefault("context_window", 100_000)
    return TransformersBackend(TransformersModel(id="tiny", source=str(folder), **fields))


def chat(content: str = "hi", *, model: str = "tiny", **fields: Any) -> ParsedRequest:
    raw = {"model": model, "messages": [{"role": "user", "content": content}], **fields}
    return decode_request(msgspec.json.encode(raw), ChatCompletionRequest)


def completion(prompt: Any, *, model: str = "tiny", **fields: Any) -> ParsedRequest:
    return decode_request(msgspec.json.encode({"model": model, "prompt": prompt, **fields}), CompletionRequest)
