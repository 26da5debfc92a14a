"""rmexp.norm's fused RMSNorm gives the model's own outputs and gradients, Gemma and Llama style."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from rmexp.norm import use_fused_rms_norm


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
    assert use_fused_rms_norm(fused) == 1 and use_fused_rms_norm(fused) == 1  # idempotent
    assert type(fused[0]).__name__ == f"Fused{cls.__name__}"
    x0 = (3 * torch.randn(*shape)).to(dtype)
    results = []
    for layer in (norm, fused[0]):
        x = x0.clone().requires_grad_(True)
        out = layer(x)
        (out.float() * torch.linspace(-1, 1, 96)).sum().backward()
        results.append((out, x.grad, layer.weight.grad))
    (out, grad, wgrad), (f_out, f_grad, f_wgrad) = results
    assert f_out.dtype == out.dtype and torch.equal(f_out, out)
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: one rounding step of the output's dtype
    assert torch.allclose(f_grad.float(), grad.float(), atol=tol, rtol=tol)
    assert f_wgrad.dtype == wgrad.dtype == weight_dtype
    wtol = 1e-5 if weight_dtype == torch.float32 else 2e-2
    assert torch.allclose(f_wgrad.float(), wgrad.float(), atol=wtol * wgrad.float().abs().max(), rtol=wtol)


def test_other_norms_are_left_alone():
    model = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.RMSNorm(8))
    assert use_fused_rms_norm(model) == 0
    assert [type(m) for m in model] == [torch.nn.LayerNorm, torch.nn.RMSNorm]


@pytest.mark.parametrize("cls", [Gemma3RMSNorm, LlamaRMSNorm])
def test_fused_rms_norm_backward_stays_fp32_under_autocast(cls):
    torch.manual_seed(0)
    norm = cls(96, eps=1e-6)
    norm.weight.data.normal_()
    fused = torch.nn.Sequential(copy.deepcopy(norm))
    use_fused_rms_norm(fused)
    grads, x0 = [], 3 * torch.randn(2, 7, 96)
    for layer in (norm, fused[0]):
        x = x0.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
            (out.float() * torch.linspace(-1, 1, 96)).sum().backward()  # backward inside autocast
        grads.append(x.grad)
    assert torch.allclose(grads[1], grads[0], atol=1e-6, rtol=1e-6)
