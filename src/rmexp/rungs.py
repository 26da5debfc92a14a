"""The rung split of a halving sweep: scored at fractions of a run's planned steps, each pair's Bradley-Terry loss
written to the run dir's rungs.jsonl, so every decision a sweep takes on it can be replayed.

    rmexp-train data.rung_path=<pairs> trainer.rungs=[0.111111,0.333333,1.0]      # score the rung split 3 times
    ... trainer.stop_at_rung=0                                                    # and pause after the first

A rung is a fraction f of the run's planned optimizer steps, at step `rung_steps` (max(1, round(f x planned))),
the same step whether the run goes through or pauses and resumes there, so a halving sweep's survivor, continued
from its rung checkpoint, is the uninterrupted run. One rungs.jsonl line per scored rung: the step, the mean loss
and accuracy, and the per-pair arrays (pair_id, chosen and rejected rewards, loss). The file is read without torch
(rmexp.halving, rmexp.report, bench/halving.py); the trainer callback that writes it is rmexp.callbacks.RungScoring.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

RUNGS_FILE = "rungs.jsonl"


def rung_steps(fractions: list[float], planned: int) -> list[int]:
    """The optimizer step of each rung: the fraction of the planned steps, rounded, at least 1."""
    return [min(planned, max(1, round(f * planned))) for f in fractions]


def pair_loss(chosen: float, rejected: float) -> float:
    """-log sigmoid(chosen - rejected), in float64 (softplus of the negated margin, stable either sign)."""
    x = rejected - chosen
    return x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))


def planned_steps(record: dict) -> int:
    """The run's planned steps, from one of its rungs."""
    return record.get("planned_steps") or round(record["step"] / record["fraction"])


def summary(record: dict) -> dict:
    """A rungs.jsonl line without its per-pair arrays."""
    return {k: v for k, v in record.items() if k != "pairs"}


def read_rungs(run_dir: str | Path) -> list[dict]:
    """Every rung a run scored, in rung order (one per rung: the last written wins). A half-written last line
    (a kill during the write) is left out."""
    path, records = Path(run_dir) / RUNGS_FILE, {}
    if not path.is_file():
        return []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        records[record["rung"]] = record
    return [records[r] for r in sorted(records)]


def keep_until(run_dir: Path, step: int) -> list[dict]:
    """rungs.jsonl with only the rungs scored at `step` or before (a resume from a checkpoint at `step` scores the
    later ones again); the rungs kept."""
    kept = [r for r in read_rungs(run_dir) if r["step"] <= step]
    path = run_dir / RUNGS_FILE
    if path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, path)
    return kept


def rung_record(index: int, fraction: float, step: int, planned: int, rewards, pair_ids: list[str], train_s: float,
                score_s: float) -> dict:
    """One rungs.jsonl line: the rung's mean loss and accuracy over its pairs, and each pair's rewards and loss."""
    chosen, rejected = [float(r[0]) for r in rewards], [float(r[1]) for r in rewards]
    losses = [pair_loss(c, r) for c, r in zip(chosen, rejected, strict=True)]
    n = len(losses)
    return {"rung": index, "fraction": fraction, "step": step, "planned_steps": planned, "n_pairs": n, "loss": sum(losses) / n,
            "accuracy": sum(c > r for c, r in zip(chosen, rejected, strict=True)) / n,
            "train_s": round(train_s, 2), "score_s": round(score_s, 2),
            "pairs": {"pair_id": pair_ids, "chosen": chosen, "rejected": rejected, "loss": losses}}
