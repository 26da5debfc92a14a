"""Every console script on a mistake a user can fix: `error: <message>` as the last line of stderr, exit 1, no
traceback (HYDRA_FULL_ERROR=1 shows it), and, for a typo, a bad value or a missing path, before torch loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from conftest import ROOT
from rmexp.config import RMExpConfig
from rmexp.console import argparse_habit, nearest, schema_keys

HEAVY = ("torch", "transformers", "peft", "trl", "datasets", "bitsandbytes")  # ~10 s to import on 2 cores
SCRIPTS = {e.name: e.value for e in entry_points(group="console_scripts") if e.value.startswith("rmexp.")}
NO_FULL_ERROR = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
SAMPLE = str(ROOT / "data" / "preference.jsonl")


def run_script(script: str, args: list[str], cwd: Path, env: dict | None = None) -> tuple[subprocess.CompletedProcess, list]:
    """The console script's function, as its entry point calls it, in a fresh process: the result and which heavy
    modules it imported before it ended."""
    module, function = SCRIPTS[script].split(":")
    probe = (f"import sys, atexit\nsys.argv = [{script!r}, *{args!r}]\n"
             f"atexit.register(lambda: print('imported', sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
             f"from {module} import {function}\n{function}()\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=cwd,
                          env=env or NO_FULL_ERROR, timeout=300)
    imported = next((line for line in proc.stdout.splitlines() if line.startswith("imported ")), "imported ?")
    return proc, imported.removeprefix("imported ")


def assert_one_line(proc: subprocess.CompletedProcess, *named: str) -> str:
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert last.startswith("error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Error executing job" not in proc.stderr, proc.stderr[-3000:]
    for text in named:
        assert text in last, last
    return last


def used_run_dir(root: Path) -> Path:
    """Dirs as rmexp leaves them, without training: `used` holds a finished run, `failed` a run that failed before
    its first checkpoint, `exported` stands for an exported model."""
    run = root / "used"
    (run / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    (run / "metrics.json").write_text('{"status": "ok"}')
    (run / "rmexp_config.yaml").write_text("lora: {r: 8}\n")
    (root / "failed").mkdir()
    (root / "failed" / "rmexp_config.yaml").write_text("lora: {r: 8}\n")
    (root / "failed" / "metrics.json").write_text('{"status": "failed", "error": "DataError: x.jsonl:3: bad"}')
    (root / "stopped").mkdir()
    (root / "stopped" / "rmexp_config.yaml").write_text("lora: {r: 8}\n")
    (root / "stopped" / "metrics.json").write_text('{"status": "stopped", "stopped_at_rung": 0}')
    (root / "exported").mkdir()
    (root / "exported" / "config.json").write_text("{}")
    return run


# script, its arguments ({tmp}: the test's dir), what the error line names
FAST = [
    ("rmexp-train", ["lora.r=abc"], ["lora.r=abc", "Integer"]),
    ("rmexp-train", ["lora.r=0"], ["lora.r must be a positive integer"]),
    ("rmexp-train", ["data=file", "data.path={tmp}/missing.jsonl"], ["data.path: no such preference file",
                                                                      "missing.jsonl"]),
    ("rmexp-train", ["trainer.learning_rat=1e-4"], ["trainer.learning_rat", "did you mean trainer.learning_rate"]),
    ("rmexp-train", ["learning_rate=1e-4"], ["did you mean trainer.learning_rate?"]),
    ("rmexp-train", ["model=tyni"], ["did you mean model=tiny?"]),
    ("rmexp-train", ["--learning_rate", "1e-4"], ["--learning_rate", "write trainer.learning_rate=1e-4"]),
    ("rmexp-train", ["--lora_r=16"], ["write lora.r=16"]),
    ("rmexp-train", ["hydra.run.dir={tmp}/used"], ["holds a previous run", "trainer.resume=auto"]),
    ("rmexp-train", ["trainer.resume={tmp}/nothing-here"], ["trainer.resume: no checkpoint dir"]),
    ("rmexp-train", ["trainer.rungs=[0.5,1.0]"], ["trainer.rungs scores the rung split", "data.rung_path"]),
    ("rmexp-train", ["data.rung_fraction=0.1", "trainer.rungs=[0.5,0.25]"], ["trainer.rungs must be increasing"]),
    ("rmexp-train", ["data.rung_fraction=0.1", "trainer.rungs=[0.5,1.0]", "trainer.stop_at_rung=2"],
     ["trainer.stop_at_rung must be an index into trainer.rungs (0..1)"]),
    ("rmexp-train", ["data.rung_fraction=1.5"], ["data.rung_fraction must be in [0, 1)"]),
    ("rmexp-train", ["-m", "hydra/sweeper=halving", "lora.r=4,8", "hydra.sweep.dir={tmp}/halving"],
     ["a halving sweep decides on a rung split", "data.rung_path"]),
    ("rmexp-train", ["-m", "hydra/sweeper=halving", "hydra.sweeper.eta=1", "data.rung_fraction=0.1", "lora.r=4,8",
                     "hydra.sweep.dir={tmp}/halving"], ["hydra.sweeper.eta must be an integer >= 2"]),
    ("rmexp-train", ["-m", "hydra/sweeper=halving", "hydra.sweeper.statistic=auc", "data.rung_fraction=0.1",
                     "lora.r=4,8", "hydra.sweep.dir={tmp}/halving"], ["hydra.sweeper.statistic must be one of"]),
    ("rmexp-train", ["-m", "hydra/sweeper=halving", "hydra.sweeper.rule=best", "data.rung_fraction=0.1",
                     "lora.r=4,8", "hydra.sweep.dir={tmp}/halving"], ["hydra.sweeper.rule must be one of"]),
    ("rmexp-evaluate", ["checkpoint={tmp}/missing", f"data.path={SAMPLE}"], ["missing: no such dir; pass a run dir"]),
    ("rmexp-evaluate", ["checkpoint={tmp}/exported", "data.path={tmp}/missing.jsonl"],
     ["data.path: no such preference file"]),
    ("rmexp-evaluate", ["checkpoint={tmp}/failed", f"data.path={SAMPLE}"],
     ["this run failed", "DataError: x.jsonl:3: bad", "train it again"]),
    ("rmexp-score", ["checkpoint={tmp}/used/checkpoints", "question=q", "answer=a"], ["holds the run's checkpoints: pass the run dir", "or one checkpoint"]),
    ("rmexp-score", ["checkpoint={tmp}/missing", "question=q", "answer=a"], ["missing: no such dir; pass a run dir"]),
    ("rmexp-score", ["checkpoint={tmp}/stopped", "question=q", "answer=a"], ["a halving sweep stopped it at rung 0"]),
    ("rmexp-score", ["checkpoint={tmp}", "--question", "q"], ["write question=q"]),
    ("rmexp-export", ["checkpoint={tmp}/missing", "output_dir={tmp}/out"], ["missing: no such dir; pass a run dir"]),
    ("rmexp-serve", ["checkpoint={tmp}/missing"], ["missing: no such dir; pass a run dir"]),
    ("rmexp-serve", ["checkpoint={tmp}", "serve.prot=1"], ["did you mean serve.port"]),
    ("rmexp-report", ["sweep_dir={tmp}/missing"], ["sweep_dir: no such dir"]),
    ("rmexp-report", ["sweep_dir={tmp}"], ["no sweep jobs found"]),
    ("rmexp-compare", ["a={tmp}/missing", "b={tmp}"], ["a: no such run or eval dir"]),
    ("rmexp-compare", ["a={tmp}", "b={tmp}"], ["cannot pair", "no scores.jsonl"]),
] + [(script, ["nosuchkey=3"], ["no key nosuchkey"]) for script in sorted(SCRIPTS)]


@pytest.mark.slow
@pytest.mark.parametrize("script,args,named", FAST, ids=[f"{s} {' '.join(a)}" for s, a, _ in FAST])
def test_a_users_mistake_is_one_line_before_torch_loads(tmp_path, script, args, named):
    used_run_dir(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc, imported = run_script(script, [*args, f"hydra.run.dir={tmp_path / 'run'}"] if script == "rmexp-train"
                                and not any(a.startswith("hydra.run.dir") for a in args) else args, cwd=tmp_path)
    assert_one_line(proc, *named)
    assert imported == "[]", f"imported {imported} before failing"  # fails in about a second, not after torch's ~10 s
    if args == ["lora.r=0"]:  # a value check fails after the run dir is claimed: recorded there
        assert json.loads((tmp_path / "run" / "metrics.json").read_text())["error"].startswith("ConfigError: lora.r")
    if script == "rmexp-train" and "used" in " ".join(args):
        assert json.loads((tmp_path / "used" / "metrics.json").read_text()) == {"status": "ok"}  # untouched


@pytest.mark.slow
def test_hydra_full_error_shows_the_traceback(tmp_path):
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    proc, _ = run_script("rmexp-train", ["lora.r=0", f"hydra.run.dir={tmp_path}"], cwd=tmp_path, env=env)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ConfigError: lora.r must be" in proc.stderr
    proc, _ = run_script("rmexp-evaluate", [f"checkpoint={tmp_path}/missing", "data.path=x.jsonl"], cwd=tmp_path, env=env)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "MissingPathError" in proc.stderr


@pytest.mark.slow
def test_a_data_error_is_one_line_naming_file_line_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "chosen": "a", "rejected": "b"}) + "\n"
                   + json.dumps({"question": "q2", "chosen": "c"}) + "\n")
    proc, _ = run_script("rmexp-train", ["model=tiny", "data=file", f"data.path={bad}", "logger=none",
                                         f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert_one_line(proc, f"{bad}:2: field 'rejected' is missing")


def test_a_bug_keeps_its_traceback(monkeypatch, capsys):
    """Only the user's mistakes are shortened: anything else is raised as it came."""
    from rmexp import console

    def app():
        raise KeyError("a bug")

    monkeypatch.setattr(sys, "argv", ["rmexp-x"])
    with pytest.raises(KeyError, match="a bug"):
        console.run(app, RMExpConfig)
    assert "error:" not in capsys.readouterr().err


def test_suggestions_name_the_key_a_user_meant():
    keys = schema_keys(RMExpConfig)
    assert nearest("trainer.learning_rat", keys)[0] == "trainer.learning_rate"
    assert nearest("learning_rate", keys) == ["trainer.learning_rate"]  # the group left out
    assert nearest("lora.lora_alpah", keys) == ["lora.lora_alpha"]
    assert argparse_habit(["--max_length", "1024"], keys).endswith("write trainer.max_length=1024")
    assert argparse_habit(["--per_device_train_batch_size=4"], keys).endswith(
        "write trainer.per_device_train_batch_size=4")
    assert argparse_habit(["-m", "lora.r=4,8", "--cfg", "job", "--config-dir", "x"], keys) is None  # Hydra's own


@pytest.mark.slow
def test_the_module_entry_point_reports_the_same(tmp_path):
    """`python -m rmexp.train`, as the README and docs write it, from the repository."""
    run = subprocess.run([sys.executable, "-m", "rmexp.train", "lora.r=abc", f"hydra.run.dir={tmp_path}"],
                         capture_output=True, text=True, cwd=ROOT, env=NO_FULL_ERROR, timeout=60)
    assert_one_line(run, "lora.r=abc")
    assert not (Path(tmp_path) / "metrics.json").exists()  # failed in composition: no run recorded


@pytest.mark.slow
def test_a_server_that_cannot_listen_says_so_before_the_model_loads(tmp_path):
    import socket

    used_run_dir(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc, imported = run_script("rmexp-serve", [f"checkpoint={tmp_path / 'exported'}", f"serve.port={port}"],
                                    cwd=tmp_path)
    assert_one_line(proc, f"serve.port={port}: cannot listen on 127.0.0.1:{port}", "serve.port=<port>")
    assert imported == "[]"
