"""Task classifier: held-out accuracy, confusion matrix and classify() latency, into bench/RESULTS.md."""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]  # run as `python bench/classifier.py` from the repo root

from report import RESULTS, stamp, write_section  # noqa: E402

from routing.classifier import DEFAULT_ARTIFACT, LABELS, TaskClassifier  # noqa: E402

HELDOUT = ROOT / "training" / "data" / "heldout.jsonl"
SECTION = "## Task classifier"
SIZES = (50, 500, 2000, 100_000)  # prompt sizes in estimated tokens; the last shows the work is bounded
TARGET_P99_MS = 2.0  # at 2,000 tokens


def load_heldout() -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in HELDOUT.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["text"] for r in rows], [r["label"] for r in rows]


def accuracy_tables(clf: TaskClassifier, texts: list[str], labels: list[str]) -> tuple[float, list[str]]:
    """Accuracy, then markdown lines: per-label precision/recall/F1 and the confusion matrix."""
    pred = [clf.classify(t).task for t in texts]
    conf = {(t, p): 0 for t in LABELS for p in LABELS}
    for t, p in zip(labels, pred, strict=True):
        conf[t, p] += 1
    acc = sum(conf[lab, lab] for lab in LABELS) / len(texts)
    lines = ["| label | support | precision | recall | F1 |", "|---|---:|---:|---:|---:|"]
    for lab in LABELS:
        tp = conf[lab, lab]
        predicted, support = sum(conf[t, lab] for t in LABELS), sum(conf[lab, p] for p in LABELS)
        prec, rec = tp / predicted if predicted else 0.0, tp / support if support else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        lines.append(f"| {lab} | {support} | {prec:.3f} | {rec:.3f} | {f1:.3f} |")
    short = {lab: lab[:5] for lab in LABELS}
    lines += ["", "Confusion matrix (rows: true label, columns: predicted):", "",
              "| true \\ pred | " + " | ".join(short[p] for p in LABELS) + " |",
              "|---|" + "---:|" * len(LABELS)]
    for t in LABELS:
        cells = [str(conf[t, p]) if conf[t, p] else "·" for p in LABELS]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return acc, lines


def prompt_of(clf: TaskClassifier, texts: list[str], tokens: int) -> str:
    """A deterministic mixed-content prompt (held-out texts end to end) of about `tokens` estimated tokens."""
    pool = "\n\n".join(texts)
    text = pool * (1 + tokens * 6 // len(pool))
    lo, hi = 1, len(text)
    while lo < hi:  # shortest prefix whose estimate reaches the target
        mid = (lo + hi) // 2
        if clf.classify(text[:mid]).tokens < tokens:
            lo = mid + 1
        else:
            hi = mid
    return text[:lo] + "\n\nsummarize this"


def latency(clf: TaskClassifier, text: str, iterations: int) -> tuple[float, float, float]:
    """p50, p99 and max of classify() in milliseconds, gc disabled while timing."""
    for _ in range(200):
        clf.classify(text)
    samples = []
    gc.collect()
    gc.disable()
    try:
        for _ in range(iterations):
            t0 = time.perf_counter_ns()
            clf.classify(text)
            samples.append(time.perf_counter_ns() - t0)
    finally:
        gc.enable()
    samples.sort()
    pct = lambda q: samples[min(len(samples) - 1, int(q * len(samples)))] / 1e6  # noqa: E731
    return pct(0.50), pct(0.99), samples[-1] / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iterations", type=int, default=3000, help="timed classify() calls per prompt size")
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = ap.parse_args()

    t0 = time.perf_counter()
    clf = TaskClassifier.load()
    load_ms = (time.perf_counter() - t0) * 1e3
    texts, labels = load_heldout()
    acc, tables = accuracy_tables(clf, texts, labels)

    rows, p99_2k = [], None
    for size in SIZES:
        prompt = prompt_of(clf, texts, size)
        p50, p99, worst = latency(clf, prompt, args.iterations)
        est = clf.classify(prompt).tokens
        rows.append(f"| ~{size:,} | {est:,} | {len(prompt):,} | {p50:.3f} | {p99:.3f} | {worst:.2f} |")
        if size == 2000:
            p99_2k = p99
        print(f"{size:>7} tokens: p50 {p50:.3f} ms  p99 {p99:.3f} ms  max {worst:.2f} ms", flush=True)

    size_mb = DEFAULT_ARTIFACT.stat().st_size / 1e6
    verdict = "met" if p99_2k is not None and p99_2k < TARGET_P99_MS else "MISSED"
    body = [stamp(), "",
            f"Model: `routing/data/task_classifier.npz` ({size_mb:.2f} MB; loads in {load_ms:.0f} ms): "
            f"multinomial logistic regression over tf-idf word 1-2 grams and char_wb 2-5 grams of the first "
            f"{clf.head} + last {clf.tail} characters, plus word 1-2 grams of the first and last {clf.edge}; "
            "numpy inference (no scikit-learn at run time).", "",
            f"### Held-out accuracy: {acc:.4f} ({len(texts)} prompts, `routing/data/heldout.jsonl`)", "",
            *tables, "",
            f"### classify() latency ({args.iterations:,} calls per size after 200 warm-up, gc disabled)", "",
            "| prompt | est. tokens | chars | p50 ms | p99 ms | max ms |", "|---|---:|---:|---:|---:|---:|",
            *rows, "",
            f"Target: p99 < {TARGET_P99_MS:.0f} ms at 2,000 tokens: {verdict} ({p99_2k:.3f} ms). "
            "Past the clip window the cost no longer grows with prompt length."]
    print("\n" + "\n".join(body))
    if not args.no_write:
        write_section(SECTION, body)
        print(f"\nwrote the '{SECTION}' section of {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
