"""Is a variant better beyond noise: mean and spread over seeds, and Welch's t-test against the baseline.

Welch's test (unequal variances) is the one to use for a few seeds per variant: it does not assume a
change leaves the run-to-run spread alone.
"""

from __future__ import annotations

import math
import statistics


def mean_std(values: list[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (n - 1); the std is nan for a single value."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else math.nan


def welch_p(a: list[float], b: list[float]) -> float:
    """Two-sided p-value of Welch's t-test that a and b have the same mean; nan when either has fewer
    than two values or both have no spread (the test is undefined there)."""
    if len(a) < 2 or len(b) < 2:
        return math.nan
    from scipy.stats import ttest_ind

    return float(ttest_ind(a, b, equal_var=False).pvalue)
