"""The fused LoRA forward (rmexp.lora) computes what peft's does: same outputs, gradients, training."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import TrainerCallback

from conftest import compose_cfg, tiny_overrides
from rmexp.lora import use_fused_lora
from rmexp.train import main


class Projection(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 12)

    def forward(self, x):
        return self.proj(x)


def lora_pair(dropout: float):
    torch.manual_seed(0)
    peft_model = get_peft_model(Projection(), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                         target_modules=["proj"], init_lora_weights=False))
    fused = copy.deepcopy(peft_model)
    assert use_fused_lora(fused) == 1 and use_fused_lora(Projection()) == 0
    return peft_model, fused


def outputs_and_grads(model, x, seed=0):
    torch.manual_seed(seed)
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.pow(2).sum().backward()
    grads = [x.grad] + [p.grad for p in model.parameters() if p.requires_grad]
    return out, grads


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_layer_equals_peft_outputs_and_gradients(dropout):
    """No dropout: the fused addmm; with dropout: peft's own forward (same draws, same results)."""
    peft_model, fused = lora_pair(dropout)
    x = torch.randn(2, 5, 16)
    out, grads = outputs_and_grads(peft_model.train(), x)
    fused_out, fused_grads = outputs_and_grads(fused.train(), x)
    assert torch.allclose(out, fused_out, atol=1e-6)
    for g, f in zip(grads, fused_grads, strict=True):
        assert torch.allclose(g, f, atol=1e-5)


def test_fused_layer_under_cpu_bf16_autocast_needs_no_input_casts():
    peft_model, fused = lora_pair(0.0)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = peft_model(x), fused(x)
    assert got.dtype == torch.bfloat16
    assert torch.allclose(expected.float(), got.float(), atol=3e-2)


class KeepModel(TrainerCallback):
    model = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model


def test_training_with_fused_lora_gives_the_same_losses_and_rewards(tmp_path):
    """The tiny nf4 model in fp32, same steps with and without fusion: identical training, to rounding."""
    runs = {}
    for fused in (True, False):
        out, probe = tmp_path / str(fused), KeepModel()
        main(compose_cfg(*tiny_overrides(out, "logger=none", "trainer.bf16=false", "model.dtype=float32",
                                         "lora.lora_dropout=0", f"trainer.fused_lora={str(fused).lower()}")),
             callbacks=[probe])
        n_fused = sum(type(m).__name__.startswith("Fused") for m in probe.model.modules())
        assert (n_fused > 0) == fused
        metrics = json.loads((out / "metrics.json").read_text())
        scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
        runs[fused] = metrics, torch.tensor([[s["reward_chosen"], s["reward_rejected"]] for s in scores])
    (fused_m, fused_r), (peft_m, peft_r) = runs[True], runs[False]
    assert fused_m["train_loss"] == pytest.approx(peft_m["train_loss"], abs=1e-5)
    assert fused_m["eval_loss"] == pytest.approx(peft_m["eval_loss"], abs=1e-5)
    assert torch.allclose(fused_r, peft_r, atol=1e-4)
    assert not torch.allclose(fused_r, torch.zeros_like(fused_r))
