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
from jinja2.tests import TESTS

__all__ = ["MAX_OUTPUT", "MAX_STEPS", "RENDER_LIMIT_S", "RenderLimit", "SafeTemplate", "compile_template"]

MAX_OUTPUT = 100_000  # characters one render may produce, and the largest string or list it may build
MAX_STEPS = 100_000  # loop iterations plus calls (functions, methods, macros) per render
MAX_RANGE = 10_000  # items one range() may hold
RENDER_LIMIT_S = 0.05  # CPU time per render, checked every few loop iterations and at every call and filter
_CHECK_EVERY = 256
MAX_PRECISION = 1000  # digits round() may be asked for (it computes 10 ** precision)

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
    """One loop iteration or attribute lookup: counted, the clock read every few."""
    budget: _Budget | None = getattr(_local, "budget", None)
    if budget is None:
        raise RenderLimit("lookups run only while rendering")
    budget.steps += 1
    if budget.steps % _CHECK_EVERY == 0:
        _check(budget)


def _call_step(steps: int = 1) -> None:
    """One call or filter (`steps`: one per item it will go through): counted and the clock read every time, since
    a single one may take milliseconds. Outside a render (Jinja folding a constant while compiling) there is no
    budget: refused, so that it runs when rendered, within one."""
    budget: _Budget | None = getattr(_local, "budget", None)
    if budget is None:
        raise RenderLimit("filters and calls run only while rendering")
    budget.steps += steps
    _check(budget)


def _check(budget: _Budget) -> None:
    if budget.steps > MAX_STEPS:
        raise RenderLimit(f"the template took more than {MAX_STEPS} steps (loop iterations, lookups and calls)")
    if time.thread_time() > budget.deadline:  # CPU time: a stall of the thread (the GIL, the host) is no render
        raise RenderLimit(f"the template took longer than {RENDER_LIMIT_S * 1000:g} ms to render")


_SIZED = (str, bytes, list, tuple, dict, set, frozenset)


def _size(value: Any, indent: int = 0, limit: int = MAX_OUTPUT) -> int:
    """Characters and items in `value`, nested ones included (what printing it or joining it builds); with
    `indent`, each item also counts the indentation JSON would give it at its depth. Stops counting past `limit`."""
    if isinstance(value, (str, bytes)):
        return len(value)
    if not isinstance(value, _SIZED):
        return 1
    total = 0
    stack = [(value, 1)]
    while stack:
        container, depth = stack.pop()
        total += len(container) * (1 + indent * depth)
        if total > limit:
            return total
        for item in (*container.keys(), *container.values()) if isinstance(container, dict) else container:
            if isinstance(item, (str, bytes)):
                total += len(item)
            elif isinstance(item, _SIZED):
                stack.append((item, depth + 1))
        if total > limit:
            return total
    return total


def _bounded(value: Any) -> Any:
    """`value`, unless it holds more than MAX_OUTPUT characters and items, nested ones included."""
    if isinstance(value, _SIZED):
        size = _size(value)
        if size > MAX_OUTPUT:
            raise RenderLimit(f"the template built a value of more than {MAX_OUTPUT} items and characters")
    return value


def _count(value: Any, name: str, low: int = 0, high: int = MAX_OUTPUT) -> None:
    """A size argument of a filter (a count, a width, an indent): an integer within [low, high]."""
    if isinstance(value, int) and not isinstance(value, bool) and not low <= value <= high:
        raise RenderLimit(f"{name}={value} is outside the templates' limit of {low}..{high}")


def _guarded_loop(iterable: Iterable[Any]) -> Iterator[Any]:
    """Every {% for %} iterates through this: each iteration is a step."""
    for item in iterable:
        _step()
        yield item


def _check_join(items: Sequence[Any], separator: str) -> None:
    if _size(items) + len(separator) * len(items) > MAX_OUTPUT:
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


def _check_slice(value: Any, slices: int, fill_with: Any = None) -> None:
    _count(slices, "slices", 1)


def _check_truncate(s: Any, length: int = 255, killwords: bool = False, end: str = "...",
                    leeway: int | None = None) -> None:
    _count(length, "length")
    _count(leeway, "leeway")


def _check_tojson(value: Any, indent: int | str | None = None) -> None:
    width = len(indent) if isinstance(indent, str) else indent if isinstance(indent, int) else 0
    _count(width, "indent", 0, 64)
    if _size(value, indent=width) > MAX_OUTPUT:
        raise RenderLimit(f"tojson would build more than {MAX_OUTPUT} characters")


def _check_round(value: Any, precision: int = 0, method: str = "common") -> None:
    _count(precision, "precision", -MAX_PRECISION, MAX_PRECISION)


def _check_sum(iterable: Any, attribute: Any = None, start: Any = 0) -> None:
    if not isinstance(start, (int, float)):  # summing lists or strings copies them over and over
        raise RenderLimit("sum(start=...) takes a number")


# the filters taking a size or a start: their arguments are checked before they run (same signature, no value)
_FILTER_CHECKS = {"slice": _check_slice, "truncate": _check_truncate, "tojson": _check_tojson,
                  "round": _check_round, "sum": _check_sum}


def _guarded(name: str, func: Any, check: Any = None) -> Any:
    """`func` (a filter or a test) counted as a call and run within the clock, its arguments checked by `check`
    first and its result bounded. Jinja compiles a filter to a direct call of the function in `filters`, and
    map/select reach it through call_filter/call_test: wrapping the function is the one hook both go through."""
    pass_arg = getattr(func, "jinja_pass_arg", None)
    skip = 1 if pass_arg is not None else 0  # the context, eval context or environment Jinja passes first

    def guarded(*args: Any, **kwargs: Any) -> Any:
        value = args[skip] if len(args) > skip else None
        # a filter over a list does Python work per item (sort, unique, groupby...): each item is a step
        _call_step(1 + len(value) if isinstance(value, (list, tuple, dict, set, frozenset)) else 1)
        if check is not None:
            check(*args[skip:], **kwargs)
        return _bounded(func(*args, **kwargs))

    guarded.__name__ = guarded.__qualname__ = f"guarded_{name}"
    if pass_arg is not None:
        guarded.jinja_pass_arg = pass_arg  # type: ignore[attr-defined]
    return guarded


class _GuardedCode(CodeGenerator):
    """Compiles `~` (concatenation) through a size check: the one way to build a string no hook sees; and folds no
    expression at compile time (Jinja would run filters there, unbudgeted, when a version is added or loaded)."""

    def _output_child_to_const(self, node: nodes.Expr, frame: Any, finalize: Any) -> str:
        if not isinstance(node, nodes.TemplateData):
            raise nodes.Impossible()
        return super()._output_child_to_const(node, frame, finalize)

    def visit_Concat(self, node: nodes.Concat, frame: Any) -> None:
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox (no `_`-attributes, no mutation of lists and dicts, no unsafe callables) with
    every call, filter, test, lookup, loop iteration, arithmetic on sequences and concatenation counted or
    size-checked; compiled without constant folding (`optimized=False` and `_GuardedCode`)."""

    code_generator_class = _GuardedCode
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self) -> None:
        super().__init__(undefined=StrictUndefined, autoescape=False, loader=None, auto_reload=False, cache_size=0,
                         optimized=False)
        filters = {name: FILTERS[name] for name in _FILTERS}
        filters["join"] = _bounded_join
        filters["replace"] = _bounded_replace
        self.filters = {name: _guarded(name, func, _FILTER_CHECKS.get(name)) for name, func in filters.items()}
        self.tests = {name: _guarded(name, func) for name, func in TESTS.items()}
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
        if _size(list(parts)) > MAX_OUTPUT:
            raise RenderLimit(f"the template built a value of more than {MAX_OUTPUT} items and characters")
        return "".join(str(part) for part in parts)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _step()  # filters look attributes up per item too (sort, groupby, map...): each one counts
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _step()
        return super().getitem(obj, argument)

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
        _call_step()
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


class _VariableFinder(_GuardedCode):
    """jinja2.meta's TrackingCodeGenerator on our code generator: the variables a template reads, found without
    folding constants (meta's own generator optimizes, running filters unbudgeted) and without writing code."""

    def __init__(self) -> None:
        super().__init__(_ENV, "<introspection>", "<introspection>", optimized=False)
        self.undeclared: set[str] = set()

    def write(self, x: str) -> None:
        pass

    def enter_frame(self, frame: Any) -> None:
        super().enter_frame(frame)
        for action, param in frame.symbols.loads.values():
            if action == "resolve" and param not in self.environment.globals:
                self.undeclared.add(param)


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
        finder = _VariableFinder()
        finder.visit(tree)
        self.variables = frozenset(finder.undeclared) - env.globals.keys()
        self.source = source
        self._template = env.from_string(tree)

    def render(self, variables: dict[str, Any], deadline: float | None = None) -> str:
        """The rendered text; RenderLimit, SecurityError or another TemplateError (or a Python error a
        filter raised) when it cannot be rendered. `deadline` (time.thread_time(): the rendering thread's CPU
        time): one shared by several templates rendered for one request; RENDER_LIMIT_S from now when None."""
        _local.budget = _Budget(time.thread_time() + RENDER_LIMIT_S if deadline is None else deadline)
        try:
            out: list[str] = []
            size = 0
            for chunk in self._template.generate(variables):
                size += len(chunk)
                if size > MAX_OUTPUT:
                    raise RenderLimit(f"the template rendered more than {MAX_OUTPUT} characters")
                out.append(chunk)
            return "".join(out)
        finally:
            _local.budget = None  # outside a render, filters and calls refuse to run (see _call_step)


_ENV = _Sandbox()


def compile_template(source: str) -> SafeTemplate:
    return SafeTemplate(source)
