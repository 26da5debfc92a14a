"""Every group option composes; the schema rejects bad overrides before any model loads."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from conftest import ROOT, compose_cfg
from rmexp.model import build_bnb_config, build_lora_config

NOT_GROUPS = {"accelerate"}  # conf/accelerate: `accelerate launch --config_file` files, not Hydra options
GROUPS = {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in (ROOT / "conf").iterdir()
          if g.is_dir() and g.name not in NOT_GROUPS}


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes(group, option):
    overrides = [f"{group}={option}", "data.path=data/preference.jsonl"]
    cfg = compose_cfg(*overrides)
    assert cfg.lora.r > 0
    build_lora_config(cfg.lora)
    if group != "quantization" or option != "int8":
        build_bnb_config(cfg.quantization)


def test_defaults_are_the_seed_lora_on_gemma_without_dropout():
    cfg = compose_cfg()
    assert cfg.model.name_or_path == "builtin:gemma3_270m"
    assert (cfg.lora.r, cfg.lora.lora_alpha, cfg.lora.lora_dropout) == (8, 16, 0.0)
    assert set(cfg.lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    bnb = build_bnb_config(cfg.quantization)
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_use_double_quant
    assert build_lora_config(cfg.lora).task_type == "SEQ_CLS"
    seed = compose_cfg("experiment=seed_llama3_8b")
    assert seed.model.name_or_path == "meta-llama/Llama-3.1-8B-Instruct"
    assert (seed.lora.r, seed.lora.lora_alpha, seed.lora.lora_dropout) == (8, 16, 0.05)  # the seed recipe, unchanged


@pytest.mark.parametrize("override,key", [
    ("lora.r=abc", "lora.r"),
    ("lora.rr=3", "rr"),
    ("trainer.learning_rate=fast", "trainer.learning_rate"),
    ("logger.mode=sometimes", "logger.mode"),
    ("quantization.bnb_4bit_quant_type=nf5", "bnb_4bit_quant_type"),
    ("data.on_error=ignore", "data.on_error"),
])
def test_schema_rejects_bad_overrides(override, key):
    with pytest.raises((ConfigCompositionException, ValidationError, ConfigKeyError)) as err:
        compose_cfg(override)
    text = str(err.value) + str(err.value.__cause__ or "")
    assert key in text


def test_bad_lora_values_fail_before_the_model():
    cfg = compose_cfg("lora.r=-1")
    with pytest.raises(ValueError, match="lora.r"):
        build_lora_config(cfg.lora)


@pytest.mark.slow
def test_cli_typo_fails_fast_naming_the_key(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rmexp.train", "lora.r=abc", f"hydra.run.dir={tmp_path}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode != 0
    assert "lora.r" in proc.stderr + proc.stdout
    assert not (Path(tmp_path) / "metrics.json").exists()  # failed in composition, no model touched


FREE_TEXT = ["天空是什么颜色？", "it's", "a\\b", "end\\", "x\\'y", "${oc.env:HOME}", "\\${x}", "\\\\${x}", "\\${",
             "a=b, c [1,2] {k: v}", " spaces ", "", "null", "'quoted'", '"double"', "$x ${ }"]


@pytest.mark.parametrize("text", FREE_TEXT)
def test_score_passes_any_free_text_through_hydra_unchanged(text):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from rmexp.score import quote_free_text

    (arg,) = quote_free_text([f"question={text}"])
    value = OverridesParser.create().parse_overrides([arg])[0].value()
    assert OmegaConf.create({"question": value}).question == text


def test_a_run_config_round_trips_with_literal_interpolations_and_loads_from_older_versions(tmp_path):
    from omegaconf import OmegaConf

    from rmexp.config import OnError, to_typed
    from rmexp.rundir import RUN_CONFIG, read_run_config, write_run_config

    prompt = "Answer as `echo ${HOME}` would; \\${x} too."
    literal = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", prompt)  # as text, not interpolation
    cfg = to_typed(compose_cfg("data.path=data/preference.jsonl", f"paths.output_dir={tmp_path}",
                               f"data.system_prompt='{literal}'"))
    assert cfg.data.system_prompt == prompt  # composed and resolved: the text itself
    saved = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=False, enum_to_str=True)
    write_run_config(tmp_path, saved)
    assert read_run_config(tmp_path).data.system_prompt == prompt
    # as an earlier version wrote it: the enum by its old member name, a key that did not exist yet
    old = OmegaConf.load(tmp_path / RUN_CONFIG)
    old.data.on_error = "raise_"
    del old.trainer["fused_rms_norm"]
    OmegaConf.save(old, tmp_path / RUN_CONFIG)
    loaded = read_run_config(tmp_path)
    assert loaded.data.on_error is OnError["raise"] and loaded.trainer.fused_rms_norm is True
