"""One rank of tests/test_fsdp.py's FSDP-QLoRA run on CPU:
`torchrun --nproc_per_node 2 tests/fsdp_worker.py OUT DTYPE [fused_rms_norm]`.

The tiny model is loaded as under `accelerate launch --config_file conf/accelerate/fsdp_qlora.yaml` (nf4 stored
in DTYPE, the model and its compute in DTYPE: bfloat16 as in the recipe, or float32 to compare exactly), LoRA'd
as TRL does, readied by rmexp.fsdp.prepare_for_fsdp and wrapped by FSDP1 as transformers' Trainer wraps it
(peft's wrap policy, mixed precision in the storage dtype, flat parameters, full shard, reentrant
checkpointing), on gloo. accelerate's FSDP plugin itself wants a GPU, so FSDP is called directly. Each rank
computes TRL's padded Bradley-Terry loss on its half of a batch; the sharded gradients, gathered, must equal
those of the whole batch computed by the unwrapped model before wrapping. Rank 0 writes OUT (JSON).
"""

from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F

from conftest import ROOT, compose_cfg


class FakeFSDPPlugin:
    """What `update_fsdp_plugin_peft` sets on accelerate's FSDP plugin."""

    auto_wrap_policy = None
    param_dtype = None

    def set_mixed_precision(self, dtype, override=False):
        self.param_dtype = dtype


def batch_halves(tok):
    """Two batches of two pairs each (one per rank) as TRL's padded collator makes them (trainer.batching=padded,
    the FSDP recipe's): the chosen sequences, then the rejected, right-padded."""
    texts = [("What colour is the sky?", "Blue.", "Green, always."), ("2 + 2 =", "4", "5"),
             ("天空是什么颜色？", "蓝色。", "绿色。"), ("Name a fruit.", "An apple.", "A chair.")]
    halves = []
    for part in (texts[:2], texts[2:]):
        seqs = [tok(p + " " + c)["input_ids"] for p, c, _ in part] + [tok(p + " " + r)["input_ids"] for p, _, r in part]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        halves.append({"input_ids": ids, "attention_mask": mask})
    return halves


def loss_of(model, batch):
    """TRL's RewardTrainer.compute_loss: Bradley-Terry on the model's pooled rewards."""
    chosen, rejected = model(**batch, use_cache=False).logits.squeeze(-1).float().chunk(2)
    return -F.logsigmoid(chosen - rejected).mean()


def gathered_grads(wrapped, fsdp_cls) -> dict[str, torch.Tensor]:
    """Each trainable parameter's whole gradient, by its unwrapped name, from FSDP1's sharded flat gradients
    (FSDP's own `summon_full_params(with_grads=True)` does not take `use_orig_params=False`)."""
    grads = {}
    for prefix, module in wrapped.named_modules():
        flat = getattr(getattr(module, "_handle", None), "flat_param", None) if isinstance(module, fsdp_cls) else None
        if flat is None or not flat.requires_grad:
            continue
        assert not any(flat._is_padding_mask)  # no alignment padding without use_orig_params: params end to end
        pieces = [torch.empty_like(flat.grad) for _ in range(dist.get_world_size())]
        dist.all_gather(pieces, flat.grad.contiguous())
        full, offset = torch.cat(pieces).float(), 0
        for fqn, shape, numel in zip(flat._fqns, flat._shapes, flat._numels, strict=True):
            name = f"{prefix}.{fqn}" if prefix else fqn
            grads[name.replace("_fsdp_wrapped_module.", "")] = full[offset:offset + numel].view(shape)
            offset += numel
    return grads


def main(out: str, dtype: str, fused_rms_norm: bool) -> None:
    from peft import get_peft_model
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import MixedPrecision, ShardingStrategy

    from rmexp.config import to_typed
    from rmexp.fsdp import prepare_for_fsdp
    from rmexp.model import build_lora_config, from_pretrained_kwargs, load_reward_model
    from rmexp.prepare import for_training, fuse_rms_norms

    # as accelerate launch with conf/accelerate/fsdp_qlora.yaml sets them; rmexp.train starts the process group
    # (building the datasets) before it loads the model
    os.environ.update(ACCELERATE_USE_FSDP="true", FSDP_CPU_RAM_EFFICIENT_LOADING="true")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = to_typed(compose_cfg("model=tiny", f"data.path={ROOT / 'data/preference.jsonl'}", "paths.output_dir=unused",
                               f"model.dtype={dtype}", f"quantization.bnb_4bit_compute_dtype={dtype}",
                               "quantization.bnb_4bit_quant_storage=auto"))
    result = {"device_map": from_pretrained_kwargs(cfg.model, cfg.quantization)["device_map"]}
    torch.manual_seed(0)
    model, tok, _ = load_reward_model(cfg.model, cfg.quantization)
    model = get_peft_model(for_training(model), build_lora_config(cfg.lora))  # the fp32 head, 4-bit kept trainable
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.data = param.data.float()  # as PairwiseRewardTrainer keeps them
            if "lora_B" in name:  # peft starts B at zero, which leaves A without a gradient to compare
                torch.nn.init.normal_(param, std=0.05)
    # With cpu_ram_efficient_loading transformers leaves the new head uninitialized on ranks > 0 (so the LoRA
    # weights drawn next differ too): FSDP's sync_module_states (the recipe's) sends rank 0's parameters and
    # buffers to every rank when it wraps the model. It wants a GPU, so it is done here, before the reference.
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=0)
    if fused_rms_norm:
        result["fused_norms"] = fuse_rms_norms(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    model.train()
    halves = batch_halves(tok)

    # peft casts a LoRA layer's input to the adapter's dtype unless CUDA autocast is on; on CUDA it is (bf16
    # training), so let peft see CPU autocast as it would see CUDA's
    is_autocast = torch.is_autocast_enabled
    torch.is_autocast_enabled = lambda *a: is_autocast(*a) if a else is_autocast("cpu")

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")  # as trainer.bf16
    with autocast:  # the reference: the whole batch, unwrapped
        ((loss_of(model, halves[0]) + loss_of(model, halves[1])) / 2).backward()
    reference = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    plugin = FakeFSDPPlugin()
    result["cast"] = prepare_for_fsdp(model, SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)))
    result["param_dtype"] = str(plugin.param_dtype)
    mp = MixedPrecision(param_dtype=plugin.param_dtype, reduce_dtype=plugin.param_dtype, buffer_dtype=plugin.param_dtype)
    wrapped = FSDP(model, auto_wrap_policy=plugin.auto_wrap_policy, use_orig_params=False, mixed_precision=mp,
                   sharding_strategy=ShardingStrategy.FULL_SHARD, device_id=torch.device("cpu"))
    result["n_fsdp_units"] = sum(isinstance(m, FSDP) for m in wrapped.modules())
    with autocast:
        loss_of(wrapped, halves[rank]).backward()
    sharded = gathered_grads(wrapped, FSDP)
    result["missing"] = sorted(set(reference) - set(sharded))
    diffs = {n: float((sharded[n] - g).norm() / g.norm()) for n, g in reference.items() if n in sharded}
    result["max_rel_diff"], result["worst"] = max(diffs.values()), max(diffs, key=diffs.get)
    result["n_trainable"] = len(reference)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.chdir(ROOT)
    main(sys.argv[1], sys.argv[2], "fused_rms_norm" in sys.argv[3:])
