"""Typed schema for every config group, registered in Hydra's ConfigStore.

The primary configs (`conf/train.yaml`, `evaluate.yaml`, `serve.yaml`, ...) list their schema first
in their defaults, so each YAML group option is merged onto these dataclasses: an unknown key
(`lora.rr=3`) or a wrong type (`lora.r=abc`) fails while Hydra composes, before any model is loaded.
A value of the right type that no run could use (`lora.r=0`, `trainer.bf16=maybe`) fails in the
dataclass's `__post_init__`, which `to_typed` runs: a `ConfigError` naming the key, before any data
or model is read. Checks across groups are in `validate`. Every such check is here, nowhere else.

The dataclasses only type and check: every default value lives in the YAML (`conf/<group>/base.yaml`
for what a group's options share), with the comment that says what it is and why, so there is one place
to read and change it (tests/test_config.py holds both to that). Keys passed to a library keep its
names: `quantization` BitsAndBytesConfig's, `lora` peft.LoraConfig's (task_type is always SEQ_CLS),
`trainer` trl.RewardConfig's beside rmexp's own (rmexp.training_args). The exceptions, whose defaults
are here: ColumnsConfig and SourceConfig, list items and per-source mappings that YAML cannot default.
`conf/` ships inside the package as `rmexp.conf` (`pkg://rmexp.conf`), and the sample pairs in `data/`
as `rmexp.sample`.
A composed config is converted once (`to_typed`) and passed on as these dataclasses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from rmexp.errors import MissingPathError, UserError

CONF_MODULE = "rmexp.conf"  # conf/ in the repository, installed as the package rmexp.conf
CONF_PATH = f"pkg://{CONF_MODULE}"  # for @hydra.main


def sample_path(name: str) -> str:
    """`${rmexp.sample:preference.jsonl}`: a file of data/ (our own pairs), wherever rmexp is installed."""
    with resources.as_file(resources.files("rmexp.sample").joinpath(name)) as path:
        return str(path)


def literal(text: str) -> str:
    """`text` with every `${` kept as text when OmegaConf reads it (a backslash before one doubled)."""
    return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)


def to_typed(cfg):
    """A composed config (or one of its groups) as its schema's dataclasses, interpolations resolved;
    a dataclass is returned as it is."""
    return OmegaConf.to_object(cfg) if isinstance(cfg, DictConfig) else cfg


class ConfigError(UserError, ValueError):
    """A config value no run could use; the message names the key."""


def _given(value) -> bool:
    """Whether a field holds a value: a dataclass built by hand may leave some MISSING ("???")."""
    return not (isinstance(value, str) and value == MISSING)


def require(ok: bool, key: str, rule: str, value) -> None:
    """Raise ConfigError("<key> must be <rule>, got <value>") unless ok."""
    if not ok:
        raise ConfigError(f"{key} must be {rule}, got {value!r}")


class Switch(str, Enum):
    """A setting rmexp can decide itself (auto) or be told (true, false)."""

    auto = "auto"
    true = "true"
    false = "false"

    def __str__(self) -> str:
        return self.value


def switch(value, key: str) -> Switch:
    """`value` as a Switch; YAML's and Hydra's true/false arrive as bools (the field is typed str so they
    can: OmegaConf refuses bools for an enum), so their text is taken case-insensitively."""
    try:
        return Switch(str(value).lower())
    except ValueError:
        raise ConfigError(f"{key} must be auto, true or false, got {value!r}") from None


DTYPES = ("auto", "float32", "bfloat16", "float16")
# transformers' IntervalStrategy and SaveStrategy values (a test compares): checked without importing transformers
EVAL_STRATEGIES = ("no", "steps", "epoch")
SAVE_STRATEGIES = ("no", "steps", "epoch", "best")
QUANT_STORAGE = ("uint8", "bfloat16", "float16", "float32")  # bitsandbytes' storage dtypes for 4-bit codes
DEVICES = "auto, cpu, cuda or cuda:N"  # where a model scores (rmexp.device)
ATTENTIONS = ("auto", "sdpa_segments", "flex")  # trainer.attention: the packed batches' attention (rmexp.flex)


def is_device(value) -> bool:
    """Whether `value` names a device rmexp places a model on: auto, cpu, cuda or cuda:N."""
    return isinstance(value, str) and re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", value) is not None


def check_device(owner) -> None:
    """The `device` key of a scoring app's config (evaluate, score, serve, export)."""
    if _given(owner.device):
        require(is_device(owner.device), "device", DEVICES, owner.device)


class QuantType(str, Enum):
    nf4 = "nf4"
    fp4 = "fp4"


class LoggerBackend(str, Enum):
    wandb = "wandb"
    none = "none"


class WandbMode(str, Enum):
    online = "online"
    offline = "offline"
    disabled = "disabled"


class Batching(str, Enum):
    packed = "packed"
    padded = "padded"


class DataFormat(str, Enum):
    # where a record keeps its prompt and answers (docs/data-formats.md); auto: detected per source, and named
    auto = "auto"
    triple = "triple"
    trl = "trl"
    hh = "hh"
    sharegpt = "sharegpt"
    alpaca = "alpaca"
    ultrafeedback = "ultrafeedback"
    openrlhf = "openrlhf"


# `raise` is a keyword, so this enum is built by call: Hydra takes `data.on_error=raise` by member name.
# `raise_` (an alias) is how run configs written before this spelling saved it.
OnError = Enum("OnError", {"raise": "raise", "skip": "skip", "raise_": "raise"}, type=str)


@dataclass
class ModelConfig:
    name_or_path: str = MISSING
    revision: str | None = MISSING
    trust_remote_code: bool = MISSING
    dtype: str = MISSING
    attn_implementation: str | None = MISSING
    cache_dir: str = MISSING

    def __post_init__(self):
        if _given(self.dtype):
            require(self.dtype in DTYPES, "model.dtype", f"one of {', '.join(DTYPES)}", self.dtype)


@dataclass
class QuantizationConfig:
    load_in_4bit: bool = MISSING
    load_in_8bit: bool = MISSING
    bnb_4bit_quant_type: QuantType = MISSING
    bnb_4bit_use_double_quant: bool = MISSING
    bnb_4bit_compute_dtype: str = MISSING
    bnb_4bit_quant_storage: str = MISSING

    def __post_init__(self):
        if _given(self.load_in_4bit) and _given(self.load_in_8bit):
            require(not (self.load_in_4bit and self.load_in_8bit), "quantization.load_in_4bit",
                    "false when load_in_8bit is true (they are exclusive)", self.load_in_4bit)
        if _given(self.bnb_4bit_compute_dtype):
            require(self.bnb_4bit_compute_dtype in DTYPES, "quantization.bnb_4bit_compute_dtype",
                    f"one of {', '.join(DTYPES)}", self.bnb_4bit_compute_dtype)
        if _given(self.bnb_4bit_quant_storage):
            require(self.bnb_4bit_quant_storage in ("auto", *QUANT_STORAGE), "quantization.bnb_4bit_quant_storage",
                    f"auto or one of {', '.join(QUANT_STORAGE)}", self.bnb_4bit_quant_storage)


@dataclass
class LoraConfig:
    r: int = MISSING
    lora_alpha: int = MISSING
    lora_dropout: float = MISSING
    target_modules: list[str] = MISSING
    bias: str = MISSING
    modules_to_save: list[str] = MISSING

    def __post_init__(self):
        if _given(self.r):
            require(self.r > 0, "lora.r", "a positive integer", self.r)
        if _given(self.lora_alpha):
            require(self.lora_alpha > 0, "lora.lora_alpha", "positive", self.lora_alpha)
        if _given(self.lora_dropout):
            require(0.0 <= self.lora_dropout < 1.0, "lora.lora_dropout", "in [0, 1)", self.lora_dropout)
        if _given(self.bias):  # peft's values
            require(self.bias in ("none", "all", "lora_only"), "lora.bias", "none, all or lora_only", self.bias)


@dataclass
class ColumnsConfig:
    """The field each role is read from, for any data.format (OpenRLHF's --prompt_key, LLaMA-Factory's
    dataset_info.json columns); null: the format's own. Defaults here, not in YAML: a source's columns too."""

    prompt: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    system: str | None = None
    history: str | None = None
    margin: str | None = None
    group: str | None = None
    source: str | None = None


@dataclass
class SourceConfig:
    """One source of a mixture (data.sources). Its defaults are here, not in YAML: they apply to each list item."""

    path: str = MISSING  # a local JSONL/JSON/Parquet file or a hub dataset id
    name: str | None = None  # the hub dataset's configuration name
    split: str = "train"  # the hub dataset's split
    fraction: float = 1.0  # the first share of the source's records
    weight: float | None = None  # sampling weight in the mixture; null for every source: all pairs of each
    format: DataFormat | None = None  # null: data.format
    columns: ColumnsConfig | None = None  # null: data.columns

    def __post_init__(self):
        require(0.0 < self.fraction <= 1.0, f"data.sources: {self.path}: fraction", "in (0, 1]", self.fraction)
        require(self.weight is None or self.weight > 0, f"data.sources: {self.path}: weight", "positive", self.weight)


@dataclass
class DataConfig:
    path: str | None = MISSING
    split: str = MISSING
    sources: list[SourceConfig] = MISSING
    eval_path: str | None = MISSING
    eval_split: str = MISSING
    format: DataFormat = MISSING
    columns: ColumnsConfig = MISSING
    eval_fraction: float = MISSING
    rung_path: str | None = MISSING
    rung_fraction: float = MISSING
    split_seed: int = MISSING
    max_pairs: int | None = MISSING
    system_prompt: str | None = MISSING
    on_error: OnError = MISSING
    num_proc: int | None = MISSING
    cache_dir: str | None = MISSING
    streaming: bool = MISSING
    stopping_strategy: str = MISSING
    categories: dict[str, str] = MISSING

    def __post_init__(self):
        if _given(self.eval_fraction) and _given(self.eval_path) and not self.eval_path:  # used only then
            require(0.0 < self.eval_fraction < 1.0, "data.eval_fraction", "in (0, 1)", self.eval_fraction)
        if _given(self.rung_fraction):
            require(0.0 <= self.rung_fraction < 1.0, "data.rung_fraction", "in [0, 1)", self.rung_fraction)
        if _given(self.max_pairs):
            require(self.max_pairs is None or self.max_pairs > 0, "data.max_pairs", "positive", self.max_pairs)
        if _given(self.stopping_strategy):
            require(self.stopping_strategy in ("first_exhausted", "all_exhausted"), "data.stopping_strategy",
                    "first_exhausted or all_exhausted", self.stopping_strategy)
        if not (_given(self.path) and _given(self.sources)):
            return
        if self.path and self.sources:
            raise ConfigError("data: set data.path (one file) or data.sources (a mixture), not both; data=mixture "
                              "starts with no path")
        weights = [s.weight for s in self.sources]
        if any(w is not None for w in weights) and any(w is None for w in weights):
            raise ConfigError("data.sources: give every source a weight, or none (none: every pair of every source)")
        if _given(self.streaming) and self.streaming:
            if not self.eval_path:
                raise ConfigError("data.streaming=true needs data.eval_path: a stream has no end to hold pairs out from")
            if any(s.fraction < 1.0 for s in self.sources):
                raise ConfigError("data.streaming=true: a source's fraction needs its length; use weight")


def own_key():
    """A `trainer` key rmexp reads itself; every other `trainer` key is a trl.RewardConfig field under its name
    (a test holds them to that, so an upstream rename fails there instead of being dropped)."""
    return field(default=MISSING, metadata={"rmexp": True})


@dataclass
class TrainerConfig:
    batching: Batching = own_key()
    packed_row_tokens: int = own_key()
    resume: str | None = own_key()
    head_learning_rate: float | None = own_key()
    time_budget_s: float | None = own_key()
    fused_lora: bool = own_key()
    dequant_cache: str = own_key()
    fused_rms_norm: bool = own_key()
    compile: str = own_key()
    attention: str = own_key()
    rungs: list[float] = own_key()
    stop_at_rung: int | None = own_key()
    learning_rate: float = MISSING
    num_train_epochs: float = MISSING
    max_steps: int = MISSING
    per_device_train_batch_size: int = MISSING
    per_device_eval_batch_size: int = MISSING
    gradient_accumulation_steps: int = MISSING
    max_length: int = MISSING
    warmup_steps: float = MISSING
    lr_scheduler_type: str = MISSING
    weight_decay: float = MISSING
    max_grad_norm: float = MISSING
    optim: str = MISSING
    center_rewards_coefficient: float | None = MISSING
    gradient_checkpointing: str = MISSING
    bf16: str = MISSING
    eval_strategy: str = MISSING
    eval_steps: float = MISSING
    save_strategy: str = MISSING
    save_steps: float = MISSING
    save_total_limit: int | None = MISSING
    logging_steps: float = MISSING
    seed: int = MISSING
    dataloader_num_workers: int = MISSING
    extra: dict[str, Any] = own_key()

    def __post_init__(self):
        for key in ("gradient_checkpointing", "bf16", "dequant_cache", "compile"):
            if _given(getattr(self, key)):
                setattr(self, key, switch(getattr(self, key), f"trainer.{key}"))
        positive = ("learning_rate", "per_device_train_batch_size", "per_device_eval_batch_size",
                    "gradient_accumulation_steps", "packed_row_tokens")
        for key in positive:
            if _given(getattr(self, key)):
                require(getattr(self, key) > 0, f"trainer.{key}", "positive", getattr(self, key))
        for key in ("head_learning_rate", "time_budget_s"):
            if _given(getattr(self, key)):
                require(getattr(self, key) is None or getattr(self, key) > 0, f"trainer.{key}", "positive or null",
                        getattr(self, key))
        if _given(self.attention):
            require(self.attention in ATTENTIONS, "trainer.attention", " or ".join(ATTENTIONS), self.attention)
        if _given(self.max_length):  # a prompt token and an answer token each side, with the template's few
            require(self.max_length >= 8, "trainer.max_length", "at least 8", self.max_length)
        if _given(self.rungs):
            rungs = list(self.rungs)
            if not all(0.0 < f <= 1.0 for f in rungs) or rungs != sorted(set(rungs)):
                raise ConfigError(f"trainer.rungs must be increasing fractions of the planned steps in (0, 1], got {rungs}")
            if _given(self.stop_at_rung) and self.stop_at_rung is not None:
                require(0 <= self.stop_at_rung < len(rungs), "trainer.stop_at_rung",
                        f"an index into trainer.rungs (0..{len(rungs) - 1})", self.stop_at_rung)
        for key, values in (("eval_strategy", EVAL_STRATEGIES), ("save_strategy", SAVE_STRATEGIES)):
            if _given(getattr(self, key)):
                require(getattr(self, key) in values, f"trainer.{key}", " or ".join(values), getattr(self, key))


@dataclass
class LoggerConfig:
    backend: LoggerBackend = MISSING
    mode: WandbMode | None = MISSING
    project: str = MISSING
    entity: str | None = MISSING
    group: str | None = MISSING
    name: str | None = MISSING
    tags: list[str] = MISSING
    init_timeout: float = MISSING


@dataclass
class PathsConfig:
    output_dir: str = MISSING


@dataclass
class RMExpConfig:
    model: ModelConfig = MISSING
    quantization: QuantizationConfig = MISSING
    lora: LoraConfig = MISSING
    data: DataConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    paths: PathsConfig = MISSING

    def __post_init__(self):
        validate(self)


DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def local_data_file(path: str) -> Path | None:
    """The local file a data path names (it exists, or ends like a data file: a missing file, not a hub
    dataset id), None for a hub id. The one rule of what is a file, for the early check and the reader."""
    local = Path(path).expanduser()
    return local if local.exists() or local.suffix in DATA_SUFFIXES else None


def check_paths(data: DataConfig) -> None:
    """The data files a config names are there, before torch loads (hub ids are fetched later); MissingPathError
    naming the key and the absolute path looked at. (A checkpoint: rmexp.rundir.locate.)"""
    named = [("data.path", data.path), ("data.eval_path", data.eval_path), ("data.rung_path", data.rung_path)] + [
        (f"data.sources[{i}].path", s.path) for i, s in enumerate(data.sources or [])]
    for key, path in named:
        if path and (local := local_data_file(path)) is not None and not local.is_file():
            raise MissingPathError(f"{key}: no such preference file {path}"
                                   + ("" if local.is_absolute() else f" ({local.resolve()})"))


def validate(cfg: RMExpConfig) -> None:
    """The checks of a training config that span groups (each group checks its own keys)."""
    if not all(_given(v) for v in (cfg.data, cfg.trainer)):  # a config built by hand, in parts
        return
    if not (cfg.data.path or cfg.data.sources):
        raise ConfigError("data: no data; set data.path=<file> or data.sources=[{path: ...}, ...]")
    if cfg.data.streaming and cfg.trainer.max_steps <= 0:
        raise ConfigError("data.streaming=true needs trainer.max_steps: a stream has no length to count epochs in")
    has_rung_split = bool(cfg.data.rung_path) or cfg.data.rung_fraction > 0
    if cfg.trainer.rungs and not has_rung_split:
        raise ConfigError("trainer.rungs scores the rung split: set data.rung_path=<file> or data.rung_fraction "
                          "(pairs held out of the training file, apart from the evaluation pairs)")
    if (cfg.trainer.rungs or has_rung_split) and cfg.data.streaming:
        raise ConfigError("data.streaming=true: a rung split needs the training pairs' count; train from files")
    if cfg.trainer.rungs and cfg.trainer.time_budget_s is not None:
        raise ConfigError("trainer.rungs are fractions of the planned steps; trainer.time_budget_s plans none")


@dataclass
class ScoringConfig:
    packed: bool = MISSING
    row_tokens: int = MISSING
    chunk_pairs: int = MISSING


@dataclass
class EvaluateConfig:
    checkpoint: str = MISSING
    batch_size: int = MISSING
    worst_pairs: int = MISSING
    eval: ScoringConfig = MISSING
    data: DataConfig = MISSING
    logger: LoggerConfig = MISSING
    paths: PathsConfig = MISSING
    device: str = MISSING

    def __post_init__(self):
        check_device(self)


@dataclass
class ServerConfig:
    host: str = MISSING
    port: int = MISSING
    max_batch: int = MISSING
    batch_window_ms: float = MISSING
    max_items: int = MISSING
    max_request_bytes: int = MISSING
    row_tokens: int = MISSING
    normalize: bool = MISSING
    api_key: str | None = MISSING
    read_timeout_s: float = MISSING
    keep_alive_s: int = MISSING
    max_connections: int = MISSING
    docs: bool = MISSING


@dataclass
class ServeConfig:
    checkpoint: str = MISSING
    serve: ServerConfig = MISSING
    device: str = MISSING

    def __post_init__(self):
        check_device(self)


@dataclass
class ScoreConfig:
    checkpoint: str = MISSING
    question: str = MISSING
    answer: str = MISSING
    device: str = MISSING

    def __post_init__(self):
        check_device(self)


@dataclass
class ExportConfig:
    checkpoint: str = MISSING
    output_dir: str = MISSING
    dtype: str = MISSING
    eval_metrics: str | None = MISSING
    device: str = MISSING

    def __post_init__(self):
        check_device(self)


@dataclass
class ReportConfig:
    sweep_dir: str = MISSING
    also: list[str] = MISSING
    wandb: bool = MISSING
    seed: int = MISSING
    n_resamples: int = MISSING


class EnsembleMode(str, Enum):
    mean = "mean"
    soup = "soup"


@dataclass
class EnsembleConfig:
    members: list[str] = MISSING
    top: int | None = MISSING
    mode: EnsembleMode = MISSING
    greedy: bool = MISSING
    output_dir: str = MISSING
    device: str = MISSING
    eval: ScoringConfig = MISSING
    data: DataConfig = MISSING

    def __post_init__(self):
        check_device(self)
        if _given(self.top) and self.top is not None:
            require(self.top >= 1, "top", "a number of members >= 1 (or null: all of them)", self.top)
        if _given(self.greedy) and self.greedy and _given(self.mode):
            require(self.mode == EnsembleMode.soup, "greedy", "false unless mode=soup (a greedy soup)", self.greedy)


@dataclass
class CompareConfig:
    a: str = MISSING
    b: str = MISSING
    n_resamples: int = MISSING
    seed: int = MISSING


def group_defaults() -> DictConfig:
    """Today's default of every key of a training config: conf/train.yaml with each group's base option,
    composed by Hydra as for a run (for a run saved before a key existed)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    overrides = ["model=base", "quantization=base", "data=base", "logger=base", "paths.output_dir=unset"]
    # rmexp's own conf/, whatever a running Hydra app searches (its --config-dir could hold another train.yaml)
    running = GlobalHydra.instance().hydra
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides)
    finally:
        if running is not None:
            GlobalHydra.instance().clear()
            GlobalHydra.instance().initialize(running)
    OmegaConf.set_struct(cfg, False)  # a saved run's trainer.extra and data.categories hold keys no default has
    return cfg


def register_configs() -> None:
    if not OmegaConf.has_resolver("rmexp.sample"):
        OmegaConf.register_new_resolver("rmexp.sample", sample_path)
    ConfigStore.instance().store(name="rmexp_schema", node=RMExpConfig)
    ConfigStore.instance().store(name="rmexp_eval_schema", node=EvaluateConfig)
    ConfigStore.instance().store(name="rmexp_serve_schema", node=ServeConfig)
    ConfigStore.instance().store(name="rmexp_score_schema", node=ScoreConfig)
    ConfigStore.instance().store(name="rmexp_export_schema", node=ExportConfig)
    ConfigStore.instance().store(name="rmexp_report_schema", node=ReportConfig)
    ConfigStore.instance().store(name="rmexp_compare_schema", node=CompareConfig)
    ConfigStore.instance().store(name="rmexp_ensemble_schema", node=EnsembleConfig)


register_configs()
