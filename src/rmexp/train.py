"""Train a 4-bit QLoRA reward model: `rmexp-train [overrides]` (or `python -m rmexp.train`).

The command of the recipe in rmexp.recipe. `main(cfg)` claims the run dir (a resume only with the run's own
config: rmexp.resume), checks the config's values and the paths it names, then runs the recipe (setup ->
train -> save), with metrics.json recording the outcome whatever it is. Everything before the recipe imports
Hydra, the schema and the run dir's files alone, so a typo (`lora.r=abc`), a bad value (`lora.r=0`), a missing
file or a refused resume fails in about a second, before torch, transformers, peft and trl load.
`main(cfg)` is what tests and benches call; it returns the held-out pairwise accuracy so a Hydra sweeper can
optimise it.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from rmexp import console
from rmexp.config import CONF_PATH, RMExpConfig, check_paths, to_typed
from rmexp.resume import record_command, resume_argv, resume_checkpoint
from rmexp.rundir import is_main_process, requeue_if_suspended, run_record

log = logging.getLogger("rmexp.train")


def main(cfg: RMExpConfig | DictConfig, callbacks: list | None = None) -> float:
    """One run of the recipe (rmexp.recipe.train): setup, train, save; the held-out pairwise accuracy."""
    run_dir, main_process = Path(cfg.paths.output_dir), is_main_process()
    # the run dir claimed and the checkpoint read back before run_record, which would write its metrics.json over
    # the run this refuses to train over; continuing a run is first checked against the config it was trained with,
    # and its values and paths before that, so a refused or broken resume leaves the run dir as it was
    typed = None
    if cfg.trainer.resume not in (None, "", "never"):
        typed = to_typed(cfg)
        check_paths(typed.data)
    resume = resume_checkpoint(cfg.trainer.resume, run_dir, main_process, config=typed)
    if resume.checkpoint is not None and main_process:
        record_command(cfg, run_dir)  # beside the first command's .hydra/, not over it
    carried = {"wandb_run_id": resume.wandb_run_id, "wandb_run_name": resume.wandb_run_name} if resume.wandb_run_id else {}
    with run_record(run_dir, write=main_process, carried=carried) as record:
        if typed is None:  # checked here, recorded, when no resume checked it before the claim
            typed = to_typed(cfg)  # the schema's checks (rmexp.config): a bad value fails here
            check_paths(typed.data)
        cfg = typed
        warn_preset_values(cfg)
        from rmexp.recipe import summary_line, train

        train(cfg, resume, record, callbacks)
    if record.result["status"] == "paused":  # a halving sweep's rung (rmexp.rungs): it decides on the rung loss
        rung = record.result["rung"]
        if main_process:
            print(f"paused at rung {rung['rung']} (step {rung['step']}): rung-split loss {rung['loss']:.4f}, "
                  f"accuracy {rung['accuracy']:.3f} on {rung['n_pairs']} pairs -> {run_dir}")
        return float("nan")
    if main_process:
        print(summary_line(record.result, run_dir))
    return record.result["pairwise_accuracy"]


def warn_preset_values(cfg: RMExpConfig) -> None:
    """`data.path=<file>` under the sample preset (the default) keeps the preset's other values: say which."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized() or HydraConfig.get().runtime.choices.get("data") != "sample":
        return
    preset = OmegaConf.load(resources.files("rmexp.conf").joinpath("data/sample.yaml"))
    if cfg.data.path == OmegaConf.to_container(preset, resolve=True)["path"]:
        return
    kept = ", ".join(f"data.{k}={v}" for k, v in preset.items() if k not in ("defaults", "path"))
    log.warning("data.path=%s under the sample preset (data=sample): its %s apply; add data=file for the file "
                "defaults", cfg.data.path, kept)


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def free_memory() -> None:
    """Between sequential sweep jobs in one process: drop the last job's model, optimizer and CUDA cache."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="train")
def app(cfg: DictConfig) -> float:
    with requeue_if_suspended():  # checkpointed, metrics.json says preempted: submitit requeues the job and exits
        if not in_multirun():
            with console.reported():
                return main(cfg)
        import rmexp.recipe  # noqa: F401 - outside the per-job catch: a broken install stops the sweep, not each job

        try:  # a failed job is recorded in its metrics.json; the sweep goes on and fails at the end
            return main(cfg)
        except Exception as e:  # noqa: BLE001
            log.error("job failed: %s: %s", type(e).__name__, e)
            return float("nan")
        finally:
            free_memory()
    return float("nan")


def cli() -> None:
    """`rmexp-train`: a resume composes its run's own overrides (rmexp.resume.resume_argv); errors as one line."""
    console.run(app, RMExpConfig, argv_rewrite=resume_argv, presets=("experiment", "debug", "sweep"))


if __name__ == "__main__":
    cli()
