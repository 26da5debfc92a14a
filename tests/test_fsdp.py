"""FSDP-QLoRA on CPU: the tiny model, nf4 stored in the model's dtype, wrapped by FSDP1 on two gloo processes
as transformers' Trainer wraps it (tests/fsdp_worker.py), gives the unwrapped model's gradients. accelerate's FSDP
plugin wants a GPU, so the Trainer itself is not run; no GPU was used."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, compose_cfg
from numerics import eps


def sharded_bound(dtype: str) -> float:
    """The gradients' normwise relative difference two runs of the tiny model in `dtype` may show: each run
    rounds ~35 times along a gradient's path (forward_bound's k: 15 a layer, 2 layers, 5 more), independent
    errors adding up to sqrt(35) eps in norm (Higham and Mary 2019); the sums accumulate in fp32 (n <= 512
    tokens); both runs, x2."""
    return 2 * (math.sqrt(35) * eps(getattr(torch, dtype)) + math.sqrt(512) * eps(torch.float32))


@pytest.mark.slow
@pytest.mark.numerics
@pytest.mark.parametrize("dtype,fused_rms_norm", [
    ("float32", False),   # fp32 weights, storage and compute
    ("bfloat16", False),  # the recipe's: bf16 weights, storage and autocast, gradients reduced in bf16
    ("bfloat16", True),   # rmexp's RMSNorm backward under FSDP
])
def test_sharded_qlora_gradients_equal_the_unwrapped_model(tmp_path, dtype, fused_rms_norm):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    out = tmp_path / "result.json"
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", str(ROOT / "tests/fsdp_worker.py"), str(out), dtype]
    proc = subprocess.run(cmd + (["fused_rms_norm"] if fused_rms_norm else []), capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device_map"] is None  # FSDP places the weights
    assert result["param_dtype"] == f"torch.{dtype}"  # FSDP computes in the storage dtype
    # every LoRA A/B and the head got its own block, was sharded over the 2 ranks and got its gradient
    assert result["n_trainable"] == 29 and result["missing"] == []
    assert result["n_fsdp_units"] == 1 + 2 + 28 + 1  # root, 2 decoder layers, 28 LoRA Linears, the head
    if dtype == "bfloat16":  # the fp32 head's frozen copy joins the bf16 root block
        assert result["cast"] == ["base_model.model.score.original_module.weight"]
    if fused_rms_norm:
        assert result["fused_norms"] == 4
    assert result["max_rel_diff"] <= sharded_bound(dtype), result


def test_prepare_for_fsdp_refuses_uint8_storage_and_readies_a_bf16_one():
    from peft import get_peft_model

    from rmexp.config import to_typed
    from rmexp.fsdp import prepare_for_fsdp
    from rmexp.model import build_lora_config, load_reward_model
    from rmexp.prepare import for_training

    class Plugin:
        auto_wrap_policy = param_dtype = None

        def set_mixed_precision(self, dtype, override=False):
            self.param_dtype = dtype

    def peft_model(*overrides):
        cfg = to_typed(compose_cfg("model=tiny", "paths.output_dir=unused", "model.dtype=bfloat16",
                                   "quantization.bnb_4bit_compute_dtype=bfloat16", *overrides))
        model, _, _ = load_reward_model(cfg.model, cfg.quantization)
        return get_peft_model(for_training(model), build_lora_config(cfg.lora))

    plugin = Plugin()
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin))
    with pytest.raises(ValueError, match="bnb_4bit_quant_storage"):
        prepare_for_fsdp(peft_model(), accelerator)  # uint8, the default
    model = peft_model("quantization.bnb_4bit_quant_storage=bfloat16")
    assert prepare_for_fsdp(model, accelerator) == ["base_model.model.score.original_module.weight"]
    assert callable(plugin.auto_wrap_policy) and str(plugin.param_dtype) == "torch.bfloat16"
