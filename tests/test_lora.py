"""rmexp.lora's fused LoRA forward and dequantized-once base compute what peft and bitsandbytes do:
same outputs, gradients, training."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import TrainerCallback

from conftest import compose_cfg, tiny_overrides
from rmexp.lora import cache_dequantized_base, dequantized_bytes, use_fused_lora
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


def test_training_with_fused_lora_and_cached_base_gives_the_same_losses_and_rewards(tmp_path):
    """The tiny nf4 model in fp32, same steps: peft's forward, the fused one, and the fused one on a
    dequantized-once base give identical training, to rounding."""
    runs = {}
    for name, fused, cache in (("peft", "false", "false"), ("fused", "true", "false"), ("cached", "true", "true")):
        out, probe = tmp_path / name, KeepModel()
        main(compose_cfg(*tiny_overrides(out, "logger=none", "trainer.bf16=false", "model.dtype=float32",
                                         "lora.lora_dropout=0", f"trainer.fused_lora={fused}",
                                         f"trainer.dequant_cache={cache}")),
             callbacks=[probe])
        kinds = [type(m).__name__ for m in probe.model.modules()]
        assert any(k.startswith("Fused") for k in kinds) == (fused == "true")
        cached = [m for m in probe.model.modules() if type(m).__name__.startswith("Cached")]
        assert bool(cached) == (cache == "true")
        assert all(m.rmexp_dequantized is not None for m in cached)  # used, not just installed
        metrics = json.loads((out / "metrics.json").read_text())
        scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
        runs[name] = metrics, torch.tensor([[s["reward_chosen"], s["reward_rejected"]] for s in scores])
    peft_m, peft_r = runs.pop("peft")
    assert not torch.allclose(peft_r, torch.zeros_like(peft_r))
    for name, (metrics, rewards) in runs.items():
        assert metrics["train_loss"] == pytest.approx(peft_m["train_loss"], abs=1e-5), name
        assert metrics["eval_loss"] == pytest.approx(peft_m["eval_loss"], abs=1e-5), name
        assert torch.allclose(rewards, peft_r, atol=1e-4), name


def quantized_linear(compute_dtype, nested: bool):
    import bitsandbytes as bnb

    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 48)
    layer = bnb.nn.Linear4bit(64, 48, compute_dtype=compute_dtype, compress_statistics=nested, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False, quant_type="nf4",
                                     compress_statistics=nested)
    layer.bias = torch.nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    return layer.to("cpu")  # quantizes


@pytest.mark.parametrize("compute_dtype,nested,autocast", [
    (torch.float32, True, False), (torch.bfloat16, True, True), (torch.bfloat16, False, False)])
def test_cached_base_multiplies_exactly_as_bitsandbytes(compute_dtype, nested, autocast):
    """Outputs and input gradients of a 4-bit layer are bit-identical with the dequantized weight kept."""
    plain = quantized_linear(compute_dtype, nested)
    cached = copy.deepcopy(plain)
    assert cache_dequantized_base(cached, "true") == 1 and cache_dequantized_base(Projection(), "true") == 0
    with torch.inference_mode():  # first used by an evaluation: the kept weight must still serve training
        cached(torch.zeros(1, 64))
    results = []
    for layer in (plain, cached, cached):
        x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = layer(x)
        out.float().pow(2).sum().backward()
        results.append((out, x.grad))
    assert cached.rmexp_dequantized.dtype == compute_dtype
    for out, grad in results[1:]:
        assert out.dtype == results[0][0].dtype
        assert torch.equal(out, results[0][0]) and torch.equal(grad, results[0][1])


def test_dequant_cache_auto_stays_off_when_the_copy_would_not_fit(monkeypatch):
    import psutil

    layer = quantized_linear(torch.float32, True)
    assert cache_dequantized_base(copy.deepcopy(layer), "false") == 0
    assert cache_dequantized_base(copy.deepcopy(layer), "auto") == 1  # 6 KB fits anywhere
    free = dequantized_bytes(layer) * 4  # the copy would take a quarter of what is free: over the fifth
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("Memory", (), {"available": free})())
    assert cache_dequantized_base(layer, "auto") == 0 and type(layer).__name__ == "Linear4bit"
    with pytest.raises(ValueError, match="dequant_cache"):
        cache_dequantized_base(layer, "yes")
