"""Recipe knobs: the head's own learning rate, a wall-clock budget, and the `auto` settings."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerCallback, TrainerControl

from conftest import compose_cfg, tiny_overrides
from rmexp.callbacks import Budget, TimeBudget
from rmexp.model import compute_dtype, reward_head, torch_dtype
from rmexp.train import main
from rmexp.training_args import own_trainer_keys, use_bf16, use_gradient_checkpointing


class Capture(TrainerCallback):
    """A callback that keeps the trainer's optimizer and the learning rates it logged."""

    def __init__(self):
        self.lrs, self.optimizer, self.model = [], None, None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.optimizer, self.model = optimizer, model

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "learning_rate" in logs:
            self.lrs.append(logs["learning_rate"])


def test_head_learning_rate_gets_its_own_group(tmp_path):
    probe = Capture()
    main(compose_cfg(*tiny_overrides(tmp_path, "logger=none", "trainer.max_steps=2", "trainer.head_learning_rate=0.05")),
         callbacks=[probe])
    head = {id(p) for p in reward_head(probe.model).parameters() if p.requires_grad}
    groups = probe.optimizer.param_groups
    head_groups = [g for g in groups if any(id(p) in head for p in g["params"])]
    assert head and all(all(id(p) in head for p in g["params"]) for g in head_groups)
    assert {g["initial_lr"] for g in head_groups} == {0.05}
    assert {g["initial_lr"] for g in groups if g not in head_groups} == {5e-3}  # tiny_overrides' learning_rate
    trainable = {id(p) for p in probe.model.parameters() if p.requires_grad}
    assert {id(p) for g in groups for p in g["params"]} == trainable  # nothing lost from the optimizer


@pytest.mark.slow
def test_time_budget_stops_training_and_decays_the_rate(tmp_path):
    probe = Capture()
    cfg = compose_cfg(*tiny_overrides(tmp_path, "logger=none", "trainer.max_steps=-1", "trainer.num_train_epochs=1000",
                                      "trainer.time_budget_s=8", "trainer.logging_steps=1", "trainer.warmup_steps=0"))
    main(cfg, callbacks=[probe])
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["status"] == "ok" and 8 <= m["train_runtime_s"] < 60
    assert 0 < m["global_step"] < 1000 * m["n_train_pairs"] / cfg.trainer.per_device_train_batch_size
    # the rate follows the clock (robust to a loaded machine, where a step may take seconds): it starts near
    # the full rate and only falls
    assert probe.lrs[0] > 0.5 * cfg.trainer.learning_rate and probe.lrs[-1] < probe.lrs[0]
    assert all(a >= b for a, b in zip(probe.lrs, probe.lrs[1:], strict=False))
    assert m["n_train_pairs_seen"] > 0


def test_a_budget_is_one_clock_for_the_schedule_and_the_stop(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("rmexp.callbacks.time.monotonic", lambda: now[0])
    budget = Budget(10.0)
    assert budget.fraction_spent() == 0.0 and not budget.spent()  # not started: nothing spent
    stop = TimeBudget(budget)
    assert budget.start() is budget
    now[0] = 104.0
    assert budget.fraction_spent() == pytest.approx(0.4) and not stop.on_step_end(None, None, TrainerControl()).should_training_stop
    now[0] = 112.0
    assert budget.fraction_spent() == 1.0 and stop.on_step_end(None, None, TrainerControl()).should_training_stop


def fake_model(hidden: int, inter: int, layers: int):
    return SimpleNamespace(config=SimpleNamespace(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers))


def test_gradient_checkpointing_auto_follows_memory():
    cfg = compose_cfg("data.path=data/preference.jsonl").trainer
    assert use_gradient_checkpointing(cfg, fake_model(64, 128, 2)) is False  # a tiny model's activations fit
    assert use_gradient_checkpointing(cfg, fake_model(16384, 53248, 126)) is True  # a 405B's do not
    forced = compose_cfg("data.path=data/preference.jsonl", "trainer.gradient_checkpointing=true").trainer
    assert use_gradient_checkpointing(forced, fake_model(64, 128, 2)) is True
    bad = compose_cfg("data.path=data/preference.jsonl", "trainer.gradient_checkpointing=sometimes").trainer
    with pytest.raises(ValueError, match="trainer.gradient_checkpointing must be auto, true or false"):
        use_gradient_checkpointing(bad, fake_model(64, 128, 2))
    seed = compose_cfg("experiment=seed_llama3_8b").trainer
    assert use_gradient_checkpointing(seed, fake_model(64, 128, 2)) is True  # the 8B recipe always recomputes


def test_auto_dtype_is_bf16_only_where_the_hardware_has_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert compute_dtype() == torch.float32 and torch_dtype("auto") == torch.float32 and not use_bf16("auto")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert compute_dtype() == torch.bfloat16 and use_bf16("auto") and not use_bf16("false")
    with pytest.raises(ValueError, match="trainer.bf16 must be auto, true or false"):
        use_bf16("maybe")


def test_every_trainer_key_reaches_reward_config_or_rmexp():
    """A `trainer` key is a RewardConfig field (passed on under its HF name) or one of rmexp's own, marked in the
    schema and read by rmexp: a RewardConfig field renamed upstream fails here instead of being dropped unread."""
    import dataclasses
    import re

    from trl import RewardConfig

    from conftest import ROOT
    from rmexp.config import TrainerConfig

    own, hf = own_trainer_keys(), {f.name for f in dataclasses.fields(RewardConfig)}
    passed_on = {f.name for f in dataclasses.fields(TrainerConfig)} - own
    assert own and own.isdisjoint(hf), own & hf
    assert passed_on <= hf, f"trainer keys neither RewardConfig's nor marked rmexp's own: {sorted(passed_on - hf)}"
    source = "\n".join(p.read_text() for p in (ROOT / "src/rmexp").glob("*.py") if p.name != "config.py")
    unread = sorted(key for key in own if not re.search(rf"\.{key}\b|\"{key}\"", source))
    assert not unread, f"rmexp's own trainer keys that rmexp never reads: {unread}"
