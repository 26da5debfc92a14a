"""TRL's RewardTrainer, plus exact pairwise accuracy over the whole eval set, a finite-loss guard, stops
agreed across processes (rmexp.callbacks.StopAgreement) and the packed, prefix-shared forward (rmexp.packing)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.trainer_callback import ProgressCallback
from trl import RewardTrainer

from rmexp import diagnostics
from rmexp._compat import check as check_private_names
from rmexp._compat import compile_seconds, count_train_tokens, log_metric
from rmexp.callbacks import (
    Budget,
    CheckpointManifest,
    LogAtCheckpoint,
    StopAgreement,
    StopReason,
    TimeBudget,
    TrainingProgress,
)
from rmexp.compilation import compile_after_first_step
from rmexp.errors import UserError
from rmexp.fsdp import check_fsdp_batching
from rmexp.loss import bradley_terry
from rmexp.metrics import pairwise_metrics
from rmexp.model import reward_head
from rmexp.packing import packed_rewards
from rmexp.prepare import compiled_layers, for_training


def whole_run_loss(log_history: list[dict], start: int, session_loss: float, end: int) -> float:
    """The mean training loss over steps 1..end of a run resumed at step `start`: the checkpoint's logged
    losses (each the mean over the steps since the previous log) up to `start`, and `session_loss`, the
    mean over the steps since. A step before `start` that no log covers (a checkpoint saved between two
    logs by an older rmexp) is left out of the mean."""
    total, logged = 0.0, 0
    for entry in log_history:
        if "loss" in entry and logged < entry["step"] <= start:
            total, logged = total + entry["loss"] * (entry["step"] - logged), entry["step"]
    return (total + session_loss * (end - start)) / max(logged + end - start, 1)


def last_eval_at(trainer, step: int) -> dict | None:
    """The metrics of an evaluation the trainer already ran at `step`, so the final one is not repeated."""
    for entry in reversed(trainer.state.log_history):
        if "eval_pairwise_accuracy" in entry:
            return entry if entry.get("step") == step and trainer.last_eval_rewards is not None else None
    return None


def planned_steps(args, train_dataset, time_budget_s: float | None) -> int | None:
    """The optimizer steps a run plans (max_steps, else the epochs over the training pairs); None under a time
    budget (its clock decides) or for a stream without max_steps."""
    if time_budget_s is not None:
        return None
    if args.max_steps > 0:
        return args.max_steps
    if train_dataset is None or not hasattr(train_dataset, "__len__"):
        return None
    batches = math.ceil(len(train_dataset) / (args.per_device_train_batch_size * args.world_size))
    return math.ceil(math.ceil(batches / args.gradient_accumulation_steps) * args.num_train_epochs)


class NonFiniteLossError(UserError, RuntimeError):
    """A training loss that is NaN or infinite (the message says what to change); under several processes every
    rank raises it, naming the step and the rank that saw it (the lowest, if several did)."""


class NonFiniteLoss(StopReason):
    """A non-finite training loss, found by `compute_loss` on this rank and raised at the end of its step, on every
    rank at once (StopAgreement), before anything of that step is logged or saved."""

    KINDS = ("nan", "inf", "-inf")
    seen: str | None = None  # this rank's first non-finite loss since the last step end: nan, inf or -inf

    def record(self, value: float) -> None:
        if self.seen is None:
            self.seen = "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"

    def local(self, rank: int, num_processes: int) -> float:
        # the lowest rank that saw one has the largest value; the kind rides along in the low bits
        return 0.0 if self.seen is None else float((num_processes - rank) * 4 + 1 + self.KINDS.index(self.seen))

    def agreed(self, value: float, state, control, num_processes: int) -> None:
        self.seen = None
        if not value:
            return
        code = int(value)
        rank, kind = num_processes - code // 4, self.KINDS[code % 4 - 1]
        where = f" on rank {rank} of {num_processes}" if num_processes > 1 else ""
        raise NonFiniteLossError(f"non-finite loss ({kind}) at step {state.global_step}{where}: lower "
                                 "trainer.learning_rate or check the data; no adapter is saved from this run")


class PairwiseRewardTrainer(RewardTrainer):
    """RewardTrainer whose every evaluation also scores each eval pair once.

    TRL's own `eval_accuracy` is a mean of per-batch means; `eval_pairwise_accuracy` is the share of
    all held-out pairs with r_chosen > r_rejected. The rewards of the last evaluation stay in
    `last_eval_rewards` (n_pairs x 2: chosen, rejected), in dataset order on one process.

    It takes a model `rmexp.prepare.for_training` prepared; the changes that can only follow TRL's peft
    wrapping it makes itself, by the same function.
    """

    _eval_rewards: list | None = None
    _quiet = False  # scoring pairs for rmexp.rungs: no metrics into the next log line
    last_eval_rewards: torch.Tensor | None = None
    eval_sources: list[str | None] | None = None  # each eval pair's source/subset: accuracy by source
    eval_categories: dict[str, str] | None = None  # subset -> category: the category-averaged accuracy

    def __init__(self, *args, head_learning_rate: float | None = None, time_budget_s: float | None = None, **kwargs):
        self.head_learning_rate = head_learning_rate
        self.time_budget_s = time_budget_s
        super().__init__(*args, **kwargs)
        check_private_names(self)  # fails naming the library if an upgrade moved one rmexp relies on
        if self.pop_callback(ProgressCallback) is not None:  # one bar, training's; evaluations print their line
            self.add_callback(TrainingProgress)
        # rotation after the manifest, not inside Trainer's save (CheckpointManifest says why)
        self.add_callback(CheckpointManifest(self.args.save_total_limit))
        self.args.save_total_limit = None
        # every reason to stop that one rank may see alone (a signal: rmexp.preemption's StopOnSignal among the
        # callbacks; a non-finite loss; the time budget, added by create_scheduler), agreed across the ranks
        # at each step end, so that all leave training at the same step
        self.non_finite_loss = NonFiniteLoss()
        self.stops = StopAgreement(self.accelerator, [self.non_finite_loss])
        for callback in list(self.callback_handler.callbacks):
            if isinstance(callback, StopReason):
                self.callback_handler.remove_callback(callback)
                self.stops.add(callback)
        self.add_callback(self.stops)
        self.add_callback(LogAtCheckpoint)  # last: it sees every callback's should_save
        if self.is_fsdp_enabled:  # what cannot run sharded (rmexp.fsdp)
            check_fsdp_batching(self.data_collator)
        # Here, not before: TRL's __init__ wraps the model with peft (the LoRA layers to fuse exist only from
        # then on) and casts the trainable parameters of a quantized base to bf16 (to undo); and FSDP's
        # preparation must precede the first evaluate(), which wraps the model.
        for_training(self.model, fsdp=self.is_fsdp_enabled, accelerator=self.accelerator,
                     planned_steps=planned_steps(self.args, self.train_dataset, self.time_budget_s),
                     batch=self.args.per_device_train_batch_size)
        if layers := compiled_layers(self.model):
            self.add_callback(compile_after_first_step(layers))
        self._compile_s_before = compile_seconds()  # a sweep's jobs share a process: count this run's alone

    @property
    def compile_s(self) -> float | None:
        """Seconds spent compiling the decoder layers (trainer.compile), None where they run eagerly."""
        return round(compile_seconds() - self._compile_s_before, 1) if compiled_layers(self.model) else None

    def train(self, resume_from_checkpoint: str | None = None, **kwargs):
        """Trainer.train, whose `training_loss` is the mean over the whole run after a resume as well
        (transformers averages the steps since the checkpoint only), so a resumed run reports the
        uninterrupted run's train_loss."""
        if not isinstance(resume_from_checkpoint, str):
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        # read first: rotation (save_total_limit) deletes the checkpoint once newer ones are saved
        start = json.loads((Path(resume_from_checkpoint) / "trainer_state.json").read_text())["global_step"]
        output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        loss = whole_run_loss(self.state.log_history, start, output.training_loss, output.global_step)
        return output._replace(training_loss=loss, metrics={**output.metrics, "train_loss": loss})

    def create_optimizer(self, model=None):
        """The trainer's optimizer, with the reward head's parameters in a group of their own learning rate.

        The head starts from random weights while LoRA starts from the pretrained model; a higher head
        rate lets the reward scale form in few steps without pushing the adapters as hard.
        """
        optimizer = super().create_optimizer(model)
        if self.head_learning_rate is None or self.head_learning_rate == self.args.learning_rate:
            return optimizer
        head = {id(p) for p in reward_head(self.model).parameters() if p.requires_grad}
        groups = []
        for group in optimizer.param_groups:
            rest = [p for p in group["params"] if id(p) not in head]
            own = [p for p in group["params"] if id(p) in head]
            groups += [{**group, "params": rest}] if rest else []
            groups += [{**group, "params": own, "lr": self.head_learning_rate}] if own else []
        optimizer.param_groups = groups
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """With `time_budget_s`, the learning rate follows the clock, not the step count: linear warmup over
        `warmup_steps` (a fraction of the budget, or a number of steps), then linear decay to zero when the
        budget is spent, and training stops there (`TimeBudget`). The run sees as many pairs as fit. Under
        several processes the rate follows the share spent that the ranks agreed at the last step end (the
        furthest clock's; StopAgreement), so every rank applies the same rate and stops at the same step."""
        if self.time_budget_s is None:
            return super().create_scheduler(num_training_steps, optimizer)
        if self.lr_scheduler is None:
            warmup = self.args.warmup_steps
            warm_time, warm_steps = (warmup, 0) if warmup < 1 else (0.0, int(warmup))
            budget = Budget(self.time_budget_s).start()  # one clock: this schedule's and TimeBudget's
            self.stops.add(TimeBudget(budget))  # before the schedule's first rate: several processes read the agreed share

            def factor(step: int) -> float:
                done = budget.fraction_spent()
                by_time = done / warm_time if done < warm_time else (1.0 - done) / (1.0 - warm_time)
                by_step = (step + 1) / warm_steps if step < warm_steps else 1.0
                return max(0.0, min(by_time, by_step))

            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, factor)
        return self.lr_scheduler

    _flop_parameters: int | None = None

    def floating_point_ops(self, inputs) -> int:
        """transformers' `total_flos` estimate, 6 x input tokens x non-embedding parameters, with the
        parameters counted once: transformers recounts them at every step, walking every module."""
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if self._flop_parameters is None:
            self._flop_parameters = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main_input].numel() * self._flop_parameters

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's Bradley-Terry loss (rmexp.loss) and its logged metrics, on padded batches (TRL's collator: the
        chosen answers, then the rejected ones) or packed ones (rmexp.packing)."""
        mode = "train" if self.model.training else "eval"
        if "chosen_index" in inputs:
            chosen, rejected = packed_rewards(model, inputs, head=reward_head(self.model))
            outputs, tokens = None, inputs["num_real_tokens"]
        else:
            inputs["use_cache"] = False  # the model config's default would warn under gradient checkpointing
            outputs = model(**inputs)
            chosen, rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
            tokens = inputs["attention_mask"].sum()
        loss, stats = bradley_terry(chosen, rejected, inputs.get("margin"), self.args.center_rewards_coefficient)
        if not self._quiet:
            self.log_pair_metrics(mode, stats, tokens)
        if outputs is None:
            outputs = SequenceClassifierOutput(loss=loss, logits=torch.cat([chosen, rejected])[:, None])
        if self.model.training:
            value = loss.detach().float().item()
            if not math.isfinite(value):  # raised at the step's end, on every rank (NonFiniteLoss)
                self.non_finite_loss.record(value)
        elif self._eval_rewards is not None:
            pair = torch.stack([chosen.detach().float(), rejected.detach().float()], dim=1)
            self._eval_rewards.append(self.accelerator.gather_for_metrics(pair).cpu())
        return (loss, outputs) if return_outputs else loss

    def log_pair_metrics(self, mode: str, stats: dict[str, torch.Tensor], tokens: torch.Tensor) -> None:
        """What RewardTrainer logs of a batch, gathered over the processes: the running count of training
        tokens (`num_tokens`), the min, mean and max reward, the accuracy and the mean margin."""
        count = self.accelerator.gather_for_metrics(tokens).sum().item() if mode == "train" else None
        count_train_tokens(self, count, mode)
        with torch.no_grad():
            rewards = self.accelerator.gather(stats["rewards"])
            for key, value in (("min_reward", rewards.min()), ("mean_reward", rewards.mean()),
                               ("max_reward", rewards.max()),
                               ("accuracy", self.accelerator.gather_for_metrics(stats["accuracy"]).mean()),
                               ("margin", self.accelerator.gather_for_metrics(stats["margin"]).mean())):
                log_metric(self, mode, key, value.item())

    def score_pairs(self, dataset) -> torch.Tensor:
        """Each pair's (chosen, rejected) rewards (n_pairs x 2, dataset order), scored as an evaluation scores them,
        packed, but neither logged nor kept as the last evaluation's (rmexp.rungs' rung split)."""
        self._eval_rewards, self._quiet = [], True
        try:
            super().evaluation_loop(self.get_eval_dataloader(dataset), "Rung", True, None, "rung")
            return torch.cat(self._eval_rewards)
        finally:
            self._eval_rewards, self._quiet = None, False

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        self._eval_rewards = []
        try:
            # the rewards are collected in compute_loss: no need for Trainer to keep the logits too
            output = super().evaluation_loop(dataloader, description, True, ignore_keys, metric_key_prefix)
            rewards = torch.cat(self._eval_rewards)
        finally:
            self._eval_rewards = None
        self.last_eval_rewards = rewards
        pairwise = pairwise_metrics(rewards[:, 0].numpy(), rewards[:, 1].numpy())
        # ece, brier, by_source/<name>/pairwise_accuracy, ...: W&B gets them as eval/<name> with the rest
        pairwise |= diagnostics.scalars(diagnostics.summary(rewards[:, 0].numpy(), rewards[:, 1].numpy(),
                                                            self.eval_sources, self.eval_categories))
        output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in pairwise.items()})
        return output
