"""Confidence intervals over seeds and paired differences between settings: the few statistics a sweep report needs.

Plain Python (no numpy, scipy or torch), so that kdlab-report stays light: the Student t quantile comes from the
closed form of the t distribution for whole degrees of freedom (Abramowitz & Stegun 26.7.3-4), inverted by bisection.
Seeds are few and whole, so whole degrees of freedom are all a report needs.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Hashable, Mapping, Sequence

CONFIDENCE = 0.95


def t_central_probability(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with `df` whole degrees of freedom (A&S 26.7.3 odd df, 26.7.4 even df): a finite
    sum in theta = atan(t / sqrt(df)), exact to rounding, no special functions needed."""
    _check_df(df)
    theta = math.atan(abs(t) / math.sqrt(df))
    cos2, sin = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 0:  # sin(theta) * (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... + cos^(df-2) term)
        term = total = 1.0
        for k in range(1, df // 2):
            term *= cos2 * (2 * k - 1) / (2 * k)
            total += term
        return sin * total
    # odd: 2/pi * (theta + sin * (cos + 2/3 cos^3 + ... + cos^(df-2) term)); df = 1 keeps theta alone
    term = total = math.cos(theta)
    for k in range(1, (df - 1) // 2):
        term *= cos2 * (2 * k) / (2 * k + 1)
        total += term
    return 2 / math.pi * (theta + (sin * total if df > 1 else 0.0))


def t_quantile(probability: float, df: int) -> float:
    """The `probability` quantile of Student's t with `df` degrees of freedom, e.g. t_quantile(0.975, 4) = 2.7764;
    bisection on the central probability, which rises monotonically in t (60 halvings: below 1e-12 relative)."""
    _check_df(df)
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability must lie strictly between 0 and 1, got {probability}")
    if probability < 0.5:
        return -t_quantile(1.0 - probability, df)
    central = 2.0 * probability - 1.0
    low, high = 0.0, 1.0
    while t_central_probability(high, df) < central:
        low, high = high, 2.0 * high
    for _ in range(200):
        middle = (low + high) / 2
        if t_central_probability(middle, df) < central:
            low = middle
        else:
            high = middle
        if high - low <= 1e-13 * high:
            break
    return (low + high) / 2


def _check_df(df: int) -> None:
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"degrees of freedom must be a whole number >= 1 (n - 1 for n >= 2 values), got {df!r}")


@dataclass(frozen=True)
class Interval:
    """Mean of n values with its two-sided t interval; low and high are None below two values (no spread known)."""

    mean: float
    n: int
    std: float | None = None  # sample standard deviation (n - 1)
    low: float | None = None
    high: float | None = None
    confidence: float = CONFIDENCE

    @property
    def half_width(self) -> float | None:
        return None if self.low is None or self.high is None else (self.high - self.low) / 2

    @property
    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of zero; False when it holds zero or there is none."""
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean ± t_{(1+c)/2, n-1} * s / sqrt(n): the interval that covers the mean of the seeds' distribution in a
    fraction `confidence` of repeated sweeps, assuming roughly normal run-to-run variation. With few seeds t is wide
    (12.7 at n=2), which is the honest price of few seeds."""
    if not values:
        raise ValueError("an interval needs at least one value")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Interval(mean=mean, n=1, confidence=confidence)
    std = statistics.stdev(values)
    half = t_quantile((1.0 + confidence) / 2.0, len(values) - 1) * std / math.sqrt(len(values))
    return Interval(mean=mean, n=len(values), std=std, low=mean - half, high=mean + half, confidence=confidence)


@dataclass(frozen=True)
class Paired:
    """Differences b - a of two settings, seed by seed, over the seeds both have."""

    seeds: list[Any]  # the seeds present on both sides, in a's order
    differences: list[float]
    only_a: list[Any]  # seeds left out: present on one side only
    only_b: list[Any]
    interval: Interval | None  # None when no seed is on both sides

    @property
    def constant(self) -> bool:
        """Every seed gives the same difference (to rounding): the interval is a point, a fact worth saying."""
        return len(self.differences) > 1 and max(self.differences) - min(self.differences) <= 1e-12


def paired_differences(a: Mapping[Hashable, float], b: Mapping[Hashable, float],
                       confidence: float = CONFIDENCE) -> Paired:
    """Match two settings' values by seed and take b - a per seed. Runs with the same seed see the same data order
    and initialisation, so their difference cancels what the seeds share and the interval is usually far narrower
    than the two settings' own intervals suggest."""
    seeds = [seed for seed in a if seed in b]
    differences = [float(b[seed]) - float(a[seed]) for seed in seeds]
    return Paired(
        seeds=seeds,
        differences=differences,
        only_a=[seed for seed in a if seed not in b],
        only_b=[seed for seed in b if seed not in a],
        interval=t_interval(differences, confidence) if differences else None,
    )


def binomial_standard_error(p: float, n: int) -> float:
    """sqrt(p (1 - p) / n): how much an accuracy p measured on n problems moves from the draw of problems alone."""
    if not 0.0 <= p <= 1.0 or n < 1:
        raise ValueError(f"a binomial standard error needs 0 <= p <= 1 and n >= 1, got p={p}, n={n}")
    return math.sqrt(p * (1.0 - p) / n)
