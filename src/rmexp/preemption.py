"""A run stopped by its scheduler and continued: signal -> checkpoint -> status -> requeue -> resume.

SIGTERM (SLURM's notice before a kill), or in a submitit job submitit's preemption / time-limit signal,
makes training save a checkpoint at the end of its step and stop (`StopOnSignal`). Under submitit that
is `Preempted`: `run_record` writes metrics.json with status `preempted`, then `rundir.requeue_if_suspended`
hands the signal to submitit's own handler, which requeues the job and exits. The requeued job
(`rmexp.resume.requeued_attempt`) resumes from its run dir's newest intact checkpoint whatever
`trainer.resume` says (`rmexp.resume.resume_checkpoint`, which takes every other resume decision too).
Outside submitit, SIGTERM ends the run with the command that continues it (`StoppedBySignal`).

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

import logging
import shlex
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rmexp._compat import submitit_preempt_signal
from rmexp.callbacks import StopReason
from rmexp.errors import UserError
from rmexp.rundir import Suspended, last_complete_checkpoint, submitit_job_id

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


class StoppedBySignal(UserError, InterruptedError):
    """SIGTERM outside submitit stopped the run after its checkpoint: the message is the command that continues it."""


class StopOnSignal(StopReason):
    """SIGTERM (SLURM's notice before a kill), or in a submitit job submitit's preemption / time-limit
    signal: save a checkpoint at the end of this step, then stop; `raise_if_stopped` says what follows.
    Submitit's own handler would requeue and exit mid-step: it runs only once the checkpoint is saved
    (Preempted.requeue). The handlers are installed only inside `with`, and only on the main thread
    (signals reach it alone).

    Under several processes a signal that reached one rank stops them all at the same step end, each saving
    its part of the same checkpoint (rmexp.callbacks.StopAgreement; submitit's signal outranks SIGTERM when
    two ranks got different ones), and every rank raises the same error after training."""

    received: int | None = None  # the signal this process received (the first decides)
    stopped_by: int | None = None  # the signal the ranks agreed to stop on at a step end
    num_processes = 1
    _submitit: tuple[int, object] | None = None  # inside `with`, in a submitit job: its signal and handler

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def joined(self, num_processes: int) -> None:
        self.num_processes = num_processes

    def local(self, rank: int, num_processes: int) -> float:
        if self.received is None:
            return 0.0
        # submitit's signal, which requeues the job, wins over SIGTERM: 1000 + its number
        return float(self.received + (1000 if self._submitit and self.received == self._submitit[0] else 0))

    def agreed(self, value: float, state, control, num_processes: int) -> None:
        if value and self.stopped_by is None:
            self.stopped_by = int(value) % 1000
            control.should_save = control.should_training_stop = True

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
        InterruptedError naming the resume command if SIGTERM did; nothing if no signal came. Under several
        processes only a signal agreed at a step end counts (every rank then raises the same): one that came
        after the last step end reached this rank alone, and the run ends as if it had not come."""
        received = self.stopped_by
        if received is None and self.num_processes == 1:  # alone: a signal after the last step end counts too
            received = self.received
        if received is None:
            if self.received is not None:
                log.warning("%s came after the last training step: the run finishes",
                            signal.Signals(self.received).name)
            return
        name, run_dir = signal.Signals(received).name, self.run_dir
        if self._submitit is not None and received == self._submitit[0]:
            signum, handler = self._submitit
            checkpoint = last_complete_checkpoint(run_dir / "checkpoints")
            raise Preempted({"step": step, "signal": name, "job_id": submitit_job_id(),
                             "checkpoint": str(checkpoint) if checkpoint else None},
                            requeue=lambda: handler(signum, None))
        raise StoppedBySignal(f"stopped by {name} at step {step}; a checkpoint is in {run_dir}/checkpoints: continue "
                              f"with rmexp-train hydra.run.dir={shlex.quote(str(run_dir))} trainer.resume=auto")
