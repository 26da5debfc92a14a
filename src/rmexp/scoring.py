"""Forward passes that turn tokenized pairs and answers into rewards, outside the trainer.

Packed (the default): a pair is one `[prompt][chosen][rejected]` segment, prompt computed once (as in
training, rmexp.packing); single answers are `[prompt + answer]` segments. Segments are sorted by
length and packed many to a row up to `row_tokens`, so rows stay full and nothing is padded inside a
row. Padded (the check): right-padded batches of whole sequences, as TRL's collator makes them.
Both return rewards in input order, from the fp32 head.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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


def length_batches(lengths: list[int], row_tokens: int) -> Iterator[list[int]]:
    """Indices, longest first, in groups of at most `row_tokens` tokens (an oversize item alone)."""
    group, used = [], 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if group and used + lengths[i] > row_tokens:
            yield group
            group, used = [], 0
        group.append(i)
        used += lengths[i]
    if group:
        yield group


@torch.inference_mode()
def _score_packed(model, examples: list[dict], lengths: list[int], pad_token_id: int, row_tokens: int,
                  progress=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    from rmexp.packing import PackedPairCollator, packed_rewards

    collator = PackedPairCollator.for_model(model, pad_token_id, row_tokens)
    device = next(model.parameters()).device
    single = "rejected_ids" not in examples[0]
    chosen = torch.empty(len(examples))
    rejected = None if single else torch.empty(len(examples))
    was_training = model.training
    model.eval()
    try:
        with autocast_for(model):
            for group in length_batches(lengths, row_tokens):
                batch = collator([examples[i] for i in group])
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                c, r = packed_rewards(model, batch)
                chosen[group] = c.float().cpu()
                if r is not None:
                    rejected[group] = r.float().cpu()
                if progress is not None:
                    progress.update(len(group))
    finally:
        model.train(was_training)
    return chosen, rejected


def score_pairs_packed(model, chosen: list[list[int]], rejected: list[list[int]], prompt_lens: list[int],
                       pad_token_id: int, row_tokens: int = 2048, progress=None) -> torch.Tensor:
    """Rewards (n_pairs x 2: chosen, rejected) from packed, prefix-shared segments; `prompt_lens` are
    the leading tokens the two sequences share."""
    examples = [{"chosen_ids": list(c), "rejected_ids": list(r), "prompt_len": p}
                for c, r, p in zip(chosen, rejected, prompt_lens, strict=True)]
    if not examples:
        return torch.empty(0, 2)
    lengths = [len(c) + len(r) - p for c, r, p in zip(chosen, rejected, prompt_lens, strict=True)]
    c, r = _score_packed(model, examples, lengths, pad_token_id, row_tokens, progress)
    return torch.stack([c, r], dim=1)


def score_sequences_packed(model, sequences: list[list[int]], pad_token_id: int, row_tokens: int = 2048) -> torch.Tensor:
    """Reward of each token sequence, many sequences to a packed row."""
    if not sequences:
        return torch.empty(0)
    examples = [{"input_ids": list(s)} for s in sequences]
    return _score_packed(model, examples, [len(s) for s in sequences], pad_token_id, row_tokens)[0]
