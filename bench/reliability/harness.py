"""The reliability suite's real parts on free ports in one work dir: Redis, PostgreSQL, two upstreams, a gateway."""

from __future__ import annotations

import signal
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import Process, free_port, start_gateway, start_upstream
from tests.services import PostgresServer, RedisServer

__all__ = ["CAPPED", "LIMITED", "MODEL", "Harness", "UsageRow"]

MODEL = "chat"
CAPPED = "capped"  # the user whose `total` token budget is spent during a run
LIMITED = "limited"  # the user held to a low rpm, so that the rate limit refuses some requests

# The full chain: rate limits, the exact cache, budgets, the usage rows, metrics and tracing (sent nowhere).
# The global budget and the everyone-limit allow while Redis is away; the capped user's budget denies then (503),
# so that "budgets hold" stays true through a Redis outage. A `total` budget never resets mid-run.
CONFIG = """
models:
  - id: {model}
    backend: openai
    upstream_model: mock-model
    pricing: {{input_per_mtok: 1, output_per_mtok: 2}}
    deployments:
      - {{base_url: "{a}"}}
      - {{base_url: "{b}"}}
routing: {{health_check_s: 1}}
storage: {{redis_url: "{redis}", database_url: "{database}"}}
policies:
  rate_limits:
    - {{scope: user, rpm: 10000000, on_store_error: allow}}
    - {{scope: user, match: {limited}, rpm: 60, on_store_error: allow}}
  cache: {{mode: deterministic, ttl_s: 3600}}
  budgets:
    - {{scope: global, period: day, max_tokens: 1000000000000, on_store_error: allow}}
    - {{scope: user, match: {capped}, period: total, max_tokens: {budget}, on_store_error: deny}}
metrics: {{enabled: true}}
tracing: {{enabled: true, exporter: none, sample_ratio: 1.0}}
"""


@dataclass(frozen=True)
class UsageRow:
    request_id: str
    user: str
    tokens: int  # prompt + completion, as the row records them
    cache: str
    http_status: int


class Harness:
    """Starts everything in `start` (a gateway last, once the others answer) and stops everything in `stop`,
    whatever was killed or restarted in between. The gateway's RSS, open fds and asyncio tasks are read here."""

    def __init__(self, workdir: Path, *, budget_tokens: int) -> None:
        self.workdir = workdir
        self.budget_tokens = budget_tokens
        self.redis = RedisServer(free_port(), workdir / "redis.log", persist_dir=workdir / "redis-data")
        self.postgres = PostgresServer(free_port())
        self.upstreams: list[Process] = []
        self.gateway: Process | None = None

    def __enter__(self) -> Harness:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.redis.start()
        self.postgres.start()
        self.upstreams = [start_upstream(self.workdir, "mock-model") for _ in range(2)]
        self.start_gateway()

    def start_gateway(self) -> Process:
        config = CONFIG.format(model=MODEL, a=self.upstreams[0].url, b=self.upstreams[1].url, redis=self.redis.url,
                               database=self.postgres.url, limited=LIMITED, capped=CAPPED,
                               budget=self.budget_tokens)
        self.gateway = start_gateway(self.workdir, config)
        return self.gateway

    def stop_gateway(self) -> int:
        """SIGTERM: in-flight requests finish and the queued usage rows are written; the exit status."""
        assert self.gateway is not None
        return self.gateway.stop(signal.SIGTERM, timeout=60)

    def stop(self) -> None:
        for process in [*([self.gateway] if self.gateway else []), *self.upstreams]:
            process.stop(signal.SIGKILL if process is not self.gateway else signal.SIGTERM)
        self.redis.kill()
        self.postgres.stop()

    # faults
    def kill_upstream(self, index: int) -> None:
        self.upstreams[index].stop(signal.SIGKILL)

    def restart_upstream(self, index: int) -> None:
        self.upstreams[index] = start_upstream(self.workdir, "mock-model", port=self.upstreams[index].port)

    # the gateway process, read from /proc and /metrics
    @property
    def pid(self) -> int:
        assert self.gateway is not None
        return self.gateway.proc.pid

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS line")

    def open_fds(self) -> int:
        return len(list(Path(f"/proc/{self.pid}/fd").iterdir()))

    def tasks(self) -> int:
        """The gateway's asyncio tasks now (the pointsman_event_loop_tasks gauge, the scrape's own included)."""
        assert self.gateway is not None
        with urllib.request.urlopen(self.gateway.url + "/metrics", timeout=10) as response:
            page = response.read().decode()
        for line in page.splitlines():
            if line.startswith("pointsman_event_loop_tasks "):
                return int(float(line.split()[1]))
        raise RuntimeError("/metrics has no pointsman_event_loop_tasks")

    def usage_rows(self) -> list[UsageRow]:
        rows = self.postgres.query('SELECT request_id, coalesce("user", \'\'), '
                                   "coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0), "
                                   "coalesce(cache, ''), coalesce(http_status, 0) FROM usage_rows")
        return [UsageRow(r[0], r[1], int(r[2]), r[3], int(r[4])) for r in rows]
