"""docs/evaluation.md's ensemble figures, from a mean ensemble's evaluation: each member as the ensemble scored it,
the ensemble, paired on the same pairs, and how well each uncertainty flags wrong pairs.

    python bench/ensemble_figures.py [bench/results/ensemble_mean4]

The dir holds ensemble.json (rmexp-ensemble's record) and the scores.jsonl and eval_metrics.json rmexp-evaluate wrote
for the ensemble (docs/evaluation.md has the commands that made the committed one).
"""

import json
import sys
from pathlib import Path

import numpy as np

from rmexp.metrics import wilson_interval
from rmexp.stats import paired_comparison

root = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/ensemble_mean4")
ens = json.loads((root / "ensemble.json").read_text())
rows = [json.loads(line) for line in (root / "scores.jsonl").read_text().splitlines()]
metrics = json.loads((root / "eval_metrics.json").read_text())
mc = np.array([r["members_chosen"] for r in rows]).T  # K x n
mr = np.array([r["members_rejected"] for r in rows]).T
member_correct = (mc > mr).astype(float)
ens_correct = np.array([r["correct"] for r in rows], float)
names = [m["path"].split("/")[-1] for m in ens["members"]]
best_sel = 0  # members are ordered best first on the selection split


def fmt(c):
    lo, hi = wilson_interval(int(c.sum()), len(c))
    return f"{c.mean():.3f} [{lo:.2f}, {hi:.2f}]"



best_final = int(np.argmax(member_correct.mean(1)))
print("n pairs", len(rows), "runtime_s", metrics["runtime_s"], "pairs/s", metrics["pairs_per_s"])
for k, n in enumerate(names):
    cmp_ = paired_comparison(member_correct[best_sel], member_correct[k])  # delta: member k - selection-best
    print(f"member cell {n} (selection acc {ens['members'][k]['selection_accuracy']:.3f}): {fmt(member_correct[k])}; vs selection-best {cmp_['delta']:+.3f} p {cmp_['p_value']:.2g}")
for label, ref in (("selection-best member", best_sel), ("final-best member", best_final)):
    cmp_ = paired_comparison(member_correct[ref], ens_correct)  # delta: ensemble - member
    print(f"mean ensemble {fmt(ens_correct)} vs {label} (cell {names[ref]}): {cmp_['delta']:+.3f} [{cmp_['delta_ci_low']:+.3f}, {cmp_['delta_ci_high']:+.3f}] p {cmp_['p_value']:.2g}")
disagree = ((mc - mr > 0) != (ens_correct > 0)[None]).any(0).sum()
print("pairs where some member disagrees with the ensemble:", int(disagree))
for u, d in metrics["uncertainty"].items():
    print(u, {k: (round(v, 3) if v is not None else None) for k, v in d.items()})
