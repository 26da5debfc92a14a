"""Several processes, W&B that cannot start, and secrets that must not reach disk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from wandb_records import OfflineRun

TINY = ["model=tiny", "data.path=data/preference.jsonl", "trainer.max_steps=6", "trainer.eval_steps=3"]


def run_cli(args: list[str], env: dict | None = None, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable, "-m"]) + ["rmexp.train", *TINY, *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900,
                          env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process_with_the_same_global_batch(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    two = run_cli(["logger.mode=offline", f"hydra.run.dir={tmp_path / 'two'}"],
                  launcher=[torchrun, "--standalone", "--nproc_per_node", "2", "-m"])
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_cli(["logger=none", "trainer.per_device_train_batch_size=8", f"hydra.run.dir={tmp_path / 'one'}"])
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("two", "one"))
    assert a["n_eval_pairs"] == b["n_eval_pairs"]  # every eval pair once, gathered across ranks
    assert abs(a["pairwise_accuracy"] - b["pairwise_accuracy"]) <= 0.1
    assert a["eval_loss"] == pytest.approx(b["eval_loss"], abs=0.02)
    assert len(list((tmp_path / "two" / "wandb").glob("offline-run-*"))) == 1  # rank 0 logs, once
    assert OfflineRun(tmp_path / "two").summary["eval/pairwise_accuracy"] == a["pairwise_accuracy"]
    assert two.stdout.count("held-out pairwise accuracy") == 1


@pytest.mark.slow
def test_wandb_that_cannot_start_online_falls_back_to_offline(tmp_path):
    proc = run_cli(["logger.mode=online", "logger.init_timeout=5", f"hydra.run.dir={tmp_path}"],
                   env={"WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "falling back to offline" in proc.stdout + proc.stderr
    run = OfflineRun(tmp_path)
    assert run.summary["eval/pairwise_accuracy"] == json.loads((tmp_path / "metrics.json").read_text())["pairwise_accuracy"]


@pytest.mark.slow
def test_secrets_in_the_environment_never_reach_the_run_dir(tmp_path):
    secrets = {"WANDB_API_KEY": "wandbsecret" + "0" * 29, "HF_TOKEN": "hf_secretvalue123", "MY_SERVICE_KEY": "svc-key-789"}
    proc = run_cli(["logger.mode=offline", f"hydra.run.dir={tmp_path}"], env=secrets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for path in tmp_path.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for name, value in secrets.items():
                assert value.encode() not in data, f"{name} leaked into {path}"
