"""The ASGI entry point each server worker imports: builds the app from POINTSMAN_CONFIG (or the default)."""

from __future__ import annotations

import logging
import os

from litestar import Litestar

from config.loader import ConfigError, load_config
from gateway.app import create_app

__all__ = ["make_app"]


def make_app() -> Litestar:
    level = os.environ.get("POINTSMAN_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # httpx's line per request is the upstreams' health and readiness probes: one per deployment every few
    # seconds, and one per /ready, which anyone may call
    if logging.getLogger().level >= logging.INFO:  # POINTSMAN_LOG_LEVEL=DEBUG shows them
        logging.getLogger("httpx").setLevel(logging.WARNING)
    path = os.environ.get("POINTSMAN_CONFIG") or None
    try:
        config = load_config(path)
    except ConfigError as exc:  # the file changed under a SIGHUP's new workers: one line, the old ones stay
        logging.getLogger("pointsman").error("config error, this worker does not start: %s", exc)
        raise SystemExit(2) from None
    return create_app(config, reload_from=lambda: load_config(path))
