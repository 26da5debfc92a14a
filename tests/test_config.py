"""Every group option composes; the schema rejects bad overrides before any model loads."""

from __future__ import annotations

import ast
import json
import re

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from conftest import ROOT, compose_cfg
from rmexp.config import ConfigError, Switch, to_typed
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


# Every key the schema checks beyond its type (rmexp.config's __post_init__ and validate), with a value of the
# right type that no run could use. Adding a check to the schema means adding its key here.
CHECKED = [
    ("model.dtype=float8", "model.dtype"),
    ("quantization.load_in_8bit=true", "quantization.load_in_4bit"),
    ("quantization.bnb_4bit_compute_dtype=int4", "quantization.bnb_4bit_compute_dtype"),
    ("quantization.bnb_4bit_quant_storage=int4", "quantization.bnb_4bit_quant_storage"),
    ("lora.r=0", "lora.r"),
    ("lora.lora_alpha=0", "lora.lora_alpha"),
    ("lora.lora_dropout=1.0", "lora.lora_dropout"),
    ("lora.bias=some", "lora.bias"),
    ("data.eval_fraction=1.0", "data.eval_fraction"),
    ("data.max_pairs=0", "data.max_pairs"),
    ("data.stopping_strategy=never", "data.stopping_strategy"),
    ("data.sources=[{path:a.jsonl}]", "not both"),
    ("data=mixture data.sources=[{path:a.jsonl,weight:1},{path:b.jsonl}]", "every source a weight"),
    ("data=mixture data.sources=[{path:a.jsonl,fraction:0}]", "a.jsonl: fraction"),
    ("data=mixture data.sources=[{path:a.jsonl,weight:0}]", "a.jsonl: weight"),
    ("data.streaming=true trainer.max_steps=10", "needs data.eval_path"),
    ("data=mixture data.sources=[{path:a.jsonl,fraction:0.5}] data.streaming=true data.eval_path=e.jsonl "
     "trainer.max_steps=10", "use weight"),
    ("data.path=null", "set data.path"),
    ("data.streaming=true data.eval_path=e.jsonl", "needs trainer.max_steps"),
    ("trainer.gradient_checkpointing=sometimes", "trainer.gradient_checkpointing"),
    ("trainer.bf16=maybe", "trainer.bf16"),
    ("trainer.dequant_cache=yes", "trainer.dequant_cache"),
    ("trainer.compile=sometimes", "trainer.compile"),
    ("trainer.attention=flash", "trainer.attention"),
    ("trainer.learning_rate=0", "trainer.learning_rate"),
    ("trainer.per_device_train_batch_size=0", "trainer.per_device_train_batch_size"),
    ("trainer.per_device_eval_batch_size=0", "trainer.per_device_eval_batch_size"),
    ("trainer.gradient_accumulation_steps=0", "trainer.gradient_accumulation_steps"),
    ("trainer.packed_row_tokens=0", "trainer.packed_row_tokens"),
    ("trainer.head_learning_rate=0", "trainer.head_learning_rate"),
    ("trainer.time_budget_s=-1", "trainer.time_budget_s"),
    ("trainer.max_length=4", "trainer.max_length"),
    ("trainer.eval_strategy=sometimes", "trainer.eval_strategy"),
    ("trainer.save_strategy=sometimes", "trainer.save_strategy"),
    ("data.rung_fraction=1.0", "data.rung_fraction"),
    ("trainer.rungs=[0.5,1.0]", "data.rung_path"),
    ("data.rung_fraction=0.1 trainer.rungs=[0.5,0.25]", "trainer.rungs"),
    ("data.rung_fraction=0.1 trainer.rungs=[0.5,1.0] trainer.stop_at_rung=2", "trainer.stop_at_rung"),
    ("data.rung_fraction=0.1 trainer.rungs=[1.0] trainer.time_budget_s=10", "trainer.time_budget_s plans none"),
    ("data.rung_fraction=0.1 data.streaming=true data.eval_path=e.jsonl trainer.max_steps=10",
     "a rung split needs the training pairs' count"),
]


@pytest.mark.parametrize("overrides,key", CHECKED)
def test_every_checked_value_fails_naming_its_key_before_data_or_model(tmp_path, monkeypatch, overrides, key):
    import rmexp.recipe
    import rmexp.train

    def not_yet(*args, **kwargs):
        raise AssertionError("read data or loaded a model before the config was checked")

    for name in ("resolve_model_path", "load_tokenizer", "build_datasets", "load_reward_model"):
        monkeypatch.setattr(rmexp.recipe, name, not_yet)
    cfg = compose_cfg(*overrides.split(), f"paths.output_dir={tmp_path}", "logger=none")
    with pytest.raises(ConfigError, match=re.escape(key)):  # nothing read but the config: it fails at once
        rmexp.train.main(cfg)
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "failed"  # recorded as a failed run


# The same for the scoring apps' own keys (their configs hold no training groups): app, overrides, key.
APP_REQUIRED = {"evaluate": "checkpoint=x data.path=y.jsonl paths.output_dir=z logger=none",
                "score": "checkpoint=x question=q answer=a", "serve": "checkpoint=x", "export": "checkpoint=x output_dir=y",
                "ensemble": "members=[a,b] output_dir=y data.path=s.jsonl"}
APP_CHECKED = [(app, "device=gpu", "device") for app in sorted(APP_REQUIRED)] + [
    ("ensemble", "top=0", "top"), ("ensemble", "mode=mean greedy=true", "greedy")]


@pytest.mark.parametrize("app,overrides,key", APP_CHECKED)
def test_every_checked_app_value_fails_naming_its_key(app, overrides, key):
    from hydra import compose, initialize_config_module

    from rmexp.config import CONF_MODULE

    with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
        cfg = compose(config_name=app, overrides=[*APP_REQUIRED[app].split(), *overrides.split()])
    with pytest.raises(ConfigError, match=re.escape(key)):
        to_typed(cfg)


def test_checked_keys_cover_every_check_in_the_schema():
    """Each key rmexp.config names in a check, and each ConfigError message, has a case in CHECKED (APP_CHECKED
    for a scoring app's own key)."""
    source = (ROOT / "src" / "rmexp" / "config.py").read_text(encoding="utf-8")
    literal_keys = set(re.findall(r'f?"((?:model|quantization|lora|data|trainer)\.[a-z_0-9]+)', source))
    loop_keys = {f"trainer.{k}" for group in re.findall(r'for key in \(([^)]*)\)', source)
                 for k in re.findall(r'"([a-z_0-9]+)"', group)}
    messages = set(re.findall(r'ConfigError\(f?"([^"<]{8,})"', source))
    app_keys = {call.args[1].value for call in ast.walk(ast.parse(source))  # a top-level key: require(ok, "device", ...)
                if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "require"
                and isinstance(call.args[1], ast.Constant) and "." not in call.args[1].value}
    cases = " ".join(key for _, key in CHECKED) + " " + " ".join(o for o, _ in CHECKED)
    cases += " " + " ".join(key for _, _, key in APP_CHECKED)
    missing = sorted(k for k in literal_keys | loop_keys | app_keys if k not in cases and not k.startswith("trainer.{"))
    assert not missing, f"checked in rmexp.config but not in CHECKED: {missing}"
    assert all(any(key in m for _, key in CHECKED) for m in messages if "{" not in m), messages


def test_tri_states_take_yaml_bools_and_any_case():
    cfg = to_typed(compose_cfg("trainer.bf16=true", "trainer.gradient_checkpointing=False", "trainer.dequant_cache=AUTO",
                               "paths.output_dir=unused"))
    assert (cfg.trainer.bf16, cfg.trainer.gradient_checkpointing, cfg.trainer.dequant_cache) == (
        Switch.true, Switch.false, Switch.auto)
    assert str(cfg.trainer.bf16) == "true" and cfg.trainer.bf16 == "true"  # the strings the HF builders read


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


# The YAML file holding each schema dataclass's defaults (None: a node of the file, by key path).
DEFAULTS_FILES = {
    "ModelConfig": ("model/base.yaml", None), "QuantizationConfig": ("quantization/base.yaml", None),
    "LoraConfig": ("lora/default.yaml", None), "DataConfig": ("data/base.yaml", None),
    "TrainerConfig": ("trainer/default.yaml", None), "LoggerConfig": ("logger/base.yaml", None),
    "PathsConfig": ("paths/default.yaml", None), "ScoringConfig": ("evaluate.yaml", "eval"),
    "ServerConfig": ("serve.yaml", "serve"), "EvaluateConfig": ("evaluate.yaml", None),
    "ServeConfig": ("serve.yaml", None), "ScoreConfig": ("score.yaml", None), "ExportConfig": ("export.yaml", None),
    "ReportConfig": ("report.yaml", None), "CompareConfig": ("compare.yaml", None),
    "EnsembleConfig": ("ensemble.yaml", None),
}


def schema_classes():
    import dataclasses

    import rmexp.config as config

    return {name: cls for name, cls in vars(config).items()
            if dataclasses.is_dataclass(cls) and cls.__module__ == config.__name__}


def test_each_default_is_written_once_in_the_yaml_or_the_schema_never_both():
    """A field whose schema default is MISSING has its value in its group's YAML (the one place to read and
    change it); the dataclasses with defaults of their own (a source of a mixture, a columns mapping) are set
    in no YAML: every conf file leaves data.sources and data.columns empty or required."""
    import dataclasses

    import yaml
    from omegaconf import MISSING

    classes = schema_classes()
    own_defaults = {"ColumnsConfig", "SourceConfig"}
    assert set(classes) == set(DEFAULTS_FILES) | own_defaults | {"RMExpConfig"}, "a new dataclass needs its file here"
    for name, (path, node) in DEFAULTS_FILES.items():
        written = yaml.safe_load((ROOT / "conf" / path).read_text(encoding="utf-8")) or {}
        written = written.get(node, {}) if node else written
        for f in dataclasses.fields(classes[name]):
            nested = f.type in {c.__name__ for c in classes.values()} or f.name in ("data", "logger", "paths")
            assert f.default is MISSING, f"{name}.{f.name}: a default in the schema; it belongs in conf/{path}"
            assert nested or f.name in written, f"{name}.{f.name}: no default in conf/{path}"
    for name in own_defaults:
        assert all(f.default is not MISSING for f in dataclasses.fields(classes[name]) if f.name != "path")
    for path in (ROOT / "conf").rglob("*.yaml"):
        data = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("data", {}) if "data" not in path.parts \
            else yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for key, empty in (("sources", ([], "???")), ("columns", ({},))):
            assert data.get(key, empty[0]) in empty, f"{path}: {key} set in YAML; its defaults are the schema's"


def test_a_field_defaulted_in_yaml_has_its_comment_there_not_in_the_schema():
    source = (ROOT / "src" / "rmexp" / "config.py").read_text(encoding="utf-8").splitlines()
    owner = {}  # line -> the class it is in
    for i, line in enumerate(source):
        owner[i] = line.split()[1].split("(")[0].rstrip(":") if line.startswith("class ") else owner.get(i - 1)
    commented = [i + 1 for i, line in enumerate(source) if owner[i] in DEFAULTS_FILES
                 and re.match(r"    \w+: .*= MISSING", line) and ("#" in line or source[i - 1].strip().startswith("#"))]
    assert not commented, f"config.py lines {commented}: say it beside the value in conf/, once"


def test_strategy_values_are_transformers_own():
    from transformers.trainer_utils import IntervalStrategy, SaveStrategy

    from rmexp.config import EVAL_STRATEGIES, SAVE_STRATEGIES

    assert set(EVAL_STRATEGIES) == {s.value for s in IntervalStrategy}
    assert set(SAVE_STRATEGIES) == {s.value for s in SaveStrategy}


def test_eval_fraction_is_checked_only_where_it_is_used(tmp_path):
    cfg = to_typed(compose_cfg("data.eval_path=held.jsonl", "data.eval_fraction=0", f"paths.output_dir={tmp_path}"))
    assert cfg.data.eval_fraction == 0  # ignored beside an eval file
    with pytest.raises(ConfigError, match="data.eval_fraction"):
        to_typed(compose_cfg("data.eval_fraction=0", f"paths.output_dir={tmp_path}"))


@pytest.mark.parametrize("overrides", [("experiment=ddp_qlora",), ("++data.categories={chat:Chat,xstest:Safety}",)])
def test_a_run_config_with_free_keys_reads_back(tmp_path, overrides):
    """trainer.extra and data.categories hold keys no default has: reading the run back keeps them."""
    from omegaconf import OmegaConf

    from rmexp.rundir import read_run_config, write_run_config

    cfg = to_typed(compose_cfg(*overrides, f"paths.output_dir={tmp_path}"))
    write_run_config(tmp_path, OmegaConf.to_container(OmegaConf.structured(cfg), resolve=False, enum_to_str=True))
    back = read_run_config(tmp_path)
    assert back.trainer.extra == cfg.trainer.extra and back.data.categories == cfg.data.categories
    assert back.trainer.extra or back.data.categories


@pytest.mark.parametrize("overrides,warned", [(["data.path=my.jsonl"], True), ([], False),
                                              (["data=file", "data.path=my.jsonl"], False)])
def test_a_file_under_the_sample_preset_says_which_preset_values_apply(overrides, warned, caplog):
    """`rmexp-train data.path=my.jsonl` keeps data=sample's other values (eval_fraction 0.2, not the file preset's
    0.1): said, not silent."""
    from hydra import compose, initialize_config_module
    from hydra.core.hydra_config import HydraConfig

    from rmexp.train import warn_preset_values

    with initialize_config_module(config_module="rmexp.conf", version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "paths.output_dir=unused"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        with caplog.at_level("WARNING", logger="rmexp.train"):
            warn_preset_values(to_typed(compose_cfg(*overrides, "paths.output_dir=unused")))
    finally:
        HydraConfig.instance().cfg = None
    said = [r.getMessage() for r in caplog.records if r.name == "rmexp.train"]
    assert said == (["data.path=my.jsonl under the sample preset (data=sample): its data.eval_fraction=0.2 apply; "
                     "add data=file for the file defaults"] if warned else [])
