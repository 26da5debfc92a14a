"""The Bradley-Terry loss of a batch of pairs, and the statistics a trainer logs beside it."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                  center_rewards_coefficient: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TRL RewardTrainer's loss, -log sigmoid(r_chosen - r_rejected - margin) averaged over the pairs, plus
    `center_rewards_coefficient` x mean((r_chosen + r_rejected)^2) when set; and this process's statistics,
    detached: `rewards` (every chosen, then every rejected reward), `accuracy` (the share of pairs with
    r_chosen > r_rejected) and `margin` (the mean r_chosen - r_rejected)."""
    difference = chosen - rejected
    loss = -F.logsigmoid(difference if margin is None else difference - margin).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)
    with torch.no_grad():
        stats = {"rewards": torch.cat([chosen, rejected]).detach(), "accuracy": (chosen > rejected).float().mean(),
                 "margin": difference.detach().mean()}
    return loss, stats
