"""Weights & Biases: one run per job, offline unless credentials exist, never a prompt or a hang."""

from __future__ import annotations

import logging
import netrc
import os
import re
import warnings
from enum import Enum
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SECRET_NAME = re.compile(r"(_TOKEN|_KEY|_SECRET|PASSWORD)$", re.IGNORECASE)


def has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc(os.environ.get("NETRC"))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/")
    return rc.authenticators(host) is not None


def resolve_mode(mode: Any) -> str:
    """Configured mode wins; else online with credentials, offline without."""
    if mode:
        return mode.value if isinstance(mode, Enum) else str(mode)
    return "online" if has_credentials() else "offline"


def scrub_secrets(obj: Any) -> Any:
    """Drop values whose key looks like a secret, at any depth, before they reach W&B or disk."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if isinstance(k, str) and SECRET_NAME.search(k) else scrub_secrets(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub_secrets(v) for v in obj]
    return obj


def start_run(logger_cfg, config: dict, run_dir: Path, name: str | None, group: str | None,
              run_id: str | None = None):
    """wandb.init with everything from config; falls back to offline when an online start fails.
    `run_id`: continue that run (a requeued job's previous attempt) instead of starting a new one."""
    import wandb

    mode = resolve_mode(logger_cfg.mode)
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ["WANDB_LOG_MODEL"] = "false"  # the adapter is in the run dir; no artifact upload
    kwargs = dict(
        project=logger_cfg.project, entity=logger_cfg.entity, group=logger_cfg.group or group,
        name=logger_cfg.name or name, tags=list(logger_cfg.tags) or None, config=scrub_secrets(config),
        dir=str(run_dir), reinit="finish_previous",  # a sweep job never logs into the previous job's run
    ) | ({"id": run_id, "resume": "allow"} if run_id else {})
    settings = dict(init_timeout=logger_cfg.init_timeout, console="off", x_disable_stats=True)
    try:
        return wandb.init(mode=mode, settings=wandb.Settings(**settings), **kwargs)
    except Exception as e:  # noqa: BLE001 - any failure to reach W&B must not cost the run
        if mode != "online":
            raise
        warnings.warn(f"W&B online start failed ({e}); logging offline under {run_dir}/wandb", stacklevel=2)
        log.warning("W&B online start failed (%s); falling back to offline", e)
        return wandb.init(mode="offline", settings=wandb.Settings(**settings), **kwargs)


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
