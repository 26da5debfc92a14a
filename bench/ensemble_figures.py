"""docs/evaluation.md's ensemble figures: the members, the mean ensemble, the uniform soup and the greedy soup on the
same pairs, each paired with the best member, and how well each uncertainty flags wrong pairs.

    python bench/ensemble_figures.py bench/results/ensemble_grid [bench/results/ensemble_seeds ...]

Each dir holds `mean/`, `soup/` and `greedy/`, each with the ensemble.json rmexp-ensemble wrote and the scores.jsonl
and eval_metrics.json rmexp-evaluate wrote for that model on the figure pairs (docs/evaluation.md has the commands).
The members' decisions are the mean ensemble's member rewards (standardizing a member changes none of them).
"Best member" is the one best on the selection split (what a user would keep); the one best on the figure pairs
themselves is shown too, as hindsight.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from rmexp.metrics import wilson_interval
from rmexp.stats import paired_comparison
from rmexp.uncertainty import judge


def read(model_dir: Path) -> tuple[dict, list[dict], dict]:
    return (json.loads((model_dir / "ensemble.json").read_text()),
            [json.loads(line) for line in (model_dir / "scores.jsonl").read_text().splitlines()],
            json.loads((model_dir / "eval_metrics.json").read_text()))


def interval(correct: np.ndarray) -> str:
    low, high = wilson_interval(int(correct.sum()), len(correct))
    return f"{correct.mean():.3f} [{low:.2f}, {high:.2f}]"


def gain(member: np.ndarray, model: np.ndarray) -> str:
    c = paired_comparison(member, model)  # delta: model - member
    return f"{c['delta']:+.3f} [{c['delta_ci_low']:+.3f}, {c['delta_ci_high']:+.3f}], p {c['p_value']:.2g}"


def uncertainty_cells(u: dict) -> str:
    auc = "–" if u["auroc"] is None else f"{u['auroc']:.3f} [{u['auroc_ci_low']:.2f}, {u['auroc_ci_high']:.2f}]"
    return f"{auc} | {u['selective_accuracy_50']:.3f} | {u['selective_accuracy_80']:.3f}"


def figures(root: Path) -> None:
    mean_record, mean_rows, mean_metrics = read(root / "mean")
    ids = [r["pair_id"] for r in mean_rows]
    mc = np.array([r["members_chosen"] for r in mean_rows]).T  # K x n, standardized
    mr = np.array([r["members_rejected"] for r in mean_rows]).T
    members = (mc > mr).astype(float)
    names = [Path(m["path"]).name for m in mean_record["members"]]
    best_sel = int(np.argmax([m["selection_accuracy"] for m in mean_record["members"]]))
    best_fig = int(np.argmax(members.mean(1)))
    models = {"mean ensemble": (mean_record, mean_rows, mean_metrics)}
    for name, sub in (("uniform soup", "soup"), ("greedy soup", "greedy")):
        if (root / sub).is_dir():
            models[name] = read(root / sub)
    print(f"## {root}: {len(ids)} figure pairs; selection split {mean_record['selection']['path']} "
          f"({mean_record['selection']['n_pairs']} pairs)\n")
    print("| model | selection acc | accuracy [95%] | - best member (selection) | - best member (hindsight) |")
    print("|---|---|---|---|---|")
    for k, name in enumerate(names):
        tag = " (best on selection)" if k == best_sel else " (best here)" if k == best_fig else ""
        print(f"| member {name}{tag} | {mean_record['members'][k]['selection_accuracy']:.3f} | "
              f"{interval(members[k])} | {gain(members[best_sel], members[k]) if k != best_sel else ''} | |")
    decisions = {}
    for label, (record, rows, _) in models.items():
        by_id = {r["pair_id"]: r for r in rows}
        correct = np.array([float(by_id[i]["reward_chosen"] > by_id[i]["reward_rejected"]) for i in ids])
        decisions[label] = correct
        kept = ", ".join(Path(m["path"]).name for m in record["members"])
        print(f"| {label} ({kept}) | {record['selection_accuracy']:.3f} | {interval(correct)} | "
              f"{gain(members[best_sel], correct)} | {gain(members[best_fig], correct)} |")
    for label, (record, _, _) in models.items():
        if record.get("greedy_trials"):
            trials = "; ".join(f"+{Path(t['path']).name} -> {t['selection_accuracy']:.3f} "
                               f"({'kept' if t['kept'] else 'dropped'})" for t in record["greedy_trials"])
            print(f"\n{label}: starts from member {Path(record['members'][0]['path']).name}; {trials}")
    print("\n| uncertainty | AUROC against error [95%] | selective acc 50% | selective acc 80% |")
    print("|---|---|---|---|")
    margins = mc - mr
    print(f"| best member (selection), its own abs margin | "
          f"{uncertainty_cells(judge(-np.abs(margins[best_sel]), margins[best_sel] <= 0))} |")
    for label, (_, _, metrics) in models.items():
        for kind, u in metrics["uncertainty"].items():
            print(f"| {label}, {kind.replace('_', ' ')} | {uncertainty_cells(u)} |")
    cost = mean_metrics.get("pairs_per_s")
    if cost:
        print(f"\nmean ensemble scoring in rmexp-evaluate: {cost:.2f} pairs/s for {len(names)} members "
              f"({mean_metrics['runtime_s']:.0f} s, load included)")


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["bench/results/ensemble_grid"]:
        figures(Path(arg))
        print()
