"""rmexp.lora's fused LoRA forward and dequantized-once base compute what peft and bitsandbytes do:
same outputs, gradients, training."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForSequenceClassification, Trainer

from conftest import KeepModel, compose_cfg, tiny_overrides
from numerics import assert_same_decisions, assert_within, rounding_bound, training_bound
from rmexp.lora import dequantized_bytes
from rmexp.prepare import cache_dequantized_base, fuse_lora
from rmexp.train import main
from rmexp.trainer import PairwiseRewardTrainer


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
    assert fuse_lora(fused) == 1 and fuse_lora(fused) == 1 and fuse_lora(Projection()) == 0  # idempotent
    return peft_model, fused


def outputs_and_grads(model, x, seed=0):
    torch.manual_seed(seed)
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.pow(2).sum().backward()
    grads = [x.grad] + [p.grad for p in model.parameters() if p.requires_grad]
    return out, grads


def reference_and_magnitude(model, x):
    """Outputs and gradients of `model` in float64 (the exact ones, to rounding far below fp32's), and of its
    copy on |weights| and |x|: sums without cancellation, the size of the terms every result adds up."""
    reference = copy.deepcopy(model).double()
    magnitude = copy.deepcopy(reference)
    for p in magnitude.parameters():
        p.data.abs_()
    return outputs_and_grads(reference, x.double()), outputs_and_grads(magnitude, x.double().abs())


@pytest.mark.numerics
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_layer_equals_peft_outputs_and_gradients(dropout):
    """No dropout: the fused addmm, within fp32 rounding of the exact (float64) result as peft is; with
    dropout: peft's own forward (same draws, the very same ops: bit for bit)."""
    peft_model, fused = lora_pair(dropout)
    x = torch.randn(2, 5, 16)
    out, grads = outputs_and_grads(peft_model.train(), x)
    fused_out, fused_grads = outputs_and_grads(fused.train(), x)
    if dropout:
        assert torch.equal(out, fused_out) and all(map(torch.equal, grads, fused_grads))
        return
    (ref_out, ref_grads), (mag_out, mag_grads) = reference_and_magnitude(peft_model, x)
    # forward: the 16-term base sum, the rank-4 and the 4-term update sums, one add (k=2, n=16); backward
    # adds a 12-output and a 10-token sum on top of the forward's (n=16+12+10 < 64)
    for got in (out, fused_out):
        assert_within(got, ref_out, rounding_bound(torch.float32, mag_out, 16, k=2), "output")
    for got_grads in (grads, fused_grads):
        for g, r, m in zip(got_grads, ref_grads, mag_grads, strict=True):
            assert_within(g, r, rounding_bound(torch.float32, m, 64, k=2), "gradient")


@pytest.mark.numerics
def test_fused_layer_under_cpu_bf16_autocast_needs_no_input_casts():
    peft_model, fused = lora_pair(0.0)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = peft_model(x), fused(x)
    assert got.dtype == torch.bfloat16
    (ref, _), (mag, _) = reference_and_magnitude(peft_model, x)
    # autocast rounds each weight to bf16 (eps/2 of each product) and each of the three matmuls' outputs
    # (eps/2 of each, the base's and the update's), k=2; a kernel may accumulate in bf16 too: sqrt(16)
    bound = rounding_bound(torch.bfloat16, mag, 16, k=2)
    assert_within(got, ref, bound, "fused")
    assert_within(expected, ref, bound, "peft")


SPEED_KEYS = ("fused_lora", "dequant_cache", "fused_rms_norm", "optim")
PLAIN = ("false", "false", "false", "adamw_torch")  # peft's and transformers' own layers, AdamW's per-tensor loop


def train_tiny(out, values: tuple[str, ...], probe=None, *extra: str) -> tuple[dict, torch.Tensor]:
    """The tiny nf4 model, 8 steps with the speed settings `values` (SPEED_KEYS order), fp32 throughout: the
    4-bit layers' compute dtype too, which `auto` makes bf16 on a CPU with AVX512-BF16 or AMX."""
    settings = [f"trainer.{k}={v}" for k, v in zip(SPEED_KEYS, values, strict=True)]
    main(compose_cfg(*tiny_overrides(out, "logger=none", "trainer.bf16=false", "model.dtype=float32",
                                     "quantization.bnb_4bit_compute_dtype=float32", "lora.lora_dropout=0", *settings,
                                     *extra)),
         callbacks=[probe] if probe else None)
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    return (json.loads((out / "metrics.json").read_text()),
            torch.tensor([[s["reward_chosen"], s["reward_rejected"]] for s in scores]))


def assert_same_training(metrics, rewards, ref_metrics, ref_rewards, what, model):
    """bitsandbytes has no float64 4-bit layers: the plain layers' own fp32 run is the reference, 8 steps."""
    bound = training_bound(model, steps=8, max_length=512)
    assert_within(rewards, ref_rewards, bound, what)
    assert_same_decisions(rewards, ref_rewards, bound, what)
    for loss in ("train_loss", "eval_loss"):  # -log sigmoid(margin) moves by at most the margin's error, 2 bounds
        assert abs(metrics[loss] - ref_metrics[loss]) <= 2 * bound, (what, loss)


@pytest.mark.slow
@pytest.mark.numerics
def test_each_speed_layer_trains_as_the_plain_layers(tmp_path):
    """Same steps, plain SGD (which passes gradients on as they are, where Adam's g / sqrt(v) enlarges
    float rounding wherever a gradient is near zero): the plain layers, then each speed layer in turn,
    then all of them, give the same training to fp32 rounding."""
    variants = {"plain": ("false", "false", "false"), "fused": ("true", "false", "false"),
                "cached": ("true", "true", "false"), "norm": ("false", "false", "true"), "all": ("true", "true", "true")}
    runs = {}
    for name, layers in variants.items():
        probe = KeepModel()
        runs[name] = train_tiny(tmp_path / name, (*layers, "sgd"), probe)
        kinds = [type(m).__name__ for m in probe.model.modules()]
        fused, cache, norm = (v == "true" for v in layers)
        assert any(k.startswith("FusedLinear") for k in kinds) == fused
        assert any(k.startswith("FusedLlamaRMSNorm") for k in kinds) == norm
        cached = [m for m in probe.model.modules() if type(m).__name__.startswith("Cached")]
        assert bool(cached) == cache
        assert all(m.rmexp_dequantized is not None for m in cached)  # used, not just installed
        assert {m.compute_dtype for m in probe.model.modules() if hasattr(m, "compute_dtype")} == {torch.float32}
    plain_m, plain_r = runs.pop("plain")
    assert not torch.allclose(plain_r, torch.zeros_like(plain_r))
    for name, (metrics, rewards) in runs.items():
        assert_same_training(metrics, rewards, plain_m, plain_r, name, probe.model)


@pytest.mark.slow
@pytest.mark.numerics
def test_the_fused_optimizer_takes_the_same_steps(tmp_path):
    """AdamW in one kernel (the default) against its per-tensor loop, on the plain layers. Both see the same
    first gradients; their updates differ by rounding (eps of a step of size lr), which later steps carry
    as SGD's do. (Adam's g / sqrt(v) would turn a gradient at rounding level into a full step of either
    sign; LoRA's A gets an exact 0 while B is still 0, and Adam leaves a 0 gradient's weight alone.)"""
    probe = KeepModel()
    loop_m, loop_r = train_tiny(tmp_path / "loop", PLAIN, probe)
    fused_m, fused_r = train_tiny(tmp_path / "fused", (*PLAIN[:3], "adamw_torch_fused"))
    assert_same_training(fused_m, fused_r, loop_m, loop_r, "adamw_torch_fused", probe.model)


def quantized_linear(compute_dtype, nested: bool):
    import bitsandbytes as bnb

    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 48)
    layer = bnb.nn.Linear4bit(64, 48, compute_dtype=compute_dtype, compress_statistics=nested, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False, quant_type="nf4",
                                     compress_statistics=nested)
    layer.bias = torch.nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    return layer.to("cpu")  # quantizes


@pytest.mark.numerics
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


def test_scoring_keeps_no_dequantized_copy_on_cuda_unless_asked():
    from rmexp.prepare import scoring_dequant_cache

    assert scoring_dequant_cache("auto", torch.device("cuda:0")) == "false"
    assert scoring_dequant_cache("AUTO", "cuda") == "false"
    assert scoring_dequant_cache("true", torch.device("cuda", 1)) == "true"
    assert scoring_dequant_cache("auto", torch.device("cpu")) == "auto"  # the fit decides (rmexp.lora)


def test_flop_count_is_transformers_own_with_parameters_counted_once():
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_labels=1, pad_token_id=0)
    model = get_peft_model(LlamaForSequenceClassification(config),
                           LoraConfig(r=2, target_modules=["q_proj"], task_type="SEQ_CLS"))
    trainer = SimpleNamespace(model=model, _flop_parameters=None)
    inputs = {"input_ids": torch.ones(3, 11, dtype=torch.long)}
    expected = Trainer.floating_point_ops(SimpleNamespace(model=model), inputs)
    assert PairwiseRewardTrainer.floating_point_ops(trainer, inputs) == expected > 0
    assert trainer._flop_parameters == model.num_parameters(exclude_embeddings=True)
    assert PairwiseRewardTrainer.floating_point_ops(trainer, {"other": inputs["input_ids"]}) == 0
