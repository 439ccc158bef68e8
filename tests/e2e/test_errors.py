"""Every error path answers in OpenAI's shape with the right status, before and after a stream starts."""

from __future__ import annotations

import json

import openai
import pytest

from tests.conftest import http
from tests.spec.openai import validate

MSG = [{"role": "user", "content": "hi"}]


def _error(raw: bytes) -> dict:
    body = json.loads(raw)
    validate(body, "ErrorResponse")
    return body["error"]


def test_unknown_model_lists_available_ids(gateway):
    status, _, raw = http("POST", gateway.url + "/v1/chat/completions", {"model": "gpt-9", "messages": MSG})
    error = _error(raw)
    assert status == 404 and error["code"] == "model_not_found" and error["param"] == "model"
    assert "remote-a" in error["message"] and "smollm2-135m-instruct" in error["message"]


@pytest.mark.parametrize("path,method", [("/v1/nothing", "GET"), ("/nope", "POST"), ("/v1/chat/completions", "GET")])
def test_unknown_routes_and_methods(gateway, path, method):
    status, _, raw = http(method, gateway.url + path)
    assert status in (404, 405)
    assert _error(raw)["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "body,param",
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        ({"model": "remote-a"}, "messages"),
        ({"model": "remote-a", "messages": []}, "messages"),
        ({"model": "remote-a", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"model": "remote-a", "messages": MSG, "temperature": 3}, "temperature"),
        ({"model": "remote-a", "messages": MSG, "n": 0}, "n"),
        ({"model": "remote-a", "messages": MSG, "stop": 5}, "stop"),
        ({"model": "remote-a", "messages": MSG, "stream": "yes"}, "stream"),
        ({"model": "remote-a", "messages": MSG, "max_tokens": -1}, "max_tokens"),
    ],
)
def test_invalid_requests_are_400_with_param(gateway, body, param):
    status, _, raw = http("POST", gateway.url + "/v1/chat/completions", body)
    error = _error(raw)
    assert status == 400 and error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_upstream_unreachable_is_502(gateway):
    status, _, raw = http("POST", gateway.url + "/v1/chat/completions", {"model": "dead", "messages": MSG})
    assert status == 502 and _error(raw)["code"] == "upstream_unavailable"
    status, _, raw = http("POST", gateway.url + "/v1/chat/completions",
                          {"model": "dead", "messages": MSG, "stream": True})
    assert status == 502 and _error(raw)["code"] == "upstream_unavailable"


def test_upstream_timeout_is_504(gateway):
    body = {"model": "slow", "messages": [{"role": "user", "content": "sleep:3"}]}
    status, _, raw = http("POST", gateway.url + "/v1/chat/completions", body)
    assert status == 504 and _error(raw)["code"] == "upstream_timeout"


@pytest.mark.parametrize("code", [400, 401, 404, 422, 429])
def test_upstream_4xx_relayed_with_status_and_body(gateway, code):
    body = {"model": "remote-a", "messages": [{"role": "user", "content": f"status:{code}"}]}
    status, _, raw = http("POST", gateway.url + "/v1/chat/completions", body)
    assert status == code
    assert json.loads(raw) == {"error": {"message": f"mock error {code}", "type": "mock_error", "param": None,
                                         "code": f"mock_{code}"}}


def test_upstream_5xx_relayed(gateway):
    body = {"model": "remote-a", "messages": [{"role": "user", "content": "status:503"}], "stream": True}
    status, _, raw = http("POST", gateway.url + "/v1/chat/completions", body)
    assert status == 503 and _error(raw)["code"] == "mock_503"


def test_error_after_stream_started_is_one_event_then_done(gateway):
    body = {"model": "remote-a", "messages": [{"role": "user", "content": "a b c d e break:2"}], "stream": True}
    status, _, raw = http("POST", gateway.url + "/v1/chat/completions", body)
    assert status == 200
    events = raw.decode().split("\n\n")
    assert events[-2] == "data: [DONE]"
    error = json.loads(events[-3].removeprefix("data: "))
    validate(error, "ErrorResponse")
    assert error["error"]["code"] in ("upstream_unavailable", "upstream_stream_broken")
    contents = [json.loads(e.removeprefix("data: ")) for e in events[:-3]]
    assert [c["choices"][0]["delta"].get("content") for c in contents] == ["", "echo:", " a"]


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"tools": [{"type": "custom", "custom": {"name": "f"}}]}, "tools[0]"),  # function tools only
        ({"response_format": {"type": "json_grammar"}}, "response_format"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"guided_json": {"type": "object"}}, "guided_json"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
    ],
)
def test_local_engine_rejects_fields_it_cannot_honour(gateway, extra, param):
    for stream in (False, True):
        body = {"model": "smollm2-135m-instruct", "messages": MSG, "max_tokens": 2, "stream": stream, **extra}
        status, _, raw = http("POST", gateway.url + "/v1/chat/completions", body)
        error = _error(raw)
        assert status == 400 and error["param"] == param, error


def test_sdk_sees_typed_errors(gateway):
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MSG)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="remote-a", messages=[{"role": "user", "content": "status:429"}])
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="dead", messages=MSG)


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/route", b"{not json", None),
        ("/v1/route", {"messages": 5}, "messages"),
        ("/v1/route", {"model": "auto", "messages": [{"role": "user", "content": "x"}], "route": {"prefer": "x"}},
         "route.prefer"),
        ("/v1/models/recommend", {}, "messages"),
        ("/models/recommend", {"prompt": 5}, "prompt"),  # sent, and no string: the field at fault
        ("/v1/chat/completions", {"models": "remote-a", "messages": MSG}, "models"),
        ("/v1/chat/completions", {"preferred_model": 3, "messages": MSG}, "preferred_model"),
    ],
)
def test_routing_endpoints_and_fields_reject_bad_input(gateway, path, body, param):
    status, _, raw = http("POST", gateway.url + path, body)
    assert status == 400 and _error(raw)["param"] == param


@pytest.mark.parametrize("body", [b'{"model": "remote-a", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
                                  b'{"a":' * 1000 + b"1" + b"}" * 1000, b"[" * 5000 + b"]" * 5000])
def test_undecodable_or_too_deeply_nested_bodies_are_400(gateway, body):
    status, _, raw = http("POST", gateway.url + "/v1/chat/completions", body)
    assert status == 400 and _error(raw)["code"] == "invalid_json"


def test_every_response_carries_a_request_id(gateway):
    status, headers, _ = http("POST", gateway.url + "/v1/chat/completions", {"model": "remote-a", "messages": MSG},
                              headers={"x-request-id": "trace-42"})
    assert status == 200 and headers["x-request-id"] == "trace-42"
    ids = set()
    for method, path, body in [("GET", "/health", None), ("GET", "/nope", None),
                               ("POST", "/v1/chat/completions", {"model": "gpt-9", "messages": MSG}),
                               ("POST", "/v1/chat/completions", {"model": "remote-a", "messages": MSG})]:
        _, headers, _ = http(method, gateway.url + path, body)
        ids.add(headers["x-request-id"])
    assert len(ids) == 4 and all(len(i) == 32 for i in ids)  # generated, one per response
    # an unusable id (too long) is replaced, not echoed
    _, headers, _ = http("GET", gateway.url + "/health", headers={"x-request-id": "x" * 500})
    assert len(headers["x-request-id"]) == 32
