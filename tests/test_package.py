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
    assert shipped_configs(target / "rmexp" / "conf") == shipped_configs(ROOT / "conf")  # every group's YAML
    assert "BuildBackendWarning" not in install.stdout + install.stderr
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


def test_dependencies_are_ranges_around_the_tested_set():
    """Every requirement (extras too) is a range from the version constraints.txt pins, the tested one,
    to below the next major release, and the installed environment is that tested set: so rmexp installs
    into an RLHF environment with newer releases, and `make install` reproduces what was tested."""
    from importlib.metadata import version

    import tomllib
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    pins = {canonicalize_name(name): Version(v) for name, v in pins.items()}
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    assert {"serve", "sweep", "dev"} <= set(project["optional-dependencies"])
    for requirement in map(Requirement, requirements):
        name = canonicalize_name(requirement.name)
        bounds = {s.operator: Version(s.version) for s in requirement.specifier}
        assert set(bounds) == {">=", "<"}, f"{requirement}: a range >=tested,<next major"
        assert bounds[">="] == pins[name], f"{requirement}: the floor is not the tested {pins[name]}"
        assert bounds["<"] == Version(str(bounds[">="].major + 1)), f"{requirement}: the ceiling is not the next major"
        assert Version(version(requirement.name)).release == pins[name].release, f"{name} installed is not the tested one"


def test_the_recipe_reads_top_to_bottom_in_under_60_lines():
    import inspect

    from rmexp.recipe import train

    lines = inspect.getsource(train).splitlines()
    assert len(lines) < 60, f"rmexp.recipe.train is {len(lines)} lines: move a step into a named function"


def shipped_configs(conf) -> set[str]:
    """The YAML files under a conf dir, relative to it (conf/hydra/launcher/slurm.yaml: hydra/launcher/slurm.yaml)."""
    return {str(p.relative_to(conf)) for p in conf.rglob("*.yaml")}


def test_the_wheel_builds_without_warnings_and_holds_every_config(tmp_path):
    """`pip install .` and `make install` print no setuptools BuildBackendWarning, and the wheel carries
    conf/**/*.yaml and the sample pairs (built without isolation: the environment's setuptools, no network)."""
    import zipfile

    source = tmp_path / "source"  # pip builds in the source tree (build/, *.egg-info): a copy keeps the checkout clean
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for name in ("src", "conf", "data"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    assert "Warning" not in build.stdout + build.stderr, (build.stdout + build.stderr)[-3000:]
    (wheel,) = (tmp_path / "dist").glob("rmexp-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"rmexp/conf/{c}" for c in shipped_configs(ROOT / "conf")} <= names
    assert "rmexp/sample/preference.jsonl" in names
