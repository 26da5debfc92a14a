"""Trainer callbacks: stop cleanly on SIGTERM (SLURM's notice before a kill), stop at a time budget,
show one progress bar."""

from __future__ import annotations

import logging
import signal
import threading
import time

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

log = logging.getLogger(__name__)


class StopOnSigterm(TrainerCallback):
    """SIGTERM (SLURM's notice before a kill): save a checkpoint at the end of this step, then stop.
    The handler is installed only inside `with`, and only on the main thread (signals reach it alone)."""

    received: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            control.should_save = control.should_training_stop = True
        return control

    def _handle(self, signum, frame):
        log.warning("SIGTERM: saving a checkpoint after this step, then stopping")
        self.received = signum

    def __enter__(self):
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


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
