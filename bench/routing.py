"""Routing: decision latency (classifier included), load-balancer fairness, failover under load; RESULTS.md."""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import aiohttp  # noqa: E402
import msgspec  # noqa: E402
from report import stamp, write_section  # noqa: E402

from config.loader import parse_config  # noqa: E402
from gateway.deployments import DeploymentPool  # noqa: E402
from gateway.service import Gateway  # noqa: E402
from protocol.openai import ChatCompletionRequest, decode_request  # noqa: E402
from routing.balancer import STRATEGIES  # noqa: E402
from routing.live import DeploymentState  # noqa: E402
from tests.conftest import start_gateway, start_upstream  # noqa: E402

SECTION = "## Routing"
TARGET_P99_MS = 2.0
MODELS = """
models:
  - {id: coder, backend: openai, base_url: "http://127.0.0.1:9/v1", quality: 0.8,
     capabilities: {code: 0.95, reasoning: 0.7, chat: 0.4}, pricing: {input_per_mtok: 0.5, output_per_mtok: 1.5},
     context_window: 8192}
  - {id: chatty, backend: openai, base_url: "http://127.0.0.1:9/v1", quality: 0.5,
     capabilities: {chat: 0.9, creative: 0.8}, pricing: {input_per_mtok: 0.1, output_per_mtok: 0.2}}
  - {id: thinker, backend: openai, base_url: "http://127.0.0.1:9/v1", quality: 0.95,
     capabilities: {reasoning: 0.95, qa: 0.9}, pricing: {input_per_mtok: 3, output_per_mtok: 12}}
  - {id: small, backend: openai, base_url: "http://127.0.0.1:9/v1", quality: 0.2}
"""
PARAGRAPH = ("Transformers is a library of pretrained models. The gateway routes each prompt to the model "
             "that fits it best, weighing quality, cost, latency and load, and explains its choice. ")


def _request(model: str, words: int) -> object:
    text = (PARAGRAPH * (words // len(PARAGRAPH.split()) + 1)).split()[:words]
    content = " ".join(text) + "\n\nSummarize the text above in two sentences."
    body = {"model": model, "messages": [{"role": "user", "content": content}]}
    return decode_request(msgspec.json.encode(body), ChatCompletionRequest)


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[int(len(ordered) * 0.99) - 1]


async def decision_latency(iterations: int) -> list[str]:
    gateway = Gateway(parse_config(MODELS))
    rows = ["| model field | prompt | p50 | p99 | task |", "|---|---:|---:|---:|---|"]
    for model in ("small", "auto", "coder:auto"):
        for words in (40, 375, 1500):  # ~50, ~500, ~2,000 tokens
            request = _request(model, words)
            for _ in range(50):
                await gateway.decide(request)
            samples = []
            gc.disable()
            for _ in range(iterations):
                start = time.perf_counter_ns()
                decision = await gateway.decide(request)
                samples.append((time.perf_counter_ns() - start) / 1e6)
            gc.enable()
            p50, p99 = _percentiles(samples)
            task = decision.analysis.task if decision.analysis else "-"
            tokens = decision.analysis.tokens if decision.analysis else f"~{words * 4 // 3}"
            rows.append(f"| `{model}` | {tokens} tokens | {p50:.3f} ms | {p99:.3f} ms | {task} |")
            print(rows[-1])
    await gateway.aclose()
    return rows


async def _simulate(pool: DeploymentPool, requests: int, concurrency: int, service: tuple[float, ...]):
    rng = random.Random(1)
    counts = [0] * len(service)
    latencies: list[float] = []
    queue = iter(range(requests))

    async def worker() -> None:
        for _ in queue:
            index = pool.targets(rng)[0]
            state: DeploymentState = pool.states[index]
            started = state.begin()
            await asyncio.sleep(service[index])
            state.end(started, ok=True)
            counts[index] += 1
            latencies.append(time.monotonic() - started)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return counts, latencies


class _ThreeDeployments:
    deployments = [("d1", 1.0), ("d2", 1.0), ("d3", 2.0)]


async def fairness(requests: int, concurrency: int) -> list[str]:
    """Each strategy over 3 simulated deployments (weights 1, 1, 2; service times 2, 2, 6 ms)."""
    service = (0.002, 0.002, 0.006)
    config = parse_config(MODELS)
    rows = ["| strategy | share d1 / d2 / d3 | mean latency | p99 latency |", "|---|---|---:|---:|"]
    for name in STRATEGIES:
        model = msgspec.structs.replace(config.models[0], load_balancing=name)
        pool = DeploymentPool(model, _ThreeDeployments(), config)
        counts, latencies = await _simulate(pool, requests, concurrency, service)
        share = " / ".join(f"{c / requests:.0%}" for c in counts)
        mean, p99 = statistics.mean(latencies) * 1e3, _percentiles(latencies)[1] * 1e3
        rows.append(f"| {name} | {share} | {mean:.1f} ms | {p99:.1f} ms |")
        print(rows[-1])
    return rows


async def _load(url: str, seconds: float, concurrency: int, kill_at: float, victim) -> dict:
    statuses: list[int] = []
    latencies: list[tuple[float, float]] = []
    body = {"model": "pair", "messages": [{"role": "user", "content": "fixed"}]}
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as session:
        async def worker() -> None:
            while (start := time.monotonic()) - t0 < seconds:
                async with session.post(url + "/v1/chat/completions", json=body) as response:
                    await response.read()
                    statuses.append(response.status)
                latencies.append((start - t0, time.monotonic() - start))

        async def killer() -> None:
            await asyncio.sleep(kill_at)
            victim.proc.kill()

        await asyncio.gather(killer(), *(worker() for _ in range(concurrency)))
    return {"statuses": statuses, "latencies": latencies, "elapsed": time.monotonic() - t0}


def _p99_ms(samples: list[float]) -> str:
    return f"{_percentiles(samples)[1] * 1e3:.1f} ms" if samples else "-"


def failover(tmp: Path, seconds: float = 4.0, kill_at: float = 1.5) -> list[str]:
    a, b = start_upstream(tmp, "a"), start_upstream(tmp, "b")
    config = f"""
routing: {{retries: 2, health_check_s: 1, circuit_breaker: {{failures: 3, cooldown_s: 10}}}}
models:
  - id: pair
    backend: openai
    base_url: {a.url}
    deployments: [{{base_url: "{a.url}"}}, {{base_url: "{b.url}"}}]
"""
    gateway = start_gateway(tmp, config, env={"POINTSMAN_LOG_LEVEL": "ERROR"})
    try:
        result = asyncio.run(_load(gateway.url, seconds, 8, kill_at, b))
    finally:
        gateway.stop()
        a.stop()
        b.stop()
    lat = result["latencies"]
    failed = sum(1 for s in result["statuses"] if s != 200)
    before = [x for at, x in lat if at < kill_at]
    around = [x for at, x in lat if kill_at <= at < kill_at + 0.2]
    after = [x for at, x in lat if at >= kill_at + 0.5]
    rows = [
        "| requests | failed | RPS | p99 before the kill | p99 in the 200 ms after | p99 from 0.5 s after |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {len(result['statuses']):,} | {failed} | {len(result['statuses']) / result['elapsed']:,.0f} "
        f"| {_p99_ms(before)} | {_p99_ms(around)} | {_p99_ms(after)} |",
    ]
    print(rows[-1])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    latency_rows = asyncio.run(decision_latency(args.iterations))
    fairness_rows = asyncio.run(fairness(3000, 16))
    with tempfile.TemporaryDirectory() as tmp:
        failover_rows = failover(Path(tmp))
    body = [
        stamp(),
        "",
        f"### Decision latency (target: p99 under {TARGET_P99_MS:g} ms, classifier included)",
        "",
        "`Gateway.decide()` on 4 configured models: parse the `model` field, classify the prompt (for `auto`), score",
        "and order the candidates. Prompts above 2,000 characters are classified in a worker thread, so their",
        "figures include the thread hop.",
        "",
        *latency_rows,
        "",
        "### Load-balancer fairness",
        "",
        "3,000 requests at concurrency 16 over three simulated deployments: weights 1 / 1 / 2, service times",
        "2 / 2 / 6 ms (d3 is heavier but slower). A good strategy sends less to the slow one and keeps latency low.",
        "",
        *fairness_rows,
        "",
        "### Failover under load",
        "",
        "Two real upstream processes behind one model (least_outstanding); one is killed (SIGKILL) 1.5 s into a",
        "4 s run at concurrency 8. Non-streaming requests are retried on the other deployment before the first byte;",
        "after 3 failures the dead one's breaker opens and it is skipped.",
        "",
        *failover_rows,
    ]
    if not args.no_write:
        write_section(SECTION, body)
        print(f"wrote the '{SECTION}' section of bench/RESULTS.md")


if __name__ == "__main__":
    main()
