"""Real multiruns on the tiny model: one dir and one W&B run per job, failures isolated, a report."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from rmexp.report import report
from wandb_records import OfflineRun

TINY = ["model=tiny", "data.path=data/preference.jsonl", "trainer.max_steps=2", "trainer.eval_steps=2",
        "logger.mode=offline"]


def multirun(sweep_dir: Path, *overrides: str, multirun_flag: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rmexp.train", *(["-m"] if multirun_flag else []), *TINY, *overrides,
           f"hydra.sweep.dir={sweep_dir}"]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)


def job_metrics(sweep_dir: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/metrics.json"))}


@pytest.mark.slow
def test_grid_multirun_gives_one_dir_and_one_wandb_run_per_job_and_a_report(tmp_path):
    sweep = tmp_path / "grid"
    proc = multirun(sweep, "lora.r=4,8", "trainer.learning_rate=1e-4,1e-3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = job_metrics(sweep)
    assert sorted(metrics) == ["0", "1", "2", "3"] and all(m["status"] == "ok" for m in metrics.values())
    runs = [OfflineRun(sweep / j) for j in sorted(metrics)]
    assert len({r.run_id for r in runs}) == 4
    assert len({r.group for r in runs}) == 1 and runs[0].group.startswith("sweep-")
    assert {r.name for r in runs} == {f"lora.r={r},trainer.learning_rate={lr}" for r in (4, 8) for lr in ("0.0001", "0.001")}
    for r, j in zip(runs, sorted(metrics), strict=True):  # each job logged into its own run, with its own values
        assert r.summary["eval/pairwise_accuracy"] == metrics[j]["pairwise_accuracy"]
        assert f"lora.r={r.config['lora']['r']}" in r.name

    result = report(sweep)
    assert result["jobs"] == 4 and result["ok"] == 4 and result["best"] in metrics
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert len(rows) == 4 and {"lora.r", "trainer.learning_rate", "pairwise_accuracy", "eval_loss", "runtime_s",
                               "status"} <= set(rows[0])
    assert (sweep / "heatmap.png").stat().st_size > 1000 and "| lora.r |" in (sweep / "summary.md").read_text()
    report_run = OfflineRun(sweep)
    logged = {k for h in report_run.history for k in h}
    assert report_run.group == runs[0].group
    assert any(k.startswith("sweep/heatmap") for k in logged) and any(k.startswith("sweep/summary") for k in logged)


@pytest.mark.slow
def test_a_failing_job_is_recorded_the_others_finish_and_the_sweep_exits_nonzero(tmp_path):
    sweep = tmp_path / "fail"
    proc = multirun(sweep, "lora.r=-1,4")
    assert proc.returncode != 0
    assert "1 of 2 sweep jobs failed" in proc.stderr
    metrics = job_metrics(sweep)
    assert metrics["0"]["status"] == "failed" and "lora.r" in metrics["0"]["error"]
    assert metrics["1"]["status"] == "ok"
    result = report(sweep, use_wandb=False)
    assert result["failed"] == 1 and result["best"] == "1"
    assert "failed" in (sweep / "summary.md").read_text()


@pytest.mark.slow
def test_report_handles_a_sweep_still_running(tmp_path):
    sweep = tmp_path / "partial"
    proc = multirun(sweep, "lora.r=4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    pending = sweep / "1" / ".hydra"  # a job that has started but not written metrics.json
    pending.mkdir(parents=True)
    (pending / "overrides.yaml").write_text(yaml.safe_dump(["lora.r=8"]))
    result = report(sweep, use_wandb=False)
    assert (result["ok"], result["running"]) == (1, 1) and result["best"] == "0"


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_two_job_sweep(tmp_path):
    sweep = tmp_path / "submitit"
    proc = multirun(sweep, "lora.r=4,8", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = job_metrics(sweep)
    assert len(metrics) == 2 and all(m["status"] == "ok" for m in metrics.values())


@pytest.mark.slow
def test_optuna_preset_runs_three_trials(tmp_path):
    sweep = tmp_path / "optuna"
    proc = multirun(sweep, "sweep=optuna", "hydra.sweeper.n_trials=3", multirun_flag=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = job_metrics(sweep)
    assert len(metrics) == 3 and all(m["status"] == "ok" for m in metrics.values())
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(m["pairwise_accuracy"] for m in metrics.values())


@pytest.mark.slow
def test_grid_preset_runs_without_dash_m_and_any_axis_is_overridable(tmp_path):
    sweep = tmp_path / "preset"
    proc = multirun(sweep, "sweep=lora_lr", "lora.r=4", "trainer.learning_rate=1e-4,3e-4", multirun_flag=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(OfflineRun(sweep / j).name for j in job_metrics(sweep))
    assert runs == ["lora.r=4,trainer.learning_rate=0.0001", "lora.r=4,trainer.learning_rate=0.0003"]
    full = yaml.safe_load((ROOT / "conf/sweep/lora_lr.yaml").read_text())["hydra"]["sweeper"]["params"]
    assert len(str(full["lora.r"]).split(",")) * len(str(full["trainer.learning_rate"]).split(",")) == 20


def fake_job(root: Path, name: str, overrides: list[str], accuracy: float, dropout: float = 0.0) -> None:
    """A finished job dir as a sweep leaves it: overrides, composed config, metrics.json."""
    hydra_dir = root / name / ".hydra"
    hydra_dir.mkdir(parents=True)
    (hydra_dir / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    lr = next((o.split("=")[1] for o in overrides if o.startswith("trainer.learning_rate=")), "0.0002")
    (hydra_dir / "config.yaml").write_text(yaml.safe_dump(
        {"lora": {"r": 8, "lora_dropout": dropout}, "trainer": {"learning_rate": float(lr)}}))
    (root / name / "metrics.json").write_text(json.dumps({"status": "ok", "pairwise_accuracy": accuracy}))


def test_report_shows_defaults_a_job_did_not_override_and_no_heatmap_that_mixes_them(tmp_path):
    fake_job(tmp_path, "a", ["trainer.learning_rate=1e-4"], 0.55)
    fake_job(tmp_path, "b", ["trainer.learning_rate=2e-4", "lora.lora_dropout=0.05"], 0.60, dropout=0.05)
    report(tmp_path, use_wandb=False)
    table = (tmp_path / "summary.md").read_text()
    assert "| a | 1e-4 | 0.0 |" in table  # a's dropout is its default, not blank
    assert (tmp_path / "heatmap.png").is_file()  # each (r, lr) cell holds one job
    fake_job(tmp_path, "c", ["trainer.learning_rate=1e-4", "lora.lora_dropout=0.05"], 0.50, dropout=0.05)
    (tmp_path / "heatmap.png").unlink()
    report(tmp_path, use_wandb=False)
    assert not (tmp_path / "heatmap.png").exists()  # the 1e-4 cell would average dropout 0 and 0.05
