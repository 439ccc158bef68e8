"""Rate limits through two replicas sharing Redis: one GCRA bucket per member of the scope, whichever replica
and whichever name of the model a request uses."""

from __future__ import annotations

from tests.e2e.replicas import replicas, send

RPM = 5


def _config(upstream: str, redis: str, database: str) -> str:
    return f"""
models:
  - {{id: remote-a, backend: openai, base_url: "{upstream}", upstream_model: mock-model, aliases: [ra]}}
  - {{id: remote-b, backend: openai, base_url: "{upstream}", upstream_model: mock-model}}
routing: {{health_check_s: 0}}
storage: {{redis_url: "{redis}", database_url: "{database}"}}
policies:
  rate_limits:
    - {{scope: model, match: remote-a, rpm: {RPM}}}
    - {{scope: user, rpm: {RPM}}}
"""


def _chat(model: str, user: str | None = None) -> dict:
    body = {"model": model, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
    if user:
        body["user"] = user
    return body


def test_a_user_rpm_is_one_bucket_across_replicas(tmp_path):
    with replicas(tmp_path, _config) as (first, second, _):
        urls = [first.url, second.url]
        # a user's rpm across both replicas: RPM served (one more may refill meanwhile), the rest refused
        answers = send(urls, [_chat("remote-b", "u1")] * (3 * RPM))
        served = [a for a in answers if a.status_code == 200]
        assert RPM <= len(served) <= RPM + 1, [a.status_code for a in answers]
        remaining = sorted(int(a.headers["x-ratelimit-remaining-requests"]) for a in served)
        assert len(set(remaining)) == len(remaining), remaining  # each admitted request saw its own count


def test_a_model_rpm_counts_its_alias_and_chains_too(tmp_path):
    with replicas(tmp_path, _config) as (first, second, _):
        urls = [first.url, second.url]
        # remote-a's own rpm: the same model asked for by its id, its alias, or a chain starting with it
        names = ["remote-a", "ra", "remote-a:remote-b"]
        answers = send(urls, [_chat(names[i % 3]) for i in range(3 * RPM)])
        by_remote_a = [a for a in answers if a.status_code == 200 and a.headers["x-pointsman-model"] == "remote-a"]
        assert len(by_remote_a) <= RPM + 1, (
            f"remote-a's {RPM} rpm limit let {len(by_remote_a)} of {3 * RPM} requests through to remote-a: "
            + str([(names[i % 3], a.status_code, a.headers.get("x-pointsman-model")) for i, a in enumerate(answers)]))
