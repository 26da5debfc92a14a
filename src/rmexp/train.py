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
from transformers import TrainerCallback

from rmexp.config import CONF_DIR
from rmexp.data import load_pairs, split_pairs, tokenize_pairs
from rmexp.model import build_bnb_config, build_lora_config, load_reward_model
from rmexp.reward_model import RUN_CONFIG
from rmexp.tracking import scrub_secrets

log = logging.getLogger("rmexp.train")


def build_reward_config(trainer_cfg, run_dir: Path, report_to: str):
    """The `trainer` group as TRL's RewardConfig (HF names), checkpoints under <run_dir>/checkpoints."""
    from trl import RewardConfig

    kwargs = OmegaConf.to_container(trainer_cfg, resolve=True)
    kwargs.update(kwargs.pop("extra") or {})
    for own_key in ("batching", "packed_row_tokens", "resume"):  # rmexp's keys, not RewardConfig's
        kwargs.pop(own_key)
    cuda = torch.cuda.is_available()
    return RewardConfig(
        output_dir=str(run_dir / "checkpoints"),
        report_to=report_to,
        use_cpu=not cuda,
        bf16=bool(kwargs.pop("bf16")) and (not cuda or torch.cuda.is_bf16_supported()),
        disable_dropout=False,  # keep lora_dropout as configured
        logging_first_step=True,
        **kwargs,
    )


def build_collator(trainer_cfg, model, tokenizer):
    """PackedPairCollator for `trainer.batching=packed` (and the model switched to block-wise SDPA);
    None lets TRL use its padded collator."""
    if getattr(trainer_cfg.batching, "value", trainer_cfg.batching) == "padded":
        return None
    from rmexp.packing import PACKED_ATTENTION, PackedPairCollator, sliding_window_of, use_packed_attention

    attn = model.config._attn_implementation
    if attn not in ("sdpa", PACKED_ATTENTION):
        raise ValueError(f"trainer.batching=packed needs model.attn_implementation=sdpa (got {attn}); "
                         "use trainer.batching=padded for other attention kernels")
    use_packed_attention(model)
    return PackedPairCollator(pad_token_id=tokenizer.pad_token_id, row_tokens=trainer_cfg.packed_row_tokens,
                              sliding_window=sliding_window_of(model.config))


def load_data(data_cfg):
    """Train and eval pairs, and what was read/skipped, before any model is loaded."""
    on_error = getattr(data_cfg.on_error, "value", data_cfg.on_error)
    files = {"train_file": data_cfg.path}
    if data_cfg.eval_path:
        files["eval_file"] = data_cfg.eval_path
    loaded, stats = {}, {}
    for role, path in files.items():
        loaded[role], file_stats = load_pairs(path, data_cfg.max_pairs, on_error)
        stats[role] = file_stats.as_dict()
        if file_stats.skipped:
            msg = (f"{path}: skipped {stats[role]['n_skipped']} of {file_stats.n_records} records "
                   f"(data.on_error=skip): {dict(file_stats.skipped)}")
            log.warning(msg)
            print(msg)
    if data_cfg.system_prompt:
        for pair in (p for ps in loaded.values() for p in ps):
            if not pair.prompt or pair.prompt[0]["role"] != "system":
                pair.prompt.insert(0, {"role": "system", "content": data_cfg.system_prompt})
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


def write_scores(path: Path, rewards: torch.Tensor) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for i, (c, r) in enumerate(rewards.tolist()):
            f.write(json.dumps({"index": i, "reward_chosen": c, "reward_rejected": r, "correct": c > r}) + "\n")
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
        args = build_reward_config(cfg.trainer, run_dir, "wandb" if run is not None else "none")

        from rmexp.trainer import PairwiseRewardTrainer

        stop_on_sigterm = StopOnSigterm()
        callbacks = [*(callbacks or []), stop_on_sigterm]

        trainer = PairwiseRewardTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                        processing_class=tokenizer, peft_config=lora_config, callbacks=callbacks,
                                        data_collator=build_collator(cfg.trainer, model, tokenizer))
        # TRL filters pairs over max_length; ours are truncated to fit, so nothing may go missing here.
        if len(trainer.train_dataset) != len(train_ds):
            raise RuntimeError(f"{len(train_ds) - len(trainer.train_dataset)} training pairs lost in TRL preprocessing")
        resumed_from = resume_checkpoint(cfg.trainer.resume, run_dir)
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
            "n_eval_pairs": final["eval_n_pairs"],
            "n_ties": final["eval_n_ties"],
            "mean_margin": final["eval_mean_margin"],
            "reward_mean": final["eval_reward_mean"],
            "reward_std": final["eval_reward_std"],
            "eval_loss": final["eval_loss"],
            "train_loss": train_output.training_loss,
            "n_train_pairs": len(train_ds),
            "global_step": trainer.state.global_step,
            "resumed_from": resumed_from,
            "data": data_stats,
            "truncation": truncation,
            "model": model_path,
        }
        if run is not None:
            run.summary.update({"eval/pairwise_accuracy": result["pairwise_accuracy"],
                                "eval/n_pairs": result["n_eval_pairs"], "status": "ok"})
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
            print(f"held-out pairwise accuracy: {result['pairwise_accuracy']:.4f} "
                  f"({result['n_eval_pairs']} pairs, eval loss {result['eval_loss']:.4f}) -> {run_dir}")


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
