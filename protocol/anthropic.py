"""Anthropic's Messages API: its request Structs, their translation onto a chat completion request, and chat
answers (plain and streamed) translated back into Anthropic's shape; errors in Anthropic's shape."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from protocol.errors import BadRequest, GatewayError, UpstreamError, UpstreamInvalidResponse
from protocol.openai import (
    GATEWAY_FIELDS,
    MAX_COUNT,
    AnswerMessageView,
    CallView,
    FunctionView,
    PositiveInt,
    answer_text,
    convert_struct,
    decode_object,
    usage_count,
)

__all__ = [
    "Base64Source",
    "CountTokensRequest",
    "ImageBlock",
    "InputMessage",
    "MessageResponse",
    "MessageUsage",
    "MessagesDialect",
    "MessagesRequest",
    "RedactedThinkingBlock",
    "StreamTranslator",
    "TextBlock",
    "ThinkingBlock",
    "Tool",
    "ToolChoiceAny",
    "ToolChoiceAuto",
    "ToolChoiceNone",
    "ToolChoiceTool",
    "ToolResultBlock",
    "ToolUseBlock",
    "URLSource",
    "decode_count_tokens",
    "decode_messages",
    "error_body",
    "error_type",
    "message_from_chat",
    "to_chat",
]

log = logging.getLogger("pointsman")
NonEmpty = Annotated[str, Meta(min_length=1)]


# ---- requests -------------------------------------------------------------------------------------------


class _Block(Struct, tag_field="type", kw_only=True):
    """A content block; `type` is its tag. Unknown fields (`cache_control`, `citations`) are ignored."""


class TextBlock(_Block, tag="text"):
    text: str


class Base64Source(Struct, tag_field="type", tag="base64", kw_only=True):
    media_type: NonEmpty
    data: NonEmpty


class URLSource(Struct, tag_field="type", tag="url", kw_only=True):
    url: NonEmpty


class ImageBlock(_Block, tag="image"):
    source: Base64Source | URLSource


class ToolUseBlock(_Block, tag="tool_use"):
    id: NonEmpty
    name: NonEmpty
    input: dict[str, Any]


class ToolResultBlock(_Block, tag="tool_result"):
    tool_use_id: NonEmpty
    content: str | list[TextBlock | ImageBlock] = ""
    is_error: bool = False


class ThinkingBlock(_Block, tag="thinking"):
    """An earlier turn's reasoning, sent back by clients that keep it: a chat model takes none, so it is dropped."""

    thinking: str = ""
    signature: str = ""


class RedactedThinkingBlock(_Block, tag="redacted_thinking"):
    data: str = ""


Block = TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock


class InputMessage(Struct, kw_only=True):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class Tool(Struct, kw_only=True):
    """A client tool; Anthropic's server tools (`web_search_...`, with another `type`) are not served here."""

    name: Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]  # the name rule of both APIs
    input_schema: dict[str, Any]
    description: str | None = None
    type: Literal["custom"] | None = None


class _ToolChoice(Struct, tag_field="type", kw_only=True):
    disable_parallel_tool_use: bool = False


class ToolChoiceAuto(_ToolChoice, tag="auto"):
    pass


class ToolChoiceAny(_ToolChoice, tag="any"):
    pass


class ToolChoiceTool(_ToolChoice, tag="tool"):
    name: NonEmpty


class ToolChoiceNone(_ToolChoice, tag="none"):
    pass


class _Metadata(Struct, kw_only=True):
    user_id: str | None = None


class _OutputFormat(Struct, kw_only=True):
    type: Literal["json_schema"]
    schema: dict[str, Any]


class _OutputConfig(Struct, kw_only=True):
    format: _OutputFormat | None = None  # structured output; `effort` and the rest are ignored


class CountTokensRequest(Struct, kw_only=True):
    """POST /v1/messages/count_tokens: what makes up a prompt."""

    model: NonEmpty
    messages: Annotated[list[InputMessage], Meta(min_length=1)]
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone | None = None


class MessagesRequest(CountTokensRequest, kw_only=True):
    """POST /v1/messages. Other fields (`thinking`, `service_tier`...) are accepted and ignored; the gateway's
    own routing fields (`route`, `models`, `preferred_model`...) are honoured as on chat completions."""

    max_tokens: PositiveInt
    stop_sequences: Annotated[list[str], Meta(max_length=16)] | None = None
    temperature: Annotated[float, Meta(ge=0, le=1)] | None = None
    top_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    top_k: Annotated[int, Meta(ge=0, le=MAX_COUNT)] | None = None
    metadata: _Metadata | None = None
    output_config: _OutputConfig | None = None
    stream: bool | None = None  # null, as the SDK sends stream=None: not streamed


def decode_messages(data: bytes) -> tuple[MessagesRequest, dict[str, Any]]:
    """A /v1/messages body, validated (400 naming the field), with the raw object."""
    raw = decode_object(data)
    return convert_struct(raw, MessagesRequest), raw


def decode_count_tokens(data: bytes) -> tuple[CountTokensRequest, dict[str, Any]]:
    raw = decode_object(data)
    return convert_struct(raw, CountTokensRequest), raw


# ---- request translation --------------------------------------------------------------------------------


def to_chat(request: CountTokensRequest, raw: Mapping[str, Any]) -> dict[str, Any]:
    """The chat completion request standing for `request` (its raw body only lends the gateway's routing fields).
    A final assistant message is a prefill: the answer continues it (`continue_final_message`, which vLLM and
    the local engines take)."""
    messages: list[dict[str, Any]] = []
    system = request.system
    if system:
        messages.append({"role": "system",
                         "content": system if isinstance(system, str) else "\n".join(b.text for b in system)})
    for i, message in enumerate(request.messages):
        messages.extend(_chat_messages(message, i))
    chat: dict[str, Any] = {"model": request.model, "messages": messages}
    tools, choice = request.tools or [], request.tool_choice
    if isinstance(choice, ToolChoiceTool) and all(t.name != choice.name for t in tools):
        raise BadRequest(f"'tool_choice.name': no tool named '{choice.name}' in 'tools'.", param="tool_choice.name")
    if tools:  # a tool_choice without tools has nothing to choose from: dropped
        chat["tools"] = [_function(tool) for tool in tools]
        if choice is not None:
            chat["tool_choice"] = _tool_choice(choice)
            if choice.disable_parallel_tool_use:
                chat["parallel_tool_calls"] = False
    if isinstance(request, MessagesRequest):
        chat["max_tokens"] = request.max_tokens
        if request.stop_sequences:
            chat["stop"] = [s for s in request.stop_sequences if s]
        for name in ("temperature", "top_p", "top_k"):  # top_k goes on as an extra field (local engines, vLLM)
            if (value := getattr(request, name)) is not None:
                chat[name] = value
        if request.metadata is not None and request.metadata.user_id is not None:
            chat["user"] = request.metadata.user_id
        output = request.output_config
        if output is not None and output.format is not None:  # Anthropic always holds the answer to the schema
            schema = {"name": "output", "schema": output.format.schema, "strict": True}
            chat["response_format"] = {"type": "json_schema", "json_schema": schema}
        if request.stream:
            chat["stream"] = True
            chat["stream_options"] = {"include_usage": True}  # the closing message_delta reports the usage
        last = messages[-1]
        if last["role"] == "assistant" and "tool_calls" not in last:
            chat["continue_final_message"] = True
            chat["add_generation_prompt"] = False
    for name in GATEWAY_FIELDS & raw.keys():
        chat[name] = raw[name]
    return chat


def _function(tool: Tool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name, "parameters": tool.input_schema}
    if tool.description is not None:
        function["description"] = tool.description
    return {"type": "function", "function": function}


def _tool_choice(choice: _ToolChoice) -> str | dict[str, Any]:
    if isinstance(choice, ToolChoiceTool):
        return {"type": "function", "function": {"name": choice.name}}
    return "required" if isinstance(choice, ToolChoiceAny) else "none" if isinstance(choice, ToolChoiceNone) else "auto"


def _image_url(block: ImageBlock) -> dict[str, Any]:
    source = block.source
    url = source.url if isinstance(source, URLSource) else f"data:{source.media_type};base64,{source.data}"
    return {"type": "image_url", "image_url": {"url": url}}


def _misplaced(i: int, j: int, kind: str, role: str) -> BadRequest:
    where = f"messages[{i}].content[{j}]"
    return BadRequest(f"'{where}': a {kind} block cannot be in a {role} message.", param=where)


def _chat_messages(message: InputMessage, i: int) -> list[dict[str, Any]]:
    """One Anthropic message as chat messages: a user turn's tool results become `tool` messages (first, as
    they answer the calls just before), an assistant's tool_use blocks its `tool_calls`."""
    content = message.content
    if isinstance(content, str):
        return [{"role": message.role, "content": content}]
    if message.role == "assistant":
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        for j, block in enumerate(content):
            if isinstance(block, TextBlock):
                texts.append(block.text)
            elif isinstance(block, ToolUseBlock):
                calls.append({"id": block.id, "type": "function",
                              "function": {"name": block.name, "arguments": msgspec.json.encode(block.input).decode()}})
            elif isinstance(block, ImageBlock | ToolResultBlock):
                raise _misplaced(i, j, block.__struct_config__.tag, "assistant")  # type: ignore[arg-type]
        said: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts) if texts or not calls else None}
        if calls:
            said["tool_calls"] = calls
        return [said]
    results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        if isinstance(block, TextBlock):
            parts.append({"type": "text", "text": block.text})
        elif isinstance(block, ImageBlock):
            parts.append(_image_url(block))
        elif isinstance(block, ToolResultBlock):
            results.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": _result_text(block, i, j)})
        elif isinstance(block, ToolUseBlock):
            raise _misplaced(i, j, "tool_use", "user")
    if parts or not results:
        single = len(parts) == 1 and parts[0]["type"] == "text"
        results.append({"role": "user", "content": parts[0]["text"] if single else parts or ""})
    return results


def _result_text(block: ToolResultBlock, i: int, j: int) -> str:
    """A tool result's content as the text of a `tool` message (which carries no images)."""
    if isinstance(block.content, str):
        return block.content
    for k, part in enumerate(block.content):
        if isinstance(part, ImageBlock):
            where = f"messages[{i}].content[{j}].content[{k}]"
            raise BadRequest(f"'{where}': images in tool results are not supported (a chat tool message carries "
                             "text only).", param=where)
    return "\n".join(part.text for part in block.content)  # type: ignore[union-attr]


# ---- answers --------------------------------------------------------------------------------------------


class MessageUsage(Struct, kw_only=True):
    input_tokens: int
    output_tokens: int


class MessageResponse(Struct, kw_only=True):
    """A /v1/messages answer."""

    id: str
    type: str = "message"
    role: str = "assistant"
    model: str
    content: list[TextBlock | ToolUseBlock]
    stop_reason: str | None
    stop_sequence: str | None
    usage: MessageUsage


# what the translation reads of a chat.completion or a chunk; the rest is skipped
class _ChoiceView(Struct):
    index: int = 0
    message: AnswerMessageView | None = None
    delta: AnswerMessageView | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # vLLM's: the stop string (or token id) that ended the answer


class _UsageView(Struct):
    """An upstream's counts, each one None unless it is a count (see usage_count): strings, negatives and numbers
    past any answer's size are not relayed, nor do they lose the answer they came with."""

    prompt_tokens: Any = None
    completion_tokens: Any = None

    def __post_init__(self) -> None:
        self.prompt_tokens = usage_count(self.prompt_tokens)
        self.completion_tokens = usage_count(self.completion_tokens)


class _AnswerView(Struct):
    id: str | None = None
    model: str | None = None
    choices: list[_ChoiceView] = []
    usage: Any = None  # a _UsageView once decoded (None for one that is no object: the answer still counts)
    error: Any = None  # a stream's error event ({"error": {...}}, as vLLM sends one)

    def __post_init__(self) -> None:
        if self.usage is not None:
            self.usage = msgspec.convert(self.usage, _UsageView) if isinstance(self.usage, dict) else None


_read_answer = msgspec.json.Decoder(_AnswerView).decode
_encode = msgspec.json.Encoder().encode


def _message_id(chat_id: str | None) -> str:
    return f"msg_{chat_id.removeprefix('chatcmpl-')}" if chat_id else f"msg_{uuid.uuid4().hex}"


def _tool_id(call_id: str | None) -> str:
    if not call_id:
        return f"toolu_{uuid.uuid4().hex[:24]}"
    return call_id if call_id.startswith("toolu_") else f"toolu_{call_id}"


def _stop(finish: str | None, matched: str | int | None, tool_used: bool, stops: frozenset[str],
          refused: bool = False) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence). Which stop sequence ended the answer is known only where the backend says
    (vLLM's `stop_reason`); a chat `stop` is otherwise end_turn. A tool call cut off by the token limit is
    max_tokens, as Anthropic answers a truncated tool_use."""
    if finish == "length":
        return "max_tokens", None
    if tool_used or finish in ("tool_calls", "function_call"):
        return "tool_use", None
    if refused or finish == "content_filter":
        return "refusal", None
    if isinstance(matched, str) and matched in stops:
        return "stop_sequence", matched
    return "end_turn", None


def _tool_input(name: str, arguments: str | dict[str, Any] | None, cut: bool) -> dict[str, Any]:
    """A tool call's arguments as its input: an empty one for arguments the token limit `cut` off (stop_reason
    says max_tokens) or, logged, for a finished call's that are no JSON object (the input must be one)."""
    if isinstance(arguments, dict) or not arguments:
        return arguments or {}
    try:
        value = msgspec.json.decode(arguments)
    except msgspec.DecodeError:
        value = None
    if isinstance(value, dict):
        return value
    if not cut:
        log.warning("tool call %s: its arguments are not a JSON object; answered with an empty input", name)
    return {}


def message_from_chat(body: bytes, stops: frozenset[str] = frozenset(), model: str = "",
                      estimate: Callable[[], int] | None = None) -> MessageResponse:
    """A chat.completion body as a Message (its first choice: the request asks for one); one whose fields do not
    have their types is an answer the gateway cannot read: 502, never an empty message."""
    try:
        answer = _read_answer(body)
    except msgspec.DecodeError as exc:  # a ValidationError too
        raise UpstreamInvalidResponse(f"the upstream's chat answer could not be read: {exc}") from None
    choice = answer.choices[0] if answer.choices else _ChoiceView()
    said = choice.message or AnswerMessageView()
    content: list[TextBlock | ToolUseBlock] = []
    text = answer_text(said.content) + (said.refusal or "")  # a refusal is the text Anthropic's answer holds
    calls = said.tool_calls or []
    if text or not calls:
        content.append(TextBlock(text=text))
    cut = choice.finish_reason == "length"
    for call in calls:
        function = call.function or FunctionView()
        name = function.name or ""
        content.append(ToolUseBlock(id=_tool_id(call.id), name=name, input=_tool_input(name, function.arguments, cut)))
    stop_reason, stop_sequence = _stop(choice.finish_reason, choice.stop_reason, bool(calls), stops,
                                       bool(said.refusal))
    usage = answer.usage or _UsageView()
    return MessageResponse(id=_message_id(answer.id), model=answer.model or model, content=content,
                           stop_reason=stop_reason, stop_sequence=stop_sequence,
                           usage=MessageUsage(input_tokens=usage.prompt_tokens if usage.prompt_tokens is not None
                                              else estimate() if estimate is not None else 0,
                                              output_tokens=usage.completion_tokens or 0))


def _frame(event: bytes, data: dict[str, Any]) -> bytes:
    return b"event: " + event + b"\ndata: " + _encode(data) + b"\n\n"


_MESSAGE_STOP = _frame(b"message_stop", {"type": "message_stop"})


class StreamTranslator:
    """chat.completion.chunk payloads in, Anthropic's events out: message_start at the first payload, each text
    run or tool call as a content block (start, deltas, stop), then message_delta (stop reason, usage) and
    message_stop at `close`. The usage arrives last (`stream_options.include_usage`), so message_start says
    input_tokens 0 and message_delta carries both counts (the SDKs take message_delta's as the totals)."""

    __slots__ = ("blocks", "estimate", "finish", "input_tokens", "matched", "model", "open", "output_tokens",
                 "pieces", "refused", "started", "stops", "tools")

    def __init__(self, stops: frozenset[str] = frozenset(), model: str = "",
                 estimate: Callable[[], int] | None = None) -> None:
        self.stops, self.model = stops, model
        self.estimate = estimate  # the prompt's tokens as estimated: the input when the upstream reports none
        self.started = False
        self.blocks = 0  # content blocks opened so far
        self.open: int | None = None  # the open block's index
        self.tools: dict[int, int] = {}  # chat tool call index -> its tool_use block's index
        self.finish: str | None = None
        self.matched: str | int | None = None
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None
        self.pieces = 0  # deltas relayed: the output tokens when the backend reports no usage
        self.refused = False  # a refusal came (its text relayed as text): stop_reason refusal

    def feed(self, payload: bytes) -> bytes:
        """The frames one chunk makes (often none: a role chunk, the usage chunk)."""
        try:
            chunk = _read_answer(payload)
        except msgspec.ValidationError as exc:  # a chunk whose fields do not have their types: its text is lost
            raise UpstreamInvalidResponse(f"the upstream sent a chunk that could not be read: {exc}") from None
        except msgspec.DecodeError:
            return b""  # not a chunk (a vendor's comment event): nothing to relay
        if chunk.error is not None:
            error = chunk.error
            message = error.get("message") if isinstance(error, dict) else None
            raise UpstreamError(f"The upstream failed mid-stream: {message or error}")
        out: list[bytes] = []
        if not self.started:
            out.append(self._start(chunk.id, chunk.model, chunk.usage))
        for choice in chunk.choices:
            if choice.index != 0:
                continue
            delta = choice.delta
            if delta is not None:
                if text := answer_text(delta.content):
                    self._text(text, out)
                if delta.refusal:
                    self.refused = True
                    self._text(delta.refusal, out)
                for call in delta.tool_calls or ():
                    self._tool(call, out)
            if choice.finish_reason is not None:
                self.finish, self.matched = choice.finish_reason, choice.stop_reason
        if chunk.usage is not None:
            self.input_tokens = chunk.usage.prompt_tokens
            self.output_tokens = chunk.usage.completion_tokens
        return b"".join(out)

    def close(self) -> bytes:
        """The closing events, once the chat stream has ended."""
        out = [] if self.started else [self._start(None, None, None)]
        if self.blocks == 0:  # an empty answer is one empty text block, as a plain answer is
            self._open(out, {"type": "text", "text": ""})
        self._close_open(out)
        stop_reason, stop_sequence = _stop(self.finish, self.matched, bool(self.tools), self.stops, self.refused)
        usage = {"output_tokens": self.output_tokens if self.output_tokens is not None else self.pieces}
        input_tokens = self.input_tokens
        if input_tokens is None and self.estimate is not None:
            input_tokens = self.estimate()
        if input_tokens is not None:  # as the gateway counts it: the estimate when the upstream sent no usage
            usage["input_tokens"] = input_tokens
        out.append(_frame(b"message_delta", {"type": "message_delta",
                                             "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                             "usage": usage}))
        out.append(_MESSAGE_STOP)
        return b"".join(out)

    def _start(self, chat_id: str | None, model: str | None, usage: _UsageView | None) -> bytes:
        self.started = True
        message = {"id": _message_id(chat_id), "type": "message", "role": "assistant", "model": model or self.model,
                   "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": (usage.prompt_tokens or 0) if usage is not None else 0,
                             "output_tokens": 0}}
        return _frame(b"message_start", {"type": "message_start", "message": message})

    def _open(self, out: list[bytes], block: dict[str, Any]) -> int:
        self._close_open(out)
        index = self.open = self.blocks
        self.blocks += 1
        out.append(_frame(b"content_block_start", {"type": "content_block_start", "index": index,
                                                   "content_block": block}))
        return index

    def _close_open(self, out: list[bytes]) -> None:
        if self.open is not None:
            out.append(_frame(b"content_block_stop", {"type": "content_block_stop", "index": self.open}))
            self.open = None

    def _text(self, text: str, out: list[bytes]) -> None:
        index = self.open
        if index is None or index in self.tools.values():
            index = self._open(out, {"type": "text", "text": ""})
        self.pieces += 1
        out.append(_frame(b"content_block_delta", {"type": "content_block_delta", "index": index,
                                                   "delta": {"type": "text_delta", "text": text}}))

    def _tool(self, call: CallView, out: list[bytes]) -> None:
        function = call.function or FunctionView()
        index = self.tools.get(call.index)
        if index is None:  # a new call: its block opens (OpenAI sends the id and name first, whole)
            index = self.tools[call.index] = self._open(out, {"type": "tool_use", "id": _tool_id(call.id),
                                                              "name": function.name or "", "input": {}})
        if function.arguments:
            self.pieces += 1
            arguments = function.arguments
            partial = arguments if isinstance(arguments, str) else _encode(arguments).decode()
            out.append(_frame(b"content_block_delta", {"type": "content_block_delta", "index": index,
                                                       "delta": {"type": "input_json_delta", "partial_json": partial}}))


# ---- the dialect gateway/generate.py serves it through, and errors --------------------------------------


class MessagesDialect:
    """Chat answers as /v1/messages answers (gateway/generate.py's Dialect)."""

    __slots__ = ("estimate", "model", "stops")

    def __init__(self, model: str = "", stop_sequences: list[str] | None = None,
                 estimate: Callable[[], int] | None = None) -> None:
        self.model = model  # the requested name, for a stream that ends before its first chunk
        self.stops = frozenset(stop_sequences or ())
        self.estimate = estimate  # the prompt's estimated tokens: the input count when the upstream gives none

    def plain(self, body: bytes) -> bytes:
        return _encode(message_from_chat(body, self.stops, self.model, self.estimate))

    async def stream(self, payloads: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        translator = StreamTranslator(self.stops, self.model, self.estimate)
        async for payload in payloads:
            frames = translator.feed(payload)
            if frames:
                yield frames
        yield translator.close()

    def stream_error(self, exc: GatewayError) -> bytes:
        return b"event: error\ndata: " + error_body(exc.status, exc.message) + b"\n\n"


# Anthropic's error types by HTTP status; any other 4xx is an invalid request, any other 5xx an api_error
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                403: "permission_error", 404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                500: "api_error", 503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error"}


def error_type(status: int) -> str:
    return _ERROR_TYPES.get(status) or ("invalid_request_error" if status < 500 else "api_error")


def error_body(status: int, message: str, request_id: str | None = None) -> bytes:
    """`{"type": "error", "error": {"type", "message"}}`, with the request id when known."""
    body: dict[str, Any] = {"type": "error", "error": {"type": error_type(status), "message": message}}
    if request_id is not None:
        body["request_id"] = request_id
    return _encode(body)
