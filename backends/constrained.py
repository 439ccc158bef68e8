"""Grammar-constrained decoding with xgrammar: JSON (schemas) and tool calls, compiled once, masked per sequence.

A request's constraint is described by `grammar_spec` (plain JSON, on the event loop) and compiled by `Grammars`
in the engine's worker thread, cached by that description. Each sequence then gets its own `Constraint` (an
xgrammar matcher and a one-row token bitmask), so sequences with and without grammars share one batch. JSON is
written without free whitespace (`{"a": 1, "b": [2, 3]}`): a small model given the choice may pad forever.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from backends.tool_format import CALL_END, CALL_OPEN, ToolPlan, call_prefix
from protocol.errors import BadRequest

if TYPE_CHECKING:  # xgrammar (and torch) load in the engine's threads only
    import torch

__all__ = ["Constraint", "Grammars", "grammar_spec", "held_from"]

# xgrammar's errors start with "[12:00:00] /project/cpp/json_schema_converter.cc:4944: "
_SOURCE_LOCATION = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")
# xgrammar 0.2.8's character classes for strings let through what JSON text may not hold: control characters
# in strings with minLength/maxLength (json.loads rejects them), and in every string UTF-8-encoded surrogates
# (invalid UTF-8: each byte decodes to U+FFFD, and a maxLength no longer holds)
_LOOSE_CHARACTERS = (r'[^\"\\\r\n]', r'[^\0-\x1f\"\\\r\n]')
_JSON_CHARACTER = r'[^\0-\x1f\"\\\uD800-\uDFFF]'
_CACHE_SIZE = 64  # compiled grammars kept per model (a schema is typically reused request after request)
# in `auto`, text that starts like tool syntax is taken as a call: a small model that has seen calls and
# results in the conversation may otherwise write `<tool_response>` where it means `<tool_call>`
_TRIGGER = CALL_OPEN[: CALL_OPEN.index("_") + 1]


def grammar_spec(response_format: dict[str, Any] | None, tools: ToolPlan | None) -> str | None:
    """What to constrain a request's output to, as JSON (the compile cache's key), or None.

    Calls (tool_choice required or named) leave no room for `response_format`; with `auto` the answer is either
    calls or text, which a JSON `response_format` then shapes.
    """
    json_schema: Any = None
    if response_format is not None and response_format.get("type") == "json_object":
        json_schema = {"type": "object"}
    elif response_format is not None and response_format.get("type") == "json_schema":
        json_schema = response_format["json_schema"].get("schema") or {"type": "object"}
    spec: dict[str, Any] = {}
    if tools is not None and tools.calls:
        spec["calls"] = tools.spec()
        if tools.choice != "auto":
            json_schema = None
    if json_schema is not None:
        # json_object: any object (extra keys welcome); a schema: only what it declares (xgrammar's strict mode)
        spec["json"] = {"schema": json_schema, "strict": response_format.get("type") == "json_schema"}  # type: ignore[union-attr]
    # not sorted: a schema's property order is the order the model writes them in
    return json.dumps(spec, separators=(",", ":")) if spec else None


def held_from(spec: str | None) -> str | None:
    """Where a `grammar_spec` starts holding the output: "" from its first token; the call trigger with
    tool_choice auto and no JSON answer (free text until the model opens a call); None without a grammar.
    Stop strings apply only before it: a stop string must not cut a call or a JSON answer short."""
    if spec is None:
        return None
    parsed = json.loads(spec)
    calls = parsed.get("calls")
    if calls is not None and calls["mode"] != "required" and "json" not in parsed:
        return _TRIGGER
    return ""


class Grammars:
    """A model's grammar compiler and its cache of compiled grammars; used from the engine's threads."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: frozenset[int]) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=sorted(eos_ids) or None)
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=1)
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: str) -> Any:
        """The compiled grammar for a `grammar_spec`; a schema xgrammar cannot take is a 400."""
        with self._lock:
            compiled = self._cache.get(spec)
            if compiled is not None:
                self._cache.move_to_end(spec)
                return compiled
        compiled = self._compile(json.loads(spec))
        with self._lock:
            self._cache[spec] = compiled
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, spec: dict[str, Any]) -> Any:
        calls, answer = spec.get("calls"), spec.get("json")
        param = "tools" if calls else "response_format"
        try:
            if calls is None:
                return self._compiler.compile_grammar(self._json(answer))
            return self._compiler.compile_structural_tag(self._calls(calls, answer))
        except BadRequest:
            raise
        except Exception as exc:  # xgrammar's InvalidJSONError, RuntimeError on an unsupported schema, ...
            reason = _SOURCE_LOCATION.sub("", str(exc)).strip()
            raise BadRequest(f"Cannot constrain the output to this schema: {reason}", param=param) from None

    def _json(self, answer: dict[str, Any]) -> str:
        """The EBNF of a JSON answer (no free whitespace); strings with a length limit made valid JSON."""
        grammar = self._xgr.Grammar.from_json_schema(json.dumps(answer["schema"]), any_whitespace=False,
                                                     strict_mode=answer["strict"])
        ebnf = str(grammar)
        for loose in _LOOSE_CHARACTERS:
            ebnf = ebnf.replace(loose, _JSON_CHARACTER)
        return ebnf

    def _calls(self, calls: dict[str, Any], answer: dict[str, Any] | None) -> dict[str, Any]:
        """A structural tag: calls in the tool-call syntax, each's arguments held to its function's schema."""
        tags = [
            {"type": "tag", "begin": call_prefix(tool["name"]), "end": CALL_END,
             "content": {"type": "grammar", "grammar": self._json({"schema": tool["parameters"], "strict": True})}}
            for tool in calls["tools"]
        ]
        # one call, then the end (ToolPlan: parallel calls are honoured as one)
        one_call = {"type": "tags_with_separator", "tags": tags, "separator": "\n", "at_least_one": True,
                    "stop_after_first": True}
        if calls["mode"] == "required":
            fmt: dict[str, Any] = one_call
        elif answer is None:  # auto: free text until the model opens a call
            fmt = {"type": "triggered_tags", "triggers": [_TRIGGER], "tags": tags, "stop_after_first": True}
        else:  # auto with a JSON answer: a call, or the JSON
            fmt = {"type": "or", "elements": [one_call, {"type": "grammar", "grammar": self._json(answer)}]}
        return {"type": "structural_tag", "format": fmt}

    def constraint(self, compiled: Any, prefix: str = "") -> Constraint:
        """A fresh state for one sequence; `prefix`: text already written under the grammar (must fit it)."""
        constraint = Constraint(self._xgr, compiled, self.vocab_size)
        if prefix and not constraint.advance(prefix):
            raise ValueError("the prefix does not fit the grammar")
        return constraint

    def accepts(self, compiled: Any, prefix: str) -> bool:
        """Whether text may begin an output under the grammar."""
        return Constraint(self._xgr, compiled, self.vocab_size).advance(prefix)

    def token_bytes(self) -> list[bytes]:
        """Each token id's bytes (for logprobs), special tokens as their text."""
        return list(self.info.decoded_vocab)


class Constraint:
    """One sequence's grammar state: masks the logits before sampling, advances on each sampled token."""

    __slots__ = ("_bitmask", "_matcher", "_xgr")

    def __init__(self, xgr: Any, compiled: Any, vocab_size: int) -> None:
        self._xgr = xgr
        self._matcher = xgr.GrammarMatcher(compiled)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits [vocab] of every token the grammar forbids next to -inf, in place."""
        self._matcher.fill_next_token_bitmask(self._bitmask)
        bitmask = self._bitmask if logits.device.type == "cpu" else self._bitmask.to(logits.device)
        self._xgr.apply_token_bitmask_inplace(logits.view(1, -1), bitmask)

    def advance(self, text: str) -> bool:
        """Take text written before decoding began; False if the grammar does not allow it."""
        return self._matcher.accept_string(text)

    def accept(self, token: int) -> None:
        if not self._matcher.accept_token(token):
            raise RuntimeError(f"the grammar rejected token {token}")  # masked out: cannot happen

    @property
    def done(self) -> bool:
        """The grammar reached its end (accepted a stop token)."""
        return self._matcher.is_terminated()
