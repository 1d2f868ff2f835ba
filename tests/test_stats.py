"""companion.stats: standard errors, bootstrap intervals and paired comparisons on known data."""

import math

import numpy as np
import pytest

from companion import stats


def test_standard_error_of_a_proportion_matches_the_formula():
    values = np.r_[np.ones(30), np.zeros(70)]
    # sample sd with ddof=1: sqrt(p(1-p) * n/(n-1))
    expected = math.sqrt(0.3 * 0.7 * 100 / 99) / 10
    assert stats.standard_error(values) == pytest.approx(expected)


def test_bootstrap_interval_covers_the_mean_and_is_near_the_normal_one():
    values = np.r_[np.ones(60), np.zeros(140)]
    est = stats.estimate(values)
    assert est.n == 200 and est.mean == pytest.approx(0.3)
    assert est.low < 0.3 < est.high
    # the percentile bootstrap of a mean of 200 items is close to mean +- 1.96 se
    assert est.low == pytest.approx(0.3 - 1.96 * est.se, abs=0.015)
    assert est.high == pytest.approx(0.3 + 1.96 * est.se, abs=0.015)


def test_interval_is_seeded_and_shrinks_with_more_items():
    rng = np.random.default_rng(1)
    small = rng.random(50) < 0.5
    large = rng.random(800) < 0.5
    assert stats.estimate(small) == stats.estimate(small)
    assert stats.estimate(large).half_width < stats.estimate(small).half_width / 2


def test_constant_scores_have_a_zero_width_interval():
    est = stats.estimate([1, 1, 1])
    assert (est.low, est.mean, est.high, est.se) == (1.0, 1.0, 1.0, 0.0)


def test_proportion_equals_estimate_of_ones_and_zeros():
    assert stats.proportion(31, 100) == stats.estimate([1] * 31 + [0] * 69)
    with pytest.raises(ValueError, match="successes"):
        stats.proportion(5, 3)


def test_paired_comparison_sees_a_consistent_small_gain_that_separate_intervals_miss():
    rng = np.random.default_rng(0)
    item_difficulty = rng.random(300)
    b = item_difficulty
    a = item_difficulty + 0.03  # A is better on every item by a little
    comparison = stats.paired(a, b)
    assert comparison.significant and comparison.difference.low > 0
    assert comparison.wins == 300 and comparison.losses == 0
    # the unpaired intervals overlap: only the paired view shows the gain
    assert comparison.a.low < comparison.b.high


def test_paired_comparison_of_a_system_with_itself_is_zero_and_not_significant():
    values = np.random.default_rng(2).random(100)
    comparison = stats.paired(values, values)
    assert comparison.difference.mean == 0 and not comparison.significant


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="same items"):
        stats.paired([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="empty"):
        stats.estimate([])
    with pytest.raises(ValueError, match="NaN"):
        stats.estimate([0.1, float("nan")])


def test_format_table_and_error_bars():
    est = stats.Estimate(mean=0.31, low=0.25, high=0.37, n=200, se=0.03)
    assert est.format() == "0.31 [0.25, 0.37]"
    assert est.format(0, percent=True) == "31% [25%, 37%]"
    assert str(est) == "0.31 [0.25, 0.37] (n=200)"
    rows = stats.table({"lora": est}, score="EM")
    assert rows == [{"system": "lora", "EM": 0.31, "95% CI": "[0.250, 0.370]", "n": 200}]
    assert stats.markdown_table(rows).splitlines()[0] == "| system | EM | 95% CI | n |"
    assert np.allclose(stats.error_bars([est]), [[0.06], [0.06]])
