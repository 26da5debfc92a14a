"""Runs survive kills: checkpoints, `trainer.resume=auto`, and SIGTERM saving before it exits."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from rmexp.rundir import CHECKPOINT_FILES, last_complete_checkpoint

ARGS = ["model=tiny", "data.path=data/preference.jsonl", "logger=none", "trainer.max_steps=40",
        "trainer.save_steps=5", "trainer.eval_steps=1000", "trainer.logging_steps=5", "trainer.learning_rate=3e-3"]


def train(run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rmexp.train", *ARGS, *extra, f"hydra.run.dir={run_dir}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not (run_dir / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").is_file():
        assert proc.poll() is None, f"run ended before checkpoint-{step}: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.02)


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow
def test_killed_run_resumed_with_auto_matches_the_uninterrupted_run(tmp_path):
    whole = train(tmp_path / "whole")
    assert whole.wait(timeout=600) == 0, whole.stderr.read()[-3000:]

    killed = train(tmp_path / "killed")
    wait_for_checkpoint(killed, tmp_path / "killed", 10)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    assert not (tmp_path / "killed" / "adapter_config.json").exists()  # it really died mid-run

    resumed = train(tmp_path / "killed", "trainer.resume=auto")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    a, b = metrics(tmp_path / "whole"), metrics(tmp_path / "killed")
    assert a["resumed_from"] is None and int(Path(b["resumed_from"]).name.split("-")[1]) >= 10
    assert b["global_step"] == a["global_step"] == 40
    assert b["pairwise_accuracy"] == a["pairwise_accuracy"]
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], abs=1e-3)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_then_exits_nonzero(tmp_path):
    run = train(tmp_path)
    wait_for_checkpoint(run, tmp_path, 5)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=300)
    assert run.returncode != 0
    m = metrics(tmp_path)
    assert m["status"] == "failed" and "SIGTERM" in m["error"] and "trainer.resume=auto" in m["error"]
    last = last_complete_checkpoint(tmp_path / "checkpoints")
    assert last is not None and int(last.name.split("-")[1]) > 5  # saved at the step it stopped, not only at 5
    assert not (tmp_path / "adapter_config.json").exists()


def test_a_half_written_checkpoint_is_skipped(tmp_path):
    for step, files in ((4, CHECKPOINT_FILES), (6, CHECKPOINT_FILES[:2])):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        for f in files:
            (d / f).write_text("x")
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert last_complete_checkpoint(tmp_path / "none") is None
