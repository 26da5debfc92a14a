"""RewardModel.load of a path that holds no model to load as given: a UserError (and a FileNotFoundError, as
before) naming what the path is and what to pass instead, raised before any model loads. The dirs are made
by hand with only the files the check reads (rmexp.rundir documents what a run dir holds)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rmexp import RewardModel
from rmexp.errors import MissingPathError, UserError
from rmexp.reward_model import CheckpointPathError, locate


def run_dir(root: Path, metrics: dict | None = None, adapter: bool = False, checkpoints=(), overrides=None) -> Path:
    """A run dir as rmexp-train leaves it: its config, metrics.json when given, the adapter when it finished,
    checkpoints/checkpoint-N (an adapter and rmexp_checkpoint.json each), Hydra's overrides.yaml when given."""
    root.mkdir(parents=True)
    (root / "rmexp_config.yaml").write_text("model: {}\n")
    if metrics is not None:
        (root / "metrics.json").write_text(json.dumps(metrics))
    if adapter:
        (root / "adapter_config.json").write_text("{}")
    for step in checkpoints:
        ckpt = root / "checkpoints" / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "adapter_config.json").write_text("{}")
        (ckpt / "adapter_model.safetensors").write_bytes(b"x" * 100)
        (ckpt / "rmexp_checkpoint.json").write_text(json.dumps({"step": step, "files": {
            "adapter_config.json": 2, "adapter_model.safetensors": 100}}))
    if overrides is not None:
        (root / ".hydra").mkdir()
        (root / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return root


def refused(path: Path, kind=CheckpointPathError) -> str:
    with pytest.raises(kind) as caught:
        RewardModel.load(path)
    assert isinstance(caught.value, UserError) and isinstance(caught.value, FileNotFoundError)
    return str(caught.value)


def test_a_path_that_is_not_there_is_a_missing_path_error(tmp_path):
    message = refused(tmp_path / "outputs" / "nope", MissingPathError)
    assert message == (f"{tmp_path}/outputs/nope: no such dir; pass a run dir rmexp-train wrote "
                       "(outputs/runs/<date>/<time>) or a dir rmexp-export wrote")


def test_a_failed_run_names_its_error_and_what_to_do(tmp_path):
    run = run_dir(tmp_path / "run", {"status": "failed", "error": "ValueError: data.path: no such file x.jsonl"})
    assert refused(run) == (
        f"{run}: this run failed, so it holds no trained model (metrics.json: status failed, error: ValueError: "
        "data.path: no such file x.jsonl). Once its cause is fixed, train it again (in a new run dir, or in this "
        f"one with trainer.resume=never, which moves this run to {run}/previous-<time>/)")


def test_a_run_stopped_with_a_checkpoint_is_continued_by_the_resume_command(tmp_path):
    run = tmp_path / "run"
    error = (f"StoppedBySignal: stopped by SIGTERM at step 6; a checkpoint is in {run}/checkpoints: continue with "
             f"rmexp-train hydra.run.dir={run} trainer.resume=auto")
    run_dir(run, {"status": "failed", "error": error}, checkpoints=(2, 4),
            overrides=["model=tiny", "data.path=my pairs.jsonl", "hydra.run.dir=x", "trainer.resume=auto"])
    message = refused(run)
    assert message.startswith(f"{run}: this run failed, so it holds no trained model (metrics.json: status failed, "
                              f"error: {error}). It was stopped, not broken: ")
    # the command alone: rmexp.resume adds the run's own overrides (.hydra/overrides.yaml) to it
    assert message.endswith(f"continue it with `rmexp-train hydra.run.dir={run} trainer.resume=auto`; to score its "
                            f"newest checkpoint as it is, pass {run}/checkpoints/checkpoint-4")


def test_a_preempted_run_names_its_checkpoint(tmp_path):
    run = tmp_path / "run"
    run_dir(run, {"status": "preempted", "step": 40, "signal": "SIGUSR2", "checkpoint": f"{run}/checkpoints/checkpoint-40"},
            checkpoints=(40,))
    assert refused(run) == (
        f"{run}: this run was preempted at step 40 (metrics.json: status preempted) and holds no trained model yet; "
        "a requeued job continues it from its checkpoint. Wait for it to finish, or continue it with "
        f"`rmexp-train hydra.run.dir={run} trainer.resume=auto`; to score the checkpoint as "
        f"it is, pass {run}/checkpoints/checkpoint-40")


def test_a_run_still_training_says_so(tmp_path):
    run = run_dir(tmp_path / "run")  # no metrics.json until the run ends
    assert refused(run) == (
        f"{run}: this run holds no trained model yet (no metrics.json, no adapter_config.json): it is still training, "
        "or was killed before it ended. Wait for it to finish, or train it again (in a new run dir, or in this one "
        f"with trainer.resume=never, which moves this run to {run}/previous-<time>/)")


def test_an_adapter_beside_a_failed_metrics_json_is_not_loaded(tmp_path):
    """An earlier attempt's adapter, and perhaps a config rewritten by the attempt that failed: not the run's result."""
    run = run_dir(tmp_path / "run", {"status": "failed", "error": "RuntimeError: boom"}, adapter=True)
    message = refused(run)
    assert "status failed, error: RuntimeError: boom" in message
    assert message.endswith("(the adapter in it is an earlier attempt's, not this run's result)")


def test_a_finished_run_without_its_adapter_says_to_copy_it(tmp_path):
    run = run_dir(tmp_path / "run", {"status": "ok", "pairwise_accuracy": 0.7})
    assert refused(run) == (f"{run}: metrics.json says the run finished (status ok) but its adapter "
                            "(adapter_config.json, adapter_model.safetensors) is not there: copy the whole run dir, "
                            "or pass a dir rmexp-export wrote")


def test_a_checkpoint_is_located_to_its_run(tmp_path):
    """A checkpoint loads with the config of the run above it (the model as it was at its step)."""
    run = run_dir(tmp_path / "run", {"status": "ok"}, adapter=True, checkpoints=(4, 8))
    assert locate(run / "checkpoints" / "checkpoint-8") == run
    assert locate(run) == run


def test_a_damaged_or_set_aside_checkpoint_is_refused_by_name(tmp_path):
    run = run_dir(tmp_path / "run", {"status": "ok"}, adapter=True, checkpoints=(4, 8))
    ckpt = run / "checkpoints" / "checkpoint-8"
    (ckpt / "adapter_model.safetensors").write_bytes(b"x" * 60)  # cut short by a full disk
    assert refused(ckpt) == (f"{ckpt}: a damaged checkpoint (adapter_model.safetensors is 60 bytes, 100 were "
                             f"written): pass the run dir {run} or another checkpoint (checkpoint-4)")
    skipped = ckpt.rename(run / "checkpoints" / "skipped-checkpoint-8")
    assert refused(skipped).startswith(f"{skipped} is a damaged checkpoint a resume set aside")


def test_paths_inside_a_run_name_the_run(tmp_path):
    run = run_dir(tmp_path / "run", {"status": "ok"}, adapter=True, checkpoints=(4, 8), overrides=[])
    assert refused(run / "checkpoints") == (f"{run}/checkpoints holds the run's checkpoints: pass the run dir {run} "
                                            "(its final model) or one checkpoint as it was at its step "
                                            "(checkpoint-4, checkpoint-8)")
    assert refused(run / ".hydra") == f"{run}/.hydra is a dir inside the run dir {run}: pass {run}"
    assert refused(run / "metrics.json") == f"{run}/metrics.json is a file, not a model dir: pass the run dir it is in, {run}"


def test_a_dir_of_runs_lists_them(tmp_path):
    for name in ("0", "1"):
        run_dir(tmp_path / "multirun" / "12-00-00" / name, {"status": "ok"}, adapter=True)
    assert refused(tmp_path / "multirun") == f"{tmp_path}/multirun holds runs, not one model: pass one of them (12-00-00/0, 12-00-00/1)"


def test_a_dir_that_is_no_model_says_what_to_pass(tmp_path):
    assert refused(tmp_path) == (f"{tmp_path}: neither an rmexp run dir (rmexp_config.yaml, adapter_config.json) nor "
                                 "a HF model dir (config.json); pass a run dir rmexp-train wrote "
                                 "(outputs/runs/<date>/<time>) or a dir rmexp-export wrote")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert re.match(rf"{adapter} holds a LoRA adapter but no rmexp_config\.yaml .*: pass a run dir rmexp-train wrote",
                    refused(adapter))
