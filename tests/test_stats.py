"""Paired statistics (rmexp.stats) on cases worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rmexp import stats
from rmexp.stats import (
    against_best,
    decisions,
    holm,
    min_detectable_difference,
    paired_bootstrap,
    paired_comparison,
    sign_test_p,
)


def test_mcnemar_exact_p_from_the_binomial():
    # 1 discordant pair one way, 5 the other: 2 * P(X <= 1), X ~ Bin(6, 1/2) = 2 * (1 + 6) / 64
    assert sign_test_p(1, 5) == pytest.approx(14 / 64, abs=1e-12)
    assert sign_test_p(5, 1) == pytest.approx(14 / 64, abs=1e-12)
    # 8 of 8 one way: 2 / 2^8
    assert sign_test_p(0, 8) == pytest.approx(2 / 256, abs=1e-12)
    # 3 vs 7 of 10: 2 * (1 + 10 + 45 + 120) / 1024
    assert sign_test_p(3, 7) == pytest.approx(352 / 1024, abs=1e-12)
    assert sign_test_p(2, 2) == 1.0 and sign_test_p(0, 0) == 1.0


def test_paired_comparison_counts_ties_as_wrong_and_pairs_the_decisions():
    # rewards with a tie in pair 3: a is wrong there, as pairwise_accuracy counts it
    a = decisions([1.0, 2.0, 0.5, 1.0, 3.0, 0.0], [0.0, 1.0, 1.0, 1.0, 2.0, 1.0])  # 1 1 0 0 1 0
    b = np.array([1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    out = paired_comparison(a, b)
    assert (out["accuracy_a"], out["accuracy_b"]) == (pytest.approx(3 / 6), pytest.approx(5 / 6))
    assert out["delta"] == pytest.approx(2 / 6)
    # pair 1: a only; pairs 2, 3, 5: b only; pairs 0, 4: alike
    assert (out["n_a_better"], out["n_b_better"], out["n_same"]) == (1, 3, 2)
    assert out["p_value"] == pytest.approx(2 * (1 + 4) / 16)  # 2 * P(X <= 1), X ~ Bin(4, 1/2)
    assert out["delta_ci_low"] <= out["delta"] <= out["delta_ci_high"]


def test_bootstrap_of_all_discordant_one_way_is_degenerate():
    a, b = np.zeros(50), np.ones(50)
    assert paired_bootstrap(a, b) == (1.0, 1.0)
    assert paired_bootstrap(b, a) == (-1.0, -1.0)
    same = np.array([1, 0, 1, 1, 0] * 10, dtype=float)
    assert paired_bootstrap(same, same) == (0.0, 0.0)  # every pair concordant: no gap in any resample


def test_bootstrap_of_two_pairs_spans_every_possible_mean():
    # differences 0 and 1: a resample's mean is 0, 1/2 or 1 with chance 1/4, 1/2, 1/4, so the 2.5% and
    # 97.5% quantiles of 10,000 resamples are 0 and 1 (a share below 2.5% for either would take ~30 sd)
    assert paired_bootstrap([0.0, 0.0], [0.0, 1.0]) == (0.0, 1.0)


def reference_bootstrap(a, b, n_resamples, seed):
    """The textbook loop: one resample at a time, from the same generator."""
    rng = np.random.default_rng(seed)
    diff = np.asarray(b, float) - np.asarray(a, float)
    means = []
    for _ in range(n_resamples):
        idx = rng.integers(0, diff.size, size=diff.size)
        means.append(sum(diff[i] for i in idx) / diff.size)
    return tuple(float(q) for q in np.quantile(means, [0.025, 0.975]))


def test_bootstrap_matches_a_slow_loop_and_does_not_depend_on_the_block_size(monkeypatch):
    rng = np.random.default_rng(7)
    a, b = rng.integers(0, 2, 96).astype(float), rng.integers(0, 2, 96).astype(float)
    expected = reference_bootstrap(a, b, 2000, seed=3)
    assert paired_bootstrap(a, b, n_resamples=2000, seed=3) == pytest.approx(expected, abs=1e-12)
    monkeypatch.setattr(stats, "_CHUNK", 96 * 7)  # blocks of 7 resamples, the last one short
    assert paired_bootstrap(a, b, n_resamples=2000, seed=3) == pytest.approx(expected, abs=1e-12)
    assert paired_bootstrap(a, b, n_resamples=2000, seed=4) != pytest.approx(expected, abs=1e-12)
    # a sweep's runs at once: each row as its own call (the same resamples)
    c = rng.integers(0, 2, 96).astype(float)
    rows = paired_bootstrap(a, np.stack([b, c]), n_resamples=2000, seed=3)
    assert rows[0] == pytest.approx(expected, abs=1e-12)
    assert rows[1] == pytest.approx(reference_bootstrap(a, c, 2000, seed=3), abs=1e-12)


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04, 0.2 times 4, 3, 2, 1 = 0.04, 0.09, 0.08, 0.2; then non-decreasing: 0.08 -> 0.09
    assert holm([0.01, 0.04, 0.03, 0.2]) == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert holm([]).size == 0


def test_against_best_marks_what_the_correction_leaves_undecided():
    best = np.ones(20)
    runs = {"best": best,
            "near": np.r_[np.zeros(2), np.ones(18)],  # 2 of 2 discordant one way: p = 2/4
            "far": np.r_[np.zeros(10), np.ones(10)]}  # 10 of 10 one way: p = 2/1024
    out = against_best(runs, "best")
    # Holm over m = 2: the smaller p times 2, the larger times 1
    assert out["near"]["p_holm"] == pytest.approx(0.5) and out["near"]["tied_with_best"]
    assert out["far"]["p_holm"] == pytest.approx(4 / 1024) and not out["far"]["tied_with_best"]
    assert out["far"]["delta"] == pytest.approx(-0.5) and out["best"]["tied_with_best"]
    assert out["far"]["delta_ci_high"] < 0 < out["near"]["delta_ci_high"] + 1e-12


def test_min_detectable_difference_solves_connors_formula():
    # 96 pairs, a quarter of them discordant: by hand, d = 0.14 needs n = (1.96 * 0.5 + 0.8416 * sqrt(0.2304))^2
    # / 0.0196 = 96.9 pairs, slightly more than 96, so the detectable gap is slightly above 0.14
    d = min_detectable_difference(96, 0.25)
    assert 0.14 < d < 0.145
    za, zb = 1.959964, 0.841621
    assert (za * 0.5 + zb * math.sqrt(0.25 - d * d)) ** 2 / (d * d) == pytest.approx(96, rel=1e-5)
    assert min_detectable_difference(400, 0.25) < d  # more pairs, finer
    assert math.isnan(min_detectable_difference(96, 0.0))
