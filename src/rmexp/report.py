"""Summarise a sweep: `rmexp-report sweep_dir=<dir>` (or `python -m rmexp.report sweep_dir=<dir>`).

Writes summary.csv, summary.md and heatmap.png into the sweep dir, prints the best job and the
command that reproduces it, and logs the table and heatmap to W&B in the sweep's group when the
jobs logged to W&B. Works while a sweep is still running, and with failed jobs.

Every job scored the same eval pairs, so the jobs are compared with the best pair by pair
(rmexp.stats, on each job's scores.jsonl): each row has its accuracy's 95% interval (`ci_low`,
`ci_high`), `n_eval_pairs`, its gap to the best with a paired-bootstrap interval (`delta_vs_best`,
`delta_ci_low`, `delta_ci_high`), the exact McNemar p of that gap Holm-corrected over the jobs
(`p_vs_best`), and `tied_with_best` (the gap is not significant at 0.05). The verdict names the
jobs that cannot be told apart from the best, and the heatmap boxes their cells. A job scored on
other pairs than the best's is not paired: its `pairing` says why. With `trainer.seed` among the
swept keys, the jobs differing only in the seed are one row (`n_seeds`, the mean accuracy,
`accuracy_sd`, `accuracy_min`, `accuracy_max`), paired through their seed-averaged per-pair
decisions, and the heatmap shows the mean.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import numpy as np
import yaml
from omegaconf import DictConfig

from rmexp import console
from rmexp.compare import PairingError, Scores, aligned, averaged, read_scores
from rmexp.config import CONF_PATH, ReportConfig, to_typed
from rmexp.errors import MissingPathError, UserError
from rmexp.halving import State
from rmexp.metrics import wilson_interval
from rmexp.rundir import evaluated_ensemble
from rmexp.rungs import planned_steps, read_rungs
from rmexp.stats import ALPHA, N_RESAMPLES, against_best, min_detectable_difference, paired_bootstrap
from rmexp.sweep import Job, read_jobs, sweep_group, sweep_keys

RESULT_COLUMNS = ["pairwise_accuracy", "eval_loss", "runtime_s", "status"]
PAIRED_COLUMNS = ["ci_low", "ci_high", "n_eval_pairs", "delta_vs_best", "delta_ci_low", "delta_ci_high",
                  "p_vs_best", "tied_with_best"]
ROW_KEY, COL_KEY = "lora.r", "trainer.learning_rate"
SEED_KEY = "trainer.seed"


def swept_keys(sweep_dir: Path, jobs: list[Job]) -> list[str]:
    """The sweep's own keys (multirun.yaml), else the override keys whose value differs between jobs."""
    declared = sweep_keys(sweep_dir)
    if declared:
        return declared
    keys: list[str] = []
    for job in jobs:
        keys += [k for k in job.values if k not in keys and not k.startswith(("hydra", "sweep"))]
    varying = [k for k in keys if len({j.values.get(k) for j in jobs}) > 1]
    return varying or keys


@dataclass
class Entry:
    """One row of the report: a job, or (a seed axis) the jobs that differ only in `trainer.seed`."""

    jobs: list[Job]
    scores: Scores | None = None  # per-pair decisions, seed-averaged for a group
    pairing: str = ""  # why the entry is not paired with the best
    paired: dict = field(default_factory=dict)  # its stats.against_best result
    label: str = ""  # an also row's name
    model: str = ""  # an also row: what the model is

    @property
    def name(self) -> str:
        return self.label or ", ".join(j.dir.name for j in self.jobs)

    @property
    def done(self) -> list[Job]:
        return [j for j in self.jobs if j.status == "ok" and isinstance(j.metrics.get("pairwise_accuracy"), (int, float))]

    @property
    def accuracies(self) -> list[float]:
        return [j.metrics["pairwise_accuracy"] for j in self.done]

    @property
    def accuracy(self) -> float | None:
        return statistics.fmean(self.accuracies) if self.done else None

    @property
    def eval_loss(self) -> float:
        losses = [j.metrics["eval_loss"] for j in self.done if isinstance(j.metrics.get("eval_loss"), (int, float))]
        return statistics.fmean(losses) if losses else math.inf


def entries_of(jobs: list[Job], keys: list[str]) -> list[Entry]:
    """A row per job; with `trainer.seed` among the keys, a row per setting of the other keys, in job order."""
    if SEED_KEY not in keys:
        return [Entry([j]) for j in jobs]
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault(tuple(job.setting(k) for k in keys if k != SEED_KEY), []).append(job)
    return [Entry(g) for g in groups.values()]


def rows_of(entries: list[Entry], keys: list[str]) -> list[dict]:
    """The table: the swept keys (a key a job did not override shows its default), the results and the paired
    columns; a seed group's row has the seeds, n_seeds, and the mean, sd, min and max of their accuracies."""
    rows, seeds = [], SEED_KEY in keys
    for entry in entries:
        job = entry.jobs[0]
        row = {"job": entry.name}
        row.update({k: job.setting(k) for k in keys if k != SEED_KEY})
        if seeds:
            accs = entry.accuracies
            statuses = [j.status for j in entry.jobs]
            row |= {SEED_KEY: ",".join(j.setting(SEED_KEY) for j in entry.jobs), "n_seeds": len(accs),
                    "pairwise_accuracy": entry.accuracy if accs else "",
                    "accuracy_sd": statistics.stdev(accs) if len(accs) > 1 else "",
                    "accuracy_min": min(accs, default=""), "accuracy_max": max(accs, default=""),
                    "eval_loss": entry.eval_loss if math.isfinite(entry.eval_loss) else "",
                    "runtime_s": sum(j.metrics.get("runtime_s", 0) for j in entry.jobs),
                    "status": "ok" if set(statuses) == {"ok"} else ", ".join(
                        f"{statuses.count(s)} {s}" for s in dict.fromkeys(statuses))}
        else:
            row.update({c: job.metrics.get(c, "") for c in RESULT_COLUMNS})
            row["status"] = job.status
        row.update(paired_cells(entry))
        if entry.model:
            row["model"] = entry.model
        if entry.pairing:
            row["pairing"] = entry.pairing
        errors = [(f"{j.dir.name}: " if seeds else "") + j.metrics.get("error", "") for j in entry.jobs
                  if j.status == "failed"]
        if errors:
            row["error"] = "; ".join(errors)
        rows.append(row)
    return rows


def paired_cells(entry: Entry) -> dict:
    """The row's PAIRED_COLUMNS, blank where there is nothing to say. The accuracy's 95% interval: a job's
    Wilson interval (metrics.json's, else from its scores); a seed group's, the percentile bootstrap of its
    seed-averaged accuracy over pairs (the spread of the seeds is in accuracy_sd)."""
    cells = dict.fromkeys(PAIRED_COLUMNS, "")
    single = entry.done[0].metrics if len(entry.done) == 1 else None
    if single is not None:
        cells.update({k: single[k] for k in ("ci_low", "ci_high", "n_eval_pairs") if k in single})
    if entry.scores is not None:
        d = entry.scores.decisions
        cells["n_eval_pairs"] = len(d)
        if single is None:
            cells["ci_low"], cells["ci_high"] = paired_bootstrap(np.zeros(len(d)), d)
        elif "ci_low" not in single:
            cells["ci_low"], cells["ci_high"] = wilson_interval(int(d.sum()), len(d))
    if entry.paired:
        p = entry.paired
        cells.update(delta_vs_best=p["delta"], delta_ci_low=p["delta_ci_low"], delta_ci_high=p["delta_ci_high"],
                     p_vs_best=p["p_holm"], tied_with_best=p["tied_with_best"])
    return cells


ALSO_PREFIX = "also: "  # an also row's name, so it never collides with a job's


def also_entry(path: str | Path, sweep_dir: Path) -> Entry:
    """Another model's row: an rmexp-evaluate dir (eval_metrics.json) or a run dir (metrics.json) holding
    scores.jsonl, as a one-job entry named after its dir; `model` says what it is (an ensemble or soup of which
    jobs, from the evaluated dir's ensemble.json)."""
    path = Path(path)
    if not path.is_dir():
        raise MissingPathError(f"also: no such eval dir {path}")
    if (path / "eval_metrics.json").is_file():
        found = json.loads((path / "eval_metrics.json").read_text(encoding="utf-8"))
        metrics = {k: found[k] for k in ("pairwise_accuracy", "ci_low", "ci_high", "runtime_s") if k in found}
        metrics |= {"status": "ok", "n_eval_pairs": found.get("n_pairs"), "checkpoint": found.get("checkpoint")}
    elif (path / "metrics.json").is_file():
        metrics = json.loads((path / "metrics.json").read_text(encoding="utf-8")) | {"checkpoint": str(path)}
    else:
        raise MissingPathError(f"also: {path} is neither an rmexp-evaluate dir (eval_metrics.json) nor a run dir "
                               "(metrics.json): evaluate the model on the jobs' eval pairs and pass that dir")
    return Entry([Job(path, [], metrics)], label=ALSO_PREFIX + path.name,
                 model=describe(path, metrics["checkpoint"], sweep_dir))


def describe(path: Path, checkpoint: str | None, sweep_dir: Path) -> str:
    """What the model an eval dir evaluated is: `mean ensemble of jobs 1, 7` (members named by job when they are
    all the sweep's, else by path), a soup or greedy soup of them, else its dir."""
    record = evaluated_ensemble(path)
    if record is None:
        return str(checkpoint or "")
    sweep = sweep_dir.resolve()
    paths = [Path(m["path"]).resolve() for m in record["members"]]
    names = ("jobs " + ", ".join(p.name for p in paths) if all(p.parent == sweep for p in paths)
             else ", ".join(map(str, paths)))
    kind = "mean ensemble" if record.get("mode") == "mean" else "greedy soup" if record.get("greedy") else "soup"
    return f"{kind} of {names}"


def best_entry(entries: list[Entry]) -> Entry | None:
    done = [e for e in entries if e.accuracy is not None]
    # ties on accuracy: lower eval loss wins
    return max(done, key=lambda e: (e.accuracy, -e.eval_loss), default=None)


@dataclass
class Verdict:
    """The best entry, the entries that cannot be told apart from it (itself among them), and what the eval
    set can resolve."""

    best: Entry | None
    tied: list[Entry] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)
    n_pairs: int | None = None
    min_detectable: float = math.nan
    reason: str = ""  # why there is no paired comparison at all


def pair_with_best(entries: list[Entry], n_resamples: int = N_RESAMPLES, seed: int = 0,
                   also: list[Entry] = ()) -> Verdict:
    """Read every finished entry's scores (seed-averaged for a group), take the best by mean accuracy, and test
    each entry scored on the best's pairs against it (stats.against_best, Holm over the entries compared); an
    entry scored on other pairs is refused, its `pairing` saying why. The smallest detectable gap is
    stats.min_detectable_difference at the observed share of pairs the entries decide unlike the best
    (averaged over the entries compared), or 2p(1-p) at the best's accuracy p when none is compared.
    `also` (other models on the same pairs: an ensemble of the jobs) are tested against the best job likewise,
    Holm-corrected over themselves; they are never the best, and change nothing of the jobs' verdict."""
    for entry in [*entries, *also]:
        if entry.done:
            try:
                entry.scores = averaged([read_scores(j.dir) for j in entry.done], f"job {entry.name}")
            except PairingError as e:
                entry.pairing = f"not paired: {e}"
    best = best_entry(entries)
    if best is None:
        return Verdict(None, reason="no finished job yet")
    if best.scores is None:
        return Verdict(best, reason=f"the best job has no per-pair scores ({best.pairing or 'no scores.jsonl'})")
    for group in (entries, also):  # one correction each: rows added beside the jobs change nothing of theirs
        decisions = {best.name: best.scores.decisions}
        for entry in group:
            if entry is best or entry.scores is None:
                continue
            try:
                ref_idx, idx = aligned(best.scores, entry.scores, require_same=True)
            except PairingError as e:
                entry.pairing = f"refused: {e}"
                continue
            ordered = np.empty_like(best.scores.decisions)
            ordered[ref_idx] = entry.scores.decisions[idx]  # in the best's pair order
            decisions[entry.name] = ordered
        results = against_best(decisions, best.name, n_resamples, seed)
        for entry in group:
            entry.paired = results.get(entry.name, {})
    n = len(best.scores.decisions)
    shares = [(e.paired["n_a_better"] + e.paired["n_b_better"]) / n for e in entries if e.paired and e is not best]
    psi = statistics.fmean(shares) if shares and any(shares) else 2 * best.scores.accuracy * (1 - best.scores.accuracy)
    return Verdict(best, [e for e in entries if e.paired.get("tied_with_best")], entries, n,
                   min_detectable_difference(n, psi))


def verdict_line(v: Verdict) -> str:
    """E.g. "best: job 7; jobs 3, 7, 12 cannot be told apart on these 96 pairs (smallest gap this eval set can
    detect at 80% power: 0.14)"; a seed group is named by its jobs in brackets."""
    if v.best is None or v.n_pairs is None:
        return f"no paired comparison: {v.reason}"

    def named(e: Entry) -> str:
        return f"[{e.name}]" if len(e.jobs) > 1 else e.name

    mdd = (f"{v.min_detectable:.2f}" if math.isfinite(v.min_detectable)
           else "not estimable: these runs disagree on too few pairs")
    n_paired = sum(1 for e in v.entries if e.paired)
    if len(v.tied) == n_paired > 2:  # a list of every job says less than this
        said = f"none of the {n_paired} jobs paired can be told apart"
    elif len(v.tied) > 1:
        said = f"jobs {', '.join(named(e) for e in v.tied)} cannot be told apart"
    elif n_paired == 1:
        said = "no other job is paired with it"
    else:
        said = "every other job paired with it is worse beyond chance"
    return (f"best: job {named(v.best)}; {said} on these {v.n_pairs} pairs (exact McNemar, Holm-corrected, alpha "
            f"{ALPHA}; smallest gap this eval set can detect at 80% power, before correction: {mdd})")


def write_tables(rows: list[dict], out: Path) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with (out / "summary.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    def cell(v):
        if isinstance(v, float):
            return f"{v:.4f}"
        return str(v).replace("|", "\\|").replace("\n", " ")[:120]

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    (out / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _as_number(v: str) -> float:
    try:
        return float(v)
    except ValueError:
        return math.nan


def write_heatmap(jobs: list[Job], path: Path, row_key: str = ROW_KEY, col_key: str = COL_KEY,
                  other_keys: list[str] = (), tied: set[str] = frozenset()) -> bool:
    """Mean pairwise accuracy per (lora.r, learning rate) cell (over the seeds, with a seed axis); failed or
    running cells are grey; a cell holding a job of `tied` (job dir names: those that cannot be told apart from
    the best) is boxed. No heatmap when a cell would average jobs that differ in another swept key (the table
    shows those)."""
    cells = [(j.setting(row_key) or None, j.setting(col_key) or None, j) for j in jobs]
    cells = [(r, c, j) for r, c, j in cells if r is not None and c is not None]
    if not cells:
        return False
    others = [k for k in other_keys if k not in (row_key, col_key, SEED_KEY)]
    for r, c, _ in cells:
        if len({tuple(j.setting(k) for k in others) for rr, cc, j in cells if (rr, cc) == (r, c)}) > 1:
            print(f"no heatmap: jobs in one ({row_key}, {col_key}) cell differ in {', '.join(others)}")
            return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = sorted({r for r, _, _ in cells}, key=_as_number)
    cols = sorted({c for _, c, _ in cells}, key=_as_number)
    if len(cols) > 12:  # a search (optuna) draws continuous rates: bin them on a log scale
        return _scatter(cells, path, row_key, col_key)
    grid = np.full((len(rows), len(cols)), np.nan)
    for r in rows:
        for c in cols:
            accs = [j.metrics["pairwise_accuracy"] for rr, cc, j in cells
                    if rr == r and cc == c and j.status == "ok"]
            if accs:
                grid[rows.index(r), cols.index(c)] = float(np.mean(accs))
    fig, ax = plt.subplots(figsize=(max(1.4 * len(cols) + 2.5, 6.5), 0.8 * len(rows) + 2))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#cccccc")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=np.nanmin(grid) if np.isfinite(grid).any() else 0,
                      vmax=np.nanmax(grid) if np.isfinite(grid).any() else 1, aspect="auto")
    ax.set_xticks(range(len(cols)), [f"{_as_number(c):.0e}" if _as_number(c) == _as_number(c) else c for c in cols])
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel(f"learning rate ({col_key})")
    ax.set_ylabel(f"LoRA rank ({row_key})")
    for i in range(len(rows)):
        for k in range(len(cols)):
            v = grid[i, k]
            here = [j for rr, cc, j in cells if rr == rows[i] and cc == cols[k]]
            stopped = [j.metrics.get("stopped_at_rung") for j in here if j.status == "stopped"]
            text = f"{v:.3f}" if np.isfinite(v) else "failed" if any(j.status == "failed" for j in here) else (
                f"stopped\nrung {stopped[0]}" if stopped else "–")
            bright = np.isfinite(v) and image.norm(v) > 0.6
            ax.text(k, i, text, ha="center", va="center", color="black" if bright or not np.isfinite(v) else "white")
            if any(j.dir.name in tied for rr, cc, j in cells if rr == rows[i] and cc == cols[k]):
                ax.add_patch(plt.Rectangle((k - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#e4572e", linewidth=3))
    n_seeds = max(len({j.setting(SEED_KEY) for rr, cc, j in cells if (rr, cc) == (r, c)}) for r, c, _ in cells)
    fig.colorbar(image, ax=ax, label="held-out pairwise accuracy" + (f"\n(mean of {n_seeds} seeds)" if n_seeds > 1 else ""))
    ax.set_title("pairwise accuracy by LoRA rank and learning rate"
                 + ("\nboxed: not told apart from the best (paired, Holm, 0.05)" if tied else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _scatter(cells, path: Path, row_key: str, col_key: str) -> bool:
    import matplotlib.pyplot as plt

    ok = [(float(r), float(c), j.metrics["pairwise_accuracy"]) for r, c, j in cells if j.status == "ok"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if ok:
        r, c, a = zip(*ok, strict=True)
        points = ax.scatter(c, r, c=a, cmap="viridis", s=90)
        for x, y, v in ok:
            ax.annotate(f"{v:.3f}", (x, y), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
        fig.colorbar(points, ax=ax, label="held-out pairwise accuracy")
    ax.set_xscale("log")
    ax.set_yscale("log", base=2)
    ax.set_xlabel(f"learning rate ({col_key})")
    ax.set_ylabel(f"LoRA rank ({row_key})")
    ax.set_title("pairwise accuracy per trial")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def log_to_wandb(sweep_dir: Path, jobs: list[Job], rows: list[dict], heatmap: Path | None,
                 verdict: Verdict) -> str | None:
    """A `report` run in the sweep's W&B group, with the table and the heatmap; None when W&B is off."""
    cfg_file = next((j.dir / ".hydra" / "config.yaml" for j in jobs if (j.dir / ".hydra" / "config.yaml").is_file()), None)
    if cfg_file is None:
        return None
    from omegaconf import OmegaConf

    from rmexp.config import group_defaults

    # the jobs' logger settings; a key their rmexp did not write takes today's default
    cfg = OmegaConf.merge(group_defaults().logger, (yaml.safe_load(cfg_file.read_text()) or {}).get("logger", {}))
    if cfg.backend != "wandb" or cfg.mode == "disabled":
        return None
    import wandb

    from rmexp.tracking import start_run

    group = sweep_group(sweep_dir)
    cfg.group, cfg.name = group, f"report-{group}"
    run = start_run(cfg, {"sweep_dir": str(sweep_dir)}, sweep_dir, cfg.name, group)
    try:
        columns = list(dict.fromkeys(k for row in rows for k in row))
        numeric = {c for c in columns if any(isinstance(r.get(c), (int, float)) for r in rows)}  # bools too

        def value(r: dict, c: str):  # a number column keeps numbers (W&B sorts and plots them), blank as None
            v = r.get(c, "")
            return (None if v == "" else v) if c in numeric else str(v)

        table = wandb.Table(columns=columns, data=[[value(r, c) for c in columns] for r in rows])
        payload = {"sweep/summary": table}
        if heatmap is not None:
            payload["sweep/heatmap"] = wandb.Image(str(heatmap))
        run.log(payload)
        if verdict.best is not None:
            run.summary.update({"best/pairwise_accuracy": verdict.best.accuracy, "best/job": verdict.best.name})
        if verdict.n_pairs is not None:
            run.summary.update({"best/tied_jobs": [e.name for e in verdict.tied], "best/n_eval_pairs": verdict.n_pairs,
                                "best/min_detectable_gap": verdict.min_detectable})
        return run.id
    finally:
        wandb.finish()


def report(sweep_dir: str | Path, use_wandb: bool = True, n_resamples: int = N_RESAMPLES, seed: int = 0,
           also: list[str | Path] = ()) -> dict:
    """`also`: eval dirs of other models on the jobs' eval pairs (an ensemble or soup of the jobs), each a row
    after the jobs', paired with the best job."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise MissingPathError(f"sweep_dir: no such dir {sweep_dir} (a multirun dir, e.g. outputs/multirun/<date>/<time>)")
    jobs = read_jobs(sweep_dir)
    if not jobs:
        raise UserError(f"{sweep_dir}: no sweep jobs found (no */.hydra/overrides.yaml): sweep_dir is a multirun's dir")
    keys = swept_keys(sweep_dir, jobs)
    entries = entries_of(jobs, keys)
    others = [also_entry(p, sweep_dir) for p in also]
    names = [e.name for e in others]
    if len(set(names)) != len(names):
        raise UserError(f"also: two dirs share a name ({', '.join(sorted({n for n in names if names.count(n) > 1}))}): "
                        "the rows are named by dir; give each evaluation its own dir name (hydra.run.dir=...)")
    verdict = pair_with_best(entries, n_resamples, seed, others)
    rows = rows_of(entries + others, keys)
    add_rung_history(rows, jobs)
    write_tables(rows, sweep_dir)
    heatmap = sweep_dir / "heatmap.png"
    tied = {j.dir.name for e in verdict.tied for j in e.jobs}
    has_heatmap = write_heatmap(jobs, heatmap, other_keys=keys, tied=tied)
    counts = {s: sum(j.status == s for j in jobs) for s in ("ok", "failed", "running", "paused", "stopped")}
    shown = ", ".join(f"{n} {s}" for s, n in counts.items() if n or s in ("ok", "failed", "running"))
    print(f"{sweep_dir}: {len(jobs)} jobs ({shown})")
    halving = halving_report(sweep_dir, jobs)
    print(f"wrote {sweep_dir / 'summary.csv'}, {sweep_dir / 'summary.md'}" + (f", {heatmap}" if has_heatmap else ""))
    best = verdict.best
    if best is None:
        print("no finished job yet")
    else:
        shown = ", ".join(f"{k}={best.jobs[0].setting(k)}" for k in keys if k != SEED_KEY or len(best.jobs) == 1)
        seeds = f" over {len(best.done)} seeds" if len(best.jobs) > 1 else ""
        print(verdict_line(verdict))
        print(f"  job {best.name} ({shown}): pairwise_accuracy {best.accuracy:.4f}{seeds}, "
              f"eval_loss {best.eval_loss if math.isfinite(best.eval_loss) else float('nan'):.4f}")
        for entry in entries:
            if entry.pairing:
                print(f"  job {entry.name}: {entry.pairing}")
        top = max(best.done, key=lambda j: j.metrics["pairwise_accuracy"])
        print(f"reproduce: {top.command()}")
        for entry in others:
            print(also_line(entry, best))
    run_id = log_to_wandb(sweep_dir, jobs, rows, heatmap if has_heatmap else None, verdict) if use_wandb else None
    return {"jobs": len(jobs), **counts, "best": best.name if best else None, "halving": halving,
            "also": {e.name: e.paired or {"pairing": e.pairing} for e in others},
            "tied_with_best": [e.name for e in verdict.tied], "n_eval_pairs": verdict.n_pairs,
            "min_detectable_gap": verdict.min_detectable, "wandb_run": run_id}


def also_line(entry: Entry, best: Entry) -> str:
    """E.g. "also: eval-mean4 (mean ensemble of jobs 1, 7, 0, 3): 0.6322 [0.5838, 0.6782]; - best job 7: +0.0076
    [-0.0302, +0.0453], p 1 (Holm) on 397 pairs"."""
    metrics = entry.jobs[0].metrics
    head = f"{entry.name}" + (f" ({entry.model})" if entry.model else "")
    if not entry.paired:
        return f"{head}: {entry.pairing or 'not paired'}"
    p = entry.paired
    interval = (f" [{metrics['ci_low']:.4f}, {metrics['ci_high']:.4f}]" if {"ci_low", "ci_high"} <= set(metrics)
                else "")
    return (f"{head}: {p['accuracy_b']:.4f}{interval}; - best job {best.name}: {p['delta']:+.4f} "
            f"[{p['delta_ci_low']:+.4f}, {p['delta_ci_high']:+.4f}], p {p['p_holm']:.2g} (Holm) on {p['n_pairs']} pairs")


def add_rung_history(rows: list[dict], jobs: list[Job]) -> None:
    """A halving sweep's cells (rows of one job): the rung each reached, its rung-split loss at every rung it
    scored, and why it stopped."""
    by_name = {j.dir.name: j for j in jobs}
    for row in rows:
        job = by_name.get(row["job"])
        scored = read_rungs(job.dir) if job is not None else []
        if not scored:
            continue
        row["rung_reached"] = scored[-1]["rung"]
        row["rung_losses"] = " / ".join(f"{r['loss']:.4f}" for r in scored)
        if job.status == "stopped":
            row["stop_reason"] = job.metrics.get("stop_reason", "")


def halving_report(sweep_dir: Path, jobs: list[Job]) -> dict | None:
    """A halving sweep's cost beside the full grid's, printed: pair-steps trained and training seconds, measured,
    and for the full grid projected from each cell's own measured seconds per step (rmexp.rungs' train_s: the
    training alone, rung scoring apart); the sweep's launch wall time, and what the cells it stopped would have
    added at their measured step time. None for another sweep."""
    state = State.read(sweep_dir)
    if state is None:
        return None
    cost = {"pair_steps": 0, "full_pair_steps": 0, "train_s": 0.0, "full_train_s": 0.0, "rung_score_s": 0.0}
    for job in jobs:
        scored = read_rungs(job.dir)
        if not scored:
            continue
        last, planned = scored[-1], planned_steps(scored[-1])
        batch = int(job.setting("trainer.per_device_train_batch_size") or 1) * int(
            job.setting("trainer.gradient_accumulation_steps") or 1)
        cost["pair_steps"] += last["step"] * batch
        cost["full_pair_steps"] += planned * batch
        cost["train_s"] += last["train_s"]
        cost["full_train_s"] += last["train_s"] / last["step"] * planned
        cost["rung_score_s"] += sum(r["score_s"] for r in scored)
    wall = sum(launch["ended"] - launch["started"] for launch in state.launches)
    cost |= {"wall_s": round(wall, 1), "full_wall_s": round(wall + cost["full_train_s"] - cost["train_s"], 1),
             "winner": state.winner, "rungs": state.rungs, "eta": state.eta, "rule": state.rule}
    if cost["full_pair_steps"]:
        print(f"halving (eta {state.eta}, rule {state.rule}, rungs {state.rungs}): winner cell {state.winner} "
              f"({state.label(state.winner) if state.winner else 'none yet'}); trained {cost['pair_steps']} pair-steps "
              f"of the full grid's {cost['full_pair_steps']} ({cost['pair_steps'] / cost['full_pair_steps']:.2f}x); "
              f"training {cost['train_s']:.0f} s of a projected {cost['full_train_s']:.0f} s "
              f"({cost['train_s'] / cost['full_train_s']:.2f}x); launches {wall:.0f} s wall, the full grid projected "
              f"{cost['full_wall_s']:.0f} s ({wall / cost['full_wall_s']:.2f}x; rung scoring {cost['rung_score_s']:.0f} s "
              "of it)")
    return cost


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="report")
def app(cfg: DictConfig) -> dict:
    with console.reported():
        args = to_typed(cfg)
        return report(args.sweep_dir, use_wandb=args.wandb, n_resamples=args.n_resamples, seed=args.seed,
                      also=args.also)


def cli() -> None:
    console.run(app, ReportConfig)


if __name__ == "__main__":
    cli()
