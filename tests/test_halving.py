"""Successive halving (rmexp.halving, rmexp.rungs): the plan and the rule, and real sweeps on the tiny model
through the basic launcher and submitit's local executor: stopped cells, the survivor as the uninterrupted run,
a kill -9 mid-sweep, a failing cell, the report."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, compose_cfg
from rmexp.halving import HalvingError, State, decide, per_pair, plan
from rmexp.rungs import pair_loss, read_rungs, rung_steps
from wandb_records import OfflineRun

TINY = ["model=tiny", "data.path=data/preference.jsonl", "data.rung_fraction=0.2", "trainer.max_steps=8",
        "trainer.eval_steps=1000", "trainer.save_steps=1000", "trainer.learning_rate=1e-3",
        "lora.lora_dropout=0.1"]  # dropout draws random masks: scoring a rung must not move them
HALVING = [*TINY, "hydra/sweeper=halving", "hydra.sweeper.eta=2"]
GRID = ["trainer.learning_rate=1e-3,3e-3,1e-2"]  # 3 cells, eta 2: rungs 1/2 and 1; 3 cells, then 1


def halving(sweep_dir: Path, *extra: str, logger: str = "logger=none", **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rmexp.train", "-m", *HALVING, logger, *extra,
                             f"hydra.sweep.dir={sweep_dir}"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


# ---------------------------------------------------------------- the plan and the rule


def test_the_plan_divides_by_eta_until_one_cell_is_left():
    assert plan(9, 3) == ([0.111111, 0.333333, 1.0], [9, 3, 1])
    assert plan(9, 2) == ([0.125, 0.25, 0.5, 1.0], [9, 4, 2, 1])
    assert plan(9, 4) == ([0.0625, 0.25, 1.0], [9, 2, 1])
    assert plan(1, 3) == ([1.0], [1])
    assert plan(4, 2, [0.5, 1.0]) == ([0.5, 1.0], [4, 2])
    for bad in ([0.5], [0.5, 0.25, 1.0], [0.0, 1.0]):
        with pytest.raises(HalvingError, match="rungs"):
            plan(4, 2, bad)
    with pytest.raises(HalvingError, match="eta"):
        plan(4, 1)
    # every job and every replay map a rung to the same step
    assert rung_steps([0.111111, 0.333333, 1.0], 400) == [44, 133, 400]
    assert rung_steps([0.0625], 8) == [1]


def test_pair_loss_is_the_bradley_terry_loss_in_float64():
    for c, r in ((2.0, -1.0), (-30.0, 40.0), (0.5, 0.5), (1e-3, 0.0)):
        assert pair_loss(c, r) == pytest.approx(float(np.logaddexp(0.0, r - c)), rel=1e-15, abs=1e-300)


def test_rank_keeps_the_lowest_losses_and_guarded_also_keeps_a_cell_the_best_does_not_beat():
    rng = np.random.default_rng(0)
    base = rng.normal(0.69, 0.2, 200)
    noise = rng.normal(0.0, 0.05, 200)
    # cell 1 trails cell 0 by 0.004 on average, well inside the paired interval (about +-0.007 here)
    losses = {"0": base, "1": base + noise - noise.mean() + 0.004, "2": base + 0.3, "3": base + 0.31}
    kept, stopped = decide(losses, keep=1, rule="rank")
    assert kept == ["0"] and set(stopped) == {"1", "2", "3"} and "rank 2 of 4" in stopped["1"]
    kept, stopped = decide(losses, keep=1, rule="guarded")
    assert kept == ["0", "1"] and set(stopped) == {"2", "3"}  # 1 is within the paired interval of 0; 2, 3 are not
    assert "interval" in stopped["2"]
    with pytest.raises(HalvingError, match="rule"):
        decide(losses, keep=1, rule="best")


def test_the_calibrated_loss_ranks_a_cell_by_its_order_of_the_pairs_not_its_reward_scale():
    rng = np.random.default_rng(1)
    margin = rng.normal(0.4, 1.0, 300)
    pairs = lambda m: {"chosen": m, "rejected": np.zeros_like(m), "loss": np.logaddexp(0.0, -m)}  # noqa: E731
    calm, swung = per_pair(pairs(margin), "calibrated_loss"), per_pair(pairs(25.0 * margin), "calibrated_loss")
    # the same order of the pairs at 25x the scale: the same calibrated loss (to the temperature fit's tolerance),
    # where the raw loss of the swung cell is far worse
    assert swung.mean() == pytest.approx(calm.mean(), rel=1e-5)
    assert per_pair(pairs(25.0 * margin), "loss").mean() > 3 * per_pair(pairs(margin), "loss").mean()
    assert calm.mean() <= per_pair(pairs(margin), "loss").mean() + 1e-12  # T = 1 is among the temperatures tried
    assert per_pair(pairs(np.array([1.0, -1.0, 0.0])), "error").tolist() == [0.0, 1.0, 1.0]
    with pytest.raises(HalvingError, match="statistic"):
        per_pair(pairs(margin), "auc")


# ---------------------------------------------------------------- a real sweep


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> Path:
    """A halving sweep of 3 cells (eta 2: rungs 1/2 and 1), W&B offline, never interrupted."""
    sweep = tmp_path_factory.mktemp("halving") / "sweep"
    code, err = finish(halving(sweep, *GRID, logger="logger.mode=offline"))
    assert code == 0, err[-3000:]
    return sweep


@pytest.mark.slow
def test_a_halving_sweep_stops_cells_at_their_rung_and_trains_the_best_to_the_end(swept):
    state = State.read(swept)
    assert state.rungs == [0.5, 1.0] and state.counts == [3, 1] and len(state.decisions) == 2
    cells = {c: metrics(swept / c) for c in state.cells}
    winner = state.winner
    assert cells[winner]["status"] == "ok" and cells[winner]["global_step"] == 8
    assert [r["step"] for r in read_rungs(swept / winner)] == [4, 8]
    assert cells[winner]["rungs"][-1]["step"] == 8
    for c, m in cells.items():
        if c == winner:
            continue
        # stopped, not failed: the rung reached, its statistic, why; the rung checkpoint kept
        assert m["status"] == "stopped" and m["stopped_at_rung"] == 0 and m["global_step"] == 4, m
        assert "rank" in m["stop_reason"] and m["rung_statistic"]["step"] == 4
        assert (swept / c / "checkpoints" / "checkpoint-4").is_dir()
        assert not (swept / c / "adapter_config.json").exists()
    # the decision is the rule applied to the cells' own rungs.jsonl: it can be replayed
    losses = {c: np.asarray(read_rungs(swept / c)[0]["pairs"]["loss"]) for c in state.cells}
    assert decide(losses, 1, "rank")[0] == state.decisions[0]["kept"] == [winner]
    assert winner == min(losses, key=lambda c: losses[c].mean())
    # one W&B run per cell: the winner's two launches logged into one run, a stopped cell's run says stopped
    logs = list((swept / winner).glob("wandb/offline-run-*/run-*.wandb"))
    assert len(logs) == 2 and {p.stem for p in logs} == {f"run-{cells[winner]['wandb_run_id']}"}
    loser = next(c for c in state.cells if c != winner)
    run = OfflineRun(swept / loser)
    assert run.summary["status"] == "stopped" and run.summary["halving/stopped_at_rung"] == 0
    assert run.run_id == cells[loser]["wandb_run_id"]


@pytest.mark.slow
def test_a_survivor_ends_exactly_as_the_uninterrupted_run(swept, tmp_path):
    """Trained once through (its rungs scored on the way), the winning cell's config gives the same figures as
    the cell that paused at each rung and continued from its rung checkpoint."""
    from rmexp.train import main

    state = State.read(swept)
    whole = tmp_path / "whole"
    main(compose_cfg(*TINY, *state.cells[state.winner], "logger=none", "trainer.rungs=[0.5,1.0]",
                     f"paths.output_dir={whole}"))
    a, b = metrics(whole), metrics(swept / state.winner)
    for key in ("pairwise_accuracy", "eval_loss", "reward_mean", "reward_std", "mean_margin", "global_step",
                "initial_pairwise_accuracy"):
        assert a[key] == b[key], key
    # the whole-run loss is rebuilt from the checkpoint's logged losses: equal to float32 rounding of each
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=4 * float(np.finfo(np.float32).eps))
    assert [r["pairs"]["loss"] for r in read_rungs(whole)] == [r["pairs"]["loss"] for r in read_rungs(swept / state.winner)]
    scores = [(p / "scores.jsonl").read_text() for p in (whole, swept / state.winner)]
    assert scores[0] == scores[1]


@pytest.mark.slow
def test_kill_9_mid_sweep_then_the_same_command_ends_as_the_uninterrupted_sweep(swept, tmp_path):
    sweep = tmp_path / "killed"
    proc = halving(sweep, *GRID, logger="logger.mode=offline", start_new_session=True)
    deadline = time.time() + 300
    while not ((state := State.read(sweep)) and state.decisions):  # killed in the second rung's launch
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert State.read(sweep).winner is None  # it really died before the end
    code, err = finish(halving(sweep, *GRID, logger="logger.mode=offline"))
    assert code == 0, err[-3000:]
    a, b = State.read(swept), State.read(sweep)
    assert [(d["kept"], d["stopped"], d["failed"]) for d in a.decisions] == [
        (d["kept"], d["stopped"], d["failed"]) for d in b.decisions]
    strip = lambda d: {c: {k: v for k, v in s.items() if k != "train_s"} for c, s in d["statistics"].items()}  # noqa: E731
    assert [strip(d) for d in a.decisions] == [strip(d) for d in b.decisions]
    assert a.winner == b.winner
    m_a, m_b = metrics(swept / a.winner), metrics(sweep / b.winner)
    for key in ("pairwise_accuracy", "eval_loss", "reward_mean", "global_step"):
        assert m_a[key] == m_b[key], key
    assert {c: metrics(sweep / c)["status"] for c in b.cells} == {c: metrics(swept / c)["status"] for c in a.cells}


@pytest.mark.slow
def test_report_shows_each_cells_rungs_and_the_cost_beside_the_full_grids(swept, capsys):
    from rmexp.report import report

    result = report(swept, use_wandb=False, n_resamples=200)
    out = capsys.readouterr().out
    assert result["ok"] == 1 and result["stopped"] == 2 and result["failed"] == 0
    cost = result["halving"]
    # 3 cells of 8 planned steps at batch 1: 24 pair-steps in the full grid; 4 + 4 + 8 trained
    assert (cost["pair_steps"], cost["full_pair_steps"]) == (16, 24)
    # the full grid's training projected from each cell's own seconds per step (rungs.jsonl), cell by cell
    projected = sum(r[-1]["train_s"] / r[-1]["step"] * 8 for r in (read_rungs(swept / c) for c in ("0", "1", "2")))
    assert cost["full_train_s"] == pytest.approx(projected, rel=1e-9) and cost["train_s"] < cost["full_train_s"]
    assert "0.67x" in out and "winner cell" in out
    rows = list(csv.DictReader((swept / "summary.csv").open()))
    stopped = [r for r in rows if r["status"] == "stopped"]
    assert len(stopped) == 2 and all(r["rung_reached"] == "0" and "rank" in r["stop_reason"] for r in stopped)
    assert (swept / "heatmap.png").is_file()


@pytest.mark.slow
def test_another_grid_in_the_sweep_dir_is_refused_by_name(swept, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(swept, copy, ignore=shutil.ignore_patterns("wandb", "checkpoints"))
    code, err = finish(halving(copy, "trainer.learning_rate=1e-3,3e-3"))
    assert code == 1 and "holds another halving sweep" in err.strip().splitlines()[-1]


@pytest.mark.slow
def test_a_failing_cell_stops_alone_and_the_sweep_exits_nonzero(tmp_path):
    sweep = tmp_path / "failing"
    code, err = finish(halving(sweep, "lora.r=0,4"))  # lora.r=0 fails its config check
    assert code == 1 and "1 of 2 sweep jobs failed" in err
    state = State.read(sweep)
    assert state.decisions[0]["failed"] == ["0"] and state.winner == "1"
    assert metrics(sweep / "0")["status"] == "failed" and metrics(sweep / "1")["status"] == "ok"


@pytest.mark.slow
def test_a_two_rung_sweep_through_submitits_local_executor(tmp_path):
    sweep = tmp_path / "submitit"
    code, err = finish(halving(sweep, "lora.r=4,8", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"))
    assert code == 0, err[-3000:]
    state = State.read(sweep)
    assert state.rungs == [0.5, 1.0] and len(state.launches) == 2
    assert sorted(metrics(sweep / c)["status"] for c in state.cells) == ["ok", "stopped"]


def test_a_sweep_without_a_rung_split_is_refused_before_any_job():
    proc = subprocess.run([sys.executable, "-m", "rmexp.train", "-m", "model=tiny", "hydra/sweeper=halving",
                           "lora.r=4,8", "hydra.sweep.dir=/nonexistent/never"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1
    assert "data.rung_path" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_rungs_on_one_step_pause_once_and_a_launch_past_its_rung_does_not_train(tmp_path):
    """Rungs 0.1 and 0.125 of 8 steps are both step 1: one scoring, a record for each, and a launch told to pause
    at the first pauses past both. A launch whose checkpoint is already past its rung (killed after the save,
    before metrics.json said paused) pauses at once; the run still ends as the uninterrupted one."""
    from rmexp.train import main

    rungs = ["trainer.rungs=[0.1,0.125,0.5,1.0]", "logger=none", "trainer.learning_rate=3e-3"]
    whole, cell = tmp_path / "whole", tmp_path / "cell"
    main(compose_cfg(*TINY, *rungs, f"paths.output_dir={whole}"))
    assert [(r["rung"], r["step"]) for r in read_rungs(whole)] == [(0, 1), (1, 1), (2, 4), (3, 8)]

    main(compose_cfg(*TINY, *rungs, "trainer.stop_at_rung=0", f"paths.output_dir={cell}"))
    m = metrics(cell)
    assert m["status"] == "paused" and (m["rung"]["rung"], m["global_step"]) == (1, 1)
    (cell / "metrics.json").write_text(json.dumps({"status": "running"}))  # as a kill -9 leaves it
    main(compose_cfg(*TINY, *rungs, "trainer.stop_at_rung=1", "trainer.resume=auto", f"paths.output_dir={cell}"))
    m = metrics(cell)
    assert m["status"] == "paused" and m["rung"]["rung"] == 1 and m["train_runtime_s"] == 0.0, m
    assert not (cell / "checkpoints" / "checkpoint-2").exists()
    for stop in ("2", "null"):
        main(compose_cfg(*TINY, *rungs, f"trainer.stop_at_rung={stop}", "trainer.resume=auto",
                         f"paths.output_dir={cell}"))
    a, b = metrics(whole), metrics(cell)
    assert b["status"] == "ok" and all(a[k] == b[k] for k in ("pairwise_accuracy", "eval_loss", "global_step"))
    assert [r["pairs"]["loss"] for r in read_rungs(whole)] == [r["pairs"]["loss"] for r in read_rungs(cell)]


@pytest.mark.slow
def test_the_bench_replays_a_real_sweep_exactly_from_its_full_grid(swept, tmp_path):
    """bench/halving.py on the full grid of the same cells (each trained to the end, its rungs logged) takes the
    real sweep's decisions, picks its winner, and holds the winner's figures equal to the grid cell's."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("halving_bench", ROOT / "bench" / "halving.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    grid_dir = tmp_path / "grid"
    proc = subprocess.run([sys.executable, "-m", "rmexp.train", "-m", *TINY, *GRID, "logger=none",
                           "trainer.rungs=[0.5,1.0]", f"hydra.sweep.dir={grid_dir}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    grid = bench.export(grid_dir, tmp_path / "grid.json")
    result = bench.check(grid, swept)
    assert result["same_decisions"] and result["same_winner"] and result["same_rung_rewards"], result
    assert all(result["same_metrics"].values()), result
    replayed = bench.replay(grid, 2, "rank")
    assert bench.cost(grid, replayed)["step_ratio"] == round(16 / 24, 3)
