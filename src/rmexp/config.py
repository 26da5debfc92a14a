"""Typed schema for every config group, registered in Hydra's ConfigStore.

The primary config (`conf/train.yaml`) lists `rmexp_schema` first in its defaults, so each YAML
group option is merged onto these dataclasses: an unknown key (`lora.rr=3`) or a wrong type
(`lora.r=abc`) fails while Hydra composes, before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

# Where the conf/ tree lives: next to src/ in the repository (editable install).
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


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


class OnError(str, Enum):
    raise_ = "raise"
    skip = "skip"


@dataclass
class ModelConfig:
    # A hub id, a local HF directory, or `builtin:<name>` for a model rmexp builds locally.
    name_or_path: str = MISSING
    revision: str | None = None
    trust_remote_code: bool = False  # off unless asked: remote code runs with your privileges
    # dtype of the weights that stay unquantized (embeddings, norms); auto: bf16 where the hardware has it, else fp32
    dtype: str = "auto"
    attn_implementation: str | None = "sdpa"
    # where builtin models are built and cached
    cache_dir: str = "${oc.env:RMEXP_CACHE,${oc.env:HOME}/.cache/rmexp}"


@dataclass
class QuantizationConfig:
    # Keys keep BitsAndBytesConfig's names; both flags false means no quantization.
    load_in_4bit: bool = True
    load_in_8bit: bool = False
    bnb_4bit_quant_type: QuantType = QuantType.nf4
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: str = "auto"  # auto: bf16 where the hardware has it, else fp32


@dataclass
class LoraConfig:
    # Keys keep peft.LoraConfig's names; task_type is always SEQ_CLS.
    r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    bias: str = "none"
    # the reward head is new: train it fully and save it with the adapter
    modules_to_save: list[str] = field(default_factory=lambda: ["score"])


@dataclass
class DataConfig:
    path: str = MISSING
    eval_path: str | None = None
    eval_fraction: float = 0.1  # held out, seeded by split_seed, when eval_path is null
    split_seed: int = 42  # fixed apart from trainer.seed so every sweep job sees the same split
    max_pairs: int | None = None  # read only the first N pairs of each file
    system_prompt: str | None = None  # prepended as a system message to every prompt
    on_error: OnError = OnError.raise_


@dataclass
class TrainerConfig:
    # rmexp's own keys: how pairs become batches (see rmexp.packing)
    batching: Batching = Batching.packed  # packed: prompt once, no padding; padded: TRL's collator
    packed_row_tokens: int = 2048  # token budget of one packed row
    # null: start fresh; auto: continue this run dir from its last complete checkpoint; or a checkpoint path
    resume: str | None = None
    # null: the score head learns at learning_rate; else its own rate (it starts from random weights)
    head_learning_rate: float | None = None
    # seconds of training: the learning rate decays over the clock and training stops when it runs out
    # (num_train_epochs / max_steps still cap it); null: train for the steps/epochs set
    time_budget_s: float | None = None
    # add each LoRA update inside one matmul, without peft's casts and copies (falls back to peft's
    # forward wherever it does not apply); false: peft's forward throughout
    fused_lora: bool = True
    # keep the frozen 4-bit base dequantized after its first use instead of dequantizing it twice a
    # step: auto (when the 16-bit copy fits 20% of free memory), true, false
    dequant_cache: str = "auto"
    # RMSNorm layers (Gemma, Llama, Mistral, Qwen) through torch's fused rms_norm kernel: the same outputs
    fused_rms_norm: bool = True
    # Every other key keeps trl.RewardConfig / transformers.TrainingArguments names.
    learning_rate: float = 2e-4
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 1
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_length: int = 512  # per sequence; longer pairs lose prompt tokens from the left
    warmup_steps: float = 0.0
    lr_scheduler_type: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch_fused"
    center_rewards_coefficient: float | None = None
    gradient_checkpointing: str = "auto"  # auto (on only when activations would not fit), true, false
    bf16: str = "auto"  # bf16 autocast: auto (where the hardware computes bf16), true, false
    eval_strategy: str = "steps"
    eval_steps: float = 100
    save_strategy: str = "steps"
    save_steps: float = 200
    save_total_limit: int | None = 2
    logging_steps: float = 5
    seed: int = 42
    dataloader_num_workers: int = 0
    # any other RewardConfig field, passed through as is
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoggerConfig:
    backend: LoggerBackend = LoggerBackend.wandb
    mode: WandbMode | None = None  # null: online when W&B credentials exist, else offline
    project: str = "rmexp"
    entity: str | None = None
    group: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    init_timeout: float = 60.0  # seconds before an online start falls back to offline


@dataclass
class PathsConfig:
    output_dir: str = "${hydra:runtime.output_dir}"


@dataclass
class RMExpConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


@dataclass
class ScoringConfig:
    packed: bool = True  # pairs as [prompt][chosen][rejected] packed rows; false: the padded forward (a check)
    row_tokens: int = 2048  # tokens per packed row: memory follows it, not the file's size
    chunk_pairs: int = 1024  # pairs tokenized, scored and written at a time


@dataclass
class EvaluateConfig:
    checkpoint: str = MISSING  # a training run dir or an exported model dir
    batch_size: int = 8  # pairs per forward on the padded path
    worst_pairs: int = 20  # rows of the W&B table of the most wrongly scored pairs
    eval: ScoringConfig = field(default_factory=ScoringConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"  # 0.0.0.0 to accept other machines
    port: int = 5000
    max_batch: int = 64  # texts scored in one packed forward
    batch_window_ms: float = 5.0  # how long a request waits for others to share its forward
    max_items: int = 1024  # texts in one request
    max_request_bytes: int = 16 * 2**20
    row_tokens: int = 2048  # tokens per packed row
    normalize: bool = False  # (r - mean) / std with the run's held-out reward statistics


@dataclass
class ServeConfig:
    checkpoint: str = MISSING  # a training run dir or an exported model dir
    serve: ServerConfig = field(default_factory=ServerConfig)


def register_configs() -> None:
    ConfigStore.instance().store(name="rmexp_schema", node=RMExpConfig)
    ConfigStore.instance().store(name="rmexp_eval_schema", node=EvaluateConfig)
    ConfigStore.instance().store(name="rmexp_serve_schema", node=ServeConfig)


register_configs()
