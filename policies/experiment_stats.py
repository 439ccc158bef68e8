"""Experiment statistics, pure: Welch's t-test, two-proportion z-test, effect size, power, and an always-valid
p-value from a mixture sequential probability ratio test (mSPRT)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from types import ModuleType

import numpy as np

__all__ = ["POWER", "TAU", "BURN_IN", "Comparison", "Summary", "always_valid_p", "compare_means",
           "compare_proportions", "hedges_g", "needed_per_arm"]

POWER = 0.8
# The mixing distribution's scale, in standard deviations of one observation: H ~ N(0, (TAU * sigma)^2). Johari et
# al. (2017) show the test is always valid for any tau; it is most powerful for effects near tau, and 0.1 sigma is
# a small effect (Cohen), the size A/B tests are usually run to find.
TAU = 0.1
# Observations per arm before the sequential statistic is evaluated: the variance is a plug-in estimate, and with a
# handful of points it can be near zero by chance, which would inflate the likelihood ratio.
BURN_IN = 20



@functools.cache
def _stats() -> ModuleType:
    """scipy.stats, imported on first use: it costs ~2.7 s of every gateway start, and only results need it
    (computed in a worker thread)."""
    from scipy import stats

    return stats

@dataclass(frozen=True, slots=True)
class Summary:
    """One arm's sample: its size, mean and unbiased variance (ddof=1)."""

    n: int
    mean: float
    var: float

    @classmethod
    def of(cls, values: np.ndarray) -> Summary:
        n = int(values.size)
        return cls(n, float(values.mean()) if n else math.nan, float(values.var(ddof=1)) if n > 1 else math.nan)


@dataclass(frozen=True, slots=True)
class Comparison:
    """A variant against control: `diff` is treatment minus control; `ci` its confidence interval."""

    test: str  # welch_t | two_proportion_z
    control_mean: float
    variant_mean: float
    diff: float
    p_value: float
    ci: tuple[float, float]
    effect_size: float | None  # Hedges' g for means, Cohen's h for proportions
    needed_per_arm: int | None  # more units per arm for 80% power at the observed difference; None: not estimable

    def as_dict(self) -> dict:
        def num(x: float | None) -> float | None:
            return None if x is None or not math.isfinite(x) else round(x, 10)
        return {"test": self.test, "control_mean": num(self.control_mean), "variant_mean": num(self.variant_mean),
                "diff": num(self.diff), "p_value": num(self.p_value), "ci95": [num(self.ci[0]), num(self.ci[1])],
                "effect_size": num(self.effect_size), "needed_per_arm": self.needed_per_arm}


def hedges_g(control: Summary, variant: Summary) -> float | None:
    """Cohen's d on the pooled standard deviation, times Hedges' small-sample correction 1 - 3 / (4 (n1+n2) - 9)."""
    n1, n2 = control.n, variant.n
    if n1 < 2 or n2 < 2:
        return None
    pooled = ((n1 - 1) * control.var + (n2 - 1) * variant.var) / (n1 + n2 - 2)
    if pooled <= 0:
        return None
    return (variant.mean - control.mean) / math.sqrt(pooled) * (1 - 3 / (4 * (n1 + n2) - 9))


def needed_per_arm(var_sum: float, diff: float, have: int, alpha: float, power: float = POWER) -> int | None:
    """Units per arm still needed for `power` in a two-sided test at `alpha`, if the true difference were the
    observed one: n = (z_{1-alpha/2} + z_power)^2 * (var_c + var_v) / diff^2, less what the smaller arm has."""
    if not math.isfinite(var_sum) or not math.isfinite(diff) or diff == 0:
        return None
    z = _stats().norm.ppf(1 - alpha / 2) + _stats().norm.ppf(power)
    return max(0, math.ceil(z * z * var_sum / (diff * diff)) - have)


def compare_means(control: Summary, variant: Summary, alpha: float = 0.05) -> Comparison | None:
    """Welch's t-test (unequal variances) and the Welch-Satterthwaite confidence interval of the difference."""
    if control.n < 2 or variant.n < 2:
        return None
    diff = variant.mean - control.mean
    a, b = control.var / control.n, variant.var / variant.n
    se2 = a + b
    if se2 <= 0:  # both arms constant: nothing varies, so no test (p=1 only when they agree)
        return Comparison("welch_t", control.mean, variant.mean, diff, 1.0 if diff == 0 else 0.0, (diff, diff),
                          None, None)
    p = _stats().ttest_ind_from_stats(variant.mean, math.sqrt(variant.var), variant.n, control.mean,
                                   math.sqrt(control.var), control.n, equal_var=False).pvalue
    df = se2 * se2 / (a * a / (control.n - 1) + b * b / (variant.n - 1))
    half = _stats().t.ppf(1 - alpha / 2, df) * math.sqrt(se2)
    return Comparison("welch_t", control.mean, variant.mean, diff, float(p), (diff - half, diff + half),
                      hedges_g(control, variant),
                      needed_per_arm(control.var + variant.var, diff, min(control.n, variant.n), alpha))


def compare_proportions(control_hits: int, control_n: int, variant_hits: int, variant_n: int,
                        alpha: float = 0.05) -> Comparison | None:
    """Two-proportion z-test on the pooled rate; the interval uses the unpooled (Wald) standard error."""
    if control_n < 1 or variant_n < 1:
        return None
    p1, p2 = control_hits / control_n, variant_hits / variant_n
    diff = p2 - p1
    pooled = (control_hits + variant_hits) / (control_n + variant_n)
    se0 = math.sqrt(pooled * (1 - pooled) * (1 / control_n + 1 / variant_n))
    p = 1.0 if se0 == 0 else float(2 * _stats().norm.sf(abs(diff) / se0))
    var1, var2 = p1 * (1 - p1), p2 * (1 - p2)
    half = _stats().norm.ppf(1 - alpha / 2) * math.sqrt(var1 / control_n + var2 / variant_n)
    h = 2 * math.asin(math.sqrt(p2)) - 2 * math.asin(math.sqrt(p1))
    return Comparison("two_proportion_z", p1, p2, diff, p, (diff - half, diff + half), h,
                      needed_per_arm(var1 + var2, diff, min(control_n, variant_n), alpha))


def always_valid_p(values: np.ndarray, treated: np.ndarray, *, tau: float = TAU, burn_in: int = BURN_IN,
                   proportion: bool = False) -> np.ndarray:
    """The always-valid p-value after each observation, along the last axis (several experiments at once).

    `values` in arrival order; `treated` True where the observation is the variant's, False for control. The
    statistic is Johari et al.'s ("Always valid inference", 2017) normal-mixture likelihood ratio on the
    difference of means, with the difference's variance s^2 = var_c/n_c + var_v/n_v estimated from the data:
        Lambda = sqrt(s^2 / (s^2 + t^2)) * exp(d^2 t^2 / (2 s^2 (s^2 + t^2))),   t^2 = (tau * sigma)^2,
    which for equal arms is their formula (s^2 = V/n). Under no difference Lambda is a martingale, so by Ville's
    inequality P(Lambda ever reaches 1/alpha) <= alpha: p_n = min(1, 1 / max_{k<=n} Lambda_k) may be read at any
    time, as often as one likes. For proportions the variance uses the pooled rate (add-one smoothed).
    """
    values = np.asarray(values, dtype=float)
    treated = np.asarray(treated, dtype=bool)
    counts = [np.cumsum(mask, axis=-1) for mask in (~treated, treated)]
    sums = [np.cumsum(np.where(mask, values, 0.0), axis=-1) for mask in (~treated, treated)]
    with np.errstate(divide="ignore", invalid="ignore"):
        means = [s / n for s, n in zip(sums, counts, strict=True)]
        if proportion:
            n_all = counts[0] + counts[1]
            rate = (sums[0] + sums[1] + 1) / (n_all + 2)
            sigma2 = rate * (1 - rate)
            se2 = sigma2 * (1 / counts[0] + 1 / counts[1])
        else:
            squares = [np.cumsum(np.where(mask, values * values, 0.0), axis=-1) for mask in (~treated, treated)]
            variances = [(q - n * m * m) / (n - 1) for q, n, m in zip(squares, counts, means, strict=True)]
            se2 = variances[0] / counts[0] + variances[1] / counts[1]
            sigma2 = (variances[0] + variances[1]) / 2
        t2 = tau * tau * sigma2
        diff = means[1] - means[0]
        log_lambda = 0.5 * np.log(se2 / (se2 + t2)) + diff * diff * t2 / (2 * se2 * (se2 + t2))
    ready = (counts[0] >= burn_in) & (counts[1] >= burn_in) & (se2 > 0) & np.isfinite(log_lambda)
    log_lambda = np.where(ready, log_lambda, -np.inf)
    best = np.maximum.accumulate(log_lambda, axis=-1)
    return np.minimum(1.0, np.exp(-best))
