"""Successive halving over a multirun grid: every cell trains to the first rung, the best 1/eta go on to the next,
and so on; each rung is one launch through the configured Hydra launcher (basic, joblib, submitit/SLURM).

    rmexp-train sweep=lora_lr_halving                                   # the preset: r x lr, eta 3
    rmexp-train -m hydra/sweeper=halving lora.r=4,8,16 trainer.learning_rate=5e-5,2e-4,8e-4 data.rung_path=<file>

A cell is one run dir (`<sweep dir>/<cell>/`) for its whole life: its first launch trains to the first rung
(`trainer.stop_at_rung=0`), scores the rung split and pauses with a checkpoint; each later launch of a survivor
continues that checkpoint (`trainer.resume=auto`) to the next rung, with the learning-rate schedule planned for
the whole run, so the last survivor ends as the uninterrupted run would (rmexp.rungs). The decision at a rung ranks
the cells by a statistic of the rung split (hydra.sweeper.statistic: the mean Bradley-Terry loss by default; paired:
every cell scores the same pairs); a cell not
kept ends `stopped` (metrics.json, W&B), with its rung and its statistic. The sweep's state (`halving.json`: the
cells, the plan, each rung's statistics and decisions) is written after every decision, so the same command after
a kill -9 continues where the sweep stopped.

This module reads run dirs and decides; it imports neither torch nor the trainer. Hydra finds the sweeper as a
plugin (hydra_plugins.rmexp_halving), which is this module's `HalvingSweeper`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rmexp.errors import UserError
from rmexp.rundir import write_json
from rmexp.rungs import read_rungs

log = logging.getLogger("rmexp.halving")

STATE_FILE = "halving.json"
RULES = ("rank", "guarded")


class HalvingError(UserError):
    """A halving sweep that cannot go on as asked (another grid in the sweep dir, no rung split, a bad setting)."""


# ---------------------------------------------------------------- the plan and the rule


def plan(n_cells: int, eta: int, rungs: list[float] | None = None) -> tuple[list[float], list[int]]:
    """(the rungs as fractions of each cell's planned steps, the cells trained to each rung). Without `rungs`:
    as many rungs as it takes to keep one cell, dividing by eta (rounded down, at least 1) at each, and the
    fractions eta^-(n-1), ..., 1/eta, 1, rounded to 6 digits (the same steps in every job and in a replay)."""
    if eta < 2:
        raise HalvingError(f"hydra.sweeper.eta must be an integer >= 2, got {eta}")
    counts = [n_cells]
    if rungs:
        fractions = [float(f) for f in rungs]
        if not all(0 < f <= 1 for f in fractions) or fractions != sorted(set(fractions)) or fractions[-1] != 1.0:
            raise HalvingError(f"hydra.sweeper.rungs must be increasing fractions in (0, 1] ending at 1, got {rungs}")
        while len(counts) < len(fractions):
            counts.append(max(1, counts[-1] // eta))
        return fractions, counts
    while counts[-1] > 1:
        counts.append(max(1, counts[-1] // eta))
    n = len(counts)
    return [round(float(eta) ** -(n - 1 - k), 6) for k in range(n)], counts


STATISTICS = ("loss", "calibrated_loss", "error")


def check_statistic(statistic: str) -> None:
    if statistic not in STATISTICS:
        raise HalvingError(f"hydra.sweeper.statistic must be one of {', '.join(STATISTICS)}, got {statistic!r}")


def per_pair(pairs: dict, statistic: str = "loss") -> np.ndarray:
    """Each rung-split pair's value of the decision statistic (lower is better), from a rungs.jsonl record's
    `pairs`. loss: the Bradley-Terry loss as the run computed it. calibrated_loss: the loss at the one temperature
    that minimises the cell's mean loss (margin / T), so a cell whose rewards swing to a large scale early is ranked by
    how it orders the pairs, not by its scale. error: 1 where the pair is decided wrong (ties wrong)."""
    check_statistic(statistic)
    if statistic == "loss":
        return np.asarray(pairs["loss"], dtype=np.float64)
    margin = np.asarray(pairs["chosen"], dtype=np.float64) - np.asarray(pairs["rejected"], dtype=np.float64)
    if statistic == "error":
        return (margin <= 0).astype(np.float64)
    from scipy.optimize import minimize_scalar

    scale = float(np.abs(margin).mean()) or 1.0
    fit = minimize_scalar(lambda log_t: np.logaddexp(0.0, -margin / (scale * np.exp(log_t))).mean(),
                          bounds=(-12.0, 12.0), method="bounded", options={"xatol": 1e-6})
    return np.logaddexp(0.0, -margin / (scale * np.exp(fit.x)))


@dataclass
class Decision:
    """One rung's outcome: each cell's statistic (mean rung-split loss and accuracy) and which go on."""

    rung: int
    statistics: dict[str, dict]  # cell -> {loss, accuracy, step, n_pairs}; a failed cell is absent
    kept: list[str]
    stopped: dict[str, str]  # cell -> why (the log's and the report's words)
    failed: list[str] = field(default_factory=list)


def decide(losses: dict[str, np.ndarray], keep: int, rule: str = "rank", n_resamples: int = 10_000,
           seed: int = 0, statistic: str = "loss") -> tuple[list[str], dict[str, str]]:
    """The cells that go on and why the others stop, from each cell's per-pair values of the rung statistic (the
    same pairs, in one order; lower is better). rank: the `keep` lowest means (ties: the earlier cell). guarded:
    those, and any other cell the rung's best does not beat beyond the 95% paired-bootstrap interval of the
    per-pair difference."""
    if rule not in RULES:
        raise HalvingError(f"hydra.sweeper.rule must be one of {', '.join(RULES)}, got {rule!r}")
    order = sorted(losses, key=lambda c: (float(np.mean(losses[c])), cell_order(c)))
    kept = order[:keep]
    best = order[0]
    stopped = {}
    low = {}
    if rule == "guarded" and len(order) > keep:
        from rmexp.stats import paired_bootstrap

        rest = order[keep:]
        bounds = paired_bootstrap(losses[best], np.stack([losses[c] for c in rest]), n_resamples, seed)
        low = {c: float(bounds[i][0]) for i, c in enumerate(rest)}
        kept += [c for c in rest if low[c] <= 0]
    best_loss = float(np.mean(losses[best]))
    for rank, c in enumerate(order, 1):
        if c in kept:
            continue
        gap = float(np.mean(losses[c])) - best_loss
        why = f"rank {rank} of {len(order)} (keeping {keep}): rung {statistic.replace('_', ' ')} " \
              f"{float(np.mean(losses[c])):.4f}, {gap:+.4f} behind cell {best}"
        if c in low:
            why += f" (paired 95% interval of the gap starts at {low[c]:+.4f}, above 0)"
        stopped[c] = why
    return sorted(kept, key=cell_order), stopped


def cell_order(cell: str) -> tuple[int, str]:
    return (int(cell), "") if cell.isdigit() else (1 << 30, cell)


# ---------------------------------------------------------------- the sweep's state on disk


@dataclass
class State:
    """halving.json: the grid, the plan and every decision taken, rewritten whole after each decision."""

    cells: dict[str, list[str]]  # cell (its subdir) -> its overrides
    rungs: list[float]
    counts: list[int]
    eta: int
    rule: str
    statistic: str = "loss"
    decisions: list[dict] = field(default_factory=list)
    launches: list[dict] = field(default_factory=list)  # {rung, cells, started, ended}: the sweep's own wall time
    winner: str | None = None

    @classmethod
    def read(cls, sweep_dir: Path) -> State | None:
        path = Path(sweep_dir) / STATE_FILE
        if not path.is_file():
            return None
        return cls(**json.loads(path.read_text(encoding="utf-8")))

    def write(self, sweep_dir: Path) -> None:
        write_json(Path(sweep_dir) / STATE_FILE, asdict(self))

    def label(self, cell: str) -> str:
        """The cell's swept values (`lora.r=8 trainer.learning_rate=0.0002`), what tells it from the others."""
        keys = {o.split("=", 1)[0] for c in self.cells.values() for o in c}
        swept = {k for k in keys if len({o for c in self.cells.values() for o in c if o.split("=", 1)[0] == k}) > 1}
        return " ".join(o for o in self.cells[cell] if o.split("=", 1)[0] in swept) or "the only cell"

    def alive(self) -> list[str]:
        """The cells no decision stopped and no rung saw fail."""
        gone = {c for d in self.decisions for c in (*d["stopped"], *d["failed"])}
        return [c for c in self.cells if c not in gone]


def rung_result(run_dir: Path, rung: int, fraction: float) -> dict | None:
    """A cell's scoring of a rung (rungs.jsonl), once the launch that trained to it has ended well (metrics.json:
    paused there, or ok for the last rung); None before."""
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    status = metrics.get("status")
    if status not in ("paused", "ok", "stopped") or (status == "paused" and metrics["rung"]["rung"] < rung):
        return None
    for record in read_rungs(run_dir):
        if record["rung"] == rung and math.isclose(record["fraction"], fraction):
            return record
    return None


def cell_status(run_dir: Path) -> str:
    try:
        return json.loads((run_dir / "metrics.json").read_text(encoding="utf-8")).get("status", "running")
    except (OSError, ValueError):
        return "missing"


def mark_stopped(run_dir: Path, rung: int, statistic: dict, why: str, logger_cfg=None) -> None:
    """A cell the sweep stops: metrics.json says `stopped`, with the rung it reached, its statistic and why (the rest
    of what its last launch wrote kept); its W&B run, continued by id, says the same."""
    path = run_dir / "metrics.json"
    metrics = json.loads(path.read_text(encoding="utf-8"))
    if metrics.get("status") == "stopped":
        return
    backend = getattr(logger_cfg, "backend", None) if logger_cfg is not None else None
    if metrics.get("wandb_run_id") and getattr(backend, "value", backend) == "wandb":  # first: a failure is retried
        from rmexp.tracking import start_run

        try:
            run = start_run(logger_cfg, {}, run_dir, metrics.get("wandb_run_name"), None,
                            run_id=metrics["wandb_run_id"])
            run.summary.update({"status": "stopped", "halving/stopped_at_rung": rung,
                                "halving/rung_loss": statistic["loss"], "halving/stop_reason": why})
            run.finish(exit_code=0)
        except Exception as e:  # noqa: BLE001 - W&B must not cost the sweep; metrics.json says it all
            log.warning("halving: cell %s: W&B run %s not marked stopped (%s: %s)", run_dir.name,
                        metrics["wandb_run_id"], type(e).__name__, e)
    metrics |= {"status": "stopped", "stopped_at_rung": rung, "rung_statistic": statistic, "stop_reason": why}
    write_json(path, metrics)


# ---------------------------------------------------------------- the sweeper


class HalvingSweeper:
    """Hydra Sweeper (registered as hydra/sweeper=halving by hydra_plugins.rmexp_halving): the grid of the sweep
    overrides and `params`, halved rung by rung through the configured launcher."""

    def __init__(self, eta: int = 3, rungs: list[float] | None = None, rule: str = "rank",
                 statistic: str = "calibrated_loss", params: dict[str, str] | None = None):
        self.eta, self.rungs, self.rule, self.params = int(eta), list(rungs) if rungs else None, rule, params or {}
        self.statistic = statistic
        self.hydra_context = self.config = self.launcher = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def grid(self, arguments: list[str]) -> dict[str, list[str]]:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        from rmexp._compat import grid_cells

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        return {str(i): cell for i, cell in enumerate(grid_cells(overrides))}

    def check_rung_split(self, cell: list[str]) -> None:
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(cell))
        if not (cfg.data.get("rung_path") or (cfg.data.get("rung_fraction") or 0) > 0):
            raise HalvingError("a halving sweep decides on a rung split: set data.rung_path=<file> or "
                               "data.rung_fraction=0.1 (held out of the training pairs, apart from the eval pairs)")

    def sweep(self, arguments: list[str]) -> list:
        from omegaconf import OmegaConf

        if self.rule not in RULES:  # checked here, not in __init__: Hydra would wrap the error in its traceback
            raise HalvingError(f"hydra.sweeper.rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        check_statistic(self.statistic)
        cells = self.grid(arguments)
        self.check_rung_split(next(iter(cells.values())))
        fractions, counts = plan(len(cells), self.eta, self.rungs)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        state = State.read(sweep_dir)
        if state is None:
            state = State(cells, fractions, counts, self.eta, self.rule, self.statistic)
        elif (state.cells, state.rungs, state.eta, state.rule, state.statistic) != (
                cells, fractions, self.eta, self.rule, self.statistic):
            raise HalvingError(f"{sweep_dir} holds another halving sweep ({sweep_dir / STATE_FILE}: "
                               f"{len(state.cells)} cells, rungs {state.rungs}, eta {state.eta}, rule {state.rule}, "
                               f"statistic {state.statistic}); run this one in a new hydra.sweep.dir, or the same "
                               "command as that sweep's")
        else:
            log.info("halving: continuing %s after rung %d", sweep_dir, len(state.decisions) - 1)
        log.info("halving: %d cells, eta %d, rule %s on the rung %s: rungs at %s of each cell's planned steps, "
                 "training %s cells", len(cells), self.eta, self.rule, self.statistic, fractions, counts)
        state.write(sweep_dir)
        for decision in state.decisions:  # a kill between a decision and its marks: mark again
            self.mark(sweep_dir, decision)
        returns = []
        for rung in range(len(state.decisions), len(fractions)):
            returns.append(self.run_rung(sweep_dir, state, rung))
        self.log_summary(sweep_dir, state)
        return returns

    def job_overrides(self, sweep_dir: Path, state: State, cell: str, rung: int) -> list[str]:
        from rmexp.rundir import pick_checkpoint

        run_dir = sweep_dir / cell
        # a cell killed before its first intact checkpoint starts over (its leftovers moved to previous-<time>/)
        resume = "auto" if pick_checkpoint(run_dir / "checkpoints", set_aside=False)[0] is not None else "never"
        rungs = "[" + ",".join(repr(f) for f in state.rungs) + "]"
        last = rung == len(state.rungs) - 1
        return [*state.cells[cell], f"trainer.rungs={rungs}", f"trainer.stop_at_rung={'null' if last else rung}",
                f"trainer.resume={resume}", f"hydra.sweep.subdir={cell}"] + (
                    ["hydra.output_subdir=null"] if (run_dir / ".hydra" / "overrides.yaml").is_file() else [])

    def run_rung(self, sweep_dir: Path, state: State, rung: int):
        fraction, alive = state.rungs[rung], state.alive()
        todo = [c for c in alive if rung_result(sweep_dir / c, rung, fraction) is None]
        returns = None
        if todo:
            log.info("halving: rung %d of %d (%.4g of the planned steps): training %d of %d cells (%s)", rung,
                     len(state.rungs) - 1, fraction, len(todo), len(alive), ", ".join(todo))
            batch = [self.job_overrides(sweep_dir, state, c, rung) for c in todo]
            self.validate_batch_is_legal(batch)
            started = time.time()
            returns = self.launcher.launch(batch, initial_job_idx=rung * len(state.cells))
            state.launches.append({"rung": rung, "cells": todo, "started": started, "ended": time.time()})
        results = {c: rung_result(sweep_dir / c, rung, fraction) for c in alive}
        failed = [c for c, r in results.items() if r is None]
        for c in failed:
            log.error("halving: cell %s (%s) did not reach rung %d: %s", c, state.label(c), rung,
                      cell_status(sweep_dir / c))
        scored = {c: r for c, r in results.items() if r is not None}
        values = {c: per_pair(r["pairs"], state.statistic) for c, r in scored.items()}
        statistics = {c: {k: r[k] for k in ("loss", "accuracy", "step", "n_pairs", "train_s")}
                      | {state.statistic: float(values[c].mean())} for c, r in scored.items()}
        if rung == len(state.rungs) - 1:  # the end: no decision, the winner is the best that got here
            kept, stopped = sorted(scored, key=cell_order), {}
            if scored:
                state.winner = min(scored, key=lambda c: (float(values[c].mean()), cell_order(c)))
        else:
            ids = {tuple(r["pairs"]["pair_id"]) for r in scored.values()}
            if len(ids) > 1:
                raise HalvingError(f"rung {rung}: the cells scored different rung splits; the rung statistic is "
                                   "paired, so every cell must score the same pairs (one data.rung_* for the sweep)")
            keep = min(state.counts[rung + 1], len(scored))
            kept, stopped = decide(values, keep, state.rule, statistic=state.statistic) if scored else ([], {})
        decision = Decision(rung, statistics, kept, stopped, failed)
        state.decisions.append(asdict(decision))
        state.write(sweep_dir)
        last = rung == len(state.rungs) - 1
        for c in kept:
            log.info("halving: rung %d: cell %s (%s) %s, rung %s %.4f", rung, c, state.label(c),
                     "finished" if last else "goes on", state.statistic, statistics[c][state.statistic])
        self.mark(sweep_dir, asdict(decision))
        return returns

    def mark(self, sweep_dir: Path, decision: dict) -> None:
        logger_cfg = self.config.get("logger") if self.config is not None else None
        for c, why in decision["stopped"].items():
            log.info("halving: rung %d: cell %s stops: %s", decision["rung"], c, why)
            mark_stopped(sweep_dir / c, decision["rung"], decision["statistics"][c], why, logger_cfg)

    def validate_batch_is_legal(self, batch) -> None:
        for overrides in batch:
            self.hydra_context.config_loader.load_sweep_config(master_config=self.config, sweep_overrides=list(overrides))

    def log_summary(self, sweep_dir: Path, state: State) -> None:
        if state.winner is None:
            log.error("halving: no cell reached the last rung")
            return
        wall = sum(launch["ended"] - launch["started"] for launch in state.launches)
        log.info("halving: winner cell %s (%s) by its rung-split loss; launches took %.0f s (%s; rmexp-report "
                 "sweep_dir=%s for the table and the cost beside the full grid's)", state.winner,
                 state.label(state.winner), wall, sweep_dir / STATE_FILE, sweep_dir)

