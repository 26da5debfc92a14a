"""LoRA layers and their frozen 4-bit base, computed with fewer kernels: the same sums as peft's.

1. The LoRA update added inside one matmul, with no casts (`use_fused_lora`, `trainer.fused_lora`).

peft's forward computes `result = base(x).clone(); result = result + lora_B(lora_A(dropout(x))) * scaling`.
On CPU it also casts `x` to the adapter's dtype whenever CUDA autocast is off (it asks
`torch.is_autocast_enabled()`, which means CUDA), so under CPU bf16 autocast every projection copies
its input to fp32 and autocast copies it back. Here the update is `addmm(base(x), lora_A(x), B^T,
alpha=scaling)`: one kernel instead of a clone, a multiply and an add, and no input casts. The same
sum, so losses and rewards are unchanged (tested in fp32); any case it does not cover (dropout,
several or disabled adapters, merged weights, variants such as DoRA, dtype mismatches without
autocast) runs peft's own forward.

2. The frozen 4-bit base dequantized once, not twice a step (`cache_dequantized_base`,
`trainer.dequant_cache`), where the 16-bit copy fits the memory there is.
"""

from __future__ import annotations

import logging

import torch

from rmexp._compat import cpu_inference_packed, lora_is_plain

log = logging.getLogger(__name__)

_FUSED_CLASSES: dict[type, type] = {}


def _fused_class(cls: type) -> type:
    """A subclass of a peft LoRA layer class with the fused forward (a subclass survives deep copies)."""
    if cls not in _FUSED_CLASSES:
        def forward(self, x, *args, **kwargs):
            adapters = self.active_adapters
            name = adapters[0] if len(adapters) == 1 else None
            if (args or kwargs or name is None or self.disable_adapters or name not in self.lora_A
                    or not lora_is_plain(self, name) or self.lora_B[name].bias is not None
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


# ------------------------------------------------------------- the frozen 4-bit base, dequantized once

_CACHED_CLASSES: dict[type, type] = {}


def _cached_class(cls: type) -> type:
    """A subclass of bitsandbytes' Linear4bit (`cls`) whose forward keeps the dequantized weight."""
    if cls in _CACHED_CLASSES.values():
        return cls
    if cls not in _CACHED_CLASSES:
        _CACHED_CLASSES[cls] = type(f"Cached{cls.__name__}", (cls,), {
            "forward": lambda self, x: _cached_forward(self, x, cls.forward), "__module__": __name__})
    return _CACHED_CLASSES[cls]


def _cached_forward(self, x: torch.Tensor, own_forward) -> torch.Tensor:
    """bitsandbytes' Linear4bit forward with the weight dequantized once instead of twice per step.

    bitsandbytes multiplies a 4-bit weight by dequantizing it to the compute dtype and calling
    `linear` (forward), then dequantizing it again for the input gradient (backward). The base is
    frozen, so the dequantized weight never changes: kept here, each step does the same matmuls
    without the two dequantizations. Layouts it does not cover (the CPU inference packing) run
    bitsandbytes' own forward.
    """
    state = self.weight.quant_state
    if cpu_inference_packed(state):
        return own_forward(self, x)
    dtype = self.compute_dtype or x.dtype
    weight = self.rmexp_dequantized
    if weight is None or weight.dtype != dtype or weight.device != x.device:
        import bitsandbytes.functional as bnb_functional

        with torch.inference_mode(False), torch.no_grad():  # a plain tensor, usable by later training steps
            weight = bnb_functional.dequantize_4bit(self.weight.data, state).to(dtype)
        self.rmexp_dequantized = weight
    bias = None if self.bias is None else self.bias.to(dtype)
    return torch.nn.functional.linear(x.to(dtype), weight, bias).to(x.dtype)


def dequantized_bytes(model) -> int:
    """Memory a copy of every 4-bit weight of `model` in its compute dtype (bf16: 2 bytes) would take."""
    from bitsandbytes.nn import Linear4bit

    return sum(torch.empty(0, dtype=m.compute_dtype or torch.float32).element_size() * m.in_features * m.out_features
               for m in model.modules() if isinstance(m, Linear4bit))


def cache_dequantized_base(model, setting="auto", budget: float = 0.2) -> int:
    """`trainer.dequant_cache`: keep each frozen 4-bit weight dequantized after its first use.

    auto turns it on when the copy takes at most `budget` of the memory that is free (RAM on CPU, the
    device's on CUDA): Gemma-3-270M's 0.2 GB on any machine, never an 8B base on a 24 GB GPU, where
    4-bit storage is what makes it fit. Returns how many layers cache (0 when off or no 4-bit layers).
    """
    setting = str(setting).lower()
    if setting not in ("auto", "true", "false"):
        raise ValueError(f"trainer.dequant_cache must be auto, true or false, got {setting!r}")
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # no bitsandbytes, no 4-bit layers
        return 0
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    if not layers or setting == "false":
        return 0
    if setting == "auto":
        needed = dequantized_bytes(model)
        device = layers[0].weight.device
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
        else:
            import psutil

            free = psutil.virtual_memory().available
        if needed > budget * free:
            log.info("trainer.dequant_cache=auto: off (%.1f GB of dequantized weights, %.1f GB free)",
                     needed / 2**30, free / 2**30)
            return 0
        log.info("trainer.dequant_cache=auto: on (%.2f GB of dequantized weights, %.1f GB free)",
                 needed / 2**30, free / 2**30)
    for module in layers:
        module.__class__ = _cached_class(type(module))
        module.rmexp_dequantized = None
    return len(layers)
