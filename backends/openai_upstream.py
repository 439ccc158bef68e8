"""OpenAI-compatible upstreams (`backend: openai | vllm`): one pooled keep-alive client per deployment."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec

from config.schema import Deployment, OpenAIModel
from gateway.errors import (
    GatewayError,
    UpstreamStatusError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.protocol import ChatCompletionRequest, ParsedRequest

__all__ = ["OpenAIBackend", "Upstream", "translate_transport_error"]

_encode = msgspec.json.encode
_decode = msgspec.json.decode


def translate_transport_error(exc: BaseException, url: str) -> GatewayError:
    """Map a transport failure to the gateway's errors: 504 for timeouts, 502 for everything else."""
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return UpstreamTimeout(f"upstream {url} timed out")
    return UpstreamUnavailable(f"upstream {url} unreachable: {type(exc).__name__}: {exc}")


class Upstream:
    """One deployment: a base URL, its own key, and a pooled keep-alive aiohttp session.

    aiohttp directly, not httpx: on this 2-core machine httpx's API over the aiohttp transport halved the
    proxy's throughput (1.9k vs 4.1k RPS at c16, see bench/RESULTS.md).
    """

    def __init__(self, deployment: Deployment, model: OpenAIModel) -> None:
        self.deployment = deployment
        self.base_url = deployment.base_url.rstrip("/")
        self.headers = {"content-type": "application/json"}
        if deployment.api_key:
            # the upstream's own key; the client's Authorization header is never forwarded
            self.headers["authorization"] = f"Bearer {deployment.api_key}"
        self._timeout = aiohttp.ClientTimeout(
            total=model.timeout_s, sock_connect=model.connect_timeout_s, sock_read=model.timeout_s
        )
        # a stream may run long; only the gap between bytes is bounded
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=model.connect_timeout_s, sock_read=model.timeout_s
        )
        self._max_connections = model.max_connections
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:  # created inside the running loop, on first use
            connector = aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=30)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, auto_decompress=False, skip_auto_headers=("User-Agent",)
            )
        return self._session

    async def post(self, path: str, body: bytes) -> bytes:
        url = self.base_url + path
        try:
            async with self.session.post(url, data=body, headers=self.headers) as response:
                content = await response.read()
                status = response.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise translate_transport_error(exc, url) from exc
        if status >= 400:
            raise UpstreamStatusError(status, content)
        return content

    async def post_stream(self, path: str, body: bytes) -> AsyncIterator[bytes]:
        """Yield each SSE `data:` payload as it arrives; ends at `[DONE]`."""
        url = self.base_url + path
        try:
            async with self.session.post(
                url, data=body, headers=self.headers, timeout=self._stream_timeout
            ) as response:
                if response.status >= 400:
                    raise UpstreamStatusError(response.status, await response.read())
                async for line in response.content:  # split on \n as bytes arrive
                    if not line.startswith(b"data:"):
                        continue  # comments, `event:` and blank separator lines
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        return
                    yield data
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise translate_transport_error(exc, url) from exc
        raise UpstreamUnavailable(f"upstream {url} closed the stream before [DONE]", code="upstream_stream_broken")

    async def reachable(self) -> bool:
        try:
            async with self.session.get(
                self.base_url + "/models", headers=self.headers, timeout=aiohttp.ClientTimeout(total=2)
            ) as response:
                return response.status < 500
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class OpenAIBackend:
    """Forwards the client's body unchanged but for `model`; rewrites the upstream's model name to ours."""

    def __init__(self, model: OpenAIModel) -> None:
        self.model = model
        deployments = model.deployments or [Deployment(base_url=model.base_url, api_key=model.api_key)]
        self.upstreams = [Upstream(d, model) for d in deployments]
        sent, ours = model.sent_model, model.id
        self._rename = None if sent == ours else (_encode({"model": sent})[1:-1], _encode({"model": ours})[1:-1])

    def _body(self, request: ParsedRequest) -> bytes:
        raw: dict[str, Any] = dict(request.raw)
        raw["model"] = self.model.sent_model
        return _encode(raw)

    def _rewrite(self, payload: bytes) -> bytes:
        if self._rename is None:
            return payload
        old, new = self._rename
        if old in payload:  # compact JSON, as vLLM and OpenAI send it: `"model":"x"` can only be the key
            return payload.replace(old, new, 1)
        decoded = _decode(payload)
        if isinstance(decoded, dict) and "model" in decoded:
            decoded["model"] = self.model.id
            return _encode(decoded)
        return payload

    @staticmethod
    def _path(request: ParsedRequest) -> str:
        return "/chat/completions" if isinstance(request.body, ChatCompletionRequest) else "/completions"

    async def start(self) -> None:
        return None

    async def complete(self, request: ParsedRequest, upstream: Upstream | None = None) -> bytes:
        upstream = upstream or self.upstreams[0]
        return self._rewrite(await upstream.post(self._path(request), self._body(request)))

    async def stream(self, request: ParsedRequest, upstream: Upstream | None = None) -> AsyncIterator[bytes]:
        upstream = upstream or self.upstreams[0]
        async for payload in upstream.post_stream(self._path(request), self._body(request)):
            yield self._rewrite(payload)

    async def health(self) -> bool:
        results = await asyncio.gather(*(u.reachable() for u in self.upstreams))
        return any(results)

    async def aclose(self) -> None:
        await asyncio.gather(*(u.aclose() for u in self.upstreams))
