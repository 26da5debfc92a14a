"""Reward diagnostics of an evaluation: reward and margin histograms, calibration, accuracy by source.

Computed at every evaluation, in training (`EvalDiagnostics`, a trainer callback) and in
rmexp-evaluate, from the per-pair rewards:

- calibration of sigmoid(r_chosen - r_rejected) read as the probability that chosen wins (the
  Bradley-Terry reading the training loss assumes): folded to the model's confidence in the answer it
  prefers, sigmoid(|margin|), against whether that answer is the chosen one (a tie: confidence 0.5,
  wrong, as pairwise_accuracy counts it); 10 equal bins over [0.5, 1]; the expected calibration error
  (ECE, Guo et al. 2017) is the pair-weighted mean of |mean confidence - accuracy| over the bins; the
  Brier score is the mean of (1 - sigmoid(margin))^2, the squared error of P(chosen wins);
- accuracy by the pairs' `source`/`subset` field (`by_source`), and with `data.categories` (subset ->
  category) RewardBench's category-averaged accuracy: the pair-weighted accuracy of each category,
  averaged over the categories (pairs of an unmapped subset are left out and counted);
- histograms of the chosen and rejected rewards and of the margin.

`summary` gives what goes into metrics.json (`scalars`: under flat names, for W&B); `write` puts
diagnostics.json, reliability.png and rewards.png in a dir; `images_payload` is their W&B part.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy.special import expit
from transformers import TrainerCallback

from rmexp.metrics import accuracy_by

N_BINS = 10
HIST_BINS = 30


def calibration(margin, n_bins: int = N_BINS) -> dict:
    """ECE, Brier score and the reliability diagram's bins of per-pair margins (r_chosen - r_rejected).
    The ECE of a perfectly calibrated model is not 0 on a finite set: about 0.1 on 96 pairs, 0.05 on 400
    (sampling noise over 10 bins), 0.01 on 10,000."""
    margin = np.asarray(margin, dtype=np.float64)
    # a tie is a calibrated coin flip (confidence 0.5): half right here, as in the Brier score, though
    # pairwise accuracy counts it wrong
    confidence, correct = expit(np.abs(margin)), np.where(margin == 0, 0.5, (margin > 0).astype(np.float64))
    edges = np.linspace(0.5, 1.0, n_bins + 1)
    # bin k holds [edges[k], edges[k+1]); a confidence of exactly 1.0 (a float64 sigmoid saturates) the last
    idx = np.minimum(np.searchsorted(edges, confidence, side="right") - 1, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=confidence, minlength=n_bins)
    right = np.bincount(idx, weights=correct, minlength=n_bins)
    filled = count > 0
    return {
        "ece": float(np.abs(conf_sum - right).sum() / margin.size),
        "brier": float(np.mean((1.0 - expit(margin)) ** 2)),
        "bins": {"edges": edges.tolist(), "n_pairs": count.tolist(),
                 "confidence": np.where(filled, conf_sum / np.maximum(count, 1), np.nan).tolist(),
                 "accuracy": np.where(filled, right / np.maximum(count, 1), np.nan).tolist()},
    }


def by_category(sources: list[str | None], correct: list[bool], categories: dict[str, str]) -> dict:
    """RewardBench's convention: each category's pair-weighted accuracy, then their plain mean."""
    labels = [categories.get(s) if s is not None else None for s in sources]
    kept = [(c, ok) for c, ok in zip(labels, correct, strict=True) if c is not None]
    groups = accuracy_by([c for c, _ in kept], [ok for _, ok in kept]) if kept else {}
    return {"category_accuracy": float(np.mean([g["pairwise_accuracy"] for g in groups.values()])) if groups else None,
            "by_category": groups, "n_uncategorized": len(labels) - len(kept)}


def summary(chosen, rejected, sources: list[str | None] | None = None,
            categories: dict[str, str] | None = None) -> dict:
    """metrics.json's diagnostics: ece, brier, by_source (when a pair has a source) and, with categories,
    category_accuracy, by_category and n_uncategorized."""
    chosen, rejected = np.asarray(chosen, dtype=np.float64), np.asarray(rejected, dtype=np.float64)
    cal = calibration(chosen - rejected)
    out = {"ece": cal["ece"], "brier": cal["brier"]}
    correct = (chosen > rejected).tolist()
    if sources is not None and any(s is not None for s in sources):
        out["by_source"] = accuracy_by([s if s is not None else "(none)" for s in sources], correct)
        if categories:
            out |= by_category(sources, correct, categories)
    return out


def scalars(diag: dict) -> dict[str, float]:
    """The summary's numbers under flat names: ece, brier, by_source/<name>/pairwise_accuracy, ..."""
    flat = {k: diag[k] for k in ("ece", "brier", "category_accuracy") if diag.get(k) is not None}
    for group in ("by_source", "by_category"):
        for name, v in diag.get(group, {}).items():
            flat[f"{group}/{name}/pairwise_accuracy"] = v["pairwise_accuracy"]
    return flat


def write(out_dir: Path, chosen, rejected, diag: dict, title: str = "") -> dict[str, Path]:
    """diagnostics.json (the summary, the calibration bins, histogram counts), reliability.png and rewards.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    chosen, rejected = np.asarray(chosen, dtype=np.float64), np.asarray(rejected, dtype=np.float64)
    margin = chosen - rejected
    cal = calibration(margin)
    hists = {}
    for name, values in (("reward_chosen", chosen), ("reward_rejected", rejected), ("margin", margin)):
        counts, edges = np.histogram(values, bins=HIST_BINS)
        hists[name] = {"counts": counts.tolist(), "edges": edges.tolist()}
    (out_dir / "diagnostics.json").write_text(json.dumps(diag | {"calibration": cal["bins"], "histograms": hists},
                                                         indent=2) + "\n", encoding="utf-8")

    bins = cal["bins"]
    centres = (np.array(bins["edges"][:-1]) + np.array(bins["edges"][1:])) / 2
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    ax.plot([0.5, 1], [0.5, 1], color="grey", linestyle="--", linewidth=1, label="calibrated")
    ax.bar(centres, np.nan_to_num(bins["accuracy"]), width=0.05, edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot(bins["confidence"], bins["accuracy"], "o-", color="#e4572e", label="mean confidence")
    ax.set_xlim(0.5, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence sigmoid(|r_chosen - r_rejected|)")
    ax.set_ylabel("share where the preferred answer is the chosen one")
    ax.set_title(f"{title}ECE {cal['ece']:.3f}, Brier {cal['brier']:.3f}, {margin.size} pairs", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "reliability.png", dpi=100)
    plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.hist([chosen, rejected], bins=HIST_BINS, label=["chosen", "rejected"], alpha=0.7, histtype="stepfilled")
    left.set_xlabel("reward")
    left.legend(fontsize=8)
    right.hist(margin, bins=HIST_BINS, color="#4c72b0")
    right.axvline(0, color="black", linewidth=1)
    right.set_xlabel("margin r_chosen - r_rejected")
    fig.suptitle(f"{title}rewards of {margin.size} pairs", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "rewards.png", dpi=100)
    plt.close(fig)
    return {"reliability": out_dir / "reliability.png", "rewards": out_dir / "rewards.png"}


def images_payload(chosen, rejected, images: dict[str, Path], prefix: str = "eval") -> dict:
    """W&B values of an evaluation besides its scalars: the three histograms and the two figures."""
    import wandb

    chosen, rejected = np.asarray(chosen, dtype=np.float64), np.asarray(rejected, dtype=np.float64)
    return ({f"{prefix}/reward_chosen_hist": wandb.Histogram(chosen),
             f"{prefix}/reward_rejected_hist": wandb.Histogram(rejected),
             f"{prefix}/margin_hist": wandb.Histogram(chosen - rejected)}
            | {f"{prefix}/{name}": wandb.Image(str(path)) for name, path in images.items()})


class EvalDiagnostics(TrainerCallback):
    """Trainer callback: after every evaluation (the one before training too), the diagnostics of the trainer's
    eval rewards into <run dir>/diagnostics/step-N/ and, with a W&B run, its histograms and figures at that
    step (the scalars reach W&B with the evaluation's own metrics: PairwiseRewardTrainer adds them)."""

    def __init__(self, trainer, run_dir: Path, wandb_run=None, sources=None, categories=None):
        self.trainer, self.run_dir, self.wandb_run = trainer, Path(run_dir), wandb_run
        self.sources, self.categories = sources, categories

    def on_evaluate(self, args, state, control, **kwargs):
        rewards = self.trainer.last_eval_rewards
        if rewards is None or not state.is_world_process_zero:
            return control
        chosen, rejected = rewards[:, 0].numpy(), rewards[:, 1].numpy()
        diag = summary(chosen, rejected, self.sources, self.categories)
        images = write(self.run_dir / "diagnostics" / f"step-{state.global_step}", chosen, rejected, diag,
                       f"step {state.global_step}: ")
        if self.wandb_run is not None:
            self.wandb_run.log(images_payload(chosen, rejected, images) | {"train/global_step": state.global_step})
        return control
