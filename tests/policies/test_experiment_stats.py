"""The experiment statistics against hand formulas, and A/A experiments simulated with peeking every 50 units:
the always-valid p-value keeps false positives under alpha, the fixed-horizon test does not."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from policies.experiment_stats import (
    Summary,
    always_valid_p,
    compare_means,
    compare_proportions,
    hedges_g,
    needed_per_arm,
)

Z975, Z80 = 1.959963984540054, 0.8416212335729143  # standard normal quantiles, from tables


def test_welch_matches_the_hand_formulas_and_scipy_on_the_raw_samples():
    rng = np.random.default_rng(1)
    a, b = rng.normal(10, 2, 40), rng.normal(11, 4, 25)
    result = compare_means(Summary.of(a), Summary.of(b))
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    diff = b.mean() - a.mean()
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))  # Welch-Satterthwaite
    t = diff / math.sqrt(va + vb)
    assert result.p_value == pytest.approx(stats.ttest_ind(b, a, equal_var=False).pvalue, rel=1e-9)
    assert result.p_value == pytest.approx(2 * stats.t.sf(abs(t), df), rel=1e-9)
    half = stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert result.ci == pytest.approx((diff - half, diff + half), rel=1e-9)
    assert result.diff == pytest.approx(diff)


def test_a_textbook_welch_example():
    # summaries chosen so the figures can be checked by hand: diff 1, se^2 = 4/10 + 9/10 = 1.3
    result = compare_means(Summary(10, 5.0, 4.0), Summary(10, 6.0, 9.0))
    df = 1.3**2 / ((0.4**2 + 0.9**2) / 9)  # = 15.68...
    assert df == pytest.approx(15.680, abs=1e-3)
    assert result.p_value == pytest.approx(2 * stats.t.sf(1 / math.sqrt(1.3), df))
    assert 0.39 < result.p_value < 0.40


def test_hedges_g_and_the_sample_size_for_80_percent_power():
    control, variant = Summary(20, 0.0, 1.0), Summary(20, 0.5, 1.0)
    d = 0.5  # pooled sd is 1
    assert hedges_g(control, variant) == pytest.approx(d * (1 - 3 / (4 * 40 - 9)))
    # n = (1.96 + 0.84)^2 * (1 + 1) / 0.5^2 = 62.79 -> 63 per arm; 20 are there
    assert needed_per_arm(2.0, 0.5, 20, 0.05) == math.ceil((Z975 + Z80) ** 2 * 2 / 0.25) - 20 == 43
    assert compare_means(control, variant).needed_per_arm == 43
    assert needed_per_arm(2.0, 0.0, 20, 0.05) is None  # no difference: no sample size reaches it


def test_two_proportion_z_test_by_hand():
    # 30/200 errors against 50/200: pooled 0.2, se = sqrt(0.2*0.8*(2/200)) = 0.04, z = 0.1/0.04 = 2.5
    result = compare_proportions(30, 200, 50, 200)
    assert result.diff == pytest.approx(0.1)
    assert result.p_value == pytest.approx(math.erfc(2.5 / math.sqrt(2)))  # two-sided normal tail
    se = math.sqrt(0.15 * 0.85 / 200 + 0.25 * 0.75 / 200)
    assert result.ci == pytest.approx((0.1 - Z975 * se, 0.1 + Z975 * se))
    assert result.effect_size == pytest.approx(2 * math.asin(math.sqrt(0.25)) - 2 * math.asin(math.sqrt(0.15)))


def test_the_mixture_likelihood_ratio_by_hand():
    # two arms of 25: control all 0 or 2 (mean 1, var 1.0417), variant all 1 or 3 (mean 2); one evaluation
    control = np.array([0.0, 2.0] * 12 + [1.0])
    variant = control + 1.0
    values = np.concatenate([control, variant])
    treated = np.array([False] * 25 + [True] * 25)
    p = always_valid_p(values, treated, burn_in=25, tau=0.5)
    var = control.var(ddof=1)
    s2, t2 = 2 * var / 25, 0.25 * var
    log_lambda = 0.5 * math.log(s2 / (s2 + t2)) + 1.0 * t2 / (2 * s2 * (s2 + t2))
    assert p[-1] == pytest.approx(min(1.0, math.exp(-log_lambda)))
    assert np.all(p[:-1] == 1.0)  # before both arms have burn_in units, nothing is claimed


def test_the_always_valid_p_never_rises_and_finds_a_real_difference():
    rng = np.random.default_rng(3)
    treated = rng.random(4000) < 0.5
    values = rng.normal(0, 1, 4000) + 0.3 * treated  # a 0.3 sd effect
    p = always_valid_p(values, treated)
    assert np.all(np.diff(p) <= 0)
    assert p[-1] < 0.001


def _welch_peeks(values: np.ndarray, treated: np.ndarray, peeks: np.ndarray) -> np.ndarray:
    """Fixed-horizon Welch p-values at each peek, for every simulated experiment at once."""
    out = []
    for mask in (~treated, treated):
        n = np.cumsum(mask, axis=1)[:, peeks]
        s = np.cumsum(np.where(mask, values, 0), axis=1)[:, peeks]
        q = np.cumsum(np.where(mask, values**2, 0), axis=1)[:, peeks]
        out.append((n, s / n, (q - s * s / n) / (n - 1)))
    (n0, m0, v0), (n1, m1, v1) = out
    se2 = v0 / n0 + v1 / n1
    df = se2**2 / ((v0 / n0) ** 2 / (n0 - 1) + (v1 / n1) ** 2 / (n1 - 1))
    return 2 * stats.t.sf(np.abs(m1 - m0) / np.sqrt(se2), df)


@pytest.mark.parametrize("kind", ["normal", "lognormal", "bernoulli"])
def test_aa_experiments_peeked_every_50_units(kind):
    """1,000 A/A experiments of 1,500 units each, looked at after every 50 units (30 looks).

    The Monte-Carlo margin: with 1,000 experiments the false-positive rate's standard error at alpha = 0.05 is
    sqrt(0.05 * 0.95 / 1000) = 0.0069; 0.02 is about 3 standard errors, so a test at alpha would fail this only
    with probability ~0.1%. The fixed-horizon test checked the same way exceeds alpha several times over."""
    rng = np.random.default_rng({"normal": 11, "lognormal": 12, "bernoulli": 13}[kind])
    experiments, units, alpha = 1000, 1500, 0.05
    if kind == "normal":
        values = rng.normal(1.0, 1.0, (experiments, units))
    elif kind == "lognormal":  # skewed, as latencies are
        values = rng.lognormal(0.0, 1.0, (experiments, units))
    else:  # error rates
        values = (rng.random((experiments, units)) < 0.05).astype(float)
    treated = rng.random((experiments, units)) < 0.5
    peeks = np.arange(49, units, 50)
    sequential = always_valid_p(values, treated, proportion=kind == "bernoulli")[:, peeks]
    sequential_fpr = float((sequential <= alpha).any(axis=1).mean())
    assert sequential_fpr <= alpha + 0.02
    with np.errstate(divide="ignore", invalid="ignore"):  # 0/1 arms with no error yet have no variance
        fixed_fpr = float((_welch_peeks(values, treated, peeks) <= alpha).any(axis=1).mean())
    assert fixed_fpr > 2.5 * alpha, fixed_fpr
