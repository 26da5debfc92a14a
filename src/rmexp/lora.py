"""LoRA layers and their frozen 4-bit base, computed with fewer kernels: the same sums as peft's.

1. The LoRA update added inside one matmul, with no casts (`fused_forward`, `trainer.fused_lora`).

peft's forward computes `result = base(x).clone(); result = result + lora_B(lora_A(dropout(x))) * scaling`.
On CPU it also casts `x` to the adapter's dtype whenever CUDA autocast is off (it asks
`torch.is_autocast_enabled()`, which means CUDA), so under CPU bf16 autocast every projection copies
its input to fp32 and autocast copies it back. Here the update is `addmm(base(x), lora_A(x), B^T,
alpha=scaling)`: one kernel instead of a clone, a multiply and an add, and no input casts. The same
sum, so losses and rewards are unchanged (tested in fp32); any case it does not cover (dropout,
several or disabled adapters, merged weights, variants such as DoRA, dtype mismatches without
autocast) runs peft's own forward.

2. The frozen 4-bit base dequantized once, not twice a step (`cached_forward`,
`trainer.dequant_cache`), where the 16-bit copy fits the memory there is.

rmexp.prepare decides where each runs and gives the layers these forwards.
"""

from __future__ import annotations

import logging

import torch

from rmexp._compat import cpu_inference_packed, lora_is_plain
from rmexp.config import Switch, switch

log = logging.getLogger(__name__)


def fused_forward(own_forward):
    """The forward of a peft LoRA layer class whose own is `own_forward`, with the update added inside one
    matmul wherever that is the same sum; anywhere else `own_forward` runs."""
    def forward(self, x, *args, **kwargs):
        adapters = self.active_adapters
        name = adapters[0] if len(adapters) == 1 else None
        if (args or kwargs or name is None or self.disable_adapters or name not in self.lora_A
                or not lora_is_plain(self, name) or self.lora_B[name].bias is not None
                or not isinstance(self.lora_dropout[name], torch.nn.Identity)
                or (x.dtype != self.lora_A[name].weight.dtype
                    and not torch.is_autocast_enabled(x.device.type))):
            return own_forward(self, x, *args, **kwargs)
        result = self.base_layer(x)
        update = self.lora_A[name](x)
        out = torch.addmm(result.reshape(-1, result.shape[-1]), update.reshape(-1, update.shape[-1]),
                          self.lora_B[name].weight.t(), alpha=self.scaling[name])
        return out.view(result.shape)

    return forward


def lora_layer_classes() -> tuple[type, ...]:
    """peft's LoRA Linear layer classes the fused forward covers: plain and 4-bit."""
    from peft.tuners.lora import Linear as LoraLinear

    try:
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    except ImportError:  # bitsandbytes absent
        return (LoraLinear,)
    return LoraLinear, LoraLinear4bit


# ------------------------------------------------------------- the frozen 4-bit base, dequantized once


def cached_forward(own_forward):
    """The forward of a bitsandbytes Linear4bit class whose own is `own_forward`, keeping the dequantized weight."""
    return lambda self, x: _cached_forward(self, x, own_forward)


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


def dequant_cache_fits(model, layers, setting="auto", budget: float = 0.2) -> bool:
    """`trainer.dequant_cache` for the 4-bit `layers` of `model`: true, false, or auto, on when the copy takes at
    most `budget` of the memory that is free (RAM on CPU, the device's on CUDA): Gemma-3-270M's 0.2 GB on any
    machine, never an 8B base on a 24 GB GPU, where 4-bit storage is what makes it fit."""
    setting = switch(setting, "trainer.dequant_cache")
    if not layers or setting is not Switch.auto:
        return bool(layers) and setting is Switch.true
    needed = dequantized_bytes(model)
    device = layers[0].weight.device
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
    if needed > budget * free:
        log.info("dequant_cache=auto: the 4-bit base dequantized at each use (a copy would take %.1f GB, %.1f GB "
                 "free)", needed / 2**30, free / 2**30)
        return False
    log.info("dequant_cache=auto: the 4-bit base kept dequantized (%.2f GB, %.1f GB free)",
             needed / 2**30, free / 2**30)
    return True
