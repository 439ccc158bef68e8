"""The openai SDK types many request fields as Optional: passing None sends JSON null, which OpenAI takes as
"not given", and so does the gateway (it answered such valid SDK calls with 400)."""

from __future__ import annotations

import openai
import pytest

QUESTION = [{"role": "user", "content": "hi"}]


@pytest.fixture
def client(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)


@pytest.mark.parametrize("field", ["n", "stream"])
def test_chat_null_n_and_stream_are_not_given(client, field):
    # `n: Optional[int]`, `stream: Optional[Literal[False]]` in the SDK; OpenAI's spec: nullable, default 1 / false
    answer = client.chat.completions.create(model="remote-a", messages=QUESTION, **{field: None})
    assert answer.choices[0].message.content == "echo: hi"


@pytest.mark.parametrize("field", ["n", "stream", "echo"])
def test_completions_null_fields_are_not_given(client, field):
    answer = client.completions.create(model="remote-a", prompt="hi", **{field: None})
    assert answer.choices[0].text == "echo: hi"


def test_responses_null_stream_is_not_given(client):
    answer = client.responses.create(model="remote-a", input="hi", stream=None)
    assert answer.output_text == "echo: hi"


@pytest.mark.parametrize("field", ["reasoning_effort", "prompt_cache_key", "safety_identifier", "verbosity",
                                   "prediction", "modalities", "audio"])
def test_local_model_takes_null_for_a_field_it_cannot_honour(client, field):
    # a null asks for nothing, so there is nothing to refuse (the same field with a value is rightly a 400)
    answer = client.chat.completions.create(model="small", messages=QUESTION, max_completion_tokens=2,
                                            **{field: None})
    assert answer.choices[0].finish_reason in ("stop", "length")
