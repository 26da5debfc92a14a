"""Trainer callbacks: stop cleanly on SIGTERM (SLURM's notice before a kill) or on a submitit job's
preemption signal, log the loss at every checkpoint, record each checkpoint's manifest and rotate old
ones after it, stop at a time budget, show one progress bar."""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from rmexp._compat import submitit_preempt_signal
from rmexp.rundir import Preempted, last_complete_checkpoint, submitit_job_id, write_manifest

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


class StopOnSignal(TrainerCallback):
    """SIGTERM (SLURM's notice before a kill), or in a submitit job submitit's preemption / time-limit
    signal: save a checkpoint at the end of this step, then stop; `raise_if_stopped` says what follows.
    Submitit's own handler would requeue and exit mid-step: it runs only once the checkpoint is saved
    (Preempted.requeue). The handlers are installed only inside `with`, and only on the main thread
    (signals reach it alone)."""

    received: int | None = None

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

    def raise_if_stopped(self, step: int, run_dir: Path) -> None:
        """After training: Preempted if submitit's signal stopped it (the job is to be requeued), an
        InterruptedError naming the resume command if SIGTERM did; nothing if no signal came."""
        if self.received is None:
            return
        name = signal.Signals(self.received).name
        if self._submitit is not None and self.received == self._submitit[0]:
            signum, handler = self._submitit
            checkpoint = last_complete_checkpoint(run_dir / "checkpoints")
            raise Preempted({"step": step, "signal": name, "job_id": submitit_job_id(),
                             "checkpoint": str(checkpoint) if checkpoint else None},
                            requeue=lambda: handler(signum, None))
        raise InterruptedError(f"stopped by {name} at step {step}; a checkpoint is in {run_dir}/checkpoints: "
                               f"continue with hydra.run.dir={run_dir} trainer.resume=auto")


class LogAtCheckpoint(TrainerCallback):
    """Log the loss at every step a checkpoint is saved, so a checkpoint's log_history holds the loss of
    every step up to it and a resumed run can report the whole run's train_loss."""

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            control.should_log = True
        return control


class CheckpointManifest(TrainerCallback):
    """After each checkpoint save, on the process that saves: the checkpoint's manifest (the size of every
    file, synced to disk with them; rundir.write_manifest), then transformers' own `rotate_checkpoints` with
    `save_total_limit`. Trainer rotates inside its save, before on_save and with nothing synced, so the
    trainer hands the limit here instead: no checkpoint, the one a run resumed from included, is deleted
    before a newer one is on disk whole with its manifest."""

    def __init__(self, save_total_limit: int | None):
        self.save_total_limit = save_total_limit

    def on_save(self, args, state, control, **kwargs):
        # every rank writes its own rng_state_<rank>.pth: the sizes are final once all have saved
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        if args.should_save:
            write_manifest(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", state.global_step)
            rotate_checkpoints(args.output_dir, self.save_total_limit, state.best_model_checkpoint, use_mtime=True)
        return control


class TimeBudget(TrainerCallback):
    """Stops training once the trainer's `time_budget_s` has passed since its scheduler started."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        t = self.trainer
        if t.clock_start is not None and time.monotonic() - t.clock_start >= t.time_budget_s:
            control.should_training_stop = True
        return control


class TrainingProgress(ProgressCallback):
    """One progress bar, training's: an evaluation (before training, every eval_steps, at the end) prints
    its metrics line without a second bar drawn through the first."""

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        return
