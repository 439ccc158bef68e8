"""vLLM's load from its Prometheus `/metrics`: running and waiting requests and KV-cache usage."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from dataclasses import dataclass

import httpx

__all__ = ["VLLMLoad", "fetch_vllm_load", "iter_samples", "metrics_url_for", "parse_vllm_metrics"]

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_CACHE = "vllm:kv_cache_usage_perc"  # V1 engine, vLLM >= 0.9.2
GPU_CACHE = "vllm:gpu_cache_usage_perc"  # the older name (V0, early V1); deprecated in 0.9.2, then hidden
_WANTED = frozenset({RUNNING, WAITING, KV_CACHE, GPU_CACHE})


@dataclass(frozen=True, slots=True)
class VLLMLoad:
    running: float  # summed over every label set (engines of a data-parallel server, model names)
    waiting: float
    kv_cache_usage: float | None  # 0..1 (a fraction, despite "_perc"), averaged over engines; None if absent


def metrics_url_for(base_url: str) -> str:
    """`/metrics` sits at the server root, beside `/v1`: http://h:8000/v1 -> http://h:8000/metrics."""
    root = base_url.rstrip("/")
    if root.endswith("/v1"):
        root = root[: -len("/v1")]
    return f"{root}/metrics"


_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}


def _parse_labels(line: str, i: int) -> tuple[dict[str, str], int]:
    """Parse `{a="x",b="y\\"z"}` starting at line[i] == '{'; returns the labels and the index after '}'.

    A scanner, not a regex or a split on ',': label values may hold commas, braces and escaped quotes.
    """
    labels: dict[str, str] = {}
    n = len(line)
    i += 1
    while True:
        while i < n and line[i] in " \t,":
            i += 1
        if i >= n:
            raise ValueError("unterminated label set")
        if line[i] == "}":
            return labels, i + 1
        eq = line.find("=", i)
        if eq < 0:
            raise ValueError("label without '='")
        name = line[i:eq].strip()
        i = eq + 1
        while i < n and line[i] in " \t":
            i += 1
        if i >= n or line[i] != '"':
            raise ValueError("label value is not quoted")
        i += 1
        chars: list[str] = []
        while True:
            if i >= n:
                raise ValueError("unterminated label value")
            c = line[i]
            if c == "\\" and i + 1 < n:
                chars.append(_ESCAPES.get(line[i + 1], "\\" + line[i + 1]))
                i += 2
            elif c == '"':
                i += 1
                break
            else:
                chars.append(c)
                i += 1
        labels[name] = "".join(chars)


def iter_samples(
    text: str, names: frozenset[str] | None = None
) -> Iterator[tuple[str, dict[str, str], float]]:
    """(name, labels, value) for each sample line of Prometheus text exposition (or OpenMetrics).

    Comments, HELP/TYPE lines and blank lines are skipped, as is any line that does not parse (one odd line
    must not cost the whole poll). A timestamp after the value is ignored. `names` filters before the labels
    are parsed, which matters: vLLM's page is mostly histogram buckets.
    """
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] == "#":
            continue
        end = 0
        while end < len(line) and line[end] not in "{ \t":
            end += 1
        name = line[:end]
        if names is not None and name not in names:
            continue
        try:
            labels: dict[str, str] = {}
            if end < len(line) and line[end] == "{":
                labels, end = _parse_labels(line, end)
            fields = line[end:].split()
            if not fields:
                continue
            value = float(fields[0])  # also "NaN", "+Inf", "-Inf", "1.7e+09"
        except ValueError:
            continue
        yield name, labels, value


def parse_vllm_metrics(text: str) -> VLLMLoad:
    """The load gauges of one `vllm serve` /metrics page.

    Raises ValueError when none of them is there (not a vLLM server, or metrics disabled). NaN and infinities
    are skipped as unknown. `vllm:kv_cache_usage_perc` wins over the deprecated `vllm:gpu_cache_usage_perc`
    (the versions in between export both, with the same value).
    """
    sums = {RUNNING: 0.0, WAITING: 0.0}
    seen: set[str] = set()
    cache: dict[str, list[float]] = {KV_CACHE: [], GPU_CACHE: []}
    for name, _labels, value in iter_samples(text, _WANTED):
        if not math.isfinite(value):
            continue
        seen.add(name)
        if name in sums:
            sums[name] += max(0.0, value)
        else:
            cache[name].append(min(1.0, max(0.0, value)))
    if not seen:
        raise ValueError("no vLLM load metrics (vllm:num_requests_running/waiting, vllm:kv_cache_usage_perc)")
    usage = cache[KV_CACHE] or cache[GPU_CACHE]
    kv = sum(usage) / len(usage) if usage else None
    return VLLMLoad(running=sums[RUNNING], waiting=sums[WAITING], kv_cache_usage=kv)


async def fetch_vllm_load(client: httpx.AsyncClient, url: str, timeout_s: float) -> VLLMLoad | None:
    """GET and parse one /metrics page; None on any failure (unreachable, non-200, timeout, not vLLM)."""
    try:
        async with asyncio.timeout(timeout_s):
            response = await client.get(url, timeout=timeout_s)
        if response.status_code != 200:
            return None
        return parse_vllm_metrics(response.content.decode("utf-8", "replace"))
    except Exception:  # a poll must never raise into the poller; CancelledError is a BaseException and passes
        return None
