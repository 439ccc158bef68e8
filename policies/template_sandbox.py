"""The Jinja2 sandbox prompt templates render in: no Python internals, no files, and bounded work per render."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from jinja2 import StrictUndefined, nodes, pass_eval_context
from jinja2.compiler import CodeGenerator
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.filters import FILTERS
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["MAX_OUTPUT", "MAX_STEPS", "RENDER_LIMIT_S", "RenderLimit", "SafeTemplate", "compile_template"]

MAX_OUTPUT = 100_000  # characters one render may produce, and the largest string or list it may build
MAX_STEPS = 100_000  # loop iterations plus calls (functions, methods, macros) per render
MAX_RANGE = 10_000  # items one range() may hold
RENDER_LIMIT_S = 0.05  # wall time per render, checked every few steps
_CHECK_EVERY = 256

# filters that can only shrink, keep or linearly reshape their input; the ones taking a width or a format
# (center, indent, wordwrap, format, urlize, pprint, xmlattr, filesizeformat) could be asked for gigabytes
_FILTERS = ("abs", "attr", "capitalize", "count", "d", "default", "dictsort", "e", "escape", "first", "float",
            "forceescape", "groupby", "int", "items", "last", "length", "list", "lower", "map", "max", "min",
            "reject", "rejectattr", "reverse", "round", "safe", "select", "selectattr", "slice", "sort", "string",
            "striptags", "sum", "title", "tojson", "trim", "truncate", "unique", "upper", "urlencode", "wordcount")

# string methods whose result is no larger than the string or an argument already checked (format and
# format_map take widths, expandtabs multiplies; replace and join are checked on their own)
_STR_METHODS = frozenset({
    "capitalize", "casefold", "center", "count", "endswith", "find", "index", "isalnum", "isalpha", "isascii",
    "isdecimal", "isdigit", "islower", "isnumeric", "isspace", "istitle", "isupper", "ljust", "lower", "lstrip",
    "partition", "removeprefix", "removesuffix", "rfind", "rindex", "rjust", "rpartition", "rsplit", "rstrip",
    "split", "splitlines", "startswith", "strip", "swapcase", "title", "upper", "zfill",
})


class RenderLimit(TemplateError):
    """A render went past one of the limits above (too long, too much output, too large a value)."""


class _Budget:
    __slots__ = ("deadline", "steps")

    def __init__(self, deadline: float) -> None:
        self.steps = 0
        self.deadline = deadline


_local = threading.local()  # the budget of the render running on this thread


def _step() -> None:
    budget: _Budget = _local.budget
    budget.steps += 1
    if budget.steps % _CHECK_EVERY == 0:
        if budget.steps > MAX_STEPS:
            raise RenderLimit(f"the template took more than {MAX_STEPS} steps (loop iterations and calls)")
        if time.monotonic() > budget.deadline:
            raise RenderLimit(f"the template took longer than {RENDER_LIMIT_S * 1000:g} ms to render")


def _bounded(value: Any) -> Any:
    if isinstance(value, (str, bytes, list, tuple, dict, set)) and len(value) > MAX_OUTPUT:
        raise RenderLimit(f"the template built a value of {len(value)} items, more than {MAX_OUTPUT}")
    return value


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict, set)) else 1


def _guarded_loop(iterable: Iterable[Any]) -> Iterator[Any]:
    """Every {% for %} iterates through this: each iteration is a step."""
    for item in iterable:
        _step()
        yield item


def _check_join(items: Sequence[Any], separator: str) -> None:
    if sum(_size(item) for item in items) + len(separator) * len(items) > MAX_OUTPUT:
        raise RenderLimit(f"join would build more than {MAX_OUTPUT} characters")


@pass_eval_context
def _bounded_join(eval_ctx: Any, value: Iterable[Any], d: str = "", attribute: str | int | None = None) -> str:
    items = list(value)
    _check_join(items, d)
    return FILTERS["join"](eval_ctx, items, d, attribute)  # type: ignore[no-any-return]


def _bounded_replace(s: str, old: str, new: str, count: int | None = None) -> str:
    s, old, new = str(s), str(old), str(new)
    hits = s.count(old) if old else len(s) + 1
    if len(s) + hits * len(new) > MAX_OUTPUT:
        raise RenderLimit(f"replace would build more than {MAX_OUTPUT} characters")
    return s.replace(old, new, -1 if count is None else count)


class _GuardedCode(CodeGenerator):
    """Compiles `~` (concatenation) through a size check: the one way to build a string no hook sees."""

    def visit_Concat(self, node: nodes.Concat, frame: Any) -> None:
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox (no `_`-attributes, no mutation of lists and dicts, no unsafe callables) with
    every call, loop iteration, arithmetic on sequences and concatenation counted or size-checked."""

    code_generator_class = _GuardedCode
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self) -> None:
        super().__init__(undefined=StrictUndefined, autoescape=False, loader=None, auto_reload=False, cache_size=0)
        self.filters = {name: FILTERS[name] for name in _FILTERS}
        self.filters["join"] = _bounded_join
        self.filters["replace"] = _bounded_replace
        self.globals = {"range": self._range, "__loop_guard": _guarded_loop}

    @staticmethod
    def _range(*args: int) -> range:
        items = range(*args)
        if len(items) > MAX_RANGE:
            raise RenderLimit(f"range() of {len(items)} items, more than {MAX_RANGE}")
        return items

    def wrap_str_format(self, value: Any) -> Any:
        """str.format and format_map take field widths (gigabytes on request): refused outright."""
        result = super().wrap_str_format(value)
        if result is None:
            return None

        def refuse(*_args: Any, **_kwargs: Any) -> str:
            raise SecurityError("str.format() is not allowed in templates; use the variables directly")

        return refuse

    def bounded_concat(self, parts: Sequence[Any]) -> str:
        return _bounded("".join(str(part) for part in parts))  # type: ignore[no-any-return]

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _step()
        if operator == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and (
                    right > 4096 or abs(left).bit_length() * right > 65536):
                raise RenderLimit("the power is too large")
        elif operator == "%" and isinstance(left, str):
            raise SecurityError("'%' string formatting is not allowed in templates; use the variables directly")
        elif operator == "*":
            sequence, times = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(times, int) and isinstance(sequence, (str, list, tuple)) and \
                    len(sequence) * times > MAX_OUTPUT:
                raise RenderLimit(f"the template built a value of more than {MAX_OUTPUT} items")
        return _bounded(super().call_binop(context, operator, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - Jinja's
        _step()
        for arg in (*args, *kwargs.values()):
            if isinstance(arg, int) and not isinstance(arg, bool) and arg > MAX_OUTPUT:
                raise RenderLimit(f"an argument of {arg} is larger than the templates' limit of {MAX_OUTPUT}")
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):  # a string's method: only those whose result size its arguments bound
            name = getattr(__obj, "__name__", "")
            if name == "replace":
                return _bounded_replace(owner, *args, **kwargs)
            if name == "join" and args:
                args = (list(args[0]), *args[1:])
                _check_join(args[0], owner)
            elif name not in _STR_METHODS:
                raise SecurityError(f"str.{name}() is not allowed in templates")
        return _bounded(super().call(__context, __obj, *args, **kwargs))


_FORBIDDEN = (nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport, nodes.Block)


class SafeTemplate:
    """One compiled template and the variables it reads; `render` runs it within the limits above."""

    __slots__ = ("_template", "source", "variables")

    def __init__(self, source: str) -> None:
        env = _ENV
        tree = env.parse(source)  # a TemplateSyntaxError names the line
        for node in tree.find_all(_FORBIDDEN):
            raise SecurityError(f"line {node.lineno}: {type(node).__name__.lower()} is not allowed in templates "
                                "(they read no other templates)")
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Call(nodes.Name("__loop_guard", "load"), [loop.iter], [], None, None,
                                   lineno=loop.lineno)
        from jinja2 import meta  # noqa: PLC0415 - only needed while compiling

        self.variables = frozenset(meta.find_undeclared_variables(tree)) - env.globals.keys()
        self.source = source
        self._template = env.from_string(tree)

    def render(self, variables: dict[str, Any]) -> str:
        """The rendered text; RenderLimit, SecurityError or another TemplateError (or a Python error a
        filter raised) when it cannot be rendered."""
        _local.budget = _Budget(time.monotonic() + RENDER_LIMIT_S)
        out: list[str] = []
        size = 0
        for chunk in self._template.generate(variables):
            size += len(chunk)
            if size > MAX_OUTPUT:
                raise RenderLimit(f"the template rendered more than {MAX_OUTPUT} characters")
            out.append(chunk)
        return "".join(out)


_ENV = _Sandbox()


def compile_template(source: str) -> SafeTemplate:
    return SafeTemplate(source)
