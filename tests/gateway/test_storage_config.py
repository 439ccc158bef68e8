"""storage.redis_timeout_s bounds each Redis operation of the state store (it was fixed at 0.5 s)."""

from __future__ import annotations

import pytest

from config.loader import ConfigError, parse_config
from gateway.storage import Storage

MODELS = 'models: [{id: m, backend: openai, base_url: "http://127.0.0.1:1/v1"}]\n'


async def test_the_redis_timeout_is_the_configs():
    storage_yaml = 'storage: {redis_url: "redis://127.0.0.1:1/0", redis_timeout_s: 0.2, database_url: ""}\n'
    config = parse_config(MODELS + storage_yaml)
    storage = Storage(config.storage)
    try:
        kwargs = storage.state._redis.connection_pool.connection_kwargs  # type: ignore[attr-defined]
        assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 0.2
    finally:
        await storage.state.aclose()
    assert parse_config(MODELS).storage.redis_timeout_s == 0.5
    for bad in (0, -1, 61):
        with pytest.raises(ConfigError, match="redis_timeout_s"):
            parse_config(MODELS + f"storage: {{redis_timeout_s: {bad}}}\n")
