"""Shared fixtures: configs composed through Hydra's compose API, and one real tiny training run."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig
from transformers import TrainerCallback

from rmexp.config import CONF_MODULE

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
HH_PAIRS = SHARED_DATA / "hh-rlhf-harmless" / "pairs.jsonl"
DPO_ZH = SHARED_DATA / "llamafactory-dpo" / "dpo_zh_200.json"
DPO_EN = SHARED_DATA / "llamafactory-dpo" / "dpo_en_300.json"

needs_shared = pytest.mark.skipif(not HH_PAIRS.is_file(), reason="../shared/data is absent")

os.environ.setdefault("WANDB_SILENT", "true")
# tokenized datasets of the tests (and of their subprocesses) stay out of the user's datasets cache
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="rmexp-tests-datasets-"))
os.environ.pop("WANDB_API_KEY", None)  # tests never go online


def compose_cfg(*overrides: str) -> DictConfig:
    """The same config `python -m rmexp.train <overrides>` would get (minus hydra's own node)."""
    with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def compose_evaluate(checkpoint, data_path, out_dir, *extra: str) -> DictConfig:
    """The config `python -m rmexp.evaluate checkpoint=... data.path=...` would get, W&B off."""
    with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
        return compose("evaluate", overrides=[f"checkpoint={checkpoint}", f"data.path={data_path}",
                                              f"paths.output_dir={out_dir}", "logger=none", *extra])


@pytest.fixture
def tokenizer():
    """The tiny model's tokenizer, fresh for each test (tests may change its chat template)."""
    from rmexp.builtin import resolve_model_path
    from rmexp.model import load_tokenizer

    cfg = compose_cfg("model=tiny", "data.path=data/preference.jsonl")
    return load_tokenizer(resolve_model_path(cfg.model.name_or_path, cfg.model.cache_dir))


class KeepModel(TrainerCallback):
    """Keeps the model the Trainer trains (the trained model, once training is done)."""

    model = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model


def tiny_overrides(out: Path, *extra: str) -> list[str]:
    return ["model=tiny", f"paths.output_dir={out}", "logger.mode=offline", f"data.path={ROOT / 'data/preference.jsonl'}",
            "trainer.max_steps=8", "trainer.per_device_train_batch_size=4", "trainer.eval_steps=4", "trainer.logging_steps=2", "trainer.learning_rate=5e-3",
            *extra]


@pytest.fixture(autouse=True)
def _run_from_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)
