"""The CUDA path, and the CPU pinning that keeps every other test off it.

Tests marked `cuda` run only where torch sees a CUDA device (skipped elsewhere, with the reason): placement and
dtype, the 4-bit CUDA kernels against their dequantized weights, packed against padded rewards, a few training
steps and the trained run scored. Every other test of the suite runs with CUDA hidden (`hide_cuda`,
tests/conftest.py), so a GPU box gets this CPU's results; the first tests here check that hiding on this CPU,
with a CUDA device faked first.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import (
    CUDA_SKIP_REASON,
    ROOT,
    KeepModel,
    compose_cfg,
    cuda_hidden,
    cuda_present,
    forget_cuda_answers,
    hide_cuda,
    show_cuda,
    tiny_overrides,
)
from numerics import forward_bound, rounding_bound

sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402  (bench/gpu_check.py: the float64 copy of a 4-bit model)

DATA = ROOT / "data" / "preference.jsonl"


# ---------------------------------------------------------------- hiding CUDA (runs on any machine)


def fake_gpu(monkeypatch, major: int = 9) -> None:
    """torch as on a machine with one CUDA device of compute capability `major`.0 (an H100: 9)."""
    @contextlib.contextmanager
    def device(d):
        yield

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(major=major, minor=0))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda d: True)
    if hasattr(torch, "accelerator"):
        monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
        monkeypatch.setattr(torch.accelerator, "device_count", lambda: 1)
        monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a, **k: torch.device("cuda"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_hiding_cuda_makes_every_device_decision_choose_the_cpu(monkeypatch, tmp_path):
    """With a GPU faked, each entry that decides a device picks it; after `hide_cuda` (what the autouse fixture
    does for every test not marked `cuda`), each picks the CPU, in its dtype, and a started process sees no GPU."""
    from transformers import TrainingArguments
    from transformers.utils.import_utils import is_torch_cuda_available

    from rmexp.device import DeviceError, auto_dtype, cpu_native_bf16, place, training_device
    from rmexp.model import build_bnb_config, compute_dtype, device_map_for, from_pretrained_kwargs
    from rmexp.training_args import use_bf16

    cfg = compose_cfg("data.path=data/preference.jsonl")  # nf4, every dtype auto
    cpu_dtype = torch.bfloat16 if cpu_native_bf16() else torch.float32
    assert not torch.cuda.is_available() and os.environ["CUDA_VISIBLE_DEVICES"] == ""  # the fixture, here already

    fake_gpu(monkeypatch)
    forget_cuda_answers()
    assert is_torch_cuda_available()  # transformers' cached answer, given with the fake GPU
    bnb = build_bnb_config(cfg.quantization)
    assert place("auto").device == torch.device("cuda", 0) and place("auto").dtype == torch.bfloat16
    assert training_device() == torch.device("cuda") and compute_dtype() == torch.bfloat16 and use_bf16("auto")
    assert device_map_for(bnb, fsdp=False) == {"": 0}

    hide_cuda(monkeypatch)
    assert not torch.cuda.is_available() and torch.cuda.device_count() == 0 and not is_torch_cuda_available()
    for requested in ("auto", "cpu"):
        placement = place(requested)
        assert placement.device == torch.device("cpu") and placement.dtype == cpu_dtype and placement.device_map is None
    with pytest.raises(DeviceError, match="torch sees no CUDA device"):
        place("cuda")
    assert training_device() == torch.device("cpu") and compute_dtype() == auto_dtype("cpu") == cpu_dtype
    assert use_bf16("auto") == (cpu_dtype == torch.bfloat16)
    assert device_map_for(build_bnb_config(cfg.quantization), fsdp=False) is None
    kwargs = from_pretrained_kwargs(cfg.model, cfg.quantization, fsdp=False)  # training's load
    assert kwargs["device_map"] is None and kwargs["dtype"] == cpu_dtype
    with contextlib.suppress(ImportError):  # trainer.attention=auto: the segment walk on the CPU, where this build has flex
        from rmexp.flex import kernel_for
        from rmexp.packing import PACKED_ATTENTION

        assert kernel_for("auto", training_device(), SimpleNamespace(attention_dropout=0.0))[0] == PACKED_ATTENTION
    if hasattr(torch, "accelerator"):
        assert torch.accelerator.current_accelerator() is None and not torch.accelerator.is_available()
    # the Trainer's device (transformers asks accelerate, which asks torch.cuda)
    assert TrainingArguments(output_dir=str(tmp_path), report_to="none").device == torch.device("cpu")
    # and any process the test starts: torchrun's ranks, the CLI subprocesses
    probe = subprocess.run([sys.executable, "-c", "import os; print(repr(os.environ.get('CUDA_VISIBLE_DEVICES')))"],
                           capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "''"


def test_a_cuda_test_sees_the_machine_as_it_is(monkeypatch):
    """`show_cuda` (what a `cuda` test runs under) undoes the hiding: torch's own functions, the caller's
    CUDA_VISIBLE_DEVICES, transformers' answers asked afresh; on this CPU they still say there is no GPU."""
    from transformers.utils.import_utils import is_torch_cuda_available

    import conftest

    show_cuda(monkeypatch)
    for owner, name, real in conftest._REAL_CUDA:
        assert getattr(owner, name) is real, name
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == conftest._REAL_VISIBLE
    assert torch.cuda.is_available() == is_torch_cuda_available() == cuda_present()
    hide_cuda(monkeypatch)
    assert not is_torch_cuda_available() and os.environ["CUDA_VISIBLE_DEVICES"] == ""


def test_only_tests_marked_cuda_see_the_gpu_and_they_skip_without_one(request):
    """The hook's decision (`cuda_hidden`) and what collection did with this module's `cuda` tests."""
    assert cuda_hidden(request.node)
    marked = [item for item in request.session.items if item.get_closest_marker("cuda") is not None
              and item.module is request.node.module]
    assert len(marked) >= 4 and not any(cuda_hidden(item) for item in marked)
    for item in marked:
        skips = [m for m in item.iter_markers("skip") if m.kwargs.get("reason") == CUDA_SKIP_REASON]
        assert bool(skips) == (not cuda_present()), item.name


# ---------------------------------------------------------------- on a GPU


def gpu_placement(dtype: torch.dtype | None = None):
    from rmexp.device import Placement, place

    placement = place("cuda")
    return placement if dtype is None else Placement(placement.device, dtype, placement.why + "; dtype set by the test")


@pytest.mark.cuda
def test_the_gpu_is_visible_and_auto_places_a_4bit_model_on_it_with_an_fp32_head():
    from rmexp import RewardModel
    from rmexp.dataset import read_pairs
    from rmexp.device import place
    from rmexp.model import load_reward_model

    assert torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES") != ""  # not hidden here
    placement = place("auto")
    native = torch.cuda.get_device_capability(placement.device) >= (8, 0)
    assert placement.device == torch.device("cuda", torch.cuda.current_device())
    assert placement.dtype == (torch.bfloat16 if native else torch.float32)
    cfg = compose_cfg("model=tiny", "data.path=data/preference.jsonl")
    model, tok, _ = load_reward_model(cfg.model, cfg.quantization, device=placement)
    layers = gpu_check.linear4bit_layers(model)
    assert layers and all(m.weight.device == placement.device for m in layers)
    assert all(m.compute_dtype == placement.dtype for m in layers)
    rm = RewardModel(model, tok, 128, "tiny")
    head = gpu_check.head_info(rm.model)
    assert head["dtypes"] == ["float32"] and head["devices"] == [str(placement.device)]
    rewards = rm.score_pairs(read_pairs(DATA, max_pairs=8)[0])
    assert rewards.shape == (8, 2) and torch.isfinite(rewards).all()


@pytest.mark.cuda
@pytest.mark.numerics
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 37])  # one token (bitsandbytes' gemv kernel at inference) and a matmul
def test_the_4bit_cuda_kernels_multiply_by_their_dequantized_weights(dtype, rows):
    import bitsandbytes.functional as bnbf
    from bitsandbytes.nn import Linear4bit

    torch.manual_seed(0)
    n_in, n_out = 512, 256
    layer = Linear4bit(n_in, n_out, bias=False, compute_dtype=dtype, quant_type="nf4")
    layer.weight.data.normal_(0, 0.02)  # before .cuda(): quantized as it moves
    layer = layer.cuda()
    w = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).double()  # what the kernels multiply by
    x = torch.randn(rows, n_in, device="cuda", dtype=dtype)
    with torch.no_grad():
        inference = layer(x)
    xg = x.clone().requires_grad_(True)
    y = layer(xg)
    g = torch.randn_like(y)
    y.backward(g)
    exact_y, exact_dx = x.double() @ w.T, g.double() @ w
    # sums of n_in (forward) and n_out (input gradient) terms of size |x||w| (|g||w|), accumulated in fp32; the
    # output rounded once to `dtype` (bf16's eps 2^-7 there, and k=2 for the dequantized weight's cast to it)
    for got, exact, magnitude, n in ((inference, exact_y, x.double().abs() @ w.abs().T, n_in),
                                     (y, exact_y, x.double().abs() @ w.abs().T, n_in),
                                     (xg.grad, exact_dx, g.double().abs() @ w.abs(), n_out)):
        bound = rounding_bound(torch.float32, magnitude, n, k=2) + rounding_bound(dtype, magnitude, 1, k=2)
        assert ((got.double() - exact).abs() <= bound).all(), (got.double() - exact).abs().max()


@pytest.mark.cuda
@pytest.mark.numerics
def test_packed_rewards_equal_padded_ones_on_the_gpu_in_fp32():
    """The tiny nf4 model on the GPU in fp32: packed and padded rewards each within fp32's rounding bound of a
    float64 copy of the same 4-bit weights, so within twice it of each other, and deciding every pair alike."""
    from rmexp import RewardModel
    from rmexp.dataset import read_pairs
    from rmexp.model import load_reward_model

    cfg = compose_cfg("model=tiny", "data.path=data/preference.jsonl")
    torch.manual_seed(0)
    model, tok, _ = load_reward_model(cfg.model, cfg.quantization, device=gpu_placement(torch.float32))
    reference = gpu_check.float64_copy(model)
    packed, padded = RewardModel(model, tok, 128, "tiny", packed=True, row_tokens=300), RewardModel(model, tok, 128, "tiny", packed=False)
    assert packed.packed and not padded.packed
    encoded = packed.encode(read_pairs(DATA, max_pairs=30)[0])
    exact, size = gpu_check.score_pairs_float64(reference, encoded, tok.pad_token_id)
    bound = forward_bound(model.config, size, 128)  # sums over up to 128 tokens and the MLP's 128-wide projection
    got, plain = packed.score_encoded(encoded).double(), padded.score_encoded(encoded, batch_size=4).double()
    for name, rewards in (("packed", got), ("padded", plain)):
        assert (rewards - exact).abs().max() <= bound, name
    assert (got - plain).abs().max() <= 2 * bound
    sure = (exact[:, 0] - exact[:, 1]).abs() > 2 * bound
    assert torch.equal(got[sure, 0] > got[sure, 1], exact[sure, 0] > exact[sure, 1])


def training_variants() -> list:
    import rmexp.config

    variants = ["trainer.batching=packed", "trainer.batching=padded"]
    if "flex" in getattr(rmexp.config, "ATTENTIONS", ()):  # the flex path, where this build has it
        variants.append("trainer.attention=flex")
    return variants


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize("variant", training_variants())
def test_a_few_training_steps_run_on_the_gpu_and_the_run_scores_there(tmp_path, variant):
    from rmexp import RewardModel
    from rmexp.dataset import read_pairs
    from rmexp.train import main

    keep = KeepModel()
    main(compose_cfg(*tiny_overrides(tmp_path, "logger=none", variant)), callbacks=[keep])
    layers = gpu_check.linear4bit_layers(keep.model)
    assert layers and all(m.weight.device.type == "cuda" for m in layers)
    lora = [p for n, p in keep.model.named_parameters() if "lora_" in n]
    assert lora and all(p.device.type == "cuda" and p.dtype == torch.float32 for p in lora)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "ok" and math.isfinite(metrics["train_loss"]), metrics
    rm = RewardModel.load(tmp_path, device="cuda")
    assert {str(p.device) for p in rm.model.parameters()} == {str(gpu_placement().device)}
    rewards = rm.score_pairs(read_pairs(DATA, max_pairs=8)[0])
    assert torch.isfinite(rewards).all()
