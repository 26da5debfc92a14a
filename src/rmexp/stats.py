"""Paired statistics for runs scored on the same eval pairs: is a gap in pairwise accuracy real?

Two runs that scored the same pairs are compared pair by pair, not as two independent proportions:
most pairs are decided alike by both, and only the pairs they disagree on (the discordant ones)
carry information about which run is better. Per pair a run's decision is 1 (chosen won), 0 (it did
not: a tie counts as wrong, as in `metrics.pairwise_metrics`), or, for a seed-averaged run, the share
of its seeds that got the pair right.

- `paired_comparison`: accuracy of each, the difference b - a with its 95% paired-bootstrap interval
  (`paired_bootstrap`), the counts, and the exact sign-test p-value (`sign_test_p`), which on 0/1
  decisions is the exact McNemar test.
- `against_best`: every run against the best one, p-values Holm-corrected across runs (`holm`), and
  which runs cannot be told apart from the best.
- `min_detectable_difference`: the smallest gap an eval set of n pairs detects at 80% power.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as scipy_stats
from scipy.optimize import brentq

N_RESAMPLES = 10_000
ALPHA = 0.05
_CHUNK = 2_000_000  # indices drawn per bootstrap block: 16 MB, whatever the number of pairs


def decisions(chosen, rejected) -> np.ndarray:
    """A run's per-pair decisions from its rewards: 1.0 where chosen scored higher, else 0.0 (ties are wrong)."""
    return (np.asarray(chosen, dtype=np.float64) > np.asarray(rejected, dtype=np.float64)).astype(np.float64)


def paired_bootstrap(a, b, n_resamples: int = N_RESAMPLES, seed: int = 0,
                     confidence: float = 0.95) -> tuple[float, float] | np.ndarray:
    """Percentile interval of mean(b - a) over pairs resampled with replacement, the same pairs for both runs.
    `b` may be a matrix (one run per row, the same pairs as a): then one (low, high) row per run, all from the
    same resamples.

    Resample r draws n pair indices from `np.random.default_rng(seed)`, in order, r = 0, 1, ...: one
    (block x n) `integers` call per block gives the same indices as one call per resample, so the result
    does not depend on the block size (only memory does). A block's indices become per-pair counts (one
    bincount) and its means one matrix product with the differences, every run of a sweep at once."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    diff = np.atleast_2d(b - a)
    n = diff.shape[1]
    if n == 0:
        raise ValueError("no shared pairs to resample")
    rng = np.random.default_rng(seed)
    means = np.empty((diff.shape[0], n_resamples))
    block = max(1, _CHUNK // n)
    for start in range(0, n_resamples, block):
        k = min(n_resamples, start + block) - start
        idx = rng.integers(0, n, size=(k, n)) + n * np.arange(k)[:, None]  # row r's indices, offset into row r
        counts = np.bincount(idx.ravel(), minlength=k * n).reshape(k, n).astype(np.float64)
        means[:, start:start + k] = diff @ counts.T / n
    tail = (1 - confidence) / 2
    bounds = np.quantile(means, [tail, 1 - tail], axis=1).T
    return (float(bounds[0, 0]), float(bounds[0, 1])) if b.ndim == 1 else bounds


def sign_test_p(n_a_better: int, n_b_better: int) -> float:
    """Exact two-sided p of "neither run is better": among the pairs the runs decide differently, each is
    equally likely to favour either run, so the count favouring b is Binomial(discordant, 1/2). On 0/1
    decisions this is the exact McNemar test. No discordant pair: p = 1."""
    discordant = n_a_better + n_b_better
    if discordant == 0:
        return 1.0
    return float(scipy_stats.binomtest(n_b_better, discordant, 0.5).pvalue)


def paired_comparison(a, b, n_resamples: int = N_RESAMPLES, seed: int = 0,
                      interval: tuple[float, float] | None = None) -> dict:
    """Runs a and b on the same pairs (decision arrays in one pair order): accuracies, delta = b - a with its
    95% paired-bootstrap interval (`interval` when the caller has it already), the exact p-value, and the
    counts (pairs a decides better, b decides better, alike; on 0/1 decisions the first two are McNemar's
    discordant counts)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"expected two 1-D decision arrays over the same pairs, got {a.shape} and {b.shape}")
    low, high = interval if interval is not None else paired_bootstrap(a, b, n_resamples, seed)
    n_a_better, n_b_better = int((a > b).sum()), int((b > a).sum())
    return {"n_pairs": int(a.size), "accuracy_a": float(a.mean()), "accuracy_b": float(b.mean()),
            "delta": float(b.mean() - a.mean()), "delta_ci_low": low, "delta_ci_high": high,
            "n_a_better": n_a_better, "n_b_better": n_b_better, "n_same": int(a.size) - n_a_better - n_b_better,
            "p_value": sign_test_p(n_a_better, n_b_better)}


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control): the k-th smallest of m is multiplied
    by m - k + 1, then made non-decreasing in that order, capped at 1. Reject where adjusted < alpha."""
    p = np.asarray(p_values, dtype=np.float64)
    m = p.size
    if m == 0:
        return p
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out


def against_best(runs: dict[str, np.ndarray], best: str, n_resamples: int = N_RESAMPLES, seed: int = 0,
                 alpha: float = ALPHA) -> dict[str, dict]:
    """Every run against `best` on the same pairs: `paired_comparison(best, run)` (so delta <= 0 when best is the
    most accurate), `p_holm` corrected over the runs compared (all but best), and `tied_with_best`: the
    gap is not significant at `alpha` after the correction. The best is tied with itself (delta 0, p 1)."""
    others = [k for k in runs if k != best]
    bounds = paired_bootstrap(runs[best], np.stack([runs[k] for k in others]), n_resamples, seed) if others else []
    out = {k: paired_comparison(runs[best], runs[k], interval=tuple(map(float, bounds[i])))
           for i, k in enumerate(others)}
    for k, p in zip(others, holm([out[k]["p_value"] for k in others]), strict=True):
        out[k]["p_holm"] = float(p)
        out[k]["tied_with_best"] = bool(p >= alpha)
    acc = float(np.mean(runs[best]))
    out[best] = {"n_pairs": int(np.size(runs[best])), "accuracy_a": acc, "accuracy_b": acc, "delta": 0.0,
                 "delta_ci_low": 0.0, "delta_ci_high": 0.0, "n_a_better": 0, "n_b_better": 0,
                 "n_same": int(np.size(runs[best])), "p_value": 1.0, "p_holm": 1.0, "tied_with_best": True}
    return out


def min_detectable_difference(n_pairs: int, discordant_share: float, alpha: float = ALPHA,
                              power: float = 0.8) -> float:
    """The smallest accuracy gap a two-sided McNemar test at `alpha` detects with probability `power` on
    `n_pairs` pairs, when a share `discordant_share` of the pairs is decided differently by the two runs.

    Connor's (1987) normal approximation of McNemar's test gives the pairs needed for a gap d:
        n = (z_{1-alpha/2} sqrt(psi) + z_{power} sqrt(psi - d^2))^2 / d^2,   psi = discordant share,
    solved here for d at the given n (brentq on d in (0, psi]: a gap d needs a share d of the pairs
    discordant, all one way). The report takes psi as observed: the mean discordant share of the
    jobs against the best, since how much runs disagree, not the accuracy, sets the noise of a paired
    gap. No discordance observed: psi = 2p(1-p), the disagreement of two independent runs of accuracy p."""
    psi = float(discordant_share)
    if n_pairs <= 0 or psi <= 0:
        return math.nan
    za, zb = scipy_stats.norm.ppf(1 - alpha / 2), scipy_stats.norm.ppf(power)

    def excess(d: float) -> float:  # > 0 where n pairs are more than enough for gap d
        return n_pairs * d * d - (za * math.sqrt(psi) + zb * math.sqrt(max(psi - d * d, 0.0))) ** 2

    top = psi  # <= sqrt(psi), as psi <= 1
    if excess(top) < 0:  # even the largest gap psi allows is not detectable with so few pairs
        return math.nan
    return float(brentq(excess, 1e-12, top))
