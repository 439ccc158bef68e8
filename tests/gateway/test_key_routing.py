"""An API key's models bind routing without naming others: a 404 lists only the key's models, and a request the
key's own models cannot take gets the error those give (the prompt fits none, no model meets the route), not a 403
naming a model it never asked for; naming one it may not use is the 403."""

from __future__ import annotations

import pytest

from config.loader import parse_config
from gateway.service import Gateway
from policies.context import Principal
from protocol.errors import BadRequest, GatewayError, ModelNotFound, PermissionDenied
from protocol.openai import ChatCompletionRequest, CompletionRequest, decode_request

CONFIG = """
routing: {health_check_s: 0}
models:
  - {id: tiny, backend: openai, base_url: "http://127.0.0.1:1/v1", context_window: 40}
  - {id: secret-big, backend: openai, base_url: "http://127.0.0.1:1/v1", context_window: 100000, aliases: [big]}
  - {id: secret-small, backend: openai, base_url: "http://127.0.0.1:1/v1", context_window: 40}
  - {id: manual-only, backend: openai, base_url: "http://127.0.0.1:1/v1", auto: false}
"""
LIMITED = Principal(key_id="k", allowed_models=("tiny",))


def ask(model: str, text: str = "hi", **fields) -> object:
    return decode_request({"model": model, "messages": [{"role": "user", "content": text}], **fields},
                          ChatCompletionRequest)


@pytest.fixture
async def gateway():
    gateway = Gateway(parse_config(CONFIG))
    yield gateway
    await gateway.aclose()


async def test_a_404_lists_only_the_keys_models(gateway):
    for call in (lambda: gateway.decide(ask("nope"), False, LIMITED),):
        with pytest.raises(ModelNotFound) as caught:
            await call()
        assert "Available models: tiny " in caught.value.message and "secret" not in caught.value.message
    with pytest.raises(ModelNotFound) as caught:
        gateway.model_card("secret-big", LIMITED)
    assert "secret" not in caught.value.message.split("'", 2)[2]
    with pytest.raises(ModelNotFound) as caught:  # an unrestricted key still sees every model
        await gateway.decide(ask("nope"))
    assert "secret-big" in caught.value.message


async def test_a_prompt_no_model_of_the_key_fits_is_a_context_error_not_a_403(gateway):
    """It was a 403 naming secret-big, the context fallback the key may not use."""
    with pytest.raises(BadRequest) as caught:
        await gateway.decide(ask("tiny", "word " * 400), False, LIMITED)
    assert caught.value.code == "context_length_exceeded" and "secret" not in caught.value.message
    assert caught.value.param == "messages"
    completion = decode_request({"model": "tiny", "prompt": "word " * 400}, CompletionRequest)
    with pytest.raises(BadRequest) as caught:
        await gateway.decide(completion, False, LIMITED)
    assert caught.value.code == "context_length_exceeded" and caught.value.param == "prompt"


async def test_naming_a_model_the_key_may_not_use_is_a_403(gateway):
    for name in ("secret-big", "big"):
        with pytest.raises(PermissionDenied, match="may not use secret-big"):
            await gateway.decide(ask(name), False, LIMITED)


@pytest.mark.parametrize("model", ["auto", "tiny"])
async def test_errors_for_a_keys_own_models_name_no_other(gateway, model):
    """Automatic routing's errors listed every candidate, secret-small among them."""
    with pytest.raises(GatewayError) as caught:
        await gateway.decide(ask(model, "word " * 400), False, LIMITED)
    assert caught.value.status < 500 and "secret" not in caught.value.message


async def test_a_key_none_of_whose_models_can_be_chosen_automatically_gets_a_403_not_a_503(gateway):
    """It got a retryable 503 (and, for a key limited to a missing model, one naming manual-only)."""
    for allowed in (("manual-only",), ("removed-model",)):
        with pytest.raises(PermissionDenied) as caught:
            await gateway.decide(ask("auto"), False, Principal(key_id="k", allowed_models=allowed))
        assert "secret" not in caught.value.message
        assert ("manual-only" in caught.value.message) is (allowed == ("manual-only",))
