"""Train a 4-bit QLoRA reward model: `rmexp-train [overrides]` (or `python -m rmexp.train`).

The command line of the recipe in rmexp.recipe. This module imports Hydra and the config schema alone, so an
unknown key or a value of the wrong type (`lora.r=abc`) fails in composition in about a second; torch,
transformers, peft and trl load with the recipe, once the config has composed. `main(cfg)` is what tests
and benches call; it returns the held-out pairwise accuracy so a Hydra sweeper can optimise it.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from rmexp.config import CONF_PATH, RMExpConfig

log = logging.getLogger("rmexp.train")


def main(cfg: RMExpConfig | DictConfig, callbacks: list | None = None) -> float:
    """One run of the recipe (rmexp.recipe.train): setup, train, save; the held-out pairwise accuracy."""
    from rmexp.recipe import train

    return train(cfg, callbacks)


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
def cli(cfg: DictConfig) -> float:
    # imported here, the config composed, and outside the sweep's per-job catch: a broken install stops the
    # command rather than failing every job
    from rmexp.preemption import requeue_if_preempted
    from rmexp.recipe import train

    with requeue_if_preempted():  # checkpointed, metrics.json says preempted: submitit requeues the job and exits
        if not in_multirun():
            return train(cfg)
        try:  # a failed job is recorded in its metrics.json; the sweep goes on and fails at the end
            return train(cfg)
        except Exception as e:  # noqa: BLE001
            log.error("job failed: %s: %s", type(e).__name__, e)
            return float("nan")
        finally:
            free_memory()
    return float("nan")


if __name__ == "__main__":
    cli()
