"""Where a model scores and in which dtype (rmexp.device): the decision for each case, with the accelerator's
presence and capability given as arguments or injected into torch.cuda, so all of it runs on a CPU; the
loaders pass the decision on; on a CPU, scoring is what it was."""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from conftest import compose_cfg, tiny_overrides
from rmexp.config import CONF_MODULE, ConfigError, to_typed
from rmexp.device import DeviceError, decide, native_bf16, place
from rmexp.errors import UserError
from rmexp.model import compute_dtype, from_pretrained_kwargs, torch_dtype
from rmexp.training_args import use_bf16

BF16_GPU = lambda device: device.type == "cuda"  # noqa: E731  an Ampere-or-later GPU on a CPU without bf16
NO_BF16 = lambda device: False  # noqa: E731  a T4 or V100 beside such a CPU


# ---------------------------------------------------------------- the decision


def test_auto_without_cuda_is_the_cpu_in_its_own_dtype():
    for cpu_bf16 in (True, False):
        p = decide("auto", 0, lambda device, b=cpu_bf16: device.type == "cpu" and b)
        assert p.device == torch.device("cpu") and p.device_map is None
        assert p.dtype == (torch.bfloat16 if cpu_bf16 else torch.float32)


def test_auto_with_cuda_is_the_current_gpu_and_the_4bit_model_loads_onto_it():
    p = decide("auto", 1, BF16_GPU)
    assert (p.device, p.dtype, p.device_map) == (torch.device("cuda", 0), torch.bfloat16, {"": 0})
    assert decide("auto", 2, BF16_GPU, current=1).device == torch.device("cuda", 1)  # the process's own GPU
    assert decide("cuda", 2, BF16_GPU, current=1).device == torch.device("cuda", 1)
    cfg = compose_cfg("data.path=data/preference.jsonl")  # nf4, dtypes auto
    assert cfg.quantization.load_in_4bit and cfg.model.dtype == "auto"
    kwargs = from_pretrained_kwargs(cfg.model, cfg.quantization, fsdp=False, placement=p)
    assert kwargs["device_map"] == {"": 0}
    assert kwargs["dtype"] == kwargs["quantization_config"].bnb_4bit_compute_dtype == torch.bfloat16
    t4 = from_pretrained_kwargs(cfg.model, cfg.quantization, placement=decide("auto", 1, NO_BF16))
    assert t4["device_map"] == {"": 0} and t4["dtype"] == t4["quantization_config"].bnb_4bit_compute_dtype == torch.float32


def test_an_unquantized_model_loads_onto_the_gpu_too():
    cfg = compose_cfg("data.path=data/preference.jsonl", "quantization=none")
    kwargs = from_pretrained_kwargs(cfg.model, cfg.quantization, placement=decide("cuda:1", 2, BF16_GPU))
    assert kwargs["quantization_config"] is None and kwargs["device_map"] == {"": 1}
    # training keeps its own placement: the Trainer moves an unquantized model
    assert from_pretrained_kwargs(cfg.model, cfg.quantization, fsdp=False)["device_map"] is None


def test_an_explicit_gpu_is_that_gpu():
    p = decide("cuda:1", 2, lambda device: device == torch.device("cuda", 1))
    assert (p.device, p.dtype, p.device_map) == (torch.device("cuda", 1), torch.bfloat16, {"": 1})
    assert decide("cuda:0", 2, lambda device: device == torch.device("cuda", 1)).dtype == torch.float32


def test_cpu_on_a_cuda_machine_is_the_cpu_in_the_cpus_dtype():
    p = decide("cpu", 1, BF16_GPU)
    assert (p.device, p.dtype, p.device_map) == (torch.device("cpu"), torch.float32, None)
    assert "cpu" in p.why
    cfg = compose_cfg("data.path=data/preference.jsonl")
    kwargs = from_pretrained_kwargs(cfg.model, cfg.quantization, placement=p)
    assert kwargs["device_map"] is None and kwargs["dtype"] == torch.float32  # not the GPU's bf16


@pytest.mark.parametrize("value", ["gpu", "cuda:x", "CUDA", "cuda:", "mps", ""])
def test_a_value_naming_no_device_is_a_config_error_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"^device must be auto, cpu, cuda or cuda:N"):
        decide(value, 1, BF16_GPU)


@pytest.mark.parametrize("value,gpus,says", [
    ("cuda", 0, "device=cuda, but torch sees no CUDA device"),
    ("cuda:0", 0, "device=cuda:0, but torch sees no CUDA device"),
    ("cuda:1", 1, "device=cuda:1, but this machine has 1 CUDA device (cuda:0 to cuda:0)"),
])
def test_a_device_the_machine_lacks_is_a_user_error_naming_the_key(value, gpus, says):
    with pytest.raises(DeviceError, match=re_escape(says)) as caught:
        decide(value, gpus, BF16_GPU)
    assert isinstance(caught.value, UserError)


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def app_config(name: str, *overrides: str):
    with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


APPS = {"evaluate": ["checkpoint=x", "data.path=y.jsonl", "paths.output_dir=z", "logger=none"],
        "score": ["checkpoint=x", "question=q", "answer=a"], "serve": ["checkpoint=x"],
        "export": ["checkpoint=x", "output_dir=y"]}


@pytest.mark.parametrize("app", sorted(APPS))
def test_every_scoring_app_takes_device_auto_by_default_and_checks_it(app):
    assert to_typed(app_config(app, *APPS[app])).device == "auto"
    assert to_typed(app_config(app, *APPS[app], "device=cuda:1")).device == "cuda:1"
    with pytest.raises(ConfigError, match=re_escape("device must be auto, cpu, cuda or cuda:N, got 'gpu'")):
        to_typed(app_config(app, *APPS[app], "device=gpu"))


# ---------------------------------------------------------------- native bf16 only, with CUDA injected


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda with GPUs of the given compute capabilities (`set(major, ...)`), where any can emulate bf16."""
    state = SimpleNamespace(majors=[8], current=0)

    def device(d):
        @contextlib.contextmanager
        def switch():
            index = torch.device(d).index
            before, state.current = state.current, state.current if index is None else index
            try:
                yield
            finally:
                state.current = before
        return switch()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(state.majors))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: state.current)
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: SimpleNamespace(major=state.majors[d if isinstance(d, int) else torch.device(d).index]))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda d: True)  # every GPU emulates bf16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)  # a CPU with bf16: it must not count
    return state


def test_emulated_bf16_is_not_native(fake_cuda):
    fake_cuda.majors = [7]  # a V100 (7.0) or T4 (7.5)
    assert torch.cuda.is_bf16_supported()  # torch counts the emulation
    assert not native_bf16("cuda") and not native_bf16("cuda:0")
    assert compute_dtype() == torch_dtype("auto") == torch.float32
    assert not use_bf16("auto")
    assert use_bf16("true")  # asked for: on, as CUDA (emulating) takes it
    assert place("auto").dtype == torch.float32


def test_native_bf16_is_bf16_for_training_and_scoring(fake_cuda):
    fake_cuda.majors = [8]  # an A100 (8.0), H100 (9.0)
    assert native_bf16("cuda:0") and compute_dtype() == torch.bfloat16 and use_bf16("auto")
    p = place("auto")
    assert (p.device, p.dtype, p.device_map) == (torch.device("cuda", 0), torch.bfloat16, {"": 0})


def test_each_gpu_is_asked_about_itself_and_the_choice_is_logged_once(fake_cuda, caplog):
    fake_cuda.majors = [7, 9]  # a T4 beside an H100, the T4 current
    assert not native_bf16("cuda:0") and native_bf16("cuda:1") and fake_cuda.current == 0
    with caplog.at_level(logging.INFO, logger="rmexp.device"):
        assert place("cuda:1").dtype == torch.bfloat16
    (record,) = [r for r in caplog.records if r.name == "rmexp.device"]
    assert record.levelno == logging.INFO
    assert record.getMessage() == ("model on device cuda:1, dtype bfloat16 (device=cuda:1; bf16 native there "
                                   "(compute capability 8.0 or later))")
    assert place("auto").device == torch.device("cuda", 0) and place("auto").dtype == torch.float32
    cpu = place("cpu")
    assert (cpu.device, cpu.dtype) == (torch.device("cpu"), torch.bfloat16)  # the CPU's own rule, beside the GPUs
    with pytest.raises(DeviceError, match=re_escape("device=cuda:2, but this machine has 2 CUDA devices")):
        place("cuda:2")


def test_the_cpu_rule_is_unchanged(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for avx512, amx, dtype in ((False, False, torch.float32), (True, False, torch.bfloat16), (False, True, torch.bfloat16)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert compute_dtype() == dtype == place("auto").dtype == place("cpu").dtype
        assert use_bf16("auto") == (dtype == torch.bfloat16)


# ---------------------------------------------------------------- the loaders pass the decision on


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained run (4-bit, the defaults' dtypes), two steps."""
    from rmexp.train import main

    out = tmp_path_factory.mktemp("device_run")
    main(compose_cfg(*tiny_overrides(out, "logger=none", "trainer.max_steps=2", "trainer.eval_steps=2",
                                     "trainer.save_strategy=no")))
    return out


PAIRS = [("What is 2+2?", "4."), ("天空是什么颜色？", "蓝色。"), ("Name a fruit.", "An apple, or a pear.")]


def test_on_this_cpu_a_run_scores_exactly_as_before(run, caplog):
    """RewardModel.load(run, device=cpu) and auto (no CUDA here) score as the loader did before `device`:
    the training loader's model (device_map None, `auto` dtypes from the CPU's rule), the adapter on it."""
    from peft import PeftModel

    from rmexp import RewardModel
    from rmexp.data import Pair
    from rmexp.model import load_reward_model, load_tokenizer
    from rmexp.prepare import for_scoring
    from rmexp.rundir import read_run_config

    cfg = read_run_config(run)
    base, _, _ = load_reward_model(cfg.model, cfg.quantization)
    before = RewardModel(PeftModel.from_pretrained(for_scoring(base), str(run)), load_tokenizer(str(run)),
                         int(cfg.trainer.max_length), str(run), cfg.data.system_prompt)
    pairs = [Pair(q, a, a + " Maybe.") for q, a in PAIRS]
    expected, expected_pairs = before.score_batch(PAIRS), before.score_pairs(pairs)
    for device in ("cpu", "auto"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="rmexp.device"):
            rm = RewardModel.load(run, device=device)
        (line,) = [r.getMessage() for r in caplog.records if r.name == "rmexp.device"]  # logged once
        assert line.startswith(f"model on device cpu, dtype {str(compute_dtype()).removeprefix('torch.')} (device={device}")
        assert {p.device.type for p in rm.model.parameters()} == {"cpu"}
        assert rm.score_batch(PAIRS) == expected
        assert torch.equal(rm.score_pairs(pairs), expected_pairs)
        assert {p.dtype for p in rm.model.parameters()} == {p.dtype for p in before.model.parameters()}


class Recorder:
    """from_pretrained of transformers and peft, recording each call's keyword arguments and then loading on this
    CPU (no device_map, the adapter read to the CPU)."""

    def __init__(self, monkeypatch):
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification

        self.hf, self.peft = [], []
        hf_load, peft_load = AutoModelForSequenceClassification.from_pretrained, PeftModel.from_pretrained

        def hf(path, **kwargs):
            self.hf.append(kwargs)
            return hf_load(path, **{**kwargs, "device_map": None})

        def peft(model, path, **kwargs):
            self.peft.append(kwargs)
            return peft_load(model, path, **{**kwargs, "torch_device": "cpu"})

        from transformers import PreTrainedModel

        by_class = PreTrainedModel.from_pretrained.__func__

        def state_dict_load(cls, path, *args, **kwargs):  # rmexp.export's: a model class, a state_dict, no path
            if path is None:
                self.hf.append({k: v for k, v in kwargs.items() if k not in ("config", "state_dict")})
                kwargs["device_map"] = None
            return by_class(cls, path, *args, **kwargs)

        monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", hf)
        monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(state_dict_load))
        monkeypatch.setattr(PeftModel, "from_pretrained", peft)


def on_a_t4(monkeypatch):
    """`place` deciding as on a machine with one GPU without native bf16, beside this CPU (which has it or not):
    what a dtype of `auto` is must come from the GPU."""
    import rmexp.device
    import rmexp.model
    import rmexp.reward_model

    def t4(requested="auto", key="device"):
        return decide(requested, 1, NO_BF16, 0, key)

    for module in (rmexp.reward_model, rmexp.model, rmexp.device):  # imported by name, or asked on use (export)
        monkeypatch.setattr(module, "place", t4)


def test_a_run_loads_onto_the_chosen_device_in_its_dtype(run, monkeypatch):
    from rmexp import RewardModel

    on_a_t4(monkeypatch)
    loads = Recorder(monkeypatch)
    rm = RewardModel.load(run, device="auto")
    (kwargs,) = loads.hf
    assert kwargs["device_map"] == {"": 0}
    assert kwargs["dtype"] == kwargs["quantization_config"].bnb_4bit_compute_dtype == torch.float32
    assert loads.peft == [{"torch_device": "cuda:0"}]
    assert len(rm.score_batch(PAIRS)) == 3

    # the same run on an unquantized base (its config edited): placed as it loads as well
    plain = run.parent / "device_run_unquantized"
    shutil.copytree(run, plain, dirs_exist_ok=True)
    config = OmegaConf.load(plain / "rmexp_config.yaml")
    config.quantization.load_in_4bit = False
    OmegaConf.save(config, plain / "rmexp_config.yaml")
    RewardModel.load(plain, device="cuda:0")
    kwargs = loads.hf[-1]
    assert kwargs["quantization_config"] is None and kwargs["device_map"] == {"": 0}
    assert kwargs["dtype"] == torch.float32


def test_an_export_merges_and_loads_on_the_chosen_device(run, tmp_path, monkeypatch):
    from rmexp import RewardModel
    from rmexp.export import export

    on_a_t4(monkeypatch)
    loads = Recorder(monkeypatch)
    exported = export(run, tmp_path / "exported", dtype="float32", device="cuda")
    assert loads.hf[-1]["device_map"] == {"": 0} and loads.hf[-1]["dtype"] == torch.float32
    rm = RewardModel.load(exported, device="cuda:0")
    assert loads.hf[-1] == {"use_safetensors": True, "dtype": torch.float32, "device_map": {"": 0}}
    assert len(rm.score_batch(PAIRS)) == 3


def test_an_export_loads_on_this_cpu_as_before(run, tmp_path):
    """On a CPU, an exported dir loads in `auto`'s CPU dtype with no device_map, as before."""
    from transformers import AutoModelForSequenceClassification

    from rmexp import RewardModel
    from rmexp.export import export

    exported = export(run, tmp_path / "exported", dtype="float32", device="cpu")
    rm = RewardModel.load(exported, device="cpu")
    before = RewardModel(AutoModelForSequenceClassification.from_pretrained(exported, use_safetensors=True,
                                                                           dtype=torch_dtype("auto")),
                         rm.tokenizer, rm.max_length, str(exported), rm.system_prompt)
    assert rm.score_batch(PAIRS) == before.score_batch(PAIRS)
    assert {p.device.type for p in rm.model.parameters()} == {"cpu"}


# ---------------------------------------------------------------- every entry passes `device` on


class Loaded(Exception):
    pass


@pytest.fixture
def load_calls(monkeypatch):
    from rmexp.reward_model import RewardModel

    calls = []

    def load(path, **kwargs):
        calls.append(kwargs)
        raise Loaded

    monkeypatch.setattr(RewardModel, "load", load)
    return calls


def test_evaluate_score_and_serve_pass_the_device_on(run, tmp_path, load_calls):
    import socket

    import rmexp.serve
    from rmexp.evaluate import evaluate
    from rmexp.score import score

    with pytest.raises(Loaded):
        evaluate(to_typed(app_config("evaluate", f"checkpoint={run}", f"data.path={Path('data/preference.jsonl').resolve()}",
                                     f"paths.output_dir={tmp_path}", "logger=none", "device=cpu")))
    with pytest.raises(Loaded):
        score(to_typed(app_config("score", f"checkpoint={run}", "question=q", "answer=a", "device=cuda:1")))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(Loaded):
        rmexp.serve.app(app_config("serve", f"checkpoint={run}", f"serve.port={port}", "device=cuda"))
    assert [c["device"] for c in load_calls] == ["cpu", "cuda:1", "cuda"]


def test_export_passes_the_device_on(run, tmp_path, monkeypatch):
    import rmexp.export

    calls = []
    monkeypatch.setattr(rmexp.export, "export", lambda *args, **kwargs: calls.append(kwargs) or Path(args[1]))
    rmexp.export.app(app_config("export", f"checkpoint={run}", f"output_dir={tmp_path}", "device=cpu"))
    assert calls == [{"device": "cpu"}]
