"""peft LoRA layers with a leaner forward: the update added inside one matmul, no casts.

peft's forward computes `result = base(x).clone(); result = result + lora_B(lora_A(dropout(x))) * scaling`.
On CPU it also casts `x` to the adapter's dtype whenever CUDA autocast is off (it asks
`torch.is_autocast_enabled()`, which means CUDA), so under CPU bf16 autocast every projection copies
its input to fp32 and autocast copies it back. Here the update is `addmm(base(x), lora_A(x), B^T,
alpha=scaling)`: one kernel instead of a clone, a multiply and an add, and no input casts. The same
sum, so losses and rewards are unchanged (tested in fp32); any case it does not cover (dropout,
several or disabled adapters, merged weights, variants such as DoRA, dtype mismatches without
autocast) runs peft's own forward.
"""

from __future__ import annotations

import torch

_FUSED_CLASSES: dict[type, type] = {}


def _fused_class(cls: type) -> type:
    """A subclass of a peft LoRA layer class with the fused forward (a subclass survives deep copies)."""
    if cls not in _FUSED_CLASSES:
        def forward(self, x, *args, **kwargs):
            adapters = self.active_adapters
            name = adapters[0] if len(adapters) == 1 else None
            if (args or kwargs or name is None or self.disable_adapters or self.merged
                    or name not in self.lora_A or name in self.lora_variant or self.lora_B[name].bias is not None
                    or not isinstance(self.lora_dropout[name], torch.nn.Identity)
                    or (x.dtype != self.lora_A[name].weight.dtype
                        and not torch.is_autocast_enabled(x.device.type))):
                return cls.forward(self, x, *args, **kwargs)
            result = self.base_layer(x)
            update = self.lora_A[name](x)
            out = torch.addmm(result.reshape(-1, result.shape[-1]), update.reshape(-1, update.shape[-1]),
                              self.lora_B[name].weight.t(), alpha=self.scaling[name])
            return out.view(result.shape)

        _FUSED_CLASSES[cls] = type(f"Fused{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})
    return _FUSED_CLASSES[cls]


def use_fused_lora(model) -> int:
    """Give every peft LoRA Linear layer (plain or 4-bit) of `model` the fused forward; returns how many."""
    from peft.tuners.lora import Linear as LoraLinear

    classes = [LoraLinear]
    try:
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

        classes.append(LoraLinear4bit)
    except ImportError:  # bitsandbytes absent
        pass
    n = 0
    for module in model.modules():
        if type(module) in classes:
            module.__class__ = _fused_class(type(module))
            n += 1
    return n
