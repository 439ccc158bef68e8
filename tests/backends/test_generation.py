"""Sampling one token: `draw` picks indices in proportion to their weights and never one without weight."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from backends.generation import SamplingParams, draw, sample_next


def generator(seed: int) -> torch.Generator:
    made = torch.Generator()
    made.manual_seed(seed)
    return made


def test_draws_follow_the_weights() -> None:
    weights = torch.tensor([0.1, 0.25, 0.05, 0.6])
    rng = generator(1)
    counts = torch.bincount(torch.tensor([draw(weights, rng) for _ in range(20_000)]), minlength=4)
    # seeded, so the same counts every run: a skewed sampler (or one off by an index) fails this by far
    assert chisquare(counts.numpy(), (weights * 20_000).numpy()).pvalue > 0.01


def test_unnormalised_weights_and_a_vocabulary_sized_row() -> None:
    weights = torch.zeros(49_152)
    weights[[3, 40_000, 49_151]] = torch.tensor([2.0, 6.0, 2.0])  # sum 10, not 1
    rng = generator(2)
    counts = torch.bincount(torch.tensor([draw(weights, rng) for _ in range(5_000)]), minlength=49_152)
    assert set(torch.nonzero(counts).flatten().tolist()) == {3, 40_000, 49_151}
    assert chisquare(counts[[3, 40_000, 49_151]].numpy(), [1_000, 3_000, 1_000]).pvalue > 0.01


def test_a_zero_weight_is_never_drawn_first_last_or_between() -> None:
    # 1e-30 does not move the running total past 1.0: never drawn in practice, yet it is a weight, unlike the zeros
    weights = torch.tensor([0.0, 1.0, 0.0, 0.0, 1e-30, 0.0])
    rng = generator(3)
    assert {draw(weights, rng) for _ in range(2_000)} <= {1, 4}
    assert {draw(torch.tensor([0.0, 0.0, 5.0]), rng) for _ in range(100)} == {2}


def test_the_same_seed_replays_the_same_draws() -> None:
    weights = torch.softmax(torch.randn(1_000, generator=generator(4)), dim=0)
    first, second = generator(5), generator(5)
    assert [draw(weights, first) for _ in range(50)] == [draw(weights, second) for _ in range(50)]


@pytest.mark.parametrize("weights", [torch.zeros(4), torch.tensor([1.0, float("nan"), 1.0])])
def test_weights_that_are_no_distribution_are_refused(weights: torch.Tensor) -> None:
    with pytest.raises(RuntimeError, match="invalid distribution"):
        draw(weights, generator(6))


def test_top_p_samples_only_the_nucleus() -> None:
    logits = torch.tensor([4.0, 3.0, 0.0, -2.0, -5.0])  # softmax: ~0.72, 0.26, 0.013, ...
    rng = generator(7)
    params = SamplingParams(max_new_tokens=1, temperature=1.0, top_p=0.9)
    picked = {sample_next(logits.clone(), params, rng, None) for _ in range(500)}
    assert picked == {0, 1}
