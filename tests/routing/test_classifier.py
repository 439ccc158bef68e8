"""The prompt task classifier: shipped artifact, accuracy, sklearn parity, long prompts, prompt_text."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import numpy as np
import pytest

from protocol.openai import Message
from routing.classifier import DEFAULT_ARTIFACT, LABELS, PromptAnalysis, TaskClassifier
from routing.classifier import prompt_text as typed_prompt_text


def prompt_text(messages: list[dict]) -> str:
    return typed_prompt_text(msgspec.convert(messages, list[Message]))

DATA = Path(__file__).resolve().parents[2] / "training" / "data"


@pytest.fixture(scope="module")
def clf() -> TaskClassifier:
    return TaskClassifier.load()


def _jsonl(name: str) -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["text"] for r in rows], [r["label"] for r in rows]


def test_artifact_loads_and_is_small(clf: TaskClassifier) -> None:
    assert clf.labels == LABELS
    assert DEFAULT_ARTIFACT.stat().st_size < 5_000_000
    assert TaskClassifier.load(DEFAULT_ARTIFACT).labels == LABELS


# Written for this test; none of these strings is in train.jsonl or heldout.jsonl.
CLEAR = {
    "code": ["Write a Python function that returns the second largest number in a list.",
             "why does `git push` say 'rejected, non-fast-forward'?",
             "def area(r): return 3.14 * r ^ 2\n\nthis gives weird results, what's wrong?",
             "Write a Dockerfile for a FastAPI app served by uvicorn on port 8000."],
    "reasoning": ["If 4 notebooks cost $10, how much do 14 notebooks cost?",
                  "Solve for y: 7y - 4 = 3y + 20",
                  "Prove that the sum of three consecutive integers is divisible by 3.",
                  "A die is rolled twice. What is the probability that both rolls are even?"],
    "creative": ["Write a short poem about a lighthouse in winter.",
                 "Give me five names for a bakery that only sells croissants.",
                 "Write a bedtime story about a sleepy owl who is afraid of the dark.",
                 "Write song lyrics about driving home at night."],
    "summarization": ["Summarize this in one sentence: The library will close for renovations from June to August. "
                      "During this time, books can be returned at the community center, and the online catalogue "
                      "will remain available. Reopening events are planned for early September.",
                      "Here are my notes: the vendor missed two deadlines, costs rose 15%, and the team wants a "
                      "new supplier by Q3.\n\ntl;dr?"],
    "translation": ["Translate into Italian: The museum opens at nine and closes at six.",
                    "How do you say 'see you next week' in German?",
                    "What does 'Je suis désolé pour le retard' mean in English?"],
    "extraction": ["Extract the names and dates as JSON: Maria joined on 3 April 2021 and Kofi on 9 May 2022.",
                   "Is this review positive or negative? 'The battery died after a day and support never replied.'",
                   "Classify this message as spam or not spam: 'Claim your free vacation now, reply WIN!'"],
    "qa": ["What is the capital of Kenya?", "Why do planets orbit the sun?", "Who painted the Sistine Chapel ceiling?",
           "How do whales breathe?"],
    "chat": ["hey, how's it going?", "thanks, that was helpful!", "I'm feeling a bit lonely tonight.",
             "What's your favourite kind of music?"],
}


@pytest.mark.parametrize(("label", "text"), [(lab, t) for lab, ts in CLEAR.items() for t in ts])
def test_clear_unseen_examples(clf: TaskClassifier, label: str, text: str) -> None:
    assert clf.classify(text).task == label


def test_heldout_accuracy(clf: TaskClassifier) -> None:
    texts, labels = _jsonl("heldout.jsonl")
    assert len(texts) >= 8 * 60
    acc = np.mean([clf.classify(t).task == y for t, y in zip(texts, labels, strict=True)])
    assert acc >= 0.95, acc


def test_heldout_is_disjoint_from_training() -> None:
    train, _ = _jsonl("train.jsonl")
    heldout, _ = _jsonl("heldout.jsonl")
    assert not {t.lower() for t in train} & {t.lower() for t in heldout}


def test_numpy_inference_matches_sklearn(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    from training.train_classifier import build_pipeline, export

    texts, labels = _jsonl("train.jsonl")
    pick = np.random.default_rng(7).choice(len(texts), 1500, replace=False)
    pipe = build_pipeline().fit([texts[i] for i in pick], [labels[i] for i in pick])
    export(pipe, tmp_path / "model.npz")
    mine = TaskClassifier.load(tmp_path / "model.npz")
    probe, _ = _jsonl("heldout.jsonl")
    probe = probe[::3] + ["", "   ", "日本語の文章を要約してください。", "emoji 🙂✨ and\u00a0nbsp\ttabs", "x" * 6000]
    order = [list(pipe.classes_).index(lab) for lab in LABELS]
    ref = pipe.decision_function(probe)[:, order]
    ours = np.array([mine.decision(t) for t in probe])
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert [LABELS[i] for i in ref.argmax(1)] == [mine.classify(t).task for t in probe]


ARTICLE = ("The regional transit authority reported that ridership rose 8 percent last year, driven by new express "
           "routes and lower weekend fares. Officials said the bus fleet would be fully electric by 2030, although "
           "the plan depends on a federal grant that has not yet been approved. ") * 40
CODE = ("def load(path):\n    with open(path) as f:\n        rows = [line.split(',') for line in f]\n"
        "    return {r[0]: int(r[1]) for r in rows}\n\n") * 100


def test_long_prompts_keep_the_instruction(clf: TaskClassifier) -> None:
    assert len(ARTICLE) > 10_000 and len(CODE) > 10_000
    assert clf.classify(ARTICLE + "\n\nsummarize this").task == "summarization"
    assert clf.classify("Summarize the following article:\n\n" + ARTICLE).task == "summarization"
    assert clf.classify(CODE + "\n\nfix the bug").task == "code"
    assert clf.classify("Translate this into Spanish:\n\n" + ARTICLE).task == "translation"
    assert clf.classify(ARTICLE + "\n\nExtract every number and what it refers to as JSON").task == "extraction"


def test_long_prompt_token_estimate_scales(clf: TaskClassifier) -> None:
    sample = ARTICLE[:1400]  # under the clip: exact word count
    short, long = clf.classify(sample), clf.classify(ARTICLE * 25)
    assert 250 <= short.tokens <= 400  # ~1400 chars of English prose
    ratio = (long.tokens / short.tokens) / (len(ARTICLE * 25) / len(sample))
    assert 0.85 < ratio < 1.15  # past the clip, words are extrapolated from the sample's density


def test_result_shape_and_determinism(clf: TaskClassifier) -> None:
    text = "Write a haiku about the sea, then explain your word choices step by step."
    a, b = clf.classify(text), TaskClassifier.load().classify(text)
    assert isinstance(a, PromptAnalysis) and a == b
    assert set(a.scores) == set(LABELS)
    assert abs(sum(a.scores.values()) - 1.0) < 1e-9
    assert a.confidence == max(a.scores.values()) == a.scores[a.task]
    assert 0.0 <= a.complexity <= 1.0
    with pytest.raises(AttributeError):
        a.task = "chat"  # type: ignore[misc]


def test_empty_and_tiny_inputs(clf: TaskClassifier) -> None:
    for text in ("", " ", "?", "🙂"):
        a = clf.classify(text)
        assert a.task in LABELS and 0.0 <= a.complexity <= 1.0
    assert clf.classify("").tokens == 0


def test_complexity_orders_prompts(clf: TaskClassifier) -> None:
    easy = clf.classify("hi").complexity
    hard = clf.classify(
        "Design a distributed rate limiter for a multi-region API. It must handle 50k requests per second, "
        "avoid a single point of failure and degrade gracefully. Compare token bucket and sliding window "
        "algorithms, analyze the trade-offs and edge cases, and implement the core in Go with tests.\n"
        "- latency under 2 ms\n- no more than 1% over-admission\n- explain the consistency model"
    ).complexity
    assert easy < 0.2 < 0.6 < hard


def test_prompt_text_content_parts_and_images() -> None:
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "What breed is this dog?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "text", "text": "It is very fluffy."},
    ]}]
    text = prompt_text(messages)
    assert "What breed is this dog?" in text and "It is very fluffy." in text
    assert "base64" not in text and "image" not in text


def test_prompt_text_weights_last_user_message(clf: TaskClassifier) -> None:
    system = {"role": "system", "content": "You are an expert Python developer. Always answer with code. " * 20}
    thanks = prompt_text([system, {"role": "user", "content": "thanks!"}])
    assert thanks == "thanks!"  # context may never outweigh the user's own words
    assert clf.classify(thanks).task == "chat"
    question = "Who was the first person to walk on the moon, and in what year did it happen?"
    text = prompt_text([system, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "def x(): ..."},
                        {"role": "user", "content": question}])
    assert text.endswith(question) and len(text) < 2 * len(question) + 10
    assert "def x()" not in text
    assert clf.classify(text).task == "qa"


def test_prompt_text_follow_up_uses_previous_turn(clf: TaskClassifier) -> None:
    text = prompt_text([
        {"role": "user", "content": "Write a limerick about a cat who loves jazz"},
        {"role": "assistant", "content": "There once was a cat..."},
        {"role": "user", "content": "nice, now make it longer and funnier"},
    ])
    assert text.startswith("Write a limerick") and text.endswith("funnier")
    assert clf.classify(text).task == "creative"


def test_prompt_text_system_can_set_the_task(clf: TaskClassifier) -> None:
    text = prompt_text([
        {"role": "system", "content": "Translate the user's message into French."},
        {"role": "user", "content": "Our office will be closed next Monday for the public holiday."},
    ])
    assert text.startswith("Translate the user's message")
    assert clf.classify(text).task == "translation"


def test_prompt_text_edge_cases() -> None:
    assert prompt_text([]) == ""
    assert prompt_text([{"role": "system", "content": "Only a system message"}]) == "Only a system message"
    assert prompt_text([{"role": "user", "content": None}]) == ""
    long = "word " * 400
    assert prompt_text([{"role": "system", "content": "Be terse."}, {"role": "user", "content": long}]) == long.strip()
