"""Local engine: SmolLM2 tokens/s through the gateway, and /health latency while a generation runs."""

from __future__ import annotations

import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import openai  # noqa: E402
from report import stamp, write_section  # noqa: E402

from tests.conftest import SMOL, http, start_gateway  # noqa: E402

SECTION = "## Local engine"
QUESTION = [{"role": "user", "content": "Write a short paragraph about the history of Paris."}]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        gateway = start_gateway(Path(tmp), f"models:\n{SMOL}", env={"POINTSMAN_LOG_LEVEL": "WARNING"})
        try:
            client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
            client.chat.completions.create(model="small", messages=QUESTION, max_tokens=8)  # warm-up
            runs = []
            for _ in range(3):
                start = time.perf_counter()
                reply = client.chat.completions.create(model="small", messages=QUESTION, max_tokens=64,
                                                       temperature=0, extra_body={"ignore_eos": True})
                runs.append(reply.usage.completion_tokens / (time.perf_counter() - start))
            # /health probed every 20 ms while a 128-token generation runs
            probes: list[float] = []
            done = threading.Event()

            def generate() -> None:
                client.chat.completions.create(model="small", messages=QUESTION, max_tokens=128,
                                               extra_body={"ignore_eos": True})
                done.set()

            worker = threading.Thread(target=generate)
            worker.start()
            time.sleep(0.3)
            while not done.is_set():
                start = time.perf_counter()
                assert http("GET", gateway.url + "/health")[0] == 200
                probes.append((time.perf_counter() - start) * 1e3)
                time.sleep(0.02)
            worker.join()
        finally:
            gateway.stop()
    probes.sort()
    p99 = probes[max(0, int(len(probes) * 0.99) - 1)]
    body = [
        stamp(), "",
        "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to float32, CPU) served in process by `pointsman serve`.", "",
        "| figure | value |", "|---|---:|",
        f"| greedy decode, 64 tokens, through the gateway (median of 3) | {statistics.median(runs):.1f} tokens/s |",
        f"| /health while a 128-token generation runs: probes | {len(probes)} |",
        f"| /health p50 / p99 / max | {statistics.median(probes):.1f} / {p99:.1f} / {probes[-1]:.1f} ms |",
        "", "Target: /health under 50 ms while a generation runs (generation runs in a worker thread).",
    ]
    print("\n".join(body))
    write_section(SECTION, body)


if __name__ == "__main__":
    main()
