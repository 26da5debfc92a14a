"""What a sweep is made of on disk: its jobs, their overrides and their metrics.json."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback

log = logging.getLogger("rmexp.sweep")

# overrides that select the sweep itself; a single job is reproduced without them
SWEEP_ONLY = ("sweep=", "hydra/launcher=", "hydra/sweeper=", "hydra.", "trainer.resume=", "trainer.stop_at_rung=")


@dataclass
class Job:
    dir: Path
    overrides: list[str]
    metrics: dict = field(default_factory=dict)

    @property
    def status(self) -> str:
        return self.metrics.get("status", "running")  # no metrics.json yet: still running (or killed)

    @property
    def values(self) -> dict[str, str]:
        return dict(o.split("=", 1) for o in self.overrides if "=" in o)

    @cached_property
    def config(self):
        """The job's composed config (.hydra/config.yaml), or None before Hydra wrote it."""
        from omegaconf import OmegaConf

        path = self.dir / ".hydra" / "config.yaml"
        return OmegaConf.load(path) if path.is_file() else None

    def setting(self, key: str) -> str:
        """The job's value of a config key: its override, else what its composed config held."""
        if key in self.values:
            return self.values[key]
        if self.config is None:
            return ""
        from omegaconf import OmegaConf

        value = OmegaConf.select(self.config, key, default=None)
        return "" if value is None else str(value)

    def command(self) -> str:
        args = [o for o in self.overrides if not o.startswith(SWEEP_ONLY)]
        if any(o.startswith("trainer.rungs=") for o in args):  # a halving cell: its rung split, which a preset set
            given = {o.split("=", 1)[0] for o in args}
            args += [f"{k}={self.setting(k)}" for k in ("data.rung_path", "data.rung_fraction")
                     if k not in given and self.setting(k) not in ("", "0.0")]
        return " ".join(["python -m rmexp.train", *args])


def sweep_group(sweep_dir: str | Path) -> str:
    """The W&B group of a sweep's jobs: named after its dir (outputs/multirun/<date>/<time>)."""
    return "sweep-" + "-".join(Path(sweep_dir).resolve().parts[-2:])


def sweep_keys(sweep_dir: str | Path) -> list[str]:
    """Keys a multirun sweeps over: sweep overrides on its command line (`lora.r=4,8`) and sweeper params."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    path = Path(sweep_dir) / "multirun.yaml"
    if not path.is_file():
        return []
    hydra_cfg = OmegaConf.load(path).hydra
    keys = [o.key_or_group for o in OverridesParser.create().parse_overrides(list(hydra_cfg.overrides.task))
            if o.is_sweep_override()]
    params = OmegaConf.select(hydra_cfg, "sweeper.params") or {}
    return sorted(set(keys) | {str(k) for k in params})


def read_jobs(sweep_dir: str | Path) -> list[Job]:
    """Every job dir under a sweep dir (those with .hydra/overrides.yaml), in job order."""
    jobs = []
    for overrides_file in Path(sweep_dir).glob("**/.hydra/overrides.yaml"):
        job_dir = overrides_file.parent.parent
        overrides = yaml.safe_load(overrides_file.read_text()) or []
        metrics_file = job_dir / "metrics.json"
        try:
            metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        except json.JSONDecodeError:  # being written right now
            metrics = {}
        jobs.append(Job(job_dir, [str(o) for o in overrides], metrics))
    return sorted(jobs, key=lambda j: (len(j.dir.parts), int(j.dir.name) if j.dir.name.isdigit() else 0, str(j.dir)))


class SweepFailures(Callback):
    """After a multirun, count the jobs whose metrics.json says failed; exit 1 naming them. A cell a halving sweep
    stopped (status stopped) did what it was asked to."""

    def on_multirun_end(self, config, **kwargs) -> None:
        jobs = read_jobs(config.hydra.sweep.dir)
        failed = [j for j in jobs if j.status not in ("ok", "stopped")]
        if not failed:
            stopped = sum(j.status == "stopped" for j in jobs)
            log.info("sweep finished: %d jobs, all ok%s", len(jobs),
                     f" ({stopped} stopped early by halving)" if stopped else "")
            return
        lines = [f"  {j.dir}: {j.metrics.get('error', j.status)}" for j in failed]
        msg = f"{len(failed)} of {len(jobs)} sweep jobs failed:\n" + "\n".join(lines)
        log.error(msg)
        print(msg, file=sys.stderr)
        sys.exit(1)
