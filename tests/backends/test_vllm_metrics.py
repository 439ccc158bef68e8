"""The vLLM /metrics parser, on real captured pages (tests/backends/data) and on the format's corner cases."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from backends.vllm_metrics import VLLMLoad, fetch_vllm_load, iter_samples, metrics_url_for, parse_vllm_metrics

DATA = Path(__file__).parent / "data"


def sample(name: str) -> str:
    text = (DATA / name).read_text()
    assert text.startswith("# source: https://github.com/")  # every sample says where it was captured
    return text


# -- real pages --


def test_real_v1_page_with_kv_cache_usage_perc() -> None:
    # vLLM 0.10.0 (V1): engine label, exponent floats, deprecated gpu_prefix_* families around the gauge
    load = parse_vllm_metrics(sample("vllm_metrics_v1_kv_cache.txt"))
    assert load.kv_cache_usage == pytest.approx(9.75010481363281e-06, rel=0, abs=0)
    # this excerpt carries no running/waiting lines: absent gauges read as 0, not as a parse failure
    assert (load.running, load.waiting) == (0.0, 0.0)


def test_real_v1_page_with_the_older_gpu_cache_name() -> None:
    # vLLM 0.7.x (V1) before the rename: gpu_cache_usage_perc, model_name label only, process_* lines first
    assert parse_vllm_metrics(sample("vllm_metrics_v1_gpu_cache.txt")) == VLLMLoad(
        running=0.0, waiting=0.0, kv_cache_usage=0.0
    )


def test_real_v0_page_ignores_swapped_and_cpu_cache() -> None:
    text = sample("vllm_metrics_v0_gpu_cache.txt")
    assert parse_vllm_metrics(text) == VLLMLoad(running=0.0, waiting=0.0, kv_cache_usage=0.0)
    # the info gauge's ten labels parse, values and all
    [(_, labels, value)] = list(iter_samples(text, frozenset({"vllm:cache_config_info"})))
    assert labels["num_gpu_blocks"] == "2048" and labels["swap_space_bytes"] == "0.0" and value == 1.0
    assert len(labels) == 10


def test_real_page_without_samples_is_not_a_load() -> None:
    with pytest.raises(ValueError, match="no vLLM load metrics"):
        parse_vllm_metrics(sample("vllm_metrics_no_samples.txt"))


def test_real_pages_every_sample_line_parses() -> None:
    # nothing in a real page should fall into the skip-malformed path
    for path in DATA.glob("vllm_metrics_*.txt"):
        text = path.read_text()
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
        assert len(list(iter_samples(text))) == len(lines), path.name


def test_real_values_round_trip() -> None:
    samples = {name: value for name, _, value in iter_samples(sample("vllm_metrics_v1_gpu_cache.txt"))}
    assert samples["process_start_time_seconds"] == 1.74262400557e09
    assert samples["process_max_fds"] == 1048576.0
    samples = {name: value for name, _, value in iter_samples(sample("vllm_metrics_v1_kv_cache.txt"))}
    assert samples["vllm:gpu_prefix_cache_hits_created"] == 1.7537953269353123e09
    assert samples["vllm:prefix_cache_queries_total"] == 32.0


# -- the format's corner cases --

MULTI_ENGINE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 4.0
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
vllm:num_requests_waiting{engine="1",model_name="m"} 2.0 1712345678000
vllm:num_requests_waiting_by_reason{engine="0",model_name="m",reason="capacity"} 99.0
vllm:num_requests_running_total 500
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.75
vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.99
vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="m"} 7.0
"""


def test_sums_engines_averages_kv_and_prefers_the_new_kv_name() -> None:
    assert parse_vllm_metrics(MULTI_ENGINE) == VLLMLoad(running=7.0, waiting=3.0, kv_cache_usage=0.5)


def test_labels_with_escaped_quotes_commas_and_braces() -> None:
    text = (
        'vllm:num_requests_running{model_name="a \\"quoted\\", {braced} name",engine="0"} 2\n'
        'vllm:num_requests_running{model_name="back\\\\slash\\nline",} 3\n'
        "vllm:num_requests_waiting 5\n"
    )
    got = list(iter_samples(text))
    assert got[0] == (
        "vllm:num_requests_running",
        {"model_name": 'a "quoted", {braced} name', "engine": "0"},
        2.0,
    )
    assert got[1][1] == {"model_name": "back\\slash\nline"}
    assert got[2] == ("vllm:num_requests_waiting", {}, 5.0)
    assert parse_vllm_metrics(text) == VLLMLoad(running=5.0, waiting=5.0, kv_cache_usage=None)


def test_nan_and_inf_are_unknown_and_junk_lines_are_skipped() -> None:
    text = """\
# a comment, then a blank line

vllm:num_requests_running{engine="0"} NaN
vllm:num_requests_running{engine="1"} 4
vllm:num_requests_waiting{engine="0"} +Inf
vllm:num_requests_waiting{engine="1"} 1e0
vllm:kv_cache_usage_perc{engine="0"} -Inf
vllm:kv_cache_usage_perc{engine="1"} 0.5
vllm:num_requests_running{engine="2" 9
vllm:num_requests_running{engine=unquoted} 9
vllm:num_requests_running
vllm:num_requests_waiting{engine="2"} not-a-number
bogus line
# EOF
"""
    assert parse_vllm_metrics(text) == VLLMLoad(running=4.0, waiting=1.0, kv_cache_usage=0.5)
    values = [v for _, _, v in iter_samples(text)]
    assert math.isnan(values[0]) and values[2] == math.inf


def test_kv_usage_is_clamped_to_a_fraction_and_counts_not_negative() -> None:
    text = "vllm:kv_cache_usage_perc 1.5\nvllm:num_requests_running -2\n"
    assert parse_vllm_metrics(text) == VLLMLoad(running=0.0, waiting=0.0, kv_cache_usage=1.0)


def test_not_vllm_at_all() -> None:
    with pytest.raises(ValueError):
        parse_vllm_metrics("# HELP up x\nup 1\n")
    with pytest.raises(ValueError):
        parse_vllm_metrics("")


def test_metrics_url_for() -> None:
    assert metrics_url_for("http://h:8000/v1") == "http://h:8000/metrics"
    assert metrics_url_for("http://h:8000/v1/") == "http://h:8000/metrics"
    assert metrics_url_for("https://h/vllm/v1") == "https://h/vllm/metrics"
    assert metrics_url_for("http://h:8000") == "http://h:8000/metrics"


# -- fetching --


async def test_fetch_vllm_load_against_a_local_server(unused_tcp_port: int) -> None:
    release = asyncio.Event()

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=MULTI_ENGINE, content_type="text/plain")

    async def broken(_: web.Request) -> web.Response:
        return web.Response(status=500, text=MULTI_ENGINE)

    async def empty(_: web.Request) -> web.Response:
        return web.Response(text=sample("vllm_metrics_no_samples.txt"))

    async def hang(_: web.Request) -> web.Response:
        await release.wait()  # never set: the client's timeout must end it
        return web.Response(text=MULTI_ENGINE)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/broken", broken)
    app.router.add_get("/empty", empty)
    app.router.add_get("/hang", hang)
    runner = web.AppRunner(app, shutdown_timeout=0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    base = f"http://127.0.0.1:{unused_tcp_port}"
    try:
        async with httpx.AsyncClient() as client:
            assert await fetch_vllm_load(client, base + "/metrics", 5.0) == VLLMLoad(7.0, 3.0, 0.5)
            assert await fetch_vllm_load(client, base + "/broken", 5.0) is None
            assert await fetch_vllm_load(client, base + "/empty", 5.0) is None
            assert await fetch_vllm_load(client, base + "/missing", 5.0) is None
            assert await fetch_vllm_load(client, base + "/hang", 0.2) is None
            release.set()
    finally:
        await runner.cleanup()


async def test_fetch_vllm_load_unreachable(unused_tcp_port: int) -> None:
    async with httpx.AsyncClient() as client:
        assert await fetch_vllm_load(client, f"http://127.0.0.1:{unused_tcp_port}/metrics", 2.0) is None
        assert await fetch_vllm_load(client, "http://no-such-host.invalid/metrics", 2.0) is None
