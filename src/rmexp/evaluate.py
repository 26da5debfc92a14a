"""Evaluate a reward model on a pairs file: `python -m rmexp.evaluate checkpoint=<dir> data=file data.path=<file>`.

Writes into its own run dir `eval_metrics.json` (pairwise accuracy with a 95% Wilson interval, ties,
margins, reward mean/std, accuracy by prompt length and by `source`/`subset`) and `scores.jsonl`
(one line per pair), and logs them, with a table of the worst-scored pairs, to W&B when it is on.
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from rmexp.config import CONF_DIR
from rmexp.data import answer_text, load_pairs
from rmexp.metrics import length_baseline_accuracy, pairwise_metrics
from rmexp.train import write_json, write_scores

PROMPT_BUCKETS = (64, 128, 256, 512)  # prompt-length bucket edges, in tokens


def bucket_of(n_tokens: int) -> str:
    lower = 0
    for edge in PROMPT_BUCKETS:
        if n_tokens < edge:
            return f"{lower}-{edge - 1}"
        lower = edge
    return f"{lower}+"


def accuracy_by(labels: list[str], correct: list[bool]) -> dict[str, dict]:
    groups: dict[str, list[bool]] = {}
    for label, ok in zip(labels, correct, strict=True):
        groups.setdefault(label, []).append(ok)
    def order(label: str):  # numeric buckets by their lower edge, names alphabetically
        head = label.split("-")[0].rstrip("+")
        return (0, int(head), "") if head.isdigit() else (1, 0, label)

    return {k: {"pairwise_accuracy": sum(v) / len(v), "n_pairs": len(v)}
            for k, v in sorted(groups.items(), key=lambda kv: order(kv[0]))}


def evaluate(cfg: DictConfig) -> dict:
    from rmexp.reward_model import RewardModel

    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    on_error = getattr(cfg.data.on_error, "value", cfg.data.on_error)
    pairs, stats = load_pairs(cfg.data.path, cfg.data.max_pairs, on_error)
    model = RewardModel.load(cfg.checkpoint)
    if cfg.data.system_prompt:  # else the one the model was trained with
        model.system_prompt = cfg.data.system_prompt
    encoded = model.encode(pairs)
    rewards = model.score_encoded(encoded, batch_size=cfg.batch_size, progress=True)
    chosen, rejected = rewards[:, 0].numpy(), rewards[:, 1].numpy()
    correct = [bool(c > r) for c, r in zip(chosen, rejected, strict=True)]
    metrics = pairwise_metrics(chosen, rejected)
    metrics["length_baseline_accuracy"] = length_baseline_accuracy([e.chosen.answer_tokens for e in encoded],
                                                                   [e.rejected.answer_tokens for e in encoded])
    metrics["by_prompt_tokens"] = accuracy_by([bucket_of(e.chosen.prompt_tokens) for e in encoded], correct)
    if any(p.source for p in pairs):
        metrics["by_source"] = accuracy_by([p.source or "(none)" for p in pairs], correct)
    metrics["n_truncated"] = sum(e.truncated for e in encoded)
    metrics.update(checkpoint=str(cfg.checkpoint), data=str(cfg.data.path), data_stats=stats.as_dict(),
                   max_length=model.max_length, runtime_s=round(time.time() - started, 2))
    write_json(out_dir / "eval_metrics.json", metrics)
    write_scores(out_dir / "scores.jsonl", rewards)
    print(f"pairwise accuracy {metrics['pairwise_accuracy']:.3f} [{metrics['ci_low']:.2f}, {metrics['ci_high']:.2f}] "
          f"on {metrics['n_pairs']} pairs of {cfg.data.path}; length alone {metrics['length_baseline_accuracy']:.2f} "
          f"-> {out_dir}")
    if getattr(cfg.logger.backend, "value", cfg.logger.backend) == "wandb":
        log_to_wandb(cfg, out_dir, metrics, pairs, rewards)
    return metrics


def log_to_wandb(cfg, out_dir: Path, metrics: dict, pairs, rewards) -> None:
    import wandb

    from rmexp.tracking import start_run

    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    run = start_run(cfg.logger, config, out_dir, f"eval-{Path(str(cfg.checkpoint)).name}", None)
    try:
        run.log({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
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


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def cli(cfg: DictConfig) -> float:
    return evaluate(cfg)["pairwise_accuracy"]


if __name__ == "__main__":
    cli()
