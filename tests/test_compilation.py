"""trainer.compile: when `auto` compiles, and a compiled training is the eager one to fp32 rounding."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from conftest import KeepModel
from rmexp import compilation
from rmexp._compat import compiled_graphs
from rmexp.compilation import AUTO_MIN_STEPS, should_compile
from rmexp.config import ConfigError
from rmexp.trainer import planned_steps
from test_lora import assert_same_training, train_tiny


@pytest.mark.parametrize("setting,steps,compiler,fsdp,layers,expected", [
    ("auto", AUTO_MIN_STEPS, True, False, True, True),
    ("auto", AUTO_MIN_STEPS - 1, True, False, True, False),  # too short to win the compile back
    ("auto", None, True, False, True, False),  # a time budget, or a stream without max_steps: unknown length
    ("auto", 10**6, False, False, True, False),  # no compiler
    ("auto", 10**6, True, True, True, False),  # FSDP
    ("auto", 10**6, True, False, False, False),  # no decoder layers to compile
    ("true", 1, True, False, True, True),
    ("false", 10**6, True, False, True, False),
])
def test_auto_compiles_only_runs_long_enough_to_win_it_back(monkeypatch, setting, steps, compiler, fsdp, layers,
                                                           expected):
    monkeypatch.setattr(compilation, "compiler_available", lambda device: compiler)
    assert should_compile(setting, steps, "cpu", fsdp, layers) is expected


@pytest.mark.parametrize("packed_batch,expected", [(1, True), (None, True), (4, False)])
def test_auto_leaves_packed_batches_of_several_pairs_eager(monkeypatch, packed_batch, expected):
    """Their row layouts vary from batch to batch, and each would compile anew; padded batches do not."""
    monkeypatch.setattr(compilation, "compiler_available", lambda device: True)
    assert should_compile("auto", 10**6, "cpu", packed_batch=packed_batch) is expected
    assert should_compile("true", 10**6, "cpu", packed_batch=packed_batch)


@pytest.mark.parametrize("compiler,fsdp,layers", [(False, False, True), (True, True, True), (True, False, False)])
def test_compile_true_where_it_cannot_is_an_error(monkeypatch, compiler, fsdp, layers):
    monkeypatch.setattr(compilation, "compiler_available", lambda device: compiler)
    with pytest.raises(ConfigError, match="trainer.compile=true"):
        should_compile("true", 10**6, "cpu", fsdp, layers)


def test_the_planned_steps_count_optimizer_steps_and_no_budget_plans_any():
    args = SimpleNamespace(max_steps=-1, per_device_train_batch_size=4, world_size=1, gradient_accumulation_steps=2,
                           num_train_epochs=3)
    assert planned_steps(args, range(10), None) == 6  # 3 batches, 2 steps an epoch (the last one short), 3 epochs
    assert planned_steps(SimpleNamespace(**{**vars(args), "max_steps": 7}), range(10), None) == 7
    assert planned_steps(args, range(10), 600.0) is None  # a time budget: its clock decides
    assert planned_steps(args, iter(range(10)), None) is None  # a stream without max_steps


@pytest.mark.slow
@pytest.mark.numerics
@pytest.mark.skipif(not compilation.compiler_available("cpu"), reason="no C++ compiler for torch.compile")
def test_compiled_training_is_the_eager_training(tmp_path, monkeypatch):
    """The tiny nf4 model, 8 steps at packed batch 1 (the default recipe's) with every speed layer, eager and
    then with the decoder layers compiled (the first step eager, the other 7 compiled): the same training to
    fp32 rounding; the compiled run compiled in its second step and never again, whatever its pairs' lengths."""
    speed = ("true", "true", "true", "sgd")  # SGD: Adam's g / sqrt(v) enlarges rounding near zero gradients
    batch = "trainer.per_device_train_batch_size=1"
    eager = train_tiny(tmp_path / "eager", speed, None, batch)
    monkeypatch.setattr(compilation, "AUTO_MIN_STEPS", 8)  # auto, decided as a long run would be
    probe = GraphsPerStep()
    compiled = train_tiny(tmp_path / "compiled", speed, probe, batch, "trainer.compile=auto")
    kinds = [type(m).__name__ for m in probe.model.modules()]
    assert kinds.count("CompiledLlamaDecoderLayer") == probe.model.config.num_hidden_layers
    assert json.loads((tmp_path / "compiled/metrics.json").read_text())["compile_s"] > 0
    assert json.loads((tmp_path / "eager/metrics.json").read_text())["compile_s"] is None
    graphs = probe.counts
    assert len(graphs) == 8 and graphs[1] > graphs[0] and graphs[1:] == [graphs[1]] * 7, graphs
    assert_same_training(*compiled, *eager, "compiled", probe.model)


class GraphsPerStep(KeepModel):
    """KeepModel that also counts, after each step, the graphs torch.compile has built in this process."""

    def __init__(self):
        self.counts: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.counts.append(compiled_graphs())
