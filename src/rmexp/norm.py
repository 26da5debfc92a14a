"""RMSNorm layers computed by torch's fused `rms_norm` kernel instead of five elementwise ops.

transformers writes RMSNorm as `x * rsqrt(x.pow(2).mean(-1) + eps)` in fp32, then a weight
multiply: five kernels and their saved tensors, forward and backward, for each of a layer's norms
(Gemma 3 has six a layer). `torch.nn.functional.rms_norm` computes the same normalization in one
kernel. The weight is applied as each model family does it (Gemma: `x * (1 + w)` in fp32, then cast;
Llama, Mistral, Qwen: cast, then `w * x`), so outputs are those of the model's own class (tested to
equality in fp32 and bf16). `trainer.fused_rms_norm`.
"""

from __future__ import annotations

import torch

# transformers' RMSNorm classes and how each applies its weight
GEMMA_STYLE = ("GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm")
LLAMA_STYLE = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


def _gemma_forward(self, x: torch.Tensor) -> torch.Tensor:
    out = torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
    return (out * (1.0 + self.weight.float())).type_as(x)


def _llama_forward(self, x: torch.Tensor) -> torch.Tensor:
    out = torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=self.variance_epsilon)
    return self.weight * out.to(x.dtype)


_FUSED: dict[type, type] = {}


def use_fused_rms_norm(model) -> int:
    """Give each RMSNorm of a known transformers class the fused forward; returns how many."""
    n = 0
    for module in model.modules():
        cls = type(module)
        if cls in _FUSED.values():
            n += 1
            continue
        name = cls.__name__
        if name not in GEMMA_STYLE + LLAMA_STYLE:
            continue
        if cls not in _FUSED:
            forward = _gemma_forward if name in GEMMA_STYLE else _llama_forward
            _FUSED[cls] = type(f"Fused{name}", (cls,), {"forward": forward, "__module__": __name__})
        module.__class__ = _FUSED[cls]
        n += 1
    return n
