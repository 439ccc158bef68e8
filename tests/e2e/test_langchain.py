"""LangChain's ChatOpenAI (invoke, stream, batch) against a live gateway."""

from __future__ import annotations

from langchain_openai import ChatOpenAI


def _chat(gateway, model: str) -> ChatOpenAI:
    return ChatOpenAI(base_url=gateway.url + "/v1", api_key="x", model=model, max_retries=0, temperature=0,
                      max_tokens=16)


def test_invoke_local_model(gateway):
    answer = _chat(gateway, "smollm2-135m-instruct").invoke("What is the capital of France?")
    assert "Paris" in answer.content
    assert answer.usage_metadata["total_tokens"] > 0


def test_stream_and_batch_upstream(gateway):
    llm = _chat(gateway, "remote-a")
    parts = [chunk.content for chunk in llm.stream("red green")]
    assert "".join(parts) == "echo: red green"
    answers = llm.batch(["one", "two", "three"])
    assert [a.content for a in answers] == ["echo: one", "echo: two", "echo: three"]


def test_stream_local_model(gateway):
    text = "".join(c.content for c in _chat(gateway, "small").stream("What is the capital of France?"))
    assert "Paris" in text
