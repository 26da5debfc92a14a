"""`trainer.attention=flex`: the packed, prefix-shared attention (rmexp.packing) as one `flex_attention` call a layer.

The segment walk (`sdpa_segments`, rmexp.packing.attend_segments) runs 1-3 small attention calls per segment and
layer from Python, with a boolean mask that rules out SDPA's flash kernels and grouped key/value heads copied: on
a GPU, thousands of small kernels a step. Here a whole batch runs as one `flex_attention` call a layer, with a
BlockMask that says which (query, key) blocks of 128 x 128 hold any allowed score; the others are skipped, so the
work is that of the segment walk without its launches.

The mask is the collator's (PackedPairCollator), written as a pure function of three (rows x width) tensors made
from each row's segments, document-id style (torchtune's packed_block_causal_mask, with the answers kept apart):
`document` (which segment a token is in; each padding token is a document of its own, so it attends to itself
only, as in the dense mask), `part` (0 prompt, 1 chosen, 2 rejected) and the position ids. A query attends to a
key of its own segment, not after it, in the prompt or in its own answer (so a rejected token never sees a chosen
one), and, on a sliding-window layer, fewer than `window` positions back (position ids: rejected continues from
the prompt's end). `block_masks` builds the BlockMask once per batch (per layer type: Gemma 3's sliding layers
get their own), caches it on the batch, and `rmexp.packing.packed_rewards` hands it to the model as its
attention mask, so every layer (and gradient checkpointing's recomputation) reuses it.

On CUDA the call is `torch.compile(flex_attention)` (one compiled function per process; inside a compiled decoder
layer, trainer.compile, flex_attention itself): flex_attention without compile materializes every score. On the
CPU torch 2.13 has no flex_attention backward ("FlexAttention does not support backward on CPU"), so there the
call is torch's own unfused reference (rmexp._compat.flex_attention_reference: forward and backward, the whole
score matrix in fp32 and the mask evaluated over every (query, key) pair at every layer): correct, slow, for
checks (docs/performance.md has its speed). `auto` takes flex on CUDA where flex_attention can compile (Triton,
compute capability 7.5 or later) and the segment walk elsewhere.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from rmexp.config import ATTENTIONS, ConfigError, require
from rmexp.packing import PACKED_ATTENTION, PACKED_FLEX_ATTENTION, packed_sdpa

log = logging.getLogger(__name__)

PROMPT, CHOSEN, REJECTED = 0, 1, 2  # `part` of a token
BLOCK_MASK_KEY = "rmexp_block_mask"  # where block_masks caches a batch's BlockMask(s), in the batch itself


def flex_importable() -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def unsupported(device: torch.device | str) -> str | None:
    """Why flex_attention cannot run packed batches fast on `device`; None where it can (CUDA, a torch with
    flex_attention, Triton to compile it, compute capability 7.5 or later, torchtune's rule)."""
    from rmexp.compilation import compiler_available

    device = torch.device(device)
    if device.type != "cuda":
        return (f"on {device.type} flex_attention runs torch's unfused reference (no fused kernel with a backward "
                "there), slower than the segment walk")
    if not flex_importable():
        return f"torch {torch.__version__} has no flex_attention"
    if not compiler_available(device):
        return "no Triton to compile flex_attention's kernel"
    capability = torch.cuda.get_device_capability(device)
    if capability < (7, 5):
        return f"compute capability {capability[0]}.{capability[1]}, flex_attention's kernel needs 7.5 or later"
    return None


def choose(setting: str, why_not: str | None, dropout: float = 0.0, key: str = "trainer.attention") -> tuple[str, str]:
    """(`flex` or `sdpa_segments`, why) for `setting` (auto, sdpa_segments, flex) on a device where flex_attention is
    `why_not` unsuited (None: suited), for a model whose attention dropout is `dropout` (flex_attention has none).
    `flex` where flex_attention is missing or the model drops attention out is a ConfigError naming `key`."""
    require(setting in ATTENTIONS, key, " or ".join(ATTENTIONS), setting)
    if setting == "sdpa_segments":
        return "sdpa_segments", f"{key}=sdpa_segments"
    no_dropout = f"the model's attention_dropout is {dropout:g} and flex_attention has no dropout" if dropout else None
    if setting == "flex":
        if not flex_importable():
            raise ConfigError(f"{key}=flex: torch {torch.__version__} has no flex_attention; use sdpa_segments")
        if no_dropout:
            raise ConfigError(f"{key}=flex: {no_dropout}; use sdpa_segments")
        if why_not:
            log.warning("%s=flex: %s", key, why_not)
        return "flex", f"{key}=flex"
    reason = why_not or no_dropout
    return ("sdpa_segments", f"{key}=auto: {reason}") if reason else ("flex", f"{key}=auto: CUDA with flex_attention")


def kernel_for(setting: str, device: torch.device | str, config, key: str = "trainer.attention") -> tuple[str, str]:
    """(the attention implementation a packed model runs, why): `choose` for this `device` and model `config`."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    way, why = choose(setting, unsupported(device), float(getattr(text, "attention_dropout", 0.0) or 0.0), key)
    return (PACKED_FLEX_ATTENTION if way == "flex" else PACKED_ATTENTION), why


# ---------------------------------------------------------------- the mask


def segment_ids(segments: list[list[tuple[int, int, int, int]]], width: int,
                device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(document, part) of every token of the rows (rows x width, int32) from the collator's segments, each row's
    (start, prompt end, chosen end, end): document is the segment's index in its row, and each padding token's
    (and each index past the row, up to `width`) is a negative number of its own; part is PROMPT, CHOSEN or
    REJECTED (a single answer's segment is all prompt)."""
    document = -1 - torch.arange(width, dtype=torch.int32).repeat(len(segments), 1)
    part = torch.full((len(segments), width), PROMPT, dtype=torch.int32)
    for r, spans in enumerate(segments):
        for i, (start, prompt_end, chosen_end, end) in enumerate(spans):
            document[r, start:end] = i
            part[r, prompt_end:chosen_end] = CHOSEN
            part[r, chosen_end:end] = REJECTED
    return document.to(device), part.to(device)


def packed_mask_mod(document: torch.Tensor, part: torch.Tensor, position_ids: torch.Tensor, window: int | None):
    """flex_attention's mask_mod for packed rows: True where query `q` of row `b` attends to key `kv` (the
    collator's dense mask, PackedPairCollator, entry for entry)."""

    def mask_mod(b, h, q, kv):
        key_part = part[b, kv]
        keep = ((document[b, q] == document[b, kv]) & (kv <= q)
                & ((key_part == PROMPT) | (key_part == part[b, q])))
        if window is not None:
            keep = keep & (position_ids[b, q] - position_ids[b, kv] < window)
        return keep

    return mask_mod


def packed_block_mask(segments, position_ids: torch.Tensor, window: int | None = None, block_size: int = 128):
    """The BlockMask of packed rows (`segments` from PackedPairCollator, `position_ids` rows x width, on the device
    the attention runs on), with a sliding `window` or none."""
    from torch.nn.attention.flex_attention import create_block_mask

    rows, width = position_ids.shape
    # the tables run to the last block's end: a kernel evaluating a partial block's mask_mod past the row reads
    # them in bounds (a padding token of its own there, attending to nothing in the row)
    padded = -(-width // block_size) * block_size
    document, part = segment_ids(segments, padded, position_ids.device)
    positions = torch.nn.functional.pad(position_ids, (0, padded - width))
    mask_mod = packed_mask_mod(document, part, positions, window)
    return create_block_mask(mask_mod, rows, None, width, width, device=position_ids.device, BLOCK_SIZE=block_size)


def block_masks(batch: dict[str, Any], window: int | None, all_sliding: bool):
    """The attention_mask argument of a packed batch for a model on the flex kernel, as rmexp.packing.model_mask
    gives the dense one: one BlockMask, or Gemma 3's per-layer-type dict (`window`, `all_sliding`:
    rmexp.packing.attention_layout). Built once on the batch's device and kept in the batch."""
    position_ids = batch["position_ids"]
    key = (position_ids.device, window, all_sliding)
    cached = batch.get(BLOCK_MASK_KEY)
    if cached is not None and cached[0] == key:
        return cached[1]
    full = None if window and all_sliding else packed_block_mask(batch["segments"], position_ids)
    sliding = packed_block_mask(batch["segments"], position_ids, window) if window else None
    masks = full if sliding is None else sliding if full is None else {"full_attention": full,
                                                                       "sliding_attention": sliding}
    batch[BLOCK_MASK_KEY] = (key, masks)
    return masks


# ---------------------------------------------------------------- the kernel


@functools.cache
def compiled_flex_attention():
    """flex_attention compiled once per process (dynamic after the first new shape: rows change width)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def attend(query, key, value, block_mask, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, masked by `block_mask`) v; q: B x H x L x D, k and v: B x H_kv x L x D (grouped query
    heads share a key/value head, as transformers' repeat_kv pairs them); output B x H x L x D."""
    if query.device.type == "cpu":
        return _reference(query, key, value, block_mask, scale)
    from torch.nn.attention.flex_attention import flex_attention

    kernel = flex_attention if torch.compiler.is_compiling() else compiled_flex_attention()
    return kernel(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=query.shape[1] != key.shape[1])


@torch.compiler.disable
def _reference(query, key, value, block_mask, scale: float) -> torch.Tensor:
    """torch's unfused flex_attention reference, eager (a compiled layer leaves it out of its graph)."""
    from rmexp._compat import flex_attention_reference

    return flex_attention_reference(query, key, value, block_mask, scale)


def packed_flex(module, query, key, value, attention_mask, dropout=0.0, scaling=None, rmexp_segments=None,
                **kwargs):
    """The flex kernel (PACKED_FLEX_ATTENTION): a packed batch (its attention_mask a BlockMask, `block_masks`)
    in one flex_attention call; any other batch as rmexp.packing.packed_sdpa runs it (plain SDPA, or the segment
    walk for a packed batch given its dense mask)."""
    from torch.nn.attention.flex_attention import BlockMask

    if not isinstance(attention_mask, BlockMask):
        return packed_sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                           rmexp_segments=rmexp_segments, **kwargs)
    if dropout:
        raise ValueError(f"trainer.attention=flex: flex_attention has no attention dropout (got {dropout:g}); "
                         "use trainer.attention=sdpa_segments")
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    with torch.profiler.record_function("rmexp.attention"):  # for bench/throughput.py --profile
        out = attend(query, key, value, attention_mask, scale)
    return out.transpose(1, 2).contiguous(), None
