"""TRL's RewardTrainer, plus exact pairwise accuracy over the whole eval set and a finite-loss guard."""

from __future__ import annotations

import math

import torch
from trl import RewardTrainer

from rmexp.metrics import pairwise_metrics


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

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if self.model.training:
            if not math.isfinite(loss.detach().float().item()):
                raise NonFiniteLossError(
                    f"non-finite loss ({loss.item()}) at step {self.state.global_step}: lower trainer.learning_rate "
                    "or check the data; no adapter is saved from this run")
        elif self._eval_rewards is not None:
            pair = torch.stack(outputs.logits.detach().float().squeeze(-1).chunk(2), dim=1)
            self._eval_rewards.append(self.accelerator.gather_for_metrics(pair).cpu())
        return (loss, outputs) if return_outputs else loss

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
