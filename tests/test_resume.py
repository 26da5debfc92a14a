"""Runs survive kills: checkpoints, `trainer.resume=auto`, SIGTERM saving before it exits, and a
submitit job's preemption (checkpointed, requeued, resumed without being told)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import ROOT
from rmexp.callbacks import StopOnSignal
from rmexp.rundir import CHECKPOINT_FILES, Preempted, last_complete_checkpoint, resume_checkpoint, run_record
from rmexp.trainer import whole_run_loss

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
    assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-3)  # over all 40 steps, not those since the resume


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


def wait_for_metrics(proc: subprocess.Popen, run_dir: Path, status: str, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while True:
        try:
            if metrics(run_dir)["status"] == status:
                return metrics(run_dir)
        except (OSError, ValueError):
            pass
        assert proc.poll() is None, f"sweep ended before metrics.json said {status}: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, f"metrics.json did not say {status} in time"
        time.sleep(0.02)


@pytest.mark.slow
def test_a_preempted_submitit_job_is_checkpointed_requeued_and_matches_the_uninterrupted_run(tmp_path):
    sweep, job_dir = tmp_path / "sweep", tmp_path / "sweep" / "0"
    whole = train(tmp_path / "whole")  # the same config, never interrupted (alongside: the test's time is startups)
    proc = subprocess.Popen([sys.executable, "-m", "rmexp.train", "-m", *ARGS, "hydra/launcher=submitit_local",
                             f"hydra.sweep.dir={sweep}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    started: list[psutil.Process] = []  # the launcher's job controller and task, ended if the test fails
    try:
        wait_for_checkpoint(proc, job_dir, 5)  # training is under way, rmexp's handler installed
        started = psutil.Process(proc.pid).children(recursive=True)
        task = next(p for p in started if "submitit.core._submit" in p.cmdline())
        task.send_signal(signal.SIGUSR2)  # what submitit / SLURM send before a preemption or the time limit
        preempted = wait_for_metrics(proc, job_dir, "preempted")  # the first attempt's record
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        assert whole.wait(timeout=300) == 0, whole.stderr.read()[-3000:]
    finally:  # on a failure: end what is still running
        if proc.poll() is None:
            started += [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
        if whole.poll() is None:
            started.append(psutil.Process(whole.pid))
        for p in started:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()

    # the checkpoint was saved at the step the signal stopped, not only at save_steps
    step = preempted["step"]
    assert preempted["signal"] == "SIGUSR2" and 5 < step < 40
    assert preempted["checkpoint"] == str(job_dir / "checkpoints" / f"checkpoint-{step}")
    # requeued by submitit as the same job, which resumed from that checkpoint without trainer.resume=auto
    log = next((sweep / ".submitit").glob("*/*_0_log.out")).read_text()  # submitit logs to stdout
    assert "Calling checkpoint method" in log and "Requeued job" in log
    assert log.count(f"Starting with JobEnvironment(job_id={preempted['job_id']},") == 2  # the same job, twice
    done = metrics(job_dir)
    assert done["status"] == "ok" and done["job_id"] == preempted["job_id"]
    assert done["resumed_from"] == preempted["checkpoint"]

    reference = metrics(tmp_path / "whole")
    assert done["global_step"] == reference["global_step"] == 40
    assert done["pairwise_accuracy"] == reference["pairwise_accuracy"]
    for key in ("eval_loss", "train_loss"):
        assert done[key] == pytest.approx(reference[key], abs=1e-3), key


def test_a_half_written_checkpoint_is_skipped(tmp_path):
    for step, files in ((4, CHECKPOINT_FILES), (6, CHECKPOINT_FILES[:2])):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        for f in files:
            (d / f).write_text("x")
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert last_complete_checkpoint(tmp_path / "none") is None


def complete_checkpoint(run_dir: Path, step: int) -> Path:
    d = run_dir / "checkpoints" / f"checkpoint-{step}"
    d.mkdir(parents=True)
    for f in CHECKPOINT_FILES:
        (d / f).write_text("x")
    return d


def as_submitit_job(monkeypatch, job_id: str) -> None:
    """The environment submitit's local executor gives a job's process."""
    for name in ("SLURM_RESTART_COUNT", "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", job_id)
    monkeypatch.setenv("SUBMITIT_LOCAL_GLOBALID", "0")


def test_only_a_requeued_job_resumes_its_run_dir_without_being_told(tmp_path, monkeypatch):
    ckpt = str(complete_checkpoint(tmp_path, 7))
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "preempted", "step": 7, "job_id": "123"}))
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert resume_checkpoint(None, tmp_path) is None  # not a submitit job: trainer.resume decides, as before
    as_submitit_job(monkeypatch, "123")
    assert resume_checkpoint(None, tmp_path) == ckpt  # the same job again: requeued
    as_submitit_job(monkeypatch, "456")
    assert resume_checkpoint(None, tmp_path) is None  # another job writing into this dir starts fresh
    assert resume_checkpoint("auto", tmp_path) == ckpt
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_ID", "789")
    assert resume_checkpoint(None, tmp_path) is None
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # requeued by SLURM itself (a node failure, a preemption)
    assert resume_checkpoint(None, tmp_path) == ckpt


def test_submitits_signal_waits_for_the_checkpoint_then_goes_to_submitits_handler(tmp_path, monkeypatch):
    from transformers import TrainerControl

    as_submitit_job(monkeypatch, "123")
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))  # stands for submitit's
    try:
        with StopOnSignal() as stop:
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.01)
            control = stop.on_step_end(None, None, TrainerControl())
        assert calls == [] and control.should_save and control.should_training_stop  # no requeue mid-step
        assert signal.getsignal(signal.SIGUSR2) is not stop._handle  # submitit's handler is back
        complete_checkpoint(tmp_path, 6)
        with pytest.raises(Preempted) as stopped, run_record(tmp_path):
            stop.raise_if_stopped(6, tmp_path)
        assert metrics(tmp_path) | {"runtime_s": 0} == {
            "status": "preempted", "step": 6, "signal": "SIGUSR2", "job_id": "123", "runtime_s": 0,
            "checkpoint": str(tmp_path / "checkpoints" / "checkpoint-6")}
        stopped.value.requeue()
        assert calls == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_sigterm_outside_submitit_stops_with_the_resume_command(tmp_path, monkeypatch):
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    with StopOnSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
    with pytest.raises(InterruptedError, match="SIGTERM at step 3.*trainer.resume=auto"):
        stop.raise_if_stopped(3, tmp_path)


def test_a_resumed_run_reports_the_whole_runs_train_loss():
    history = [{"loss": 1.0, "step": 5}, {"loss": 0.5, "step": 10}, {"eval_loss": 9.0, "step": 10},
               {"loss": 0.1, "step": 15}]  # the last one logged after the resume
    assert whole_run_loss(history, 10, 0.2, 20) == pytest.approx((5 * 1.0 + 5 * 0.5 + 10 * 0.2) / 20)
    # steps 11-12 of a checkpoint saved between logs are in no log: the mean is over the others
    assert whole_run_loss(history, 12, 0.2, 20) == pytest.approx((5 * 1.0 + 5 * 0.5 + 8 * 0.2) / 18)
