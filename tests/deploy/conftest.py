"""Shared by the deployment tests: where deploy/ is, its YAML, and stand-in values for the secrets it expects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

__all__ = ["DEPLOY", "GATEWAY_CONFIG", "SECRETS", "load_yaml", "load_yaml_all"]

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
GATEWAY_CONFIG = DEPLOY / "pointsman.yaml"

# what an operator supplies (deploy/.env for compose, the Secret for Kubernetes), in a valid shape
SECRETS = {
    "POINTSMAN_ADMIN_KEY": "admin-key-for-tests",
    "REDIS_URL": "redis://redis:6379/0",
    "DATABASE_URL": "postgresql+asyncpg://pointsman:secret@postgres:5432/pointsman",
}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_yaml_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]
