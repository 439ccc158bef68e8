"""The yardstick for bench/gateway.py: a bare aiohttp + uvloop reverse proxy with one keep-alive client session.

Run: python bench/bare_proxy.py --port N --upstream http://127.0.0.1:M. It forwards every request's method,
path and body to the upstream and relays status, content type and body; an SSE answer is relayed chunk by
chunk as it arrives.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
import uvloop
from aiohttp import web

__all__ = ["make_app"]

SESSION = web.AppKey("session", aiohttp.ClientSession)


def make_app(upstream: str) -> web.Application:
    async def client(app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession(upstream) as app[SESSION]:
            yield

    async def forward(request: web.Request) -> web.StreamResponse:
        headers = {"Content-Type": request.content_type}
        async with request.app[SESSION].request(
            request.method, request.path_qs, data=await request.read(), headers=headers
        ) as answer:
            kind = answer.headers.get("Content-Type", "application/octet-stream")
            if not kind.startswith("text/event-stream"):
                return web.Response(status=answer.status, body=await answer.read(), headers={"Content-Type": kind})
            relay = web.StreamResponse(status=answer.status, headers={"Content-Type": kind})
            await relay.prepare(request)
            async for chunk, _ in answer.content.iter_chunks():  # one write per upstream HTTP chunk
                await relay.write(chunk)
            await relay.write_eof()
            return relay

    app = web.Application()
    app.cleanup_ctx.append(client)
    app.router.add_route("*", "/{path:.*}", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:8001")
    args = parser.parse_args()
    uvloop.install()
    web.run_app(make_app(args.upstream), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
