"""Every private name rmexp touches (rmexp._compat) is still there; a moved one fails naming its library."""

from __future__ import annotations

import importlib.metadata

import pytest

from conftest import compose_cfg, tiny_overrides
from rmexp import _compat


def test_every_private_name_is_where_rmexp_expects_it():
    _compat.check()


def test_a_trainer_has_the_private_attributes_rmexp_writes(tmp_path):
    from reference_reader import load_data
    from rmexp.config import to_typed
    from rmexp.data import tokenize_pairs
    from rmexp.model import build_lora_config, build_reward_config, load_reward_model
    from rmexp.trainer import PairwiseRewardTrainer

    cfg = to_typed(compose_cfg(*tiny_overrides(tmp_path), "quantization=none", "data.max_pairs=16",
                               "trainer.eval_strategy=no"))
    train, _, _ = load_data(cfg.data)
    model, tok, _ = load_reward_model(cfg.model, cfg.quantization)
    ds, _ = tokenize_pairs(tok, train, cfg.trainer.max_length)
    trainer = PairwiseRewardTrainer(model=model, args=build_reward_config(cfg.trainer, tmp_path, "none", model),
                                    train_dataset=ds, processing_class=tok, peft_config=build_lora_config(cfg.lora))
    _compat.check(trainer)
    _compat.log_metric(trainer, "train", "accuracy", 0.5)
    _compat.count_train_tokens(trainer, 7, "train")
    assert trainer._metrics["train"]["accuracy"] == [0.5] and trainer._metrics["train"]["num_tokens"] == [7]
    assert _compat.attn_implementation(trainer.model) == "sdpa"


def test_a_moved_name_fails_naming_the_library_and_its_version(monkeypatch):
    import bitsandbytes.functional

    monkeypatch.delattr(bitsandbytes.functional, "_convert_weight_packed_for_cpu_inverse")
    with pytest.raises(_compat.CompatError) as err:
        _compat.check()
    assert f"bitsandbytes {importlib.metadata.version('bitsandbytes')}" in str(err.value)
    assert "_convert_weight_packed_for_cpu_inverse" in str(err.value)
