"""The exact cache stores a streamed answer as the gateway puts it back together, without its logprobs: a plain
request that asks for logprobs is a miss on such an entry (it was answered `logprobs: null` from it)."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import SMOL, start_gateway

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cachelogprobs")
    config = f"""
models:
{SMOL}
policies:
  cache: {{mode: deterministic, ttl_s: 3600}}
"""
    server = start_gateway(tmp, config)
    yield server
    server.stop()


def test_plain_request_with_logprobs_after_a_streamed_one_gets_logprobs(gateway):
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
    asked = dict(model="small", messages=QUESTION, max_completion_tokens=4, temperature=0, logprobs=True,
                 top_logprobs=1)
    stream = client.chat.completions.create(**asked, stream=True, stream_options={"include_usage": True})
    streamed = [chunk for chunk in stream]
    assert any(c.choices and c.choices[0].logprobs is not None for c in streamed)  # the model gave logprobs
    raw = client.chat.completions.with_raw_response.create(**asked)
    answer = raw.parse()
    # the same request, plain: logprobs were asked for, so they must be there (a hit without them is no answer)
    assert answer.choices[0].logprobs is not None, f"x-pointsman-cache: {raw.headers.get('x-pointsman-cache')}"
    assert len(answer.choices[0].logprobs.content) == answer.usage.completion_tokens
    # that plain answer, logprobs and all, took the entry's place: the next plain request is a hit with them
    again = client.chat.completions.with_raw_response.create(**asked)
    assert again.headers["x-pointsman-cache"] == "hit" and again.parse().choices[0].logprobs is not None
    # a stream that asks for logprobs is never a hit: a replayed stream carries none
    with client.chat.completions.with_streaming_response.create(**asked, stream=True) as streaming:
        assert streaming.headers["x-pointsman-cache"] == "miss"
        assert any('"logprobs":{' in line or '"logprobs": {' in line for line in streaming.iter_lines())
