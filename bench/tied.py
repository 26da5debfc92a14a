"""How often `rmexp.stats.against_best` (the report's `tied_with_best`) calls a job worse by chance.

    python bench/tied.py --jobs 20 --pairs 96 --sweeps 400        # every job equally good
    python bench/tied.py --jobs 6 --pairs 400 --gap 0.05          # job 0 better than the rest by 0.05

Each simulated sweep draws a difficulty per pair (Beta(1.2, 0.8): mean accuracy 0.6, and jobs agree on
most pairs, as trained models do), then each job's 0/1 decisions independently given it; job 0's chance
per pair is `--gap` above the others'. The best is picked by the same decisions, as in a report. Prints
one JSON line: `best_job_excluded` (share of sweeps marking job 0, a truly best job, not tied: what a set
of "cannot be told from the best" must keep under 0.05), `any_excluded` (share of sweeps marking some job
not tied; with --gap 0 every such mark is wrong) and `mean_excluded` (jobs marked per sweep).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from rmexp.stats import against_best


def simulate(n_jobs: int, n_pairs: int, n_sweeps: int, gap: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    best_out = any_out = total_out = 0
    for _ in range(n_sweeps):
        chance = np.tile(rng.beta(1.2, 0.8, size=n_pairs), (n_jobs, 1))
        chance[1:] = np.clip(chance[1:] - gap, 0.0, 1.0)
        runs = {str(k): (rng.random(n_pairs) < chance[k]).astype(np.float64) for k in range(n_jobs)}
        best = max(runs, key=lambda k: runs[k].mean())
        # the bootstrap interval is not part of the decision: a few resamples keep the simulation fast
        out = {k for k, r in against_best(runs, best, n_resamples=20).items() if not r["tied_with_best"]}
        best_out += "0" in out
        any_out += bool(out)
        total_out += len(out)
    return {"jobs": n_jobs, "pairs": n_pairs, "sweeps": n_sweeps, "gap": gap, "seed": seed,
            "best_job_excluded": best_out / n_sweeps, "any_excluded": any_out / n_sweeps,
            "mean_excluded": total_out / n_sweeps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=96)
    parser.add_argument("--sweeps", type=int, default=400)
    parser.add_argument("--gap", type=float, default=0.0, help="job 0's advantage in per-pair chance of being right")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(simulate(args.jobs, args.pairs, args.sweeps, args.gap, args.seed)))


if __name__ == "__main__":
    main()
