"""Train the prompt task classifier with scikit-learn and export it for numpy inference (offline only)."""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, classification_report
from sklearn.pipeline import FeatureUnion, Pipeline

from routing.classifier import (
    DEFAULT_ARTIFACT,
    EDGE_CHARS,
    HEAD_CHARS,
    LABELS,
    TAIL_CHARS,
    TOKEN_PATTERN,
    clip_text,
    edge_text,
)

__all__ = ["build_pipeline", "export", "load_jsonl", "main"]

DATA = Path(__file__).resolve().parent / "data"
WORD_NGRAM = (1, 2)
CHAR_NGRAM = (2, 5)
# Vocabulary caps keep the artifact at a few MB; min_df drops one-off strings (numbers, names).
WORD_MAX_FEATURES = 40_000
CHAR_MAX_FEATURES = 80_000
EDGE_MAX_FEATURES = 20_000
C = 10.0  # held-out and probe accuracy are flat from 5 to 50; lower C gives softer probabilities


def load_jsonl(path: Path) -> tuple[list[str], list[str]]:
    texts, labels = [], []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                texts.append(row["text"])
                labels.append(row["label"])
    return texts, labels


def build_pipeline(head: int = HEAD_CHARS, tail: int = TAIL_CHARS, c: float = C) -> Pipeline:
    """The reference pipeline; routing.classifier reimplements its predict path in numpy."""
    pre = partial(clip_text, head=head, tail=tail)
    word = TfidfVectorizer(analyzer="word", preprocessor=pre, token_pattern=TOKEN_PATTERN, ngram_range=WORD_NGRAM,
                           sublinear_tf=True, min_df=2, max_features=WORD_MAX_FEATURES)
    char = TfidfVectorizer(analyzer="char_wb", preprocessor=pre, ngram_range=CHAR_NGRAM, sublinear_tf=True,
                           min_df=2, max_features=CHAR_MAX_FEATURES)
    edge = TfidfVectorizer(analyzer="word", preprocessor=partial(edge_text, edge=EDGE_CHARS),
                           token_pattern=TOKEN_PATTERN, ngram_range=WORD_NGRAM, sublinear_tf=True, min_df=2,
                           max_features=EDGE_MAX_FEATURES)
    clf = LogisticRegression(C=c, max_iter=3000)
    return Pipeline([("features", FeatureUnion([("word", word), ("char", char), ("edge", edge)])), ("clf", clf)])


def _vocab_bytes(vec: TfidfVectorizer) -> np.ndarray:
    terms = sorted(vec.vocabulary_, key=vec.vocabulary_.__getitem__)
    assert not any("\n" in t for t in terms)
    return np.frombuffer("\n".join(terms).encode("utf-8"), dtype=np.uint8)


def export(pipe: Pipeline, path: Path, head: int = HEAD_CHARS, tail: int = TAIL_CHARS) -> None:
    """Write vocabularies, idf, coefficients and intercepts to a compressed .npz (no pickles)."""
    word, char, edge = (t for _, t in pipe.named_steps["features"].transformer_list)
    clf: LogisticRegression = pipe.named_steps["clf"]
    order = [list(clf.classes_).index(lab) for lab in LABELS]  # store rows in LABELS order
    meta = {"labels": list(LABELS), "head_chars": head, "tail_chars": tail, "edge_chars": EDGE_CHARS,
            "token_pattern": TOKEN_PATTERN, "word_ngram": list(WORD_NGRAM), "char_ngram": list(CHAR_NGRAM)}
    np.savez_compressed(
        path,
        meta=np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8),
        word_vocab=_vocab_bytes(word),
        char_vocab=_vocab_bytes(char),
        edge_vocab=_vocab_bytes(edge),
        idf=np.concatenate([word.idf_, char.idf_, edge.idf_]).astype(np.float64),
        coef=clf.coef_[order].T.astype(np.float32),
        intercept=clf.intercept_[order].astype(np.float64),
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=DEFAULT_ARTIFACT)
    ap.add_argument("--c", type=float, default=C)
    args = ap.parse_args(argv)
    x_train, y_train = load_jsonl(DATA / "train.jsonl")
    x_test, y_test = load_jsonl(DATA / "heldout.jsonl")
    t0 = time.perf_counter()
    pipe = build_pipeline(c=args.c).fit(x_train, y_train)
    print(f"trained on {len(x_train)} examples in {time.perf_counter() - t0:.1f}s")
    print(f"train accuracy:    {accuracy_score(y_train, pipe.predict(x_train)):.4f}")
    pred = pipe.predict(x_test)
    print(f"held-out accuracy: {accuracy_score(y_test, pred):.4f} ({len(x_test)} examples)")
    print(classification_report(y_test, pred, labels=list(LABELS), digits=3))
    export(pipe, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
