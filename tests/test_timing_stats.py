"""The bench's statistics on samples whose truth is known: the interval covers, the test is right both ways."""
import numpy as np
import pytest

from levit_deploy.timing_stats import compare_rounds, median_interval


def rounds(median_ms: float, n: int, seed: int) -> np.ndarray:
    """Round times as a loaded machine gives them: log-normal spread around the median, a few slow outliers."""
    rng = np.random.default_rng(seed)
    t = median_ms * np.exp(rng.normal(0, 0.04, n))
    t[rng.random(n) < 0.05] *= 1.5
    return t


def test_the_median_interval_covers_the_true_median_about_95_percent_of_the_time():
    true_median = np.median(rounds(20.0, 1_000_000, 99))
    covered = 0
    for seed in range(200):
        lo, hi = median_interval(rounds(20.0, 60, seed), resamples=500, seed=seed)
        covered += lo <= true_median <= hi
    assert 0.88 <= covered / 200 <= 0.995


def test_the_interval_narrows_with_more_rounds():
    lo_few, hi_few = median_interval(rounds(20.0, 20, 1))
    lo_many, hi_many = median_interval(rounds(20.0, 2000, 1))
    assert hi_many - lo_many < (hi_few - lo_few) / 3


def test_two_runs_of_one_distribution_are_not_significantly_different():
    false_alarms = sum(compare_rounds(rounds(20.0, 50, seed), rounds(20.0, 50, 1000 + seed), resamples=500,
                                      seed=seed).significant for seed in range(100))
    assert false_alarms <= 10  # alpha 0.05, and the minimum effect guards further


@pytest.mark.parametrize("speedup,verdict", [(1.8, "significantly faster"), (1 / 1.25, "significantly slower")])
def test_a_real_difference_is_significant_and_has_a_direction(speedup, verdict):
    result = compare_rounds(rounds(20.0, 40, 3), rounds(20.0 / speedup, 40, 4))
    assert result.significant and result.verdict == verdict
    assert result.p_value < 0.01
    assert result.ratio == pytest.approx(speedup, rel=0.05)


def test_a_tiny_but_detectable_difference_stays_below_the_minimum_effect():
    """1 % apart with thousands of rounds: the permutation test alone would call it; run-to-run drift is larger."""
    fast, slow = rounds(20.0, 4000, 5), rounds(20.2, 4000, 6)
    assert compare_rounds(fast, slow, min_effect=0).significant
    result = compare_rounds(fast, slow)
    assert not result.significant and result.verdict == "not significantly different"


def test_too_few_rounds_is_refused():
    with pytest.raises(ValueError, match="too few rounds"):
        compare_rounds([1.0], [1.0, 2.0])
