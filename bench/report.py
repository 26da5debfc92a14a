"""rmexp-report and rmexp-compare on a synthetic sweep, no model: how long the paired statistics take.

    python bench/report.py --jobs 20 --pairs 400      # a lora.r x learning-rate grid of 20 jobs

Writes a sweep dir of `--jobs` finished jobs (overrides, composed config with W&B offline,
metrics.json, scores.jsonl with pair ids and two sources; each job's decisions drawn around its own
accuracy, 0.55-0.65 of the pairs being "easy"), then times, each in a fresh process as a user runs
them: `rmexp-report wandb=false`, `rmexp-report` (with its offline W&B run) and `rmexp-compare` of two
jobs. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

RANKS, RATES = (4, 8, 16, 32, 64), ("1e-5", "3e-5", "1e-4", "3e-4")


def write_sweep(root: Path, n_jobs: int, n_pairs: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    ease = rng.random(n_pairs)  # a pair's difficulty, shared by every job: jobs agree on most pairs
    grid = [(r, lr) for r in RANKS for lr in RATES]
    for k in range(n_jobs):
        r, lr = grid[k % len(grid)]
        job = root / str(k)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"lora.r={r}", f"trainer.learning_rate={lr}"]))
        (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(
            {"lora": {"r": r}, "trainer": {"learning_rate": float(lr)}, "logger": {"backend": "wandb", "mode": "offline"}}))
        chosen = rng.normal(size=n_pairs) + 2.0 * (ease < 0.55 + 0.1 * rng.random())
        rejected = rng.normal(size=n_pairs)
        with (job / "scores.jsonl").open("w", encoding="utf-8") as f:
            for i in range(n_pairs):
                f.write(json.dumps({"index": i, "pair_id": f"{i:016x}", "source": "ab"[i % 2],
                                    "reward_chosen": float(chosen[i]), "reward_rejected": float(rejected[i]),
                                    "correct": bool(chosen[i] > rejected[i])}) + "\n")
        (job / "metrics.json").write_text(json.dumps({"status": "ok", "eval_loss": 0.6, "n_eval_pairs": n_pairs,
                                                      "pairwise_accuracy": float((chosen > rejected).mean())}))


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return round(time.perf_counter() - start, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=400)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rmexp-bench-report-") as tmp:
        sweep = Path(tmp) / "sweep"
        write_sweep(sweep, args.jobs, args.pairs)
        py = [sys.executable, "-m"]
        result = {"jobs": args.jobs, "pairs": args.pairs,
                  "report_s": timed([*py, "rmexp.report", f"sweep_dir={sweep}", "wandb=false"]),
                  "report_wandb_s": timed([*py, "rmexp.report", f"sweep_dir={sweep}"]),
                  "compare_s": timed([*py, "rmexp.compare", f"a={sweep / '0'}", f"b={sweep / '1'}"])}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
