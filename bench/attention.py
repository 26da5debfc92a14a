"""Packed attention, one segment: one masked block against three blocks (prompt, chosen, rejected).

    python bench/attention.py
    python bench/attention.py --shape 4,1,256 --lengths 118/40/50,300/150/150

Times `rmexp.packing.attend_segments` forward and backward on one `[prompt][chosen][rejected]` segment each
way, on random fp32 tensors of a model's attention shape (heads, key/value heads, head dim), and prints the
median of `--repeats` runs (after 3 warm-up runs), the ratio split / whole, the scores a head skips split
(P(C+R) + 2CR) and which way `SPLIT_MIN_SCORES` picks. The threshold sits where the ratio crosses 1.

`--data FILE` times the kernel over a data set's own segments instead (the first `--pairs` pairs, tokenized
by `--model`'s tokenizer at `--max-length`, one segment a call, at the first `--shape`, default 4,1,256):
each segment as one block and split, summed over the pairs, and the sum of the way `SPLIT_MIN_SCORES` picks
for each, so the threshold is judged on the lengths it will see:

    python bench/attention.py --data ../shared/data/hh-rlhf-harmless/pairs.jsonl --shape 4,1,256

`--flex` adds a third way, `trainer.attention=flex` (rmexp.flex): the segment as one flex_attention call with
its BlockMask (built once per batch, outside the timing: `mask ms` gives its time). On a CPU that call is torch's
unfused reference (torch 2.13 has no CPU flex_attention backward); on CUDA the compiled kernel.

    python bench/attention.py --flex --shape 4,1,256

One process, the threads torch is given (set OMP_NUM_THREADS); run nothing else on the machine meanwhile.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from types import SimpleNamespace
from unittest import mock

import torch

from rmexp import flex, packing

SHAPES = {"4,2,16": "the test suite's tiny model", "4,1,256": "Gemma-3-270M", "32,8,128": "Llama-3.1-8B"}
LENGTHS = "10/5/5,30/10/10,60/20/20,118/40/50,140/50/50,160/60/60,200/80/80,300/150/150,400/200/200"


def segment(lengths: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """(prompt, chosen, rejected) tokens as the collator's span of a segment alone in its row."""
    prompt, chosen, rejected = lengths
    return 0, prompt, prompt + chosen, prompt + chosen + rejected


def time_segment(heads: int, kv_heads: int, dim: int, lengths: tuple[int, int, int], split: bool | str,
                 repeats: int) -> float:
    """Median seconds of one forward and backward over a single segment, run split or as one block (`split`
    True, False), or as one flex_attention call (`split` "flex")."""
    prompt, chosen, rejected = lengths
    example = {"chosen_ids": list(range(1, prompt + chosen + 1)),
               "rejected_ids": list(range(1, prompt + 1)) + list(range(1, rejected + 1)), "prompt_len": prompt}
    batch = packing.PackedPairCollator(pad_token_id=0, row_tokens=sum(lengths))([example])
    width = batch["input_ids"].shape[1]
    q = torch.randn(1, heads, width, dim, requires_grad=True)
    k, v = (torch.randn(1, kv_heads, width, dim, requires_grad=True) for _ in range(2))
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, training=True)
    kernel, mask = packing.packed_sdpa, batch["attention_mask"]
    if split == "flex":
        kernel, mask = flex.packed_flex, flex.block_masks(batch, None, False)
    times = []
    with mock.patch.object(packing, "SPLIT_MIN_SCORES", 0 if split is True else float("inf")):
        for _ in range(repeats + 3):
            start = time.perf_counter()
            out, _ = kernel(module, q, k, v, mask, scaling=dim ** -0.5, rmexp_segments=batch["segments"])
            out.sum().backward()
            times.append(time.perf_counter() - start)
    return statistics.median(times[3:])


def time_block_mask(lengths: tuple[int, int, int], repeats: int) -> float:
    """Median seconds of building one segment's BlockMask (rmexp.flex.block_masks: once per batch, every layer's)."""
    prompt, chosen, rejected = lengths
    example = {"chosen_ids": list(range(1, prompt + chosen + 1)),
               "rejected_ids": list(range(1, prompt + 1)) + list(range(1, rejected + 1)), "prompt_len": prompt}
    batch = packing.PackedPairCollator(pad_token_id=0, row_tokens=sum(lengths))([example])
    times = []
    for _ in range(repeats + 3):
        batch.pop(flex.BLOCK_MASK_KEY, None)
        start = time.perf_counter()
        flex.block_masks(batch, None, False)
        times.append(time.perf_counter() - start)
    return statistics.median(times[3:])


def data_segments(path: str, model: str, pairs: int, max_length: int) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) tokens of the first `pairs` pairs of `path`, as training tokenizes them."""
    from hydra import compose, initialize_config_module

    from rmexp.builtin import resolve_model_path
    from rmexp.config import CONF_MODULE
    from rmexp.data import tokenize_pairs
    from rmexp.dataset import read_pairs
    from rmexp.model import load_tokenizer

    with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model}", f"data.path={path}"]).model
    tok = load_tokenizer(resolve_model_path(cfg.name_or_path, cfg.cache_dir), cfg.revision, cfg.trust_remote_code)
    ds, _ = tokenize_pairs(tok, read_pairs(path, max_pairs=pairs, on_error="skip")[0], max_length)
    return [(e["prompt_len"], len(e["chosen_ids"]) - e["prompt_len"], len(e["rejected_ids"]) - e["prompt_len"])
            for e in ds]


def data_bench(args) -> None:
    heads, kv_heads, dim = (int(x) for x in (args.shape or ["4,1,256"])[0].split(","))
    segments = data_segments(args.data, args.model, args.pairs, args.max_length)
    # (whole, split[, flex]) seconds of each segment, timed back to back; the picked way is whole or split
    ways = (False, True, "flex") if args.flex else (False, True)
    times = [[time_segment(heads, kv_heads, dim, lengths, s, args.repeats) for s in ways] for lengths in segments]
    splits = [packing.splits(segment(lengths)) for lengths in segments]
    totals = {"whole": sum(t[0] for t in times), "split": sum(t[1] for t in times),
              "picked": sum(t[s] for t, s in zip(times, splits, strict=True))}
    picked = sum(splits)
    result = {"data": args.data, "pairs": len(segments), "shape": f"{heads},{kv_heads},{dim}",
              "threads": torch.get_num_threads(), "split_min_scores": packing.SPLIT_MIN_SCORES,
              "segments_split": picked, **{f"{way}_s": round(t, 4) for way, t in totals.items()},
              "split_over_whole": round(totals["split"] / totals["whole"], 3),
              "picked_over_whole": round(totals["picked"] / totals["whole"], 3),
              "picked_over_split": round(totals["picked"] / totals["split"], 3)}
    if args.flex:
        result["flex_s"] = round(sum(t[2] for t in times), 4)
        result["flex_over_picked"] = round(result["flex_s"] / totals["picked"], 3)
        print(f"flex (trainer.attention=flex) {result['flex_s']:.3f} s, {result['flex_over_picked']:.2f}x as picked")
    print(f"{len(segments)} pairs, {picked} run split; forward and backward summed over them: whole "
          f"{totals['whole']:.3f} s, split {totals['split']:.3f} s, as picked {totals['picked']:.3f} s")
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", action="append", help="heads,kv_heads,head_dim (repeatable); default: "
                        + "; ".join(f"{s} ({n})" for s, n in SHAPES.items()))
    parser.add_argument("--lengths", default=LENGTHS, help="prompt/chosen/rejected tokens, comma-separated")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--data", help="time the kernel over this file's segments (see above)")
    parser.add_argument("--model", default="gemma3_270m", help="the model config whose tokenizer --data uses")
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--flex", action="store_true", help="time trainer.attention=flex too (see above)")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.data:
        return data_bench(args)
    rows = []
    print(f"threads {torch.get_num_threads()}, SPLIT_MIN_SCORES {packing.SPLIT_MIN_SCORES}")
    print(f"{'shape':>9} {'P/C/R':>11} {'skipped':>8} {'whole ms':>9} {'split ms':>9} {'ratio':>6}  picks"
          + (f" {'flex ms':>9} {'mask ms':>8} {'flex/picked':>11}" if args.flex else ""))
    for shape in args.shape or list(SHAPES):
        heads, kv_heads, dim = (int(x) for x in shape.split(","))
        for spec in args.lengths.split(","):
            lengths = tuple(int(x) for x in spec.split("/"))
            whole, split = (time_segment(heads, kv_heads, dim, lengths, s, args.repeats) for s in (False, True))
            span = segment(lengths)
            skipped, picks = packing.skipped_scores(*span), "split" if packing.splits(span) else "whole"
            rows.append({"shape": shape, "lengths": spec, "skipped_scores": skipped, "whole_ms": whole * 1e3,
                         "split_ms": split * 1e3, "ratio": split / whole, "picks": picks})
            line = (f"{shape:>9} {spec:>11} {skipped:>8} {whole * 1e3:9.3f} {split * 1e3:9.3f} "
                    f"{split / whole:6.2f}  {picks:>5}")
            if args.flex:
                flex_s = time_segment(heads, kv_heads, dim, lengths, "flex", args.repeats)
                mask_s, picked = time_block_mask(lengths, args.repeats), split if picks == "split" else whole
                rows[-1].update(flex_ms=flex_s * 1e3, mask_ms=mask_s * 1e3, flex_over_picked=flex_s / picked)
                line += f" {flex_s * 1e3:9.3f} {mask_s * 1e3:8.3f} {flex_s / picked:11.2f}"
            print(line, flush=True)
    print(json.dumps({"threads": torch.get_num_threads(), "split_min_scores": packing.SPLIT_MIN_SCORES,
                      "rows": rows}))


if __name__ == "__main__":
    main()
