"""Trainer callbacks: log the loss at every checkpoint, record each checkpoint's manifest and rotate old
ones after it, stop at a time budget, show one progress bar. Stopping on a signal is rmexp.preemption's."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from rmexp.rundir import write_manifest


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


@dataclass
class Budget:
    """Training time on the monotonic clock, one object for the two that read it: the scheduler, whose
    learning rate follows `fraction_spent()`, and `TimeBudget`, which stops training once `spent()`."""

    seconds: float
    started: float | None = None

    def start(self) -> Budget:
        self.started = time.monotonic()
        return self

    def fraction_spent(self) -> float:
        """The share of the budget used since `start()`, at most 1 (0 before it)."""
        if self.started is None:
            return 0.0
        return min(1.0, (time.monotonic() - self.started) / self.seconds)

    def spent(self) -> bool:
        return self.started is not None and time.monotonic() - self.started >= self.seconds


class TimeBudget(TrainerCallback):
    """Stops training once its `Budget` is spent."""

    def __init__(self, budget: Budget):
        self.budget = budget

    def on_step_end(self, args, state, control, **kwargs):
        if self.budget.spent():
            control.should_training_stop = True
        return control


class TrainingProgress(ProgressCallback):
    """One progress bar, training's: an evaluation (before training, every eval_steps, at the end) prints
    its metrics line without a second bar drawn through the first."""

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        return
