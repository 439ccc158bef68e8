"""A token budget across two replicas with streams their clients leave midway.

README: budgets "settle to the actual usage afterwards (also when a stream is cancelled midway), so a budget is
never exceeded"; the upstream has read (and bills) the whole prompt of a stream before its first token."""

from __future__ import annotations

import time
import uuid

import httpx

from tests.e2e.replicas import one_model, replicas

LIMIT = 2000  # tokens per day for the user: room for the four, each reserving its estimate plus max_tokens
WORDS = 200  # the prompt's words: the mock upstream's prompt_tokens


_config = one_model(f"""
  budgets:
    - {{scope: user, period: day, max_tokens: {LIMIT}}}
""".strip("\n"))


def _leave_midway(url: str, user: str, request_id: str) -> None:
    """A stream of a long prompt, left after its first word."""
    prompt = "gap:0.5 " + " ".join(["word"] * (WORDS - 1))
    body = {"model": "remote-a", "user": user, "max_tokens": 20, "stream": True,
            "messages": [{"role": "user", "content": prompt}]}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers={"x-request-id": request_id},
                      timeout=30) as response:
        assert response.status_code == 200
        words = 0
        for line in response.iter_lines():
            if line.startswith("data: ") and '"content":"echo:"' in line:  # the first word: leave now
                words += 1
                break
        assert words == 1


def _rows(url: str, ids: set[str]) -> list[dict]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = [r for r in httpx.get(url + "/admin/usage", params={"limit": 1000}).json()["data"]
                if r["request_id"] in ids]
        if len(rows) == len(ids):
            return rows
        time.sleep(0.2)
    raise AssertionError(f"usage rows of {ids} not all written")


def test_a_cancelled_stream_charges_its_prompt_to_the_budget(tmp_path):
    with replicas(tmp_path, _config) as (first, second, _):
        user = uuid.uuid4().hex
        ids = {f"cancel-{i}-{uuid.uuid4().hex[:6]}" for i in range(4)}
        for i, request_id in enumerate(sorted(ids)):
            _leave_midway((first, second)[i % 2].url, user, request_id)
        rows = _rows(first.url, ids)
        used = next(b for b in httpx.get(first.url + "/v1/usage", headers={"x-pointsman-user": user}).json()["budgets"]
                    if b["scope"] == "user")["used_tokens"]
        # four prompts of 200 tokens were sent upstream and read there: at least 800 tokens are spent
        assert used >= 4 * WORDS, (f"4 cancelled streams of {WORDS}-token prompts charged {used} tokens; rows: "
                                   f"{[(r['prompt_tokens'], r['completion_tokens'], r['status']) for r in rows]}")
