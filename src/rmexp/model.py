"""Model, tokenizer, quantization and LoRA configs: config in, HF objects out, as loaded.

`model.name_or_path` is a hub id, a local HF directory, or `builtin:<name>` (rmexp.builtin).
What rmexp then changes in a loaded model, for training or for scoring, is rmexp.prepare's.
"""

from __future__ import annotations

import logging
import os

import torch

from rmexp._compat import expected_new_head
from rmexp.builtin import resolve_model_path
from rmexp.device import Placement, auto_dtype, place

log = logging.getLogger(__name__)


def compute_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """bf16 where `device` (by default training's: the current CUDA device where there is one, else the CPU)
    computes it natively (CUDA from Ampere on, CPUs with AVX512-BF16 or AMX), else fp32: the rule is
    rmexp.device.native_bf16's. Emulated bf16 (a T4's, a V100's, an AVX2 CPU's) is slower than fp32 there."""
    return auto_dtype(device)


def torch_dtype(name: str, auto: torch.dtype | None = None) -> torch.dtype:
    """A dtype by name; `auto` is `auto` when given (a placement's dtype), else `compute_dtype()`."""
    if name == "auto":
        return compute_dtype() if auto is None else auto
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype {name!r} (try auto, bfloat16, float16, float32)")
    return dtype


# ---------------------------------------------------------------- config -> HF objects


def quant_storage_dtype(q, auto: torch.dtype | None = None) -> torch.dtype:
    """`quantization.bnb_4bit_quant_storage` as a dtype; `auto` is the compute dtype.

    The packed 4-bit codes take the same bytes in any of these (two a uint8, four a bfloat16); what
    changes is the dtype FSDP sees: it flattens each wrapped block's parameters into one tensor of one
    dtype, so under FSDP the storage must be the dtype of the weights left unquantized (`model.dtype`).
    """
    name = str(q.bnb_4bit_quant_storage)
    return torch_dtype(q.bnb_4bit_compute_dtype, auto) if name == "auto" else getattr(torch, name)


def build_bnb_config(q, auto: torch.dtype | None = None):
    """The `quantization` group as a BitsAndBytesConfig, or None for an unquantized base; `auto` what a dtype of
    `auto` is (a placement's dtype; by default `compute_dtype()`)."""
    from transformers import BitsAndBytesConfig

    if q.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    if not q.load_in_4bit:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.bnb_4bit_quant_type.value,
        bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=torch_dtype(q.bnb_4bit_compute_dtype, auto),
        bnb_4bit_quant_storage=quant_storage_dtype(q, auto),
    )


def build_lora_config(cfg):
    """The `lora` group as a peft LoraConfig for sequence classification."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules), bias=cfg.bias,
        modules_to_save=list(cfg.modules_to_save) or None, task_type="SEQ_CLS",
    )


def fsdp_launched() -> bool:
    """Whether this process was started for FSDP: `accelerate launch` with an FSDP config file (such as
    conf/accelerate/fsdp_qlora.yaml) exports ACCELERATE_USE_FSDP=true before the model loads."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def device_map_for(bnb_config, fsdp: bool | None = None, cuda: bool | None = None) -> dict | None:
    """Where from_pretrained puts the weights.

    DDP (torchrun, accelerate launch without FSDP): every rank holds the whole quantized model on its own
    GPU, `{"": LOCAL_RANK}`. FSDP (`fsdp`, by default `fsdp_launched()`): None, FSDP places and shards the
    weights when the trainer wraps the model. On CPU (`cuda`, by default whether CUDA is there), or
    unquantized, None: Trainer places them.
    """
    fsdp = fsdp_launched() if fsdp is None else fsdp
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if fsdp or bnb_config is None or not cuda:
        return None
    return {"": local_rank()}


def from_pretrained_kwargs(model_cfg, quant_cfg, fsdp: bool | None = None, placement: Placement | None = None) -> dict:
    """The keyword arguments `load_reward_model` gives `from_pretrained` (everything but the path).

    For training (`placement` None) the weights go where `device_map_for` says. For scoring (a
    `rmexp.device.Placement`) they load onto its device, and a dtype of `auto` is its dtype (bf16 where that
    device computes it natively, else fp32); FSDP does not apply.
    Under FSDP (`fsdp`, by default `fsdp_launched()`) a 4-bit base must store its codes in the dtype of its
    unquantized weights, or FSDP cannot flatten a decoder layer's norms and 4-bit weights together: checked
    here, before anything loads.
    """
    fsdp = False if placement is not None else fsdp_launched() if fsdp is None else fsdp
    auto = placement.dtype if placement is not None else None
    bnb = build_bnb_config(quant_cfg, auto)
    dtype = torch_dtype(model_cfg.dtype, auto)
    if fsdp and bnb is not None and bnb.load_in_4bit and bnb.bnb_4bit_quant_storage != dtype:
        raise ValueError(
            f"FSDP needs quantization.bnb_4bit_quant_storage ({bnb.bnb_4bit_quant_storage}) equal to model.dtype "
            f"({dtype}): FSDP flattens each layer's parameters into one tensor of one dtype (experiment=fsdp_qlora_70b "
            "sets both to bfloat16)")
    if fsdp and bnb is not None and bnb.load_in_8bit:
        raise ValueError("FSDP shards 4-bit bitsandbytes weights stored as floats, not LLM.int8(): use quantization=nf4")
    kwargs = dict(num_labels=1, dtype=dtype, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code,
                  quantization_config=bnb, use_safetensors=True,
                  device_map=device_map_for(bnb, fsdp) if placement is None else placement.device_map)
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    return kwargs


# ---------------------------------------------------------------- the reward head


def base_model(model):
    """The transformers model under any peft wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder(model):
    """The decoder inside a sequence-classification model (`model.model` in decoder LMs), or None."""
    base = base_model(model)
    return getattr(base, getattr(base, "base_model_prefix", "model"), None)


def reward_head(model):
    """The sequence-classification head (`score`, or `classifier`) under any peft wrapper."""
    base = base_model(model)
    return base.score if hasattr(base, "score") else base.classifier


def final_norm(model):
    """The norm that produces the hidden states the head reads (`model.norm` in decoder LMs), or None."""
    inner = decoder(model)
    return next((getattr(inner, name) for name in ("norm", "final_layernorm", "ln_f") if hasattr(inner, name)), None)


def decoder_layers(model) -> list:
    """The decoder's repeated blocks (`model.layers` in decoder LMs, `h` in GPT-2's family), or [] where there are none."""
    inner = decoder(model)
    return list(next((getattr(inner, name) for name in ("layers", "h") if hasattr(inner, name)), []))


def load_tokenizer(path: str, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:  # Llama has none: pad with eos (the seed recipe)
        tok.pad_token = tok.eos_token
    return tok


def load_reward_model(model_cfg, quant_cfg, tokenizer=None, device: str | Placement | None = None):
    """AutoModelForSequenceClassification(num_labels=1), quantized per config, and its tokenizer (`tokenizer`,
    when the caller loaded it already). `device` None: for training (placed as `device_map_for` says); a
    device name (auto, cpu, cuda, cuda:N; `rmexp.device.place` decides and logs) or a Placement: for
    scoring or export, loaded onto that device in the dtype it computes natively."""
    from transformers import AutoModelForSequenceClassification

    placement = place(device) if isinstance(device, str) else device
    fsdp = fsdp_launched() if placement is None else False
    kwargs = from_pretrained_kwargs(model_cfg, quant_cfg, fsdp, placement)
    path = resolve_model_path(model_cfg.name_or_path, model_cfg.cache_dir)
    tok = tokenizer or load_tokenizer(path, model_cfg.revision, model_cfg.trust_remote_code)
    if fsdp and kwargs["quantization_config"] is not None and torch.cuda.is_available():
        # With no device_map, transformers' bitsandbytes loader quantizes on the *current* CUDA device, and
        # nothing has set it yet (the trainer's arguments are built after the model): every rank would put
        # its copy on GPU 0. Make it this rank's GPU, as accelerate does later anyway.
        torch.cuda.set_device(local_rank())
    with expected_new_head():
        model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    model.config.pad_token_id = tok.pad_token_id
    return model, tok, path
