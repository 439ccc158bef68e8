"""Local models' lifecycle on a live gateway: eviction under a memory budget, 503 when nothing fits, admin load
and unload, idle unloading, /v1/models' `pointsman` object, and config reloads that keep a running stream."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import httpx
import pytest

from backends.model_loader import estimate_bytes
from config.schema import TransformersModel
from tests.conftest import start_gateway, wait_until
from tests.tiny_model import build_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model(folder)
    return folder


def _models(tiny: Path, names: list[str], extra: str = "") -> str:
    return "".join(f"  - {{id: {n}, backend: transformers, source: '{tiny}', load: lazy, threads: 1{extra}}}\n"
                   for n in names)


def _budget_gb(tiny: Path, models: float) -> float:
    """A memory budget that holds `models` of the tiny model's estimated footprint."""
    return models * estimate_bytes(TransformersModel(id="t", source=str(tiny))) / 2**30


def _status(url: str) -> dict[str, str]:
    cards = httpx.get(url + "/v1/models").json()["data"]
    return {card["id"]: card["pointsman"]["status"] for card in cards}


def _chat(url: str, model: str, **extra) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=60)


def test_loading_a_model_that_does_not_fit_evicts_the_least_recently_used_idle_one(tiny, tmp_path):
    models = _models(tiny, ["tiny-a", "tiny-b", "tiny-c"])
    config = f"models:\n{models}engines: {{memory_budget_gb: {_budget_gb(tiny, 2.5)}}}\n"
    gateway = start_gateway(tmp_path, config)
    try:
        assert set(_status(gateway.url).values()) == {"unloaded"}  # lazy: nothing loaded before use
        for name in ("tiny-a", "tiny-b"):
            assert _chat(gateway.url, name).status_code == 200
        assert _status(gateway.url) == {"tiny-a": "loaded", "tiny-b": "loaded", "tiny-c": "unloaded"}
        assert _chat(gateway.url, "tiny-a").status_code == 200  # a used again: b is now the least recent
        assert _chat(gateway.url, "tiny-c").status_code == 200
        assert _status(gateway.url) == {"tiny-a": "loaded", "tiny-b": "unloaded", "tiny-c": "loaded"}
        card = httpx.get(gateway.url + "/v1/models/tiny-c").json()
        assert card["object"] == "model" and card["owned_by"] == "pointsman"
        about = card["pointsman"]
        assert about["backend"] == "transformers" and about["memory_estimate_bytes"] > 0
        assert about["load_s"] is not None and about["queue_length"] == 0 and about["queue_wait_s"] is not None
    finally:
        gateway.stop()


def test_a_model_larger_than_the_budget_is_refused_with_503(tiny, tmp_path):
    config = f"models:\n{_models(tiny, ['tiny-a'])}engines: {{memory_budget_gb: {_budget_gb(tiny, 0.5)}}}\n"
    gateway = start_gateway(tmp_path, config)
    try:
        response = _chat(gateway.url, "tiny-a")
        assert response.status_code == 503
        error = response.json()["error"]
        assert error["code"] == "insufficient_memory" and "memory_budget_gb" in error["message"]
        assert _status(gateway.url) == {"tiny-a": "unloaded"}
    finally:
        gateway.stop()


def test_admin_load_unload_idle_unloading_and_reloads_while_a_stream_runs(tiny, tmp_path):
    """One gateway (each start costs a process with torch) for three phases in turn: admin load and unload with idle
    unloading; a reload with a bad config that changes nothing; a reload that adds and removes models while a
    stream runs. Each phase starts from the config the gateway started with, its models loaded on demand."""
    config = (f"models:\n{_models(tiny, ['tiny-a'])}"
              f"  - {{id: tiny-idle, backend: transformers, source: '{tiny}', load: lazy, idle_unload_s: 0.3}}\n")
    gateway = start_gateway(tmp_path, config)
    path: Path = gateway.extra["config"]
    good = path.read_text()
    try:
        loaded = httpx.post(gateway.url + "/admin/models/tiny-a/load", timeout=60)
        assert loaded.status_code == 200 and loaded.json()["pointsman"]["status"] == "loaded"
        unloaded = httpx.post(gateway.url + "/admin/models/tiny-a/unload", timeout=60)
        assert unloaded.status_code == 200 and unloaded.json()["pointsman"]["status"] == "unloaded"
        assert httpx.post(gateway.url + "/admin/models/nope/load").status_code == 404
        assert _chat(gateway.url, "tiny-idle").status_code == 200
        wait_until(lambda: _status(gateway.url)["tiny-idle"] == "unloaded", gateway.proc, gateway.log, 10)
        assert _chat(gateway.url, "tiny-idle").status_code == 200  # loads again on demand

        path.write_text("models: []\n")
        response = httpx.post(gateway.url + "/admin/reload", timeout=30)
        assert response.status_code == 400 and "nothing changed" in response.json()["error"]["message"]
        assert _chat(gateway.url, "tiny-a").status_code == 200
        path.write_text(good)
        events: list[dict] = []
        started = threading.Event()

        def stream() -> None:
            body = {"model": "tiny-a", "stream": True, "max_tokens": 200, "temperature": 1.0,
                    "messages": [{"role": "user", "content": "tell me a long story"}]}
            with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        events.append(json.loads(line[6:]))
                        started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(30)
        # tiny-a is removed and tiny-b added while tiny-a's stream runs: the stream finishes all the same
        path.write_text(path.read_text().replace("id: tiny-a", "id: tiny-b"))
        summary = httpx.post(gateway.url + "/admin/reload", timeout=30).json()
        assert (summary["added"], summary["removed"]) == (["tiny-b"], ["tiny-a"])
        reader.join(60)
        assert events and events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        assert _chat(gateway.url, "tiny-b").status_code == 200
        assert _chat(gateway.url, "tiny-a").status_code == 404
        # SIGHUP reloads too
        path.write_text(path.read_text().replace("id: tiny-b", "id: tiny-c"))
        os.kill(gateway.proc.pid, signal.SIGHUP)
        wait_until(lambda: "tiny-c" in _status(gateway.url), gateway.proc, gateway.log, 10)
        assert _chat(gateway.url, "tiny-c").status_code == 200
    finally:
        gateway.stop()

