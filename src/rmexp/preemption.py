"""A run stopped by its scheduler and continued: signal -> checkpoint -> status -> requeue -> resume.

SIGTERM (SLURM's notice before a kill), or in a submitit job submitit's preemption / time-limit signal,
makes training save a checkpoint at the end of its step and stop (`StopOnSignal`). Under submitit that
is `Preempted`: `run_record` writes metrics.json with status `preempted`, then `requeue_if_preempted`
hands the signal to submitit's own handler, which requeues the job and exits. The requeued job
(`requeued_attempt`) resumes from its run dir's newest intact checkpoint whatever `trainer.resume` says
(`resume_checkpoint`, which takes every other resume decision too). Outside submitit, SIGTERM ends the
run with the command that continues it.

    stop = StopOnSignal(run_dir)              # among the trainer's callbacks
    with stop:
        trainer.train(...)
    stop.raise_if_stopped(trainer.state.global_step)

This module imports rmexp.rundir and never the reverse: rundir holds the run dir's files (checkpoints and
their integrity, metrics.json, the job id it records) and knows no signal. `run_record` records a
preemption through `rundir.Suspended`, the base of `Preempted`, so neither module has to import the other
lazily to break a cycle.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from rmexp._compat import submitit_preempt_signal
from rmexp.rundir import (
    CheckpointError,
    Suspended,
    claim_run_dir,
    diagnose_checkpoint,
    last_complete_checkpoint,
    pick_checkpoint,
    submitit_job_id,
)

log = logging.getLogger(__name__)


def submitit_signal() -> tuple[int, object] | None:
    """In a submitit job: the signal submitit sends before a preemption or the time limit (USR2 unless
    SUBMITIT_PREEMPT_SIGNAL says otherwise) and the handler submitit installed for it, which saves the
    job's submission, requeues the job and exits at once; else None."""
    if submitit_job_id() is None:
        return None
    signum = submitit_preempt_signal()
    handler = signal.getsignal(signum)
    return (signum, handler) if callable(handler) else None


class Preempted(Suspended):
    """A submitit job stopped on submitit's preemption / time-limit signal, its checkpoint saved.

    `run_record` writes status `preempted` (with `details`: the step, the signal, the checkpoint), then
    `requeue()` runs submitit's own handler for the signal, which saves the job's submission, requeues
    it and exits; the requeued job resumes from the checkpoint (`resume_checkpoint`). A BaseException,
    like SystemExit: no error for an `except Exception` (a sweep's failed-job guard) to swallow."""

    status = "preempted"

    def __init__(self, details: dict, requeue: Callable[[], Any]):
        super().__init__(f"preempted at step {details['step']} ({details['signal']}); requeueing the job", details)
        self.requeue = requeue


class StopOnSignal(TrainerCallback):
    """SIGTERM (SLURM's notice before a kill), or in a submitit job submitit's preemption / time-limit
    signal: save a checkpoint at the end of this step, then stop; `raise_if_stopped` says what follows.
    Submitit's own handler would requeue and exit mid-step: it runs only once the checkpoint is saved
    (Preempted.requeue). The handlers are installed only inside `with`, and only on the main thread
    (signals reach it alone)."""

    received: int | None = None

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            control.should_save = control.should_training_stop = True
        return control

    def _handle(self, signum, frame):
        if self.received is not None:  # the first signal decides (SLURM's SIGTERM after submitit's USR2 too)
            return
        log.warning("%s: saving a checkpoint after this step, then stopping", signal.Signals(signum).name)
        self.received = signum

    def __enter__(self):
        self._previous, self._submitit = {}, None
        if threading.current_thread() is threading.main_thread():
            self._submitit = submitit_signal()
            for signum in {signal.SIGTERM, *(self._submitit[:1] if self._submitit else ())}:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        return False

    def raise_if_stopped(self, step: int) -> None:
        """After training: Preempted if submitit's signal stopped it (the job is to be requeued), an
        InterruptedError naming the resume command if SIGTERM did; nothing if no signal came."""
        if self.received is None:
            return
        name, run_dir = signal.Signals(self.received).name, self.run_dir
        if self._submitit is not None and self.received == self._submitit[0]:
            signum, handler = self._submitit
            checkpoint = last_complete_checkpoint(run_dir / "checkpoints")
            raise Preempted({"step": step, "signal": name, "job_id": submitit_job_id(),
                             "checkpoint": str(checkpoint) if checkpoint else None},
                            requeue=lambda: handler(signum, None))
        raise InterruptedError(f"stopped by {name} at step {step}; a checkpoint is in {run_dir}/checkpoints: "
                               f"continue with hydra.run.dir={run_dir} trainer.resume=auto")


@contextlib.contextmanager
def requeue_if_preempted() -> Iterator[None]:
    """Around a job's whole body: on Preempted (checkpointed, metrics.json says preempted) submitit's
    handler requeues the job and exits; the exception goes no further."""
    try:
        yield
    except Preempted as stop:
        log.warning("%s", stop)
        stop.requeue()


def requeued_attempt(run_dir: Path) -> dict | None:
    """When this process is a submitit job run again (requeued after a preemption or its time limit, or
    restarted by SLURM): the metrics.json its previous attempt left in this run dir; else None. A new
    job writing into a dir another job used is not a requeue (the job ids differ)."""
    job_id = submitit_job_id()
    if job_id is None:
        return None
    try:
        previous = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):  # none yet (the previous attempt was killed outright) or half a file
        previous = {}
    if previous.get("job_id") == job_id or int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0:
        return previous
    return None


@dataclass
class Resume:
    """Where training starts: `checkpoint` (None: from scratch) and the damaged newer checkpoints passed
    over; for a requeued job, the W&B run its previous attempt logged into, which this one continues."""

    checkpoint: str | None = None
    skipped: list[dict] = field(default_factory=list)  # {checkpoint, problem, moved_to}: metrics.json's resume_skipped
    wandb_run_id: str | None = None


def resume_checkpoint(resume: str | None, run_dir: Path, main_process: bool = True) -> Resume:
    """Before anything loads (and before run_record writes over the run dir's metrics.json): where training
    starts. A requeued submitit job's dir is its own: it resumes from the newest intact checkpoint whatever
    `resume` says. Any other run first claims the run dir (rundir.claim_run_dir: a previous run is refused
    or moved aside as `resume` says), then `trainer.resume` decides: null or never (from scratch), auto
    (this run dir's newest intact checkpoint, pick_checkpoint) or a checkpoint dir (which must be intact).
    Only reads headers, so a bad checkpoint fails in seconds."""
    attempt = requeued_attempt(run_dir)
    if attempt is None:
        claim_run_dir(run_dir, resume, main_process)
        return _as_configured(resume, run_dir, main_process)
    checkpoints, wandb_run_id = run_dir / "checkpoints", attempt.get("wandb_run_id")
    ckpt, skipped = pick_checkpoint(checkpoints, set_aside=main_process)
    if ckpt is not None:
        log.info("resuming requeued job %s from %s", submitit_job_id(), ckpt)
        return Resume(str(ckpt), skipped, wandb_run_id)
    log.warning("requeued job %s: no checkpoint under %s", submitit_job_id(), checkpoints)
    configured = _as_configured(resume, run_dir, main_process)
    configured.wandb_run_id = wandb_run_id
    return configured


def _as_configured(resume: str | None, run_dir: Path, main_process: bool) -> Resume:
    """What `trainer.resume` alone says (resume_checkpoint)."""
    checkpoints = run_dir / "checkpoints"
    if not resume or resume == "never":
        return Resume()
    if resume == "auto":
        ckpt, skipped = pick_checkpoint(checkpoints, set_aside=main_process)
        if ckpt is None:
            log.warning("trainer.resume=auto: no checkpoint under %s; starting fresh", checkpoints)
            return Resume()
        log.info("resuming from %s", ckpt)
        return Resume(str(ckpt), skipped)
    if not Path(resume).is_dir():
        raise FileNotFoundError(f"trainer.resume: no checkpoint dir {resume} (auto, never or a checkpoint-N dir)")
    if problem := diagnose_checkpoint(Path(resume)):
        raise CheckpointError(f"trainer.resume={resume}: {problem}")
    return Resume(resume)
