"""A prompt too long for the model asked for falls back to one whose context fits, unless the client said
`fallback_mode: none` (it did all the same)."""

from __future__ import annotations

import pytest

from config.loader import parse_config
from gateway.service import Gateway
from protocol.errors import BadRequest
from protocol.openai import ChatCompletionRequest, decode_request

CONFIG = """
routing: {health_check_s: 0}
models:
  - {id: tiny, backend: openai, base_url: "http://127.0.0.1:1/v1", context_window: 40}
  - {id: roomy, backend: openai, base_url: "http://127.0.0.1:1/v1", context_window: 100000}
"""
LONG = "word " * 400


async def test_a_prompt_too_long_falls_back_unless_the_client_said_none():
    gateway = Gateway(parse_config(CONFIG))
    try:
        asked = {"messages": [{"role": "user", "content": LONG}]}
        decision = await gateway.decide(decode_request({"model": "tiny", **asked}, ChatCompletionRequest))
        assert [(a.model.id, a.route) for a in decision.attempts] == [("roomy", "fallback")]
        refused = decode_request({"preferred_model": "tiny", "fallback_mode": "none", **asked}, ChatCompletionRequest)
        decision = await gateway.decide(refused)
        assert decision.attempts == []
        with pytest.raises(BadRequest, match="context window"):
            raise gateway.nothing_to_try(decision)
    finally:
        await gateway.aclose()
