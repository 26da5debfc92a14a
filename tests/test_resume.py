"""Runs survive kills: checkpoints, `trainer.resume=auto`, SIGTERM saving before it exits, a
submitit job's preemption (checkpointed, requeued, resumed without being told), a damaged checkpoint
(passed over for the one before it), and a rerun into a used run dir (refused, or moved aside)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from transformers import TrainerCallback

from conftest import ROOT, compose_cfg
from rmexp.preemption import Preempted, StopOnSignal
from rmexp.resume import ResumeConflict, check_same_run, resume_argv, resume_checkpoint
from rmexp.rundir import (
    CHECKPOINT_FILES,
    MANIFEST,
    CheckpointError,
    RunDirError,
    claim_run_dir,
    diagnose_checkpoint,
    last_complete_checkpoint,
    move_previous_run,
    run_record,
)
from rmexp.train import main
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
    """A checkpoint whose files read as the real ones do (diagnose_checkpoint passes it), without a model."""
    from safetensors.torch import save_file

    d = run_dir / "checkpoints" / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    save_file({"w": torch.zeros(2)}, d / "adapter_model.safetensors")
    for f in ("optimizer.pt", "scheduler.pt"):
        torch.save({"step": step}, d / f)
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
    with pytest.raises(RunDirError):  # not a submitit job: trainer.resume decides, and unset it refuses this used dir
        resume_checkpoint(None, tmp_path)
    as_submitit_job(monkeypatch, "123")
    assert resume_checkpoint(None, tmp_path).checkpoint == ckpt  # the same job again: requeued, its own dir
    # whatever its command line says: nothing is moved
    assert resume_checkpoint("never", tmp_path).checkpoint == ckpt
    assert (Path(ckpt) / "optimizer.pt").is_file()
    as_submitit_job(monkeypatch, "456")
    with pytest.raises(RunDirError):  # another job writing into this dir: not without being told how
        resume_checkpoint(None, tmp_path)
    assert resume_checkpoint("auto", tmp_path).checkpoint == ckpt
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_ID", "789")
    with pytest.raises(RunDirError):
        resume_checkpoint(None, tmp_path)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # requeued by SLURM itself (a node failure, a preemption)
    assert resume_checkpoint(None, tmp_path).checkpoint == ckpt


def test_submitits_signal_waits_for_the_checkpoint_then_goes_to_submitits_handler(tmp_path, monkeypatch):
    from transformers import TrainerControl

    as_submitit_job(monkeypatch, "123")
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))  # stands for submitit's
    try:
        with StopOnSignal(tmp_path) as stop:
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.01)
            control = stop.on_step_end(None, None, TrainerControl())
        assert calls == [] and control.should_save and control.should_training_stop  # no requeue mid-step
        assert signal.getsignal(signal.SIGUSR2) is not stop._handle  # submitit's handler is back
        complete_checkpoint(tmp_path, 6)
        with pytest.raises(Preempted) as stopped, run_record(tmp_path):
            stop.raise_if_stopped(6)
        assert metrics(tmp_path) | {"runtime_s": 0} == {
            "status": "preempted", "step": 6, "signal": "SIGUSR2", "job_id": "123", "runtime_s": 0,
            "checkpoint": str(tmp_path / "checkpoints" / "checkpoint-6")}
        stopped.value.requeue()
        assert calls == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_sigterm_outside_submitit_stops_with_the_resume_command(tmp_path, monkeypatch):
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    with StopOnSignal(tmp_path) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
    with pytest.raises(InterruptedError, match="SIGTERM at step 3.*continue with rmexp-train hydra.run.dir=.* "
                                               "trainer.resume=auto"):
        stop.raise_if_stopped(3)


def test_a_resumed_run_reports_the_whole_runs_train_loss():
    history = [{"loss": 1.0, "step": 5}, {"loss": 0.5, "step": 10}, {"eval_loss": 9.0, "step": 10},
               {"loss": 0.1, "step": 15}]  # the last one logged after the resume
    assert whole_run_loss(history, 10, 0.2, 20) == pytest.approx((5 * 1.0 + 5 * 0.5 + 10 * 0.2) / 20)
    # steps 11-12 of a checkpoint saved between logs are in no log: the mean is over the others
    assert whole_run_loss(history, 12, 0.2, 20) == pytest.approx((5 * 1.0 + 5 * 0.5 + 8 * 0.2) / 18)


# ---------------------------------------------------------------- run dirs and damaged checkpoints, in process

RUN = ["model=tiny", f"data.path={ROOT / 'data/preference.jsonl'}", "logger=none", "trainer.max_steps=12",
       "trainer.save_steps=4", "trainer.eval_steps=1000", "trainer.logging_steps=4", "trainer.learning_rate=3e-3",
       "trainer.save_total_limit=null"]


def run(run_dir: Path, *extra: str, callbacks=None) -> dict:
    main(compose_cfg(*RUN, f"paths.output_dir={run_dir}", *extra), callbacks=callbacks)
    return metrics(run_dir)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A whole 12-step run, never interrupted: checkpoints 4, 8 and 12, the reference metrics."""
    run_dir = tmp_path_factory.mktemp("finished")
    assert run(run_dir)["resume_skipped"] == []
    return run_dir


def files_of(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file()}


@pytest.fixture
def no_model(monkeypatch):
    """Loading a tokenizer or a model fails the test: what runs before them must have decided."""
    def load(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded")

    monkeypatch.setattr("rmexp.recipe.load_tokenizer", load)
    monkeypatch.setattr("rmexp.recipe.load_reward_model", load)


def test_each_checkpoint_has_a_manifest_of_its_files_as_written(finished):
    for step in (4, 8, 12):
        ckpt = finished / "checkpoints" / f"checkpoint-{step}"
        manifest = json.loads((ckpt / MANIFEST).read_text())
        assert manifest["step"] == step
        assert manifest["files"] == {p.name: p.stat().st_size for p in ckpt.iterdir() if p.name != MANIFEST}
        assert set(CHECKPOINT_FILES) <= set(manifest["files"])
        assert diagnose_checkpoint(ckpt) is None


@pytest.mark.parametrize(("damaged", "error"), [("optimizer.pt", "BadZipFile"),
                                                ("adapter_model.safetensors", "SafetensorError"),
                                                ("trainer_state.json", "JSONDecodeError")])
def test_without_a_manifest_a_truncated_file_still_does_not_read(finished, tmp_path, damaged, error):
    """A checkpoint of an older rmexp (or killed before its manifest): each file's own structure names the damage."""
    ckpt = tmp_path / "checkpoint-8"
    shutil.copytree(finished / "checkpoints" / "checkpoint-8", ckpt)
    (ckpt / MANIFEST).unlink()
    assert diagnose_checkpoint(ckpt) is None
    os.truncate(ckpt / damaged, (ckpt / damaged).stat().st_size // 2)
    assert diagnose_checkpoint(ckpt).startswith(f"{damaged} does not read ({error}: ")
    os.truncate(ckpt / damaged, 0)
    assert diagnose_checkpoint(ckpt).startswith(f"{damaged} does not read ({error}: ")
    (ckpt / damaged).unlink()
    assert diagnose_checkpoint(ckpt) == f"{damaged} is missing"


def test_a_rerun_into_a_used_run_dir_is_refused_before_any_model_loads(finished, tmp_path, no_model):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    before = files_of(run_dir)
    with pytest.raises(RunDirError) as refused:
        run(run_dir)
    message = str(refused.value)
    assert message == (
        f"{run_dir} holds a previous run (checkpoints/checkpoint-4, checkpoints/checkpoint-8, checkpoints/checkpoint-12, "
        f"adapter_config.json, metrics.json (status ok)); not training over it. Continue it with trainer.resume=auto, "
        f"or start over with trainer.resume=never (its files move to {run_dir}/previous-<time>/, nothing is deleted)")
    assert files_of(run_dir) == before  # checkpoints, adapter and metrics.json untouched, none written
    with pytest.raises(FileNotFoundError, match="trainer.resume: no checkpoint dir Auto "):  # a typo: refused too
        run(run_dir, "trainer.resume=Auto")
    assert files_of(run_dir) == before

    shutil.rmtree(run_dir / "checkpoints")  # finished, nothing to continue: auto is refused too, not a fresh start
    with pytest.raises(RunDirError, match="trainer.resume=auto: .* no checkpoint to continue from; start over with "
                                          "trainer.resume=never"):
        run(run_dir, "trainer.resume=auto")


def test_a_fresh_dir_runs_and_never_keeps_the_old_run_in_previous(finished, tmp_path):
    (tmp_path / ".hydra").mkdir()  # what Hydra writes into every run dir, its new one included
    log_file = tmp_path / "train.log"
    assert claim_run_dir(tmp_path, None) is None  # a fresh dir: nothing to refuse
    assert claim_run_dir(tmp_path / "not yet", "never") is None  # nor to move
    handler = logging.FileHandler(log_file)  # as Hydra's job logging opens it: appending
    logging.getLogger("rmexp.test").addHandler(handler)
    try:
        log_file.write_text("the previous run's log\n")
        (tmp_path / "metrics.json").write_text('{"status": "ok"}')
        (tmp_path / "checkpoints" / "checkpoint-3").mkdir(parents=True)
        with pytest.raises(RunDirError):
            claim_run_dir(tmp_path, None)
        moved = claim_run_dir(tmp_path, "never")
        logging.getLogger("rmexp.test").error("the new run's line")
        handler.flush()
        assert move_previous_run(tmp_path) is None  # nothing left to move: the open log is this run's
    finally:
        logging.getLogger("rmexp.test").removeHandler(handler)
        handler.close()
    assert moved.parent == tmp_path and moved.name.startswith("previous-")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hydra", moved.name, "train.log"]
    assert sorted(p.name for p in moved.iterdir()) == ["checkpoints", "metrics.json", "train.log"]
    assert (moved / "checkpoints" / "checkpoint-3").is_dir()
    assert (moved / "train.log").read_text() == "the previous run's log\n"
    assert log_file.read_text() == "the new run's line\n"


def test_never_moves_a_finished_run_to_previous_and_trains_anew(finished, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    old = files_of(run_dir)
    new = run(run_dir, "trainer.resume=never")
    (previous,) = run_dir.glob("previous-*")
    assert {k: v[0] for k, v in files_of(previous).items()} == {k: v[0] for k, v in old.items()}  # all of it, kept
    assert json.loads((previous / "metrics.json").read_text()) == metrics(finished)
    assert new["status"] == "ok" and new["resumed_from"] is None and new["global_step"] == 12
    assert new["pairwise_accuracy"] == metrics(finished)["pairwise_accuracy"]  # the same seed, the same run
    assert (run_dir / "checkpoints" / "checkpoint-12" / MANIFEST).is_file()


class ResumedFromKept(TrainerCallback):
    """At each checkpoint save (before rmexp's manifest and rotation): the checkpoint resumed from is still there."""

    def __init__(self, resumed_from: Path):
        self.resumed_from, self.saves = resumed_from, []

    def on_save(self, args, state, control, **kwargs):
        saved = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.saves.append((state.global_step, self.resumed_from.is_dir(), (saved / MANIFEST).exists()))


@pytest.mark.parametrize("damaged", ["optimizer.pt", "adapter_model.safetensors", "trainer_state.json"])
def test_a_truncated_latest_checkpoint_is_passed_over_for_the_one_before(finished, tmp_path, damaged, caplog):
    run_dir = tmp_path / "run"
    for step in (4, 8):  # a run killed after its checkpoint-8 was written short (a full disk, a lost node)
        shutil.copytree(finished / "checkpoints" / f"checkpoint-{step}", run_dir / "checkpoints" / f"checkpoint-{step}")
    bad = run_dir / "checkpoints" / "checkpoint-8"
    size = (bad / damaged).stat().st_size
    os.truncate(bad / damaged, size // 2)
    probe = ResumedFromKept(run_dir / "checkpoints" / "checkpoint-4")

    with caplog.at_level(logging.WARNING, logger="rmexp.rundir"):
        # save_total_limit=1: transformers' own rotation would delete checkpoint-4 inside the save of -8
        resumed = run(run_dir, "trainer.resume=auto", "trainer.save_total_limit=1", callbacks=[probe])

    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "rmexp.rundir"]
    assert warning.startswith(f"damaged checkpoint {bad}: {damaged} is {size // 2} bytes, {size} were written")
    assert resumed["resumed_from"] == str(run_dir / "checkpoints" / "checkpoint-4")
    assert resumed["resume_skipped"] == [{"checkpoint": str(bad), "problem": warning.split(": ", 1)[1].split(
        "; resuming from")[0], "moved_to": str(run_dir / "checkpoints" / "skipped-checkpoint-8")}]
    assert (run_dir / "checkpoints" / "skipped-checkpoint-8" / damaged).stat().st_size == size // 2  # kept as found
    # the resumed-from checkpoint outlived the save of -8 and went only once -8 had its manifest
    assert probe.saves == [(8, True, False), (12, False, False)]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir()) == [
        "checkpoint-12", "skipped-checkpoint-8"]

    # Deterministic on one machine and thread count: the optimizer, scheduler, RNG and data order are restored.
    # train_loss of a resumed run is rebuilt from the logged losses, which transformers rounds to 4 decimals.
    reference = metrics(finished)
    for key in ("global_step", "pairwise_accuracy", "eval_loss", "reward_mean", "reward_std", "mean_margin"):
        assert resumed[key] == reference[key], key
    assert resumed["train_loss"] == pytest.approx(reference["train_loss"], abs=1e-4)


def test_no_intact_checkpoint_is_a_named_error_before_any_model_loads(finished, tmp_path, no_model):
    run_dir = tmp_path / "run"
    for step, damaged in ((4, "optimizer.pt"), (8, "trainer_state.json")):
        ckpt = run_dir / "checkpoints" / f"checkpoint-{step}"
        shutil.copytree(finished / "checkpoints" / f"checkpoint-{step}", ckpt)
        os.truncate(ckpt / damaged, 10)
    (run_dir / "checkpoints" / "checkpoint-4" / MANIFEST).unlink()  # an older rmexp's: the structure still reads
    before = files_of(run_dir)
    with pytest.raises(CheckpointError) as failed:
        run(run_dir, "trainer.resume=auto")
    message = str(failed.value)
    assert message.startswith(f"no intact checkpoint to resume from in {run_dir / 'checkpoints'}: checkpoint-8: "
                              "trainer_state.json is 10 bytes, ")
    assert "; checkpoint-4: optimizer.pt does not read (BadZipFile: File is not a zip file)" in message
    assert message.endswith(f"Start over with trainer.resume=never (the run moves to {run_dir}/previous-<time>/)")
    assert files_of(run_dir) == before  # nothing moved, and no metrics.json written over the run's


@pytest.mark.slow
def test_the_cli_refuses_a_used_run_dir_and_never_keeps_hydras_log_of_the_old_run(tmp_path):
    complete_checkpoint(tmp_path, 7)
    (tmp_path / "metrics.json").write_text('{"status": "failed", "error": "killed"}')
    (tmp_path / "train.log").write_text("the previous run's log\n")  # Hydra's job log, appended to by a rerun
    before = files_of(tmp_path)
    refused = subprocess.run([sys.executable, "-m", "rmexp.train", *ARGS, f"hydra.run.dir={tmp_path}"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0
    assert (f"{tmp_path} holds a previous run (checkpoints/checkpoint-7); not training over it. Continue it with "
            "trainer.resume=auto, or start over with trainer.resume=never") in refused.stderr
    assert {k: v for k, v in files_of(tmp_path).items() if not k.startswith((".hydra", "train.log"))} == {
        k: v for k, v in before.items() if k != "train.log"}

    fresh = subprocess.run([sys.executable, "-m", "rmexp.train", *ARGS, "trainer.max_steps=2", "trainer.resume=never",
                            f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    (previous,) = tmp_path.glob("previous-*")
    assert (previous / "train.log").read_text().startswith("the previous run's log\n")
    assert json.loads((previous / "metrics.json").read_text())["error"] == "killed"
    assert (previous / "checkpoints" / "checkpoint-7" / "optimizer.pt").is_file()
    assert "the previous run's log" not in (tmp_path / "train.log").read_text()
    assert "moved to" in (tmp_path / "train.log").read_text()  # the new run's log says where the old run went
    assert metrics(tmp_path)["status"] == "ok" and metrics(tmp_path)["global_step"] == 2


# ---------------------------------------------------------------- a resume continues the same run, or refuses


def run_files(path: Path) -> dict[str, tuple[int, int]]:
    """files_of but W&B's service logs: its service process flushes them into the run's wandb dir on its own clock,
    after the attempt that started it has exited (a refused resume starts no W&B: only its own files count)."""
    return {k: v for k, v in files_of(path).items() if not (k.startswith("wandb/") and "/logs/" in k)}


def printed_command(stderr: str) -> list[str]:
    """The command a stopped run's last line says continues it, as the user would paste it."""
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: stopped by SIGTERM") and "continue with rmexp-train " in last, stderr[-2000:]
    words = shlex.split(last.split("continue with ", 1)[1])
    script = Path(sys.executable).with_name("rmexp-train")  # the console script, as installed
    return [str(script) if script.is_file() else sys.executable, *([] if script.is_file() else ["-m", "rmexp.train"]),
            *words[1:]]


@pytest.mark.slow
def test_the_printed_command_resumes_the_same_run_and_refuses_another_config(tmp_path):
    own = ["lora.r=16", "lora.lora_alpha=32", "trainer.seed=7", "logger.mode=offline"]  # none of them defaults
    args = [a for a in ARGS if a != "logger=none"] + own
    whole = subprocess.Popen([sys.executable, "-m", "rmexp.train", *args, f"hydra.run.dir={tmp_path / 'whole'}"],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "run"
    stopped = subprocess.Popen([sys.executable, "-m", "rmexp.train", *args, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(stopped, run_dir, 10)
    stopped.send_signal(signal.SIGTERM)
    _, err = stopped.communicate(timeout=300)
    assert stopped.returncode == 1 and "Traceback" not in err, err[-3000:]
    command = printed_command(err)
    first = metrics(run_dir)
    assert first["wandb_run_id"] and first["status"] == "failed"

    # an override that changes what the checkpoints were made with: refused, naming each, the run dir untouched
    before = run_files(run_dir)
    refused = subprocess.run([*command, "lora.r=8", "model=tiny", "trainer.learning_rate=1e-3"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    last = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert last.startswith("error: trainer.resume: ") and "lora.r: 16 in the run, 8 now" in last, last
    assert "trainer.learning_rate: 0.003 in the run, 0.001 now" in last and "model" not in last.split(": ", 2)[2].split(
        ". Drop")[0].replace("model.cache_dir", ""), last  # model=tiny is the run's own: no difference
    assert run_files(run_dir) == before  # sizes and mtimes of every file, .hydra/ and train.log included

    # as printed: the run's own config, from its first command, and the uninterrupted run's result
    saved_config, saved_overrides = (run_dir / "rmexp_config.yaml").read_bytes(), (
        run_dir / ".hydra" / "overrides.yaml").read_bytes()
    resumed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)  # where it was started
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert whole.wait(timeout=600) == 0, whole.stderr.read()[-3000:]
    done, reference = metrics(run_dir), metrics(tmp_path / "whole")
    assert int(Path(done["resumed_from"]).name.split("-")[1]) >= 10
    assert done["global_step"] == reference["global_step"] == 40
    assert done["pairwise_accuracy"] == reference["pairwise_accuracy"]
    for key in ("eval_loss", "train_loss"):
        assert done[key] == pytest.approx(reference[key], abs=1e-3), key
    # the run's record stays its first command's; this one's is beside it
    assert (run_dir / "rmexp_config.yaml").read_bytes() == saved_config
    assert (run_dir / ".hydra" / "overrides.yaml").read_bytes() == saved_overrides
    (record,) = (run_dir / ".hydra").glob("resume-*")
    assert {"trainer.resume=auto", *own} <= set(yaml.safe_load((record / "overrides.yaml").read_text()))
    # one W&B run: the resumed attempt logged into the first attempt's, under its name
    assert done["wandb_run_id"] == first["wandb_run_id"] and done["wandb_run_name"] == first["wandb_run_name"]
    offline = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and {p.rsplit("-", 1)[1] for p in offline} == {first["wandb_run_id"]}


def test_a_resume_with_another_config_is_refused_before_any_model_loads(finished, tmp_path, no_model):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir, ignore=shutil.ignore_patterns("adapter_*"))
    (run_dir / "metrics.json").write_text('{"status": "failed", "error": "killed"}')
    before = files_of(run_dir)
    with pytest.raises(ResumeConflict) as refused:
        run(run_dir, "trainer.resume=auto", "lora.r=4", "trainer.max_steps=24", "data.max_pairs=100")
    message = str(refused.value)
    for named in ("lora.r: 8 in the run, 4 now", "trainer.max_steps: 12 in the run, 24 now",
                  "data.max_pairs: None in the run, 100 now"):
        assert named in message, message
    assert files_of(run_dir) == before


def test_what_a_resume_may_change_is_allowed_and_named(finished, tmp_path):
    from rmexp.config import to_typed

    may = to_typed(compose_cfg(*RUN, f"paths.output_dir={finished}", "trainer.resume=auto", "trainer.logging_steps=1",
                               "trainer.eval_steps=2", "trainer.time_budget_s=60", "logger.mode=offline"))
    assert check_same_run(may, finished) == {"trainer.logging_steps": [4.0, 1.0], "trainer.eval_steps": [1000.0, 2.0],
                                             "trainer.time_budget_s": [None, 60.0], "logger.mode": [None, "offline"]}
    for changed in ("trainer.seed=1", "trainer.max_length=256", "trainer.per_device_train_batch_size=2",
                    "trainer.gradient_accumulation_steps=2", "quantization=none", "trainer.bf16=true",
                    "data.eval_fraction=0.3", "trainer.batching=padded", "lora.lora_dropout=0.1"):
        cfg = to_typed(compose_cfg(*RUN, f"paths.output_dir={finished}", changed))
        with pytest.raises(ResumeConflict, match=changed.split("=")[0].split("=")[0].replace(".", r"\.")
                           if "=" in changed and not changed.startswith("quantization") else "quantization"):
            check_same_run(cfg, finished)


def test_the_resume_command_line_takes_the_runs_own_overrides(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["model=tiny", "lora.r=16", "+trainer.extra.x=1"]))
    line = [f"hydra.run.dir={tmp_path}", "trainer.resume=auto"]
    assert resume_argv(line) == line  # no checkpoint yet: nothing to continue
    (tmp_path / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    own = ["hydra.output_subdir=null", "hydra.mode=RUN"]  # Hydra's record beside the first; one run, not a sweep's
    assert resume_argv(line) == [*line, "model=tiny", "lora.r=16", "+trainer.extra.x=1", *own]
    assert resume_argv([*line, "lora.r=8"]) == [*line, "model=tiny", "+trainer.extra.x=1", *own,
                                                "lora.r=8"]  # the command's own value: check_same_run decides on it
    assert resume_argv([line[0], "+trainer.resume=auto", "~lora.r"]) == [
        line[0], "+trainer.resume=auto", "model=tiny", "+trainer.extra.x=1", *own, "~lora.r"]
    ckpt = [line[0], f"trainer.resume={tmp_path}/checkpoints/checkpoint-5"]  # a checkpoint of the run, in its dir
    assert resume_argv(ckpt) == [*ckpt, "model=tiny", "lora.r=16", "+trainer.extra.x=1", *own]
    for untouched in ([*line[:1], "trainer.resume=never"], ["-m", *line], [line[1]]):
        assert resume_argv(untouched) == untouched


def test_a_path_to_the_same_file_and_a_redacted_secret_are_no_change(tmp_path):
    from rmexp.resume import same_value

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "pairs.jsonl").write_text("{}\n")
    (tmp_path / "linked").symlink_to(tmp_path / "data")  # the shipped sample, reached through src/rmexp/sample
    assert same_value("data.path", str(tmp_path / "data/pairs.jsonl"), str(tmp_path / "linked/pairs.jsonl"))
    assert not same_value("data.path", str(tmp_path / "data/pairs.jsonl"), str(tmp_path / "missing.jsonl"))
    assert same_value("trainer.extra.hub_token", "<redacted>", "hf_secret")  # saved redacted: never printed
    assert not same_value("lora.r", 8, 16)
