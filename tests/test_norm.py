"""rmexp.norm's fused RMSNorm gives the model's own outputs and gradients, Gemma and Llama style."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from numerics import assert_within, rounding_bound
from rmexp.prepare import fuse_rms_norms

G = torch.linspace(-1, 1, 96)  # the upstream gradient of every test here


def exact_grads(cls, x0: torch.Tensor, weight: torch.Tensor, eps: float, g: torch.Tensor):
    """The norm's input and weight gradients in float64 (the exact ones, to rounding far below fp32's), and the
    size of the terms each sums: |dx| <= rstd * (|g'| + |x_hat| * mean(|g' x_hat|)), |dw| <= sum |g x_hat|."""
    x, w = x0.double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    x_hat, scale = x * rstd, (1 + w if cls is Gemma3RMSNorm else w)
    (x_hat * scale * g.double()).sum().backward()
    g_w, x_hat = (g.double() * scale).abs(), x_hat.detach().abs()
    dx_size = rstd.detach() * (g_w + x_hat * (g_w * x_hat).mean(-1, keepdim=True))
    dw_size = (g.double().abs() * x_hat).reshape(-1, 96).sum(0)
    return x.grad, w.grad, dx_size, dw_size


@pytest.mark.numerics
@pytest.mark.parametrize("cls", [Gemma3RMSNorm, LlamaRMSNorm])
@pytest.mark.parametrize("dtype,weight_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("shape", [(2, 7, 96), (2, 7, 3, 96)])  # hidden states; q/k heads (Gemma's q_norm)
def test_fused_rms_norm_equals_the_model_class(cls, dtype, weight_dtype, shape):
    torch.manual_seed(0)
    norm = cls(96, eps=1e-6)
    norm.weight.data.normal_()
    norm.to(weight_dtype)
    fused = torch.nn.Sequential(copy.deepcopy(norm))
    assert fuse_rms_norms(fused) == 1 and fuse_rms_norms(fused) == 1  # idempotent
    assert type(fused[0]).__name__ == f"Fused{cls.__name__}"
    x0 = (3 * torch.randn(*shape)).to(dtype)
    results = []
    for layer in (norm, fused[0]):
        x = x0.clone().requires_grad_(True)
        out = layer(x)
        (out.float() * G).sum().backward()
        results.append((out, x.grad, layer.weight.grad))
    (out, grad, wgrad), (f_out, f_grad, f_wgrad) = results
    assert f_out.dtype == out.dtype and torch.equal(f_out, out)  # the very same forward ops
    assert f_wgrad.dtype == wgrad.dtype == weight_dtype
    # both backwards against the exact one, for the gradient that reaches the norm (G in the output's dtype).
    # The sums run in fp32 whatever the dtype (the norm upcasts; ATen reduces bf16 in fp32): g * w, x_hat, the
    # 96-term dot (fp32, n=96, k=4); in bf16 only elementwise roundings, no sums: g * w and the cast of the
    # result (k=2). The weight's gradient sums 14 or 42 tokens' products in fp32 (n=42), each product of
    # x_hat rounded to bf16 and g, and the result cast (k=3 in bf16)
    ref_grad, ref_wgrad, dx_size, dw_size = exact_grads(cls, x0, norm.weight, 1e-6, G.to(out.dtype))
    dx_bound = rounding_bound(torch.float32, dx_size, 96, k=4) + (dtype != torch.float32) * rounding_bound(dtype, dx_size, 1, k=2)
    low = dtype != torch.float32 or weight_dtype != torch.float32
    dw_bound = rounding_bound(torch.float32, dw_size, 42, k=4) + low * rounding_bound(torch.bfloat16, dw_size, 1, k=3)
    for name, g, w in (("model class", grad, wgrad), ("fused", f_grad, f_wgrad)):
        assert_within(g, ref_grad, dx_bound, f"{name}: input gradient")
        assert_within(w, ref_wgrad, dw_bound, f"{name}: weight gradient")


def test_other_norms_are_left_alone():
    model = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.RMSNorm(8))
    assert fuse_rms_norms(model) == 0
    assert [type(m) for m in model] == [torch.nn.LayerNorm, torch.nn.RMSNorm]


@pytest.mark.numerics
@pytest.mark.parametrize("cls", [Gemma3RMSNorm, LlamaRMSNorm])
def test_fused_rms_norm_backward_stays_fp32_under_autocast(cls):
    """Within fp32's bound of the exact gradient, the model class's and the fused one: a backward in bf16
    would be 2^16 times further off."""
    torch.manual_seed(0)
    norm = cls(96, eps=1e-6)
    norm.weight.data.normal_()
    fused = torch.nn.Sequential(copy.deepcopy(norm))
    fuse_rms_norms(fused)
    x0 = 3 * torch.randn(2, 7, 96)
    ref_grad, _, dx_size, _ = exact_grads(cls, x0, norm.weight, 1e-6, G)
    for layer in (norm, fused[0]):
        x = x0.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
            (out.float() * G).sum().backward()  # backward inside autocast
        assert_within(x.grad, ref_grad, rounding_bound(torch.float32, dx_size, 96, k=4), type(layer).__name__)
