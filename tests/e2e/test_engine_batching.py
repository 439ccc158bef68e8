"""A local engine's backpressure and live load through a real gateway: 429 when full, the slot freed when a
streaming client disconnects, and its load in /v1/route (a tiny real Llama)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import openai
import pytest

from tests.conftest import http, start_gateway
from tests.tiny_model import build_tiny_model

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("engine-batching")
    build_tiny_model(tmp / "model")
    # one slot, no queue; a long context so that a long answer holds the slot while the test looks
    config = f"""
models:
  - id: tiny
    backend: transformers
    source: {tmp / "model"}
    context_window: 100000
    max_concurrency: 1
    max_queue: 0
"""
    process = start_gateway(tmp, config)
    yield process
    process.stop()


def until(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


def engine_load(gateway) -> float:
    status, _, raw = http("POST", gateway.url + "/v1/route", CHAT)
    assert status == 200
    return json.loads(raw)["deployments"]["tiny"][0]["load"]


def test_full_engine_answers_429_and_a_disconnect_frees_the_slot(gateway) -> None:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(model="tiny", messages=CHAT["messages"], max_tokens=50_000,
                                            stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))  # generating: the one slot is taken
    status, headers, raw = http("POST", gateway.url + "/v1/chat/completions", CHAT)
    assert status == 429
    error = json.loads(raw)["error"]
    assert error["code"] == "engine_overloaded" and "max_concurrency 1" in error["message"]
    assert int({k.lower(): v for k, v in headers.items()}["retry-after"]) >= 1
    # the engine's own figures reach the router: one running sequence fills one slot
    until(lambda: engine_load(gateway) == 1.0, "the engine's load in /v1/route")
    stream.close()  # the client disconnects mid-answer
    until(lambda: engine_load(gateway) == 0.0, "the slot freed after the disconnect")
    status, _, raw = http("POST", gateway.url + "/v1/chat/completions", CHAT)
    assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] <= 3
