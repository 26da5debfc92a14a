"""FSDP-QLoRA: what a peft model on a 4-bit base needs before FSDP wraps it (`experiment=fsdp_qlora_70b`).

FSDP (version 1, `use_orig_params=False`, the FSDP-QLoRA setup of the peft and bitsandbytes docs) flattens
each wrapped block's parameters into one tensor, so within a block they must share one dtype and one
`requires_grad`:

- the 4-bit codes are stored in `quantization.bnb_4bit_quant_storage`, which must be `model.dtype`
  (rmexp.model.from_pretrained_kwargs checks it at load time under `accelerate launch`; checked again here);
- transformers gives every trainable LoRA and head Linear a block of its own (peft's `fsdp_auto_wrap_policy`)
  and sets FSDP's mixed precision to the storage dtype, but only when `train()` wraps the model. rmexp
  evaluates before training, and that first `evaluate()` would wrap it with the plain policy, putting the
  fp32 LoRA weights in the bf16 decoder layers' blocks ("Must flatten tensors with uniform dtype"):
  `prepare_for_fsdp` does it when the trainer is built (rmexp.prepare.for_training);
- peft keeps a frozen copy of the reward head beside the trained one (`modules_to_save`), and rmexp made the
  head fp32: that copy would share the root block with the bf16 embeddings ("Must flatten tensors with uniform
  dtype"). It is never used while the adapter is active, so it is cast to the model's dtype.

Two of rmexp's speed layers cannot run under FSDP (`fsdp_speed_options`), nor can the packed loss as it
stands (`check_fsdp_batching`): in two-process CPU runs (gloo) of the tiny model both layers raised, and the
packed loss left a LoRA weight without its gradient. Without them, the sharded gradients equal the unwrapped
model's (exactly in fp32, within 3% in bf16), the fused RMSNorm included (tests/test_fsdp.py).
"""

from __future__ import annotations

import logging

import torch

from rmexp._compat import update_fsdp_plugin_peft

log = logging.getLogger(__name__)


def fsdp_speed_options(fused_lora: bool, dequant_cache) -> tuple[bool, str]:
    """`trainer.fused_lora` and `trainer.dequant_cache` as FSDP can take them: both off.

    fused_lora adds `x A^T B^T` with lora_B's weight read directly, outside lora_B's own forward; peft's wrap
    policy makes lora_B an FSDP block of its own, so there that weight is a resharded view (two processes:
    "Output 0 of View is a view and its base ... has been modified inplace"). peft's forward, the same sum,
    runs instead. dequant_cache reads `weight.quant_state`, which FSDP's flattening drops ("'Tensor' object
    has no attribute 'quant_state'"), and a whole dequantized base per rank would undo the sharding.
    """
    asked = [name for name, on in (("trainer.fused_lora", fused_lora),
                                   ("trainer.dequant_cache", str(dequant_cache).lower() == "true")) if on]
    if asked:
        log.warning("FSDP: %s off (not FSDP-safe; see rmexp.fsdp); experiment=fsdp_qlora_70b sets them false",
                    " and ".join(asked))
    return False, "false"


def check_fsdp_batching(data_collator) -> None:
    """Refuse `trainer.batching=packed` under FSDP.

    The packed loss reads each reward with a forward hook on the head and drops the model's own output, so
    the backward never reaches the root FSDP block's output hook. FSDP then never runs its end-of-backward
    step and the last block to get its gradient (the first layer's first LoRA A) is left without one: seen
    with two processes on CPU, gradients otherwise equal. TRL's padded path computes the loss from the output.
    """
    from rmexp.packing import PackedPairCollator

    if isinstance(data_collator, PackedPairCollator):
        raise ValueError("trainer.batching=packed does not train correctly under FSDP (its loss bypasses the wrapped "
                         "model's output: see rmexp.fsdp); use trainer.batching=padded, as experiment=fsdp_qlora_70b does")


def prepare_for_fsdp(model, accelerator) -> list[str]:
    """Ready a peft `model` for FSDP before anything wraps it (see the module's doc); returns the names of
    the frozen parameters cast to the model's dtype."""
    dtype = model.get_input_embeddings().weight.dtype
    storage = {p.dtype for p in model.parameters() if type(p).__name__ == "Params4bit"}
    if storage - {dtype}:
        raise ValueError(
            f"FSDP needs the 4-bit weights stored in the model's dtype ({dtype}), found {sorted(map(str, storage))}: "
            "set quantization.bnb_4bit_quant_storage and model.dtype alike (experiment=fsdp_qlora_70b: bfloat16)")
    update_fsdp_plugin_peft(model, accelerator)  # peft's wrap policy and mixed precision = storage dtype, now
    cast = []
    for name, param in model.named_parameters():
        if not param.requires_grad and torch.is_floating_point(param) and param.dtype != dtype:
            param.data = param.data.to(dtype)
            cast.append(name)
    if cast:
        log.info("FSDP: %d frozen parameters cast to %s to share a block with the rest: %s", len(cast), dtype,
                 ", ".join(cast))
    return cast
