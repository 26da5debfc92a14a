"""rmexp.prepare is where a loaded model changes, and each change is made once however often it is asked for."""

from __future__ import annotations

import re

import torch
from peft import get_peft_model

from conftest import ROOT, compose_cfg
from rmexp._compat import attn_implementation
from rmexp.config import to_typed
from rmexp.model import build_lora_config, load_reward_model
from rmexp.packing import PACKED_ATTENTION
from rmexp.prepare import for_scoring, for_training


def test_only_prepare_swaps_classes():
    assigned = [f"{path.name}:{n}" for path in sorted((ROOT / "src/rmexp").glob("*.py"))
                for n, line in enumerate(path.read_text().splitlines(), 1)
                if re.search(r"\.__class__\s*=[^=]", line) and path.name != "prepare.py"]
    assert not assigned, f"__class__ assigned outside rmexp.prepare: {assigned}"


def state(model) -> tuple:
    """Every module's class, every parameter's dtype and values, the attention kernel."""
    return ([(name, type(m)) for name, m in model.named_modules()],
            {name: (p.dtype, p.detach().clone()) for name, p in model.named_parameters()},
            attn_implementation(model))


def assert_same_state(a, b):
    assert a[0] == b[0] and a[2] == b[2]
    assert a[1].keys() == b[1].keys()
    for name, (dtype, value) in a[1].items():
        assert b[1][name][0] == dtype and torch.equal(b[1][name][1], value), name


def test_for_training_twice_changes_nothing_more():
    cfg = to_typed(compose_cfg("model=tiny", "data.path=data/preference.jsonl", "paths.output_dir=unused",
                               "trainer.batching=packed", "trainer.fused_lora=true", "trainer.dequant_cache=true",
                               "trainer.fused_rms_norm=true"))
    model, _, _ = load_reward_model(cfg.model, cfg.quantization)
    for_training(model, cfg.trainer)
    before = state(model)
    for_training(model, cfg.trainer)
    assert_same_state(before, state(model))
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"FP32Linear", "FusedLlamaRMSNorm", "FP32LlamaRMSNorm"} <= kinds
    assert "CachedLinear4bit" not in kinds  # after the wrapping, where the trainer knows whether FSDP shards
    assert attn_implementation(model) == PACKED_ATTENTION

    # the second step, on the peft model TRL makes of it (what the trainer calls)
    model = get_peft_model(model, build_lora_config(cfg.lora))
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.bfloat16)  # TRL's cast
    for_training(model)
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"FusedLinear4bit", "CachedLinear4bit"} <= kinds  # LoRA's layer fused, its base_layer cached
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    before = state(model)
    for_training(model)
    assert_same_state(before, state(model))


def test_for_scoring_before_and_after_the_adapter_is_the_same_model():
    cfg = to_typed(compose_cfg("model=tiny", "quantization=none", "data.path=data/preference.jsonl",
                               "paths.output_dir=unused"))
    model, _, _ = load_reward_model(cfg.model, cfg.quantization)
    model = get_peft_model(for_scoring(model), build_lora_config(cfg.lora))
    before = state(model)
    for_scoring(model)  # RewardModel calls it again on the loaded adapter
    assert_same_state(before, state(model))
    head = model.get_base_model().score
    assert {type(m).__name__ for m in (head.original_module, *head.modules_to_save.values())} == {"FP32Linear"}
