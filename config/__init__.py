"""Gateway configuration: frozen msgspec Structs, YAML loading with ${VAR} expansion, the default config."""

from config.loader import ConfigError, default_config_path, load_config, parse_config
from config.schema import (
    AuthConfig,
    Config,
    ModelConfig,
    OpenAIModel,
    ServerConfig,
    TransformersModel,
    VLLMModel,
)

__all__ = [
    "AuthConfig",
    "Config",
    "ConfigError",
    "ModelConfig",
    "OpenAIModel",
    "ServerConfig",
    "TransformersModel",
    "VLLMModel",
    "default_config_path",
    "load_config",
    "parse_config",
]
