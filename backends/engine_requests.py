"""What a local engine can honour: validate a request before any generation and turn it into a plan."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protocol.errors import BadRequest, UnsupportedParameter
from protocol.openai import ChatCompletionRequest, ParsedRequest, message_text

__all__ = ["Plan", "check_request"]

# non-standard fields this engine honours (vLLM's names); chat-only ones are unknown to /v1/completions
_ENGINE_EXTRAS = {"top_k", "repetition_penalty", "min_tokens", "ignore_eos"}
_CHAT_EXTRAS = {"continue_final_message", "add_generation_prompt"}
# standard OpenAI fields that msgspec's request Structs do not declare but that change nothing here
_HARMLESS_EXTRAS = {"metadata", "store", "service_tier"}
_BOOL_EXTRAS = {"ignore_eos", "continue_final_message", "add_generation_prompt"}


@dataclass(frozen=True, slots=True)
class Plan:
    """What a validated request asks for; the tokenizer-dependent parts are resolved in the worker."""

    chat: bool
    messages: list[dict[str, str]]  # chat
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
    extras = _check_extras(request, chat)
    continue_final = extras.get("continue_final_message") or False
    add_prompt = extras.get("add_generation_prompt")
    if continue_final and add_prompt:
        raise BadRequest(
            "Cannot set both 'continue_final_message' and 'add_generation_prompt' to true.",
            param="add_generation_prompt",
        )
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
    )


def _reject_standard(body: Any, chat: bool) -> None:
    if body.logprobs:
        raise _unsupported("logprobs")
    if body.logit_bias:
        raise _unsupported("logit_bias")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise _unsupported(name, " (use 'repetition_penalty')")
    if chat:
        if body.tools:
            raise _unsupported("tools", " (no tool calling)")
        if body.tool_choice not in (None, "none"):
            raise _unsupported("tool_choice", " (no tool calling)")
        if body.top_logprobs:
            raise _unsupported("top_logprobs")
        if body.response_format is not None and body.response_format != {"type": "text"}:
            raise _unsupported("response_format", " (only {'type': 'text'})")
    else:
        if body.suffix:
            raise _unsupported("suffix")
        if body.best_of is not None and body.best_of > 1:
            raise _unsupported("best_of")


def _check_extras(request: ParsedRequest, chat: bool) -> dict[str, Any]:
    allowed = _ENGINE_EXTRAS | _HARMLESS_EXTRAS | (_CHAT_EXTRAS if chat else set())
    values: dict[str, Any] = {}
    for key in request.extra_fields:
        if key not in allowed:
            raise _unsupported(key)
        value = request.raw[key]
        if value is not None:
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
    return value


def _chat_messages(messages: list[Any], continue_final: bool) -> list[dict[str, str]]:
    out = []
    for i, message in enumerate(messages):
        if message.role in ("tool", "function"):
            raise _unsupported(f"messages[{i}].role", f" ('{message.role}' messages need tool calling)")
        if message.tool_calls:
            raise _unsupported(f"messages[{i}].tool_calls", " (no tool calling)")
        if isinstance(message.content, list):
            for part in message.content:
                if part.get("type") != "text":
                    raise _unsupported(f"messages[{i}].content", f" (content part {part.get('type')!r})")
        role = "system" if message.role == "developer" else message.role
        out.append({"role": role, "content": message_text(message.content)})
    if continue_final and out[-1]["role"] != "assistant":
        raise BadRequest("'continue_final_message' needs an assistant message last.", param="messages")
    return out


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
