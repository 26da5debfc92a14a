"""Training throughput: rmexp's packed, prefix-shared batches against the seed-style TRL path.

    python bench/throughput.py --model gemma3_270m --data ../shared/data/hh-rlhf-harmless/pairs.jsonl --pairs 96 --batch 8

Trains, on the same model, quantization, LoRA and pairs, one epoch each of:
  peer   TRL RewardTrainer with its padded collator (chosen and rejected stacked), batch B
  peer1  the same at batch 1 (no padding, prompt still run twice)
  ours   rmexp's packed collator, batch B
each in its own process (so peak RSS is its own), and prints a table and, last, one JSON object.
`--eval-pairs K` also scores the next K pairs after training and reports held-out accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args) -> dict:
    import torch
    from hydra import compose, initialize_config_dir

    from rmexp.config import CONF_DIR
    from rmexp.data import load_pairs, tokenize_pairs
    from rmexp.model import build_lora_config, load_reward_model
    from rmexp.train import build_collator, build_reward_config
    from rmexp.trainer import PairwiseRewardTrainer

    torch.manual_seed(0)
    batch = 1 if args.worker == "peer1" else args.batch
    batching = "packed" if args.worker == "ours" else "padded"
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[
            f"model={args.model}", f"quantization={args.quantization}", f"data.path={args.data}",
            f"trainer.batching={batching}", f"trainer.per_device_train_batch_size={batch}",
            f"trainer.per_device_eval_batch_size={args.batch}", f"trainer.max_length={args.max_length}",
            f"trainer.max_steps={math.ceil(args.pairs / batch)}", "trainer.eval_strategy=no", "trainer.logging_steps=1000",
            "trainer.warmup_steps=0", "logger=none", "paths.output_dir=/tmp/rmexp-bench"])
    pairs, _ = load_pairs(args.data, max_pairs=args.pairs + args.eval_pairs, on_error="skip")
    train_pairs, eval_pairs = pairs[:args.pairs], pairs[args.pairs:]
    model, tok, _ = load_reward_model(cfg.model, cfg.quantization)
    train_ds, _ = tokenize_pairs(tok, train_pairs, cfg.trainer.max_length)
    collator = build_collator(cfg.trainer, model, tok)
    trainer = PairwiseRewardTrainer(model=model, args=build_reward_config(cfg.trainer, Path("/tmp/rmexp-bench"), "none"),
                                    train_dataset=train_ds, processing_class=tok, peft_config=build_lora_config(cfg.lora),
                                    data_collator=collator)
    counted = {"tokens": 0}
    inner = trainer.data_collator

    def counting(examples):
        out = inner(examples)
        counted["tokens"] += out["input_ids"].numel()  # everything the model runs, padding included
        return out

    trainer.data_collator = counting
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    result = {"worker": args.worker, "batch": batch, "pairs": len(train_ds), "seconds": seconds,
              "pairs_per_s": len(train_ds) / seconds, "tokens_per_pair": counted["tokens"] / len(train_ds),
              "min_tokens_per_pair": sum(len(c) + len(r) - p for c, r, p in zip(
                  train_ds["chosen_ids"], train_ds["rejected_ids"], train_ds["prompt_len"], strict=True)) / len(train_ds),
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if eval_pairs:
        eval_ds, _ = tokenize_pairs(tok, eval_pairs, cfg.trainer.max_length)
        metrics = trainer.evaluate(eval_ds)
        result["eval_pairwise_accuracy"] = metrics["eval_pairwise_accuracy"]
        result["eval_pairs"] = len(eval_ds)
    return result


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
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return

    results = {}
    for name in args.only:
        cmd = [sys.executable, __file__, "--worker", name, *sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            sys.exit(f"{name} failed:\n{proc.stderr[-4000:]}")
        results[name] = json.loads(line[len("RESULT "):])
        r = results[name]
        print(f"{name:6s} batch {r['batch']:2d}: {r['pairs_per_s']:.3f} pairs/s, {r['tokens_per_pair']:.0f} tokens/pair "
              f"(min {r['min_tokens_per_pair']:.0f}), peak RSS {r['peak_rss_mb']:.0f} MB"
              + (f", held-out accuracy {r['eval_pairwise_accuracy']:.4f} on {r['eval_pairs']}"
                 if "eval_pairwise_accuracy" in r else ""), flush=True)
    summary = {"model": args.model, "pairs": args.pairs, "batch": args.batch}
    for name, r in results.items():
        prefix = {"peer": "peer", "peer1": "peer1", "ours": "ours"}[name]
        summary[f"{prefix}_pairs_per_s"] = round(r["pairs_per_s"], 4)
        summary[f"{prefix}_peak_rss_mb"] = round(r["peak_rss_mb"], 1)
        if name != "peer1":
            summary[f"{prefix}_tokens_per_pair"] = round(r["tokens_per_pair"], 1)
        if "eval_pairwise_accuracy" in r:
            summary[f"{prefix}_eval_pairwise_accuracy"] = r["eval_pairwise_accuracy"]
        summary["min_tokens_per_pair"] = round(r["min_tokens_per_pair"], 1)
    if "ours" in results and "peer" in results:
        summary["speedup_vs_peer"] = round(results["ours"]["pairs_per_s"] / results["peer"]["pairs_per_s"], 3)
        summary["rss_ratio_vs_peer"] = round(results["ours"]["peak_rss_mb"] / results["peer"]["peak_rss_mb"], 3)
    if "ours" in results and "peer1" in results:
        summary["speedup_vs_peer1"] = round(results["ours"]["pairs_per_s"] / results["peer1"]["pairs_per_s"], 3)
    if "ours" in results:
        summary["tokens_over_min"] = round(results["ours"]["tokens_per_pair"] / results["ours"]["min_tokens_per_pair"], 4)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
