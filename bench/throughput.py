"""Training throughput: rmexp's packed, prefix-shared batches against the seed-style TRL path.

    python bench/throughput.py --model gemma3_270m --data ../shared/data/hh-rlhf-harmless/pairs.jsonl --pairs 96 --batch 8

Trains, on the same model, quantization, LoRA and pairs, one epoch each of:
  peer   TRL RewardTrainer with its padded collator (chosen and rejected stacked), batch B
  peer1  the same at batch 1 (no padding, prompt still run twice)
  ours   rmexp's packed collator, batch B, eager (trainer.compile=false)
and, with `--compile`, ours_compiled: the same with the decoder layers compiled (trainer.compile=true; its
compile time is reported, and its pairs/s both with and without it),
each in its own process (so peak RSS is its own), and prints a table and, last, one JSON object.
`--eval-pairs K` also scores the next K pairs after training and reports held-out accuracy.

The ceiling: the machine's matmul rate R in the compute dtype (measured in the same run, a 2048^3
product) over the FLOPs a pair needs at least: 4 N per token (forward 2 N, backward to the inputs
2 N; the 4-bit base has no weight gradients) for N weights in the model's linear layers, times the
minimum tokens per pair, plus 2 N more per token when gradient checkpointing recomputes the forward.
`ours_fraction_of_ceiling` is ours' pairs/s over `ceiling_pairs_per_s`.

`--mode eval` measures scoring instead: the same pairs scored by the padded forward (chosen and
rejected right-padded, `--batch` pairs per forward) and by the packed one (`[prompt][chosen][rejected]`
segments in rows of `--row-tokens`), one process each, on the same model and seeded head; it prints
pairs/s, peak RSS, the largest reward difference and how many pairs the two paths decide differently
(`--dtype float32` for the fp32 comparison).

`--profile N` runs ours (and ours_compiled with `--compile`) with torch.profiler over N steps (after two
warm-up steps: the compiled layers compile in the second) and prints where a step's time goes:
de-quantization, matmuls, attention, LoRA dropout, casts and copies, other kernels, a compiled layer's fused
kernels, the optimizer, data collation, and Python/framework overhead (wall time no kernel accounts for); the
JSON gains `ours_non_matmul_s_per_pair`: a pair's time in everything but the linear layers' matmuls, what
compilation can cut and what is left of a step where matmuls are cheap (AMX, GPUs). `cpu_flags` says which bf16 units this CPU has.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def matmul_gflops(dtype, n: int = 2048, seconds: float = 2.0) -> float:
    """The machine's dense matmul rate in `dtype` (GFLOP/s) on the threads torch uses."""
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or runs < 2:
        a @ b
        runs += 1
    return 2 * n**3 * runs / (time.perf_counter() - started) / 1e9


def linear_weights(model) -> int:
    """N: the weights of the base's linear layers (4-bit ones counted unpacked), without the reward head."""
    import torch

    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not {"score", "lm_head"} & set(name.split(".")):
            total += module.in_features * module.out_features  # LoRA's own A and B included: they run too
    return total


CATEGORIES = [  # (category, test on an op's name or an enclosing op's name), first match wins
    ("optimizer", lambda chain: any(n.startswith("Optimizer.step") for n in chain)),
    # inductor's generated C++ kernels of a compiled layer (norms, rotary, activations, softmax, casts fused),
    # named graph_<i>_cpp_fused_... when the profile run sets TORCHINDUCTOR_CPP_ENABLE_KERNEL_PROFILE
    ("compiled fused kernels", lambda chain: "cpp_fused" in chain[0]),
    ("data collation", lambda chain: "rmexp.collate" in chain),
    ("LoRA dropout", lambda chain: any(n in ("aten::dropout", "aten::native_dropout", "aten::bernoulli_")
                                       for n in chain)),
    ("4-bit de-quantization", lambda chain: any("dequantize" in n for n in chain)),
    # forward: the packed kernel's range; backward: the block attention's softmax and batched matmuls; and
    # any batched matmul: a compiled layer's attention runs them outside those ranges (the linear layers
    # run mm and addmm), so "matmuls" are the linear layers' alone in both
    ("attention", lambda chain: any(n == "rmexp.attention" or "scaled_dot_product" in n or "flash_attention" in n
                                    or n.endswith(("SoftmaxBackward0", "BmmBackward0", "MaskedFillBackward0"))
                                    for n in chain) or chain[0] in ("aten::bmm", "aten::baddbmm")),
    ("matmuls", lambda chain: chain[0] in ("aten::mm", "aten::addmm", "aten::matmul", "aten::linear")),
    ("casts and copies", lambda chain: chain[0] in ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone",
                                                    "aten::contiguous")),
    ("other kernels", lambda chain: True),
]


def profile_table(prof, wall_s: float, steps: int) -> list[tuple[str, float]]:
    """Seconds per step by category, from each op's self time and the ops enclosing it."""
    seconds = dict.fromkeys([c for c, _ in CATEGORIES], 0.0)
    for event in prof.events():
        chain, parent = [event.name], event.cpu_parent
        while parent is not None:
            chain.append(parent.name)
            parent = parent.cpu_parent
        if (not event.name.startswith(("aten::", "bitsandbytes::", "rmexp.", "Optimizer.")) and "cpp_fused" not in event.name
                and event.name != chain[-1]):
            continue  # a python-level range inside another op: its time is in its children
        category = next(c for c, test in CATEGORIES if test(chain))
        seconds[category] += event.self_cpu_time_total / 1e6
    seconds["Python and framework overhead"] = max(0.0, wall_s - sum(seconds.values()))
    return [(c, s / steps) for c, s in seconds.items()]


def worker(args) -> dict:
    import torch
    from hydra import compose, initialize_config_module
    from trl import RewardTrainer

    from rmexp.config import CONF_MODULE, to_typed
    from rmexp.data import tokenize_pairs
    from rmexp.dataset import read_pairs
    from rmexp.model import build_lora_config, load_reward_model
    from rmexp.packing import build_collator
    from rmexp.prepare import for_training, upcast_reward_head
    from rmexp.trainer import PairwiseRewardTrainer
    from rmexp.training_args import build_reward_config

    torch.manual_seed(0)
    batch = 1 if args.worker == "peer1" else args.batch
    ours = args.worker.startswith("ours")
    batching = "packed" if ours else "padded"
    with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
        cfg = compose("train", overrides=[
            f"model={args.model}", f"quantization={args.quantization}", f"data.path={args.data}",
            f"trainer.batching={batching}", f"trainer.per_device_train_batch_size={batch}",
            f"trainer.per_device_eval_batch_size={args.batch}", f"trainer.max_length={args.max_length}",
            f"trainer.max_steps={math.ceil(args.pairs / batch)}", "trainer.eval_strategy=no", "trainer.logging_steps=1000",
            "trainer.warmup_steps=0", "logger=none", "paths.output_dir=/tmp/rmexp-bench",
            f"trainer.compile={args.worker == 'ours_compiled'}",
            *([] if ours else ["trainer.optim=adamw_torch"])])  # the peers: TRL's default optimizer
    cfg = to_typed(cfg)
    pairs, _ = read_pairs(args.data, max_pairs=args.pairs + args.eval_pairs, on_error="skip")
    train_pairs, eval_pairs = pairs[:args.pairs], pairs[args.pairs:]
    model, tok, _ = load_reward_model(cfg.model, cfg.quantization)
    train_ds, _ = tokenize_pairs(tok, train_pairs, cfg.trainer.max_length)
    # ours: gradient_checkpointing=auto (off where activations fit); the TRL peers keep the seed's TRL default, on
    # ours: everything rmexp.recipe does to the model (the packed kernel, the speed layers); the peers: the fp32 head
    model = for_training(model, cfg.trainer) if ours else upcast_reward_head(model)
    collator = build_collator(cfg.trainer, model, tok)
    args_ = build_reward_config(cfg.trainer, Path("/tmp/rmexp-bench"), "none", model if ours else None)
    if ours:
        trainer = PairwiseRewardTrainer(model=model, args=args_, train_dataset=train_ds, processing_class=tok,
                                        peft_config=build_lora_config(cfg.lora), data_collator=collator)
    else:  # the peers: TRL's own RewardTrainer and padded collator, as the seed recipe runs it
        args_.per_device_eval_batch_size = 1  # TRL's eval_accuracy is a mean of batch means: exact at batch 1
        trainer = RewardTrainer(model=model, args=args_, train_dataset=train_ds, processing_class=tok,
                                peft_config=build_lora_config(cfg.lora))
    counted = {"tokens": 0}
    inner = trainer.data_collator

    def counting(examples):
        with torch.profiler.record_function("rmexp.collate"):
            out = inner(examples)
        counted["tokens"] += out["input_ids"].numel()  # everything the model runs, padding included
        return out

    trainer.data_collator = counting
    profiler = profile_callback(args.profile) if args.profile else None
    if profiler:
        trainer.add_callback(profiler)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    result = {"worker": args.worker, "batch": batch, "pairs": len(train_ds), "seconds": seconds,
              "pairs_per_s": len(train_ds) / seconds, "tokens_per_pair": counted["tokens"] / len(train_ds),
              "min_tokens_per_pair": sum(len(c) + len(r) - p for c, r, p in zip(
                  train_ds["chosen_ids"], train_ds["rejected_ids"], train_ds["prompt_len"], strict=True)) / len(train_ds),
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "linear_weights": linear_weights(trainer.model), "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
              "compile_s": trainer.compile_s if ours else None}
    if profiler:
        result["profile_s_per_step"] = profile_table(profiler.prof, profiler.wall_s, args.profile)
    if eval_pairs:
        eval_ds, _ = tokenize_pairs(tok, eval_pairs, cfg.trainer.max_length)
        metrics = trainer.evaluate(eval_ds)
        result["eval_pairwise_accuracy"] = metrics["eval_pairwise_accuracy" if ours else "eval_accuracy"]
        result["eval_pairs"] = len(eval_ds)
    return result


def eval_worker(args) -> dict:
    """Score `--pairs` pairs with the padded or the packed path; rewards go to a file for the comparison."""
    import torch
    from hydra import compose, initialize_config_module

    from rmexp.config import CONF_MODULE
    from rmexp.dataset import read_pairs
    from rmexp.model import load_reward_model
    from rmexp.reward_model import RewardModel

    dtype = [f"model.dtype={args.dtype}", f"quantization.bnb_4bit_compute_dtype={args.dtype}"]
    with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
        cfg = compose("train", overrides=[f"model={args.model}", f"quantization={args.quantization}",
                                          f"data.path={args.data}", "logger=none", *dtype])
    pairs, _ = read_pairs(args.data, max_pairs=args.pairs, on_error="skip")
    torch.manual_seed(0)  # the same head in both processes
    model, tok, _ = load_reward_model(cfg.model, cfg.quantization)
    rm = RewardModel(model, tok, args.max_length, "bench", packed=args.worker == "eval_packed",
                     row_tokens=args.row_tokens)
    encoded = rm.encode(pairs)
    rm.score_encoded(encoded[:4], batch_size=args.batch)  # warm-up (the 4-bit base is dequantized once)
    started = time.perf_counter()
    rewards = rm.score_encoded(encoded, batch_size=args.batch)
    seconds = time.perf_counter() - started
    out = Path(args.rewards_dir) / f"{args.worker}.pt"
    torch.save(rewards, out)
    return {"worker": args.worker, "pairs": len(encoded), "seconds": seconds, "pairs_per_s": len(encoded) / seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rewards": str(out),
            "packed": rm.packed}


def eval_bench(args) -> None:
    """Padded against packed scoring of the same pairs: a table, then one JSON line."""
    import tempfile

    import torch

    with tempfile.TemporaryDirectory(prefix="rmexp-eval-bench-") as tmp:
        sys.argv += ["--rewards-dir", tmp]
        results = {name: run_worker(name) for name in ("eval_padded", "eval_packed")}
        padded, packed = (torch.load(results[n]["rewards"]) for n in ("eval_padded", "eval_packed"))
    assert results["eval_packed"]["packed"] and not results["eval_padded"]["packed"]
    diff = (padded - packed).abs().max().item()
    decisions = int(((padded[:, 0] > padded[:, 1]) != (packed[:, 0] > packed[:, 1])).sum())
    print(f"scoring {results['eval_padded']['pairs']} pairs of {Path(args.data).name}, {args.model}, {args.dtype}")
    print("| path | pairs/s | peak RSS MB |\n| --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name.removeprefix('eval_')} | {r['pairs_per_s']:.2f} | {r['peak_rss_mb']:.0f} |")
    speedup = results["eval_packed"]["pairs_per_s"] / results["eval_padded"]["pairs_per_s"]
    print(f"packed {speedup:.2f}x padded; max |reward difference| {diff:.2e}; pairs decided differently: {decisions}")
    print(json.dumps({"mode": "eval", "model": args.model, "pairs": results["eval_padded"]["pairs"],
                      "dtype": args.dtype, "row_tokens": args.row_tokens, "padded_batch": args.batch,
                      "eval_padded_pairs_per_s": round(results["eval_padded"]["pairs_per_s"], 3),
                      "eval_packed_pairs_per_s": round(results["eval_packed"]["pairs_per_s"], 3),
                      "eval_speedup": round(speedup, 3),
                      "eval_padded_peak_rss_mb": round(results["eval_padded"]["peak_rss_mb"], 1),
                      "eval_packed_peak_rss_mb": round(results["eval_packed"]["peak_rss_mb"], 1),
                      "max_abs_reward_diff": diff, "n_decisions_differ": decisions}))


def cpu_flags() -> dict[str, bool]:
    """The bf16 units of this CPU (from /proc/cpuinfo): what decides its matmul rate in bf16."""
    try:
        flags = set(next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")).split())
    except (OSError, StopIteration):
        flags = set()
    return {name: name in flags for name in ("avx512f", "avx512_bf16", "amx_bf16")}


def profile_callback(n: int):
    """A TrainerCallback that runs torch.profiler from the end of step 2 to the end of step 2 + n, then stops."""
    import torch
    from transformers import TrainerCallback

    class ProfileSteps(TrainerCallback):
        prof, wall_s, started = None, 0.0, 0.0

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self.prof.__enter__()
                self.started = time.perf_counter()
            elif state.global_step == 2 + n and self.prof is not None:
                self.wall_s = time.perf_counter() - self.started
                self.prof.__exit__(None, None, None)
                control.should_training_stop = True
            return control

    return ProfileSteps()


def run_worker(name: str, *extra: str, env: dict[str, str] | None = None) -> dict:
    """One worker in its own process (its peak RSS is its own), with this command's arguments, then `extra`."""
    proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--worker", name, *extra], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, **(env or {})})
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        sys.exit(f"{name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3_270m", help="a conf/model option (tiny, gemma3_270m, ...)")
    parser.add_argument("--data", required=True)
    parser.add_argument("--pairs", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--quantization", default="nf4")
    parser.add_argument("--eval-pairs", type=int, default=0)
    parser.add_argument("--only", nargs="*", default=["peer", "peer1", "ours"])
    parser.add_argument("--compile", action="store_true", help="also ours_compiled: trainer.compile=true")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after the timed runs, profile N steps of ours (and ours_compiled), print where time goes")
    parser.add_argument("--mode", choices=["train", "eval"], default="train", help="time training, or scoring")
    parser.add_argument("--row-tokens", type=int, default=2048, help="--mode eval: tokens per packed row")
    parser.add_argument("--dtype", default="auto", help="--mode eval: model and 4-bit compute dtype (auto, float32)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--rewards-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = eval_worker(args) if args.worker.startswith("eval_") else worker(args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    if args.mode == "eval":
        eval_bench(args)
        return
    if args.profile and math.ceil(args.pairs / args.batch) < 2 + args.profile:
        parser.error(f"--profile {args.profile} needs {2 + args.profile} steps (two warm-up): --pairs >= "
                     f"{(2 + args.profile) * args.batch} at --batch {args.batch}")

    from rmexp.model import compute_dtype

    dtype = compute_dtype()
    gflops = matmul_gflops(dtype)  # the same run, before the workers, with the machine otherwise idle
    print(f"matmul rate: {gflops:.0f} GFLOP/s ({str(dtype).removeprefix('torch.')}, 2048^3)", flush=True)
    results = {}
    for name in [*args.only, *(["ours_compiled"] if args.compile else [])]:
        results[name] = run_worker(name, "--profile", "0")
        r = results[name]
        print(f"{name:6s} batch {r['batch']:2d}: {r['pairs_per_s']:.3f} pairs/s, {r['tokens_per_pair']:.0f} tokens/pair "
              f"(min {r['min_tokens_per_pair']:.0f}), peak RSS {r['peak_rss_mb']:.0f} MB"
              + (f", held-out accuracy {r['eval_pairwise_accuracy']:.4f} on {r['eval_pairs']}"
                 if "eval_pairwise_accuracy" in r else ""), flush=True)
    summary = {"model": args.model, "pairs": args.pairs, "batch": args.batch, "cpu_flags": cpu_flags()}
    for prefix, r in results.items():
        summary[f"{prefix}_pairs_per_s"] = round(r["pairs_per_s"], 4)
        summary[f"{prefix}_peak_rss_mb"] = round(r["peak_rss_mb"], 1)
        if prefix != "peer1":
            summary[f"{prefix}_tokens_per_pair"] = round(r["tokens_per_pair"], 1)
        if "eval_pairwise_accuracy" in r:
            summary[f"{prefix}_eval_pairwise_accuracy"] = r["eval_pairwise_accuracy"]
        summary["min_tokens_per_pair"] = round(r["min_tokens_per_pair"], 1)
    if "ours" in results and "peer" in results:
        summary["speedup_vs_peer"] = round(results["ours"]["pairs_per_s"] / results["peer"]["pairs_per_s"], 3)
        summary["rss_ratio_vs_peer"] = round(results["ours"]["peak_rss_mb"] / results["peer"]["peak_rss_mb"], 3)
    if "ours" in results and "peer1" in results:
        summary["speedup_vs_peer1"] = round(results["ours"]["pairs_per_s"] / results["peer1"]["pairs_per_s"], 3)
    if "ours_compiled" in results:
        r = results["ours_compiled"]
        steady = r["pairs"] / (r["seconds"] - r["compile_s"])  # the compile is paid once a run, not per pair
        summary.update({"ours_compiled_compile_s": r["compile_s"], "ours_compiled_steady_pairs_per_s": round(steady, 4)})
        if "ours" in results:
            eager = results["ours"]["pairs_per_s"]
            saved_per_pair = 1 / eager - 1 / steady
            summary["compiled_steady_speedup"] = round(steady / eager, 3)
            # pairs after which the compile has paid for itself (none where compiled steps are no faster)
            summary["compile_break_even_pairs"] = round(r["compile_s"] / saved_per_pair) if saved_per_pair > 0 else None
        print(f"ours_compiled: compiled in {r['compile_s']:.0f} s; {steady:.3f} pairs/s after it", flush=True)
    if "ours" in results:
        r = results["ours"]
        summary["tokens_over_min"] = round(r["tokens_per_pair"] / r["min_tokens_per_pair"], 4)
        flops_per_token = (6 if r["gradient_checkpointing"] else 4) * r["linear_weights"]
        ceiling = gflops * 1e9 / (flops_per_token * r["min_tokens_per_pair"])
        summary.update({"matmul_gflops": round(gflops, 1), "compute_dtype": str(dtype).removeprefix("torch."),
                        "linear_weights": r["linear_weights"], "gradient_checkpointing": r["gradient_checkpointing"],
                        "ceiling_pairs_per_s": round(ceiling, 3),
                        "ours_fraction_of_ceiling": round(r["pairs_per_s"] / ceiling, 3)})
        print(f"ceiling {ceiling:.2f} pairs/s ({flops_per_token / 1e9:.2f} GFLOP/token x {r['min_tokens_per_pair']:.0f} "
              f"tokens/pair at {gflops:.0f} GFLOP/s): ours at {r['pairs_per_s'] / ceiling:.0%} of it")
    if args.profile:
        for name in ["ours", *(["ours_compiled"] if args.compile else [])]:
            summary.update(profile(args, name))
        if args.compile:
            summary["compiled_non_matmul_ratio"] = round(
                summary["ours_compiled_non_matmul_s_per_pair"] / summary["ours_non_matmul_s_per_pair"], 3)
    print(json.dumps(summary))


def profile(args, name: str) -> dict:
    """`name` (ours, ours_compiled) under torch.profiler: prints seconds per step by category; returns its
    seconds per step and the non-matmul seconds per pair."""
    # inductor's kernels then record themselves (their own cache entries: the timed runs are unaffected)
    rows = run_worker(name, env={"TORCHINDUCTOR_CPP_ENABLE_KERNEL_PROFILE": "1"})["profile_s_per_step"]
    total = sum(s for _, s in rows)
    print(f"{name}: packed batch {args.batch}, {args.model}, {args.profile} profiled steps: {total:.2f} s per step")
    print("| where | s per step | share |\n| --- | --- | --- |")
    for category, s in sorted(rows, key=lambda r: -r[1]):
        print(f"| {category} | {s:.3f} | {s / total:.0%} |")
    matmuls = dict(rows)["matmuls"]
    return {f"{name}_profile_s_per_step": round(total, 3),
            f"{name}_non_matmul_s_per_pair": round((total - matmuls) / args.batch, 4),
            f"{name}_profile": {category: round(s, 4) for category, s in rows}}


if __name__ == "__main__":
    main()
