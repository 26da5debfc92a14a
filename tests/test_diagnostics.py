"""Reward diagnostics (rmexp.diagnostics) on synthetic margins, and in a training run's W&B offline log."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import expit

from conftest import compose_cfg, tiny_overrides
from rmexp.diagnostics import by_category, calibration, summary
from wandb_records import OfflineRun


def calibrated_margins(n: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    """Margins of a model whose sigmoid(margin) is the true chance the labelled chosen answer wins: the model's
    margin s between two answers, and the label naming the answer it prefers with probability sigmoid(s)."""
    rng = np.random.default_rng(seed)
    s = rng.normal(0.0, 2.0, n)
    wins = rng.random(n) < expit(s)
    return np.where(wins, s, -s) * scale


def test_perfectly_calibrated_margins_have_an_ece_near_zero():
    cal = calibration(calibrated_margins(10_000))
    assert cal["ece"] < 0.02
    assert sum(cal["bins"]["n_pairs"]) == 10_000
    # overconfident: the same decisions at three times the margin
    assert calibration(calibrated_margins(10_000, scale=3.0))["ece"] > 0.1


def test_ece_and_brier_by_hand():
    # margins +-ln 3: confidence sigmoid(ln 3) = 0.75 for all four, so one bin; three right, one wrong: its
    # accuracy 0.75 is its confidence, ECE 0
    m = np.log(3) * np.array([1, 1, 1, -1])
    cal = calibration(m)
    assert cal["ece"] == pytest.approx(0.0, abs=1e-12)
    # Brier: (1 - 0.75)^2 three times, (1 - 0.25)^2 once: (3 * 0.0625 + 0.5625) / 4 = 0.1875
    assert cal["brier"] == pytest.approx(0.1875)
    # all four right at confidence 0.75: |0.75 - 1| = 0.25; a tie and a sure win share the first bin:
    # confidence (0.5 + 0.5) / 2 against (0.5 + 1) / 2 right, |0.5 - 0.75| * 2 / 2 pairs = 0.25
    assert calibration(np.log(3) * np.ones(4))["ece"] == pytest.approx(0.25)
    assert calibration(np.array([0.0, 1e-9]))["ece"] == pytest.approx(0.25)


def test_category_average_weighs_categories_not_pairs():
    sources = ["a"] * 8 + ["b"] * 2 + ["c"] * 2 + ["x"]
    correct = [True] * 8 + [False, False] + [True, False] + [True]
    out = by_category(sources, correct, {"a": "chat", "b": "safety", "c": "safety"})
    # chat 8/8 = 1; safety (b and c pooled) 1/4 = 0.25; mean of categories 0.625 (pair-weighted: 9/12 = 0.75)
    assert out["category_accuracy"] == pytest.approx(0.625)
    assert out["by_category"]["safety"] == {"pairwise_accuracy": 0.25, "n_pairs": 4}
    assert out["n_uncategorized"] == 1
    full = summary(np.array(correct, float), np.zeros(13), sources, {"a": "chat", "b": "safety", "c": "safety"})
    assert full["by_source"]["b"]["pairwise_accuracy"] == 0.0 and full["category_accuracy"] == pytest.approx(0.625)
    assert "by_source" not in summary(np.ones(3), np.zeros(3), [None] * 3)
    json.dumps(full)  # metrics.json takes it as it is


CATEGORIES = "++data.categories={correctness:reasoning,instruction:chat,helpfulness:chat,safety:safety}"


@pytest.mark.slow
def test_a_training_run_logs_histograms_calibration_and_accuracy_by_source_at_every_evaluation(tmp_path):
    from rmexp.train import main

    main(compose_cfg(*tiny_overrides(tmp_path, CATEGORIES)))  # evaluations at steps 0, 4 and 8
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    subsets = {"correctness", "instruction", "helpfulness", "safety"}  # data/preference.jsonl's subset field
    assert set(metrics["by_source"]) == subsets and 0 <= metrics["ece"] <= 0.5 and 0 <= metrics["brier"] <= 1
    assert sum(v["n_pairs"] for v in metrics["by_source"].values()) == metrics["n_eval_pairs"]
    by_cat = metrics["by_category"]
    chat = metrics["by_source"]["instruction"], metrics["by_source"]["helpfulness"]
    assert by_cat["chat"]["n_pairs"] == chat[0]["n_pairs"] + chat[1]["n_pairs"]
    assert metrics["category_accuracy"] == pytest.approx(np.mean([v["pairwise_accuracy"] for v in by_cat.values()]))
    for step in (0, 4, 8):
        assert (tmp_path / "diagnostics" / f"step-{step}" / "reliability.png").stat().st_size > 1000
        assert (tmp_path / "diagnostics" / f"step-{step}" / "rewards.png").is_file()

    run = OfflineRun(tmp_path)
    logged = [h for h in run.history if "eval/margin_hist/_type" in h]  # a logged object's fields: key/field
    assert [h["train/global_step"] for h in logged] == [0, 4, 8]
    for h in logged:
        for key in ("eval/reward_chosen_hist", "eval/reward_rejected_hist", "eval/margin_hist"):
            assert h[f"{key}/_type"] == "histogram" and sum(h[f"{key}/values"]) == metrics["n_eval_pairs"]
        assert h["eval/reliability/_type"] == "image-file" and h["eval/rewards/_type"] == "image-file"
    scalars = [h for h in run.history if "eval/by_source/safety/pairwise_accuracy" in h]
    assert len(scalars) == 3 and all("eval/ece" in h and "eval/brier" in h for h in scalars)
    assert scalars[-1]["eval/by_source/safety/pairwise_accuracy"] == metrics["by_source"]["safety"]["pairwise_accuracy"]
    assert scalars[-1]["eval/category_accuracy"] == pytest.approx(metrics["category_accuracy"])


def test_ties_are_a_calibrated_coin_flip():
    from rmexp.diagnostics import calibration

    cal = calibration(np.zeros(10))  # confidence 0.5, half right: calibrated (pairwise accuracy still counts them wrong)
    assert cal["ece"] == 0 and cal["brier"] == 0.25
