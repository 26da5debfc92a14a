"""Two runs on the pairs they share: `rmexp-compare a=<run or eval dir> b=<run or eval dir>`.

A run dir (rmexp-train) and an eval dir (rmexp-evaluate) both hold `scores.jsonl`, one line per
scored pair with its `pair_id` (rmexp.rundir.pair_id) and `source`. Two of them are paired on the
pair ids they share, in a's order, and compared pair by pair (rmexp.stats.paired_comparison):
overall and per source/subset, printed as a table and returned. Runs that share no pair, or runs
scored before pairs had ids, are refused with the reason (`PairingError`). rmexp-report uses the same
reading and pairing for a sweep's jobs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from rmexp import console
from rmexp.config import CONF_PATH, CompareConfig, to_typed
from rmexp.errors import MissingPathError, UserError
from rmexp.stats import N_RESAMPLES, paired_comparison

SCORES = "scores.jsonl"


class PairingError(UserError, ValueError):
    """Two runs that cannot be compared pair by pair; the message says why."""


@dataclass
class Scores:
    """A run's per-pair decisions (1.0: chosen scored higher; a tie is 0.0), by pair id, in scoring order."""

    where: str
    pair_ids: list[str]
    decisions: np.ndarray
    sources: list[str | None]
    members: np.ndarray | None = None  # a mean ensemble's: each member's decisions (K x pairs), from its rewards

    @property
    def accuracy(self) -> float:
        return float(self.decisions.mean())


def read_scores(path: str | Path) -> Scores:
    """The scores.jsonl of a run dir or an eval dir (or the file itself). A pair scored twice (an eval file
    that holds it twice) counts once, at its first line, as pairing needs one decision per id."""
    path = Path(path)
    file = path / SCORES if path.is_dir() else path
    if not file.is_file():
        raise PairingError(f"{path}: no {SCORES} (not a finished rmexp run or rmexp-evaluate dir)")
    ids, decided, sources, members, seen = [], [], [], [], set()
    with file.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            row = json.loads(line)
            if "pair_id" not in row:
                raise PairingError(f"{file}:{n}: no pair_id (scored by an rmexp before pairs had ids): score it "
                                   "again with rmexp-evaluate to compare it")
            if row["pair_id"] in seen:
                continue
            seen.add(row["pair_id"])
            ids.append(row["pair_id"])
            decided.append(float(row["reward_chosen"] > row["reward_rejected"]))
            sources.append(row.get("source"))
            if "members_chosen" in row:
                members.append(np.greater(row["members_chosen"], row["members_rejected"]).astype(float))
    if not ids:
        raise PairingError(f"{file}: no scored pairs")
    return Scores(str(path), ids, np.asarray(decided), sources,
                  np.stack(members, axis=1) if len(members) == len(ids) else None)


def member_names(path: str | Path, k: int) -> list[str]:
    """The run dirs of a mean ensemble's members, by the ensemble.json of the dir an eval dir evaluated."""
    from rmexp.rundir import evaluated_ensemble

    names = [m["path"] for m in (evaluated_ensemble(Path(path)) or {}).get("members", [])]
    return names if len(names) == k else [f"member {i}" for i in range(k)]


def against_members(scores: Scores, n_resamples: int = N_RESAMPLES, seed: int = 0) -> dict[str, dict]:
    """A mean ensemble against each of its members on the same pairs (paired_comparison(member, ensemble): delta
    is the ensemble's gain), by member run dir; empty for any other model."""
    if scores.members is None:
        return {}
    names = member_names(scores.where, len(scores.members))
    return {name: paired_comparison(member, scores.decisions, n_resamples, seed)
            for name, member in zip(names, scores.members, strict=True)}


def aligned(reference: Scores, other: Scores, require_same: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Indices into reference and other of the pairs both scored, in reference's order. PairingError when they
    share none, or (require_same) when their pair sets differ at all, saying how many are shared."""
    position = {pid: i for i, pid in enumerate(other.pair_ids)}
    ref_idx = np.array([i for i, pid in enumerate(reference.pair_ids) if pid in position], dtype=np.int64)
    shared = len(ref_idx)
    if shared == 0:
        raise PairingError(f"scored on different eval pairs: none of the {len(other.pair_ids)} pairs of {other.where} "
                           f"is among the {len(reference.pair_ids)} of {reference.where}")
    if require_same and not (shared == len(reference.pair_ids) == len(other.pair_ids)):
        raise PairingError(f"scored on different eval pairs: {shared} shared of {len(other.pair_ids)} "
                           f"({other.where}) and {len(reference.pair_ids)} ({reference.where})")
    return ref_idx, np.array([position[reference.pair_ids[i]] for i in ref_idx], dtype=np.int64)


def averaged(runs: list[Scores], where: str) -> Scores:
    """Runs differing only in the seed as one: per pair, the share of the seeds that decided it right. The
    runs must have scored the same pairs (PairingError otherwise)."""
    first = runs[0]
    total = first.decisions.copy()
    for other in runs[1:]:
        ref_idx, other_idx = aligned(first, other, require_same=True)
        total[ref_idx] += other.decisions[other_idx]
    return Scores(where, first.pair_ids, total / len(runs), first.sources)


def compare(a: str | Path | Scores, b: str | Path | Scores, n_resamples: int = N_RESAMPLES, seed: int = 0) -> dict:
    """b against a on their shared pairs: `overall` and `by_source` (source -> paired_comparison of that
    source's shared pairs; a pair's source as a's scores.jsonl gives it, else b's), plus how many pairs of
    each were left out as unshared."""
    a = a if isinstance(a, Scores) else read_scores(a)
    b = b if isinstance(b, Scores) else read_scores(b)
    ia, ib = aligned(a, b)
    da, db = a.decisions[ia], b.decisions[ib]
    sources = np.array([a.sources[i] or b.sources[j] or "" for i, j in zip(ia, ib, strict=True)], dtype=object)
    by_source = {}
    for name in sorted(set(sources) - {""}):
        mask = sources == name
        by_source[name] = paired_comparison(da[mask], db[mask], n_resamples, seed)
    return {"a": a.where, "b": b.where, "n_only_a": len(a.pair_ids) - len(ia), "n_only_b": len(b.pair_ids) - len(ib),
            "overall": paired_comparison(da, db, n_resamples, seed), "by_source": by_source,
            "members_a": against_members(a, n_resamples, seed), "members_b": against_members(b, n_resamples, seed)}


TABLE_COLUMNS = ["n_pairs", "accuracy_a", "accuracy_b", "delta", "delta_ci_low", "delta_ci_high", "n_a_better",
                 "n_b_better", "p_value"]


def table(result: dict, key: str = "by_source", first: str = "pairs") -> str:
    """The comparison as a markdown table: overall, then one row per source (or per `key`'s rows: a mean
    ensemble's members, `members_a`/`members_b`, each a against the ensemble as b)."""
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = [f"| {first} | " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * (len(TABLE_COLUMNS) + 1)]
    rows = [("all", result["overall"]), *result[key].items()] if key == "by_source" else result[key].items()
    for name, row in rows:
        lines.append(f"| {name} | " + " | ".join(cell(row[c]) for c in TABLE_COLUMNS) + " |")
    return "\n".join(lines)


def verdict(result: dict, alpha: float = 0.05) -> str:
    o = result["overall"]
    told = "b is better" if o["delta"] > 0 else "a is better"
    head = (f"b - a = {o['delta']:+.4f} [{o['delta_ci_low']:+.4f}, {o['delta_ci_high']:+.4f}] on {o['n_pairs']} shared "
            f"pairs; McNemar p = {o['p_value']:.3g} ({o['n_a_better']} pairs only a decides right, "
            f"{o['n_b_better']} only b)")
    tail = f": {told}" if o["p_value"] < alpha else ": the two cannot be told apart on these pairs"
    unshared = (f" ({result['n_only_a']} pairs only in a, {result['n_only_b']} only in b, left out)"
                if result["n_only_a"] or result["n_only_b"] else "")
    return head + tail + unshared


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="compare")
def app(cfg: DictConfig) -> dict | None:
    with console.reported():
        args = to_typed(cfg)
        for key in ("a", "b"):
            if not Path(getattr(args, key)).exists():
                raise MissingPathError(f"{key}: no such run or eval dir {getattr(args, key)}")
        try:
            result = compare(args.a, args.b, args.n_resamples, args.seed)
        except PairingError as e:
            raise PairingError(f"cannot pair {args.a} and {args.b}: {e}") from e
    print(f"a = {result['a']}\nb = {result['b']}\n")
    print(table(result))
    print("\n" + verdict(result))
    for side in ("a", "b"):
        if result[f"members_{side}"]:
            print(f"\n{side} is a mean ensemble; each member (a) against it (b) on all of {side}'s pairs:\n"
                  + table(result, f"members_{side}", "member"))
    return result


def cli() -> None:
    console.run(app, CompareConfig)


if __name__ == "__main__":
    cli()
