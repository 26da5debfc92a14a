"""Trainer callbacks: log the loss at every checkpoint, record each checkpoint's manifest and rotate old
ones after it, stop at a time budget, show one progress bar, score a halving sweep's rung split (`RungScoring`);
and `StopAgreement`, which makes every rank of a multi-process run stop at the same step for the same reason (the time budget, rmexp.trainer's non-finite loss,
rmexp.preemption's signal). Stopping on a signal is rmexp.preemption's."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from rmexp.rundir import write_manifest
from rmexp.rungs import RUNGS_FILE, keep_until, read_rungs, rung_record, rung_steps, summary


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
    # Under several processes, the share spent as the ranks agreed at the last step end (StopAgreement: the
    # largest of theirs), which the schedule reads instead of this rank's clock: every rank then applies the
    # same learning rate (one step behind the clock) and stops at the same step. None: one process, the clock.
    agreed: float | None = None

    def start(self) -> Budget:
        self.started = time.monotonic()
        return self

    def fraction_spent(self) -> float:
        """The share of the budget used since `start()`, at most 1 (0 before it); the agreed share, if any."""
        if self.agreed is not None:
            return self.agreed
        return self.clock_fraction()

    def clock_fraction(self) -> float:
        """The share of the budget this process's own clock says is used."""
        if self.started is None:
            return 0.0
        return min(1.0, (time.monotonic() - self.started) / self.seconds)

    def spent(self) -> bool:
        return self.started is not None and time.monotonic() - self.started >= self.seconds


class StopReason(TrainerCallback):
    """A reason to stop training that a rank may see alone: its clock, its loss, a signal it received.

    Inside a PairwiseRewardTrainer, a `StopAgreement` asks every reason for this rank's value at each step
    end (`local`: a number, 0 for none, larger for a stronger claim), takes the largest over the ranks, and
    hands it back (`agreed`), so every rank acts on the same value at the same step. Alone, as a plain
    callback (one process), it acts on its own value."""

    def local(self, rank: int, num_processes: int) -> float:
        raise NotImplementedError

    def agreed(self, value: float, state, control, num_processes: int) -> None:
        raise NotImplementedError

    def joined(self, num_processes: int) -> None:
        """Called once the reason belongs to an agreement among `num_processes` processes."""

    def on_step_end(self, args, state, control, **kwargs):
        self.agreed(self.local(0, 1), state, control, 1)
        return control


class StopAgreement(TrainerCallback):
    """Every StopReason of a run, agreed across its processes at each step end.

    Under DDP or FSDP every rank must leave training at the same step: a rank that stops alone leaves the
    others waiting in their next collective until the backend's timeout. So the reasons' values of this rank
    go into one small tensor on the process group's device (`accelerator.device`: CUDA under NCCL, the CPU
    under gloo), one all_reduce(MAX) per step end (`accelerator.reduce`) gives every rank the same values,
    and each reason acts on them. One process: no tensor, no collective; each reason acts on its own value.
    """

    def __init__(self, accelerator, reasons: list[StopReason] = ()):
        self.accelerator = accelerator
        self.reasons: list[StopReason] = []
        for reason in reasons:
            self.add(reason)

    def add(self, reason: StopReason) -> StopReason:
        reason.joined(self.accelerator.num_processes)
        self.reasons.append(reason)
        return reason

    def on_step_end(self, args, state, control, **kwargs):
        n, rank = self.accelerator.num_processes, self.accelerator.process_index
        values = [reason.local(rank, n) for reason in self.reasons]
        if n > 1 and values:
            flags = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
            values = self.accelerator.reduce(flags, reduction="max").tolist()
        for reason, value in zip(self.reasons, values, strict=True):
            reason.agreed(value, state, control, n)
        return control


class TimeBudget(StopReason):
    """Stops training once its `Budget` is spent: on any rank's clock, under several processes."""

    def __init__(self, budget: Budget):
        self.budget = budget

    def joined(self, num_processes: int) -> None:
        if num_processes > 1:  # the schedule follows the agreed share from the first step on
            self.budget.agreed = 0.0

    def local(self, rank: int, num_processes: int) -> float:
        return self.budget.clock_fraction()

    def agreed(self, value: float, state, control, num_processes: int) -> None:
        if num_processes > 1:
            self.budget.agreed = value
        if value >= 1.0:
            control.should_training_stop = True


class TrainingProgress(ProgressCallback):
    """One progress bar, training's: an evaluation (before training, every eval_steps, at the end) prints
    its metrics line without a second bar drawn through the first."""

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        return


def own_rng():
    """Random draws inside (an evaluation's dataloader draws a seed) that leave training's random stream as it was:
    the CPU generator's state and this process's CUDA device's are restored on the way out."""
    return torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else [])


class RungScoring(TrainerCallback):
    """At each rung's step, score the rung split (every rank; rank 0 writes rungs.jsonl and logs `rung/loss`,
    `rung/accuracy` to W&B); at `stop_at` (an index into the rungs, not the last), save a checkpoint and stop
    training there: the run is `paused` (rmexp.recipe). The checkpoint and the rung split's rewards are of the same
    weights, those after the rung's step."""

    def __init__(self, dataset, identity: list[dict], fractions: list[float], stop_at: int | None, run_dir: Path,
                 write: bool, wandb_run=None):
        self.dataset, self.pair_ids, self.fractions = dataset, [i["pair_id"] for i in identity], list(fractions)
        self.stop_at = stop_at if stop_at is not None and stop_at < len(fractions) - 1 else None
        self.run_dir, self.write, self.wandb_run = run_dir, write, wandb_run
        self.trainer = None  # set by rmexp.recipe once the trainer exists: it scores the pairs
        self.steps: list[int] = []
        self.scored: list[dict] = []  # this run's rungs so far, summaries (earlier attempts' included)
        self.paused: dict | None = None

    def reached(self, checkpoint: str | None) -> dict | None:
        """The rung this launch is to pause at (or a later one), when the checkpoint it resumes from is already past
        it (a launch killed after its rung's checkpoint, before metrics.json said paused): that rung's summary."""
        if self.stop_at is None or checkpoint is None:
            return None
        step = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"]
        done = [r for r in read_rungs(self.run_dir) if r["step"] <= step and r["rung"] >= self.stop_at]
        return summary(done[-1]) if done else None

    def on_train_begin(self, args, state, control, **kwargs):
        self.steps = rung_steps(self.fractions, state.max_steps)
        kept = keep_until(self.run_dir, state.global_step) if self.write else []
        self.scored = [summary(r) for r in kept]
        self._train_s = kept[-1]["train_s"] if kept else 0.0
        self._since, self._score_s = time.monotonic(), 0.0
        return control

    def on_step_end(self, args, state, control, **kwargs):
        # rungs close together on a short run can share a step: scored once, recorded for each
        indices = [i for i, step in enumerate(self.steps) if step == state.global_step]
        if not indices:
            return control
        started = time.monotonic()
        with own_rng():
            rewards = self.trainer.score_pairs(self.dataset).tolist()
        score_s = time.monotonic() - started
        train_s = self._train_s + (started - self._since) - self._score_s
        self._score_s += score_s
        for index in indices:
            record = rung_record(index, self.fractions[index], state.global_step, state.max_steps, rewards,
                                 self.pair_ids, train_s, score_s if index == indices[0] else 0.0)
            self.scored.append(summary(record))
            if self.write:
                with open(self.run_dir / RUNGS_FILE, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
        if self.stop_at in indices:  # paused at the furthest rung of this step: a later launch starts past them all
            self.paused = self.scored[-1]
            control.should_save = True
            control.should_training_stop = True
        if self.write and self.wandb_run is not None:
            self.wandb_run.log({"rung/loss": self.scored[-1]["loss"], "rung/accuracy": self.scored[-1]["accuracy"],
                                "train/global_step": state.global_step})
        return control
