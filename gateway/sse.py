"""Server-sent events framing: relay payloads as they arrive; an error after the start is one event + [DONE]."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from gateway.errors import GatewayError, error_body

__all__ = ["DONE", "sse_events"]

DONE = b"data: [DONE]\n\n"
log = logging.getLogger("pointsman")


async def sse_events(first: bytes | None, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        if first is not None:
            yield b"data: " + first + b"\n\n"
        async for payload in rest:
            yield b"data: " + payload + b"\n\n"
    except GatewayError as exc:
        yield b"data: " + exc.body() + b"\n\n"
    except Exception:
        log.exception("stream failed")
        yield b"data: " + error_body("The stream failed inside the gateway.", "api_error", "internal_error") + b"\n\n"
    finally:
        # closing the backend's iterator also stops generation when the client leaves early
        await rest.aclose()  # type: ignore[attr-defined]
    yield DONE
