"""Data pipeline benchmark: load + validate + tokenize N pairs, today's in-memory path vs the datasets one.

    python bench/data.py --pairs 1000000            # num_proc 2, Gemma-3's tokenizer, max_length 512

Writes a synthetic file of N seed-format pairs (made-up words; token lengths drawn like HH-RLHF's:
prompt median 90 tokens with a long tail, answers ~40-50), once, then runs each path in its own
process: the older in-memory path (`rmexp.data.load_pairs` + `split_pairs` +
`tokenize_pairs`: Python lists, one process; only with `--today-src`, since that reader left src/), the
datasets path (`rmexp.dataset.build_datasets`, `--num-proc` workers, an empty
cache), and the datasets path again on the cache it wrote. Peak memory is the largest PSS sum over the
process and its children, sampled every 0.2 s (a page shared by n processes counts 1/n in each). Prints one JSON line at the end. `--today-src DIR` runs the in-memory path from
another checkout's src/ (e.g. `git archive 7c68345 | tar -x -C /tmp/old`, then --today-src /tmp/old/src).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def write_pairs(path: Path, n: int, seed: int, tokens_per_word: float) -> None:
    """N pairs of made-up words; prompt/chosen/rejected token lengths lognormal like HH-RLHF's
    (prompt median 90, p95 ~330; chosen mean ~40, rejected mean ~50)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "ten", "ra", "su", "vo", "nel", "da", "pri", "go", "shi", "ter", "an", "bu", "es"]
    vocab = np.array(sorted({"".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(20000)}))
    words = lambda tokens: max(1, int(tokens / tokens_per_word))  # noqa: E731
    prompt = rng.lognormal(np.log(90), 0.8, n)
    chosen, rejected = rng.lognormal(np.log(30), 0.75, n), rng.lognormal(np.log(37), 0.75, n)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for i in range(n):
            text = [" ".join(vocab[rng.integers(0, len(vocab), words(t))]) for t in (prompt[i], chosen[i], rejected[i])]
            f.write(json.dumps({"question": f"{i}: {text[0]}?", "chosen": text[1] + ".", "rejected": text[2] + "."}) + "\n")
    tmp.rename(path)


class PeakRSS:
    """Largest memory summed over this process and its children, sampled in a thread: PSS (a page shared
    by n processes counts 1/n in each, so forked workers are not charged twice for the parent's pages)
    where Linux gives it, else RSS. Past `limit_mb` the process exits (code 3) instead of taking the machine."""

    def __init__(self, limit_mb: float | None = None):
        import psutil

        self.proc, self.peak, self.done, self.limit_mb = psutil.Process(), 0, False, limit_mb
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    @staticmethod
    def used(p) -> int:
        try:
            return p.memory_full_info().pss
        except (AttributeError, OSError):
            return p.memory_info().rss

    def sample(self):
        import psutil

        while not self.done:
            total = 0
            for p in [self.proc, *self.proc.children(recursive=True)]:
                try:
                    total += self.used(p)
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            if self.limit_mb and total / 2**20 > self.limit_mb:
                print(json.dumps({"exceeded_mb": total / 2**20}), flush=True)
                os._exit(3)
            time.sleep(0.2)

    def stop(self) -> float:
        self.done = True
        self.thread.join()
        return self.peak / 2**20


def load_tokenizer(model: str):
    from rmexp.builtin import resolve_model_path
    from rmexp.model import load_tokenizer as load

    return load(resolve_model_path(f"builtin:{model}" if ":" not in model and not Path(model).exists() else model,
                                   "~/.cache/rmexp"))


def worker(args) -> None:
    tok = load_tokenizer(args.model)
    rss = PeakRSS(args.limit_mb)
    start = time.perf_counter()
    if args.worker == "today":
        from rmexp.data import load_pairs, split_pairs, tokenize_pairs  # in --today-src: an older checkout's

        pairs, _ = load_pairs(args.file)
        train, held = split_pairs(pairs, 0.1, 42)
        n = len(train) + len(held)
        (a, _), (b, _) = tokenize_pairs(tok, train, args.max_length), tokenize_pairs(tok, held, args.max_length)
        tokens = sum(map(len, a["chosen_ids"])) + sum(map(len, a["rejected_ids"]))
    else:
        from rmexp.dataset import build_datasets, data_config

        cfg = data_config(path=str(args.file), eval_fraction=0.1, split_seed=42, num_proc=args.num_proc,
                          cache_dir=args.cache_dir)
        a, b, _ = build_datasets(cfg, tok, args.max_length)
        n = len(a) + len(b)
        tokens = None
    seconds = time.perf_counter() - start
    peak = rss.stop()
    print(json.dumps({"pairs": n, "seconds": seconds, "peak_rss_mb": peak, "train_tokens": tokens}))


def len_train(n: int) -> int:
    return n - max(1, round(n * 0.1))


def run(args, role: str, *extra: str, src: str | None = None) -> dict:
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, __file__, "--worker", role, "--file", str(args.file), "--model", args.model,
           "--max-length", str(args.max_length), "--num-proc", str(args.num_proc), "--limit-mb", str(args.limit_mb),
           *extra]
    started = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode == 3:  # over the memory limit: it would not finish on this machine
        exceeded = json.loads(out.stdout.strip().splitlines()[-1])["exceeded_mb"]
        print(f"{role}: stopped at {exceeded:.0f} MB (--limit-mb {args.limit_mb:.0f}) after "
              f"{time.perf_counter() - started:.0f} s: does not fit this machine", flush=True)
        return {"pairs": None, "seconds": None, "peak_rss_mb": exceeded, "train_tokens": None, "exceeded": True}
    if out.returncode != 0:
        raise SystemExit(f"{role} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{role}: {result['pairs']} pairs in {result['seconds']:.1f} s ({result['pairs'] / result['seconds']:.0f} "
          f"pairs/s), peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
    return result


def _total_mb() -> float:
    import psutil

    return psutil.virtual_memory().total / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=100_000)
    ap.add_argument("--model", default="gemma3_270m", help="whose tokenizer: a builtin name, hub id or directory")
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "rmexp-bench-data"))
    ap.add_argument("--today-src", default=None, help="run the in-memory path from this src/ directory")
    ap.add_argument("--skip-today", action="store_true", help="only the datasets path (first and cached)")
    ap.add_argument("--limit-mb", type=float, default=0.8 * _total_mb(),
                    help="stop a path whose memory passes this (default: 80%% of this machine's)")
    ap.add_argument("--worker", choices=["today", "new"], help=argparse.SUPPRESS)
    ap.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    args.file = data_dir / f"synthetic-{args.pairs}-seed{args.seed}.jsonl"
    if not args.file.is_file():
        tok = load_tokenizer(args.model)
        probe = data_dir / "probe.jsonl"
        write_pairs(probe, 200, args.seed + 1, 1.0)
        rows = [json.loads(line) for line in probe.read_text().splitlines()]
        words = sum(len(r["chosen"].split()) for r in rows)
        tokens_per_word = sum(len(tok(r["chosen"], add_special_tokens=False)["input_ids"]) for r in rows) / words
        started = time.time()
        write_pairs(args.file, args.pairs, args.seed, tokens_per_word)
        print(f"wrote {args.file} ({args.file.stat().st_size / 2**20:.0f} MB, {tokens_per_word:.2f} tokens a word) "
              f"in {time.time() - started:.0f} s", flush=True)
    cache = tempfile.mkdtemp(prefix="rmexp-bench-cache-", dir=data_dir)
    today = None if args.skip_today or not args.today_src else run(args, "today", src=args.today_src)
    first = run(args, "new", "--cache-dir", cache)
    cached = run(args, "new", "--cache-dir", cache)
    subprocess.run(["rm", "-rf", cache])
    n = first["pairs"]
    done = today is not None and not today.get("exceeded")
    new_peak = max(first["peak_rss_mb"], cached["peak_rss_mb"])
    result = {
        "pairs": n, "num_proc": args.num_proc, "model": args.model,
        "today_pairs_per_s": round(n / today["seconds"], 1) if done else None,
        "new_pairs_per_s": round(n / first["seconds"], 1),
        "today_peak_rss_mb": round(today["peak_rss_mb"]) if today else None,
        "new_peak_rss_mb": round(new_peak),
        "first_s": round(first["seconds"], 1), "cached_s": round(cached["seconds"], 2),
        "today_s": round(today["seconds"], 1) if done else None,
        "today_exceeded_limit_mb": round(args.limit_mb) if today and not done else None,
        "speedup": round(today["seconds"] / first["seconds"], 2) if done else None,
        "rss_ratio": round(new_peak / today["peak_rss_mb"], 3) if today else None,
        "cached_speedup": round(first["seconds"] / cached["seconds"], 1),
        "train_tokens_per_pair": round(today["train_tokens"] / len_train(n), 1) if done else None,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
