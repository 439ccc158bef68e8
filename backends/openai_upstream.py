"""OpenAI-compatible upstreams (`backend: openai | vllm`): one pooled keep-alive transport per deployment."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable, Mapping
from contextvars import ContextVar
from typing import Any
from urllib.parse import urlsplit

import httpx
import msgspec

from backends.http1 import ConnectionPool
from backends.supervisor import EngineSupervisor, launched_here
from backends.transport import (
    AiohttpTransport,
    PoolTimeout,
    Transport,
    TransportError,
    TransportTimeout,
    environment_proxy,
    open_httpx_client,
    shown_url,
)
from backends.vllm_metrics import VLLMLoad, fetch_vllm_load, metrics_url_for
from config.schema import Deployment, OpenAIModel, TLSConfig
from protocol.errors import (
    GatewayError,
    UpstreamInvalidResponse,
    UpstreamStatusError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from protocol.openai import GATEWAY_FIELDS, ChatCompletionRequest, ParsedEmbeddings, ParsedRequest

__all__ = ["OUTGOING_HEADERS", "OpenAIBackend", "Upstream", "open_transport", "translate_transport_error"]

_encode = msgspec.json.encode
_decode = msgspec.json.decode
_PROBE_TIMEOUT_S = 2.0
# an SSE line (one event's payload) longer than this is no answer but a broken or hostile upstream: it ends the
# stream rather than growing a buffer without bound (OpenAI's largest events, base64 partial images, are a few MB)
MAX_SSE_LINE = 16 << 20
# extra headers for this task's next upstream request (W3C traceparent, set by gateway/tracing.py around one
# attempt); None, the default, when tracing is off: the request then goes out with the transport's own headers
OUTGOING_HEADERS: ContextVar[dict[str, str] | None] = ContextVar("pointsman_outgoing_headers", default=None)


class _AnyObject(msgspec.Struct):
    """Decoding into this checks "a JSON object" while skipping every field but `error`: validation without
    building a dict. An `error` there is an upstream's failure sent with a 2xx (as some do, and as vLLM and
    OpenAI put one in a stream), not an answer."""

    error: Any = None


def _error_status(error: Any) -> int:
    """The status an error object sent with a 2xx stands for: its `code` when that is a 4xx status (vLLM puts
    the status there: the request itself was refused, so it is relayed as that, not retried), else 502 (retried
    elsewhere)."""
    code = error.get("code") if isinstance(error, dict) else None
    return code if type(code) is int and 400 <= code <= 499 else 502


class _Choice(msgspec.Struct):
    index: int = 0
    finish_reason: str | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []


class _NamedObject(msgspec.Struct):
    """As _AnyObject, also reading the top-level `model`: an embeddings answer's name, found in the same scan."""

    error: Any = None
    model: Any = None


_check_object = msgspec.json.Decoder(_AnyObject).decode
_check_named = msgspec.json.Decoder(_NamedObject).decode
_chunk_choices = msgspec.json.Decoder(_Chunk).decode
# where an answer's top-level `model` member is looked for before the whole body is decoded: its head (vLLM and
# TEI write `model` before `data`) and its tail (OpenAI writes it after)
_MODEL_WINDOW = 4096


def open_transport(base_url: str, *, headers: Mapping[str, str] | None = None, tls: TLSConfig | None = None,
                   proxy: str | None = None, max_connections: int = 256, connect_timeout: float = 5.0,
                   pool_timeout: float | None = None) -> Transport:
    """http1.py for plain http:// with no proxy (configured, or from the environment); aiohttp otherwise.

    `proxy` overrides the environment (HTTPS_PROXY, HTTP_PROXY, ALL_PROXY, NO_PROXY) for this upstream.
    Raises InvalidHeader for a bad header, before any request.
    """
    proxy = proxy or environment_proxy(base_url)
    if proxy is None and urlsplit(base_url).scheme == "http":
        return ConnectionPool(base_url, headers=headers, max_connections=max_connections,
                              connect_timeout=connect_timeout, pool_timeout=pool_timeout)
    return AiohttpTransport(base_url, headers=headers, tls=tls, proxy=proxy, max_connections=max_connections,
                            connect_timeout=connect_timeout, pool_timeout=pool_timeout)


def translate_transport_error(exc: BaseException, url: str) -> GatewayError:
    """The one map from transport failures to the gateway's errors: a timeout is 504, everything else 502;
    all retryable on another deployment (a full pool included)."""
    if isinstance(exc, PoolTimeout):
        return UpstreamUnavailable(f"upstream {url}: {exc}", code="upstream_pool_timeout")
    if isinstance(exc, TransportTimeout | TimeoutError):
        return UpstreamTimeout(f"upstream {url} timed out")
    return UpstreamUnavailable(f"upstream {url} unreachable: {type(exc).__name__}: {exc}")


def _invalid(url: str, why: str) -> UpstreamInvalidResponse:
    return UpstreamInvalidResponse(f"upstream {url} answered with {why}")


class Upstream:
    """One deployment: a base URL, its own key, its transport (hot path) and an httpx client for probes."""

    def __init__(self, deployment: Deployment, model: OpenAIModel) -> None:
        self.deployment = deployment
        self.base_url = deployment.base_url.rstrip("/")
        self.shown_url = shown_url(self.base_url)  # in errors, logs, labels and /v1/route: no credentials
        self.headers = {"Content-Type": "application/json"}
        if key := deployment.api_key.strip():  # a key read from a file keeps no trailing newline
            # the upstream's own key; the client's Authorization header is never forwarded
            self.headers["Authorization"] = f"Bearer {key}"
        self.timeout_s = model.timeout_s
        self._tls = deployment.tls if deployment.tls is not None else model.tls
        self._proxy = deployment.proxy or model.proxy or environment_proxy(self.base_url)
        self.transport = open_transport(
            self.base_url, headers=self.headers, tls=self._tls, proxy=self._proxy,
            max_connections=model.max_connections, connect_timeout=model.connect_timeout_s,
            pool_timeout=model.pool_timeout_s,
        )
        self._probe: httpx.AsyncClient | None = None

    @staticmethod
    def _relay(found: dict[str, str], into: dict[str, str] | None) -> dict[str, str]:
        """Hand the relayed headers (Retry-After, x-ratelimit-*) to the caller's dict as well."""
        if found and into is not None:
            into.update(found)
        return found

    async def post(self, path: str, body: bytes, relay: dict[str, str] | None = None) -> bytes:
        """The whole response body of a 2xx; raises UpstreamStatusError (status, body, headers) for >= 400."""
        try:  # timeout_s bounds the whole answer, and so each wait in it
            response = await self.transport.request("POST", path, body, OUTGOING_HEADERS.get(), self.timeout_s,
                                                    self.timeout_s)
            found = self._relay(response.relayed_headers(), relay)
            content = await response.body()
        except (TimeoutError, TransportError) as exc:
            raise translate_transport_error(exc, self.shown_url + path) from exc
        if response.status >= 300:  # a 3xx is no answer either (a redirect we do not follow): 502
            raise UpstreamStatusError(response.status, content, headers=found)
        return content

    async def post_stream(self, path: str, body: bytes, relay: dict[str, str] | None = None,
                          choices: int = 1, rewrite: Callable[[bytes], bytes] | None = None,
                          ) -> AsyncIterator[bytes]:
        """Yield each SSE `data:` payload as it arrives, through `rewrite` when given; ends at `[DONE]`, or at the
        connection's end once every one of the `choices` has its finish_reason. The first payload must come within
        `timeout_s` of the response's head (bytes that make none, `: ping` comments, keep the client waiting for
        its status); after it, only the gap between bytes is bounded."""
        url = self.shown_url + path
        finished: set[int] = set()
        first = True
        loop = asyncio.get_running_loop()
        try:
            response = await self.transport.request("POST", path, body, OUTGOING_HEADERS.get(), self.timeout_s)
            first_by = loop.time() + self.timeout_s  # the first payload's deadline: nothing has reached the client
            found = self._relay(response.relayed_headers(), relay)
            if response.status >= 300:
                raise UpstreamStatusError(response.status, await response.body(), headers=found)
            buffer = b""
            chunks = response.chunks()
            try:
                async for piece in chunks:
                    # what the buffer holds has no newline: only the new piece is searched (a long line costs
                    # linear time, not quadratic)
                    scanned = len(buffer)
                    buffer = buffer + piece if buffer else piece
                    start, end = 0, buffer.find(b"\n", scanned)
                    while end >= 0:
                        line, start = buffer[start:end], end + 1
                        end = buffer.find(b"\n", start)
                        if line.startswith(b"data: ") and not line.endswith(b"\r"):
                            data = line[6:]  # the usual framing: one copy, no strip
                        elif line.startswith(b"data:"):
                            data = line[5:].strip()
                        else:
                            continue  # comments, `event:` and blank separator lines
                        if data == b"[DONE]":
                            if first:  # an empty stream: no answer, and nothing relayed yet to stop a retry
                                raise UpstreamUnavailable(f"upstream {url} ended the stream before any payload",
                                                          code="upstream_stream_broken")
                            return
                        if not data:
                            continue  # an empty event (a heartbeat): nothing to relay, nor JSON to decode
                        if first:  # checked once: a stream whose first payload is no JSON object is a 502, not
                            first = False  # a 200 that breaks (the relay's decode of each chunk checks the rest)
                            try:
                                opened = _check_object(data)
                            except (msgspec.DecodeError, RecursionError) as exc:  # a ValidationError too
                                raise _invalid(url, f"a stream payload that is not a JSON object: {exc}") from None
                            if opened.error is not None:  # a 200 stream that opens with an error: failed
                                raise UpstreamStatusError(_error_status(opened.error), data, headers=found)
                        # skip the decode when every finish_reason in the chunk is null (nearly all chunks)
                        if data.count(b'"finish_reason":null') < data.count(b'"finish_reason"'):
                            try:
                                finished.update(c.index for c in _chunk_choices(data).choices if c.finish_reason)
                            except (msgspec.DecodeError, RecursionError):
                                pass  # the payload goes on as it is: the relay's decode of each chunk judges it
                        yield data if rewrite is None else rewrite(data)
                    buffer = buffer[start:]
                    if len(buffer) > MAX_SSE_LINE:
                        raise _invalid(url, f"an SSE line over {MAX_SSE_LINE} bytes")
                    if first and loop.time() > first_by:  # bytes since the head, still no payload in them
                        raise TransportTimeout(f"no stream payload from the upstream for {self.timeout_s} s")
            finally:
                await chunks.aclose()
        except (TimeoutError, TransportError) as exc:
            if finished and len(finished) >= choices:  # the answer is whole: only its usage or `[DONE]` is lost
                return
            raise translate_transport_error(exc, url) from exc
        if len(finished) >= choices:
            return  # finished, only the `[DONE]` line is missing (some servers end that way)
        raise UpstreamUnavailable(f"upstream {url} closed the stream before [DONE]", code="upstream_stream_broken")

    def _probe_client(self) -> httpx.AsyncClient:
        if self._probe is None:
            self._probe = open_httpx_client(tls=self._tls, proxy=self._proxy, timeout=_PROBE_TIMEOUT_S)
        return self._probe

    async def reachable(self) -> bool:
        """GET {base_url}/models answers below 500 within 2 s."""
        try:
            response = await self._probe_client().get(self.base_url + "/models", headers=self.headers)
        except httpx.HTTPError:
            return False
        return response.status_code < 500

    async def load(self) -> VLLMLoad | None:
        # /metrics sits at the server root, beside /v1
        return await fetch_vllm_load(self._probe_client(), metrics_url_for(self.base_url), _PROBE_TIMEOUT_S)

    async def aclose(self) -> None:
        await self.transport.aclose()
        if self._probe is not None:
            await self._probe.aclose()


class OpenAIBackend:
    """Forwards the client's body unchanged but for `model`; rewrites the upstream's model name to ours."""

    def __init__(self, model: OpenAIModel) -> None:
        self.model = model
        deployments = model.all_deployments
        self.upstreams = [Upstream(d, model) for d in deployments]
        self.deployments = [(u.shown_url, d.weight) for u, d in zip(self.upstreams, deployments, strict=True)]
        self._polls_metrics = model.backend_kind == "vllm"
        # `launch:`: the gateway runs the server itself (started by start(), stopped by aclose()), unless the
        # parent of several workers runs it for them
        self.supervisor = EngineSupervisor.for_model(model) if launched_here(model) else None
        # what a chat or completions request sends upstream without: the gateway's own fields, and stream_options
        # where the model says the server refuses it
        self._unsent = GATEWAY_FIELDS if getattr(model, "stream_usage", True) else GATEWAY_FIELDS | {"stream_options"}
        sent, ours = model.sent_model, model.id
        # `"model":"x"` (compact, as vLLM sends it) and `"model": "x"` (as OpenAI and json.dumps write it), each
        # with ours to put in its place: outside a string a JSON quote is never escaped, so either can only be a
        # key and its value, not text in a string; an answer written any other way is decoded and re-encoded
        self._rename = None if sent == ours else tuple(
            (b'"model"' + sep + _encode(sent), b'"model"' + sep + _encode(ours)) for sep in (b":", b": "))

    def _body(self, request: ParsedRequest | ParsedEmbeddings) -> bytes:
        return self._encoded(request.raw, self._unsent)

    def _encoded(self, body: dict[str, Any], unsent: frozenset[str] = GATEWAY_FIELDS) -> bytes:
        # the usual body has none of them: copied in C, not filtered key by key in a comprehension
        raw: dict[str, Any] = ({**body} if unsent.isdisjoint(body)
                               else {k: v for k, v in body.items() if k not in unsent})
        raw["model"] = self.model.sent_model
        return _encode(raw)

    def _rewrite(self, payload: bytes) -> bytes:
        """Our model name in place of the upstream's; raises msgspec errors for a payload that is no JSON object
        when it must be decoded (the fast path does not check: its callers have, or the relay does)."""
        for old, new in self._rename:  # type: ignore[union-attr]
            # find, not `in`: bytes.__contains__ tries its argument as an int first, formatting a TypeError
            if payload.find(old) >= 0:
                return payload.replace(old, new, 1)
        decoded = _decode(payload)
        if not isinstance(decoded, dict):
            raise msgspec.ValidationError("not a JSON object")
        if "model" in decoded:
            decoded["model"] = self.model.id
            return _encode(decoded)
        return payload

    @staticmethod
    def _path(request: ParsedRequest) -> str:
        return "/chat/completions" if isinstance(request.body, ChatCompletionRequest) else "/completions"

    async def start(self) -> None:
        """With `launch:`, start the engine and wait until it answers (raises EngineStartupError)."""
        if self.supervisor is not None:
            await self.supervisor.start()

    async def complete(self, request: ParsedRequest, deployment: int = 0,
                       headers: dict[str, str] | None = None) -> bytes:
        if self.supervisor is not None:  # a lazy engine starts here; one that is down fails fast (503)
            await self.supervisor.ensure()
        return await self._post_object(self.upstreams[deployment], self._path(request), self._body(request), headers)

    async def _post_object(self, upstream: Upstream, path: str, body: bytes, headers: dict[str, str] | None,
                           embeddings: bool = False) -> bytes:
        """POST and check that the answer is a JSON object, with our model name in it (an embeddings answer's
        renamed in place: see _renamed_embeddings)."""
        content = await upstream.post(path, body, headers)
        try:
            answer = (_check_named if embeddings else _check_object)(content)
            if answer.error is None:
                if self._rename is None:
                    return content
                return self._renamed_embeddings(content, answer.model) if embeddings else self._rewrite(content)
        except (msgspec.DecodeError, RecursionError) as exc:  # RecursionError: nested too deeply to skip
            raise _invalid(upstream.shown_url + path, f"a body that is not a JSON object: {exc}") from exc
        raise UpstreamStatusError(_error_status(answer.error), content)  # a 2xx whose body is an error object

    async def embeddings(self, request: ParsedEmbeddings, deployment: int = 0,
                         headers: dict[str, str] | None = None) -> bytes:
        """POST {base_url}/embeddings: the client's body (its encoding_format and dimensions included) with our
        model name swapped for the upstream's, and the answer's swapped back; errors relayed as for chat."""
        if self.supervisor is not None:  # a managed engine starts (or fails fast) as for chat
            await self.supervisor.ensure()
        return await self._post_object(self.upstreams[deployment], "/embeddings", self._body(request), headers,
                                       embeddings=True)

    def _renamed_embeddings(self, content: bytes, named: Any) -> bytes:
        """Our model name in place of `named`, the answer's top-level `model` (the upstream's name for the model
        may differ from the one sent: OpenAI answers text-embedding-ada-002 as ...-002-v2, TEI with its own id):
        the member is found in the answer's head or tail and only its value replaced, so a large answer (60 MB
        for 2048 float vectors of 1536) is neither searched nor decoded whole, each of which holds the event loop
        (a worker thread would still hold the GIL) for tenths of a second. Written any other way, it is decoded
        and re-encoded."""
        if not isinstance(named, str) or named == self.model.id:  # no name, or ours already
            return content
        value = _encode(named)
        member = re.compile(rb'"model"\s*:\s*' + re.escape(value))
        found = member.search(content, 0, _MODEL_WINDOW)
        if found is None:
            found = next(reversed(list(member.finditer(content, max(0, len(content) - _MODEL_WINDOW)))), None)
        if found is None:
            return self._rewrite(content)
        end, whole = found.end(), memoryview(content)  # one copy of the answer: the joined one
        return b"".join((whole[:end - len(value)], _encode(self.model.id), whole[end:]))

    def stream(self, request: ParsedRequest, deployment: int = 0,
               headers: dict[str, str] | None = None) -> AsyncIterator[bytes]:
        upstream = self.upstreams[deployment]
        path = self._path(request)
        # the upstream's own generator, rewriting inside it: no extra generator hop per chunk
        chunks = upstream.post_stream(path, self._body(request), headers, request.body.n,
                                      self._renamer(upstream.shown_url + path))
        return chunks if self.supervisor is None else self._supervised(chunks)

    def _renamer(self, url: str) -> Callable[[bytes], bytes] | None:
        """What puts our model name into each streamed payload from `url`; None when the names are the same."""
        if self._rename is None:
            return None
        (compact, ours), _ = self._rename

        def rewrite(payload: bytes) -> bytes:
            if payload.find(compact) >= 0:  # as vLLM and OpenAI stream chunks: the fast path of _rewrite, inline
                return payload.replace(compact, ours, 1)
            try:
                return self._rewrite(payload)
            except (msgspec.DecodeError, RecursionError) as exc:
                raise _invalid(url, f"a stream chunk that is not a JSON object: {exc}") from exc

        return rewrite

    async def responses(self, body: dict[str, Any], deployment: int = 0,
                        headers: dict[str, str] | None = None) -> bytes:
        """POST {base_url}/responses (the Responses API, for upstreams that serve it): the client's body as it is
        but for `model`, and the answer (a Response object) with our model name; errors relayed as for chat."""
        if self.supervisor is not None:
            await self.supervisor.ensure()
        return await self._post_object(self.upstreams[deployment], "/responses", self._encoded(body), headers)

    def responses_stream(self, body: dict[str, Any], deployment: int = 0,
                         headers: dict[str, str] | None = None) -> AsyncIterator[bytes]:
        """The same, streamed: each event's `data:` payload as it arrives, until the upstream ends the stream."""
        upstream = self.upstreams[deployment]
        chunks = upstream.post_stream("/responses", self._encoded(body), headers, 0,
                                      self._renamer(upstream.shown_url + "/responses"))
        return chunks if self.supervisor is None else self._supervised(chunks)

    async def _supervised(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """`chunks` once the managed engine is up (started on first use); EngineUnavailable while it is down."""
        assert self.supervisor is not None
        try:
            await self.supervisor.ensure()
        except BaseException:
            await chunks.aclose()  # type: ignore[attr-defined]  # never started: closing it sends nothing
            raise
        async for chunk in chunks:
            yield chunk

    async def health(self) -> bool:
        if self.supervisor is not None and not self.supervisor.up:
            return False
        results = await asyncio.gather(*(u.reachable() for u in self.upstreams))
        return any(results)

    async def probe(self, deployment: int) -> tuple[bool, VLLMLoad | None]:
        """An active health check of one deployment; for vLLM also its queue and KV-cache load."""
        if self.supervisor is not None and not self.supervisor.up:
            return False, None  # down or restarting: no probe needed to know
        upstream = self.upstreams[deployment]
        healthy = await upstream.reachable()
        if not (healthy and self._polls_metrics):
            return healthy, None
        return healthy, await upstream.load()

    async def aclose(self) -> None:
        await asyncio.gather(*(u.aclose() for u in self.upstreams))
        if self.supervisor is not None:
            await self.supervisor.stop()
