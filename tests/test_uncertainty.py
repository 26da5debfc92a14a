"""rmexp.uncertainty: AUROC of an uncertainty against error, and selective accuracy, against their definitions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from rmexp.uncertainty import auroc, selective_accuracy, summary


def auroc_by_definition(uncertainty, wrong) -> float:
    """P(u_wrong > u_right) + P(tie) / 2, over every (wrong, right) pair."""
    w, r = uncertainty[wrong], uncertainty[~wrong]
    wins = sum((a > b) + 0.5 * (a == b) for a, b in itertools.product(w, r))
    return wins / (len(w) * len(r))


@pytest.mark.parametrize("seed", range(3))
def test_auroc_is_the_share_of_wrong_right_pairs_the_uncertainty_orders_right(seed):
    rng = np.random.default_rng(seed)
    wrong = rng.random(40) < 0.3
    uncertainty = np.round(rng.normal(wrong * 0.8, 1.0), 1)  # rounded: ties occur
    assert auroc(uncertainty, wrong) == pytest.approx(auroc_by_definition(uncertainty, wrong), abs=1e-12)
    assert auroc(uncertainty, np.zeros(40, bool)) is None


def test_selective_accuracy_keeps_the_least_uncertain_pairs():
    uncertainty = np.array([0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.4, 0.6, 0.5, 1.0])
    wrong = np.array([0, 1, 0, 1, 0, 0, 1, 1, 0, 1], bool)
    assert selective_accuracy(uncertainty, wrong, 0.5) == 0.8  # pairs 0, 2, 4, 6, 8: one wrong
    assert selective_accuracy(uncertainty, wrong, 1.0) == 0.5


def test_summary_judges_the_margin_for_every_model_and_the_members_for_an_ensemble():
    rng = np.random.default_rng(0)
    chosen, rejected = rng.normal(0.3, 1, 60), rng.normal(0, 1, 60)
    single = summary(chosen, rejected)
    assert set(single) == {"abs_margin"}
    margin = chosen - rejected
    assert single["abs_margin"]["auroc"] == pytest.approx(auroc_by_definition(-np.abs(margin), margin <= 0))
    members = np.stack([np.stack([chosen + rng.normal(0, 0.5, 60), rejected], -1) for _ in range(4)])
    both = summary(members[..., 0].mean(0), members[..., 1].mean(0), members)
    assert set(both) == {"abs_margin", "spread", "disagreement"}
    low, high = both["spread"]["auroc_ci_low"], both["spread"]["auroc_ci_high"]
    assert low <= both["spread"]["auroc"] <= high
