"""A real OpenAI-compatible HTTP server for tests and benchmarks, with faults chosen by the prompt.

Run: python tests/e2e/upstream.py --port N [--name NAME]. The last user message steers it:
`status:429` answers that HTTP error, `sleep:2.5` waits before answering, `break:3` streams 3 chunks and
drops the connection, `gap:0.2` waits between stream chunks, `pad:N` pads a plain answer (or the error message)
to about N bytes, `garbage` answers 200 with a body that is not JSON, `nodone` ends a finished stream without
`[DONE]`, `tool:NAME` (with `tools` in the request) calls the function NAME with arguments
`{"text": <the prompt>}` (the tool results of later turns are echoed: `tool result: ...`); anything else is
echoed back word by word. Errors carry `Retry-After: 7`, answers
`x-ratelimit-remaining-requests: 99`.
A directive written `status:503@model-a` applies only on the upstream started with `--name model-a`.
A request with `continue_final_message` and a final assistant message streams the rest of the echo after it.
Non-streaming answers carry `x_received` (the body, Authorization and traceparent headers it got) for
pass-through checks.
A chat request with `logprobs: true` gets made-up logprobs, one token per word of the echo (as streamed), with
`top_logprobs` alternatives (the token itself first).
POST /v1/embeddings answers a vector per input made from the text's sha256 (`dimensions` long, default 8), as
floats or base64 float32 as asked; a `status:N` directive in an input answers that HTTP error.
POST /v1/responses answers the echo as a Response object or its event stream (Responses API pass-through).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import struct
import time

from aiohttp import web

FIXED = "Hello from the mock upstream."


def _prompt(body: dict) -> str:
    if "messages" in body:
        for message in reversed(body["messages"]):
            if message.get("role") == "user":
                content = message.get("content")
                if isinstance(content, list):
                    return "".join(p.get("text", "") for p in content if isinstance(p, dict))
                return content or ""
        return ""
    prompt = body.get("prompt", "")
    return prompt if isinstance(prompt, str) else str(prompt)


def _directive(prompt: str, name: str, upstream: str = "") -> str | None:
    for word in prompt.split():
        if word.startswith(name + ":"):
            value, _, only_on = word.split(":", 1)[1].partition("@")
            if not only_on or only_on == upstream:
                return value
    return None


def _continued_prefix(body: dict) -> str | None:
    messages = body.get("messages") or []
    if body.get("continue_final_message") and messages and messages[-1].get("role") == "assistant":
        return messages[-1].get("content") or ""
    return None


def _tool_call(body: dict, prompt: str, upstream: str) -> dict | None:
    """The `tool:NAME` directive's call, when the request offers a function NAME."""
    name = _directive(prompt, "tool", upstream)
    offered = {t.get("function", {}).get("name") for t in body.get("tools") or [] if isinstance(t, dict)}
    messages = body.get("messages") or []
    answered = bool(messages) and messages[-1].get("role") == "tool"  # the call's result came back: answer it
    if name is None or name not in offered or answered:
        return None
    return {"id": "call_mock1", "type": "function",
            "function": {"name": name, "arguments": json.dumps({"text": prompt})}}


def _answer(prompt: str) -> str:
    return FIXED if prompt in ("", "fixed") else f"echo: {prompt}"


def _logprobs(body: dict, pieces: list[str]) -> list[dict] | None:
    """Chat logprobs for `pieces`, one token each, when the request asks for them: the k-th token's logprob is
    -0.5 * k (from 1), its alternatives' 1 lower each."""
    if not body.get("logprobs"):
        return None

    def token(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    top = body.get("top_logprobs") or 0
    return [{**token(piece, -0.5 * (k + 1)),
             "top_logprobs": [token(piece if n == 0 else f"alt{n}", -0.5 * (k + 1) - n) for n in range(top)]}
            for k, piece in enumerate(pieces)]


class Upstream:
    def __init__(self, name: str) -> None:
        self.name = name
        self.requests = 0
        self.active = 0  # requests being answered now: a gateway that cancels its request brings this down

    async def models(self, _: web.Request) -> web.Response:
        card = {"id": self.name, "object": "model", "created": 0, "owned_by": "mock"}
        return web.json_response({"object": "list", "data": [card]})

    async def stats(self, _: web.Request) -> web.Response:
        return web.json_response({"requests": self.requests, "active": self.active, "name": self.name})

    async def generate(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.active += 1
        try:
            return await self._generate(request)
        finally:
            self.active -= 1

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            return web.json_response({"error": {"message": "bad json", "type": "invalid_request_error",
                                                "param": None, "code": None}}, status=400)
        chat = request.path.endswith("/chat/completions")
        prompt = _prompt(body)
        pad = int(_directive(prompt, "pad", self.name) or 0)
        if (status := _directive(prompt, "status", self.name)) is not None:
            message = f"mock error {status}" + " " * max(0, pad - 100)
            error = {"message": message, "type": "mock_error", "param": None, "code": f"mock_{status}"}
            return web.json_response({"error": error}, status=int(status), headers={"Retry-After": "7"})
        if "garbage" in prompt.split():
            return web.Response(body=b"<html>502 Bad Gateway</html>", content_type="application/json")
        if (delay := _directive(prompt, "sleep", self.name)) is not None:
            await asyncio.sleep(float(delay))
        call = _tool_call(body, prompt, self.name)
        if call is not None and chat:
            return await self._call_tool(request, body, call, prompt)
        results = [m.get("content") for m in body.get("messages") or [] if m.get("role") == "tool"]
        text = f"tool result: {results[-1]}" if results and not isinstance(results[-1], list) else _answer(prompt)
        prefix = _continued_prefix(body)
        if prefix is not None:  # vLLM's continue_final_message: finish the assistant's partial answer
            text = text[len(prefix):] if text.startswith(prefix) else text
        model = body.get("model", self.name)
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split()),
                 "total_tokens": len(prompt.split()) + len(text.split())}
        created = int(time.time())
        if body.get("stream"):
            return await self._stream(request, body, chat, text, model, usage, created, prompt)
        text += " " * max(0, pad - 200)  # plain answers only: a stream sends one chunk per word
        if chat:
            logprobs = _logprobs(body, [w if i == 0 else " " + w for i, w in enumerate(text.split(" "))])
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                      "finish_reason": "stop",
                      "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None}}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}
            obj = "text_completion"
        answer = {"id": "mock-1", "object": obj, "created": created, "model": model, "choices": [choice],
                  "usage": usage, "x_received": {"body": body, "authorization": request.headers.get("authorization"),
                                 "traceparent": request.headers.get("traceparent")}}
        return web.json_response(answer, headers={"x-ratelimit-remaining-requests": "99"})

    async def embeddings(self, request: web.Request) -> web.Response:
        self.requests += 1
        body = await request.json()
        inputs = body.get("input")
        inputs = [inputs] if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)) else inputs
        for item in inputs:
            if isinstance(item, str) and (status := _directive(item, "status", self.name)) is not None:
                error = {"message": f"mock error {status}", "type": "mock_error", "param": None,
                         "code": f"mock_{status}"}
                return web.json_response({"error": error}, status=int(status), headers={"Retry-After": "7"})
        dims = int(body.get("dimensions") or 8)
        data = []
        for index, item in enumerate(inputs):
            digest = hashlib.sha256(json.dumps(item).encode()).digest()
            vector = [digest[i % len(digest)] / 255 - 0.5 for i in range(dims)]
            if body.get("encoding_format") == "base64":
                embedding = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
            else:
                embedding = vector
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = sum(len(i.split()) if isinstance(i, str) else len(i) for i in inputs)
        answer = {"object": "list", "data": data, "model": body.get("model", self.name),
                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                  "x_received": {"body": body, "authorization": request.headers.get("authorization"),
                                 "traceparent": request.headers.get("traceparent")}}
        return web.json_response(answer, headers={"x-ratelimit-remaining-requests": "99"})

    async def responses(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/responses, as an upstream serving the Responses API itself: `echo: <the input's text>` as a
        Response (with `x_received`) or its events, one delta per word; `status:N` and `break:N` as for chat."""
        self.requests += 1
        body = await request.json()
        given = body.get("input")
        parts = [given] if isinstance(given, str) else [
            c if isinstance(c, str) else "".join(p.get("text", "") for p in c if isinstance(p, dict))
            for c in (i.get("content") for i in given or [] if isinstance(i, dict)) if isinstance(c, str | list)]
        prompt = " ".join(parts)
        if (status := _directive(prompt, "status", self.name)) is not None:
            error = {"message": f"mock error {status}", "type": "mock_error", "param": None, "code": f"mock_{status}"}
            return web.json_response({"error": error}, status=int(status))
        text = _answer(prompt)
        usage = {"input_tokens": len(prompt.split()), "input_tokens_details": {"cached_tokens": 0},
                 "output_tokens": len(text.split()), "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": len(prompt.split()) + len(text.split())}
        part = {"type": "output_text", "text": text, "annotations": []}
        item = {"id": "msg_mock1", "type": "message", "status": "completed", "role": "assistant", "content": [part]}
        answer = {"id": "resp_mock1", "object": "response", "created_at": int(time.time()), "status": "completed",
                  "model": body.get("model", self.name), "output": [item], "usage": usage,
                  "previous_response_id": body.get("previous_response_id")}
        if not body.get("stream"):
            answer["x_received"] = {"body": body, "authorization": request.headers.get("authorization"),
                                    "traceparent": request.headers.get("traceparent")}
            return web.json_response(answer)
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        started = {**answer, "status": "in_progress", "output": [], "usage": None}
        words = [w if i == 0 else " " + w for i, w in enumerate(text.split(" "))]
        events = [("response.created", {"response": started}),
                  ("response.output_item.added", {"output_index": 0, "item": {**item, "content": []}}),
                  ("response.content_part.added", {"item_id": "msg_mock1", "output_index": 0, "content_index": 0,
                                                   "part": {**part, "text": ""}}),
                  *(("response.output_text.delta", {"item_id": "msg_mock1", "output_index": 0, "content_index": 0,
                                                    "delta": w}) for w in words),
                  ("response.output_item.done", {"output_index": 0, "item": item}),
                  ("response.completed", {"response": answer})]
        breaks = _directive(prompt, "break", self.name)
        for number, (kind, data) in enumerate(events):
            if breaks is not None and number >= int(breaks):
                request.transport.close()  # drop the connection mid-stream
                return response
            payload = json.dumps({"type": kind, "sequence_number": number, **data}, separators=(",", ":"))
            await response.write(f"event: {kind}\ndata: {payload}\n\n".encode())
        await response.write_eof()
        return response

    async def _call_tool(self, request: web.Request, body: dict, call: dict, prompt: str) -> web.StreamResponse:
        """The answer is one call of a requested function: plain, or streamed as OpenAI streams tool calls."""
        model, created = body.get("model", self.name), int(time.time())
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": 5, "total_tokens": len(prompt.split()) + 5}
        if not body.get("stream"):
            message = {"role": "assistant", "content": None, "refusal": None, "tool_calls": [call]}
            choice = {"index": 0, "message": message, "finish_reason": "tool_calls", "logprobs": None}
            return web.json_response({"id": "mock-1", "object": "chat.completion", "created": created,
                                      "model": model, "choices": [choice], "usage": usage})
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        arguments = call["function"]["arguments"]
        half = len(arguments) // 2
        deltas = [
            {"role": "assistant", "content": None},
            {"tool_calls": [{"index": 0, "id": call["id"], "type": "function",
                             "function": {"name": call["function"]["name"], "arguments": ""}}]},
            {"tool_calls": [{"index": 0, "function": {"arguments": arguments[:half]}}]},
            {"tool_calls": [{"index": 0, "function": {"arguments": arguments[half:]}}]},
        ]
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        for delta, finish in [*((d, None) for d in deltas), ({}, "tool_calls")]:
            data = {"id": "mock-1", "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            await response.write(b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n")
        if include_usage:
            final = {"id": "mock-1", "object": "chat.completion.chunk", "created": created, "model": model,
                     "choices": [], "usage": usage}
            await response.write(b"data: " + json.dumps(final, separators=(",", ":")).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _stream(self, request, body, chat, text, model, usage, created, prompt) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream",
                                               "x-ratelimit-remaining-requests": "99"})
        await response.prepare(request)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        gap = float(_directive(prompt, "gap", self.name) or 0)
        breaks = _directive(prompt, "break", self.name)
        words = text.split(" ")
        pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]

        def chunk(delta: dict | None, finish: str | None, piece: str = "", logprob: dict | None = None) -> bytes:
            if chat:
                logprobs = None if logprob is None else {"content": [logprob], "refusal": None}
                choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]
                obj = "chat.completion.chunk"
            else:
                choices = [{"index": 0, "text": piece, "finish_reason": finish, "logprobs": None}]
                obj = "text_completion"
            data = {"id": "mock-1", "object": obj, "created": created, "model": model, "choices": choices}
            if include_usage:
                data["usage"] = None
            return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"

        if chat:
            await response.write(chunk({"role": "assistant", "content": ""}, None))
        if _continued_prefix(body) is not None:  # a continuation goes on mid-word: split keeping spaces
            pieces = [p for p in text.replace(" ", "\0 ").split("\0") if p]
        logprobs = (_logprobs(body, pieces) if chat else None) or [None] * len(pieces)
        for i, piece in enumerate(pieces):
            if breaks is not None and i >= int(breaks):
                request.transport.close()  # drop the connection mid-stream
                return response
            if gap:
                await asyncio.sleep(gap)
            await response.write(chunk({"content": piece}, None, piece, logprobs[i]))
        await response.write(chunk({}, "stop"))
        if include_usage:
            final = {"id": "mock-1", "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": created, "model": model, "choices": [], "usage": usage}
            await response.write(b"data: " + json.dumps(final, separators=(",", ":")).encode() + b"\n\n")
        if "nodone" not in prompt.split():
            await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def make_app(name: str = "mock-model") -> web.Application:
    upstream = Upstream(name)
    app = web.Application()
    app.router.add_get("/v1/models", upstream.models)
    app.router.add_get("/stats", upstream.stats)
    app.router.add_post("/v1/chat/completions", upstream.generate)
    app.router.add_post("/v1/completions", upstream.generate)
    app.router.add_post("/v1/embeddings", upstream.embeddings)
    app.router.add_post("/v1/responses", upstream.responses)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="mock-model")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    # handler_cancellation: a request whose client (the gateway) hung up stops here too, as in real servers
    web.run_app(make_app(args.name), host=args.host, port=args.port, print=None, access_log=None,
                handler_cancellation=True)


if __name__ == "__main__":
    main()
