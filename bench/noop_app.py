"""pointsman with N no-op policies, served exactly as `pointsman serve` serves: what the policy chain costs.

Run by bench/gateway.py: python bench/noop_app.py --config FILE --port N --policies 5 [--workers W]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config.loader import load_config  # noqa: E402
from gateway.app import create_app  # noqa: E402
from gateway.cli import run_server  # noqa: E402
from policies.base import STAGES  # noqa: E402

_COUNT = "POINTSMAN_BENCH_NOOP_POLICIES"


class NoOp:
    """Every hook runs and does nothing: the chain's own cost."""

    name: ClassVar[str] = "noop"
    stage: ClassVar[int] = STAGES["observe"]

    async def admit(self, ctx):
        return None

    async def approve(self, ctx, decision):
        return None

    async def settle(self, ctx, outcome):
        return None


def make_app():
    """The app factory each worker imports (config path and policy count come through the environment)."""
    config = load_config(os.environ["POINTSMAN_CONFIG"])
    return create_app(config, policies=[NoOp() for _ in range(int(os.environ[_COUNT]))])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--policies", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    os.environ["POINTSMAN_CONFIG"] = os.path.abspath(args.config)
    os.environ[_COUNT] = str(args.policies)
    run_server(load_config(args.config), "127.0.0.1", args.port, args.workers, app="bench.noop_app:make_app")


if __name__ == "__main__":
    main()
