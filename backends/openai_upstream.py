"""OpenAI-compatible upstreams (`backend: openai | vllm`): one pooled keep-alive client per deployment."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from backends.http1 import ConnectionPool
from backends.vllm_metrics import VLLMLoad, fetch_vllm_load, metrics_url_for
from config.schema import Deployment, OpenAIModel
from gateway.errors import (
    GatewayError,
    UpstreamStatusError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.protocol import GATEWAY_FIELDS, ChatCompletionRequest, ParsedRequest

__all__ = ["OpenAIBackend", "Upstream", "translate_transport_error"]

_encode = msgspec.json.encode
_decode = msgspec.json.decode


def translate_transport_error(exc: BaseException, url: str) -> GatewayError:
    """Map a transport failure to the gateway's errors: 504 for timeouts, 502 for everything else."""
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(f"upstream {url} timed out")
    return UpstreamUnavailable(f"upstream {url} unreachable: {type(exc).__name__}: {exc}")


class Upstream:
    """One deployment: a base URL, its own key, and a pool of keep-alive connections."""

    def __init__(self, deployment: Deployment, model: OpenAIModel) -> None:
        self.deployment = deployment
        self.base_url = deployment.base_url.rstrip("/")
        self.headers = {"Content-Type": "application/json"}
        if deployment.api_key:
            # the upstream's own key; the client's Authorization header is never forwarded
            self.headers["Authorization"] = f"Bearer {deployment.api_key}"
        self.timeout_s = model.timeout_s
        self.pool = ConnectionPool(
            self.base_url, max_connections=model.max_connections, connect_timeout=model.connect_timeout_s
        )
        self._metrics: ConnectionPool | None = None

    async def post(self, path: str, body: bytes) -> bytes:
        try:
            async with asyncio.timeout(self.timeout_s):
                response = await self.pool.request("POST", path, body, self.headers, self.timeout_s)
                content = await response.body()
        except (TimeoutError, OSError) as exc:
            raise translate_transport_error(exc, self.base_url + path) from exc
        if response.status >= 400:
            raise UpstreamStatusError(response.status, content)
        return content

    async def post_stream(self, path: str, body: bytes) -> AsyncIterator[bytes]:
        """Yield each SSE `data:` payload as it arrives; ends at `[DONE]`. Only the gap between bytes is bounded."""
        url = self.base_url + path
        try:
            response = await self.pool.request("POST", path, body, self.headers, self.timeout_s)
            if response.status >= 400:
                raise UpstreamStatusError(response.status, await response.body())
            buffer = b""
            chunks = response.chunks()
            try:
                async for piece in chunks:
                    buffer += piece
                    while (end := buffer.find(b"\n")) >= 0:
                        line, buffer = buffer[:end], buffer[end + 1 :]
                        if not line.startswith(b"data:"):
                            continue  # comments, `event:` and blank separator lines
                        data = line[5:].strip()
                        if data == b"[DONE]":
                            return
                        yield data
            finally:
                await chunks.aclose()
        except (TimeoutError, OSError) as exc:
            raise translate_transport_error(exc, url) from exc
        raise UpstreamUnavailable(f"upstream {url} closed the stream before [DONE]", code="upstream_stream_broken")

    async def reachable(self) -> bool:
        try:
            async with asyncio.timeout(2.0):
                response = await self.pool.request("GET", "/models", b"", self.headers, 2.0)
                await response.body()
        except (TimeoutError, OSError):
            return False
        return response.status < 500

    async def load(self) -> VLLMLoad | None:
        if self._metrics is None:  # /metrics sits at the server root, beside /v1
            self._metrics = ConnectionPool(metrics_url_for(self.base_url).removesuffix("/metrics"), max_connections=1)
        return await fetch_vllm_load(self._metrics, "/metrics", 2.0)

    async def aclose(self) -> None:
        await self.pool.aclose()
        if self._metrics is not None:
            await self._metrics.aclose()


class OpenAIBackend:
    """Forwards the client's body unchanged but for `model`; rewrites the upstream's model name to ours."""

    def __init__(self, model: OpenAIModel) -> None:
        self.model = model
        deployments = model.deployments or [Deployment(base_url=model.base_url, api_key=model.api_key)]
        self.upstreams = [Upstream(d, model) for d in deployments]
        self.deployments = [(u.base_url, d.weight) for u, d in zip(self.upstreams, deployments, strict=True)]
        self._polls_metrics = model.backend_kind == "vllm"
        sent, ours = model.sent_model, model.id
        self._rename = None if sent == ours else (_encode({"model": sent})[1:-1], _encode({"model": ours})[1:-1])

    def _body(self, request: ParsedRequest) -> bytes:
        raw: dict[str, Any] = {k: v for k, v in request.raw.items() if k not in GATEWAY_FIELDS}
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

    async def complete(self, request: ParsedRequest, deployment: int = 0) -> bytes:
        upstream = self.upstreams[deployment]
        return self._rewrite(await upstream.post(self._path(request), self._body(request)))

    async def stream(self, request: ParsedRequest, deployment: int = 0) -> AsyncIterator[bytes]:
        upstream = self.upstreams[deployment]
        async for payload in upstream.post_stream(self._path(request), self._body(request)):
            yield self._rewrite(payload)

    async def health(self) -> bool:
        results = await asyncio.gather(*(u.reachable() for u in self.upstreams))
        return any(results)

    async def probe(self, deployment: int) -> tuple[bool, VLLMLoad | None]:
        """An active health check of one deployment; for vLLM also its queue and KV-cache load."""
        upstream = self.upstreams[deployment]
        healthy = await upstream.reachable()
        if not (healthy and self._polls_metrics):
            return healthy, None
        return healthy, await upstream.load()

    async def aclose(self) -> None:
        await asyncio.gather(*(u.aclose() for u in self.upstreams))
