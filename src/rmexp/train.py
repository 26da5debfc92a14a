"""Train a 4-bit QLoRA reward model: `python -m rmexp.train [overrides]`.

One linear path: config -> data -> model -> TRL RewardTrainer -> final held-out evaluation ->
adapter, tokenizer, scores.jsonl and metrics.json in the run dir. `main(cfg)` is what tests call;
it returns the held-out pairwise accuracy so a Hydra sweeper can optimise it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import threading
import time
import traceback
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import TrainerCallback, set_seed

from rmexp.config import CONF_DIR
from rmexp.data import drop_leaked, load_pairs, split_pairs, tokenize_pairs, with_system_prompt
from rmexp.metrics import length_baseline_accuracy
from rmexp.model import build_bnb_config, build_lora_config, compute_dtype, load_reward_model
from rmexp.reward_model import RUN_CONFIG
from rmexp.tracking import scrub_secrets

log = logging.getLogger("rmexp.train")


OWN_TRAINER_KEYS = ("batching", "packed_row_tokens", "resume", "head_learning_rate", "time_budget_s", "fused_lora",
                    "dequant_cache", "fused_rms_norm")


def activation_bytes(model_config, tokens: int) -> int:
    """Rough activation memory of one training step without recompute: what each layer keeps per token
    for the backward pass (norms, q/k/v/o, the MLP's inputs and outputs, LoRA's dropped-out inputs), in bf16."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    h, inter, layers = text.hidden_size, getattr(text, "intermediate_size", 4 * text.hidden_size), text.num_hidden_layers
    return tokens * layers * (18 * h + 5 * inter) * 2


def use_gradient_checkpointing(trainer_cfg, model) -> bool:
    """`trainer.gradient_checkpointing`: true/false as set; auto recomputes activations only when a step's
    activations would not fit comfortably (60%) in the memory left after loading the model. Recompute
    costs about a third more compute, so it is off wherever it is not needed."""
    setting = str(trainer_cfg.gradient_checkpointing).lower()
    if setting in ("true", "false"):
        return setting == "true"
    if setting != "auto":
        raise ValueError(f"trainer.gradient_checkpointing must be auto, true or false, got {setting!r}")
    tokens = trainer_cfg.per_device_train_batch_size * 2 * trainer_cfg.max_length  # worst case: both answers padded
    needed = activation_bytes(model.config, tokens)
    if torch.cuda.is_available():
        free = torch.cuda.mem_get_info()[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
    on = needed > 0.6 * free
    log.info("trainer.gradient_checkpointing=auto: %s (a step's activations ~%.1f GB, %.1f GB free)",
             "on" if on else "off", needed / 2**30, free / 2**30)
    return on


def use_bf16(setting) -> bool:
    """`trainer.bf16`: auto is on where the hardware computes bf16 natively; true is on unless CUDA lacks bf16."""
    setting = str(setting).lower()
    if setting == "auto":
        return compute_dtype() == torch.bfloat16
    if setting not in ("true", "false"):
        raise ValueError(f"trainer.bf16 must be auto, true or false, got {setting!r}")
    return setting == "true" and (not torch.cuda.is_available() or torch.cuda.is_bf16_supported())


def build_reward_config(trainer_cfg, run_dir: Path, report_to: str, model=None):
    """The `trainer` group as TRL's RewardConfig (HF names), checkpoints under <run_dir>/checkpoints.
    `model` resolves `gradient_checkpointing=auto` (without it, auto means on)."""
    from trl import RewardConfig

    kwargs = OmegaConf.to_container(trainer_cfg, resolve=True)
    kwargs["gradient_checkpointing"] = (use_gradient_checkpointing(trainer_cfg, model) if model is not None
                                        else str(trainer_cfg.gradient_checkpointing).lower() != "false")
    kwargs.update(kwargs.pop("extra") or {})
    for own_key in OWN_TRAINER_KEYS:  # rmexp's keys, not RewardConfig's
        kwargs.pop(own_key)
    cuda = torch.cuda.is_available()
    return RewardConfig(
        output_dir=str(run_dir / "checkpoints"),
        report_to=report_to,
        use_cpu=not cuda,
        bf16=use_bf16(kwargs.pop("bf16")),
        disable_dropout=False,  # keep lora_dropout as configured
        logging_first_step=True,
        **kwargs,
    )


def build_collator(trainer_cfg, model, tokenizer):
    """PackedPairCollator for `trainer.batching=packed` (and the model switched to block-wise SDPA);
    None lets TRL use its padded collator."""
    if getattr(trainer_cfg.batching, "value", trainer_cfg.batching) == "padded":
        return None
    from rmexp.packing import PackedPairCollator, packed_ready

    if not packed_ready(model):
        raise ValueError(f"trainer.batching=packed needs model.attn_implementation=sdpa (got "
                         f"{model.config._attn_implementation}); use trainer.batching=padded for other attention kernels")
    return PackedPairCollator.for_model(model, tokenizer.pad_token_id, trainer_cfg.packed_row_tokens)


def load_data(data_cfg):
    """Train and eval pairs, and what was read/skipped, before any model is loaded."""
    on_error = getattr(data_cfg.on_error, "value", data_cfg.on_error)
    files = {"train_file": data_cfg.path}
    if data_cfg.eval_path:
        files["eval_file"] = data_cfg.eval_path
    loaded, file_stats = {}, {}
    for role, path in files.items():
        loaded[role], file_stats[role] = load_pairs(path, data_cfg.max_pairs, on_error)
    if data_cfg.eval_path:
        loaded["train_file"], n_leaked = drop_leaked(loaded["train_file"], loaded["eval_file"], on_error)
        if n_leaked:
            file_stats["train_file"].skipped["in_eval_file"] += n_leaked
            file_stats["train_file"].n_pairs -= n_leaked
    stats = {role: st.as_dict() for role, st in file_stats.items()}
    for role, path in files.items():
        if file_stats[role].skipped:
            msg = (f"{path}: skipped {stats[role]['n_skipped']} of {file_stats[role].n_records} records "
                   f"(data.on_error=skip): {stats[role]['skipped']}")
            log.warning(msg)
            print(msg)
    for pairs in loaded.values():
        for pair in pairs:
            pair.prompt = with_system_prompt(pair.prompt, data_cfg.system_prompt)
    if data_cfg.eval_path:
        return loaded["train_file"], loaded["eval_file"], stats
    train_pairs, eval_pairs = split_pairs(loaded["train_file"], data_cfg.eval_fraction, data_cfg.split_seed)
    return train_pairs, eval_pairs, stats


def job_identity(run_dir: Path) -> tuple[str, str | None]:
    """W&B run name (the job's overrides) and group (the sweep dir) when run under Hydra."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return run_dir.name, None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return hc.job.override_dirname or run_dir.name, None
    from rmexp.sweep import sweep_group, sweep_keys

    keys = sweep_keys(hc.sweep.dir)
    values = dict(o.split("=", 1) for o in hc.overrides.task if "=" in o)
    name = ",".join(f"{k}={values[k]}" for k in keys if k in values) or hc.job.override_dirname or run_dir.name
    return name, sweep_group(hc.sweep.dir)  # every job of a sweep shares one group


def write_json(path: Path, obj) -> None:
    """Write via a temp file and rename, so a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def score_lines(rewards: torch.Tensor, start: int = 0):
    """scores.jsonl lines of rewards (n x 2), numbered from `start`."""
    for i, (c, r) in enumerate(rewards.tolist(), start):
        yield json.dumps({"index": i, "reward_chosen": c, "reward_rejected": r, "correct": c > r}) + "\n"


def write_scores(path: Path, rewards: torch.Tensor) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.writelines(score_lines(rewards))
    os.replace(tmp, path)


CHECKPOINT_FILES = ("trainer_state.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt")


def last_complete_checkpoint(checkpoints: Path) -> Path | None:
    """The newest checkpoint-N holding every file a resume needs; a half-written one is skipped."""
    found = sorted((int(d.name.split("-")[1]), d) for d in checkpoints.glob("checkpoint-*")
                   if d.name.split("-")[1].isdigit())
    for _, d in reversed(found):
        if all((d / f).is_file() for f in CHECKPOINT_FILES):
            return d
        log.warning("skipping incomplete checkpoint %s", d)
    return None


def resume_checkpoint(resume: str | None, run_dir: Path) -> str | None:
    if not resume:
        return None
    if resume == "auto":
        ckpt = last_complete_checkpoint(run_dir / "checkpoints")
        if ckpt is None:
            log.warning("trainer.resume=auto: no complete checkpoint under %s/checkpoints; starting fresh", run_dir)
            return None
        log.info("resuming from %s", ckpt)
        return str(ckpt)
    if not Path(resume).is_dir():
        raise FileNotFoundError(f"trainer.resume: no checkpoint dir {resume}")
    return resume


class StopOnSigterm(TrainerCallback):
    """SIGTERM (SLURM's notice before a kill): save a checkpoint at the end of this step, then stop."""

    received: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            control.should_save = control.should_training_stop = True
        return control

    def _handle(self, signum, frame):
        log.warning("SIGTERM: saving a checkpoint after this step, then stopping")
        self.received = signum

    def __enter__(self):
        self._previous = None
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


@contextlib.contextmanager
def writes_to(run_dir: Path):
    """A full disk, a quota or a read-only mount while saving: an error that names the run dir."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO):
            raise
        raise OSError(e.errno, f"cannot write the run to {run_dir}: {e.strerror or e}") from e


def last_eval_at(trainer, step: int) -> dict | None:
    """The metrics of an evaluation the trainer already ran at `step`, so the final one is not repeated."""
    for entry in reversed(trainer.state.log_history):
        if "eval_pairwise_accuracy" in entry:
            return entry if entry.get("step") == step and trainer.last_eval_rewards is not None else None
    return None


def is_main_process() -> bool:
    """Rank 0 under torchrun / accelerate launch (and a plain single process)."""
    return int(os.environ.get("RANK", "0")) == 0


def main(cfg: DictConfig, callbacks: list | None = None) -> float:
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    main_process = is_main_process()  # only rank 0 logs to W&B and writes metrics.json and scores.jsonl
    started = time.time()
    result = {"status": "running"}
    run = None
    try:
        # Everything that can be checked without a model is checked first.
        lora_config = build_lora_config(cfg.lora)
        build_bnb_config(cfg.quantization)
        train_pairs, eval_pairs, data_stats = load_data(cfg.data)

        set_seed(cfg.trainer.seed)  # the new score head and the LoRA weights are drawn from this seed
        model, tokenizer, model_path = load_reward_model(cfg.model, cfg.quantization)
        train_ds, train_trunc = tokenize_pairs(tokenizer, train_pairs, cfg.trainer.max_length)
        eval_ds, eval_trunc = tokenize_pairs(tokenizer, eval_pairs, cfg.trainer.max_length)
        truncation = {"train": train_trunc, "eval": eval_trunc}
        for split, counts in truncation.items():
            if counts.get("n_truncated"):
                log.warning("%s: %d of %d pairs truncated to trainer.max_length=%d (%d lost prompt tokens, "
                            "%d lost answer tokens); none dropped", split, counts["n_truncated"],
                            len(train_ds if split == "train" else eval_ds), cfg.trainer.max_length,
                            counts.get("n_prompt_truncated", 0), counts.get("n_answer_truncated", 0))

        resolved = scrub_secrets(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
        if main_process:  # the run dir describes itself, Hydra or not (RewardModel.load reads it)
            (run_dir / RUN_CONFIG).write_text(OmegaConf.to_yaml(resolved), encoding="utf-8")
        use_wandb = getattr(cfg.logger.backend, "value", cfg.logger.backend) == "wandb"
        if use_wandb and main_process:
            from rmexp.tracking import start_run

            name, group = job_identity(run_dir)
            run = start_run(cfg.logger, resolved, run_dir, name, group)
            run.config.update({"data_stats": data_stats, "truncation": truncation}, allow_val_change=True)
        args = build_reward_config(cfg.trainer, run_dir, "wandb" if run is not None else "none", model)

        from rmexp.trainer import PairwiseRewardTrainer

        stop_on_sigterm = StopOnSigterm()
        callbacks = [*(callbacks or []), stop_on_sigterm]

        trainer = PairwiseRewardTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                        processing_class=tokenizer, peft_config=lora_config, callbacks=callbacks,
                                        data_collator=build_collator(cfg.trainer, model, tokenizer),
                                        head_learning_rate=cfg.trainer.head_learning_rate,
                                        time_budget_s=cfg.trainer.time_budget_s,
                                        fused_lora=cfg.trainer.fused_lora,
                                        dequant_cache=cfg.trainer.dequant_cache,
                                        fused_rms_norm=cfg.trainer.fused_rms_norm)
        # TRL filters pairs over max_length; ours are truncated to fit, so nothing may go missing here.
        if len(trainer.train_dataset) != len(train_ds):
            raise RuntimeError(f"{len(train_ds) - len(trainer.train_dataset)} training pairs lost in TRL preprocessing")
        resumed_from = resume_checkpoint(cfg.trainer.resume, run_dir)
        # Baselines beside the accuracy: the same eval pairs before any step, and a length count.
        initial = trainer.evaluate()["eval_pairwise_accuracy"]
        length_baseline = length_baseline_accuracy(eval_ds["chosen_tokens"], eval_ds["rejected_tokens"])
        with stop_on_sigterm, writes_to(run_dir):  # checkpoints are saved while training
            train_output = trainer.train(resume_from_checkpoint=resumed_from)
        if stop_on_sigterm.received is not None:
            raise InterruptedError(f"stopped by SIGTERM at step {trainer.state.global_step}; a checkpoint is in "
                                   f"{run_dir}/checkpoints: continue with hydra.run.dir={run_dir} trainer.resume=auto")
        final = last_eval_at(trainer, trainer.state.global_step) or trainer.evaluate()

        with writes_to(run_dir):
            trainer.save_model(str(run_dir))  # adapter + score head (modules_to_save) + tokenizer; rank 0 only
            if main_process:
                (run_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle; the config is in .hydra/
                write_scores(run_dir / "scores.jsonl", trainer.last_eval_rewards)
        result = {
            "status": "ok",
            "pairwise_accuracy": final["eval_pairwise_accuracy"],
            "ci_low": final["eval_ci_low"],
            "ci_high": final["eval_ci_high"],
            "initial_pairwise_accuracy": initial,
            "length_baseline_accuracy": length_baseline,
            "n_eval_pairs": final["eval_n_pairs"],
            "n_ties": final["eval_n_ties"],
            "mean_margin": final["eval_mean_margin"],
            "reward_mean": final["eval_reward_mean"],
            "reward_std": final["eval_reward_std"],
            "eval_loss": final["eval_loss"],
            "train_loss": train_output.training_loss,
            "train_runtime_s": round(train_output.metrics["train_runtime"], 2),
            "n_train_pairs": len(train_ds),
            "n_train_pairs_seen": round((trainer.state.epoch or 0.0) * len(train_ds)),
            "global_step": trainer.state.global_step,
            "resumed_from": resumed_from,
            "data": data_stats,
            "truncation": truncation,
            "model": model_path,
        }
        if run is not None:
            run.summary.update({f"eval/{k}": result[k] for k in (
                "pairwise_accuracy", "ci_low", "ci_high", "initial_pairwise_accuracy", "length_baseline_accuracy")}
                | {"eval/n_pairs": result["n_eval_pairs"], "status": "ok"})
        return result["pairwise_accuracy"]
    except BaseException as e:
        result = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                  "traceback": traceback.format_exc(limit=20)}
        if run is not None:
            run.summary.update({"status": "failed", "error": result["error"]})
        raise
    finally:
        result["runtime_s"] = round(time.time() - started, 2)
        if main_process:
            write_json(run_dir / "metrics.json", result)
        if run is not None:
            import wandb

            wandb.finish(exit_code=0 if result["status"] == "ok" else 1)
        if result["status"] == "ok" and main_process:
            print(summary_line(result, run_dir))


def summary_line(result: dict, run_dir: Path) -> str:
    """The run's accuracy with its interval, beside what it must beat."""
    return (f"held-out pairwise accuracy {result['pairwise_accuracy']:.3f} [{result['ci_low']:.2f}, "
            f"{result['ci_high']:.2f}] on {result['n_eval_pairs']} pairs; before training "
            f"{result['initial_pairwise_accuracy']:.2f}; length alone {result['length_baseline_accuracy']:.2f} "
            f"-> {run_dir}")


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def free_memory() -> None:
    """Between sequential sweep jobs in one process: drop the last job's model, optimizer and CUDA cache."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def cli(cfg: DictConfig) -> float:
    if not in_multirun():
        return main(cfg)
    try:  # a failed job is recorded in its metrics.json; the sweep goes on and fails at the end
        return main(cfg)
    except Exception as e:  # noqa: BLE001
        log.error("job failed: %s: %s", type(e).__name__, e)
        return float("nan")
    finally:
        free_memory()


if __name__ == "__main__":
    cli()
