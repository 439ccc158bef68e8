"""Config reloads on a live gateway under load: plain and streamed requests in flight while a reload adds a
model, removes one, moves one to another upstream, moves an alias and changes routing settings; none fails.
Then: removed models are 404 model_not_found, /v1/models and a restricted key's models follow at once, versions
keep their stages, a broken file is a 400 in one line that changes nothing, and what waits for a restart is
said in the answer and the log (SIGHUP too)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Awaitable, Callable

import httpx
import pytest

from tests.conftest import Process, start_gateway, start_upstream, wait_until

ADMIN = "reload-admin-" + uuid.uuid4().hex
ASKED = {"authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory):
    """one: most models; two: ver's 2.0.0; three: `gone`, then `moved` (so its counts tell who reached it)."""
    tmp = tmp_path_factory.mktemp("reload-upstreams")
    started = [start_upstream(tmp, name) for name in ("one", "two", "three")]
    yield started
    for upstream in started:
        upstream.stop()


def _config(upstreams, *, after: bool = False, extra: str = "") -> str:
    """The config before the reload, or after it (`after`): new-one added, gone removed, moved from upstream one
    to three, the alias `al` from keep to other, a version 3.0.0 added, routing settings changed."""
    one, two, three = upstreams
    moved = three.url if after else one.url
    keep_alias, other_alias = ("", ", aliases: [al]") if after else (", aliases: [al]", "")
    models = f"""
models:
  - {{id: keep, backend: openai, base_url: "{one.url}", upstream_model: one{keep_alias}}}
  - {{id: other, backend: openai, base_url: "{one.url}", upstream_model: one{other_alias}}}
  - {{id: moved, backend: openai, base_url: "{moved}", upstream_model: moved}}
  - id: ver
    backend: openai
    base_url: "{one.url}"
    upstream_model: one
    versions:
      - {{version: 1.0.0, stage: production}}
      - {{version: 2.0.0, stage: staging, base_url: "{two.url}", upstream_model: two}}
"""
    if after:
        models += f"""      - {{version: 3.0.0, stage: dev}}
  - {{id: new-one, backend: openai, base_url: "{one.url}", upstream_model: one}}
routing: {{health_check_s: 0, retries: 1, load_balancing: round_robin}}
"""
    else:
        models += f"""  - {{id: gone, backend: openai, base_url: "{three.url}", upstream_model: gone}}
routing: {{health_check_s: 0}}
"""
    return models + extra


class Client:
    """The gateway's routes as the tests call them, with the admin key unless told otherwise."""

    def __init__(self, gateway: Process, http: httpx.AsyncClient) -> None:
        self.url, self.http = gateway.url, http

    async def chat(self, model: str, prompt: str = "hi", *, stream: bool = False, key: str = ADMIN
                   ) -> tuple[int, str]:
        """(status, the body; a stream's whole text, ending with its [DONE] line)."""
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": stream}
        headers = {"authorization": f"Bearer {key}"}
        async with self.http.stream("POST", self.url + "/v1/chat/completions", json=body, headers=headers) as answer:
            return answer.status_code, (await answer.aread()).decode()

    async def models(self, key: str = ADMIN) -> list[str]:
        answer = await self.http.get(self.url + "/v1/models", headers={"authorization": f"Bearer {key}"})
        return [card["id"] for card in answer.json()["data"]]

    async def reload(self) -> httpx.Response:
        return await self.http.post(self.url + "/admin/reload", headers=ASKED)

    async def stats(self, upstream: Process) -> dict:
        """The mock upstream's counts: requests so far, and `active` (being answered now)."""
        return (await self.http.get(upstream.url.removesuffix("/v1") + "/stats")).json()


async def _until(condition: Callable[[], Awaitable[bool]], gateway: Process, timeout: float = 30.0) -> None:
    """Poll `condition` (the event loop runs on meanwhile) until it holds; a wait on a condition, never a sleep."""
    deadline = time.monotonic() + timeout
    while not await condition():
        assert gateway.proc.poll() is None, gateway.output()
        assert time.monotonic() < deadline, f"timed out:\n{gateway.output()[-3000:]}"
        await asyncio.sleep(0.05)


def _served(status: int, text: str, stream: bool) -> bool:
    return status == 200 and (not stream or text.rstrip().endswith("data: [DONE]"))


async def test_a_reload_under_load_fails_no_request_and_is_seen_at_once(upstreams, tmp_path):
    three = upstreams[2]
    gateway = start_gateway(tmp_path, _config(upstreams), env={"POINTSMAN_ADMIN_KEY": ADMIN})
    path = gateway.extra["config"]
    storage = path.read_text().partition("\nstorage:")[2]  # start_gateway's own database: kept in every version

    def write(text: str) -> None:
        path.write_text(text + "\nstorage:" + storage)

    tasks: list[asyncio.Task] = []  # cancelled if the test fails halfway: none outlives the gateway
    try:
        async with httpx.AsyncClient(timeout=60) as http:
            client = Client(gateway, http)
            created = await http.post(gateway.url + "/admin/keys", headers=ASKED,
                                      json={"models": ["keep", "ver", "new-*"]})
            restricted = created.json()["key"]
            promoted = await http.post(gateway.url + "/admin/models/ver/versions/2.0.0/stage", headers=ASKED,
                                       json={"stage": "production"})
            assert promoted.status_code == 200, promoted.text

            # steady load on the models that stay (plain and streamed, an alias and a chain among them)
            done: list[tuple[str, bool, int, str]] = []
            stop = asyncio.Event()

            async def load(model: str, stream: bool) -> None:
                while not stop.is_set():
                    prompt = "gap:0.01 a b c d e" if stream else "sleep:0.02 hello"
                    done.append((model, stream, *(await client.chat(model, prompt, stream=stream))))

            loaders = [asyncio.create_task(load(model, stream)) for model in ("keep", "ver", "al", "other:keep")
                       for stream in (False, True)]
            # in flight on the model the reload removes: a stream waiting for its first payload, a plain request,
            # a stream halfway through
            words = " ".join(f"w{i}" for i in range(25))
            on_gone = [(stream, asyncio.create_task(client.chat("gone", prompt, stream=stream)))
                       for stream, prompt in [(True, "sleep:4 first"), (False, "sleep:4 plain"),
                                              (True, f"gap:0.2 {words}")]]
            tasks += [*loaders, *(request for _, request in on_gone)]

            async def all_in_flight() -> bool:
                return (await client.stats(three))["active"] == 3 and len(done) >= 8

            await _until(all_in_flight, gateway)
            before = len(done)

            write(_config(upstreams, after=True))
            reloaded = await client.reload()
            assert reloaded.status_code == 200, reloaded.text
            assert (await client.stats(three))["active"] == 3  # the reload landed while all three were in flight
            summary = reloaded.json()
            assert (summary["added"], summary["removed"]) == (["ver@3.0.0", "new-one"], ["gone"])
            assert {"keep", "moved", "other"} <= set(summary["changed"])  # routing changed: every model renewed
            assert summary["restart_required"] == []
            # seen at once: the model list, a restricted key's list, the removed model's 404
            assert await client.models() == ["keep", "other", "moved", "ver", "new-one"]
            assert await client.models(restricted) == ["keep", "ver", "new-one"]
            status, text = await client.chat("gone")
            error = httpx.Response(status, content=text).json()["error"]
            assert status == 404 and (error["type"], error["param"], error["code"]) == (
                "invalid_request_error", "model", "model_not_found")
            status, text = await client.chat("gone", key=restricted)
            assert status == 404 and "other" not in text and "moved" not in text  # only its models named
            assert (await client.chat("new-one", key=restricted))[0] == 200
            assert (await client.chat("al", key=restricted))[0] == 403  # the alias now names `other`
            assert (await client.chat("other", key=restricted))[0] == 403
            # moved now reaches upstream three, which nothing else calls any more
            three_before = (await client.stats(three))["requests"]
            assert (await client.chat("moved"))[0] == 200
            assert (await client.stats(three))["requests"] == three_before + 1
            # versions: 2.0.0 stays in production (promoted, not the file's stage), 3.0.0 arrives in dev
            route = await http.post(gateway.url + "/v1/route", json={"model": "ver", "prompt": "hi"}, headers=ASKED)
            assert route.json()["model"] == "ver@2.0.0"
            versions = (await http.get(gateway.url + "/admin/models/ver/versions", headers=ASKED)).json()
            assert {v["version"]: v["stage"] for v in versions["data"]} == {
                "1.0.0": "deprecated", "2.0.0": "production", "3.0.0": "dev"}

            for stream, request in on_gone:  # none failed, the stream waiting for its first payload included
                status, text = await request
                assert _served(status, text, stream), (status, text[-300:])

            async def went_on() -> bool:  # the load went on after the reload
                return len(done) >= before + 16

            await _until(went_on, gateway)
            stop.set()
            await asyncio.gather(*loaders)
            failed = [(model, stream, status, text[-200:]) for model, stream, status, text in done
                      if not _served(status, text, stream)]
            assert not failed and len(done) > before
    finally:
        for task in tasks:
            task.cancel()
        gateway.stop()
    assert "Traceback" not in gateway.output()


async def test_a_broken_file_is_one_400_line_and_what_waits_for_a_restart_is_said(upstreams, tmp_path):
    gateway = start_gateway(tmp_path, _config(upstreams), env={"POINTSMAN_ADMIN_KEY": ADMIN})
    path = gateway.extra["config"]
    good = path.read_text()
    try:
        async with httpx.AsyncClient(timeout=60) as http:
            client = Client(gateway, http)
            served = await client.models()
            tls = ("\n  - {id: tls, backend: openai, base_url: 'https://127.0.0.1:9/v1',"
                   " tls: {ca_bundle: /nonexistent.pem}}")
            for broken, named in [
                ("models: [\n", "invalid YAML"),
                ("models: []\n", "$.models"),
                # a valid file whose backend cannot be built (the CA bundle is not there); it also removes `keep`
                (good.replace("  - {id: keep,", "  - {id: kept,").replace("\nmodels:", "\nmodels:" + tls, 1),
                 "'tls'"),
            ]:
                path.write_text(broken)
                refused = await client.reload()
                error = refused.json()["error"]
                assert refused.status_code == 400 and error["type"] == "invalid_request_error", refused.text
                assert "nothing changed" in error["message"] and named in error["message"]
                assert "\n" not in error["message"]
                assert await client.models() == served and (await client.chat("keep"))[0] == 200
            # a lower budget and the request log: applied only by a restart, and said so
            path.write_text(good.replace("\nstorage:", "\npolicies: {budgets: [{scope: global, max_tokens: 1}]}"
                                         "\nstorage:"))
            answer = (await client.reload()).json()
            assert answer["restart_required"] == ["policies"] and answer["removed"] == []
            wait_until(lambda: "policies changed but not applied" in gateway.output(), gateway.proc, gateway.log, 10)
            assert (await client.chat("keep"))[0] == 200  # the budget of 1 token is not in force
            # SIGHUP reloads the same way, and warns the same way
            path.write_text(good.replace("\nstorage:", "\nlogging: {requests: true}\nstorage:"))
            os.kill(gateway.proc.pid, signal.SIGHUP)
            wait_until(lambda: "logging changed but not applied" in gateway.output(), gateway.proc, gateway.log, 10)
    finally:
        gateway.stop()
