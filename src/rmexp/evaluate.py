"""Evaluate a reward model on a pairs file: `rmexp-evaluate checkpoint=<dir> data.path=<file>`.

Writes into its own run dir `eval_metrics.json` (pairwise accuracy with a 95% Wilson interval, ties,
margins, reward mean/std, accuracy by prompt length and by `source`/`subset`, calibration), the
reward diagnostics (rmexp.diagnostics: diagnostics.json, reliability.png, rewards.png) and
`scores.jsonl` (one line per distinct pair, in the file's order, with its `pair_id` and `source`), and logs
them, with the reward histograms and a table of the worst-scored pairs, to W&B when it is on. Pairs
are tokenized and scored `eval.chunk_pairs` at a time, in packed rows (`eval.packed`,
`eval.row_tokens`); each chunk's scores are appended to `scores.jsonl.partial` as they come, renamed
to `scores.jsonl` once every pair is scored.

It logs what reading the file did (pairs scored of records read, bad records skipped by reason, the format
it was read as) and what fitting to max_length cut (training's `log_truncation` line), and writes the same
into eval_metrics.json. A pair repeated in the file is scored once, as its first copy, and counted
(`n_duplicates`, `duplicates`) whatever data.on_error says; a training file's duplicate still stops training.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from rmexp import console
from rmexp.config import CONF_PATH, EvaluateConfig, LoggerBackend, SourceConfig, check_paths, to_typed
from rmexp.rundir import locate

# torch, datasets and transformers are imported in the functions that use them, so a bad override fails in
# composition in about a second (as rmexp-train's), not after ~10 s of imports

log = logging.getLogger("rmexp.evaluate")  # by name: run as `python -m rmexp.evaluate` this module is __main__
DUPLICATES_LISTED = 100  # duplicate pairs eval_metrics.json lists by line (n_duplicates counts them all)
DUPLICATES_LOGGED = 3  # of which the log line names


def evaluate(cfg: EvaluateConfig | DictConfig) -> dict:
    from rmexp import diagnostics, uncertainty
    from rmexp.dataset import log_truncation, source_pairs, sources_of
    from rmexp.metrics import accuracy_by, length_baseline_accuracy, pairwise_metrics
    from rmexp.reward_model import RewardModel
    from rmexp.rundir import write_json

    cfg = to_typed(cfg)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    sources_of(cfg.data)  # the same config checks as training's
    # a repeated pair is scored once (its first copy) and counted, whatever data.on_error says: unlike a training
    # file's, it does no harm here, and stopping on it made a public file (LLaMA-Factory's dpo_en_demo) unusable
    pairs, stats, origin, data_format = source_pairs(SourceConfig(path=cfg.data.path, split=cfg.data.split),
                                                     cfg.data, on_duplicate="skip")
    log_read(origin, stats, data_format, cfg.data)
    model = RewardModel.load(cfg.checkpoint, packed=cfg.eval.packed, row_tokens=cfg.eval.row_tokens, device=cfg.device)
    if cfg.data.system_prompt:  # else the one the model was trained with
        model.system_prompt = cfg.data.system_prompt
    rewards, lengths, prompt_buckets, truncation, members = score_file(model, pairs, cfg, out_dir / "scores.jsonl")
    log_truncation({origin: truncation}, f"max_length={model.max_length} (the run's trainer.max_length)", log)
    chosen, rejected = rewards[:, 0].numpy(), rewards[:, 1].numpy()
    correct = [bool(c > r) for c, r in zip(chosen, rejected, strict=True)]
    metrics = pairwise_metrics(chosen, rejected)
    metrics["length_baseline_accuracy"] = length_baseline_accuracy(lengths[:, 0].numpy(), lengths[:, 1].numpy())
    metrics["by_prompt_tokens"] = accuracy_by(prompt_buckets, correct)
    # ece, brier, by_source and (data.categories) the category-averaged accuracy; figures beside the scores
    diag = diagnostics.summary(chosen, rejected, [p.source for p in pairs], cfg.data.categories)
    metrics |= diag
    images = diagnostics.write(out_dir, chosen, rejected, diag)
    metrics["n_truncated"] = truncation["n_truncated"]
    # which pairs it is unsure of: |margin| for every model, the members' spread and disagreement for an ensemble
    metrics["uncertainty"] = uncertainty.summary(chosen, rejected, None if members is None else members.numpy())
    runtime = time.time() - started
    metrics.update(checkpoint=str(Path(cfg.checkpoint).expanduser().resolve()), data=str(cfg.data.path),
                   data_stats=stats.as_dict(),
                   data_format=data_format, n_duplicates=len(stats.duplicates),
                   duplicates=[{"line": f"{origin}:{line}", "first": f"{origin}:{first}"}
                               for line, first in list(stats.duplicates.items())[:DUPLICATES_LISTED]],
                   truncation=truncation,
                   max_length=model.max_length, packed=model.packed, runtime_s=round(runtime, 2),
                   pairs_per_s=round(len(pairs) / runtime, 3))
    write_json(out_dir / "eval_metrics.json", metrics)
    print(f"pairwise accuracy {metrics['pairwise_accuracy']:.3f} [{metrics['ci_low']:.2f}, {metrics['ci_high']:.2f}] "
          f"on {metrics['n_pairs']} pairs of {cfg.data.path}; length alone {metrics['length_baseline_accuracy']:.2f} "
          f"-> {out_dir}")
    if len(metrics["uncertainty"]) > 1:  # an ensemble: does its uncertainty find the wrong pairs better than |margin|?
        print("uncertainty against error, AUROC: " + ", ".join(
            f"{name} {u['auroc']:.3f}" if u["auroc"] is not None else f"{name} -"
            for name, u in metrics["uncertainty"].items()))
    if cfg.logger.backend is LoggerBackend.wandb:
        log_to_wandb(cfg, out_dir, metrics, pairs, rewards, images)
    return metrics


def log_read(origin: str, stats, data_format: str, data_cfg) -> None:
    """One line on what reading the file did: pairs scored of records read, bad records skipped by reason,
    duplicate pairs scored once (the first few named with their first copy), the format it was read as."""
    asked = getattr(data_cfg.format, "value", data_cfg.format)  # evaluate's one source has data.format
    how = f"read as {data_format}" + (f" (data.format={asked})" if asked != data_format else "")
    bad = {k: v for k, v in stats.skipped.items() if k != "duplicate_pair"}
    msg = f"{origin}: {how}: {stats.n_pairs} pairs scored of {stats.n_records} records"
    if bad:
        msg += (f"; skipped {sum(bad.values())} bad records (data.on_error={data_cfg.on_error.value}): "
                f"{dict(sorted(bad.items()))}")
    if stats.duplicates:
        named = ", ".join(f"line {line} repeats line {first}"
                          for line, first in list(stats.duplicates.items())[:DUPLICATES_LOGGED])
        more = f", and {len(stats.duplicates) - DUPLICATES_LOGGED} more" if len(stats.duplicates) > DUPLICATES_LOGGED else ""
        msg += f"; {len(stats.duplicates)} duplicate pairs scored once, as their first copy ({named}{more})"
    log.log(logging.WARNING if stats.skipped else logging.INFO, msg)


def score_file(model, pairs, cfg, path: Path):
    """Score pairs a chunk at a time, appending each chunk's lines to `<path>.partial` (renamed to `path`
    at the end), so only one chunk's tokens are held at once. Returns rewards (n x 2), answer lengths in
    tokens (n x 2), each pair's prompt-length bucket, the truncation counts (rmexp.dataset.truncation_counts:
    n_truncated, n_prompt_truncated, n_answer_truncated, n_identical_after_truncation) and, for an ensemble, its
    members' standardized rewards (K x n x 2; else None), which each line of scores.jsonl also carries."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from rmexp.dataset import truncation_counts
    from rmexp.metrics import bucket_of
    from rmexp.rundir import pair_id, pair_identity, score_lines
    from rmexp.uncertainty import member_margins

    rewards, lengths = torch.empty(len(pairs), 2), torch.empty(len(pairs), 2, dtype=torch.long)
    buckets, flags = [], {"prompt_truncated": [], "answer_truncated": [], "identical": []}
    members = []
    partial = path.with_name(path.name + ".partial")
    chunk = max(1, int(cfg.eval.chunk_pairs))
    with partial.open("w", encoding="utf-8") as f, \
            tqdm(total=len(pairs), desc="scoring", unit="pair", disable=len(pairs) < 32) as bar:
        for start in range(0, len(pairs), chunk):
            encoded = model.encode(pairs[start:start + chunk])
            part = model.score_encoded(encoded, batch_size=cfg.batch_size, progress=bar)
            rewards[start:start + len(encoded)] = part
            lengths[start:start + len(encoded)] = torch.tensor(
                [[e.chosen.answer_tokens, e.rejected.answer_tokens] for e in encoded])
            buckets += [bucket_of(e.chosen.prompt_tokens) for e in encoded]
            flags["prompt_truncated"] += [e.chosen.prompt_truncated or e.rejected.prompt_truncated for e in encoded]
            flags["answer_truncated"] += [e.chosen.answer_truncated or e.rejected.answer_truncated for e in encoded]
            flags["identical"] += [e.identical for e in encoded]
            identity = [pair_identity(pair_id(p), p.source) for p in pairs[start:start + len(encoded)]]
            if getattr(model, "last_members", None) is not None:  # an ensemble: each member's rewards, their spread
                members.append(model.last_members)
                spread = member_margins(model.last_members.numpy()).std(axis=0)
                identity = [ident | {"members_chosen": model.last_members[:, k, 0].tolist(),
                                     "members_rejected": model.last_members[:, k, 1].tolist(),
                                     "uncertainty": float(spread[k])}
                            for k, ident in enumerate(identity)]
            f.writelines(score_lines(part, start, identity))
            f.flush()
    os.replace(partial, path)
    return (rewards, lengths, buckets, truncation_counts({k: np.array(v, dtype=bool) for k, v in flags.items()}),
            torch.cat(members, dim=1) if members else None)


def log_to_wandb(cfg, out_dir: Path, metrics: dict, pairs, rewards, images: dict) -> None:
    import wandb

    from rmexp import diagnostics
    from rmexp.data import answer_text
    from rmexp.tracking import start_run

    config = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=False, enum_to_str=True)  # resolved already
    run = start_run(cfg.logger, config, out_dir, f"eval-{Path(str(cfg.checkpoint)).name}", None)
    try:
        run.log({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
                | {f"eval/{k}": v for k, v in diagnostics.scalars(metrics).items()}
                | {f"eval/uncertainty/{name}/{k}": v for name, figures in metrics["uncertainty"].items()
                   for k, v in figures.items() if v is not None}
                | diagnostics.images_payload(rewards[:, 0].numpy(), rewards[:, 1].numpy(), images))
        margins = (rewards[:, 0] - rewards[:, 1]).tolist()
        worst = sorted(range(len(pairs)), key=lambda i: margins[i])[:cfg.worst_pairs]
        table = wandb.Table(columns=["index", "margin", "prompt", "chosen", "rejected"])
        for i in worst:
            prompt = pairs[i].prompt[-1]["content"] if pairs[i].prompt else ""
            table.add_data(i, margins[i], prompt[-500:], answer_text(pairs[i].chosen)[:500],
                           answer_text(pairs[i].rejected)[:500])
        run.log({"eval/worst_pairs": table})
        run.summary.update({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
    finally:
        wandb.finish()


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="evaluate")
def app(cfg: DictConfig) -> float:
    with console.reported():
        cfg = to_typed(cfg)
        locate(Path(cfg.checkpoint).expanduser())  # what the path holds, before torch loads
        check_paths(cfg.data)
        return evaluate(cfg)["pairwise_accuracy"]


def cli() -> None:
    console.run(app, EvaluateConfig)


if __name__ == "__main__":
    cli()
