"""The `trainer` group as TRL's RewardConfig: HF's keys passed on, rmexp's own kept back, and the settings
rmexp resolves itself (bf16 and activation checkpointing on `auto`)."""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path

import torch

from rmexp.config import Switch, TrainerConfig, switch
from rmexp.model import compute_dtype

log = logging.getLogger(__name__)


@functools.cache
def own_trainer_keys() -> frozenset[str]:
    """rmexp's own `trainer` keys (batching, resume, the speed layers, ...), marked in the schema
    (config.own_key); `extra` is one: its entries are RewardConfig fields, passed on as they are."""
    return frozenset(f.name for f in dataclasses.fields(TrainerConfig) if f.metadata.get("rmexp"))


def activation_bytes(model_config, tokens: int) -> int:
    """Rough activation memory of one training step without recompute: what each layer keeps per token
    for the backward pass (norms, q/k/v/o, the MLP's inputs and outputs, LoRA's dropped-out inputs), in bf16."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    h, inter, layers = text.hidden_size, getattr(text, "intermediate_size", 4 * text.hidden_size), text.num_hidden_layers
    return tokens * layers * (18 * h + 5 * inter) * 2


def use_gradient_checkpointing(trainer_cfg, model) -> bool:
    """`trainer.gradient_checkpointing`: true/false as set; auto recomputes activations only when a step's
    activations would not fit comfortably (60%) in the memory left after loading the model. Recompute
    costs about a third more compute, so it is off wherever it is not needed."""
    setting = switch(trainer_cfg.gradient_checkpointing, "trainer.gradient_checkpointing")
    if setting is not Switch.auto:
        return setting is Switch.true
    tokens = trainer_cfg.per_device_train_batch_size * 2 * trainer_cfg.max_length  # worst case: both answers padded
    needed = activation_bytes(model.config, tokens)
    if torch.cuda.is_available():
        free = torch.cuda.mem_get_info()[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
    on = needed > 0.6 * free
    log.info("trainer.gradient_checkpointing=auto: %s (a step's activations ~%.1f GB, %.1f GB free)",
             "on" if on else "off", needed / 2**30, free / 2**30)
    return on


def use_bf16(setting) -> bool:
    """`trainer.bf16`: auto is on where the training device computes bf16 natively (`compute_dtype`, whose rule is
    rmexp.device.native_bf16: a T4's or V100's emulated bf16 does not count); true is on unless CUDA lacks bf16
    (emulated or not: it is asked for)."""
    setting = switch(setting, "trainer.bf16")
    if setting is Switch.auto:
        return compute_dtype() == torch.bfloat16
    return setting is Switch.true and (not torch.cuda.is_available() or torch.cuda.is_bf16_supported())


def build_reward_config(trainer_cfg: TrainerConfig, run_dir: Path, report_to: str, model=None):
    """The `trainer` group as TRL's RewardConfig (HF names), checkpoints under <run_dir>/checkpoints.
    `model` resolves `gradient_checkpointing=auto` (without it, auto means on)."""
    from trl import RewardConfig

    kwargs = dataclasses.asdict(trainer_cfg)
    extra = kwargs.pop("extra") or {}  # any other RewardConfig field, as given
    kwargs = {key: value for key, value in kwargs.items() if key not in own_trainer_keys()}
    # transformers 5 calls it activation_checkpointing (gradient_checkpointing is its deprecated alias, mirrored)
    kwargs.pop("gradient_checkpointing")
    kwargs["activation_checkpointing"] = (use_gradient_checkpointing(trainer_cfg, model) if model is not None
                                          else switch(trainer_cfg.gradient_checkpointing, "trainer.gradient_checkpointing")
                                          is not Switch.false)
    kwargs["remove_unused_columns"] = False  # the packed collator reads prompt_len, which no forward takes
    # rmexp.data truncates every pair to trainer.max_length when tokenizing: TRL's length filter (its only
    # use of max_length) would drop nothing and print a progress bar
    kwargs["max_length"] = None
    kwargs.update(extra)
    cuda = torch.cuda.is_available()
    return RewardConfig(
        output_dir=str(run_dir / "checkpoints"),
        report_to=report_to,
        use_cpu=not cuda,
        bf16=use_bf16(kwargs.pop("bf16")),
        disable_dropout=False,  # keep lora_dropout as configured
        logging_first_step=True,
        **kwargs,
    )
