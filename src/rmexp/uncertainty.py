"""How well a per-pair uncertainty flags the pairs a reward model decides wrong (rmexp-evaluate's `uncertainty`).

Every model gets the baseline any uncertainty must beat, the plain |mean margin| (a small margin: unsure); an
ensemble adds its members' spread of the margin and their disagreement (the share of members deciding the pair
against the mean). For each: the AUROC of the uncertainty against error (0.5: no better than chance; from the
Mann-Whitney U of scipy, ties counted half) with a 95% pair-bootstrap interval, and the selective accuracy: the
accuracy on the most certain 50% and 80% of pairs.
"""

from __future__ import annotations

import numpy as np

COVERAGES = (0.5, 0.8)


def auroc(uncertainty: np.ndarray, wrong: np.ndarray) -> float | None:
    """P(a wrong pair is more uncertain than a right one), ties half; None when all pairs are right or all wrong."""
    from scipy.stats import mannwhitneyu

    wrong = wrong.astype(bool)
    n_wrong, n_right = int(wrong.sum()), int((~wrong).sum())
    if n_wrong == 0 or n_right == 0:
        return None
    u = mannwhitneyu(uncertainty[wrong], uncertainty[~wrong], alternative="two-sided").statistic
    return float(u) / (n_wrong * n_right)


def selective_accuracy(uncertainty: np.ndarray, wrong: np.ndarray, coverage: float) -> float:
    """Accuracy on the ceil(coverage * n) least uncertain pairs (ties: the earlier pair first)."""
    keep = max(1, int(np.ceil(coverage * len(wrong))))
    order = np.argsort(uncertainty, kind="stable")[:keep]
    return float(1.0 - wrong[order].mean())


def judge(uncertainty: np.ndarray, wrong: np.ndarray, n_resamples: int = 1000, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_resamples):
        idx = rng.integers(0, len(wrong), len(wrong))
        value = auroc(uncertainty[idx], wrong[idx])
        if value is not None:
            boot.append(value)
    low, high = (np.quantile(boot, [0.025, 0.975]).tolist() if boot else (None, None))
    return {"auroc": auroc(uncertainty, wrong), "auroc_ci_low": low, "auroc_ci_high": high,
            **{f"selective_accuracy_{int(c * 100)}": selective_accuracy(uncertainty, wrong, c) for c in COVERAGES}}


def member_margins(members: np.ndarray) -> np.ndarray:
    """Each member's margin of each pair (K x n, float64) from an ensemble's standardized rewards (K x n x 2); their
    population standard deviation over members is the ensemble's per-pair uncertainty."""
    return members[..., 0].astype(np.float64) - members[..., 1].astype(np.float64)


def summary(chosen: np.ndarray, rejected: np.ndarray, members: np.ndarray | None = None) -> dict:
    """`chosen`, `rejected`: the model's rewards (n); `members`: an ensemble's standardized member rewards (K x n x 2).
    Ties count as wrong, as pairwise accuracy counts them."""
    margin = np.asarray(chosen, dtype=np.float64) - np.asarray(rejected, dtype=np.float64)
    wrong = margin <= 0
    out = {"abs_margin": judge(-np.abs(margin), wrong)}
    if members is not None and len(members) > 1:
        margins = member_margins(members)
        out["spread"] = judge(margins.std(axis=0), wrong)
        out["disagreement"] = judge(((margins > 0) != (margin > 0)[None, :]).mean(axis=0), wrong)
    return out
