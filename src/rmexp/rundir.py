"""What a run dir holds, and the only code that writes it.

    <run dir>/rmexp_config.yaml   the resolved config (RewardModel.load and rmexp.export read it)
             metrics.json        status, accuracy with its interval, baselines, data counts; written
                                 whether the run succeeds, fails or is preempted (run_record)
             scores.jsonl        one line per held-out pair: index, pair_id, source (when the pair has
                                 one), the two rewards and whether chosen won (score_lines)
             adapter_*, tokenizer*  the trained adapter and head (trainer.save_model)
             checkpoints/checkpoint-N  for trainer.resume=auto, and a requeued submitit job's resume; each
                                 with rmexp_checkpoint.json, the size of every file as saved
             checkpoints/skipped-checkpoint-N  a damaged checkpoint a resume passed over (kept, not deleted)
             previous-<time>/    an earlier run in this dir, moved aside by trainer.resume=never

Files are written to a temp name and renamed, so a reader never sees half a file; a full disk, a
quota or a read-only mount gives an error naming the run dir. A dir that holds a run is not started
over unless trainer.resume says how (claim_run_dir), and a checkpoint is read back before a resume
trusts it (diagnose_checkpoint).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shlex
import shutil
import time
import traceback
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rmexp.config import RMExpConfig, group_defaults, literal
from rmexp.errors import MissingPathError, UserError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

RUN_CONFIG = "rmexp_config.yaml"  # the resolved config a run was trained with
CHECKPOINT_FILES = ("trainer_state.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt")
MANIFEST = "rmexp_checkpoint.json"  # in each checkpoint: the size of every file as it was saved (write_manifest)


class RunDirError(UserError, RuntimeError):
    """A run dir that holds another run, started without `trainer.resume` saying what to do with it."""


class CheckpointError(UserError, RuntimeError):
    """No checkpoint fit to resume from: the message names each one and what is wrong with it."""


class Suspended(BaseException):
    """A run stopped to be continued, not failed (rmexp.preemption.Preempted): run_record writes `status`
    with `details` into metrics.json. Defined here so that run_record needs no import of rmexp.preemption,
    which imports this module (and transformers)."""

    status: str

    def __init__(self, message: str, details: dict):
        super().__init__(message)
        self.details = details

    def requeue(self) -> None:
        """Hand the job back to its scheduler (Preempted: submitit's handler requeues it and exits)."""
        raise NotImplementedError


@contextlib.contextmanager
def requeue_if_suspended() -> Iterator[None]:
    """Around a job's whole body: on Suspended (checkpointed, metrics.json says preempted) the job is handed back
    to its scheduler, which requeues it; the exception goes no further."""
    try:
        yield
    except Suspended as stop:
        log.warning("%s", stop)
        stop.requeue()


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


def list_checkpoints(checkpoints: Path) -> list[Path]:
    """checkpoint-N dirs under `checkpoints`, oldest (lowest N) first."""
    found = [(int(d.name.split("-")[1]), d) for d in checkpoints.glob("checkpoint-*")
             if d.is_dir() and d.name.split("-")[1].isdigit()]
    return [d for _, d in sorted(found)]


def last_complete_checkpoint(checkpoints: Path) -> Path | None:
    """The newest checkpoint-N holding every file a resume needs; a half-written one is skipped."""
    for d in reversed(list_checkpoints(checkpoints)):
        if all((d / f).is_file() for f in CHECKPOINT_FILES):
            return d
        log.warning("skipping incomplete checkpoint %s", d)
    return None


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(ckpt: Path, step: int) -> None:
    """rmexp_checkpoint.json: the size of every file of a just-saved checkpoint, the files and the manifest
    flushed to disk first, so a manifest never describes data still in the page cache (a node lost after
    the save would otherwise leave a checkpoint that looks whole)."""
    files = {str(p.relative_to(ckpt)): p.stat().st_size for p in sorted(ckpt.rglob("*"))
             if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp")}
    for name in files:
        _sync(ckpt / name)
    write_json(ckpt / MANIFEST, {"step": step, "files": files})
    _sync(ckpt / MANIFEST)
    _sync(ckpt)  # the renames themselves


def _read_back(path: Path) -> str | None:
    """Why a checkpoint file's structure does not read, from its header or index alone (no tensor data):
    JSON parses, a safetensors header covers the file, a torch.save zip has its central directory."""
    from safetensors import SafetensorError, safe_open

    try:
        if path.name in ("trainer_state.json", "adapter_config.json"):
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt"):
                pass
        elif path.suffix in (".pt", ".pth", ".bin"):  # torch.save's format is a zip, its index at the end
            with zipfile.ZipFile(path):
                pass
    except (OSError, ValueError, zipfile.BadZipFile, SafetensorError) as e:  # JSONDecodeError, UnicodeError: ValueError
        return f"{path.name} does not read ({type(e).__name__}: {e})"
    return None


def diagnose_checkpoint(ckpt: Path) -> str | None:
    """What is wrong with a checkpoint, None if it is fit to resume from: a file missing, a file another size
    than rmexp_checkpoint.json says was written, or one whose structure does not read (_read_back). A
    checkpoint without a manifest (saved by an older rmexp, or killed between the save and the manifest)
    gets the structural reads alone."""
    try:
        written = json.loads((ckpt / MANIFEST).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        written = {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} does not read ({type(e).__name__}: {e})"
    problems = []
    names = list(dict.fromkeys([*CHECKPOINT_FILES, *written,
                                *(p.name for p in sorted(ckpt.glob("*")) if p.is_file() and p.name != MANIFEST)]))
    for name in names:
        path = ckpt / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif name in written and (size := path.stat().st_size) != written[name]:
            problems.append(f"{name} is {size} bytes, {written[name]} were written")
        elif problem := _read_back(path):
            problems.append(problem)
    return "; ".join(problems) or None


def _set_aside(ckpt: Path) -> Path:
    """A damaged checkpoint renamed out of transformers' sight (it rotates and resumes `checkpoint-*`):
    the resumed run then saves that step into a new dir, not over stale files, and nothing is deleted."""
    dest, n = ckpt.with_name(f"skipped-{ckpt.name}"), 1
    while dest.exists():
        dest, n = ckpt.with_name(f"skipped-{ckpt.name}.{n}"), n + 1
    os.replace(ckpt, dest)
    return dest


def pick_checkpoint(checkpoints: Path, set_aside: bool = True) -> tuple[Path | None, list[dict]]:
    """The newest intact checkpoint under `checkpoints` (diagnose_checkpoint) and the newer ones passed over,
    each named in one WARNING line and, with `set_aside` (the main process), renamed skipped-checkpoint-N.
    (None, []) when there is no checkpoint; CheckpointError naming each one when none is intact."""
    found, skipped = list_checkpoints(checkpoints), []
    for ckpt in reversed(found):
        problem = diagnose_checkpoint(ckpt)
        if problem is None:
            for entry in skipped:
                if set_aside:
                    entry["moved_to"] = str(_set_aside(Path(entry["checkpoint"])))
                log.warning("damaged checkpoint %s: %s; resuming from %s instead%s", entry["checkpoint"],
                            entry["problem"], ckpt.name, f" (moved to {entry['moved_to']})" if set_aside else "")
            return ckpt, skipped
        skipped.append({"checkpoint": str(ckpt), "problem": problem})
    if skipped:
        raise CheckpointError(f"no intact checkpoint to resume from in {checkpoints}: "
                              + "; ".join(f"{Path(e['checkpoint']).name}: {e['problem']}" for e in skipped)
                              + f". Start over with trainer.resume=never (the run moves to "
                              f"{checkpoints.parent}/previous-<time>/)")
    return None, []


def find_previous_run(run_dir: Path) -> list[str]:
    """What in a run dir says a run already used it: its checkpoints, a trained adapter, a finished metrics.json."""
    found = [f"checkpoints/{d.name}" for d in list_checkpoints(run_dir / "checkpoints")]
    if is_run_dir(run_dir):
        found.append("adapter_config.json")
    try:
        finished = json.loads((run_dir / "metrics.json").read_text()).get("status") == "ok"
    except (OSError, ValueError, AttributeError):
        finished = False
    return found + (["metrics.json (status ok)"] if finished else [])


def _find_open_logs(run_dir: Path) -> dict[Path, logging.FileHandler]:
    """This process's log files inside `run_dir` (Hydra's <job>.log), by path."""
    loggers = [logging.root, *(lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger))]
    return {Path(h.baseFilename).resolve(): h for lg in loggers for h in lg.handlers
            if isinstance(h, logging.FileHandler) and Path(h.baseFilename).resolve().parent == run_dir.resolve()}


def move_previous_run(run_dir: Path) -> Path | None:
    """trainer.resume=never: the run dir's files into <run_dir>/previous-<time>/ (returned; None when there
    is nothing to move). Hydra's .hydra/ (already this run's) and earlier previous-* dirs stay. A log file
    this process writes to is copied there and emptied: moved, it would take this run's lines with it."""
    if not run_dir.is_dir():
        return None
    logs = _find_open_logs(run_dir)
    entries = [p for p in sorted(run_dir.iterdir()) if p.name != ".hydra" and not p.name.startswith("previous-")
               and p.resolve() not in logs]
    if not entries:  # a log alone is this run's own (Hydra opened it), not a previous run
        return None
    stamp, n = time.strftime("%Y-%m-%d_%H-%M-%S"), 1
    dest = run_dir / f"previous-{stamp}"
    while dest.exists():
        dest, n = run_dir / f"previous-{stamp}.{n}", n + 1
    dest.mkdir()
    for p in entries:
        os.replace(p, dest / p.name)
    for path in (p for p in logs if p.is_file() and p.stat().st_size > 0):
        handler = logs[path]
        handler.acquire()
        try:
            handler.flush()
            shutil.copy2(path, dest / path.name)
            os.truncate(path, 0)  # appended to (Hydra opens it with "a"): this run's lines start at 0
        finally:
            handler.release()
    log.warning("trainer.resume=never: the previous run in %s moved to %s", run_dir, dest)
    return dest


def claim_run_dir(run_dir: Path, resume: str | None, main_process: bool = True) -> Path | None:
    """Before anything loads: a run dir that holds a run (find_previous_run) is only trained in again when
    `trainer.resume` says how: auto (or a checkpoint path) continues, never moves the old run's files to
    <run_dir>/previous-<time>/ (returned; the main process moves) and starts over; unset raises RunDirError.
    A fresh dir (Hydra's default: one per run) passes. A requeued submitit job's own dir is not claimed
    (rmexp.preemption.resume_checkpoint continues it whatever resume says)."""
    if resume not in (None, "", "auto", "never") and not Path(resume).is_dir():  # before run_record writes
        raise MissingPathError(f"trainer.resume: no checkpoint dir {resume} (auto, never or a checkpoint-N dir)")
    found = find_previous_run(run_dir)
    if resume == "never":  # only a run is moved: a dir that holds none (say, a parent of runs) stays as it is
        return move_previous_run(run_dir) if main_process and (found or (run_dir / "metrics.json").is_file()) else None
    if not found:
        return None
    start_over = f"start over with trainer.resume=never (its files move to {run_dir}/previous-<time>/, nothing is deleted)"
    if not resume:
        raise RunDirError(f"{run_dir} holds a previous run ({', '.join(found)}); not training over it. Continue it "
                          f"with trainer.resume=auto, or {start_over}")
    if resume == "auto" and not list_checkpoints(run_dir / "checkpoints"):
        raise RunDirError(f"trainer.resume=auto: {run_dir} holds a finished run ({', '.join(found)}) and no "
                          f"checkpoint to continue from; {start_over}")
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


def read_run_config(run_dir: str | Path) -> RMExpConfig:
    """The config a run was trained with, typed (the schema's checks apply to it as to a new run); a key
    the run's version did not have takes today's default."""
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    for candidate in (run_dir / RUN_CONFIG, run_dir / ".hydra" / "config.yaml"):
        if candidate.is_file():
            saved = OmegaConf.load(candidate)
            saved.paths = {"output_dir": str(run_dir)}  # .hydra/config.yaml keeps Hydra's interpolation
            merged = OmegaConf.merge(group_defaults(), saved)
            return OmegaConf.to_object(merged)
    raise MissingPathError(f"{run_dir}: not an rmexp run dir (no {RUN_CONFIG} or .hydra/config.yaml)")


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
    write: bool = True
    carried: dict[str, Any] = field(default_factory=dict)  # an earlier attempt's W&B run, until this one starts W&B

    def identity(self) -> dict[str, Any]:
        """What a later attempt of this run continues: the submitit job and the W&B run (an earlier attempt's while
        this one has not started W&B yet: an attempt that fails before it must not lose the run's W&B id)."""
        job_id, run = submitit_job_id(), self.wandb_run
        return ({"job_id": job_id} if job_id else {}) | (
            {"wandb_run_id": run.id, "wandb_run_name": run.name} if run is not None else self.carried)

    def running(self, wandb_run) -> None:
        """The W&B run has started: metrics.json says `running` and names it, so an attempt that follows a kill -9
        still logs into the same W&B run."""
        self.wandb_run = wandb_run
        if self.write:
            write_json(self.run_dir / "metrics.json", {"status": "running"} | self.identity())


@contextlib.contextmanager
def run_record(run_dir: Path, write: bool = True, carried: dict | None = None) -> Iterator[RunRecord]:
    """Own a run's end, whatever happens inside: metrics.json gets `status` ok (the body set `result`),
    failed (with the error and traceback) or preempted (Suspended: the step and checkpoint), the runtime,
    and under submitit the job id; the W&B run gets the status and is finished with a matching exit code.
    `write=False` on ranks other than 0; `carried`: the W&B run an earlier attempt named, kept until this one
    starts W&B."""
    run_dir.mkdir(parents=True, exist_ok=True)
    record, started = RunRecord(run_dir, write=write, carried=carried or {}), time.time()
    try:
        yield record
        if record.result.get("status") != "paused":  # paused: at a halving sweep's rung (rmexp.rungs), checkpointed
            record.result["status"] = "ok"
    except Suspended as e:  # not a failure: the job is requeued and resumes from its checkpoint
        record.result = {"status": e.status, **e.details}
        raise
    except BaseException as e:
        record.result = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                         "traceback": traceback.format_exc(limit=20)}
        raise
    finally:
        record.result["runtime_s"] = round(time.time() - started, 2)
        record.result |= record.identity()  # how a later attempt knows its predecessor's job and W&B run
        if write:
            write_json(run_dir / "metrics.json", record.result)
        if record.wandb_run is not None:
            status = record.result["status"]
            record.wandb_run.summary.update({"status": status}
                                            | ({"error": record.result["error"]} if status == "failed" else {}))
            if status == "preempted":
                record.wandb_run.mark_preempting()
            record.wandb_run.finish(exit_code=0 if status in ("ok", "paused") else 1)


RUN_OR_EXPORT = "a run dir rmexp-train wrote (outputs/runs/<date>/<time>) or a dir rmexp-export wrote"
ENSEMBLE_FILE = "ensemble.json"  # rmexp-ensemble's record: its mode, members and their standardization


def ensemble_record(path: Path) -> dict | None:
    """rmexp-ensemble's record in a dir it wrote (mean or soup), else None."""
    record = Path(path) / ENSEMBLE_FILE
    return json.loads(record.read_text(encoding="utf-8")) if record.is_file() else None


def mean_ensemble(path: Path) -> dict | None:
    """rmexp-ensemble's record of a mean ensemble dir (its members' adapters scored on one base), else None; a soup
    dir holds one too but is a run dir like any other."""
    record = ensemble_record(path)
    return record if record is not None and record.get("mode") == "mean" else None


def evaluated_ensemble(eval_dir: Path) -> dict | None:
    """rmexp-ensemble's record (mean or soup) of the model an rmexp-evaluate dir evaluated (its eval_metrics.json's
    `checkpoint`), or of `eval_dir` itself; None for any other model."""
    metrics = Path(eval_dir) / "eval_metrics.json"
    checkpoint = json.loads(metrics.read_text(encoding="utf-8")).get("checkpoint") if metrics.is_file() else None
    return ensemble_record(Path(checkpoint or eval_dir))


class CheckpointPathError(UserError, FileNotFoundError):
    """A path that is there but holds no model to load as given (a run that failed or is still training, a
    dir inside a run, a damaged checkpoint): the message names what to pass instead."""


# ---------------------------------------------------------------- what a path holds


def locate(path: Path) -> Path | None:
    """The run dir whose config the model at `path` was trained with: `path` itself for a run dir, the run
    above it for a checkpoint (`<run>/checkpoints/checkpoint-N`); None for an exported HF dir. Any other
    path is a MissingPathError or CheckpointPathError saying what it is and what to pass instead: nothing
    loads a model it was not asked for."""
    if not path.exists():
        raise MissingPathError(f"{path}: no such dir; pass {RUN_OR_EXPORT}")
    if not path.is_dir():
        holder = _run_above(path)
        raise CheckpointPathError(f"{path} is a file, not a model dir: pass "
                                  + (f"the run dir it is in, {holder}" if holder else f"the dir that holds it ({RUN_OR_EXPORT})"))
    if mean_ensemble(path) is not None:  # scored as its members' run dirs are (rmexp.reward_model.EnsembleRewardModel)
        return path
    if is_run_dir(path):  # an adapter: a run dir, or a checkpoint of one
        if _has_run_config(path):
            _check_finished(path)
            return path
        run = path.parent.parent
        if path.parent.name == "checkpoints" and _has_run_config(run):
            _check_checkpoint(path, run)
            return run
        holder = _run_above(path)
        raise CheckpointPathError(f"{path} holds a LoRA adapter but no {RUN_CONFIG} (the config it was trained with), "
                                  "so it is no run dir rmexp-train wrote: pass "
                                  + (f"the run dir it is in, {holder}" if holder else RUN_OR_EXPORT))
    if (path / "config.json").is_file():
        return None
    if _has_run_config(path) or (path / "metrics.json").is_file():
        raise CheckpointPathError(_unfinished(path))
    if path.name == "checkpoints" and _has_run_config(path.parent):
        raise CheckpointPathError(f"{path} holds the run's checkpoints: pass the run dir {path.parent} (its final "
                                  f"model) or one checkpoint as it was at its step ({_names(list_checkpoints(path))})")
    if holder := _run_above(path):
        raise CheckpointPathError(f"{path} is a dir inside the run dir {holder}: pass {holder}")
    runs = sorted({p.parent for pattern in (f"*/{RUN_CONFIG}", f"*/*/{RUN_CONFIG}") for p in path.glob(pattern)})
    if runs:
        raise CheckpointPathError(f"{path} holds runs, not one model: pass one of them ({_names(runs, path)})")
    raise CheckpointPathError(f"{path}: neither an rmexp run dir ({RUN_CONFIG}, adapter_config.json) nor a HF model "
                              f"dir (config.json); pass {RUN_OR_EXPORT}")


def _has_run_config(path: Path) -> bool:
    return (path / RUN_CONFIG).is_file() or (path / ".hydra" / "config.yaml").is_file()


def _run_above(path: Path) -> Path | None:
    """The nearest dir above `path` that holds a run's config."""
    return next((p for p in path.absolute().parents if _has_run_config(p)), None)


def _names(paths: list[Path], relative_to: Path | None = None, most: int = 5) -> str:
    shown = [str(p.relative_to(relative_to) if relative_to else p.name) for p in paths[-most:]]
    return ", ".join(shown) + (f" and {len(paths) - most} more" if len(paths) > most else "") if paths else "none"


def _metrics(run: Path) -> dict | str | None:
    """The run's metrics.json; None when there is none, a string saying why when it does not read."""
    try:
        metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        return f"metrics.json does not read ({type(e).__name__}: {e})"
    return metrics if isinstance(metrics, dict) else "metrics.json holds no object"


def _resume_command(run: Path) -> str:
    """The command that continues the run in its own dir (rmexp.resume adds the run's own overrides)."""
    return f"rmexp-train hydra.run.dir={shlex.quote(str(run))} trainer.resume=auto"


def _unfinished(run: Path) -> str:
    """What a run dir without an adapter is (failed, preempted, still training) and what to pass or do instead."""
    metrics = _metrics(run)
    checkpoints = [c for c in list_checkpoints(run / "checkpoints") if is_run_dir(c)]
    last = checkpoints[-1] if checkpoints else None
    resume = f"continue it with `{_resume_command(run)}`"
    as_is = f"; to score its newest checkpoint as it is, pass {last}" if last else ""
    retrain = (f"{resume}{as_is}" if last else "train it again (in a new run dir, or in this one with trainer.resume=never, "
               f"which moves this run to {run}/previous-<time>/)")
    if isinstance(metrics, str) or metrics is None or metrics.get("status") == "running":
        what = metrics if isinstance(metrics, str) else "no metrics.json" if metrics is None else "metrics.json: status running"
        return (f"{run}: this run holds no trained model yet ({what}, no adapter_config.json): it is still training, "
                f"or was killed before it ended. Wait for it to finish, or {retrain}")
    status, error = metrics.get("status"), metrics.get("error")
    if status == "failed":
        then = ("It was stopped, not broken: " if str(error).startswith(("StoppedBySignal", "InterruptedError"))
                else "Once its cause is fixed, ")
        return (f"{run}: this run failed, so it holds no trained model (metrics.json: status failed, error: {error}). "
                f"{then}{retrain}")
    if status == "preempted":
        ckpt = metrics.get("checkpoint") or last
        at = f" at step {metrics['step']}" if metrics.get("step") is not None else ""
        return (f"{run}: this run was preempted{at} (metrics.json: status preempted) and holds no trained model yet; "
                f"a requeued job continues it from its checkpoint. Wait for it to finish, or {resume}"
                + (f"; to score the checkpoint as it is, pass {ckpt}" if ckpt else ""))
    if status in ("stopped", "paused"):
        rung = metrics.get("stopped_at_rung", (metrics.get("rung") or {}).get("rung"))
        what = ("a halving sweep stopped it at rung" if status == "stopped" else "it paused at rung")
        return (f"{run}: {what} {rung} (metrics.json: status {status}), before the end of its training, so it holds "
                f"no trained model" + (f"; to score its rung checkpoint as it is, pass {last}" if last else "")
                + ("" if status == "stopped" else "; the halving sweep continues it"))
    if status == "ok":
        return (f"{run}: metrics.json says the run finished (status ok) but its adapter (adapter_config.json, "
                f"adapter_model.safetensors) is not there: copy the whole run dir, or pass a dir rmexp-export wrote")
    return f"{run}: this run holds no trained model (metrics.json: status {status}, error: {error}); {retrain}"


def _check_finished(run: Path) -> None:
    """A run dir's adapter is the run's result only when metrics.json (if any) says the run ended ok: an
    adapter beside a failed or preempted metrics.json is an earlier attempt's."""
    metrics = _metrics(run)
    if metrics is None or (isinstance(metrics, dict) and metrics.get("status") == "ok"):
        return
    raise CheckpointPathError(_unfinished(run) + " (the adapter in it is an earlier attempt's, not this run's result)")


def _check_checkpoint(ckpt: Path, run: Path) -> None:
    """A checkpoint is scored as it is only when it is one a resume would trust with its adapter: not one a
    resume set aside, its adapter the size rmexp_checkpoint.json says was written."""
    others = _names([c for c in list_checkpoints(ckpt.parent) if c != ckpt])
    if ckpt.name.startswith("skipped-"):
        raise CheckpointPathError(f"{ckpt} is a damaged checkpoint a resume set aside (metrics.json's resume_skipped "
                                  f"says what is wrong with it): pass the run dir {run} or another checkpoint ({others})")
    if not (ckpt.name.startswith("checkpoint-") and ckpt.name[len("checkpoint-"):].isdigit()):
        raise CheckpointPathError(f"{ckpt} is no checkpoint-N the trainer finished saving: pass the run dir {run} or "
                                  f"a checkpoint ({others})")
    try:
        written = json.loads((ckpt / MANIFEST).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:  # an older rmexp's checkpoint
        written = {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        written = {MANIFEST: f"unreadable ({type(e).__name__}: {e})"}
    problems = [f"{name} is missing" for name in ("adapter_config.json", "adapter_model.safetensors")
                if not (ckpt / name).is_file()]
    problems += [f"{name} is {(ckpt / name).stat().st_size} bytes, {size} were written" for name, size in written.items()
                 if name.startswith("adapter_") and (ckpt / name).is_file() and (ckpt / name).stat().st_size != size]
    if MANIFEST in written:
        problems.append(f"{MANIFEST} is {written[MANIFEST]}")
    if problems:
        raise CheckpointPathError(f"{ckpt}: a damaged checkpoint ({'; '.join(problems)}): pass the run dir {run} "
                                  f"or another checkpoint ({others})")
