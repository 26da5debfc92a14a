"""Pairwise accuracy and friends, from per-pair rewards: intervals, baselines, accuracy by group."""

from __future__ import annotations

import math

import numpy as np


def pairwise_metrics(chosen, rejected) -> dict[str, float]:
    """Each pair counted once; a tie (equal rewards) counts as wrong. With the accuracy's 95% Wilson interval."""
    chosen = np.asarray(chosen, dtype=np.float64)
    rejected = np.asarray(rejected, dtype=np.float64)
    if chosen.shape != rejected.shape or chosen.ndim != 1:
        raise ValueError(f"expected two 1-D reward arrays of one length, got {chosen.shape} and {rejected.shape}")
    if chosen.size == 0:
        raise ValueError("no pairs to score")
    margin = chosen - rejected
    both = np.concatenate([chosen, rejected])
    ci_low, ci_high = wilson_interval(int((margin > 0).sum()), int(margin.size))
    return {
        "pairwise_accuracy": float((margin > 0).mean()),
        "ci_low": ci_low,
        "ci_high": ci_high,
        "n_pairs": int(margin.size),
        "n_ties": int((margin == 0).sum()),
        "mean_margin": float(margin.mean()),
        "reward_mean": float(both.mean()),
        "reward_std": float(both.std()),
    }


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion: sensible at 0, 1 and small n, unlike the normal one."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def length_baseline_accuracy(chosen_tokens, rejected_tokens) -> float:
    """The accuracy of "the longer answer wins" (equal lengths count as wrong, like reward ties)."""
    chosen = np.asarray(chosen_tokens)
    rejected = np.asarray(rejected_tokens)
    return float((chosen > rejected).mean())


PROMPT_BUCKETS = (64, 128, 256, 512)  # prompt-length bucket edges, in tokens


def bucket_of(n_tokens: int) -> str:
    lower = 0
    for edge in PROMPT_BUCKETS:
        if n_tokens < edge:
            return f"{lower}-{edge - 1}"
        lower = edge
    return f"{lower}+"


def accuracy_by(labels: list[str], correct: list[bool]) -> dict[str, dict]:
    groups: dict[str, list[bool]] = {}
    for label, ok in zip(labels, correct, strict=True):
        groups.setdefault(label, []).append(ok)
    def order(label: str):  # numeric buckets by their lower edge, names alphabetically
        head = label.split("-")[0].rstrip("+")
        return (0, int(head), "") if head.isdigit() else (1, 0, label)

    return {k: {"pairwise_accuracy": sum(v) / len(v), "n_pairs": len(v)}
            for k, v in sorted(groups.items(), key=lambda kv: order(kv[0]))}
