"""OpenAI protocol Structs (chat completions, completions, embeddings, models, errors) and request decoding."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta, Struct

from config.schema import MAX_COUNT, Count
from protocol.errors import BadRequest

__all__ = [
    "GATEWAY_FIELDS",
    "AnswerMessageView",
    "CallView",
    "FunctionView",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatMessage",
    "Choice",
    "ChoiceLogprobs",
    "ChunkChoice",
    "ChunkView",
    "CreateEmbeddingResponse",
    "Completion",
    "CompletionChoice",
    "CompletionLogprobs",
    "CompletionRequest",
    "Delta",
    "Embedding",
    "EmbeddingRequest",
    "EmbeddingUsage",
    "ErrorObject",
    "ErrorResponse",
    "FunctionCall",
    "FunctionCallDelta",
    "MAX_COUNT",
    "MAX_USAGE_TOKENS",
    "MAX_EMBEDDING_INPUTS",
    "Message",
    "ModelCard",
    "ModelList",
    "ParsedEmbeddings",
    "ParsedRequest",
    "PositiveInt",
    "RouteRequirements",
    "StreamOptions",
    "TemplateRef",
    "TokenLogprob",
    "ToolCall",
    "ToolCallDelta",
    "TopLogprob",
    "Usage",
    "decode_embedding_request",
    "answer_text",
    "decode_object",
    "decode_request",
    "convert_struct",
    "decode_struct",
    "chunk_view",
    "usage_count",
    "without_nulls",
    "message_text",
    "new_id",
]

# the gateway's own request fields (routing); consumed by pointsman, never sent upstream
GATEWAY_FIELDS = frozenset({"route", "auto_select", "preferred_model", "fallback_mode", "models", "template"})

Temperature = Annotated[float, Meta(ge=0, le=2)]
Probability = Annotated[float, Meta(ge=0, le=1)]
Penalty = Annotated[float, Meta(ge=-2, le=2)]
PositiveInt = Count  # max_tokens, best_of, dimensions...: at most MAX_COUNT (config.schema says why)
T = TypeVar("T")


# ---- requests -------------------------------------------------------------------------------------------


class StreamOptions(Struct, kw_only=True):
    include_usage: bool = False


class Message(Struct, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    # a string, or content parts ({"type": "text", "text": ...}, images, audio...)
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class RouteRequirements(Struct, kw_only=True, forbid_unknown_fields=True):
    """The optional `route` object: what this request needs from automatic selection."""

    max_latency_s: Annotated[float, Meta(gt=0)] | None = None
    min_quality: Probability | None = None
    prefer: Literal["quality", "cost", "speed"] | None = None


NonEmpty = Annotated[str, Meta(min_length=1)]


class _Sampling(Struct, kw_only=True):
    # optional only because routing fields (`auto_select`, `preferred_model`, `models`) may stand in for it
    model: str | None = None
    # the gateway's own routing fields (GATEWAY_FIELDS): validated here once, never sent upstream
    route: RouteRequirements | None = None
    auto_select: bool | None = None
    preferred_model: NonEmpty | None = None
    fallback_mode: NonEmpty | None = None  # auto | none | a model name
    models: list[NonEmpty] | None = None  # OpenRouter's fallback list
    temperature: Temperature | None = None
    top_p: Probability | None = None
    max_tokens: PositiveInt | None = None
    n: Annotated[int, Meta(ge=1, le=128)] = 1
    stop: str | Annotated[list[str], Meta(max_length=16)] | None = None
    seed: Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)] | None = None  # int64, as OpenAI's spec says
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None


class TemplateRef(Struct, kw_only=True, forbid_unknown_fields=True):
    """The gateway's `template` field: a prompt template whose rendered messages go before the request's own
    (policies/templates.py); `version` left out is the production version."""

    name: NonEmpty
    version: NonEmpty | None = None
    variables: dict[str, Any] = {}


class ChatCompletionRequest(_Sampling, kw_only=True):
    # may be empty only when a `template` gives the messages
    messages: list[Message]
    max_completion_tokens: PositiveInt | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    template: TemplateRef | None = None  # a gateway field (GATEWAY_FIELDS): rendered by the template policy


class CompletionRequest(_Sampling, kw_only=True):
    prompt: str | list[str | int | list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: PositiveInt | None = None


class ParsedRequest(Struct):
    """A validated request together with the client's raw body, which upstreams receive unchanged."""

    body: ChatCompletionRequest | CompletionRequest
    raw: dict[str, Any]

    @property
    def extra_fields(self) -> list[str]:
        known = self.body.__struct_fields__
        return [k for k in self.raw if k not in known and k not in GATEWAY_FIELDS]

    @property
    def max_new_tokens(self) -> int | None:
        body = self.body
        if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
            return body.max_completion_tokens
        return body.max_tokens

    @property
    def stop_list(self) -> list[str]:
        stop = self.body.stop
        if stop is None:
            return []
        return [stop] if isinstance(stop, str) else [s for s in stop if s]

    @property
    def prompt_param(self) -> str:
        """The field that holds the prompt, which a too-long prompt's error names: `prompt` or `messages`."""
        return "prompt" if type(self.body) is CompletionRequest else "messages"

    @property
    def include_usage(self) -> bool:
        opts = self.body.stream_options
        return bool(opts and opts.include_usage)

    def asking_usage(self) -> ParsedRequest:
        """This streamed request with `stream_options.include_usage` set (itself when it is): what the gateway
        sends a model, so that a stream's usage is known whether or not the client asked for it."""
        if self.include_usage:
            return self
        options = self.raw.get("stream_options")
        raw = {**self.raw, "stream_options": {**(options if isinstance(options, dict) else {}), "include_usage": True}}
        return ParsedRequest(msgspec.structs.replace(self.body, stream_options=StreamOptions(include_usage=True)), raw)


_decoder = msgspec.json.Decoder()


def decode_object(data: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400."""
    try:
        raw = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise BadRequest(f"Invalid JSON body: {exc}", code="invalid_json") from None
    except UnicodeDecodeError:
        raise BadRequest("Invalid JSON body: it is not valid UTF-8.", code="invalid_json") from None
    except RecursionError:
        raise BadRequest("Invalid JSON body: nested too deeply.", code="invalid_json") from None
    if not isinstance(raw, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_request")
    return raw


def decode_struct(data: bytes, kind: type[T]) -> T:
    """An admin body (an empty one is `{}`) as `kind`, or a 400 whose `param` names the field at fault."""
    return convert_struct(decode_object(data or b"{}"), kind)


# fields OpenAI's spec makes nullable that have a default here: null means the default (the SDK sends n=None)
_NULL_MEANS_DEFAULT = frozenset({"n", "stream", "echo"})


def without_nulls(raw: dict[str, Any], fields: frozenset[str]) -> dict[str, Any]:
    """`raw` without those of `fields` whose value is null (the field as not given)."""
    return {k: v for k, v in raw.items() if v is not None or k not in fields}


def decode_request(data: bytes | dict[str, Any], kind: type[ChatCompletionRequest] | type[CompletionRequest],
                   ) -> ParsedRequest:
    """Decode and validate a request body; errors become 400 with `param` naming the field."""
    raw = decode_object(data) if isinstance(data, bytes) else data
    if raw.get("stream", False) is None or raw.get("n", 1) is None or raw.get("echo", False) is None:
        raw = without_nulls(raw, _NULL_MEANS_DEFAULT)
    body = convert_struct(raw, kind)
    if body.stream_options is not None and not body.stream:  # OpenAI's 400: options for a stream never sent
        raise BadRequest("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                         param="stream_options")
    if type(body) is ChatCompletionRequest and not body.messages and body.template is None:
        raise BadRequest("Invalid value for 'messages': expected at least one message (or a 'template').",
                         param="messages")
    return ParsedRequest(body, raw)


def convert_struct(raw: dict[str, Any], kind: type[T]) -> T:
    """`raw` as the Struct `kind`; errors become 400 with `param` naming the field at fault (dotted, as OpenAI's)."""
    try:
        return msgspec.convert(raw, kind)
    except RecursionError:
        raise BadRequest("Invalid JSON body: nested too deeply.", code="invalid_json") from None
    except msgspec.ValidationError as exc:
        problem, sep, where = str(exc).rpartition(" - at ")
        if not sep:
            problem = str(exc)
        param = where.strip("`").removeprefix("$.").removeprefix("$") if sep else None
        missing, unknown = "missing required field `", "unknown field `"
        if missing in problem:
            field = problem.split(missing, 1)[1].rstrip("`")
            param = f"{param}.{field}" if param else field
            raise BadRequest(f"Missing required parameter: '{param}'.", param=param) from None
        if unknown in problem:  # a Struct that forbids them: an admin body, a request's `route` or `template`
            field = problem.split(unknown, 1)[1].rstrip("`")
            param = f"{param}.{field}" if param else field
            raise BadRequest(f"Unknown parameter: '{param}'.", param=param, code="unknown_parameter") from None
        raise BadRequest(f"Invalid value for '{param}': {problem}" if sep else problem, param=param) from None


# ---- embeddings -----------------------------------------------------------------------------------------

MAX_EMBEDDING_INPUTS = 2048  # OpenAI's cap on the items of one request


class EmbeddingRequest(Struct, kw_only=True):
    """POST /v1/embeddings. `input`: a string, a list of strings, a list of token ids, or a list of such lists."""

    input: str | list[str | int | list[int]]
    model: NonEmpty
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: PositiveInt | None = None
    user: str | None = None


class ParsedEmbeddings(Struct):
    """A validated embeddings request, its raw body (what upstreams receive, but for `model`) and its inputs as
    one list: strings, or token-id lists."""

    body: EmbeddingRequest
    raw: dict[str, Any]
    inputs: list[str] | list[list[int]]

    prompt_param = "input"  # the field a too-long input's error names, as ParsedRequest.prompt_param


def decode_embedding_request(data: bytes) -> ParsedEmbeddings:
    """Decode and validate an embeddings request: OpenAI's rules (no empty input, at most 2048 items, one kind
    of item per request) checked here, before any model or upstream is asked."""
    raw = decode_object(data)
    body = convert_struct(raw, EmbeddingRequest)
    return ParsedEmbeddings(body, raw, _embedding_inputs(body.input))


def _embedding_inputs(value: str | list[str | int | list[int]]) -> list[str] | list[list[int]]:
    if isinstance(value, str):
        value = [value]
    if not value:
        raise BadRequest("'input' must not be an empty list.", param="input")
    if len(value) > MAX_EMBEDDING_INPUTS:
        raise BadRequest(f"'input' holds {len(value)} items, more than the {MAX_EMBEDDING_INPUTS} allowed.",
                         param="input")
    first = value[0]
    if isinstance(first, int):  # one list of token ids: a single input
        if not all(type(v) is int for v in value):
            raise BadRequest("'input' mixes token ids with other items.", param="input")
        value = [value]  # type: ignore[list-item]
    kind = type(value[0])
    for i, item in enumerate(value):
        if type(item) is not kind:
            raise BadRequest(f"'input[{i}]': every item must be of one kind (strings, or token-id lists).",
                             param="input")
        if not item:
            raise BadRequest(f"'input[{i}]' is empty: embeddings need at least one character or token.",
                             param="input")
        if kind is list and any(t < 0 for t in item):  # type: ignore[union-attr]
            raise BadRequest(f"'input[{i}]' holds a negative token id.", param="input")
    return value  # type: ignore[return-value]


def message_text(content: str | list[dict[str, Any]] | None) -> str:
    """The text of a message's content: the string, or its text parts joined by newlines (as vLLM joins them);
    images and audio are not text. The one place that reads text out of messages."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(
        text for part in content
        if part.get("type") in ("text", "input_text") and isinstance(text := part.get("text"), str)
    )


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# ---- responses ------------------------------------------------------------------------------------------


class Usage(Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class FunctionCall(Struct, kw_only=True):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(Struct, kw_only=True):
    id: str
    function: FunctionCall
    type: str = "function"


class FunctionCallDelta(Struct, kw_only=True, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(Struct, kw_only=True, omit_defaults=True):
    """One piece of a streamed tool call: the first carries id, type and name, the next ones arguments."""

    index: int
    id: str | None = None
    type: str | None = None
    function: FunctionCallDelta | None = None


class TopLogprob(Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(Struct, kw_only=True):
    """A chat choice's `logprobs`: one entry per sampled token of the content."""

    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class CompletionLogprobs(Struct, kw_only=True):
    """A /v1/completions choice's `logprobs`, the legacy shape: parallel lists, one item per token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class ChatMessage(Struct, kw_only=True):
    role: str = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | msgspec.UnsetType = msgspec.UNSET  # absent unless the model called a tool


class Choice(Struct, kw_only=True):
    index: int
    message: ChatMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(Struct, kw_only=True):
    id: str
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None
    object: str = "chat.completion"


class Delta(Struct, kw_only=True, omit_defaults=True):
    role: str | None = None
    content: str | None | msgspec.UnsetType = msgspec.UNSET  # None is sent as null (tool-call deltas)
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(Struct, kw_only=True):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(Struct, kw_only=True):
    id: str
    created: int
    model: str
    choices: list[ChunkChoice]
    object: str = "chat.completion.chunk"
    usage: Usage | None = None


class CompletionChoice(Struct, kw_only=True):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class Completion(Struct, kw_only=True):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    object: str = "text_completion"


class Embedding(Struct, kw_only=True):
    index: int
    # floats, or with encoding_format base64 the little-endian float32 bytes, base64-encoded
    embedding: list[float] | str
    object: Literal["embedding"] = "embedding"


class EmbeddingUsage(Struct, kw_only=True):
    prompt_tokens: int
    total_tokens: int


class CreateEmbeddingResponse(Struct, kw_only=True):
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
    object: Literal["list"] = "list"


class ErrorObject(Struct, kw_only=True):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(Struct, kw_only=True):
    """Every error the gateway answers, in OpenAI's shape (documented in the OpenAPI schema)."""

    error: ErrorObject


class ModelCard(Struct, kw_only=True):
    id: str
    owned_by: str
    created: int = msgspec.field(default_factory=lambda: int(time.time()))
    object: str = "model"
    # the gateway's own view (status, backend, aliases, load): an extra field OpenAI clients ignore
    pointsman: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET


class ModelList(Struct, kw_only=True):
    data: list[ModelCard]
    object: str = "list"


# ---- a light view of streamed chunks: what the gateway reads as they pass (text so far, finish) ----------


class FunctionView(Struct):
    """A tool call's function as a chat answer carries it (the translations to other APIs read these views)."""

    name: str | None = None
    arguments: str | dict[str, Any] | None = None  # an object (some upstreams send one) is taken as it is


class CallView(Struct):
    index: int = 0
    id: str | None = None
    function: FunctionView | None = None


class AnswerMessageView(Struct):
    """A chat answer's message or a chunk's delta, as the translations read it; other fields are skipped."""

    content: str | list[dict[str, Any]] | None = None
    refusal: str | None = None  # OpenAI's: a refusal in place of the content
    tool_calls: list[CallView] | None = None


def answer_text(content: str | list[dict[str, Any]] | None) -> str:
    """An answer's content: the string, or its text parts concatenated (they are pieces of one text, unlike a
    prompt's parts, which message_text joins by newlines)."""
    if not isinstance(content, list):
        return content or ""
    return "".join(part["text"] for part in content
                   if part.get("type") in ("text", "output_text") and isinstance(part.get("text"), str))


class _DeltaView(Struct):
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # decoded only when a chunk carries them


class _ChoiceView(Struct):
    index: int = 0
    delta: _DeltaView | None = None
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: Any = None  # vLLM's: the stop string or token id that ended the choice


# the most tokens an upstream's usage may count: a figure past it (or below 0) is not believed but dropped, as
# one that is no integer is. Past ~1e308 one failed the float arithmetic of costs and throughput (OverflowError:
# a 500, or a finished stream's error event); past 2**31 - 1 PostgreSQL's usage_rows refused the row
MAX_USAGE_TOKENS = 2**31 - 1


def usage_count(value: object) -> int | None:
    """An upstream's token count as the gateway takes it: an integer from 0 to MAX_USAGE_TOKENS, else None."""
    return value if type(value) is int and 0 <= value <= MAX_USAGE_TOKENS else None


class _UsageView(Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = 0

    def __post_init__(self) -> None:
        self.prompt_tokens = usage_count(self.prompt_tokens)
        self.completion_tokens = usage_count(self.completion_tokens)


class ChunkView(Struct):
    """Decodes only the fields the gateway reads from a chunk or a whole response; the rest is skipped. `error`:
    an upstream's failure sent as a stream event ({"error": {...}}, as OpenAI and vLLM send one)."""

    id: str | None = None
    created: Any = None  # kept as sent: a continued stream's chunks carry the first chunk's (see StreamRelay)
    choices: list[_ChoiceView] = []
    usage: _UsageView | None = None
    error: Any = None


chunk_view = msgspec.json.Decoder(ChunkView).decode
