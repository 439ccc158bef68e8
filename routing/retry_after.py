"""How long an upstream's 429 asks us to wait, read from its Retry-After or x-ratelimit-reset-* headers."""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Mapping

__all__ = ["retry_after_s"]

# OpenAI's reset durations: "1s", "6m0s", "20ms", "1h2m3.5s"
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _duration(text: str) -> float | None:
    text = text.strip()
    try:
        return float(text)  # a bare number: seconds
    except ValueError:
        pass
    parts = _PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


def _retry_after(value: str, now: float) -> float | None:
    """RFC 9110's Retry-After: delay-seconds or an HTTP date; a header sent twice, as the client joins it ("5, 5"),
    the longer of its delays."""
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return max(float(part) for part in value.split(","))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return when.timestamp() - now if when.tzinfo is not None else None


def retry_after_s(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait, from lowercase response headers: `retry-after-ms`, else `retry-after` (seconds or an HTTP
    date, against the wall clock `now`), else the longest `x-ratelimit-reset-{requests,tokens}` of the limits
    whose `x-ratelimit-remaining-*` is 0 or not given. None when no header says, or it says nothing positive."""
    wait: float | None = None
    if (ms := headers.get("retry-after-ms")) is not None:
        try:  # a number of milliseconds (OpenAI's), never a duration with units
            wait = float(ms) / 1000
        except ValueError:
            wait = None
    if wait is None and (value := headers.get("retry-after")) is not None:
        wait = _retry_after(value.strip(), time.time() if now is None else now)
    if wait is None:
        resets = [_duration(reset) for kind in ("requests", "tokens")
                  if (reset := headers.get(f"x-ratelimit-reset-{kind}")) is not None
                  and headers.get(f"x-ratelimit-remaining-{kind}", "0").strip() in ("0", "0.0")]
        wait = max((r for r in resets if r is not None), default=None)
    return wait if wait is not None and wait > 0 else None  # NaN is not > 0 either
