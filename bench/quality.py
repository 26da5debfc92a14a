"""Reward-model quality against the seed's recipe: same base, same pairs, same held-out set, same clock.

    python bench/quality.py                                   # equal time: HH lines 1-1200 train, 1201-1600 held out
    python bench/quality.py --budget equal-data --train-lines 400 --eval-start 1201
    python bench/quality.py --budget both --train-lines 400 --eval-start 1201   # one peer, ours under both budgets
    python bench/quality.py --ours "trainer.learning_rate=2e-4"   # try a variant of rmexp's recipe
    python bench/quality.py --seeds 1,2,3 --budget both --train-lines 400 --eval-start 1201   # over seeds

peer  the seed's recipe exactly: TRL RewardTrainer with its defaults, batch 1, lr 1e-4, 1 epoch, question
      and answer concatenated as plain text, Gemma-3-270M nf4 + double quant, LoRA r 8 / alpha 16 /
      dropout 0.05 on every projection, AutoModelForSequenceClassification(num_labels=1), pad = eos.
ours  rmexp's default recipe (`python -m rmexp.train` with data.path/eval_path set to the same lines).
      --budget equal-time: it trains for the peer's measured training seconds (trainer.time_budget_s),
      spending its speed on more epochs of the same pairs; equal-data: one epoch, like the peer; both: the
      peer once, ours under each budget.
Both are scored on the same held-out lines (ties count wrong), each in its own process. Prints a table,
then one JSON line per budget and seed. With several --seeds (each seeds both recipes), then one JSON line
per budget over the seeds: `peer_accuracy_mean`, `ours_accuracy_mean`, `delta_mean` and the 95% paired-
bootstrap interval of the difference (`delta_ci_low`, `delta_ci_high`: per held-out pair, ours' share of
seeds right minus the peer's, resampled over the pairs, matched by pair_id; rmexp.stats.paired_bootstrap).
The interval is over pairs for these seeds' models; the seeds' spread is in `delta_sd`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless" / "pairs.jsonl"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_lines(src: Path, first: int, last: int, dst: Path) -> Path:
    """Lines first..last (1-based, inclusive) of a JSONL file."""
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
    if len(lines) < last:
        sys.exit(f"{src} has {len(lines)} lines; lines {first}-{last} were asked for")
    dst.write_text("".join(lines[first - 1:last]), encoding="utf-8")
    return dst


def seed_text(pair) -> tuple[str, str]:
    """The seed's preprocessing: the question (the dialogue so far, as plain text) and each answer, concatenated."""
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    question = "".join(f"\n\n{names[m['role']]}: {m['content']}" for m in pair.prompt) + "\n\nAssistant: "
    return question + pair.chosen, question + pair.rejected


def peer(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig
    from trl import RewardConfig, RewardTrainer

    from rmexp.builtin import resolve_model_path
    from rmexp.dataset import read_pairs
    from rmexp.metrics import pairwise_metrics
    from rmexp.model import compute_dtype
    from rmexp.reward_model import score_sequences
    from rmexp.rundir import pair_id

    path = resolve_model_path(f"builtin:{args.model}", args.cache_dir)
    train, _ = read_pairs(args.train_file, on_error="skip")
    held, _ = read_pairs(args.eval_file, on_error="skip")
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.eos_token
    # The seed computes in bf16 (on its GPU); where this hardware lacks native bf16 both recipes use fp32
    # (rmexp's `auto`), so the comparison is of recipes, not of dtypes.
    dtype = compute_dtype()
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, quantization_config=bnb,
                                                               dtype=dtype)
    model.config.pad_token_id = tok.pad_token_id
    texts = [seed_text(p) for p in train]
    dataset = Dataset.from_list([{"chosen": c, "rejected": r} for c, r in texts])
    config = RewardConfig(output_dir=str(Path(args.work) / "peer"), per_device_train_batch_size=1, learning_rate=1e-4,
                          num_train_epochs=1, use_cpu=not torch.cuda.is_available(), report_to="none",
                          save_strategy="no", eval_strategy="no", logging_steps=50, seed=args.seed,
                          bf16=dtype == torch.bfloat16)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=PROJECTIONS, task_type="SEQ_CLS")
    trainer = RewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tok, peft_config=lora)
    if dtype == torch.float32:  # TRL casts the trainable weights to bf16, which an fp32 forward cannot take
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    # Scored as the seed would: the same concatenated text (plus the eos TRL appends in training), its
    # own head; over-long texts keep their end (the answer) instead of being dropped.
    sequences = [tok(t + tok.eos_token)["input_ids"][-config.max_length:] for p in held for t in seed_text(p)]

    def accuracy() -> dict:
        rewards = score_sequences(trainer.model, sequences, tok.pad_token_id, batch_size=8)
        chosen, rejected = rewards[0::2].numpy(), rewards[1::2].numpy()
        return pairwise_metrics(chosen, rejected) | {"decisions": {pair_id(p): bool(c > r) for p, c, r in
                                                                  zip(held, chosen, rejected, strict=True)}}

    initial = accuracy()["pairwise_accuracy"]  # its own random head: the peer's before-training baseline
    started = time.perf_counter()
    out = trainer.train()
    train_s = time.perf_counter() - started
    metrics = accuracy()
    return {"accuracy": metrics["pairwise_accuracy"], "ci_low": metrics["ci_low"], "ci_high": metrics["ci_high"],
            "decisions": metrics["decisions"],
            "n_ties": metrics["n_ties"], "eval_pairs": metrics["n_pairs"], "train_s": train_s,
            "train_pairs": len(dataset), "train_pairs_seen": round(out.metrics.get("epoch", 1.0) * len(dataset)),
            "train_pairs_used": len(trainer.train_dataset), "initial_accuracy": initial, "peak_rss_mb": peak_rss_mb()}


def ours(args) -> dict:
    from hydra import compose, initialize_config_module

    from rmexp.config import CONF_MODULE
    from rmexp.train import main

    out = Path(args.work) / ("ours-equal-time" if args.peer_train_s else "ours-equal-data")
    overrides = [f"model={args.model}", "data=file", f"data.path={args.train_file}", f"data.eval_path={args.eval_file}",
                 "data.on_error=skip", "logger=none", "trainer.eval_strategy=no", "trainer.save_strategy=no",
                 f"trainer.seed={args.seed}", f"model.cache_dir={args.cache_dir}", f"paths.output_dir={out}"]
    if args.peer_train_s:  # equal time: as many epochs as fit in the peer's training time
        overrides += [f"trainer.time_budget_s={args.peer_train_s}", f"trainer.num_train_epochs={args.max_epochs}"]
    else:
        overrides += ["trainer.num_train_epochs=1"]
    with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
        cfg = compose("train", overrides=overrides + args.ours)
    main(cfg)
    m = json.loads((out / "metrics.json").read_text())
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text(encoding="utf-8").splitlines()]
    return {"decisions": {s["pair_id"]: s["correct"] for s in scores},"accuracy": m["pairwise_accuracy"], "ci_low": m["ci_low"], "ci_high": m["ci_high"], "n_ties": m["n_ties"],
            "eval_pairs": m["n_eval_pairs"], "train_s": m["train_runtime_s"], "train_pairs": m["n_train_pairs"],
            "train_pairs_seen": m["n_train_pairs_seen"], "initial_accuracy": m["initial_pairwise_accuracy"],
            "length_baseline": m["length_baseline_accuracy"], "peak_rss_mb": peak_rss_mb(),
            "overrides": args.ours}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(name: str, argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", name, *argv], capture_output=True, text=True, cwd=ROOT)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        sys.exit(f"{name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a JSONL preference file (HH-RLHF by default)")
    parser.add_argument("--train-lines", type=int, default=1200, help="lines 1..N train both")
    parser.add_argument("--eval-lines", type=int, default=400, help="N lines from --eval-start score both")
    parser.add_argument("--eval-start", type=int, help="first held-out line (default: the line after training)")
    parser.add_argument("--budget", choices=["equal-time", "equal-data", "both"], default="equal-time")
    parser.add_argument("--model", default="gemma3_270m", help="a builtin model: gemma3_270m, or tiny for a smoke run")
    parser.add_argument("--max-epochs", type=float, default=10, help="cap on ours' epochs under equal time")
    parser.add_argument("--ours", nargs="*", default=[], help="extra rmexp overrides for ours (a recipe variant)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--seeds", help="comma-separated seeds, each training both recipes (overrides --seed)")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "rmexp"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--train-file", help=argparse.SUPPRESS)
    parser.add_argument("--eval-file", help=argparse.SUPPRESS)
    parser.add_argument("--peer-train-s", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = peer(args) if args.worker == "peer" else ours(args)
        print("RESULT " + json.dumps(result), flush=True)
        return

    start = args.eval_start or args.train_lines + 1
    if start <= args.train_lines:
        sys.exit(f"--eval-start {start} overlaps the training lines 1-{args.train_lines}")
    held_lines = f"{start}-{start + args.eval_lines - 1}"
    budgets = ["equal-time", "equal-data"] if args.budget == "both" else [args.budget]
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [args.seed]
    runs = {}  # seed -> (peer, {budget: ours})
    with tempfile.TemporaryDirectory(prefix="rmexp-quality-") as work:
        train = write_lines(args.data, 1, args.train_lines, Path(work) / "train.jsonl")
        held = write_lines(args.data, start, start + args.eval_lines - 1, Path(work) / "eval.jsonl")
        for seed in seeds:
            common = ["--work", str(Path(work) / f"seed-{seed}"), "--train-file", str(train), "--eval-file", str(held),
                      "--model", args.model, "--seed", str(seed), "--cache-dir", args.cache_dir,
                      "--max-epochs", str(args.max_epochs)]
            p = run_worker("peer", common)
            print(f"seed {seed} peer: {p['accuracy']:.3f} [{p['ci_low']:.3f}, {p['ci_high']:.3f}] on "
                  f"{p['eval_pairs']} pairs, {p['n_ties']} ties, trained {p['train_s']:.0f} s on "
                  f"{p['train_pairs_seen']} pairs", flush=True)
            results = {}
            for budget in budgets:
                limit = ["--peer-train-s", f"{p['train_s']:.1f}"] if budget == "equal-time" else []
                results[budget] = run_worker("ours", common + limit + (["--ours", *args.ours] if args.ours else []))
            runs[seed] = (p, results)

    variant = ", " + " ".join(args.ours) if args.ours else ""
    print(f"\ntrain lines 1-{args.train_lines}, held out {held_lines} of {args.data.name}, {args.model}")
    print(f"| {'recipe':<52} | seed | accuracy [95% CI]     | ties | train s | pairs seen | peak RSS MB |")
    print(f"|{'-' * 54}|------|-----------------------|------|---------|------------|-------------|")
    for seed, (p, results) in runs.items():
        rows = [("peer (seed recipe, TRL batch 1)", p)]
        rows += [(f"ours (rmexp default{variant}, {budget})", o) for budget, o in results.items()]
        for name, r in rows:
            print(f"| {name:<52} | {seed:4d} | {r['accuracy']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] | "
                  f"{r['n_ties']:4d} | {r['train_s']:7.0f} | {r['train_pairs_seen']:10d} | {r['peak_rss_mb']:11.0f} |")
    for seed, (p, results) in runs.items():
        o = next(iter(results.values()))
        print(f"seed {seed} baselines on the same held-out pairs: before training {o['initial_accuracy']:.3f} (ours), "
              f"{p['initial_accuracy']:.3f} (peer; each its own random head); length alone {o['length_baseline']:.3f}")
        for budget, o in results.items():
            print(json.dumps(run_summary(args, held_lines, budget, seed, p, o)))
    if len(seeds) > 1:
        for budget in budgets:
            print(json.dumps(over_seeds(args, held_lines, budget, runs)))


def run_summary(args, held_lines: str, budget: str, seed: int, p: dict, o: dict) -> dict:
    """One seed's peer and ours under one budget."""
    return {"budget": budget, "seed": seed, "model": args.model, "train_lines": f"1-{args.train_lines}",
            "held_out_lines": held_lines, "eval_pairs": o["eval_pairs"],
            "peer_accuracy": p["accuracy"], "peer_ci_low": p["ci_low"], "peer_ci_high": p["ci_high"],
            "peer_train_s": round(p["train_s"], 1), "peer_n_ties": p["n_ties"],
            "peer_train_pairs_seen": p["train_pairs_seen"], "peer_initial_accuracy": p["initial_accuracy"],
            "ours_accuracy": o["accuracy"], "ours_ci_low": o["ci_low"], "ours_ci_high": o["ci_high"],
            "ours_train_s": round(o["train_s"], 1), "ours_n_ties": o["n_ties"],
            "ours_train_pairs_seen": o["train_pairs_seen"], "ours_initial_accuracy": o["initial_accuracy"],
            "length_baseline_accuracy": o["length_baseline"], "delta": round(o["accuracy"] - p["accuracy"], 4),
            "ours_overrides": args.ours}


def over_seeds(args, held_lines: str, budget: str, runs: dict) -> dict:
    """The seeds' means and the paired-bootstrap interval of ours - peer over the held-out pairs every run
    scored, each pair's decisions averaged over the seeds."""
    import numpy as np

    from rmexp.stats import paired_bootstrap

    decisions = [(p["decisions"], results[budget]["decisions"]) for p, results in runs.values()]
    shared = sorted(set.intersection(*(set(p) & set(o) for p, o in decisions)))
    peer = np.mean([[p[k] for k in shared] for p, _ in decisions], axis=0)
    ours = np.mean([[o[k] for k in shared] for _, o in decisions], axis=0)
    low, high = paired_bootstrap(peer, ours)
    # every figure on the shared pairs (all of them, unless a run skipped one), so the means and delta agree
    peer_acc = [float(np.mean([p[k] for k in shared])) for p, _ in decisions]
    ours_acc = [float(np.mean([o[k] for k in shared])) for _, o in decisions]
    deltas = np.subtract(ours_acc, peer_acc)
    return {"budget": budget, "seeds": list(runs), "model": args.model, "train_lines": f"1-{args.train_lines}",
            "held_out_lines": held_lines, "shared_pairs": len(shared),
            "peer_accuracy_mean": round(float(np.mean(peer_acc)), 4), "ours_accuracy_mean": round(float(np.mean(ours_acc)), 4),
            "delta_mean": round(float(ours.mean() - peer.mean()), 4), "delta_ci_low": round(low, 4),
            "delta_ci_high": round(high, 4), "delta_sd": round(float(np.std(deltas, ddof=1)), 4),
            "peer_accuracy_by_seed": peer_acc, "ours_accuracy_by_seed": ours_acc, "ours_overrides": args.ours}


if __name__ == "__main__":
    main()
