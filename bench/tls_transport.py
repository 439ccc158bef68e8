"""HTTPS client choice: httpx vs aiohttp (and http1.py over TLS, for scale) against a local TLS upstream.

Run: .venv/bin/python bench/tls_transport.py [--seconds 4] [--concurrency 16]
The upstream (uvicorn + httptools + uvloop, a trustme certificate) answers a small JSON POST from memory in a
separate process; each client sends the same POST from `concurrency` loops over as many pooled connections.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":8}'
ANSWER = (b'{"id":"c1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,'
          b'"message":{"role":"assistant","content":"Hello there."},"finish_reason":"stop"}],'
          b'"usage":{"prompt_tokens":3,"completion_tokens":3,"total_tokens":6}}')


async def app(scope, receive, send) -> None:  # the upstream: a raw ASGI app, so the server is the only cost
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"x-ratelimit-remaining-requests", b"99")]})
    await send({"type": "http.response.body", "body": ANSWER})


def serve(port: int, cert: str, key: str) -> None:
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=port, ssl_certfile=cert, ssl_keyfile=key, loop="uvloop",
                http="httptools", log_level="warning", access_log=False)


async def drive(call: Callable[[], Awaitable[None]], seconds: float, concurrency: int) -> tuple[float, float, float]:
    """RPS, p50 and p99 (ms) of `call` from `concurrency` loops, after a short warm-up."""
    latencies: list[float] = []
    stop = 0.0

    async def loop(record: bool) -> None:
        while time.perf_counter() < stop:
            t = time.perf_counter()
            await call()
            if record:
                latencies.append(time.perf_counter() - t)

    stop = time.perf_counter() + 0.5
    await asyncio.gather(*(loop(False) for _ in range(concurrency)))
    start = time.perf_counter()
    stop = start + seconds
    await asyncio.gather(*(loop(True) for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    return len(latencies) / elapsed, statistics.median(latencies) * 1e3, latencies[int(len(latencies) * 0.99)] * 1e3


async def run(base: str, ca_file: str, seconds: float, concurrency: int) -> list[tuple[str, float, float, float]]:
    import ssl

    import aiohttp
    import httpx

    from backends.http1 import ConnectionPool
    from backends.openai_upstream import open_transport
    from config.schema import TLSConfig

    ctx = ssl.create_default_context(cafile=ca_file)
    headers = {"Content-Type": "application/json", "Authorization": "Bearer k"}
    rows = []

    async with httpx.AsyncClient(verify=ctx, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def httpx_call() -> None:
            r = await client.post(base + "/v1/chat/completions", content=BODY, headers=headers)
            assert r.status_code == 200 and r.content == ANSWER

        rows.append(("httpx 0.28 AsyncClient (httpcore)", *await drive(httpx_call, seconds, concurrency)))

    connector = aiohttp.TCPConnector(ssl=ctx, limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def aiohttp_call() -> None:
            async with session.post(base + "/v1/chat/completions", data=BODY, headers=headers) as r:
                assert r.status == 200 and await r.read() == ANSWER

        rows.append((f"aiohttp {aiohttp.__version__} ClientSession", *await drive(aiohttp_call, seconds, concurrency)))

    transport = open_transport(base + "/v1", headers=headers, tls=TLSConfig(ca_bundle=ca_file),
                               max_connections=concurrency)

    async def transport_call() -> None:
        r = await transport.request("POST", "/chat/completions", BODY, None, 10.0)
        assert r.status == 200 and await r.body() == ANSWER

    rows.append((f"pointsman {type(transport).__name__} (backends/transport.py)",
                 *await drive(transport_call, seconds, concurrency)))
    await transport.aclose()

    pool = ConnectionPool(base + "/v1", headers=headers, max_connections=concurrency, ssl_context=ctx)

    async def http1_call() -> None:
        r = await pool.request("POST", "/chat/completions", BODY, None, 10.0)
        assert r.status == 200 and await r.body() == ANSWER

    rows.append(("backends/http1.py over TLS (reference)", *await drive(http1_call, seconds, concurrency)))
    await pool.aclose()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--serve", nargs=3, metavar=("PORT", "CERT", "KEY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(int(args.serve[0]), args.serve[1], args.serve[2])
        return

    import trustme
    import uvloop

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    with tempfile.TemporaryDirectory() as tmp:
        ca_file, cert_file, key_file = (os.path.join(tmp, n) for n in ("ca.pem", "cert.pem", "key.pem"))
        ca.cert_pem.write_to_path(ca_file)
        cert.cert_chain_pems[0].write_to_path(cert_file)
        cert.private_key_pem.write_to_path(key_file)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(port), cert_file, key_file])
        base = f"https://127.0.0.1:{port}"
        try:
            import ssl

            ctx = ssl.create_default_context(cafile=ca_file)
            deadline = time.monotonic() + 20
            while True:
                try:
                    urllib.request.urlopen(base + "/", context=ctx, timeout=1).read()
                    break
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise
                    time.sleep(0.1)
            rows = uvloop.run(run(base, ca_file, args.seconds, args.concurrency))
        finally:
            server.terminate()
            server.wait()
    print(f"c{args.concurrency}, {args.seconds:g} s each, small JSON POST over TLS 1.3, uvloop on both sides")
    print("| client | RPS | p50 | p99 |\n|---|---:|---:|---:|")
    for name, rps, p50, p99 in rows:
        print(f"| {name} | {rps:,.0f} | {p50:.2f} ms | {p99:.2f} ms |")


if __name__ == "__main__":
    main()
