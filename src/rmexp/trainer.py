"""TRL's RewardTrainer, plus exact pairwise accuracy over the whole eval set, a finite-loss guard and
the packed, prefix-shared forward (rmexp.packing)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import SequenceClassifierOutput
from trl import RewardTrainer

from rmexp.metrics import pairwise_metrics
from rmexp.model import keep_4bit_layers_trainable
from rmexp.packing import packed_rewards, reward_head


class NonFiniteLossError(RuntimeError):
    pass


class PairwiseRewardTrainer(RewardTrainer):
    """RewardTrainer whose every evaluation also scores each eval pair once.

    TRL's own `eval_accuracy` is a mean of per-batch means; `eval_pairwise_accuracy` is the share of
    all held-out pairs with r_chosen > r_rejected. The rewards of the last evaluation stay in
    `last_eval_rewards` (n_pairs x 2: chosen, rejected), in dataset order on one process.
    """

    _eval_rewards: list | None = None
    last_eval_rewards: torch.Tensor | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        keep_4bit_layers_trainable(self.model)  # evaluations between steps must not break the gradients

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["chosen_ids", "rejected_ids", "margin", "prompt_len"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "chosen_index" in inputs:
            loss, outputs = self._packed_loss(model, inputs)
        else:
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
        if self.model.training:
            if not math.isfinite(loss.detach().float().item()):
                raise NonFiniteLossError(
                    f"non-finite loss ({loss.item()}) at step {self.state.global_step}: lower trainer.learning_rate "
                    "or check the data; no adapter is saved from this run")
        elif self._eval_rewards is not None:
            pair = torch.stack(outputs.logits.detach().float().squeeze(-1).chunk(2), dim=1)
            self._eval_rewards.append(self.accelerator.gather_for_metrics(pair).cpu())
        return (loss, outputs) if return_outputs else loss

    def _packed_loss(self, model, inputs):
        """TRL's Bradley-Terry loss and logged metrics, on packed batches."""
        mode = "train" if self.model.training else "eval"
        chosen, rejected = packed_rewards(model, inputs, head=reward_head(self.model))
        margin = chosen - rejected - inputs["margin"] if "margin" in inputs else chosen - rejected
        loss = -F.logsigmoid(margin).mean()
        if self.args.center_rewards_coefficient is not None:
            loss = loss + self.args.center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)
        if mode == "train":
            self._total_train_tokens += self.accelerator.gather_for_metrics(inputs["num_real_tokens"]).sum().item()
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        with torch.no_grad():
            rewards = self.accelerator.gather(torch.cat([chosen, rejected]).detach())
            self._metrics[mode]["min_reward"].append(rewards.min().item())
            self._metrics[mode]["mean_reward"].append(rewards.mean().item())
            self._metrics[mode]["max_reward"].append(rewards.max().item())
            diff = (chosen - rejected).detach()
            self._metrics[mode]["accuracy"].append(self.accelerator.gather_for_metrics((diff > 0).float().mean()).mean().item())
            self._metrics[mode]["margin"].append(self.accelerator.gather_for_metrics(diff.mean()).mean().item())
        return loss, SequenceClassifierOutput(loss=loss, logits=torch.cat([chosen, rejected])[:, None])

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
        output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in pairwise.items()})
        return output
