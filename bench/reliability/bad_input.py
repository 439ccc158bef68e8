"""Bad input, counted: fuzzed bodies on the three wire formats, schemathesis, 413 over server.max_body_mb, a slow
client beside normal ones, and every broken-upstream case; against one gateway this section starts itself (the
checks of tests/e2e/test_bad_input.py and tests/e2e/test_broken_upstream.py, run as measurements)."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from bench.reliability.figures import Figure
from tests.conftest import Process, start_gateway
from tests.e2e.raw_upstream import CASES, RawUpstream
from tests.e2e.test_bad_input import (
    BODIES,
    BODY_ROUTES,
    MAX_BODY_MB,
    MODEL,
    ROUTES,
    check_answer,
    check_error,
    post,
    slow_request,
)
from tests.e2e.test_broken_upstream import broken_config, chat, check_chat_stream, check_http_error
from tests.gateway.wire_bodies import body_bytes, raw_bytes

__all__ = ["run"]

SECTION = "bad input"
_OVERSIZED = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"a" * int(MAX_BODY_MB * 2**20) + b'"}]}'


def _quietly(check: Callable[[], object]) -> bool:
    try:
        check()
    except (AssertionError, ValueError, KeyError, IndexError):  # a failed check, or a body that is not the shape
        return False
    return True


def _fuzz(gateway: Process, fmt: str, examples: int) -> tuple[Counter, int, int]:
    """Hypothesis bodies (near-valid and raw) to `fmt`'s route: the statuses, the 5xx, the answers off-shape."""
    statuses: Counter = Counter()
    bad = [0, 0]
    strategy = body_bytes(fmt, MODEL)

    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(data=st.one_of(strategy, strategy, raw_bytes(fmt, MODEL)))
    def send(data: bytes) -> None:
        response = post(gateway, ROUTES[fmt], data)
        statuses[response.status_code] += 1
        bad[0] += response.status_code >= 500
        bad[1] += not _quietly(lambda: check_answer(fmt, response))

    send()
    return statuses, bad[0], bad[1]


def _schemathesis(gateway: Process, examples: int) -> tuple[int, int]:
    """Every documented operation, bodies that fit its schema and bodies that don't: (cases, 5xx)."""
    import schemathesis
    from schemathesis.generation.modes import GenerationMode

    schema = schemathesis.openapi.from_url(gateway.url + "/openapi/openapi.json")
    cases, failed = [0], [0]
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if mode == GenerationMode.NEGATIVE and not (operation.method.upper() == "POST" and operation.body):
                continue  # only a request body can be made invalid

            @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def call(case) -> None:
                cases[0] += 1
                failed[0] += case.call(timeout=30).status_code >= 500

            call()
    return cases[0], failed[0]


def _too_large(gateway: Process, path: str, chunked: bool) -> None:
    """A body over the limit, sized or chunked, is 413 in the route's shape (asserted)."""
    body = _OVERSIZED
    content = iter([body[i:i + 8192] for i in range(0, len(body), 8192)]) if chunked else body
    response = post(gateway, path, content)
    assert response.status_code == 413
    shape = BODY_ROUTES[path]
    error = check_error(shape, response)
    if shape == "anthropic":
        assert error["type"] == "request_too_large"
    else:
        assert error["code"] == "request_too_large"


def _slow_client(gateway: Process, path: str) -> tuple[int, int, bool]:
    """Normal requests on every format while one client sends its body to `path` a byte a second: (answered,
    sent, the slow one answered too)."""
    dribbling, others_done = threading.Event(), threading.Event()
    result: list[bytes] = []
    slow = threading.Thread(target=lambda: result.append(slow_request(
        ("127.0.0.1", gateway.port), path, json.dumps(BODIES[path]).encode(), dribbling, others_done)))
    slow.start()
    answered = 0
    try:
        dribbling.wait(30)
        for other, body in BODIES.items():
            answered += post(gateway, other, json.dumps(body).encode(), timeout=30).status_code == 200
    finally:
        others_done.set()
        slow.join(120)
    return answered, len(BODIES), bool(result) and result[0].startswith(b"HTTP/1.1 200 ")


def _outcome(gateway: Process, name: str, stream: bool) -> tuple[str, bool]:
    """What a broken case made of one request: its status ("200+error event" for a stream that broke after it
    started), whether its checks passed (shape, no internal error), and /health after it."""
    response = httpx.post(gateway.url + "/v1/chat/completions", json=chat(name, stream), timeout=60)
    expected = CASES[name].stream_status if stream else CASES[name].status
    if response.status_code == 200 and stream:
        shown, check = "200+error event", lambda: check_chat_stream(response)
    else:
        shown, check = str(response.status_code), lambda: check_http_error(response, expected)
    errors: list[dict] = []
    passed = _quietly(lambda: errors.append(check())) and errors[0]["code"] != "internal_error"
    healthy = _quietly(lambda: httpx.get(gateway.url + "/health", timeout=10).raise_for_status())
    return shown, passed and healthy


def _shown(status: int) -> str:
    return "200+error event" if status == 200 else str(status)


def run(workdir: Path, *, quick: bool) -> list[Figure]:
    figures: list[Figure] = []
    where = workdir / "bad_input"
    where.mkdir(parents=True, exist_ok=True)
    with RawUpstream() as raw:
        config = f"server: {{max_body_mb: {MAX_BODY_MB}}}\n" + broken_config(raw.url, (MODEL,))
        gateway = start_gateway(where, config)
        try:
            for fmt, path in ROUTES.items():
                statuses, failed, off_shape = _fuzz(gateway, fmt, 15 if quick else 300)
                sent = sum(statuses.values())
                figures.append(Figure(SECTION, f"fuzzed bodies to {path}: 5xx", f"{failed} of {sent}", "0",
                                      failed == 0))
                figures.append(Figure(SECTION, f"fuzzed bodies to {path}: answers not in the format's shape",
                                      f"{off_shape} of {sent}", "0", off_shape == 0))
                figures.append(Figure(SECTION, f"fuzzed bodies to {path}: statuses",
                                      ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items()))))
            if quick:
                figures.append(Figure(SECTION, "schemathesis on the OpenAPI document: 5xx",
                                      "left out of --quick (tests/gateway/test_openapi.py runs it)"))
            else:
                cases, failed = _schemathesis(gateway, 10)
                figures.append(Figure(SECTION, "schemathesis on the OpenAPI document: 5xx", f"{failed} of {cases}",
                                      "0", failed == 0))
            checks = [(path, chunked) for path in BODY_ROUTES for chunked in (False, True)]
            right = sum(_quietly(lambda p=p, c=c: _too_large(gateway, p, c)) for p, c in checks)
            figures.append(Figure(SECTION, f"bodies over server.max_body_mb ({MAX_BODY_MB} MiB), sized and chunked, "
                                  "answered 413 in the route's shape", f"{right} of {len(checks)}", "all",
                                  right == len(checks)))
            for path in list(BODIES)[:1] if quick else BODIES:
                answered, sent, slow_ok = _slow_client(gateway, path)
                figures.append(Figure(SECTION, f"requests answered while a client sent its body to {path} a byte "
                                      "a second", f"{answered} of {sent}", "all", answered == sent))
                figures.append(Figure(SECTION, "the slow client's own request answered", "yes" if slow_ok else "no",
                                      "yes", slow_ok))
            runs = [(name, stream) for name in CASES for stream in (False, True)]
            with ThreadPoolExecutor(8) as pool:  # the stalling cases wait out their timeout side by side
                outcomes = dict(zip(runs, pool.map(lambda r: _outcome(gateway, *r), runs), strict=True))
            for name, case in CASES.items():
                (plain, plain_ok), (streamed, streamed_ok) = outcomes[name, False], outcomes[name, True]
                target = f"{case.status} / {_shown(case.stream_status)}"
                figures.append(Figure(SECTION, f"broken upstream, {name}: plain / streamed", f"{plain} / {streamed}",
                                      target, plain_ok and streamed_ok and f"{plain} / {streamed}" == target))
            log = gateway.output()
            up = (gateway.proc.poll() is None and _quietly(
                lambda: httpx.get(gateway.url + "/health", timeout=10).raise_for_status())
                  and "unhandled error" not in log and "stream failed" not in log)
            figures.append(Figure(SECTION, "gateway up after all, no unhandled error logged", "yes" if up else "no",
                                  "yes", up))
        finally:
            gateway.stop()
    return figures
