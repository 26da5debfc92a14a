"""What a run dir holds, and the only code that writes it.

    <run dir>/rmexp_config.yaml   the resolved config (RewardModel.load and rmexp.export read it)
             metrics.json        status, accuracy with its interval, baselines, data counts; written
                                 whether the run succeeds, fails or is preempted (run_record)
             scores.jsonl        one line per held-out pair: index, pair_id, source (when the pair has
                                 one), the two rewards and whether chosen won (score_lines)
             adapter_*, tokenizer*  the trained adapter and head (trainer.save_model)
             checkpoints/checkpoint-N  for trainer.resume=auto, and a requeued submitit job's resume

Files are written to a temp name and renamed, so a reader never sees half a file; a full disk, a
quota or a read-only mount gives an error naming the run dir.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rmexp.config import RMExpConfig, literal

log = logging.getLogger(__name__)

RUN_CONFIG = "rmexp_config.yaml"  # the resolved config a run was trained with
CHECKPOINT_FILES = ("trainer_state.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt")


def is_main_process() -> bool:
    """Rank 0 under torchrun / accelerate launch (and a plain single process): the one that writes."""
    return int(os.environ.get("RANK", "0")) == 0


def is_run_dir(path: Path) -> bool:
    """A training run dir (an adapter beside its config), as opposed to an exported model dir."""
    return (path / "adapter_config.json").is_file()


def write_json(path: Path, obj) -> None:
    """Write via a temp file and rename, so a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def pair_id(pair) -> str:
    """A pair's stable identity across runs and files: 16 hex digits of blake2b over its content as parsed
    (prompt messages, chosen, rejected: `Pair.key()`, which the leakage check compares too), so the same pair
    read from an HH file or a TRL file has one id. The system prompt is the model's setting, not the pair's."""
    return hashlib.blake2b(pair.key().encode(), digest_size=8).hexdigest()


def pair_id_of_key(key: int) -> str:
    """`pair_id` from rmexp.dataset's `key` column, which holds the same 8 bytes read as a little-endian int64."""
    return int(key).to_bytes(8, "little", signed=True).hex()


def pair_identity(pid: str, source: str | None) -> dict:
    """What scores.jsonl says of a pair besides its rewards: its id, and its source/subset when it has one."""
    return {"pair_id": pid} if source is None else {"pair_id": pid, "source": source}


def score_lines(rewards: torch.Tensor, start: int = 0, identity: list[dict] | None = None) -> Iterator[str]:
    """scores.jsonl lines of rewards (n x 2), numbered from `start`; `identity` (one dict per row: pair_id and,
    when the pair has one, source) is written beside the index so runs can be paired on the pairs they share."""
    for k, (i, (c, r)) in enumerate(enumerate(rewards.tolist(), start)):
        ident = identity[k] if identity is not None else {}
        yield json.dumps({"index": i, **ident, "reward_chosen": c, "reward_rejected": r, "correct": c > r},
                         ensure_ascii=False) + "\n"


def write_scores(path: Path, rewards: torch.Tensor, identity: list[dict] | None = None) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.writelines(score_lines(rewards, identity=identity))
    os.replace(tmp, path)


@contextlib.contextmanager
def writes_to(run_dir: Path):
    """A full disk, a quota or a read-only mount while saving: an error that names the run dir."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO):
            raise
        raise OSError(e.errno, f"cannot write the run to {run_dir}: {e.strerror or e}") from e


def last_complete_checkpoint(checkpoints: Path) -> Path | None:
    """The newest checkpoint-N holding every file a resume needs; a half-written one is skipped."""
    found = sorted((int(d.name.split("-")[1]), d) for d in checkpoints.glob("checkpoint-*")
                   if d.name.split("-")[1].isdigit())
    for _, d in reversed(found):
        if all((d / f).is_file() for f in CHECKPOINT_FILES):
            return d
        log.warning("skipping incomplete checkpoint %s", d)
    return None


def submitit_job_id() -> str | None:
    """The submitit job this process runs in (its id stays the same when the job is requeued), else None."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    import submitit

    try:
        return submitit.JobEnvironment().job_id
    except (RuntimeError, KeyError):  # SUBMITIT_EXECUTOR inherited by a process that is no submitit job
        return None


def requeued_attempt(run_dir: Path) -> dict | None:
    """When this process is a submitit job run again (requeued after a preemption or its time limit, or
    restarted by SLURM): the metrics.json its previous attempt left in this run dir; else None. A new
    job writing into a dir another job used is not a requeue (the job ids differ)."""
    job_id = submitit_job_id()
    if job_id is None:
        return None
    try:
        previous = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):  # none yet (the previous attempt was killed outright) or half a file
        previous = {}
    if previous.get("job_id") == job_id or int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0:
        return previous
    return None


class Preempted(BaseException):
    """A submitit job stopped on submitit's preemption / time-limit signal, its checkpoint saved.

    `run_record` writes status `preempted` (with `details`: the step, the signal, the checkpoint), then
    `requeue()` runs submitit's own handler for the signal, which saves the job's submission, requeues
    it and exits; the requeued job resumes from the checkpoint (`resume_checkpoint`). A BaseException,
    like SystemExit: no error for an `except Exception` (a sweep's failed-job guard) to swallow."""

    def __init__(self, details: dict, requeue: Callable[[], Any]):
        super().__init__(f"preempted at step {details['step']} ({details['signal']}); requeueing the job")
        self.details, self.requeue = details, requeue


def resume_checkpoint(resume: str | None, run_dir: Path) -> str | None:
    """`trainer.resume`: null (fresh), auto (this run dir's last complete checkpoint) or a checkpoint dir.
    A requeued submitit job resumes from its run dir's last complete checkpoint whatever `resume` says."""
    if requeued_attempt(run_dir) is not None:
        ckpt = last_complete_checkpoint(run_dir / "checkpoints")
        if ckpt is not None:
            log.info("resuming requeued job %s from %s", submitit_job_id(), ckpt)
            return str(ckpt)
        log.warning("requeued job %s: no complete checkpoint under %s/checkpoints", submitit_job_id(), run_dir)
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


def _escaped(obj: Any) -> Any:
    """Strings with `${` kept literal when the YAML is read back (OmegaConf would interpolate them)."""
    if isinstance(obj, dict):
        return {k: _escaped(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_escaped(v) for v in obj]
    return literal(obj) if isinstance(obj, str) else obj


def write_run_config(run_dir: Path, config: dict) -> None:
    """rmexp_config.yaml: the resolved config (a plain dict, values as the run used them)."""
    from omegaconf import OmegaConf

    tmp = run_dir / (RUN_CONFIG + ".tmp")
    tmp.write_text(OmegaConf.to_yaml(_escaped(config)), encoding="utf-8")
    os.replace(tmp, run_dir / RUN_CONFIG)


def _group_defaults():
    """Today's default of every key (the groups' base options), for a run saved before a key existed."""
    from importlib import resources

    from omegaconf import OmegaConf

    conf = resources.files("rmexp.conf")
    groups = {"model": "model/base.yaml", "quantization": "quantization/base.yaml", "lora": "lora/default.yaml",
              "data": "data/base.yaml", "trainer": "trainer/default.yaml", "logger": "logger/base.yaml"}
    return OmegaConf.create({group: OmegaConf.load(conf.joinpath(path).open(encoding="utf-8"))
                             for group, path in groups.items()})


def read_run_config(run_dir: str | Path) -> RMExpConfig:
    """The config a run was trained with, typed (the schema's checks apply to it as to a new run); a key
    the run's version did not have takes today's default."""
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    for candidate in (run_dir / RUN_CONFIG, run_dir / ".hydra" / "config.yaml"):
        if candidate.is_file():
            saved = OmegaConf.load(candidate)
            saved.paths = {"output_dir": str(run_dir)}  # .hydra/config.yaml keeps Hydra's interpolation
            merged = OmegaConf.merge(OmegaConf.structured(RMExpConfig), _group_defaults(), saved)
            return OmegaConf.to_object(merged)
    raise FileNotFoundError(f"{run_dir}: not an rmexp run dir (no {RUN_CONFIG} or .hydra/config.yaml)")


def reward_stats(run_dir: Path) -> dict:
    """Reward mean/std of a run's held-out evaluation (metrics.json), for normalising rewards downstream."""
    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    return {k: metrics[k] for k in ("reward_mean", "reward_std", "pairwise_accuracy", "n_eval_pairs") if k in metrics}


@dataclass
class RunRecord:
    """What `run_record` writes at the end: `result` (metrics.json) and the W&B run to finish, if any."""

    run_dir: Path
    result: dict[str, Any] = field(default_factory=lambda: {"status": "running"})
    wandb_run: Any = None


@contextlib.contextmanager
def run_record(run_dir: Path, write: bool = True) -> Iterator[RunRecord]:
    """Own a run's end, whatever happens inside: metrics.json gets `status` ok (the body set `result`),
    failed (with the error and traceback) or preempted (Preempted: the step and checkpoint), the runtime,
    and under submitit the job id; the W&B run gets the status and is finished with a matching exit code.
    `write=False` on ranks other than 0."""
    run_dir.mkdir(parents=True, exist_ok=True)
    record, started = RunRecord(run_dir), time.time()
    try:
        yield record
        record.result["status"] = "ok"
    except Preempted as e:  # not a failure: the job is requeued and resumes from its checkpoint
        record.result = {"status": "preempted", **e.details}
        raise
    except BaseException as e:
        record.result = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                         "traceback": traceback.format_exc(limit=20)}
        raise
    finally:
        record.result["runtime_s"] = round(time.time() - started, 2)
        if job_id := submitit_job_id():  # how a requeued attempt of this job knows its predecessor
            record.result["job_id"] = job_id
        if record.wandb_run is not None:  # a requeued attempt logs into the same W&B run
            record.result["wandb_run_id"] = record.wandb_run.id
        if write:
            write_json(run_dir / "metrics.json", record.result)
        if record.wandb_run is not None:
            status = record.result["status"]
            record.wandb_run.summary.update({"status": status}
                                            | ({"error": record.result["error"]} if status == "failed" else {}))
            if status == "preempted":
                record.wandb_run.mark_preempting()
            record.wandb_run.finish(exit_code=0 if status == "ok" else 1)
