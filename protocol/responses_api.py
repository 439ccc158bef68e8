"""The OpenAI Responses API at the edge: its request, translated onto a chat completion request, and chat answers
(plain, or streamed chunk by chunk) translated back into Response objects and their events. No I/O here."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from protocol.errors import BadRequest, GatewayError, UnsupportedParameter, UpstreamInvalidResponse
from protocol.openai import (
    AnswerMessageView,
    PositiveInt,
    answer_text,
    decode_object,
    usage_count,
    without_nulls,
)

__all__ = [
    "RESPONSES_FIELDS",
    "ResponseShape",
    "ResponsesRequest",
    "StreamTranslator",
    "chat_request",
    "decode_responses_request",
    "input_messages",
    "new_item_id",
    "output_items",
    "replay_events",
    "response_of",
    "response_usage",
    "routing_request",
    "sse_frame",
]

# every field of OpenAI's CreateResponse: consumed here, never sent on to a chat completion request (any other
# field, the gateway's routing fields and vendor extras such as top_k, goes on as chat completions take it)
RESPONSES_FIELDS = frozenset({
    "background", "context_management", "conversation", "include", "input", "instructions", "max_output_tokens",
    "max_tool_calls", "metadata", "model", "moderation", "parallel_tool_calls", "previous_response_id", "prompt",
    "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention", "reasoning", "safety_identifier",
    "service_tier", "store", "stream", "stream_options", "temperature", "text", "tool_choice", "tools",
    "top_logprobs", "top_p", "truncation", "user",
})
# the `include` a translated answer fills in; the other values OpenAI defines (its SDK's ResponseIncludable) name data
# of items a translated answer never has (hosted tools' results, encrypted reasoning, input images): nothing to add,
# as for a model of OpenAI's without them
_LOGPROBS = "message.output_text.logprobs"
_INCLUDABLE = frozenset({
    _LOGPROBS, "file_search_call.results", "web_search_call.results", "web_search_call.action.sources",
    "message.input_image.image_url", "computer_call_output.output.image_url", "code_interpreter_call.outputs",
    "reasoning.encrypted_content",
})
_ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
_TOOL_CHOICES = ("auto", "none", "required")


class ResponsesRequest(Struct, kw_only=True):
    """POST /v1/responses: the fields this gateway reads (the rest of the body is kept raw)."""

    model: str | None = None
    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    max_output_tokens: PositiveInt | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    include: list[str] | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool | None = None
    stream: bool = False
    store: bool | None = None  # None is OpenAI's default: stored
    previous_response_id: str | None = None
    reasoning: dict[str, Any] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None

    @property
    def stored(self) -> bool:
        return self.store is not False

    @property
    def logprobs(self) -> bool:
        """Whether the output text's logprobs are asked for (`include`)."""
        return _LOGPROBS in (self.include or ())


def decode_responses_request(data: bytes) -> tuple[ResponsesRequest, dict[str, Any]]:
    """The request and its raw body; a 400 naming the field for anything this gateway cannot serve."""
    raw = decode_object(data)
    if raw.get("stream", False) is None:  # nullable in OpenAI's spec: not streamed
        raw = without_nulls(raw, frozenset({"stream"}))
    try:
        request = msgspec.convert(raw, ResponsesRequest)
    except msgspec.ValidationError as exc:
        problem, sep, where = str(exc).rpartition(" - at ")
        param = where.strip("`").removeprefix("$.") if sep else None
        raise BadRequest(f"Invalid value for '{param}': {problem}" if sep else str(exc), param=param) from None
    if request.background:
        raise UnsupportedParameter("'background' responses are not supported: send the request and wait, or stream.",
                                   param="background")
    for name in ("conversation", "prompt"):
        if getattr(request, name) is not None:
            raise UnsupportedParameter(f"'{name}' objects live on OpenAI's servers and are not supported here.",
                                       param=name)
    if request.input is None:
        raise BadRequest("Missing required parameter: 'input'.", param="input")
    return request, raw


# ---- request: Responses -> chat completions ----------------------------------------------------------------


def _part(part: Any, where: str) -> dict[str, Any]:
    """One content part as chat completions writes it."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]}
    if kind == "refusal" and isinstance(part.get("refusal"), str):
        return {"type": "text", "text": part["refusal"]}
    if kind == "input_image" and isinstance(part.get("image_url"), str):
        return {"type": "image_url", "image_url": {"url": part["image_url"], "detail": part.get("detail") or "auto"}}
    raise UnsupportedParameter(f"Content parts of type {kind!r} are not supported here (input_text, output_text "
                               "and input_image with an image_url are).", param=where)


def _content(content: Any, where: str) -> str | list[dict[str, Any]]:
    """A message's content: a string stays one; one text part becomes a string, other lists chat parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"'{where}' must be a string or a list of content parts.", param=where)
    parts = [_part(p, f"{where}[{i}]") for i, p in enumerate(content)]
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _output_text(output: Any, where: str) -> str:
    """A function call's output: a string, or text parts joined."""
    if isinstance(output, str):
        return output
    content = _content(output, where)
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)


def _field(item: dict[str, Any], name: str, where: str) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise BadRequest(f"Missing or invalid '{where}.{name}': expected a string.", param=f"{where}.{name}")
    return value


def input_messages(value: str | list[dict[str, Any]], where: str = "input") -> list[dict[str, Any]]:
    """Input items as chat messages: messages (user, system, developer as system, assistant), function calls as an
    assistant message's tool_calls (one turn's text and calls in one message), their outputs as `tool` messages.
    Output items read back the same way, so a stored conversation is this function of its items."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        at = f"{where}[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            role = _ROLES.get(role) if isinstance(role, str) else None  # a list or object is no role either
            if role is None:
                raise BadRequest(f"Invalid '{at}.role': expected one of user, system, developer or assistant.",
                                 param=f"{at}.role")
            messages.append({"role": role, "content": _content(item.get("content"), f"{at}.content")})
        elif kind == "function_call":
            call = {"id": _field(item, "call_id", at), "type": "function",
                    "function": {"name": _field(item, "name", at), "arguments": item.get("arguments") or ""}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": _field(item, "call_id", at),
                             "content": _output_text(item.get("output"), f"{at}.output")})
        else:
            raise UnsupportedParameter(f"Input items of type {kind!r} are not supported here: send messages, "
                                       "function_call and function_call_output items.", param=f"{at}.type")
    return messages


def _chat_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    others = sorted({str(t.get("type")) for t in tools if t.get("type") != "function"})
    if others:
        raise UnsupportedParameter(f"Only function tools are supported here, not {', '.join(others)} (tools OpenAI "
                                   "hosts itself).", param="tools")
    out = []
    for i, tool in enumerate(tools):
        function: dict[str, Any] = {"name": _field(tool, "name", f"tools[{i}]")}
        for key in ("description", "parameters", "strict"):
            if tool.get(key) is not None:
                function[key] = tool[key]
        out.append({"type": "function", "function": function})
    return out


def _chat_tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, str) and choice in _TOOL_CHOICES:
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise UnsupportedParameter("'tool_choice' must be auto, none, required or {'type': 'function', 'name': ...}.",
                               param="tool_choice")


def _response_format(text: dict[str, Any]) -> dict[str, Any] | None:
    fmt = text.get("format")
    if fmt is None or fmt == {"type": "text"}:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        name = _field(fmt, "name", "text.format")
        if not isinstance(fmt.get("schema"), dict):
            raise BadRequest("Missing or invalid 'text.format.schema': expected an object.", param="text.format.schema")
        schema: dict[str, Any] = {"name": name, "schema": fmt["schema"]}
        for key in ("description", "strict"):
            if fmt.get(key) is not None:
                schema[key] = fmt[key]
        return {"type": "json_schema", "json_schema": schema}
    raise BadRequest("'text.format.type' must be text, json_object or json_schema.", param="text.format")


def _check_include(include: list[str] | None) -> None:
    """`include` holds only values OpenAI defines (a 400 naming `include` for any other, as OpenAI answers)."""
    for i, value in enumerate(include or ()):
        if value not in _INCLUDABLE:
            raise BadRequest(f"Invalid value for 'include[{i}]': {value!r}. Supported values are: "
                             f"{', '.join(repr(v) for v in sorted(_INCLUDABLE))}.", param="include")


def chat_request(request: ResponsesRequest, raw: dict[str, Any], messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat completion request that serves `request` over `messages` (a stored conversation, then the input):
    the instructions go first as a system message; a stream asks for its usage in the last chunk; the output
    text's logprobs (`include`) are the chat answer's, with `top_logprobs` alternatives."""
    _check_include(request.include)
    chat = {k: v for k, v in raw.items() if k not in RESPONSES_FIELDS}
    if request.instructions:
        messages = [{"role": "system", "content": request.instructions}, *messages]
    chat["messages"] = messages
    if request.model is not None:
        chat["model"] = request.model
    for name in ("temperature", "top_p", "user"):
        if (value := getattr(request, name)) is not None:
            chat[name] = value
    if request.max_output_tokens is not None:
        chat["max_completion_tokens"] = request.max_output_tokens
    if request.tools:
        chat["tools"] = _chat_tools(request.tools)
        if request.tool_choice is not None:
            chat["tool_choice"] = _chat_tool_choice(request.tool_choice)
        if request.parallel_tool_calls is not None:
            chat["parallel_tool_calls"] = request.parallel_tool_calls
    elif request.tool_choice not in (None, "auto", "none"):
        raise BadRequest("'tool_choice' needs 'tools'.", param="tool_choice")
    if request.text is not None and (fmt := _response_format(request.text)) is not None:
        chat["response_format"] = fmt
    if request.reasoning and request.reasoning.get("effort") is not None:
        chat["reasoning_effort"] = request.reasoning["effort"]
    if request.logprobs:
        chat["logprobs"] = True
        if request.top_logprobs is not None:
            chat["top_logprobs"] = request.top_logprobs
    if request.stream:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat


def _text_of(value: Any) -> list[str]:
    """Every string an input holds (message texts, call arguments and outputs): for estimates only."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [t for v in value for t in _text_of(v)]
    if isinstance(value, dict):
        return [t for k in ("text", "content", "arguments", "output", "refusal") if k in value
                for t in _text_of(value[k])]
    return []


def routing_request(request: ResponsesRequest, raw: dict[str, Any]) -> dict[str, Any]:
    """A chat request that stands for a Responses request relayed as it is (native pass-through): what routing,
    rate limits and budgets read (the model, the text's size, the output cap), whatever item types it holds."""
    chat = {k: v for k, v in raw.items() if k not in RESPONSES_FIELDS}
    text = "\n".join([*_text_of(request.instructions), *_text_of(request.input)])
    chat["messages"] = [{"role": "user", "content": text}]
    if request.model is not None:
        chat["model"] = request.model
    if request.max_output_tokens is not None:
        chat["max_completion_tokens"] = request.max_output_tokens
    if request.user is not None:
        chat["user"] = request.user
    chat["stream"] = request.stream
    return chat


# ---- answers: chat completions -> Responses -----------------------------------------------------------------


def new_item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _echo_tool(tool: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "name": tool.get("name"), "description": tool.get("description"),
            "parameters": tool.get("parameters"), "strict": tool.get("strict")}


# the request's settings a Response echoes (ResponseShape.echo)
_ECHOED = ("background", "instructions", "max_output_tokens", "metadata", "parallel_tool_calls",
           "previous_response_id", "reasoning", "store", "temperature", "text", "tool_choice", "tools", "top_p",
           "truncation", "user", "top_logprobs")


class ResponseShape:
    """What every Response object of one request repeats: its id, its creation time and the request's settings
    (echoed as OpenAI echoes them, defaults filled in); `logprobs`: whether its output text carries them."""

    __slots__ = ("created_at", "echo", "id", "logprobs")

    def __init__(self, request: ResponsesRequest, response_id: str | None = None) -> None:
        self.id = response_id or new_item_id("resp")
        self.created_at = int(time.time())
        self.logprobs = request.logprobs
        text = dict(request.text) if request.text else {}
        text.setdefault("format", {"type": "text"})
        self.echo: dict[str, Any] = {
            "background": False,
            "instructions": request.instructions,
            "max_output_tokens": request.max_output_tokens,
            "metadata": request.metadata or {},
            "parallel_tool_calls": request.parallel_tool_calls is not False,
            "previous_response_id": request.previous_response_id,
            "reasoning": None,
            "store": request.stored,
            "temperature": request.temperature if request.temperature is not None else 1.0,
            "text": text,
            "tool_choice": request.tool_choice if request.tool_choice is not None else "auto",
            "tools": [_echo_tool(t) for t in request.tools or ()],
            "top_p": request.top_p if request.top_p is not None else 1.0,
            "truncation": request.truncation or "disabled",
        }
        if request.user is not None:
            self.echo["user"] = request.user
        if request.top_logprobs is not None:
            self.echo["top_logprobs"] = request.top_logprobs

    @classmethod
    def of(cls, response: dict[str, Any]) -> ResponseShape:
        """The shape of a Response already made (a stored one, replayed): its id, creation time and settings as it
        echoed them; its output text's logprobs are whatever it holds."""
        shape = cls.__new__(cls)
        shape.id, shape.created_at, shape.logprobs = response["id"], response["created_at"], True
        shape.echo = {key: response[key] for key in _ECHOED if key in response}
        return shape

    def response(self, *, status: str, model: str, output: list[dict[str, Any]], usage: dict[str, Any] | None = None,
                 incomplete: str | None = None, error: GatewayError | None = None) -> dict[str, Any]:
        """A Response object: `status` in_progress, completed, incomplete (`incomplete` says why) or failed."""
        response: dict[str, Any] = {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": None if error is None else {"code": "rate_limit_exceeded" if error.status == 429
                                                 else "server_error", "message": error.message},
            "incomplete_details": None if incomplete is None else {"reason": incomplete},
            "model": model, "output": output, **self.echo,
        }
        if usage is not None:
            response["usage"] = usage
        return response


def response_usage(usage: Any) -> dict[str, Any] | None:
    """A chat completion's usage in the Responses API's terms; an upstream's figure that is no count (see
    usage_count) is taken as 0, and a usage that is no object as none."""
    if not usage or not isinstance(usage, dict):
        return None
    prompt = usage_count(usage.get("prompt_tokens")) or 0
    completion = usage_count(usage.get("completion_tokens")) or 0
    cached = usage_count(_details(usage, "prompt_tokens_details").get("cached_tokens")) or 0
    reasoning = usage_count(_details(usage, "completion_tokens_details").get("reasoning_tokens")) or 0
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": usage_count(usage.get("total_tokens")) or prompt + completion}


def _details(usage: dict[str, Any], name: str) -> dict[str, Any]:
    found = usage.get(name)
    return found if isinstance(found, dict) else {}


def _incomplete(finish_reason: str | None) -> str | None:
    return {"length": "max_output_tokens", "content_filter": "content_filter"}.get(finish_reason or "")


def _message_item(item_id: str, status: str, parts: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": parts or []}


def _text_part(text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def _content_part(kind: str, text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """An output_text part (with its logprobs), or the refusal part of an upstream's `refusal`."""
    return _text_part(text, logprobs) if kind == "output_text" else {"type": "refusal", "refusal": text}


# a chat choice's `logprobs`, as the translation reads them (bytes may be null or left out, as some upstreams do)
class _TopLogprobView(Struct):
    token: str
    logprob: float
    bytes: list[int] | None = None


class _LogprobView(_TopLogprobView):
    top_logprobs: list[_TopLogprobView] | None = None


class _ChoiceLogprobsView(Struct):
    content: list[_LogprobView] | None = None


def _top(view: _TopLogprobView) -> dict[str, Any]:
    return {"token": view.token, "logprob": view.logprob,
            "bytes": view.bytes if view.bytes is not None else list(view.token.encode())}


def _output_logprobs(choice: dict[str, Any]) -> list[dict[str, Any]]:
    """A chat choice's (or chunk's) logprobs of its content as an output_text part holds them (OpenAI's LogProb:
    token, logprob, bytes, top_logprobs; a token's UTF-8 for bytes an upstream left out). Logprobs that cannot be
    read are no answer the gateway can read: 502."""
    try:
        view = msgspec.convert(choice.get("logprobs"), _ChoiceLogprobsView | None)
    except msgspec.ValidationError as exc:
        raise UpstreamInvalidResponse(f"the upstream's logprobs could not be read: {exc}") from None
    return [] if view is None else [{**_top(t), "top_logprobs": [_top(top) for top in t.top_logprobs or ()]}
                                    for t in view.content or ()]


def _event_logprobs(logprobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Logprobs as the output_text delta and done events carry them (the spec's ResponseLogProb: no bytes)."""
    return [{"token": t["token"], "logprob": t["logprob"],
             "top_logprobs": [{"token": top["token"], "logprob": top["logprob"]} for top in t["top_logprobs"]]}
            for t in logprobs]


# what the translation reads of a chat answer or chunk, to check its types: any other field is not read
class _ChoiceView(Struct):
    index: int = 0
    message: AnswerMessageView | None = None
    delta: AnswerMessageView | None = None
    finish_reason: str | None = None


class _AnswerView(Struct):
    model: str | None = None
    choices: list[_ChoiceView] | None = None


def _checked(answer: Any) -> None:
    """An upstream answer or chunk whose fields do not have their types is no answer the gateway can read: 502."""
    try:
        msgspec.convert(answer, _AnswerView)
    except msgspec.ValidationError as exc:
        raise UpstreamInvalidResponse(f"the upstream's chat answer could not be read: {exc}") from None


def _arguments(arguments: str | dict[str, Any] | None) -> str:
    return arguments if isinstance(arguments, str) else "" if arguments is None else msgspec.json.encode(
        arguments).decode()


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "status": status, "call_id": call_id, "name": name,
            "arguments": arguments}


def output_items(message: dict[str, Any], finish_reason: str | None,
                 logprobs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """A chat completion's message as output items: its text (with `logprobs`, when asked for) and refusal as a
    message item (also when there is nothing else), then one function_call item per tool call. An incomplete
    answer's last item is the one cut off: it is `incomplete`, as in a stream."""
    items = []
    calls = message.get("tool_calls") or []
    text, refusal = answer_text(message.get("content")), message.get("refusal")
    parts = [_text_part(text, logprobs)] if text or not (refusal or calls) else []
    if refusal:
        parts.append(_content_part("refusal", refusal))
    if parts:
        items.append(_message_item(new_item_id("msg"), "completed", parts))
    for call in calls:
        function = call.get("function") or {}
        items.append(_call_item(new_item_id("fc"), call.get("id") or new_item_id("call"),
                                function.get("name") or "", _arguments(function.get("arguments")), "completed"))
    if _incomplete(finish_reason):
        items[-1]["status"] = "incomplete"
    return items


# what OpenAI's chat.completion defines: translated, or (the id, the choices' details) left behind
_CHAT_FIELDS = frozenset({"id", "object", "created", "model", "choices", "usage", "system_fingerprint",
                          "service_tier"})


def response_of(shape: ResponseShape, completion: dict[str, Any], model: str) -> dict[str, Any]:
    """A chat completion (its first choice) as the Response it answers; a vendor's own top-level fields (vLLM's,
    the test upstream's `x_received`) go on, as a relayed chat answer keeps them. One that cannot be read: 502."""
    _checked(completion)
    choice = (completion.get("choices") or [{}])[0]
    finish = choice.get("finish_reason")
    incomplete = _incomplete(finish)
    response = shape.response(status="incomplete" if incomplete else "completed",
                              model=completion.get("model") or model,
                              output=output_items(choice.get("message") or {}, finish,
                                                  _output_logprobs(choice) if shape.logprobs else None),
                              usage=response_usage(completion.get("usage")), incomplete=incomplete)
    response.update((k, v) for k, v in completion.items() if k not in _CHAT_FIELDS and k not in response)
    return response


def sse_frame(event: dict[str, Any]) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (event["type"].encode(), msgspec.json.encode(event))


class StreamTranslator:
    """Chat completion chunks in, Responses stream events out (dicts, numbered): created and in_progress on the
    first chunk; for text a message item, its output_text part and the deltas; for each tool call a function_call
    item and its argument deltas; each item closed (done events) when the next begins or the choice finishes;
    then `response.completed` (or `response.incomplete`) with the whole output and the usage. `output` and
    `final` hold the answer once `finish` has run. The output text's deltas carry their logprobs when the shape
    asks for them; `item_ids`, when given, are the items' ids in order (a replay's: see replay_events)."""

    def __init__(self, shape: ResponseShape, model: str, item_ids: Iterable[str] = ()) -> None:
        self.shape, self.model = shape, model
        self.ids = iter(item_ids)
        self.sequence = 0
        self.started = False
        self.output: list[dict[str, Any]] = []  # finished items, in order
        self.open: dict[str, Any] | None = None  # the item being streamed: {"item", "index", "text" | "tool"}
        self.calls: dict[int, dict[str, Any]] = {}  # tool-call index -> its open item
        self.usage: dict[str, Any] | None = None
        self.finish_reason: str | None = None
        self.final: dict[str, Any] | None = None

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def _start(self, model: str | None) -> list[dict[str, Any]]:
        self.started = True
        self.model = model or self.model
        response = self.shape.response(status="in_progress", model=self.model, output=[])
        return [self._event("response.created", response=response),
                self._event("response.in_progress", response=response)]

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        _checked(chunk)
        events = [] if self.started else self._start(chunk.get("model"))
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue  # one choice: the Responses API has no `n`
            delta = choice.get("delta") or {}
            if text := answer_text(delta.get("content")):
                events += self._text("output_text", text, _output_logprobs(choice) if self.shape.logprobs else [])
            if refusal := delta.get("refusal"):
                events += self._text("refusal", refusal)
            for call in delta.get("tool_calls") or ():
                events += self._call(call)
            if reason := choice.get("finish_reason"):
                self.finish_reason = reason
                events += self._close()
        return events

    def _index(self) -> int:
        return len(self.output) + (self.open is not None)

    def _item_id(self, prefix: str) -> str:
        return next(self.ids, None) or new_item_id(prefix)

    def _open_message(self, *kinds: str) -> dict[str, Any]:
        """A message item opened (with parts of `kinds` begun): its output_item.added event."""
        item = _message_item(self._item_id("msg"), "in_progress")
        # each part kind -> its pieces, in order; the output text's logprobs
        self.open = {"item": item, "index": len(self.output), "parts": {k: [] for k in kinds}, "logprobs": []}
        return self._event("response.output_item.added", output_index=self.open["index"], item=item)

    def _text(self, kind: str, text: str, logprobs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """A piece of the message's output_text (with its tokens' logprobs) or refusal part (`kind`), each part
        opened when it first comes."""
        events = []
        if self.open is None or "parts" not in self.open:
            events += self._close()
            events.append(self._open_message())
        item_id, index, parts = self.open["item"]["id"], self.open["index"], self.open["parts"]
        if kind not in parts:
            parts[kind] = []
            events.append(self._event("response.content_part.added", item_id=item_id, output_index=index,
                                      content_index=len(parts) - 1, part=_content_part(kind, "")))
        parts[kind].append(text)
        at = {"item_id": item_id, "output_index": index, "content_index": list(parts).index(kind), "delta": text}
        if kind == "refusal":
            events.append(self._event("response.refusal.delta", **at))
        else:
            self.open["logprobs"] += logprobs or ()
            events.append(self._event("response.output_text.delta", **at, logprobs=_event_logprobs(logprobs or [])))
        return events

    def _call(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        events = []
        index = call.get("index", 0)
        function = call.get("function") or {}
        if self.open is None or self.open.get("tool") != index:
            events += self._close()
            item = _call_item(self._item_id("fc"), call.get("id") or new_item_id("call"),
                              function.get("name") or "", "", "in_progress")
            self.open = {"item": item, "index": len(self.output), "tool": index, "arguments": []}
            events.append(self._event("response.output_item.added", output_index=self.open["index"],
                                      item=dict(item)))
        if piece := _arguments(function.get("arguments")):
            self.open["arguments"].append(piece)
            events.append(self._event("response.function_call_arguments.delta", item_id=self.open["item"]["id"],
                                      output_index=self.open["index"], delta=piece))
        return events

    def _close(self) -> list[dict[str, Any]]:
        """The done events of the open item, which joins the output."""
        opened, self.open = self.open, None
        if opened is None:
            return []
        item, index = opened["item"], opened["index"]
        # an item closed by the choice's finish is the one a token limit (or a filter) cut off
        status = "incomplete" if _incomplete(self.finish_reason) else "completed"
        if "parts" in opened:
            events, parts = [], []
            logprobs = opened["logprobs"]
            for content_index, (kind, pieces) in enumerate(opened["parts"].items()):
                text = "".join(pieces)
                at = {"item_id": item["id"], "output_index": index, "content_index": content_index}
                events.append(self._event("response.refusal.done", **at, refusal=text) if kind == "refusal"
                              else self._event("response.output_text.done", **at, text=text,
                                               logprobs=_event_logprobs(logprobs)))
                parts.append(_content_part(kind, text, logprobs))
                events.append(self._event("response.content_part.done", **at, part=parts[-1]))
            done = _message_item(item["id"], status, parts)
        else:
            arguments = "".join(opened["arguments"])
            done = {**item, "arguments": arguments, "status": status}
            events = [self._event("response.function_call_arguments.done", item_id=item["id"], name=item["name"],
                                  output_index=index, arguments=arguments)]
        self.output.append(done)
        events.append(self._event("response.output_item.done", output_index=index, item=done))
        return events

    def finish(self) -> list[dict[str, Any]]:
        """The closing events, once the chunks have ended: an empty message when nothing came, then the answer."""
        events = [] if self.started else self._start(None)
        events += self._close()
        if not self.output:
            events += self._empty_message()
        incomplete = _incomplete(self.finish_reason)
        self.final = self.shape.response(status="incomplete" if incomplete else "completed", model=self.model,
                                         output=self.output, usage=response_usage(self.usage), incomplete=incomplete)
        kind = "response.incomplete" if incomplete else "response.completed"
        return [*events, self._event(kind, response=self.final)]

    def _empty_message(self) -> list[dict[str, Any]]:
        added = self._open_message("output_text")
        return [added, self._event("response.content_part.added", item_id=added["item"]["id"], output_index=0,
                                   content_index=0, part=_text_part("")), *self._close()]

    def fail(self, error: GatewayError) -> list[dict[str, Any]]:
        """`response.failed` for an error that broke the stream, with the output finished so far."""
        events = [] if self.started else self._start(None)
        self.open = None
        failed = self.shape.response(status="failed", model=self.model, output=self.output, error=error)
        return [*events, self._event("response.failed", response=failed)]


def _replayed_chunks(response: dict[str, Any]) -> list[dict[str, Any]]:
    """A finished Response's output as the chat chunks that would have streamed it: each content part and each
    function call whole in one chunk, then the finish its status tells."""
    deltas: list[tuple[dict[str, Any], Any]] = []
    for index, item in enumerate(response.get("output") or ()):
        if item.get("type") == "message":
            for part in item.get("content") or ():
                if part.get("type") == "refusal":
                    deltas.append(({"refusal": part.get("refusal") or ""}, None))
                else:
                    deltas.append(({"content": part.get("text") or ""}, {"content": part.get("logprobs") or []}))
        elif item.get("type") == "function_call":
            call = {"index": index, "id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments") or ""}}
            deltas.append(({"tool_calls": [call]}, None))
    incomplete = (response.get("incomplete_details") or {}).get("reason")
    finish = {"max_output_tokens": "length", "content_filter": "content_filter"}.get(incomplete, "stop")
    return [*({"choices": [{"index": 0, "delta": delta, "logprobs": logprobs}]} for delta, logprobs in deltas),
            {"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}]


def replay_events(response: dict[str, Any]) -> list[dict[str, Any]]:
    """A finished Response (a stored one) as its event stream, made by the StreamTranslator from its output fed
    back as chat chunks (each content part one delta, each call's arguments one): the items keep their ids, the
    closing event carries the Response as it is. The same Response replays as the same events."""
    translator = StreamTranslator(ResponseShape.of(response), response.get("model") or "",
                                  [item.get("id") or "" for item in response.get("output") or ()])
    events = [event for chunk in _replayed_chunks(response) for event in translator.feed(chunk)]
    events += translator.finish()
    events[-1]["response"] = response
    return events
