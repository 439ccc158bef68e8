"""Hypothesis strategies for request bodies close to valid ones, per wire format (chat completions, completions,
the Responses API, Anthropic Messages): a valid body with a few of its values swapped for junk (wrong types, odd
unicode, huge numbers, nested junk), fields dropped or added; and raw bytes (garbage, or valid JSON cut short or
corrupted). Shared by the in-process parser fuzzing, the live gateway's and the reliability bench's."""

from __future__ import annotations

import copy
import json
from typing import Any

from hypothesis import strategies as st

__all__ = ["BASES", "FORMATS", "body_bytes", "near_valid", "raw_bytes", "slots"]

_IMAGE = "data:image/png;base64,iVBORw0KGgo="
_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}

# valid bodies of each format that between them use most of its fields; `MODEL` is replaced by the served model
BASES: dict[str, list[dict[str, Any]]] = {
    "chat": [
        {"model": "MODEL", "messages": [{"role": "user", "content": "hello"}]},
        {"model": "MODEL", "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.5,
         "top_p": 0.9, "max_tokens": 16, "n": 1, "stop": ["\n", "END"], "seed": 7, "user": "u1",
         "messages": [{"role": "system", "content": "be brief"},
                      {"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                                   {"type": "image_url", "image_url": {"url": _IMAGE}}]},
                      {"role": "assistant", "content": None,
                       "tool_calls": [{"id": "call_1", "type": "function",
                                       "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
                      {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}],
         "tools": [{"type": "function", "function": {"name": "weather", "parameters": _SCHEMA}}],
         "tool_choice": {"type": "function", "function": {"name": "weather"}},
         "response_format": {"type": "json_schema", "json_schema": {"name": "out", "schema": _SCHEMA}},
         "logit_bias": {"50256": -100}, "logprobs": True, "top_logprobs": 2, "presence_penalty": 0.1},
    ],
    "completions": [
        {"model": "MODEL", "prompt": "Once upon a time"},
        {"model": "MODEL", "prompt": ["a", "b"], "max_tokens": 8, "stream": True, "echo": False, "stop": "\n",
         "temperature": 0, "best_of": 1, "suffix": None},
    ],
    "responses": [
        {"model": "MODEL", "input": "hello", "store": False},
        {"model": "MODEL", "instructions": "be brief", "stream": True, "store": False, "max_output_tokens": 32,
         "temperature": 0.3, "top_p": 1, "user": "u1", "metadata": {"k": "v"}, "parallel_tool_calls": False,
         "input": [{"type": "message", "role": "user",
                    "content": [{"type": "input_text", "text": "what is this?"},
                                {"type": "input_image", "image_url": _IMAGE}]},
                   {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": "{}"},
                   {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
                   {"role": "assistant", "content": [{"type": "output_text", "text": "ok"}]}],
         "tools": [{"type": "function", "name": "weather", "parameters": _SCHEMA}], "tool_choice": "auto",
         "text": {"format": {"type": "json_schema", "name": "out", "schema": _SCHEMA}},
         "reasoning": {"effort": "low"}, "truncation": "auto"},
    ],
    "messages": [
        {"model": "MODEL", "max_tokens": 16, "messages": [{"role": "user", "content": "hello"}]},
        {"model": "MODEL", "max_tokens": 16, "stream": True, "temperature": 0.5, "top_k": 5, "top_p": 0.9,
         "stop_sequences": ["END"], "metadata": {"user_id": "u1"},
         "system": [{"type": "text", "text": "be brief"}],
         "messages": [{"role": "user", "content": [
                          {"type": "text", "text": "what is this?"},
                          {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                       "data": "iVBORw0KGgo="}}]},
                      {"role": "assistant", "content": [
                          {"type": "text", "text": "let me look"},
                          {"type": "tool_use", "id": "tu_1", "name": "weather", "input": {"city": "Oslo"}}]},
                      {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "tu_1",
                                                    "content": [{"type": "text", "text": "sunny"}]}]},
                      {"role": "assistant", "content": "It is"}],
         "tools": [{"name": "weather", "description": "d", "input_schema": _SCHEMA}],
         "tool_choice": {"type": "tool", "name": "weather", "disable_parallel_tool_use": True},
         "output_config": {"format": {"type": "json_schema", "schema": _SCHEMA}}},
    ],
}
FORMATS = tuple(BASES)


def _keys(value: Any) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in _keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in _keys(v)}
    return set()


_KNOWN_KEYS = sorted({k for bases in BASES.values() for base in bases for k in _keys(base)})
_WORDS = ["", " ", "user", "assistant", "system", "developer", "tool", "function", "text", "image", "auto",
          "none", "required", "json_schema", "message", "input_text", "tool_use", "base64", "[DONE]", "MODEL"]

odd_text = st.one_of(
    st.sampled_from(_WORDS),
    st.text(max_size=12),
    # NUL, bidi override, BOM, astral plane, combining mark, lone surrogates, JSON's escapes
    st.text(st.sampled_from("\x00\u202e\ufeff\U0001d54f\u0301\ud800\udfff\"\\\n"), max_size=8),
    st.integers(1, 5000).map(lambda n: "\u00e9" * n),
)
numbers = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**53 + 1, 2**63, -(2**63) - 1, 2**64, 10**40]),
    st.floats(allow_nan=True, allow_infinity=True),
)
# one value of each JSON type, small: swapped in for a field, the likeliest way a client gets a type wrong
other_type = st.sampled_from([None, True, 0, -1, 1.5, "", "x", [], [1], ["x"], {}, {"type": "text"}, [{}], [[]]])
junk = st.recursive(
    st.none() | st.booleans() | numbers | odd_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(_KNOWN_KEYS) | odd_text, inner,
                                                                max_size=4),
    max_leaves=10,
)


def slots(value: Any, out: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Every (container, key or index) in `value`, outermost first."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        out.append((value, key))
        slots(child, out)
    return out


@st.composite
def near_valid(draw: st.DrawFn, fmt: str, model: str = "m") -> Any:
    """A valid `fmt` body with one to three mutations; sometimes the whole body is junk instead."""
    if draw(st.integers(0, 19)) == 0:
        return draw(junk)
    body = copy.deepcopy(draw(st.sampled_from(BASES[fmt])))
    body["model"] = model
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):  # mostly one: an error the rest does not mask
        found = slots(body, [])
        if not found:
            break
        parent, key = draw(st.sampled_from(found))
        op = draw(st.sampled_from(["swap", "swap", "junk", "drop", "add", "wrap", "empty", "repeat"]))
        if op == "swap":
            parent[key] = copy.deepcopy(draw(other_type))
        elif op == "junk":
            parent[key] = draw(junk)
        elif op == "drop":
            del parent[key]
        elif op == "add" and isinstance(parent, dict):
            parent[draw(st.sampled_from(_KNOWN_KEYS) | odd_text)] = draw(junk)
        elif op == "wrap":
            parent[key] = draw(st.sampled_from([[parent[key]], {"type": parent[key]}, {"text": parent[key]}]))
        elif op == "empty":
            parent[key] = type(parent[key])() if isinstance(parent[key], list | dict | str) else None
        elif op == "repeat" and isinstance(parent[key], list | str):
            parent[key] = parent[key] * draw(st.integers(2, 50))
    return body


@st.composite
def body_bytes(draw: st.DrawFn, fmt: str, model: str = "m") -> bytes:
    """A near-valid body as JSON bytes: ASCII-escaped or not (lone surrogates then become invalid UTF-8)."""
    value = draw(near_valid(fmt, model))
    text = json.dumps(value, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass")


@st.composite
def raw_bytes(draw: st.DrawFn, fmt: str, model: str = "m") -> bytes:
    """Bytes that are not a valid body: garbage, or a valid body cut short, corrupted or padded."""
    kind = draw(st.sampled_from(["garbage", "cut", "flip", "pad"]))
    if kind == "garbage":
        return draw(st.binary(max_size=300))
    base = dict(draw(st.sampled_from(BASES[fmt])), model=model)
    data = bytearray(json.dumps(base).encode())
    if kind == "cut":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    return bytes(data) + draw(st.binary(min_size=1, max_size=20))
