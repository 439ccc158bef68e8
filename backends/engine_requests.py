"""What a local engine can honour: validate a request before any generation and turn it into a plan."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from backends.constrained import grammar_spec
from backends.tool_format import ToolPlan, check_tools
from protocol.errors import BadRequest, UnsupportedParameter
from protocol.openai import ChatCompletionRequest, ParsedRequest, message_text

__all__ = ["Plan", "check_request"]

# non-standard fields this engine honours (vLLM's names); chat-only ones are unknown to /v1/completions
_ENGINE_EXTRAS = {"top_k", "repetition_penalty", "min_tokens", "ignore_eos"}
_CHAT_EXTRAS = {"continue_final_message", "add_generation_prompt"}
# standard OpenAI fields that msgspec's request Structs do not declare but that change nothing here: the prompt
# cache's routing hints (the engine keeps no prompt cache between requests) and the end user's id for abuse checks
_HARMLESS_EXTRAS = {"metadata", "store", "service_tier", "prompt_cache_key", "prompt_cache_retention",
                    "safety_identifier"}
_CACHE_RETENTION = ("in_memory", "24h")  # OpenAI's values for prompt_cache_retention
_SAFETY_ID_MAX = 64  # OpenAI's maxLength for safety_identifier
_BOOL_EXTRAS = {"ignore_eos", "continue_final_message", "add_generation_prompt"}
_MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit (chat's top_logprobs, at most 20, is checked when decoding)


@dataclass(frozen=True, slots=True)
class Plan:
    """What a validated request asks for; the tokenizer-dependent parts are resolved in the worker."""

    chat: bool
    # chat: {role, content}, plus `tool_calls` [{id, name, arguments}] on assistant turns and `tool_call_id` on
    # tool results (backends/tool_format.py renders them for the template)
    messages: list[dict[str, Any]]
    prompts: list[str | list[int]]  # completions: one entry per prompt
    n: int
    max_new_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    repetition_penalty: float
    min_tokens: int
    ignore_eos: bool
    stop: tuple[str, ...]
    seed: int | None
    echo: bool
    add_generation_prompt: bool
    continue_final_message: bool
    include_usage: bool
    tools: ToolPlan | None = None
    grammar: str | None = None  # backends/constrained.py's grammar_spec: what the output is held to
    logprobs: int | None = None  # None: off; k: logprobs of each token with the k most likely alternatives


def _unsupported(param: str, detail: str = "") -> UnsupportedParameter:
    return UnsupportedParameter(
        f"Unsupported parameter: '{param}' is not supported by this local model{detail}.", param=param
    )


def _invalid(param: str, expected: str) -> BadRequest:
    return BadRequest(f"Invalid value for '{param}': expected {expected}.", param=param)


def check_request(request: ParsedRequest) -> Plan:
    """Reject what this engine cannot honour (400) and gather the rest; runs before anything is generated."""
    body = request.body
    chat = isinstance(body, ChatCompletionRequest)
    _reject_standard(body, chat)
    tools = check_tools(body.tools, body.tool_choice) if chat else None
    response_format = _response_format(body.response_format) if chat else None
    logprobs = _logprobs(body, chat)
    if logprobs is not None and tools is not None and tools.calls:
        raise _unsupported("logprobs", " together with tool calling (use tool_choice 'none')")
    extras = _check_extras(request, chat)
    continue_final = extras.get("continue_final_message") or False
    add_prompt = extras.get("add_generation_prompt")
    if continue_final and add_prompt:
        raise BadRequest(
            "Cannot set both 'continue_final_message' and 'add_generation_prompt' to true.",
            param="add_generation_prompt",
        )
    if continue_final and tools is not None and tools.calls:
        raise _unsupported("continue_final_message", " together with tool calling")
    messages = _chat_messages(body.messages, continue_final) if chat else []
    max_new = request.max_new_tokens
    min_tokens = extras.get("min_tokens") or 0
    if max_new is not None and min_tokens > max_new:
        raise BadRequest("'min_tokens' must not exceed 'max_tokens'.", param="min_tokens")
    return Plan(
        chat=chat,
        messages=messages,
        prompts=[] if chat else _completion_prompts(body.prompt),
        n=body.n,
        max_new_tokens=max_new,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=extras.get("top_k"),
        repetition_penalty=float(extras.get("repetition_penalty") or 1.0),
        min_tokens=min_tokens,
        ignore_eos=bool(extras.get("ignore_eos")),
        stop=tuple(request.stop_list),
        seed=body.seed,
        echo=False if chat else body.echo,
        add_generation_prompt=not continue_final if add_prompt is None else add_prompt,
        continue_final_message=continue_final,
        include_usage=request.include_usage,
        tools=tools,
        grammar=grammar_spec(response_format, tools),
        logprobs=logprobs,
    )


def _reject_standard(body: Any, chat: bool) -> None:
    if body.logit_bias:
        raise _unsupported("logit_bias")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise _unsupported(name, " (use 'repetition_penalty')")
    if not chat:
        if body.suffix:
            raise _unsupported("suffix")
        if body.best_of is not None and body.best_of > 1:
            raise _unsupported("best_of")


def _logprobs(body: Any, chat: bool) -> int | None:
    """Chat: `logprobs: true` with `top_logprobs` 0-20; completions: `logprobs` 0-5 -> alternatives per token."""
    value = body.logprobs
    if chat:
        if value is not None and not isinstance(value, bool):
            raise _invalid("logprobs", "a boolean")
        if body.top_logprobs is not None and not value:
            raise BadRequest("'top_logprobs' needs 'logprobs' set to true.", param="top_logprobs")
        return (body.top_logprobs or 0) if value else None
    if value is None:
        return None
    if not (_is_int(value) and 0 <= value <= _MAX_COMPLETION_LOGPROBS):
        raise _invalid("logprobs", f"an integer from 0 to {_MAX_COMPLETION_LOGPROBS}")
    if body.echo:
        raise _unsupported("logprobs", " with 'echo' (the prompt's logprobs)")
    return value


def _response_format(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """`text` (or none) -> None; `json_object`; `json_schema` with its `json_schema: {name, schema, strict}`."""
    kind = None if value is None else value.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return value
    if kind != "json_schema":
        raise _unsupported("response_format", f" (type {kind!r}; 'text', 'json_object' and 'json_schema' are)")
    spec = value.get("json_schema")  # type: ignore[union-attr]
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise BadRequest("'response_format.json_schema' must be an object with a 'name'.",
                         param="response_format.json_schema")
    if not isinstance(spec.get("schema", {}), dict):
        raise _invalid("response_format.json_schema.schema", "a JSON schema object")
    if not isinstance(spec.get("strict", False), bool | None):
        raise _invalid("response_format.json_schema.strict", "a boolean")
    if spec.get("strict"):
        unsupported = _unenforced(spec.get("schema") or {})
        if unsupported is not None:
            raise BadRequest(
                f"Invalid schema for response_format '{spec['name']}': '{unsupported}' is not supported in strict "
                "mode by this local model (its output could not be held to it).",
                param="response_format",
            )
    return value


# keywords a schema's grammar (xgrammar) does not hold the output to: strict mode refuses them, as OpenAI's does
# (oneOf: the grammar takes it as anyOf, so an answer matching two branches would pass; OpenAI refuses it too)
_UNENFORCED = ("allOf", "oneOf", "not", "if", "then", "else", "uniqueItems", "multipleOf", "contains", "minContains",
               "maxContains", "dependentRequired", "dependentSchemas", "unevaluatedProperties", "unevaluatedItems")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalProperties", "propertyNames")


def _unenforced(schema: Any) -> str | None:
    """The first keyword of a JSON schema that its grammar would silently ignore (an empty anyOf/oneOf too)."""
    if not isinstance(schema, dict):
        return None
    for key in _UNENFORCED:
        if key in schema:
            return key
    for key in _SCHEMA_LISTS:
        if isinstance(schema.get(key), list) and not schema[key] and key != "prefixItems":
            return f"{key}: []"
    found = (
        [v for key in _SCHEMA_MAPS if isinstance(schema.get(key), dict) for v in schema[key].values()]
        + [v for key in _SCHEMA_LISTS if isinstance(schema.get(key), list) for v in schema[key]]
        + [schema.get(key) for key in _SCHEMA_VALUES]
        + (schema["items"] if isinstance(schema.get("items"), list) else [])
    )
    for sub in found:
        if (keyword := _unenforced(sub)) is not None:
            return keyword
    return None


def _check_extras(request: ParsedRequest, chat: bool) -> dict[str, Any]:
    allowed = _ENGINE_EXTRAS | _HARMLESS_EXTRAS | (_CHAT_EXTRAS if chat else set())
    values: dict[str, Any] = {}
    for key in request.extra_fields:
        value = request.raw[key]
        if value is None:  # null asks for nothing, even of a field this engine cannot honour
            continue
        if key not in allowed:
            raise _unsupported(key)
        values[key] = _check_extra(key, value)
    return values


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_extra(key: str, value: Any) -> Any:
    if key == "top_k" and not (_is_int(value) and value >= -1):
        raise _invalid(key, "an integer >= -1 (-1 or 0 turns it off)")
    if key == "repetition_penalty" and not ((_is_int(value) or isinstance(value, float)) and value > 0):
        raise _invalid(key, "a number > 0")
    if key == "min_tokens" and not (_is_int(value) and value >= 0):
        raise _invalid(key, "an integer >= 0")
    if key in _BOOL_EXTRAS and not isinstance(value, bool):
        raise _invalid(key, "a boolean")
    if key == "store" and value is not False:
        raise _unsupported("store", " (nothing is stored)")
    if key in ("prompt_cache_key", "safety_identifier") and not isinstance(value, str):
        raise _invalid(key, "a string")
    if key == "safety_identifier" and len(value) > _SAFETY_ID_MAX:
        raise _invalid(key, f"a string of at most {_SAFETY_ID_MAX} characters")
    if key == "prompt_cache_retention" and value not in _CACHE_RETENTION:
        raise _invalid(key, " or ".join(repr(v) for v in _CACHE_RETENTION))
    return value


def _chat_messages(messages: list[Any], continue_final: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if message.role == "function":
            raise _unsupported(f"messages[{i}].role", " ('function' messages: use 'tool' messages)")
        if isinstance(message.content, list):
            for part in message.content:
                if part.get("type") != "text":
                    raise _unsupported(f"messages[{i}].content", f" (content part {part.get('type')!r})")
        role = "system" if message.role == "developer" else message.role
        entry: dict[str, Any] = {"role": role, "content": message_text(message.content)}
        if message.tool_calls:
            if role != "assistant":
                raise BadRequest(f"Only assistant messages carry 'tool_calls' (messages[{i}]).",
                                 param=f"messages[{i}].tool_calls")
            entry["tool_calls"] = [_past_call(call, f"messages[{i}].tool_calls[{j}]")
                                   for j, call in enumerate(message.tool_calls)]
        if role == "tool":
            entry["tool_call_id"] = message.tool_call_id or ""
        out.append(entry)
    if continue_final and out[-1]["role"] != "assistant":
        raise BadRequest("'continue_final_message' needs an assistant message last.", param="messages")
    return out


def _past_call(call: Any, where: str) -> dict[str, str]:
    """An earlier assistant turn's call, as OpenAI sends it back -> {id, name, arguments}."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise BadRequest(f"'{where}' must be {{'id', 'type': 'function', 'function': {{'name', 'arguments'}}}}.",
                         param=where)
    arguments = function.get("arguments", "{}")
    if not isinstance(arguments, str):
        raise _invalid(f"{where}.function.arguments", "a JSON string")
    return {"id": str(call.get("id") or ""), "name": function["name"], "arguments": arguments}


def _completion_prompts(prompt: Any) -> list[str | list[int]]:
    """A string, a list of strings, one token-id array or a list of them -> one entry per prompt."""
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise BadRequest("'prompt' must be a non-empty string or list.", param="prompt")
    if all(_is_int(t) for t in prompt):
        return [list(prompt)]
    for item in prompt:
        if not (isinstance(item, str) or (isinstance(item, list) and all(_is_int(t) for t in item))):
            raise BadRequest("'prompt' items must be strings or token-id arrays.", param="prompt")
    return list(prompt)
