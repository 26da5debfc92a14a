"""The package as a user installs it: `pip install .` (not editable), console scripts, configs inside."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT


@pytest.mark.slow
def test_a_plain_install_trains_from_another_directory(tmp_path):
    target, work, source = tmp_path / "site", tmp_path / "elsewhere", tmp_path / "source"
    work.mkdir()
    # a copy of the checkout: pip builds in the source tree, which must stay clean
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "outputs", "build", "*.egg-info",
                                                                 "__pycache__", ".*_cache", ".hypothesis", "wandb"))
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(source)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    assert (target / "rmexp" / "conf" / "train.yaml").is_file() and (target / "rmexp" / "sample" / "preference.jsonl").is_file()
    env = {**os.environ, "PYTHONPATH": str(target), "WANDB_SILENT": "true"}
    run = subprocess.run([str(target / "bin" / "rmexp-train"), "model=tiny", "debug=fast", "hydra.run.dir=run"],
                         capture_output=True, text=True, cwd=work, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((work / "run" / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["global_step"] == 4
    saved = yaml.safe_load((work / "run" / "rmexp_config.yaml").read_text())
    assert saved["data"]["path"] == str(target / "rmexp" / "sample" / "preference.jsonl")  # the shipped sample
    assert "held-out pairwise accuracy" in run.stdout
    # the installed copy ran, not the repository's
    probe = subprocess.run([sys.executable, "-c", "import rmexp.train; print(rmexp.train.__file__)"],
                           capture_output=True, text=True, cwd=work, env=env, timeout=120)
    assert probe.stdout.strip().startswith(str(target)), probe.stdout + probe.stderr
