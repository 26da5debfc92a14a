"""Every change rmexp makes to a loaded model, one function per use: `for_training` and `for_scoring`.

A layer gets a faster or more exact forward by a class swap (`swap_class`): its class becomes a subclass with
that forward, derived once per class. A subclass, not a patched method, survives the deep copies peft makes
(`modules_to_save`); and one rule makes every swap idempotent: a module whose class the same maker derived
keeps it. The forwards themselves are rmexp.lora's, rmexp.norm's and rmexp.packing's; here is where and when
each one runs.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rmexp import compilation, flex, lora, norm
from rmexp._compat import attn_implementation, undo_cpu_inference_packing
from rmexp.config import Batching
from rmexp.device import training_device
from rmexp.fsdp import fsdp_speed_options, prepare_for_fsdp
from rmexp.model import decoder_layers, final_norm, reward_head
from rmexp.packing import PACKED_ATTENTION, can_pack, register_packed_attention

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- the class swap

_DERIVED: dict[tuple[Callable, type], type | None] = {}  # (maker, class) -> its subclass, None where not covered
_MAKER: dict[type, Callable] = {}  # derived subclass -> the maker that derived it


def swap_class(module: torch.nn.Module, make_class: Callable[[type], type | None]) -> bool:
    """Give `module` the subclass `make_class` derives from its class (derived once per class); a module whose
    class `make_class` derived already keeps it. Returns whether `module` now has such a class: False where
    `make_class` covers no class of its kind (returns None)."""
    cls = type(module)
    if _MAKER.get(cls) is make_class:
        return True
    if (make_class, cls) not in _DERIVED:
        derived = make_class(cls)
        _DERIVED[make_class, cls] = derived
        if derived is not None:
            _MAKER[derived] = make_class
    derived = _DERIVED[make_class, cls]
    if derived is None:
        return False
    module.__class__ = derived
    return True


def swap_classes(model: torch.nn.Module, make_class: Callable[[type], type | None]) -> int:
    """`swap_class` on every module of `model`; returns how many have the derived class."""
    return sum(swap_class(module, make_class) for module in list(model.modules()))


def subclass(prefix: str, cls: type, forward) -> type:
    return type(f"{prefix}{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})


def fp32_class(cls: type) -> type:
    """`cls` with its input taken in fp32 and autocast off: whatever dtype a trainer cast a Linear's weights to,
    its output is fp32."""
    own_forward = cls.forward

    def forward(self, x, *args, **kwargs):
        with torch.autocast(device_type=x.device.type, enabled=False):
            if isinstance(self, torch.nn.Linear):
                bias = None if self.bias is None else self.bias.float()
                return torch.nn.functional.linear(x.float(), self.weight.float(), bias)
            return own_forward(self, x.float(), *args, **kwargs)

    return subclass("FP32", cls, forward)


def fused_lora_class(cls: type) -> type | None:
    """A peft LoRA Linear layer class (plain or 4-bit) with the update added inside one matmul (rmexp.lora)."""
    return subclass("Fused", cls, lora.fused_forward(cls.forward)) if cls in lora.lora_layer_classes() else None


def cached_class(cls: type) -> type | None:
    """A bitsandbytes Linear4bit class that keeps its weight dequantized after its first use (rmexp.lora)."""
    from bitsandbytes.nn import Linear4bit

    return subclass("Cached", cls, lora.cached_forward(cls.forward)) if issubclass(cls, Linear4bit) else None


def fused_norm_class(cls: type) -> type | None:
    """A transformers RMSNorm class of a known family with the closed-form backward (rmexp.norm)."""
    forward = norm.fused_forward(cls)
    return subclass("Fused", cls, forward) if forward is not None else None


def compiled_class(cls: type) -> type:
    """A decoder layer class whose training forward is compiled, one compiled function for every layer of the
    class (rmexp.compilation)."""
    return subclass("Compiled", cls, compilation.compiled_forward(cls.forward))


# ---------------------------------------------------------------- each change


def upcast_reward_head(model):
    """Rewards from an fp32 head on fp32 hidden states, whatever the base's dtype and autocast.

    bf16 rewards have 8 significant bits: at |r| ~ 6 they step by 1/32, so close pairs tie (a tie
    counts as wrong). The final norm and the head are small; running them in fp32 costs nothing.
    Under a peft wrapper the head's copies (`original_module`, `modules_to_save`) are the modules changed.
    """
    for module in (final_norm(model), reward_head(model)):
        if module is None:
            continue
        copies = getattr(module, "modules_to_save", None)
        for target in ([module.original_module, *copies.values()] if copies is not None else [module]):
            swap_class(target, fp32_class)
    reward_head(model).float()
    return model


def use_packed_attention(model, kernel: str = PACKED_ATTENTION, why: str | None = None) -> None:
    """Switch an SDPA model (or one on the other packed kernel) to the packed kernel `kernel`: PACKED_ATTENTION
    (`rmexp.packing.packed_sdpa`, the segment walk) or PACKED_FLEX_ATTENTION (`rmexp.flex.packed_flex`); either
    runs plain SDPA for any batch that is not packed. `why` (rmexp.flex.kernel_for's) is logged at the switch."""
    if attn_implementation(model) != kernel:
        register_packed_attention()
        model.set_attn_implementation(kernel)
        if why:
            log.info("packed attention %s (%s)", kernel, why)


def keep_4bit_layers_trainable(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 converts a Linear4bit's weight to a CPU layout at
    its first eval-mode forward and from then on multiplies with `gemv_4bit`, which has no autograd
    kernel: training after an evaluation would silently drop the gradient through every frozen base
    layer. Training keeps the plain layout (and undoes a conversion already made). Returns how many
    layers were touched.
    """
    from bitsandbytes.nn import Linear4bit

    n = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            undo_cpu_inference_packing(module)
            n += 1
    return n


def fuse_lora(model) -> int:
    """Give every peft LoRA Linear layer (plain or 4-bit) of `model` the fused forward; returns how many have it."""
    return swap_classes(model, fused_lora_class)


def fuse_rms_norms(model) -> int:
    """Give each RMSNorm of a known transformers class the fused forward; returns how many have it."""
    return swap_classes(model, fused_norm_class)


def cache_dequantized_base(model, setting="auto") -> int:
    """`trainer.dequant_cache` (auto, true, false; rmexp.lora.dequant_cache_fits): keep each frozen 4-bit weight
    dequantized after its first use. Returns how many layers cache (0 when off or no 4-bit layers)."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # no bitsandbytes, no 4-bit layers
        layers = []
    else:
        layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    if layers and all(_MAKER.get(type(m)) is cached_class for m in layers):
        return len(layers)  # decided already (a model for_scoring prepares before and after its adapter loads)
    if not lora.dequant_cache_fits(model, layers, setting):
        return 0
    for module in layers:
        if swap_class(module, cached_class) and not hasattr(module, "rmexp_dequantized"):
            module.rmexp_dequantized = None
    return len(layers)


def compile_layers(model) -> None:
    """Give every decoder layer of `model` the compiled training forward."""
    for layer in decoder_layers(model):
        swap_class(layer, compiled_class)


def compiled_layers(model) -> list:
    """The decoder layers of `model` with the compiled training forward (rmexp.compilation warms them up)."""
    return [layer for layer in decoder_layers(model) if _MAKER.get(type(layer)) is compiled_class]


def keep_trainable_params_fp32(model) -> None:
    """TRL casts the trainable parameters of a quantized base to bf16. Keep them in fp32, as mixed
    precision keeps its master weights: compute stays bf16 under autocast, but an update smaller
    than bf16's step (2^-8 of the weight) is no longer rounded away, and the head gives fp32 rewards."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


# ---------------------------------------------------------------- the uses


@dataclass(frozen=True)
class TrainingOptions:
    """The `trainer` keys that decide what `for_training` changes, under their config names."""

    packed: bool = False  # trainer.batching=packed
    fused_lora: bool = False
    dequant_cache: str = "false"
    fused_rms_norm: bool = False
    compile: str = "false"
    attention: str = "auto"  # trainer.attention: the packed kernel (rmexp.flex)

    @classmethod
    def of(cls, trainer_cfg) -> TrainingOptions:
        if isinstance(trainer_cfg, TrainingOptions):
            return trainer_cfg
        return cls(packed=trainer_cfg.batching is Batching.packed, fused_lora=bool(trainer_cfg.fused_lora),
                   dequant_cache=str(trainer_cfg.dequant_cache), fused_rms_norm=bool(trainer_cfg.fused_rms_norm),
                   compile=str(trainer_cfg.compile), attention=_attention(trainer_cfg))


def _attention(trainer_cfg) -> str:
    """trainer.attention, `auto` where a config built by hand left it out."""
    value = str(getattr(trainer_cfg, "attention", "auto"))
    return "auto" if value == "???" else value


OPTIONS_ATTRIBUTE = "rmexp_training_options"  # what the first step decided, for the second


def is_peft_model(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def allowed(options: TrainingOptions, fsdp: bool) -> TrainingOptions:
    """`options` as FSDP can take them (rmexp.fsdp.fsdp_speed_options, which warns about what it turns off)."""
    if not fsdp:
        return options
    fused_lora, dequant_cache = fsdp_speed_options(options.fused_lora, options.dequant_cache)
    return dataclasses.replace(options, fused_lora=fused_lora, dequant_cache=dequant_cache)


def for_training(model, options=None, fsdp: bool = False, accelerator=None, planned_steps: int | None = None,
                 batch: int = 1):
    """Every change training makes to a loaded model, in the two steps TRL's peft wrapping separates; each is
    idempotent, so a second call changes nothing.

    Before the wrapping (a transformers model; rmexp.recipe): rewards from an fp32 head (before peft copies the
    head), 4-bit layers kept trainable, the packed attention kernel and the fused RMSNorm as `options` (a
    TrainerConfig or TrainingOptions) ask; the options are kept on the model. After it (the peft model;
    PairwiseRewardTrainer, which knows whether it shards): the dequantized base and the fused LoRA layers
    (which exist only from then on) as the options ask and FSDP allows (rmexp.fsdp); the decoder layers'
    compiled training forward as `trainer.compile` decides for a run of `planned_steps` at `batch` pairs a
    device (rmexp.compilation);
    the trainable parameters back in fp32 after TRL's bf16 cast; and with `fsdp`, what FSDP needs before
    anything wraps the model (`accelerator`'s plugin).
    """
    if not is_peft_model(model):
        options = TrainingOptions.of(options) if options is not None else TrainingOptions()
        upcast_reward_head(model)
        keep_4bit_layers_trainable(model)
        if options.packed and can_pack(model):  # else rmexp.packing.build_collator says why it cannot pack
            use_packed_attention(model, *flex.kernel_for(options.attention, training_device(), model.config))
        if options.fused_rms_norm:
            fuse_rms_norms(model)
        setattr(model, OPTIONS_ATTRIBUTE, options)
        return model
    # decided here, where the trainer knows whether it shards (trainer.extra.fsdp too): FSDP cannot take either
    options = allowed(getattr(model, OPTIONS_ATTRIBUTE, None) or TrainingOptions(), fsdp)
    cache_dequantized_base(model, options.dequant_cache)  # peft keeps each Linear4bit as its layer's base_layer
    if options.fused_lora:
        fuse_lora(model)
    device, layers = next(model.parameters()).device, bool(decoder_layers(model))
    if compiled_layers(model) or compilation.should_compile(options.compile, planned_steps, device, fsdp, layers,
                                                            batch if options.packed else None):
        compile_layers(model)
    keep_trainable_params_fp32(model)
    if fsdp:
        prepare_for_fsdp(model, accelerator)
    return model


def for_scoring(model, packed: bool = True, attention: str = "auto", dequant_cache: str = "auto"):
    """Every change scoring makes to a loaded model: rewards from an fp32 head on fp32 hidden states and, with
    `packed`, the packed attention kernel wherever the model's attention can take it (else the padded forward
    scores): `attention` (auto, sdpa_segments, flex) picks it as trainer.attention does, for the device the model
    is on. The 4-bit base multiplies as in training: bitsandbytes' plain layout (its CPU inference kernel, which
    it would switch to here on AVX512-BF16, rounds even an fp32 model's matmuls to bf16), dequantized once where
    the copy fits (`dequant_cache`, as trainer.dequant_cache, `auto` off on CUDA; 2.9x the pairs/s on a 2-core
    Intel Xeon with AMX).
    On a base whose saved adapter is still to load, before it loads: the adapter's fp32 head weights must land in
    fp32 modules."""
    upcast_reward_head(model)
    if packed and can_pack(model):
        device = next(model.parameters()).device
        use_packed_attention(model, *flex.kernel_for(attention, device, model.config, key="attention"))
    keep_4bit_layers_trainable(model)
    cache_dequantized_base(model, scoring_dequant_cache(dequant_cache, next(model.parameters()).device))
    return model


def scoring_dequant_cache(setting: str, device) -> str:
    """`dequant_cache` as scoring applies it on `device`: `auto` is off on CUDA, where a scorer often shares the GPU
    with a policy that allocates after the scorer loads (the fit is judged at load time); anything else as given."""
    return "false" if str(setting).lower() == "auto" and torch.device(device).type == "cuda" else setting
