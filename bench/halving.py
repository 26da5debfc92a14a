"""Successive halving replayed offline on a fully trained grid, and simulated: which rule, which eta, at what risk.

    python bench/halving.py export outputs/halving-grid --out bench/results/halving_grid.json   # once, after the grid
    python bench/halving.py replay bench/results/halving_grid.json                             # eta 2/3/4 x rank/guarded
    python bench/halving.py simulate --grid bench/results/halving_grid.json --sweeps 1000      # cells equal / one better
    python bench/halving.py check bench/results/halving_grid.json outputs/halving-real          # a real sweep = its replay
    python bench/halving.py table bench/results/halving_grid.json outputs/halving-real          # docs/sweeps.md's table

The grid's cells scored the rung split at every rung any eta 2, 3 or 4 uses (trainer.rungs: 1/16, 1/9, 1/8, 1/4,
1/3, 1/2, 1). A survivor's continuation is the uninterrupted run (tests/test_halving.py), so replaying a halving
sweep on the grid's rungs.jsonl is exact: the same statistics, the same decisions, the same winner.

- replay: per setting, the winner, its accuracy on the final pairs against the full grid's best there (the
  paired exact test of rmexp.stats; tied when p >= 0.05), and the cost: pair-steps, and seconds of training and
  rung scoring (each cell's own measured train_s and score_s) against the full grid's training seconds. Then the
  same decisions on B bootstrap resamples of the rung split's pairs: the share of sweeps whose winner the full
  grid's best beats (p < 0.05), i.e. the probability that the rule dropped every cell tied with the best.
- simulate: K cells whose per-pair margins are pair difficulty + cell quality + cell noise, with the spreads
  measured on the grid (at each rung); all cells equal, or cell 0 better by 0.03 / 0.05 in accuracy. Prints the
  probability that halving drops cell 0 when it is the best, and that its winner is beaten by the best.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from rmexp.halving import STATISTICS, State, decide, per_pair, plan
from rmexp.rungs import pair_loss, planned_steps, read_rungs
from rmexp.stats import N_RESAMPLES, decisions, paired_comparison
from rmexp.sweep import read_jobs, sweep_keys

ETAS, RULES = (2, 3, 4), ("rank", "guarded")


# ---------------------------------------------------------------- the grid's per-pair results


def export(grid_dir: Path, out: Path, partial: bool = False, into: dict | None = None) -> dict:
    """A trained grid's per-pair results: per cell its swept values, each rung's per-pair rewards with its train_s
    and score_s, and the final pairs' rewards (scores.jsonl) with its metrics; the pair ids once. `into`: an
    earlier export whose cells these join (the cells a session could not finish, each run in its own run dir named
    as its grid job: hydra.run.dir=<dir>/<n>)."""
    jobs = read_jobs(grid_dir)
    keys = sweep_keys(grid_dir) or (into or {}).get("keys") or []
    cells, missing = dict((into or {}).get("cells", {})), {}
    rung_ids, final_ids = (into or {}).get("rung_pair_ids"), (into or {}).get("final_pair_ids")
    for job in jobs:
        if job.status != "ok":
            if partial:  # a grid still training: the cells done so far, the others named
                missing[job.dir.name] = {k: job.setting(k) for k in keys}
                continue
            raise SystemExit(f"{job.dir}: status {job.status}; the grid must be complete (--partial: the cells done)")
        rungs = read_rungs(job.dir)
        ids = rungs[0]["pairs"]["pair_id"]
        rung_ids = rung_ids or ids
        assert ids == rung_ids, f"{job.dir}: another rung split"
        scores = [json.loads(line) for line in (job.dir / "scores.jsonl").read_text().splitlines()]
        final_ids = final_ids or [s["pair_id"] for s in scores]
        assert [s["pair_id"] for s in scores] == final_ids, f"{job.dir}: other final pairs"
        m = job.metrics
        cells[job.dir.name] = {
            "values": {k: job.setting(k) for k in keys},
            "rungs": {repr(r["fraction"]): {"step": r["step"], "train_s": r["train_s"], "score_s": r["score_s"],
                                            "chosen": r["pairs"]["chosen"], "rejected": r["pairs"]["rejected"]}
                      for r in rungs},
            "planned_steps": planned_steps(rungs[-1]),
            "final": {"chosen": [s["reward_chosen"] for s in scores], "rejected": [s["reward_rejected"] for s in scores]},
            "metrics": {k: m.get(k) for k in ("pairwise_accuracy", "ci_low", "ci_high", "n_eval_pairs", "eval_loss",
                                              "initial_pairwise_accuracy", "length_baseline_accuracy", "train_runtime_s",
                                              "runtime_s", "global_step")}}
    missing = {k: v for k, v in missing.items() if k not in cells}
    cells = dict(sorted(cells.items(), key=lambda kv: int(kv[0])))
    sources = [*(into or {}).get("sources", [(into or {}).get("source")] if into else []), str(grid_dir)]
    grid = {"sources": [x for x in sources if x], "keys": keys, "rung_pair_ids": rung_ids,
            "final_pair_ids": final_ids, "cells": cells} | ({"missing": missing} if missing else {})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(grid, separators=(",", ":")) + "\n")
    return grid


def rung_pairs(cell: dict, fraction: float, pairs: np.ndarray | None = None) -> dict:
    """A cell's rung-split record at `fraction` as rungs.jsonl holds it (chosen, rejected, the loss as the run
    computed it: rmexp.rungs.pair_loss), optionally on a resample of the pairs."""
    r = cell["rungs"][repr(fraction)]
    out = {"chosen": np.asarray(r["chosen"]), "rejected": np.asarray(r["rejected"])}
    out["loss"] = np.asarray([pair_loss(c, j) for c, j in zip(r["chosen"], r["rejected"], strict=True)])
    return out if pairs is None else {k: v[pairs] for k, v in out.items()}


def final_decisions(cell: dict) -> np.ndarray:
    return decisions(cell["final"]["chosen"], cell["final"]["rejected"])


# ---------------------------------------------------------------- replay


def replay(grid: dict, eta: int, rule: str, pairs: np.ndarray | None = None, statistic: str = "loss",
           rungs: list[float] | None = None, n_resamples: int = N_RESAMPLES) -> dict:
    """One halving sweep on the grid, decided as rmexp.halving decides: the cells each rung kept, the winner,
    and how far each cell trained."""
    names = list(grid["cells"])
    fractions, counts = plan(len(names), eta, rungs)
    alive, reached, history = names, {}, []
    for k, f in enumerate(fractions):
        for c in alive:
            reached[c] = f
        if k == len(fractions) - 1:
            break
        stat = {c: stat_of(grid["cells"][c], f, pairs, statistic) for c in alive}
        kept, stopped = decide(stat, counts[k + 1], rule, n_resamples=n_resamples, statistic=statistic)
        history.append({"rung": k, "fraction": f, "kept": kept, "stopped": sorted(stopped)})
        alive = kept
    winner = min(alive, key=lambda c: (float(np.mean(stat_of(grid["cells"][c], 1.0, pairs, statistic))), int(c)))
    return {"eta": eta, "rule": rule, "rungs": fractions, "history": history, "winner": winner, "reached": reached,
            "survivors": alive}


def stat_of(cell: dict, fraction: float, pairs, statistic: str) -> np.ndarray:
    """The per-pair decision statistic, as rmexp.halving computes it (per_pair)."""
    return per_pair(rung_pairs(cell, fraction, pairs), statistic)


def cost(grid: dict, result: dict) -> dict:
    """Pair-steps and seconds of one replayed sweep beside the full grid's (batch 1: a step is a pair)."""
    cells = grid["cells"]
    steps = sum(cells[c]["rungs"][repr(f)]["step"] for c, f in result["reached"].items())
    full_steps = sum(c["planned_steps"] for c in cells.values())
    seconds = 0.0
    for c, f in result["reached"].items():
        rungs = [g for g in result["rungs"] if g <= f]
        seconds += cells[c]["rungs"][repr(f)]["train_s"] + sum(cells[c]["rungs"][repr(g)]["score_s"] for g in rungs)
    full = sum(c["rungs"][repr(1.0)]["train_s"] for c in cells.values())
    return {"pair_steps": steps, "full_pair_steps": full_steps, "step_ratio": round(steps / full_steps, 3),
            "seconds": round(seconds, 1), "full_seconds": round(full, 1), "time_ratio": round(seconds / full, 3)}


def best_of_grid(grid: dict) -> str:
    return max(grid["cells"], key=lambda c: (final_decisions(grid["cells"][c]).mean(), -int(c)))


def beaten(grid: dict, best: str, cell: str) -> tuple[bool, dict]:
    """Whether the full grid's best beats `cell` on the final pairs (paired exact test, p < 0.05)."""
    result = paired_comparison(final_decisions(grid["cells"][cell]), final_decisions(grid["cells"][best]),
                               n_resamples=2000)
    return result["p_value"] < 0.05 and result["delta"] > 0, result


def replay_all(grid: dict, n_boot: int, seed: int, statistic: str, rungs: list[float] | None = None) -> list[dict]:
    cells = grid["cells"]
    best = best_of_grid(grid)
    worst = min(cells, key=lambda c: (final_decisions(cells[c]).mean(), int(c)))
    _, spread = beaten(grid, best, worst)
    print(f"grid: {len(cells)} cells; best cell {best} {fmt_cell(grid, best)}, worst {worst} {fmt_cell(grid, worst)}; "
          f"best - worst {spread['delta']:+.3f} on {spread['n_pairs']} final pairs, exact paired p {spread['p_value']:.2g}",
          file=sys.stderr)
    rows = []
    n_rung = len(grid["rung_pair_ids"])
    rng = np.random.default_rng(seed)
    resamples = [rng.integers(0, n_rung, n_rung) for _ in range(n_boot)]
    full = min(cells, key=lambda c: (float(np.mean(stat_of(cells[c], 1.0, None, statistic))), int(c)))
    lost, comparison = beaten(grid, best, full)
    dropped = sum(beaten(grid, best, min(cells, key=lambda c: (float(np.mean(stat_of(cells[c], 1.0, p, statistic))),
                                                                 int(c))))[0] for p in resamples)
    rows.append({"eta": None, "rule": "full grid, chosen on the rung split", "statistic": statistic, "winner": full,
                 "winner_values": cells[full]["values"], "winner_accuracy": round(final_decisions(cells[full]).mean(), 4),
                 "best": best, "best_accuracy": round(final_decisions(cells[best]).mean(), 4),
                 "gap": round(-comparison["delta"], 4), "p_vs_best": round(comparison["p_value"], 4),
                 "tied_with_best": not lost, "p_drop_tied_bootstrap": round(dropped / max(n_boot, 1), 4),
                 "step_ratio": 1.0, "time_ratio": 1.0})
    for eta in ETAS:
        for rule in RULES:
            result = replay(grid, eta, rule, statistic=statistic, rungs=rungs)
            lost, comparison = beaten(grid, best, result["winner"])
            dropped = sum(beaten(grid, best, replay(grid, eta, rule, p, statistic, rungs, 1000)["winner"])[0]
                          for p in resamples)
            rows.append({"eta": eta, "rungs": result["rungs"], "rule": rule, "statistic": statistic,
                         "winner": result["winner"],
                         "winner_values": cells[result["winner"]]["values"],
                         "winner_accuracy": round(final_decisions(cells[result["winner"]]).mean(), 4),
                         "best": best, "best_accuracy": round(final_decisions(cells[best]).mean(), 4),
                         "gap": round(-comparison["delta"], 4), "p_vs_best": round(comparison["p_value"], 4),
                         "tied_with_best": not lost, "p_drop_tied_bootstrap": round(dropped / max(n_boot, 1), 4),
                         "history": result["history"]} | cost(grid, result))
    return rows


def fmt_cell(grid: dict, cell: str) -> str:
    c = grid["cells"][cell]
    return "(" + ", ".join(f"{k}={v}" for k, v in c["values"].items()) + f": {final_decisions(c).mean():.3f})"


# ---------------------------------------------------------------- simulation


def spreads(grid: dict) -> dict[float, tuple[float, float, float]]:
    """Per rung: (mean margin, sd of the pair effect shared by the cells, sd of a cell's own noise), from the
    grid's per-pair rung margins (a two-way decomposition: pair x cell)."""
    out = {}
    cells = list(grid["cells"].values())
    for key in cells[0]["rungs"]:
        m = np.stack([np.asarray(c["rungs"][key]["chosen"]) - np.asarray(c["rungs"][key]["rejected"]) for c in cells])
        resid = m - m.mean(axis=0, keepdims=True) - m.mean(axis=1, keepdims=True) + m.mean()
        noise = float(np.sqrt((resid ** 2).sum() / ((m.shape[0] - 1) * (m.shape[1] - 1))))
        pair = float(np.sqrt(max(m.mean(axis=0).var(ddof=1) - noise ** 2 / m.shape[0], 1e-12)))
        out[float(key)] = (float(m.mean()), pair, noise)
    final = np.stack([np.asarray(c["final"]["chosen"]) - np.asarray(c["final"]["rejected"]) for c in cells])
    resid = final - final.mean(axis=0, keepdims=True) - final.mean(axis=1, keepdims=True) + final.mean()
    noise = float(np.sqrt((resid ** 2).sum() / ((final.shape[0] - 1) * (final.shape[1] - 1))))
    out["final"] = (float(final.mean()), float(np.sqrt(max(final.mean(axis=0).var(ddof=1) - noise ** 2 / final.shape[0],
                                                          1e-12))), noise)
    return out


def shift_for(gap: float, mean: float, pair: float, noise: float) -> float:
    """The margin shift that raises the expected accuracy (P(margin > 0)) by `gap`."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    sd = float(np.hypot(pair, noise))
    base = norm.cdf(mean / sd)
    return 0.0 if gap == 0 else brentq(lambda s: norm.cdf((mean + s) / sd) - base - gap, 0.0, 20 * sd)


def sim_stat(margin: np.ndarray, statistic: str) -> np.ndarray:
    return per_pair({"chosen": margin, "rejected": np.zeros_like(margin), "loss": np.logaddexp(0.0, -margin)}, statistic)


def simulate(grid: dict, n_cells: int, gap: float, n_sweeps: int, seed: int, statistic: str = "loss",
             rungs: list[float] | None = None) -> list[dict]:
    """Sweeps of `n_cells` simulated cells (cell 0 better by `gap` in expected final accuracy, the same margin
    shift at every rung), for each eta and rule: P(cell 0 dropped), and P(the winner is beaten by the sweep's
    best on the final pairs)."""
    rng = np.random.default_rng(seed)
    sp = spreads(grid)
    n_rung, n_final = len(grid["rung_pair_ids"]), len(grid["final_pair_ids"])
    fm, fp, fn = sp["final"]
    shift_final = shift_for(gap, fm, fp, fn)
    rows = []
    outcomes = {(None, "full grid"): [0, 0]} | {(eta, rule): [0, 0] for eta in ETAS for rule in RULES}
    for _ in range(n_sweeps):
        # one sweep's draws: rung margins at every fraction, final margins; shared by every eta and rule
        margins = {}
        for f, (mean, pair, noise) in sp.items():
            if f == "final":
                continue
            shift = shift_final * (noise / fn if fn else 1.0)  # the same advantage in units of the cell noise
            m = mean + rng.normal(0, pair, n_rung)[None, :] + rng.normal(0, noise, (n_cells, n_rung))
            m[0] += shift
            margins[f] = m
        final = fm + rng.normal(0, fp, n_final)[None, :] + rng.normal(0, fn, (n_cells, n_final))
        final[0] += shift_final
        fd = (final > 0).astype(np.float64)
        best = int(np.argmax(fd.mean(axis=1)))
        full = int(np.argmin([sim_stat(m, statistic).mean() for m in margins[1.0]]))  # the full grid, on the rung split
        test = paired_comparison(fd[full], fd[best], n_resamples=1, interval=(0.0, 0.0))
        outcomes[None, "full grid"][0] += full != 0
        outcomes[None, "full grid"][1] += test["p_value"] < 0.05 and test["delta"] > 0
        for eta in ETAS:
            fractions, counts = plan(n_cells, eta, rungs)
            for rule in RULES:
                alive = [str(i) for i in range(n_cells)]
                for k, f in enumerate(fractions[:-1]):
                    losses = {c: sim_stat(margins[f][int(c)], statistic) for c in alive}
                    alive, _ = decide(losses, counts[k + 1], rule, n_resamples=500, statistic=statistic)
                winner = int(min(alive, key=lambda c: sim_stat(margins[1.0][int(c)], statistic).mean()))
                test = paired_comparison(fd[winner], fd[best], n_resamples=1, interval=(0.0, 0.0))
                outcomes[eta, rule][0] += winner != 0
                outcomes[eta, rule][1] += test["p_value"] < 0.05 and test["delta"] > 0
    for (eta, rule), (dropped, beaten_) in outcomes.items():
        rows.append({"cells": n_cells, "gap": gap, "eta": eta, "rungs": rungs, "rule": rule, "statistic": statistic,
                     "sweeps": n_sweeps,
                     "p_cell0_dropped": round(dropped / n_sweeps, 4), "p_winner_beaten": round(beaten_ / n_sweeps, 4)})
    return rows


# ---------------------------------------------------------------- a real sweep against its replay


def check(grid: dict, sweep_dir: Path) -> dict:
    """A real halving sweep against the replay of its setting on the grid: the same cells kept at every rung,
    the same winner, and the winner's final figures and rung losses equal to the grid cell's."""
    state = State.read(sweep_dir)
    cells = grid["cells"]
    by_values = {json.dumps(c["values"], sort_keys=True): name for name, c in cells.items()}
    keys = grid["keys"]
    to_grid = {}
    for cell in state.cells:
        job = next(j for j in read_jobs(sweep_dir) if j.dir.name == cell)
        to_grid[cell] = by_values[json.dumps({k: job.setting(k) for k in keys}, sort_keys=True)]
    result = replay(grid, state.eta, state.rule, statistic=state.statistic, rungs=state.rungs)
    real = [sorted(to_grid[c] for c in d["kept"]) for d in state.decisions[:-1]]
    replayed = [sorted(h["kept"]) for h in result["history"]]
    winner = sweep_dir / state.winner
    metrics = json.loads((winner / "metrics.json").read_text())
    grid_metrics = cells[to_grid[state.winner]]["metrics"]
    same_metrics = {k: metrics[k] == grid_metrics[k] for k in ("pairwise_accuracy", "eval_loss", "ci_low", "ci_high",
                                                               "global_step")}
    real_losses = {r["fraction"]: r["pairs"]["chosen"] for r in read_rungs(winner)}
    same_rungs = all(real_losses[f] == cells[to_grid[state.winner]]["rungs"][repr(f)]["chosen"] for f in real_losses)
    return {"kept_real": real, "kept_replay": replayed, "same_decisions": real == replayed,
            "winner_real": to_grid[state.winner], "winner_replay": result["winner"],
            "same_winner": to_grid[state.winner] == result["winner"], "same_metrics": same_metrics,
            "same_rung_rewards": same_rungs}


def table(grid: dict, sweep_dir: Path) -> str:
    """docs/sweeps.md's table: every cell of the full grid (its final accuracy with its interval, against the grid's
    best on the same pairs) beside what the halving sweep in `sweep_dir` did with it (rung reached, and the mean rung
    statistic it decided on at each rung)."""
    from rmexp.metrics import wilson_interval

    state = State.read(sweep_dir)
    cells, best = grid["cells"], best_of_grid(grid)
    keys = grid["keys"]
    statistic = state.statistic.replace("_", " ") if state else "loss"
    lines = ["| cell | " + " | ".join(keys) + f" | full grid: accuracy [95% CI] | vs best, exact p | rung {statistic} "
             "(halving) | halving: reached |", "|" + " --- |" * (len(keys) + 5)]
    for name, c in cells.items():
        d = final_decisions(c)
        low, high = wilson_interval(int(d.sum()), d.size)
        _, cmp_ = beaten(grid, best, name)
        real = read_rungs(sweep_dir / name) if state is not None else []
        status = json.loads((sweep_dir / name / "metrics.json").read_text())["status"] if real else ""
        reached = (f"rung {real[-1]['rung']} ({status})" if real else "") + (" **winner**" if state and name == state.winner else "")
        vs = "best" if name == best else f"{-cmp_['delta']:+.3f}, p {cmp_['p_value']:.2g}"
        lines.append(f"| {name} | " + " | ".join(str(c["values"][k]) for k in keys)
                     + f" | {d.mean():.3f} [{low:.2f}, {high:.2f}] | {vs} | "
                     + " / ".join(f"{per_pair(r['pairs'], state.statistic).mean():.3f}" for r in real)
                     + f" | {reached} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export")
    p.add_argument("grid_dir", type=Path)
    p.add_argument("--out", type=Path, default=Path("bench/results/halving_grid.json"))
    p.add_argument("--partial", action="store_true", help="a grid still training: export the cells done")
    p.add_argument("--into", type=Path, help="an earlier export the cells join (it is rewritten: --out)")
    p = sub.add_parser("replay")
    p.add_argument("grid", type=Path)
    p.add_argument("--bootstrap", type=int, default=500, help="resamples of the rung split's pairs")
    p.add_argument("--statistic", choices=STATISTICS, default="loss")
    p.add_argument("--rungs", type=float, nargs="+", help="rungs as fractions (else eta's own), e.g. 0.333333 1.0")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("simulate")
    p.add_argument("--grid", type=Path, required=True, help="the grid whose spreads the simulation takes")
    p.add_argument("--cells", type=int, default=9)
    p.add_argument("--gaps", type=float, nargs="+", default=[0.0, 0.03, 0.05])
    p.add_argument("--sweeps", type=int, default=1000)
    p.add_argument("--statistic", choices=STATISTICS, default="loss")
    p.add_argument("--rungs", type=float, nargs="+", help="rungs as fractions (else eta's own), e.g. 0.25 0.5 1.0")
    p.add_argument("--seed", type=int, default=0)
    for name in ("check", "table"):
        p = sub.add_parser(name)
        p.add_argument("grid", type=Path)
        p.add_argument("sweep_dir", type=Path)
    args = parser.parse_args()
    if args.command == "export":
        into = json.loads(args.into.read_text()) if args.into else None
        grid = export(args.grid_dir, args.out, args.partial, into)
        print(f"wrote {args.out}: {len(grid['cells'])} cells, {len(grid['rung_pair_ids'])} rung pairs, "
              f"{len(grid['final_pair_ids'])} final pairs")
        return
    grid = json.loads(args.grid.read_text())
    if grid.get("missing"):
        raise SystemExit(f"{args.grid}: cells {sorted(grid['missing'])} were still training when it was exported")
    if args.command == "replay":
        for row in replay_all(grid, args.bootstrap, args.seed, args.statistic, args.rungs):
            print(json.dumps(row))
    elif args.command == "simulate":
        for gap in args.gaps:
            for row in simulate(grid, args.cells, gap, args.sweeps, args.seed, args.statistic, args.rungs):
                print(json.dumps(row))
    elif args.command == "table":
        print(table(grid, args.sweep_dir))
    else:
        result = check(grid, args.sweep_dir)
        print(json.dumps(result))
        sys.exit(0 if result["same_decisions"] and result["same_winner"] and all(result["same_metrics"].values())
                 and result["same_rung_rewards"] else 1)


if __name__ == "__main__":
    main()
