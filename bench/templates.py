"""Prompt templates: the added cost of a template on the request path (decode + admit), and render alone."""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import msgspec  # noqa: E402
from report import stamp, write_section  # noqa: E402

from config.schema import TemplateConfig  # noqa: E402
from policies.context import RequestContext  # noqa: E402
from policies.state import LocalStore  # noqa: E402
from policies.template_sandbox import SafeTemplate  # noqa: E402
from policies.templates import TemplatePolicy  # noqa: E402
from protocol.openai import ChatCompletionRequest, decode_request  # noqa: E402

SECTION = "## Prompt templates"
TARGET_ADDED_P50_MS = 0.1
TARGET_RENDER_P50_MS = 1.0
TEMPLATES = msgspec.convert([
    {"name": "support", "versions": [{"version": "1.0.0", "messages": [
        {"role": "system", "content": "You are a support agent for {{ product }}. Answer {{ customer }} politely."}],
        "variables": {"customer": {}, "product": {"default": "Acme Cloud"}}}]},
    {"name": "rag", "versions": [{"version": "2.1.0", "messages": [
        {"role": "system", "content": "Answer from the documents only. Cite them as [n]."},
        {"role": "user", "content": "{% for doc in docs %}[{{ loop.index }}] {{ doc.title|upper }}: "
                                    "{{ doc.text|truncate(200) }}\n{% endfor %}Question: {{ question }}"},
        {"role": "assistant", "content": "{% if strict %}I will only use the documents.{% else %}OK.{% endif %}"}],
        "variables": {"docs": {"type": "array"}, "question": {}, "strict": {"type": "boolean", "default": True}}}]},
], list[TemplateConfig])
USER = {"role": "user", "content": "My invoice is wrong, what do I do?"}
DOCS = [{"title": f"doc {i}", "text": "lorem ipsum dolor sit amet " * 12} for i in range(10)]


def _percentiles(samples_ns: list[int]) -> tuple[float, float]:
    samples = sorted(samples_ns)
    return samples[len(samples) // 2] / 1e6, samples[int(len(samples) * 0.99)] / 1e6


async def _time_admit(policy: TemplatePolicy, body: bytes, n: int) -> list[int]:
    """decode + admit per request, as the handler runs them."""
    samples = []
    clock = time.perf_counter_ns
    for _ in range(n):
        start = clock()
        ctx = RequestContext(decode_request(msgspec.json.decode(body), ChatCompletionRequest))
        await policy.admit(ctx)
        samples.append(clock() - start)
    return samples


def _time_render(template: SafeTemplate, variables: dict, n: int) -> list[int]:
    samples = []
    clock = time.perf_counter_ns
    for _ in range(n):
        start = clock()
        template.render(variables)
        samples.append(clock() - start)
    return samples


async def run(n: int) -> list[tuple[str, float, float]]:
    policy = TemplatePolicy(TEMPLATES, None, LocalStore())
    encode = msgspec.json.encode
    plain = encode({"model": "m", "messages": [
        {"role": "system", "content": "You are a support agent for Acme Cloud. Answer Ada politely."}, USER]})
    support = encode({"model": "m", "messages": [USER], "template": {"name": "support",
                                                                     "variables": {"customer": "Ada"}}})
    rag = encode({"model": "m", "messages": [], "template": {"name": "rag", "version": "2.1.0",
                                                            "variables": {"docs": DOCS, "question": "Why?"}}})
    rows = []
    gc.collect()
    gc.freeze()
    for _ in range(3):  # warm up
        await _time_admit(policy, support, 1000)
    base = await _time_admit(policy, plain, n)
    with_support = await _time_admit(policy, support, n)
    with_rag = await _time_admit(policy, rag, n)
    base_p50, base_p99 = _percentiles(base)
    rows.append(("decode + admit, no template (the same messages given)", base_p50, base_p99))
    for label, samples in (("decode + admit, 1-message template, 1 variable", with_support),
                           ("decode + admit, 3-message template, a loop over 10 documents", with_rag)):
        p50, p99 = _percentiles(samples)
        rows.append((label, p50, p99))
        rows.append(("  added by the template (p50 - no-template p50; p99 likewise)", p50 - base_p50, p99 - base_p99))
    compiled = policy.lookup("support", None)
    p50, p99 = _percentiles(_time_render(compiled.messages[0][1], {"customer": "Ada", "product": "Acme"}, n))
    rows.append(("render only (compiled, cached): 1 message", p50, p99))
    compiled = policy.lookup("rag", "2.1.0")
    variables = compiled.bind({"docs": DOCS, "question": "Why?"})
    p50, p99 = _percentiles(_time_render(compiled.messages[1][1], variables, n))
    rows.append(("render only (compiled, cached): the 10-document loop", p50, p99))
    compile_ns = []
    for _ in range(50):
        start = time.perf_counter_ns()
        SafeTemplate(TEMPLATES[1].versions[0].messages[1].content)
        compile_ns.append(time.perf_counter_ns() - start)
    p50, p99 = _percentiles(compile_ns)
    rows.append(("compile (once per version, never per request)", p50, p99))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=20000, help="requests per measurement")
    parser.add_argument("--write", action="store_true", help="write the figures into bench/RESULTS.md")
    args = parser.parse_args()
    rows = asyncio.run(run(args.n))
    width = max(len(r[0]) for r in rows)
    table = [f"| {'step':{width}} | p50 ms | p99 ms |", f"|{'-' * (width + 2)}|-------:|-------:|"]
    table += [f"| {label:{width}} | {p50:6.4f} | {p99:6.4f} |" for label, p50, p99 in rows]
    print("\n".join(table))
    added = max(rows[2][1], 0.0)
    render = rows[6][1]
    met_added = "met" if added < TARGET_ADDED_P50_MS else "missed"
    met_render = "met" if render < TARGET_RENDER_P50_MS else "missed"
    verdict = (f"Target: the template adds under {TARGET_ADDED_P50_MS} ms at p50 ({met_added}: {added:.4f} ms for a "
               f"1-message template); render well under {TARGET_RENDER_P50_MS} ms ({met_render}: {render:.4f} ms "
               "for a 10-document loop).")
    print(verdict)
    if args.write:
        body = [stamp(), "",
                "In process, one request at a time: the JSON body decoded and validated, then the template "
                "policy's admit (lookup, variable checks, sandboxed render, the request rebuilt). The no-template "
                "request carries the same rendered messages, so the difference is what the template costs.", "",
                *table, "", verdict]
        write_section(SECTION, body)
        print(f"wrote the '{SECTION}' section of bench/RESULTS.md")


if __name__ == "__main__":
    main()
