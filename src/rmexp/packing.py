"""Prefix-shared, packed pair batches: every token of a batch computed once, no padding.

A pair becomes one segment `[prompt][chosen][rejected]`. Chosen tokens attend to the prompt and to
earlier chosen tokens; rejected tokens attend to the prompt and to earlier rejected tokens, never to
chosen ones, and their position ids continue from the prompt's end as if chosen were absent. So each
answer sees exactly what it would see in its own sequence, while the prompt is run once. Segments
are packed into rows up to `row_tokens`; a batch is usually one row, so nothing is padded.

The reward of an answer is read where the plain sequence-classification forward reads it: the last
token that is not the pad token (with pad = eos, the token before a trailing eos).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rmexp._compat import attn_implementation
from rmexp.config import Batching
from rmexp.data import last_non_pad
from rmexp.model import reward_head


def pack_rows(lengths: list[int], row_tokens: int) -> list[list[int]]:
    """First-fit-decreasing bins of segment indices, each bin's total <= row_tokens (an oversize segment gets its own)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, left in enumerate(room):
            if lengths[i] <= left:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(row_tokens - lengths[i])
    return [sorted(r) for r in rows]


@dataclass
class PackedPairCollator:
    """Collate `{chosen_ids, rejected_ids, prompt_len[, margin]}` examples into packed rows.

    Returns input_ids and position_ids (rows x L), a boolean block mask (rows x 1 x L x L, True =
    attend), the flat indices (into rows*L) of each pair's chosen and rejected reward token, in
    example order, the count of real tokens, and each row's segments as (start, prompt end, chosen
    end, end) for the attention kernel. Examples `{input_ids}` (single answers, for scoring) become
    plain causal segments (all prompt) with one reward index each (`chosen_index`).
    """

    pad_token_id: int
    row_tokens: int = 2048
    sliding_window: int | None = None  # set for models with sliding-window layers (Gemma 3, Mistral)
    all_sliding: bool = False  # every layer slides (Mistral); else only the `sliding_attention` layers (Gemma 3)

    @classmethod
    def for_model(cls, model, pad_token_id: int, row_tokens: int = 2048) -> PackedPairCollator:
        window, all_sliding = attention_layout(model.config)
        return cls(pad_token_id=pad_token_id, row_tokens=row_tokens, sliding_window=window, all_sliding=all_sliding)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        single = "rejected_ids" not in examples[0]
        segments = []
        for ex in examples:
            if single:
                segments.append((list(ex["input_ids"]), [], []))
                continue
            p = int(ex["prompt_len"])
            segments.append((ex["chosen_ids"][:p], ex["chosen_ids"][p:], ex["rejected_ids"][p:]))
        lengths = [len(p) + len(c) + len(r) for p, c, r in segments]
        rows = pack_rows(lengths, self.row_tokens)
        width = max(sum(lengths[i] for i in row) for row in rows)
        n = len(rows)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((n, width), dtype=torch.long)
        mask = torch.zeros((n, 1, width, width), dtype=torch.bool)
        # built block by block: a row-wide int64 distance matrix would take 8 bytes per mask entry
        sliding = torch.zeros_like(mask) if self.sliding_window else None
        chosen_index = torch.empty(len(segments), dtype=torch.long)
        rejected_index = torch.empty(len(segments), dtype=torch.long)
        longest = max(max(len(p), len(c), len(r)) for p, c, r in segments)
        tril = torch.ones(longest, longest, dtype=torch.bool).tril()
        spans: list[list[tuple[int, int, int, int]]] = []
        for r, row in enumerate(rows):
            o = 0
            spans.append([])
            for i in row:
                prompt, chosen, rejected = segments[i]
                P, C, R = len(prompt), len(chosen), len(rejected)
                input_ids[r, o:o + P + C + R] = torch.tensor(prompt + chosen + rejected, dtype=torch.long)
                position_ids[r, o:o + P + C] = torch.arange(P + C)
                position_ids[r, o + P + C:o + P + C + R] = torch.arange(P, P + R)
                m = mask[r, 0]
                m[o:o + P, o:o + P] = tril[:P, :P]
                m[o + P:o + P + C, o:o + P] = True
                m[o + P:o + P + C, o + P:o + P + C] = tril[:C, :C]
                m[o + P + C:o + P + C + R, o:o + P] = True
                m[o + P + C:o + P + C + R, o + P + C:o + P + C + R] = tril[:R, :R]
                if single:
                    chosen_index[i] = r * width + o + last_non_pad(prompt, self.pad_token_id)
                else:
                    chosen_index[i] = r * width + o + P + last_non_pad(chosen, self.pad_token_id)
                    rejected_index[i] = r * width + o + P + C + last_non_pad(rejected, self.pad_token_id)
                if sliding is not None:
                    pos = position_ids[r, o:o + P + C + R]
                    sliding[r, 0, o:o + P + C + R, o:o + P + C + R] = (
                        m[o:o + P + C + R, o:o + P + C + R] & ((pos[:, None] - pos[None, :]) < self.sliding_window))
                spans[r].append((o, o + P, o + P + C, o + P + C + R))
                o += P + C + R
            idle = torch.arange(o, width)
            mask[r, 0, idle, idle] = True  # padding attends to itself only: no all-masked (NaN) rows
            if sliding is not None:
                sliding[r, 0, idle, idle] = True
        batch = {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": mask,
                 "chosen_index": chosen_index, "rejected_index": rejected_index,
                 "num_real_tokens": torch.tensor(sum(lengths)), "segments": spans}
        if single:
            del batch["rejected_index"]
        if sliding is not None:
            if self.all_sliding:  # every layer slides: the one mask the model takes is the sliding one
                batch["attention_mask"] = sliding
            else:
                batch["sliding_attention_mask"] = sliding
        if "margin" in examples[0]:
            batch["margin"] = torch.tensor([float(ex["margin"]) for ex in examples])
        return batch


def attention_layout(config) -> tuple[int | None, bool]:
    """(sliding window, whether every layer slides) of a model; (None, False) when it has no window.

    Gemma 3 mixes sliding and full layers (`layer_types`); Mistral-style configs set one
    `sliding_window` for every layer and have no `layer_types`.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None)
    if not window or getattr(text, "use_sliding_window", True) is False:
        return None, False
    types = getattr(text, "layer_types", None)
    if types is None:
        return int(window), True
    if "sliding_attention" not in types:
        return None, False
    return int(window), all(t == "sliding_attention" for t in types)


def model_mask(batch: dict[str, Any]):
    """The attention_mask argument for the model: one 4D mask, or the per-layer-type dict Gemma 3 takes."""
    if "sliding_attention_mask" in batch:
        return {"full_attention": batch["attention_mask"], "sliding_attention": batch["sliding_attention_mask"]}
    return batch["attention_mask"]


PACKED_ATTENTION = "rmexp_packed_sdpa"  # trainer.attention=sdpa_segments: the segment walk below
PACKED_FLEX_ATTENTION = "rmexp_packed_flex"  # trainer.attention=flex: one flex_attention call a layer (rmexp.flex)
PACKED_KERNELS = (PACKED_ATTENTION, PACKED_FLEX_ATTENTION)


def packed_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, rmexp_segments=None,
                **kwargs):
    """Attention over packed rows (`attend_segments`); without segment spans (ordinary batches) plain SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if rmexp_segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    kwargs.pop("is_causal", None)
    return attend_segments(module, query, key, value, attention_mask, rmexp_segments, dropout, scaling, kwargs), None


# A segment runs as three blocks when that skips at least this many scores a head: below it, the two extra
# calls (forward and backward) cost more than the skipped scores. `python bench/attention.py` (fp32, 2
# threads, 2-core AMD EPYC) put the crossover at 15-26k for 4 heads of 16 and of 256 (the tests' model and
# Gemma-3-270M: HH's mean pair, 118/40/50 tokens, skips 14.6k and took 1.06-1.35x as long split), and at 3-15k
# for 32 heads of 128 (Llama-3.1-8B), whose pairs in between would gain split; at one thread, at 3-15k for
# both (the calls' overhead is not split across threads). Not timed on CUDA (SDPA blocks).
SPLIT_MIN_SCORES = 1 << 14


def skipped_scores(start: int, prompt_end: int, chosen_end: int, end: int) -> int:
    """The scores a head does not compute when the segment runs as three blocks, not one: P(C+R) + 2CR."""
    prompt, chosen, rejected = prompt_end - start, chosen_end - prompt_end, end - chosen_end
    return prompt * (chosen + rejected) + 2 * chosen * rejected


def splits(segment: tuple[int, int, int, int]) -> bool:
    """Whether `attend_segments` runs this (start, prompt end, chosen end, end) segment as three blocks."""
    return skipped_scores(*segment) >= SPLIT_MIN_SCORES


def attend_segments(module, query, key, value, attention_mask, segments, dropout, scaling, kwargs):
    """Attention run block by block over packed rows (`segments`: each row's (start, prompt end, chosen end,
    end) from PackedPairCollator).

    Segments never attend to each other, and within a segment the prompt attends to itself only and
    each answer to the prompt and itself, never to the other answer. A segment long enough
    (`SPLIT_MIN_SCORES`) runs as three blocks (prompt x prompt, chosen x prompt+chosen, rejected x
    prompt+rejected), skipping P(C+R) + 2CR of its (P+C+R)^2 scores, all masked (within a block the causal
    triangle is computed, then masked); on LLaMA-Factory's 698-token pairs attention then takes half the time
    (docs/performance.md). A shorter one runs as one block, masked: there the two extra calls cost more than
    the scores they skip. Each block takes its rows and columns of the mask as given (causal, sliding
    window). On CUDA each block goes through SDPA (its fused kernels); on CPU through a plain
    matmul-softmax-matmul (`block_attention`), faster than SDPA there (forward and backward, 4 heads of 256,
    bf16: 3.9 against 6.3 ms at 235 tokens, 46 against 77 ms at 1006).

    A compiled decoder layer (trainer.compile) runs each segment as one block, masked: traced, each block's
    length is a symbol, and a one-token answer would compile anew (torch 2.13's inductor then mis-strides the
    graph); one block per segment keeps batch 1 to one graph. Leaving the walk out of the graph
    (torch.compiler.disable) splits each layer into four graphs, slower than eager on Gemma-3-270M.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    width = query.shape[2]
    whole_segments = torch.compiler.is_compiling()
    eager = query.device.type == "cpu" and not (dropout and module.training)

    def columns(t, keys: list[slice], dim: int):  # a view where the keys are one span, else a copy
        parts = [t.narrow(dim, s.start, s.stop - s.start) for s in keys if s.stop > s.start]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)

    def attend(r, queries: slice, keys: list[slice]):
        q = query[r:r + 1, :, queries]
        k, v = columns(key[r:r + 1], keys, 2), columns(value[r:r + 1], keys, 2)
        block = columns(attention_mask[r:r + 1, :, queries], keys, 3)
        if eager:
            return block_attention(q, k, v, block, scaling)
        return sdpa_attention_forward(module, q, k, v, block, dropout=dropout, scaling=scaling, is_causal=False,
                                      **kwargs)[0]

    rows = []
    with torch.profiler.record_function("rmexp.attention"):  # for bench/throughput.py --profile
        for r, spans in enumerate(segments):
            pieces = []
            for start, prompt_end, chosen_end, end in spans:
                if whole_segments or not splits((start, prompt_end, chosen_end, end)):
                    pieces.append(attend(r, slice(start, end), [slice(start, end)]))
                    continue
                prompt = slice(start, prompt_end)
                if prompt_end > start:
                    pieces.append(attend(r, prompt, [prompt]))
                if chosen_end > prompt_end:
                    pieces.append(attend(r, slice(prompt_end, chosen_end), [slice(start, chosen_end)]))
                if end > chosen_end:
                    rejected = slice(chosen_end, end)
                    pieces.append(attend(r, rejected, [prompt, rejected]))
            used = spans[-1][-1] if spans else 0
            if used < width:  # row padding: its output is never read
                pieces.append(query.new_zeros(1, width - used, query.shape[1], value.shape[-1]))
            rows.append(torch.cat(pieces, dim=1))
        return torch.cat(rows, dim=0)


def block_attention(q, k, v, mask, scale: float | None):
    """softmax(q k^T * scale, masked) v for one block (q: 1 x H x Sq x D; k, v: 1 x H_kv x Sk x D; mask: bool
    1 x 1 x Sq x Sk, True = attend), grouped query heads without copying k and v; output 1 x Sq x H x D. The
    softmax takes and returns the compute dtype (it accumulates in fp32 inside), sparing an fp32 copy of the
    scores."""
    _, heads, n, dim = q.shape
    kv_heads, group, m = k.shape[1], heads // k.shape[1], k.shape[2]
    scale = dim ** -0.5 if scale is None else scale
    grouped = (q * scale).reshape(1, kv_heads, group * n, dim)  # the heads of a group share k and v
    scores = torch.matmul(grouped, k.transpose(-1, -2)).view(1, kv_heads, group, n, m)
    probs = torch.softmax(scores.masked_fill(~mask[:, :, None], float("-inf")), dim=-1)
    out = torch.matmul(probs.view(1, kv_heads, group * n, m), v)
    return out.view(1, heads, n, dim).transpose(1, 2)


def register_packed_attention() -> None:
    """Make `packed_sdpa` and `rmexp.flex.packed_flex` kernels transformers models can be switched to
    (`PACKED_ATTENTION`, `PACKED_FLEX_ATTENTION`); batches that are not packed get SDPA's masks under either."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from rmexp.flex import packed_flex

    for name, kernel in ((PACKED_ATTENTION, packed_sdpa), (PACKED_FLEX_ATTENTION, packed_flex)):
        AttentionInterface.register(name, kernel)
        AttentionMaskInterface.register(name, sdpa_mask)


def can_pack(model) -> bool:
    """Whether `model` can run packed batches: its attention is SDPA (switchable to `packed_sdpa`) or packed already."""
    return attn_implementation(model) in ("sdpa", *PACKED_KERNELS)


def uses_packed_attention(model) -> bool:
    """Whether `model` runs a packed kernel (either: `trainer.attention`)."""
    return attn_implementation(model) in PACKED_KERNELS


def build_collator(trainer_cfg, model, tokenizer) -> PackedPairCollator | None:
    """PackedPairCollator for `trainer.batching=packed`, None (TRL's padded collator) for padded.
    Packed batches need the packed attention kernel: rmexp.prepare.for_training switches the model first."""
    if trainer_cfg.batching is Batching.padded:
        return None
    if not uses_packed_attention(model):
        raise ValueError(f"trainer.batching=packed needs model.attn_implementation=sdpa (got "
                         f"{attn_implementation(model)}); use trainer.batching=padded for other attention kernels")
    return PackedPairCollator.for_model(model, tokenizer.pad_token_id, trainer_cfg.packed_row_tokens)


def attention_argument(model, batch: dict[str, Any]):
    """The attention_mask a packed batch passes `model` (peft-, DDP-wrapped or not): the dense masks
    (`model_mask`) for the segment walk; for the flex kernel, its BlockMask(s), built once per batch
    (rmexp.flex.block_masks)."""
    while not hasattr(model, "config") and hasattr(model, "module"):  # DDP keeps the model as .module
        model = model.module
    if attn_implementation(model) != PACKED_FLEX_ATTENTION:
        return model_mask(batch)
    from rmexp.flex import block_masks

    return block_masks(batch, *attention_layout(model.config))


def packed_rewards(model, batch: dict[str, Any], head=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chosen and rejected rewards of a PackedPairCollator batch from one forward of `model` (rejected
    is None for a batch of single answers).

    The head's per-token output is read through a hook, so the forward still goes through the
    whole (peft-, DDP- or autocast-) wrapped model.
    """
    captured = []
    handle = (head if head is not None else reward_head(model)).register_forward_hook(
        lambda module, args, output: captured.append(output))
    try:
        model(input_ids=batch["input_ids"], attention_mask=attention_argument(model, batch),
              position_ids=batch["position_ids"], use_cache=False, rmexp_segments=batch["segments"])
    finally:
        handle.remove()
    token_rewards = captured[-1].float().reshape(-1)
    rejected = token_rewards[batch["rejected_index"]] if "rejected_index" in batch else None
    return token_rewards[batch["chosen_index"]], rejected
