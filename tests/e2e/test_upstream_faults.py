"""Upstream answers that once went wrong, through a live gateway and real clients: large bodies, large error
bodies, rate-limit headers, answers that are not JSON, streams that end without [DONE]."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.spec.openai import validate


def _ask(gateway, model: str, content: str, **extra) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
    # generous: the bug this guards against was a hang until the upstream read timeout (60 s)
    return httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=20)


@pytest.mark.parametrize("size", [3 * 2**20, 10_000_000])
def test_large_answers_are_relayed_whole(gateway, size):
    started = time.monotonic()
    response = _ask(gateway, "remote-a", f"pad:{size} big")
    elapsed = time.monotonic() - started
    assert response.status_code == 200 and len(response.content) >= size
    body = response.json()
    assert body["model"] == "remote-a" and len(body["choices"][0]["message"]["content"]) >= size - 200
    print(f"{size} bytes relayed in {elapsed:.3f}s")  # a figure for the notes, not an assertion


def test_a_large_upstream_error_is_relayed_with_its_status_and_retry_after(gateway):
    response = _ask(gateway, "remote-a", f"status:500 pad:{2 * 2**20}")
    assert response.status_code == 500 and len(response.content) > 2 * 2**20 - 100
    error = response.json()["error"]
    assert error["code"] == "mock_500" and response.headers["retry-after"] == "7"


def test_rate_limit_headers_reach_the_client(gateway):
    limited = _ask(gateway, "remote-a", "status:429")
    assert limited.status_code == 429 and limited.headers["retry-after"] == "7"
    validate(limited.json(), "ErrorResponse")
    ok = _ask(gateway, "remote-a", "hello")
    assert ok.status_code == 200 and ok.headers["x-ratelimit-remaining-requests"] == "99"
    streamed = _ask(gateway, "remote-a", "hello", stream=True)
    assert streamed.status_code == 200 and streamed.headers["x-ratelimit-remaining-requests"] == "99"


@pytest.mark.parametrize("model", ["remote-a", "slow"])  # renamed (upstream_model) and not
def test_an_answer_that_is_not_json_is_502(gateway, model):
    response = _ask(gateway, model, "garbage")
    assert response.status_code == 502 and response.json()["error"]["code"] == "upstream_invalid_response"


def test_a_finished_stream_without_done_ends_cleanly_for_the_sdk(gateway):
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(model="remote-a", stream=True,
                                            messages=[{"role": "user", "content": "nodone one two"}])
    chunks = list(stream)  # raises if the gateway appended an error event
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: nodone one two" and chunks[-1].choices[0].finish_reason == "stop"
    raw = _ask(gateway, "remote-a", "nodone x", stream=True).content
    assert raw.endswith(b"data: [DONE]\n\n") and b'"error"' not in raw
    for line in raw.split(b"\n\n")[:-2]:
        json.loads(line.removeprefix(b"data: "))
