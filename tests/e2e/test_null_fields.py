"""The openai SDK types many request fields as Optional: passing None sends JSON null, which OpenAI takes as
"not given", and so does the gateway (it answered such valid SDK calls with 400); and the hints a local model
takes with a value."""

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
    # a null asks for nothing, so there is nothing to refuse (a value that would change the output is a 400)
    answer = client.chat.completions.create(model="small", messages=QUESTION, max_completion_tokens=2,
                                            **{field: None})
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_local_model_takes_the_prompt_cache_and_safety_hints(client):
    # hints that change no output (OpenAI's prompt cache routing, the end user's id): taken, as OpenAI takes them
    answer = client.chat.completions.create(model="small", messages=QUESTION, max_completion_tokens=2,
                                            prompt_cache_key="tenant-7", safety_identifier="user-1234")
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_local_model_refuses_a_value_that_would_change_the_output(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="small", messages=QUESTION, max_completion_tokens=2, verbosity="high")
    assert err.value.body["param"] == "verbosity"
