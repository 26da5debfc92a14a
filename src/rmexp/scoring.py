"""Forward passes that turn tokenized pairs into rewards, outside the trainer."""

from __future__ import annotations

import contextlib

import torch


def autocast_for(model) -> contextlib.AbstractContextManager:
    """bf16 autocast when any weight is bf16: on CPU a bf16 score head cannot take fp32 hidden states."""
    device = next(model.parameters()).device
    if any(p.dtype == torch.bfloat16 for p in model.parameters()):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def score_sequences(model, sequences: list[list[int]], pad_token_id: int, batch_size: int = 8) -> torch.Tensor:
    """Reward of each token sequence (right-padded batches, as in training), as float32 on CPU."""
    from trl.trainer.utils import pad

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        with autocast_for(model):
            for i in range(0, len(sequences), batch_size):
                ids = [torch.tensor(s) for s in sequences[i:i + batch_size]]
                input_ids = pad(ids, padding_value=pad_token_id, padding_side="right").to(device)
                mask = pad([torch.ones_like(t) for t in ids], padding_value=0, padding_side="right").to(device)
                logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
                out.append(logits.float().squeeze(-1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def score_pairs(model, chosen: list[list[int]], rejected: list[list[int]], pad_token_id: int,
                pairs_per_batch: int = 8, progress: bool = False) -> torch.Tensor:
    """Rewards (n_pairs x 2: chosen, rejected) of token sequences.

    Chosen and rejected of a batch share one padded forward, as in TRL's collator, so scores match
    the trainer's evaluation.
    """
    from tqdm.auto import tqdm

    rows = []
    steps = range(0, len(chosen), pairs_per_batch)
    for i in tqdm(steps, desc="scoring pairs", unit="batch", disable=not progress or len(steps) < 4):
        c, r = chosen[i:i + pairs_per_batch], rejected[i:i + pairs_per_batch]
        rewards = score_sequences(model, [list(x) for x in c + r], pad_token_id, batch_size=2 * len(c))
        rows.append(torch.stack(rewards.chunk(2), dim=1))
    return torch.cat(rows)
