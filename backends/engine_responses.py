"""A local engine's results in OpenAI's shapes: plain answers and stream chunks, with tool calls and logprobs."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from backends.tool_format import ToolCallParser
from protocol.openai import (
    ChatCompletionChunk,
    ChatMessage,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    Delta,
    FunctionCall,
    FunctionCallDelta,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
    new_id,
)

if TYPE_CHECKING:
    from backends.engine_requests import Plan
    from backends.generation import DecodeResult, SampledLogprob

__all__ = ["StreamChunks", "chat_choice", "completion_choice"]

_encoder = msgspec.json.Encoder()


class _Vocab:
    """Token ids -> their text and bytes, for logprobs (the table comes from backends/constrained.py)."""

    __slots__ = ("_bytes",)

    def __init__(self, token_bytes: Sequence[bytes]) -> None:
        self._bytes = token_bytes

    def bytes(self, token: int) -> bytes:
        return self._bytes[token] if 0 <= token < len(self._bytes) else b""

    def text(self, token: int) -> str:
        # a token may hold part of a character: its text shows U+FFFD, its bytes stay exact
        return self.bytes(token).decode("utf-8", "replace")

    def chat(self, entries: Sequence[SampledLogprob]) -> ChoiceLogprobs:
        return ChoiceLogprobs(content=[
            TokenLogprob(token=self.text(e.token), logprob=e.logprob, bytes=list(self.bytes(e.token)),
                         top_logprobs=[TopLogprob(token=self.text(t), logprob=lp, bytes=list(self.bytes(t)))
                                       for t, lp in e.top])
            for e in entries
        ])

    def legacy(self, entries: Sequence[SampledLogprob], offset: int) -> tuple[CompletionLogprobs, int]:
        """The /v1/completions shape; `text_offset` counts characters from `offset` -> (logprobs, next offset)."""
        tokens, offsets = [], []
        for e in entries:
            tokens.append(self.text(e.token))
            offsets.append(offset)
            offset += len(tokens[-1])
        return CompletionLogprobs(
            tokens=tokens,
            token_logprobs=[e.logprob for e in entries],
            top_logprobs=[{self.text(t): lp for t, lp in e.top} for e in entries],
            text_offset=offsets,
        ), offset


def _vocab(token_bytes: Sequence[bytes] | None) -> _Vocab | None:
    return None if token_bytes is None else _Vocab(token_bytes)


def _calls_expected(plan: Plan) -> bool:
    return plan.tools is not None and plan.tools.calls


def _parser(plan: Plan) -> ToolCallParser:
    # tool_choice required or named: the grammar writes a call from the first character, so no text is content
    return ToolCallParser(calls_only=plan.tools is not None and plan.tools.choice != "auto")


def chat_choice(plan: Plan, index: int, result: DecodeResult, token_bytes: Sequence[bytes] | None) -> Choice:
    """One choice of a chat.completion: its text, or the tool calls in it (finish_reason `tool_calls`)."""
    vocab = _vocab(token_bytes)
    logprobs = vocab.chat(result.logprobs) if vocab is not None and result.logprobs is not None else None
    text = result.text
    if _calls_expected(plan):
        parser = _parser(plan)
        parser.push(result.text)
        parser.flush()
        if parser.calls:
            content = "".join(parser.content)
            calls = [ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
                     for c in parser.calls]
            finish = "tool_calls" if result.finish_reason == "stop" else result.finish_reason
            message = ChatMessage(content=content if content.strip() else None, tool_calls=calls)
            return Choice(index=index, message=message, finish_reason=finish, logprobs=logprobs)
        text = "".join(parser.content)  # without a call cut off before its head was complete
    return Choice(index=index, message=ChatMessage(content=text), finish_reason=result.finish_reason,
                  logprobs=logprobs)


def completion_choice(index: int, echo: str, result: DecodeResult, token_bytes: Sequence[bytes] | None,
                      ) -> CompletionChoice:
    vocab = _vocab(token_bytes)
    logprobs = vocab.legacy(result.logprobs, len(echo))[0] if vocab and result.logprobs is not None else None
    return CompletionChoice(index=index, text=echo + result.text, finish_reason=result.finish_reason,
                            logprobs=logprobs)


class StreamChunks:
    """Renders one stream's chunks: one id and `created` for all; `usage: null` only in chat, if usage is asked for.

    Each method returns the chunks (encoded) an event makes. When the model may call tools, each choice's text
    goes through a ToolCallParser and its role chunk waits for the first thing to say, so a call streams as
    OpenAI streams it: {role, content: null, tool_calls: [{index, id, type, function: {name, arguments: ""}}]},
    then {tool_calls: [{index, function: {arguments}}]} pieces, then finish_reason `tool_calls`.
    """

    def __init__(self, plan: Plan, model: str, token_bytes: Sequence[bytes] | None) -> None:
        self.chat, self.model, self.include_usage = plan.chat, model, plan.include_usage
        self._plan = plan
        self.id = new_id("chatcmpl" if plan.chat else "cmpl")
        self.created = int(time.time())
        self._vocab = _vocab(token_bytes)
        self._parsers: dict[int, ToolCallParser] | None = {} if _calls_expected(plan) else None
        self._offsets: dict[int, int] = {}  # completions' text_offset so far, per choice
        self._roles: set[int] = set()  # the choices whose role was sent

    def start(self, index: int, echo: str) -> list[bytes]:
        if not self.chat:
            self._offsets[index] = len(echo)
            return [self._completion(CompletionChoice(index=index, text=echo, finish_reason=None))] if echo else []
        if self._parsers is not None:
            self._parsers[index] = _parser(self._plan)
            return []  # the role goes with the first content or call
        self._roles.add(index)
        return [self._chat(index, Delta(role="assistant", content=""))]

    def text(self, index: int, value: tuple[str, list[SampledLogprob]]) -> list[bytes]:
        text, entries = value
        if not self.chat:
            logprobs = None
            if self._vocab is not None and entries:
                logprobs, self._offsets[index] = self._vocab.legacy(entries, self._offsets.get(index, 0))
            return [self._completion(CompletionChoice(index=index, text=text, finish_reason=None,
                                                      logprobs=logprobs))]
        if self._parsers is not None:
            return self._parsed(index, self._parsers[index].push(text))
        logprobs = self._vocab.chat(entries) if self._vocab is not None and entries else None
        return [self._chat(index, Delta(content=text), logprobs=logprobs)]

    def end(self, index: int, finish_reason: str) -> list[bytes]:
        if not self.chat:
            return [self._completion(CompletionChoice(index=index, text="", finish_reason=finish_reason))]
        out: list[bytes] = []
        if self._parsers is not None:
            parser = self._parsers[index]
            out = self._parsed(index, parser.flush())
            if index not in self._roles:  # nothing was said at all
                out.append(self._chat(index, self._opening(index, Delta(content=""))))
            if parser.calls and finish_reason == "stop":
                finish_reason = "tool_calls"
        out.append(self._chat(index, Delta(), finish_reason=finish_reason))
        return out

    def usage(self, usage: Usage) -> bytes:
        cls = ChatCompletionChunk if self.chat else Completion
        return _encoder.encode(cls(id=self.id, created=self.created, model=self.model, choices=[], usage=usage))

    def _parsed(self, index: int, events: list[tuple]) -> list[bytes]:
        out = []
        parser = self._parsers[index]  # type: ignore[index]
        for event in events:
            if event[0] == "content":
                delta = Delta(content=event[1])
            elif event[0] == "call":
                call = parser.calls[event[1]]
                delta = Delta(content=None, tool_calls=[ToolCallDelta(
                    index=event[1], id=call.id, type="function",
                    function=FunctionCallDelta(name=call.name, arguments=""))])
            else:
                delta = Delta(tool_calls=[ToolCallDelta(index=event[1], function=FunctionCallDelta(
                    arguments=event[2]))])
            out.append(self._chat(index, self._opening(index, delta)))
        return out

    def _opening(self, index: int, delta: Delta) -> Delta:
        """The choice's first delta also carries its role."""
        if index not in self._roles:
            self._roles.add(index)
            delta.role = "assistant"
        return delta

    def _chat(self, index: int, delta: Delta, finish_reason: str | None = None,
              logprobs: ChoiceLogprobs | None = None) -> bytes:
        choice = ChunkChoice(index=index, delta=delta, finish_reason=finish_reason, logprobs=logprobs)
        return self._encode(ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                                choices=[choice]))

    def _completion(self, choice: CompletionChoice) -> bytes:
        return self._encode(Completion(id=self.id, created=self.created, model=self.model, choices=[choice]))

    def _encode(self, chunk: Any) -> bytes:
        data = _encoder.encode(chunk)
        # OpenAI sends `usage` in chunks only under stream_options.include_usage, and then `usage: null` only in
        # chat chunks (a text_completion's `usage` is never null in its spec); JSON escapes quotes inside
        # strings, so this byte sequence can only be the field itself
        return data if self.include_usage and self.chat else data.replace(b',"usage":null', b"", 1)
