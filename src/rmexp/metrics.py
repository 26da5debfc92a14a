"""Pairwise accuracy and friends, from per-pair rewards."""

from __future__ import annotations

import numpy as np


def pairwise_metrics(chosen, rejected) -> dict[str, float]:
    """Each pair counted once; a tie (equal rewards) counts as wrong."""
    chosen = np.asarray(chosen, dtype=np.float64)
    rejected = np.asarray(rejected, dtype=np.float64)
    if chosen.shape != rejected.shape or chosen.ndim != 1:
        raise ValueError(f"expected two 1-D reward arrays of one length, got {chosen.shape} and {rejected.shape}")
    if chosen.size == 0:
        raise ValueError("no pairs to score")
    margin = chosen - rejected
    both = np.concatenate([chosen, rejected])
    return {
        "pairwise_accuracy": float((margin > 0).mean()),
        "n_pairs": int(margin.size),
        "n_ties": int((margin == 0).sum()),
        "mean_margin": float(margin.mean()),
        "reward_mean": float(both.mean()),
        "reward_std": float(both.std()),
    }
