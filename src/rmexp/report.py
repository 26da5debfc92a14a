"""Summarise a sweep: `rmexp-report sweep_dir=<dir>` (or `python -m rmexp.report sweep_dir=<dir>`).

Writes summary.csv, summary.md and heatmap.png into the sweep dir, prints the best job and the
command that reproduces it, and logs the table and heatmap to W&B in the sweep's group when the
jobs logged to W&B. Works while a sweep is still running, and with failed jobs.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import hydra
import yaml
from omegaconf import DictConfig

from rmexp.config import CONF_PATH, to_typed
from rmexp.sweep import Job, read_jobs, sweep_group, sweep_keys

RESULT_COLUMNS = ["pairwise_accuracy", "eval_loss", "runtime_s", "status"]
ROW_KEY, COL_KEY = "lora.r", "trainer.learning_rate"


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


def rows_of(jobs: list[Job], keys: list[str]) -> list[dict]:
    rows = []
    for job in jobs:
        row = {"job": job.dir.name}
        row.update({k: job.setting(k) for k in keys})  # a key a job did not override shows its default
        row.update({c: job.metrics.get(c, "") for c in RESULT_COLUMNS})
        row["status"] = job.status
        if job.status == "failed":
            row["error"] = job.metrics.get("error", "")
        rows.append(row)
    return rows


def best_job(jobs: list[Job]) -> Job | None:
    done = [j for j in jobs if j.status == "ok" and isinstance(j.metrics.get("pairwise_accuracy"), (int, float))]
    # ties on accuracy: lower eval loss wins
    return max(done, key=lambda j: (j.metrics["pairwise_accuracy"], -j.metrics.get("eval_loss", math.inf)), default=None)


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
                  other_keys: list[str] = ()) -> bool:
    """Mean pairwise accuracy per (lora.r, learning rate) cell; failed or running cells are grey. No heatmap
    when a cell would average jobs that differ in another swept key (the table shows those)."""
    cells = [(j.setting(row_key) or None, j.setting(col_key) or None, j) for j in jobs]
    cells = [(r, c, j) for r, c, j in cells if r is not None and c is not None]
    if not cells:
        return False
    others = [k for k in other_keys if k not in (row_key, col_key)]
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
    fig, ax = plt.subplots(figsize=(1.4 * len(cols) + 2.5, 0.8 * len(rows) + 2))
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
            text = f"{v:.3f}" if np.isfinite(v) else "failed" if any(
                j.status == "failed" for rr, cc, j in cells if rr == rows[i] and cc == cols[k]) else "–"
            bright = np.isfinite(v) and image.norm(v) > 0.6
            ax.text(k, i, text, ha="center", va="center", color="black" if bright or not np.isfinite(v) else "white")
    fig.colorbar(image, ax=ax, label="held-out pairwise accuracy")
    ax.set_title("pairwise accuracy by LoRA rank and learning rate")
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


def log_to_wandb(sweep_dir: Path, jobs: list[Job], rows: list[dict], heatmap: Path | None) -> str | None:
    """A `report` run in the sweep's W&B group, with the table and the heatmap; None when W&B is off."""
    cfg_file = next((j.dir / ".hydra" / "config.yaml" for j in jobs if (j.dir / ".hydra" / "config.yaml").is_file()), None)
    if cfg_file is None:
        return None
    logger_cfg = (yaml.safe_load(cfg_file.read_text()) or {}).get("logger", {})
    if logger_cfg.get("backend", "wandb") != "wandb" or logger_cfg.get("mode") == "disabled":
        return None
    import wandb
    from omegaconf import OmegaConf

    from rmexp.tracking import start_run

    group = sweep_group(sweep_dir)
    cfg = OmegaConf.create({"project": "rmexp", "entity": None, "group": None, "name": None, "tags": [],
                            "mode": None, "init_timeout": 60.0,
                            **{k: v for k, v in logger_cfg.items() if k != "backend"}})
    cfg.group, cfg.name = group, f"report-{group}"
    run = start_run(cfg, {"sweep_dir": str(sweep_dir)}, sweep_dir, cfg.name, group)
    try:
        columns = list(dict.fromkeys(k for row in rows for k in row))
        table = wandb.Table(columns=columns, data=[[str(r.get(c, "")) if c not in RESULT_COLUMNS[:3] or r.get(c) == ""
                                                    else r[c] for c in columns] for r in rows])
        payload = {"sweep/summary": table}
        if heatmap is not None:
            payload["sweep/heatmap"] = wandb.Image(str(heatmap))
        run.log(payload)
        best = best_job(jobs)
        if best is not None:
            run.summary.update({"best/pairwise_accuracy": best.metrics["pairwise_accuracy"], "best/job": best.dir.name})
        return run.id
    finally:
        wandb.finish()


def report(sweep_dir: str | Path, use_wandb: bool = True) -> dict:
    sweep_dir = Path(sweep_dir)
    jobs = read_jobs(sweep_dir)
    if not jobs:
        raise SystemExit(f"{sweep_dir}: no sweep jobs found (no */.hydra/overrides.yaml)")
    keys = swept_keys(sweep_dir, jobs)
    rows = rows_of(jobs, keys)
    write_tables(rows, sweep_dir)
    heatmap = sweep_dir / "heatmap.png"
    has_heatmap = write_heatmap(jobs, heatmap, other_keys=keys)
    counts = {s: sum(j.status == s for j in jobs) for s in ("ok", "failed", "running")}
    print(f"{sweep_dir}: {len(jobs)} jobs ({counts['ok']} ok, {counts['failed']} failed, {counts['running']} running)")
    print(f"wrote {sweep_dir / 'summary.csv'}, {sweep_dir / 'summary.md'}" + (f", {heatmap}" if has_heatmap else ""))
    best = best_job(jobs)
    if best is None:
        print("no finished job yet")
    else:
        shown = ", ".join(f"{k}={best.setting(k)}" for k in keys)
        print(f"best: job {best.dir.name} ({shown}): pairwise_accuracy {best.metrics['pairwise_accuracy']:.4f}, "
              f"eval_loss {best.metrics.get('eval_loss', float('nan')):.4f}")
        print(f"reproduce: {best.command()}")
    run_id = log_to_wandb(sweep_dir, jobs, rows, heatmap if has_heatmap else None) if use_wandb else None
    return {"jobs": len(jobs), **counts, "best": best.dir.name if best else None, "wandb_run": run_id}


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="report")
def cli(cfg: DictConfig) -> dict:
    args = to_typed(cfg)
    return report(args.sweep_dir, use_wandb=args.wandb)


if __name__ == "__main__":
    cli()
