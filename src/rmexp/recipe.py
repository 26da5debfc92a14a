"""The training recipe: `train(cfg, resume, record)` runs one 4-bit QLoRA reward model from a checked config.

One linear path: data -> model -> TRL RewardTrainer -> final held-out evaluation -> adapter, tokenizer,
scores.jsonl and, through `record`, metrics.json in the run dir (rmexp.rundir). Its command, `rmexp-train
[overrides]`, is rmexp.train, whose `main(cfg)` claims the run dir, decides where training starts and checks
the config before it imports this module (torch, transformers, peft, trl).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from transformers import set_seed

from rmexp.builtin import resolve_model_path
from rmexp.callbacks import RungScoring, own_rng
from rmexp.config import RMExpConfig
from rmexp.dataset import build_datasets, log_truncation
from rmexp.diagnostics import EvalDiagnostics, summary
from rmexp.metrics import length_baseline_accuracy
from rmexp.model import build_lora_config, load_reward_model, load_tokenizer
from rmexp.packing import build_collator
from rmexp.preemption import StopOnSignal
from rmexp.prepare import for_training
from rmexp.resume import Resume
from rmexp.rundir import RUN_CONFIG, RunRecord, write_run_config, write_scores, writes_to
from rmexp.tracking import job_identity, scrub_secrets, start_run
from rmexp.trainer import PairwiseRewardTrainer, last_eval_at
from rmexp.training_args import build_reward_config

log = logging.getLogger("rmexp.train")  # the command's name in train.log


def train(cfg: RMExpConfig, resume: Resume, record: RunRecord, callbacks: list | None = None) -> None:
    """setup -> train -> save for a typed, checked config (rmexp.train.main has claimed the run dir, decided
    where training starts, and owns `record`, whose `result` becomes metrics.json)."""
    run_dir, main_process = Path(cfg.paths.output_dir), record.write  # rank 0 alone writes and logs
    # setup: the data before the model (its errors in seconds, not after an 8B load)
    model_path = resolve_model_path(cfg.model.name_or_path, cfg.model.cache_dir)
    tokenizer = load_tokenizer(model_path, cfg.model.revision, cfg.model.trust_remote_code)
    data = load_data(cfg, tokenizer)
    set_seed(cfg.trainer.seed)  # the new score head and the LoRA weights are drawn from this seed
    model, tokenizer, model_path = load_reward_model(cfg.model, cfg.quantization, tokenizer)
    if main_process:
        record.running(describe_run(cfg, run_dir, data, resume))
    stop_on_signal = StopOnSignal(run_dir)
    rungs = rung_scoring(cfg, data, run_dir, main_process, record.wandb_run)
    trainer = build_trainer(cfg, model, tokenizer, data, run_dir, record.wandb_run,
                            [*(callbacks or []), stop_on_signal, *([rungs] if rungs else [])], main_process)
    if rungs:
        rungs.trainer = trainer

    # train, between two evaluations of the same held-out pairs (before: the untrained baseline, which a resumed
    # launch scores too: trainer.train loads the checkpoint); a launch that pauses at a rung (a halving sweep's)
    # evaluates neither: the launch that finishes the run does. Scoring draws no random number training would
    # (own_rng), so a run that pauses and resumes draws the dropout masks of one that does not.
    pausing = rungs is not None and rungs.stop_at is not None
    if pausing and (reached := rungs.reached(resume.checkpoint)) is not None:  # killed after the rung's checkpoint
        record.result = paused_result(reached, rungs, resume, 0.0)
        return
    if pausing:
        initial = None
    else:
        with own_rng():
            initial = trainer.evaluate()["eval_pairwise_accuracy"]
    with stop_on_signal, writes_to(run_dir):  # checkpoints are saved while training
        train_output = trainer.train(resume_from_checkpoint=resume.checkpoint)
    stop_on_signal.raise_if_stopped(trainer.state.global_step)  # SIGTERM, or submitit's preemption
    if rungs is not None and rungs.paused is not None:
        record.result = paused_result(rungs.paused, rungs, resume, train_output.metrics["train_runtime"])
        if record.wandb_run is not None:
            record.wandb_run.summary.update({"halving/rung": rungs.paused["rung"],
                                             "halving/rung_loss": rungs.paused["loss"]})
        return
    final = last_eval_at(trainer, trainer.state.global_step) or trainer.evaluate()

    # save: adapter, score head, tokenizer and scores.jsonl; metrics.json when run_record ends
    with writes_to(run_dir):
        trainer.save_model(str(run_dir))  # adapter + score head (modules_to_save) + tokenizer; rank 0 only
        if main_process:
            (run_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle; the config is in rmexp_config.yaml
            write_scores(run_dir / "scores.jsonl", trainer.last_eval_rewards, data.eval_ids)
    record.result = run_result(trainer, final, initial, train_output, data) | ({"rungs": rungs.scored} if rungs else {}) | {
        "resumed_from": resume.checkpoint, "resume_skipped": resume.skipped, "model": model_path} | (
        {"resume_changes": resume.changes} if resume.changes else {})
    if record.wandb_run is not None:
        record.wandb_run.summary.update({f"eval/{k}": record.result[k] for k in (
            "pairwise_accuracy", "ci_low", "ci_high", "initial_pairwise_accuracy", "length_baseline_accuracy")}
            | {"eval/n_pairs": record.result["n_eval_pairs"]})


@dataclass
class Data:
    """The run's pairs, tokenized, and what reading them counted."""

    train: Any
    eval: Any
    stats: dict  # per source: pairs read, skipped (by reason), held out; logged to W&B and metrics.json
    truncation: dict  # per split: pairs and tokens cut to trainer.max_length
    eval_ids: list[dict]  # per eval pair: pair_id and source (scores.jsonl's)
    formats: dict  # the data.format each source was read as
    rung: Any = None  # the rung split (data.rung_*), scored at trainer.rungs
    rung_ids: list[dict] | None = None

    @property
    def eval_sources(self) -> list[str | None]:
        return [i.get("source") for i in self.eval_ids]


def load_data(cfg: RMExpConfig, tokenizer) -> Data:
    """The training and held-out datasets; truncation counted and logged, one line on the run."""
    train_ds, eval_ds, stats = build_datasets(cfg.data, tokenizer, cfg.trainer.max_length)
    data = Data(train_ds, eval_ds, stats, stats.pop("truncation"), stats.pop("eval_identity"), stats.pop("formats"),
                stats.pop("rung", None), stats.pop("rung_identity", None))
    log_truncation(data.truncation, f"trainer.max_length={cfg.trainer.max_length}", log)
    log.info(config_summary(cfg, train_ds, eval_ds, data.rung))
    return data


def paused_result(rung: dict, rungs: RungScoring, resume: Resume, runtime_s: float) -> dict:
    """metrics.json of a launch that paused at a rung: the rung (its statistics), every rung so far, the step."""
    return {"status": "paused", "rung": rung, "rungs": rungs.scored or [rung], "global_step": rung["step"],
            "train_runtime_s": round(runtime_s, 2), "resumed_from": resume.checkpoint}


def rung_scoring(cfg: RMExpConfig, data: Data, run_dir: Path, main_process: bool, wandb_run) -> RungScoring | None:
    """The rung split scored at trainer.rungs (rmexp.rungs), None without rungs."""
    if not cfg.trainer.rungs:
        if data.rung is not None:
            log.warning("data.rung_*: %d pairs held out of training as a rung split, scored nowhere: trainer.rungs "
                        "is empty", len(data.rung))
        return None
    return RungScoring(data.rung, data.rung_ids, list(cfg.trainer.rungs), cfg.trainer.stop_at_rung, run_dir,
                       main_process, wandb_run)


def describe_run(cfg: RMExpConfig, run_dir: Path, data: Data, resume: Resume):
    """The run dir describes itself, Hydra or not (rmexp_config.yaml, which RewardModel.load reads; a resume keeps
    the first attempt's); with W&B, the job's run (a resumed or requeued run continues its own, by id and name),
    which is returned."""
    # resolved by to_typed already: a `${` left in a value is text (a system prompt's), not to resolve again
    resolved = scrub_secrets(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=False, enum_to_str=True))
    if resume.checkpoint is None or not (run_dir / RUN_CONFIG).is_file():
        write_run_config(run_dir, resolved)
    if cfg.logger.backend.value != "wandb":
        return None
    name, group = job_identity(run_dir)
    run = start_run(cfg.logger, resolved, run_dir, resume.wandb_run_name or name, group, run_id=resume.wandb_run_id)
    run.config.update({"data_stats": data.stats, "truncation": data.truncation}, allow_val_change=True)
    return run


def build_trainer(cfg: RMExpConfig, model, tokenizer, data: Data, run_dir: Path, wandb_run, callbacks: list,
                  main_process: bool) -> PairwiseRewardTrainer:
    """The model prepared for training (rmexp.prepare) inside TRL's RewardTrainer, with rmexp's collator, head
    learning rate, time budget and, on rank 0, the reward diagnostics at every evaluation."""
    model = for_training(model, cfg.trainer)  # build_collator says if it cannot pack
    trainer = PairwiseRewardTrainer(
        model=model, args=build_reward_config(cfg.trainer, run_dir, "wandb" if wandb_run else "none", model),
        train_dataset=data.train, eval_dataset=data.eval, processing_class=tokenizer,
        peft_config=build_lora_config(cfg.lora), callbacks=callbacks,
        data_collator=build_collator(cfg.trainer, model, tokenizer),
        head_learning_rate=cfg.trainer.head_learning_rate, time_budget_s=cfg.trainer.time_budget_s)
    trainer.eval_sources, trainer.eval_categories = data.eval_sources, cfg.data.categories  # accuracy by source
    if main_process:  # histograms, calibration and their figures at every evaluation, in the run dir and W&B
        trainer.add_callback(EvalDiagnostics(trainer, run_dir, wandb_run, data.eval_sources, cfg.data.categories))
    if not streamed(data.train) and len(trainer.train_dataset) != len(data.train):  # ours fit: TRL filters none
        raise RuntimeError(f"{len(data.train) - len(trainer.train_dataset)} training pairs lost in TRL preprocessing")
    return trainer


def config_summary(cfg: RMExpConfig, train_ds, eval_ds, data_rung=None) -> str:
    """One line on what this run is, before the model loads (the whole config is in rmexp_config.yaml)."""
    q, t = cfg.quantization, cfg.trainer
    bits = "4-bit " + q.bnb_4bit_quant_type.value if q.load_in_4bit else "8-bit" if q.load_in_8bit else "unquantized"
    length = f"{t.max_steps} steps" if t.max_steps > 0 else f"{t.num_train_epochs:g} epoch(s)"
    n_train = "streamed" if streamed(train_ds) else len(train_ds)
    data = cfg.data.path or ", ".join(s.path for s in cfg.data.sources)
    rung = "" if data_rung is None else f", {len(data_rung)} in the rung split"
    return (f"{cfg.model.name_or_path} ({bits}), LoRA r={cfg.lora.r}: {n_train} training pairs, {len(eval_ds)} held out{rung} "
            f"({data}); lr {t.learning_rate:g}, batch {t.per_device_train_batch_size} {t.batching.value}, "
            f"{length} -> {cfg.paths.output_dir}")


def streamed(ds) -> bool:
    from datasets import IterableDataset

    return isinstance(ds, IterableDataset)


def run_result(trainer, final: dict, initial: float, train_output, data: Data) -> dict:
    """metrics.json's figures: the final evaluation beside its baselines and its diagnostics (ece, brier,
    by_source, categories), what training did, and what reading the data counted."""
    rewards = trainer.last_eval_rewards.numpy()
    n_train = None if streamed(data.train) else len(data.train)
    return {
        **{k: final[f"eval_{k}"] for k in ("pairwise_accuracy", "ci_low", "ci_high")},
        "initial_pairwise_accuracy": initial,
        "length_baseline_accuracy": length_baseline_accuracy(data.eval["chosen_tokens"], data.eval["rejected_tokens"]),
        "n_eval_pairs": final["eval_n_pairs"],
        **{k: final[f"eval_{k}"] for k in ("n_ties", "mean_margin", "reward_mean", "reward_std")},
        "eval_loss": final["eval_loss"],
        "train_loss": train_output.training_loss,
        "train_runtime_s": round(train_output.metrics["train_runtime"], 2),
        "compile_s": trainer.compile_s,
        "n_train_pairs_seen": (trainer.state.global_step * trainer.args.gradient_accumulation_steps
                               * trainer.args.train_batch_size * trainer.args.world_size
                               if n_train is None else round((trainer.state.epoch or 0.0) * n_train)),
        "global_step": trainer.state.global_step,
        "n_train_pairs": n_train, "data": data.stats, "data_formats": data.formats, "truncation": data.truncation,
    } | summary(rewards[:, 0], rewards[:, 1], data.eval_sources, trainer.eval_categories)


def summary_line(result: dict, run_dir: Path) -> str:
    """The run's accuracy with its interval, beside what it must beat."""
    return (f"held-out pairwise accuracy {result['pairwise_accuracy']:.3f} [{result['ci_low']:.2f}, "
            f"{result['ci_high']:.2f}] on {result['n_eval_pairs']} pairs; before training "
            f"{result['initial_pairwise_accuracy']:.2f}; length alone {result['length_baseline_accuracy']:.2f} "
            f"-> {run_dir}")
