"""Scoring cost of a soup and of a mean ensemble against one member, in one process on the same pairs.

    python bench/ensemble_speed.py --member <run dir> [--soup <soup dir>] [--ensemble <mean ensemble dir>] \
        --data FILE [--pairs 200] [--repeats 3] [--padded] [--out bench/results/ensemble_speed.json]

`--padded` adds the member scored by the padded forward, and every run prints how far the member's rewards are from
its padded ones and from its own training-time scores.jsonl on the pairs that file holds (in bf16 two batchings
round apart). With `--member` alone it times one model: run it in two checkouts to compare scoring paths.

Each model loads once (RewardModel.load, packed scoring as rmexp-evaluate does), scores the pairs once untimed
(the 4-bit base is dequantized at its first forward), then `--repeats` timed rounds in which each model scores the
same pairs, the order rotating from round to round so a drift of the machine's speed falls on all of them. Reports
pairs/s (the median round), the soup's speed as a share of the member's (the target: within 10%) and the mean
ensemble's seconds per member as a multiple of the member's (target <= 1.0: K members cost at most K scorings).
Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def reward_gaps(member: str, pairs, rewards: dict) -> dict:
    """The member's packed rewards against its padded ones and its training run's final scores.jsonl (the pairs it
    holds): largest and mean absolute gap, the reward scale, and how many pairs the two decide differently."""
    import torch

    from rmexp.rundir import pair_id

    def gap(a: torch.Tensor, b: torch.Tensor) -> dict:
        d = (a.double() - b.double()).abs()
        differ = int(((a[:, 0] > a[:, 1]) != (b[:, 0] > b[:, 1])).sum())
        return {"pairs": len(a), "max": float(d.max()), "mean": float(d.mean()), "scale": float(b.abs().max()),
                "decided_differently": differ}

    out = {}
    if "member_padded" in rewards:
        out["padded forward"] = gap(rewards["member"], rewards["member_padded"])
    scores = Path(member) / "scores.jsonl"
    if scores.is_file():
        saved = {row["pair_id"]: (row["reward_chosen"], row["reward_rejected"])
                 for row in map(json.loads, scores.read_text().splitlines())}
        held = [i for i, p in enumerate(pairs) if pair_id(p) in saved]
        if held:
            trained = torch.tensor([saved[pair_id(pairs[i])] for i in held])
            out["training's own evaluation"] = gap(rewards["member"][held], trained)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--member", required=True)
    parser.add_argument("--soup")
    parser.add_argument("--ensemble")
    parser.add_argument("--padded", action="store_true", help="also the member through the padded forward")
    parser.add_argument("--data", required=True)
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch

    from rmexp import RewardModel
    from rmexp.config import OnError, SourceConfig
    from rmexp.dataset import source_pairs
    from rmexp.rundir import read_run_config

    data_cfg = read_run_config(args.member).data
    data_cfg.on_error = OnError.skip
    pairs, *_ = source_pairs(SourceConfig(path=args.data, split="train"), data_cfg, on_duplicate="skip")
    pairs = pairs[:args.pairs]
    models = {"member": RewardModel.load(args.member)}
    if args.padded:
        models["member_padded"] = RewardModel.load(args.member, packed=False)
    for name in ("soup", "ensemble"):
        if getattr(args, name):
            models[name] = RewardModel.load(getattr(args, name))
    encoded = {name: rm.encode(pairs) for name, rm in models.items()}
    rewards = {name: rm.score_encoded(encoded[name]) for name, rm in models.items()}  # untimed: the first forward
    gaps = reward_gaps(args.member, pairs, rewards)
    seconds: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for round_ in range(args.repeats):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            started = time.perf_counter()
            models[name].score_encoded(encoded[name])
            seconds[name].append(time.perf_counter() - started)
    median = {name: statistics.median(s) for name, s in seconds.items()}
    result = {
        "cpu": cpu_name(), "threads": torch.get_num_threads(), "pairs": len(pairs), "repeats": args.repeats,
        "member": args.member, "soup": args.soup, "ensemble": args.ensemble,
        "member_rank": models["member"].model.peft_config["default"].r,
        "seconds": seconds, "pairs_per_s": {name: len(pairs) / s for name, s in median.items()}, "reward_gaps": gaps,
    }
    print(f"{result['cpu']}, {result['threads']} threads, {len(pairs)} pairs, median of {args.repeats} rounds")
    for name in models:
        print(f"  {name:13s} {result['pairs_per_s'][name]:6.2f} pairs/s  (rounds: "
              + ", ".join(f"{s:.1f}" for s in seconds[name]) + " s)")
    for name, gap in gaps.items():
        print(f"  member vs {name}: max |reward gap| {gap['max']:.4g}, mean {gap['mean']:.4g} (|reward| up to "
              f"{gap['scale']:.3g}), {gap['decided_differently']} of {gap['pairs']} pairs decided differently")
    if "soup" in models:
        result |= {"soup_rank": models["soup"].model.peft_config["default"].r,
                   "soup_speed_vs_member": median["member"] / median["soup"]}
        print(f"soup (rank {result['soup_rank']}) at {result['soup_speed_vs_member']:.3f}x the member's (rank "
              f"{result['member_rank']}) speed")
    if "ensemble" in models:
        k = len(models["ensemble"].adapters)
        result |= {"ensemble_members": k, "ensemble_cost_per_member_vs_member": median["ensemble"] / k / median["member"]}
        print(f"the mean ensemble of {k} costs {result['ensemble_cost_per_member_vs_member']:.3f}x one member's "
              "scoring per member")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
