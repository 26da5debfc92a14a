"""Continuing a run: from which checkpoint, and only with the config its checkpoints were made with.

    rmexp-train hydra.run.dir=<run dir> trainer.resume=auto       # what a stopped run prints

`resume_argv` (before Hydra reads the command line) adds the run's own overrides, from the
`.hydra/overrides.yaml` its first command left, so the command above composes the run's config rather than
the defaults; this command's own record goes to `.hydra/resume-<time>/` (record_command), beside the first
one, never over it. `resume_checkpoint` (before anything loads) claims the run dir, then checks the composed config
against the run's `rmexp_config.yaml`: a key outside ON_RESUME that differs (model, quantization, LoRA, data,
lengths, seed, batch layout, learning-rate schedule...) is a `ResumeConflict` naming each difference, the
run dir untouched; the keys of ON_RESUME (logging, evaluation and saving cadence, the time budget, speed
switches, W&B's mode) may change and are recorded in metrics.json (`resume_changes`). A resumed run logs
into the W&B run of its first attempt (same id, same name).

A requeued submitit job (`requeued_attempt`) resumes its own dir from the newest intact checkpoint whatever
`trainer.resume` says. This module reads files and configs only: no torch, so a refusal comes in a second.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rmexp.errors import MissingPathError, UserError
from rmexp.rundir import (
    RUN_CONFIG,
    CheckpointError,
    claim_run_dir,
    diagnose_checkpoint,
    list_checkpoints,
    pick_checkpoint,
    read_run_config,
    submitit_job_id,
)
from rmexp.tracking import SECRET_NAME

log = logging.getLogger(__name__)

# Keys a resume may change: how often it logs, evaluates and saves, how long it may run, how fast it computes the
# same sums, and where W&B goes. Every other key shaped the checkpoints (docs/runs.md, Resume).
ON_RESUME = ("trainer.resume", "trainer.logging_steps", "trainer.eval_strategy", "trainer.eval_steps",
             "trainer.per_device_eval_batch_size", "trainer.save_strategy", "trainer.save_steps",
             "trainer.save_total_limit", "trainer.time_budget_s", "trainer.dataloader_num_workers", "trainer.compile",
             "trainer.gradient_checkpointing", "trainer.dequant_cache", "trainer.fused_lora", "trainer.fused_rms_norm",
             "trainer.attention", "trainer.stop_at_rung",
             "data.num_proc", "data.cache_dir", "model.cache_dir", "logger.", "paths.")


class ResumeConflict(UserError):
    """A resume whose config differs from the run's in a key that shaped its checkpoints."""


def may_change_on_resume(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in ON_RESUME)


def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as {dotted key: value}; lists and empty dicts are values."""
    if isinstance(tree, dict) and tree:
        return {k: v for name, sub in tree.items() for k, v in flat(sub, f"{prefix}{name}.").items()}
    return {prefix.rstrip("."): tree}


def as_tree(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=False, enum_to_str=True)


def same_value(key: str, a: Any, b: Any) -> bool:
    """Two values of `key` that mean the same: equal, or two paths to one file (the shipped sample pairs resolve to
    wherever rmexp is installed); a secret is saved redacted (tracking.scrub_secrets), so it is never compared."""
    if a == b or SECRET_NAME.search(key.rsplit(".", 1)[-1]):
        return True
    if key.endswith("path") and isinstance(a, str) and isinstance(b, str):
        with contextlib.suppress(OSError):
            return os.path.samefile(a, b)
    return False


def config_changes(saved, new) -> dict[str, tuple[Any, Any]]:
    """{key: (the run's value, this command's)} for every key whose value differs (typed configs)."""
    a, b = flat(as_tree(saved)), flat(as_tree(new))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if not same_value(k, a.get(k), b.get(k))}


def check_same_run(cfg, run_dir: Path) -> dict[str, list]:
    """The changes ON_RESUME allows between the run in `run_dir` and `cfg` (typed), as {key: [old, new]};
    ResumeConflict naming every other change."""
    if not (run_dir / RUN_CONFIG).is_file():  # stopped before its config was written: no checkpoint holds it either
        return {}
    changes = config_changes(read_run_config(run_dir), cfg)
    refused = {k: v for k, v in changes.items() if not may_change_on_resume(k)}
    if refused:
        listed = "; ".join(f"{k}: {old!r} in the run, {new!r} now" for k, (old, new) in refused.items())
        raise ResumeConflict(
            f"trainer.resume: {run_dir} was trained with another config, so its checkpoints cannot continue this "
            f"one: {listed}. Drop those overrides to continue it (its own config comes from "
            f"{run_dir}/{RUN_CONFIG}), or train this config in a new run dir")
    return {k: list(v) for k, v in changes.items() if k != "trainer.resume"}


def requeued_attempt(run_dir: Path) -> dict | None:
    """When this process is a submitit job run again (requeued after a preemption or its time limit, or
    restarted by SLURM): the metrics.json its previous attempt left in this run dir; else None. A new
    job writing into a dir another job used is not a requeue (the job ids differ)."""
    job_id = submitit_job_id()
    if job_id is None:
        return None
    previous = previous_attempt(run_dir)
    if previous.get("job_id") == job_id or int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0:
        return previous
    return None


def previous_attempt(run_dir: Path) -> dict:
    """The metrics.json a run dir's last attempt left ({} when none, or half a file)."""
    try:
        previous = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):  # none yet (the previous attempt was killed outright) or half a file
        return {}
    return previous if isinstance(previous, dict) else {}


@dataclass
class Resume:
    """Where training starts: `checkpoint` (None: from scratch) and the damaged newer checkpoints passed
    over; for a continued run, the W&B run its earlier attempt logged into (continued, not started anew) and the
    settings this attempt changed (ON_RESUME)."""

    checkpoint: str | None = None
    skipped: list[dict] = field(default_factory=list)  # {checkpoint, problem, moved_to}: metrics.json's resume_skipped
    wandb_run_id: str | None = None
    wandb_run_name: str | None = None
    changes: dict[str, list] = field(default_factory=dict)  # metrics.json's resume_changes


def resume_checkpoint(resume: str | None, run_dir: Path, main_process: bool = True, config=None) -> Resume:
    """Before anything loads (and before run_record writes over the run dir's metrics.json): where training
    starts. A requeued submitit job's dir is its own: it resumes from the newest intact checkpoint whatever
    `resume` says. Any other run first claims the run dir (rundir.claim_run_dir: a previous run is refused
    or moved aside as `resume` says), then `trainer.resume` decides: null or never (from scratch), auto
    (this run dir's newest intact checkpoint, pick_checkpoint) or a checkpoint dir (which must be intact).
    With `config` (typed), continuing a run is first checked against the run's own config (check_same_run).
    Only reads headers, so a bad checkpoint fails in seconds."""
    attempt = requeued_attempt(run_dir)
    if attempt is None:
        claim_run_dir(run_dir, resume, main_process)
        return _as_configured(resume, run_dir, main_process, config)
    checkpoints = run_dir / "checkpoints"
    changes = check_same_run(config, run_dir) if config is not None else {}
    ckpt, skipped = pick_checkpoint(checkpoints, set_aside=main_process)
    if ckpt is not None:
        log.info("resuming requeued job %s from %s", submitit_job_id(), ckpt)
        return Resume(str(ckpt), skipped, attempt.get("wandb_run_id"), attempt.get("wandb_run_name"), changes)
    log.warning("requeued job %s: no checkpoint under %s", submitit_job_id(), checkpoints)
    configured = _as_configured(resume, run_dir, main_process, config)
    configured.wandb_run_id, configured.wandb_run_name = attempt.get("wandb_run_id"), attempt.get("wandb_run_name")
    return configured


def _as_configured(resume: str | None, run_dir: Path, main_process: bool, config) -> Resume:
    """What `trainer.resume` alone says (resume_checkpoint)."""
    checkpoints = run_dir / "checkpoints"
    if not resume or resume == "never":
        return Resume()
    if resume == "auto":
        if not list_checkpoints(checkpoints):
            log.warning("trainer.resume=auto: no checkpoint under %s; starting fresh", checkpoints)
            return Resume()
        changes = check_same_run(config, run_dir) if config is not None else {}
        ckpt, skipped = pick_checkpoint(checkpoints, set_aside=main_process)
        log.info("resuming from %s%s", ckpt, "".join(f"; {k}: {old!r} -> {new!r}" for k, (old, new) in changes.items()))
        previous = previous_attempt(run_dir)
        return Resume(str(ckpt), skipped, previous.get("wandb_run_id"), previous.get("wandb_run_name"), changes)
    path = Path(resume)
    if not path.is_dir():
        raise MissingPathError(f"trainer.resume: no checkpoint dir {resume} (auto, never or a checkpoint-N dir)")
    source = path.parent.parent if path.parent.name == "checkpoints" else None  # the run the checkpoint is of
    changes = check_same_run(config, source) if config is not None and source is not None else {}
    if problem := diagnose_checkpoint(path):
        raise CheckpointError(f"trainer.resume={resume}: {problem}")
    return Resume(resume, changes=changes)


# ---------------------------------------------------------------- the command line, before Hydra reads it


def override_key(override: str) -> str:
    """The key (or config group) an override sets: `+a.b=1` -> a.b, `model=tiny` -> model, `~a` -> a."""
    return override.lstrip("~+").split("=", 1)[0]


def resume_argv(argv: list[str]) -> list[str]:
    """`rmexp-train hydra.run.dir=<run dir> trainer.resume=auto [overrides]` (or a checkpoint dir for auto), for a
    run dir whose first command left `.hydra/overrides.yaml` and a checkpoint: the run's own overrides added (those this command sets
    itself are this command's; check_same_run then refuses what may not change), and Hydra's own record of the
    command turned off (`record_command` writes it beside the first once the resume is accepted, so a refused
    one writes nothing). Any other command line (a multirun's jobs compose their own overrides) is returned as
    it is."""
    values = {override_key(a): a.split("=", 1)[1] if "=" in a else None for a in argv
              if not a.startswith("-") and ("=" in a or a.startswith("~"))}
    run_dir = values.get("hydra.run.dir")
    if (values.get("trainer.resume") in (None, "", "null", "never") or not run_dir or "${" in run_dir
            or any(a in ("-m", "--multirun") or a.startswith("--multirun") for a in argv)):
        return argv
    run_dir = Path(run_dir.strip("'\"")).expanduser()
    saved_file = run_dir / ".hydra" / "overrides.yaml"
    if not (saved_file.is_file() and list_checkpoints(run_dir / "checkpoints")):
        return argv
    import yaml

    saved = yaml.safe_load(saved_file.read_text(encoding="utf-8")) or []
    added = [o for o in saved if override_key(o) not in values]
    if "hydra.output_subdir" not in values:  # Hydra would write over the first command's .hydra/: record_command does
        added.append("hydra.output_subdir=null")
    if "hydra.mode" not in values:  # a sweep job's own overrides name its preset (sweep=...), which asks for a multirun
        added.append("hydra.mode=RUN")
    at = next(i for i, a in enumerate(argv) if override_key(a) == "trainer.resume")
    return argv[:at + 1] + added + argv[at + 1:]


def record_command(cfg, run_dir: Path) -> Path | None:
    """An accepted resume's own record, as Hydra's .hydra/ holds a run's (config.yaml, overrides.yaml,
    hydra.yaml), in `.hydra/resume-<time>/` beside the first command's; None where Hydra wrote it itself."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if not HydraConfig.initialized() or HydraConfig.get().output_subdir is not None:
        return None
    hydra_cfg = HydraConfig.get()
    out = run_dir / ".hydra" / f"resume-{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml")
    OmegaConf.save(OmegaConf.create(list(hydra_cfg.overrides.task)), out / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), out / "hydra.yaml")
    return out
