"""Export a run as a standalone HF model: `rmexp-export checkpoint=<run dir> output_dir=<dir>`.

The LoRA adapter is merged into the de-quantized base (the very weights it was trained against),
with the trained score head, saved as safetensors in `dtype` (bf16 by default) with the tokenizer.
`AutoModelForSequenceClassification.from_pretrained(output_dir)` loads it (num_labels=1); its
config records, under `rmexp`, the reward mean/std of the run's evaluation and its max_length.

One tensor at a time: the base loads 4-bit, as training had it, its checkpoint read tensor by tensor
(load_base); each weight is then de-quantized, merged with its LoRA update in fp32, cast to `dtype` and
written (merged_tensors, write_shards), and what it was made from is freed. The export holds the 4-bit base
and one layer, never the merged model (docs/performance.md, "Export memory").
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig

from rmexp import console
from rmexp.config import CONF_PATH, ExportConfig, to_typed
from rmexp.rundir import locate

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# The largest safetensors file written (HF's long-time default). A file is written one tensor at a time, so
# what an export holds is the base as loaded (4-bit codes, unquantized weights) and one layer in fp32.
SHARD_BYTES = 5_000_000_000
CHUNK_BYTES = 16 << 20  # how much of a checkpoint tensor is read (and cast) at a time
# safetensors' names for torch's dtypes (its format's spec), and the floating ones' sizes
SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "bfloat16": "BF16", "float16": "F16", "int64": "I64",
                      "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
FLOAT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


# ---------------------------------------------------------------- the base, read a tensor at a time


def _malloc_trim() -> None:
    """Hand the C heap's free pages back to the system (glibc's `malloc_trim`; a no-op elsewhere).

    glibc serves blocks under its mmap threshold from its heaps, and once a large block is freed that
    threshold rises to 32 MB: from then on a layer's few-MB temporaries (a weight read, quantized,
    de-quantized, merged) come from the heaps, and freed heap memory stays resident wherever a live
    block sits above it. Measured on Gemma-3-270M, without trimming the load's resident memory grew by
    4 to 40 MB a layer from one run to the next; trimmed before each tensor, by 4 MB a layer, every run."""
    global _libc_trim
    if _libc_trim is None:
        import ctypes

        try:
            _libc_trim = ctypes.CDLL(None).malloc_trim
        except (AttributeError, OSError):
            _libc_trim = False
    if _libc_trim:
        _libc_trim(0)


_libc_trim = None


class CheckpointTensor:
    """A tensor of the base checkpoint, read when transformers' loader materializes it (`t[...]`, as it reads a
    safetensors slice): in row chunks of CHUNK_BYTES, each through a memory map of its own that is closed at
    once, so no page of the file stays resident, and cast to `dtype` (the dtype the loader casts it to) as
    each chunk arrives, so no tensor is ever whole in the file's wider dtype (the builtin Gemma's fp32
    embedding is 0.67 GB, 0.34 GB in bf16). A chunk is cast element by element as the whole tensor would be.
    `dtype` None, integer tensors, tensors in `dtype` already, scalars: read as stored."""

    def __init__(self, file: str, key: str, dtype: torch.dtype | None):
        self.file, self.key, self.dtype = file, key, dtype

    def __getitem__(self, index) -> torch.Tensor:
        import torch
        from safetensors import safe_open

        if index is not Ellipsis:
            raise TypeError(f"{self.key}: read whole ([...]), not [{index}]")
        _malloc_trim()  # what quantizing the tensor before left behind
        with safe_open(self.file, "pt") as f:
            part = f.get_slice(self.key)
            shape, stored = part.get_shape(), part.get_dtype()
            if (self.dtype is None or stored not in FLOAT_BYTES or not shape
                    or SAFETENSORS_DTYPES[str(self.dtype).removeprefix("torch.")] == stored):
                return part[...]
        out = torch.empty(shape, dtype=self.dtype)
        step = max(1, CHUNK_BYTES // max(1, FLOAT_BYTES[stored] * math.prod(shape[1:])))
        for start in range(0, shape[0], step):
            with safe_open(self.file, "pt") as f:
                out[start:start + step] = f.get_slice(self.key)[start:min(start + step, shape[0])]
        return out


def checkpoint_files(path: str, revision: str | None) -> list[Path] | None:
    """The safetensors files of a base model (a local dir, or a hub id: its cached snapshot), or None."""
    local = Path(path)
    if not local.is_dir():
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(path, revision=revision, allow_patterns=[
            "model.safetensors", "model-*.safetensors", "model.safetensors.index.json"]))
    index = local / "model.safetensors.index.json"
    if index.is_file():
        return [local / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [local / "model.safetensors"] if (local / "model.safetensors").is_file() else None


def load_base(cfg, device: str):
    """The reward model as `load_reward_model(cfg.model, cfg.quantization, device=device)` loads it, the same
    weights quantized the same way, its checkpoint read a tensor at a time (CheckpointTensor) rather than
    memory-mapped whole: transformers' loader gets a dict of these as its `state_dict`. Without the tokenizer
    (export reads it before): the caller sets `config.pad_token_id`.

    The loader quantizes a weight from the model's dtype and keeps a plain one in it unless the model asks
    for fp32 (`_keep_in_fp32_modules`): checked after loading, every tensor the checkpoint filled in the
    model's dtype. Where one is not, or the base has no safetensors files or has remote code, this loads
    with `load_reward_model` (the whole checkpoint mapped at once: more memory, the same weights)."""
    from safetensors import safe_open
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    from rmexp._compat import expected_new_head, from_lazy_state_dict
    from rmexp.builtin import resolve_model_path
    from rmexp.device import place
    from rmexp.model import from_pretrained_kwargs, load_reward_model

    placement, m = place(device), cfg.model
    kwargs = from_pretrained_kwargs(m, cfg.quantization, False, placement)
    path = resolve_model_path(m.name_or_path, m.cache_dir)
    config = AutoConfig.from_pretrained(path, num_labels=1, revision=m.revision, trust_remote_code=m.trust_remote_code)
    cls, files = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING.get(type(config), None), checkpoint_files(path, m.revision)
    if cls is None or files is None:
        return load_reward_model(m, cfg.quantization, device=placement)[0]
    dtype = kwargs["dtype"]
    cast = None if cfg.quantization.load_in_8bit else dtype  # LLM.int8() quantizes from fp16: read as stored
    state = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            state.update({key: CheckpointTensor(str(file), key, cast) for key in f.keys()})
    for key in ("num_labels", "revision", "trust_remote_code", "use_safetensors"):  # the config's, or the path's
        kwargs.pop(key, None)
    with expected_new_head():
        model = from_lazy_state_dict(cls, config, state, **kwargs)
    filled = {id(t) for t in model.state_dict(keep_vars=True).values()}  # not computed buffers (rotary tables)
    loaded_in = {t.quant_state.dtype if type(t).__name__ == "Params4bit" else t.dtype
                 for t in (*model.parameters(), *model.buffers())
                 if id(t) in filled and (_quantized(t) or t.is_floating_point())}
    if cast is not None and loaded_in - {dtype}:
        log.warning("%s keeps weights in %s beside %s: loading it whole to read them exactly", path,
                    sorted(str(d) for d in loaded_in - {dtype}), dtype)
        del model
        return load_reward_model(m, cfg.quantization, device=placement)[0]
    return model


# ---------------------------------------------------------------- the merge, planned a tensor at a time


@dataclass
class ExportTensor:
    """One tensor of the exported model, planned before anything is computed: `like` (on the meta device) has
    the shape and dtype written; `make()` computes it from the loaded model; `release()` frees the loaded
    tensor it was made from, once it is on disk; `parameter`: a parameter (else a buffer)."""

    name: str
    like: torch.Tensor
    make: Callable[[], torch.Tensor]
    release: Callable[[], None]
    parameter: bool = True


def _quantized(weight) -> bool:
    return type(weight).__name__ in ("Params4bit", "Int8Params")  # bitsandbytes' (transformers tests the same names)


def _dequantized(owner, weight, dtype: torch.dtype) -> torch.Tensor:
    """A bitsandbytes weight de-quantized as `PreTrainedModel.dequantize()` gives it (bitsandbytes' dequantize,
    cast to the model's dtype `dtype`); any other tensor as it is."""
    if not _quantized(weight):
        return weight.detach()
    import bitsandbytes.functional as bnbf

    if type(weight).__name__ == "Params4bit":
        return bnbf.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
    scb = owner.state.SCB if getattr(owner.state, "SCB", None) is not None else weight.SCB
    return bnbf.int8_vectorwise_dequant(weight.data, scb).to(dtype)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t.float().to(dtype)` (casting the whole model to fp32 and then to `dtype`), without the fp32 copy where
    fp32 holds `t` exactly (no copy at all where `t` is in `dtype`). Integer tensors stay as they are."""
    import torch

    if not t.is_floating_point():
        return t
    return t.to(dtype) if t.dtype in (torch.float32, torch.bfloat16, torch.float16) else t.float().to(dtype)


def fp32_where_the_adapter_writes(model, adapter_config) -> None:
    """Upcast what the adapter file overwrites (its `modules_to_save`, such as the head; biases when it trained
    them) before peft loads it: peft copies the saved fp32 values into these tensors, which would round
    them to a bf16 model's dtype. Modules are matched as peft matches them (the name ends with the entry)."""
    import torch

    names = adapter_config.modules_to_save or []
    for name, module in model.named_modules():
        if any(name.endswith(m) for m in names):
            module.float()
        bias = getattr(module, "bias", None)
        if adapter_config.bias != "none" and isinstance(bias, torch.nn.Parameter) and bias.is_floating_point():
            bias.data = bias.data.float()


def merged_tensors(model, dtype: torch.dtype) -> list[ExportTensor]:
    """Every tensor `merge_and_unload()` then `save_pretrained` would write for `model` (a PeftModel over the
    base as loaded, 4-bit or not), in state_dict order, planned (ExportTensor) rather than computed.

    A LoRA target's weight is its base weight de-quantized (`_dequantized`), in fp32, plus the LoRA update
    (peft's `get_delta_weight`: B @ A * scaling, added as peft's merge adds it), cast once to `dtype`; any
    other tensor is cast to `dtype` (of a module in `modules_to_save`, the trained copy); the reward head's
    tensors are written in fp32, as trained.
    """
    import torch
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    from rmexp._compat import lora_is_plain
    from rmexp.model import reward_head

    adapter, root = model.active_adapter, model.get_base_model()
    head, model_dtype = reward_head(model), root.config.dtype
    model_dtype = model_dtype if isinstance(model_dtype, torch.dtype) else getattr(torch, str(model_dtype))
    saved = root.state_dict(keep_vars=True)  # what is saved: parameters, persistent buffers (held: ids stay unique)
    persistent, seen, planned = {id(t) for t in saved.values()}, set(), []

    def plan(owner, attr: str, name: str, out: torch.dtype, lora=None, parameter=True) -> None:
        t = getattr(owner, attr)
        if id(t) in seen:  # a tied tensor is written once, under its first name
            return
        seen.add(id(t))
        out = out if t.is_floating_point() or _quantized(t) else t.dtype
        shape = t.quant_state.shape if type(t).__name__ == "Params4bit" else t.shape

        def make() -> torch.Tensor:  # reads the tensor when called: holding `t` here would keep it after release()
            w = _dequantized(owner, getattr(owner, attr), model_dtype)
            if lora is None:
                return _cast(w, out)
            w = w.to(torch.float32, copy=True)  # a copy: never the model's own tensor, which += would change
            w += lora.get_delta_weight(adapter)
            return w.to(out)

        planned.append(ExportTensor(name, torch.empty(shape, dtype=out, device="meta"), make,
                                    lambda: delattr(owner, attr), parameter))

    def visit(module, prefix: str, in_head: bool) -> None:
        in_head = in_head or module is head
        out = torch.float32 if in_head else dtype
        if isinstance(module, ModulesToSaveWrapper):
            module = module.modules_to_save[adapter]
        lora = None
        if isinstance(module, LoraLayer):
            if not lora_is_plain(module, adapter) or module.lora_bias.get(adapter):
                raise NotImplementedError(f"{prefix.rstrip('.')}: export merges plain LoRA only (no DoRA or other "
                                          "variant, no lora_bias)")
            module, lora = module.get_base_layer(), module
        for attr, _ in module.named_parameters(recurse=False):
            plan(module, attr, prefix + attr, out, lora if attr == "weight" else None)
        for attr, t in module.named_buffers(recurse=False):
            if id(t) in persistent:
                plan(module, attr, prefix + attr, out, parameter=False)
        if lora is None:
            for child, sub in module.named_children():
                visit(sub, f"{prefix}{child}.", in_head)

    visit(root, "", False)
    return planned


# ---------------------------------------------------------------- the files, written a tensor at a time


def write_safetensors(path: Path, tensors: list[ExportTensor]) -> None:
    """One safetensors file, computing and writing one tensor at a time and releasing what it was made from.

    The format (github.com/huggingface/safetensors): an 8-byte little-endian header length, a JSON header of
    every tensor's dtype, shape and byte range, then the bytes. safetensors' own `save_file` needs every
    tensor in memory at once; the header needs only the shapes and dtypes, which `ExportTensor.like` has.
    Tensors go widest dtype first, as save_file orders them, so each starts aligned to its element size.
    """
    import torch

    tensors = sorted(tensors, key=lambda t: -t.like.element_size())  # stable: state_dict order within a dtype
    header, offset = {}, 0
    for t in tensors:
        size = t.like.numel() * t.like.element_size()
        header[t.name] = {"dtype": SAFETENSORS_DTYPES[str(t.like.dtype).removeprefix("torch.")],
                          "shape": list(t.like.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for t in tensors:
            value = t.make().to("cpu").contiguous()
            if value.shape != t.like.shape or value.dtype != t.like.dtype:
                raise RuntimeError(f"{t.name}: made {value.dtype} {tuple(value.shape)}, planned {t.like.dtype} "
                                   f"{tuple(t.like.shape)}")
            f.write(value.reshape(-1).view(torch.uint8).numpy().data)
            del value
            t.release()
            _malloc_trim()


def write_shards(tensors: list[ExportTensor], output_dir: Path, max_shard_bytes: int | None = None) -> list[str]:
    """Write `tensors` as save_pretrained lays them out (huggingface_hub's split: `model.safetensors`, or
    `model-0000i-of-0000N.safetensors` and `model.safetensors.index.json`), one tensor at a time
    (write_safetensors); remove weight files an earlier export left there. Returns the files written."""
    import re

    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards({t.name: t.like for t in tensors}, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=SHARD_BYTES if max_shard_bytes is None else max_shard_bytes)
    files = list(split.filename_to_tensors)
    index = output_dir / "model.safetensors.index.json"
    for old in output_dir.glob("model*.safetensors*"):
        if re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors", old.name) and old.name not in files or old == index:
            old.unlink()
    by_name = {t.name: t for t in tensors}
    for filename, names in split.filename_to_tensors.items():
        write_safetensors(output_dir / filename, [by_name[name] for name in names])
    if split.is_sharded:
        total = sum(t.like.numel() for t in tensors if t.parameter)
        index.write_text(json.dumps({"metadata": {"total_parameters": total, **split.metadata},
                                     "weight_map": split.tensor_to_filename}, indent=2, sort_keys=True) + "\n")
        files.append(index.name)
    return files


def export(checkpoint: str | Path, output_dir: str | Path, dtype: str = "bfloat16",
           eval_metrics: str | Path | None = None, device: str = "auto") -> Path:
    from peft import PeftConfig, PeftModel

    from rmexp.model import load_tokenizer, torch_dtype
    from rmexp.rundir import CheckpointPathError, mean_ensemble, read_run_config, reward_stats

    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    run = locate(checkpoint)  # the run dir whose config it was trained with (itself, or above a checkpoint)
    if mean_ensemble(checkpoint) is not None:
        raise CheckpointPathError(f"{checkpoint} is a mean ensemble, its members' adapters scored one by one: no one "
                                  f"model to export; export a soup of them (rmexp-ensemble mode=soup), or each member")
    if run is None:
        raise CheckpointPathError(f"{checkpoint} is an exported model already: AutoModelForSequenceClassification "
                                  "loads it as it is")
    cfg = read_run_config(run)
    # The tokenizer first, while nothing else is held (parsing Gemma's takes 0.4 GB for a moment); the run's
    # tokenizer is the base's, padding with eos where it has no pad token
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(str(checkpoint))
    tokenizer.save_pretrained(output_dir)
    pad_token_id = tokenizer.pad_token_id
    del tokenizer
    # The base as training quantized it, kept 4-bit: each weight is de-quantized, merged in fp32 with its LoRA
    # update and cast to `dtype` one at a time, as it is written (merged_tensors, write_shards).
    base = load_base(cfg, device)  # on rmexp.device.place(device): where it merges
    fp32_where_the_adapter_writes(base, PeftConfig.from_pretrained(str(checkpoint)))
    tensors = merged_tensors(PeftModel.from_pretrained(base, str(checkpoint)), torch_dtype(dtype))
    # a checkpoint has no evaluation of its own: the run's metrics.json describes its final model
    stats = json.loads(Path(eval_metrics).read_text()) if eval_metrics else reward_stats(run) if run == checkpoint else {}
    config = base.config
    if hasattr(config, "quantization_config"):  # the file holds plain weights (what dequantize() removes)
        del config.quantization_config
    config.rmexp = {
        "reward_mean": stats.get("reward_mean"), "reward_std": stats.get("reward_std"),
        "max_length": int(cfg.trainer.max_length), "system_prompt": cfg.data.system_prompt,
        "source_run": str(checkpoint.resolve()),
        "lora_r": int(cfg.lora.r), "base_model": str(cfg.model.name_or_path),
    }
    if stats.get("reward_mean") is not None and stats.get("reward_std"):
        # OpenRLHF's reward models read these two: (r - mean) / std when it runs with --normalize_reward
        config.mean, config.std = stats["reward_mean"], stats["reward_std"]
    config.num_labels = 1
    # what save_pretrained records: the weights' dtype (the first floating parameter's) and the model class
    config.dtype = str(next(t.like.dtype for t in tensors if t.parameter and t.like.is_floating_point())).removeprefix("torch.")
    config.architectures = [type(base).__name__]
    config.pad_token_id = pad_token_id
    write_shards(tensors, output_dir)
    config.save_pretrained(output_dir)
    return output_dir


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="export")
def app(cfg: DictConfig) -> Path:
    with console.reported():
        args = to_typed(cfg)
        locate(Path(args.checkpoint).expanduser())  # what the path holds, before torch loads
        out = export(args.checkpoint, args.output_dir, args.dtype, args.eval_metrics, device=args.device)
    print(f"exported {args.checkpoint} -> {out}")
    return out


def cli() -> None:
    console.run(app, ExportConfig)


if __name__ == "__main__":
    cli()
