"""Beyond one node, what CPU can check: the DDP and FSDP-QLoRA recipes compose and type, the 4-bit storage dtype
reaches BitsAndBytesConfig, device_map follows the launcher, the trainer arguments carry the FSDP and DDP
settings (no model loaded), and the DDP recipe trains the tiny model on two CPU processes (slow).
tests/test_fsdp.py wraps the tiny model with FSDP on two CPU processes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, compose_cfg
from rmexp.config import ConfigError, to_typed
from rmexp.model import build_bnb_config, device_map_for, from_pretrained_kwargs, quant_storage_dtype
from rmexp.training_args import build_reward_config

GPUS = 8  # both recipes assume one node of 8 GPUs


def recipe(name: str, *overrides: str):
    return to_typed(compose_cfg(f"experiment={name}", "data.path=data/preference.jsonl", "paths.output_dir=unused",
                                *overrides))


@pytest.fixture
def launch_env(monkeypatch):
    """No FSDP unless a test sets it. Set, not deleted: monkeypatch then restores them, undoing what building FSDP
    trainer arguments exports (FSDP_CPU_RAM_EFFICIENT_LOADING), which later tests and their processes would see."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
    return monkeypatch


@pytest.mark.parametrize("name,model", [("ddp_qlora", "meta-llama/Llama-3.1-8B-Instruct"),
                                        ("fsdp_qlora_70b", "meta-llama/Llama-3.1-70B-Instruct")])
def test_both_recipes_compose_and_type_with_the_global_batch_of_the_seed_recipe(name, model):
    cfg, seed = recipe(name), recipe("seed_llama3_8b")
    assert cfg.model.name_or_path == model
    assert cfg.quantization.load_in_4bit and cfg.quantization.bnb_4bit_quant_type.value == "nf4"
    t = cfg.trainer
    assert t.per_device_train_batch_size * GPUS * t.gradient_accumulation_steps == 16  # as written in each recipe
    assert seed.trainer.per_device_train_batch_size * seed.trainer.gradient_accumulation_steps == 16
    assert t.learning_rate == seed.trainer.learning_rate and t.max_length == seed.trainer.max_length


def test_the_70b_recipe_stores_4bit_weights_in_the_compute_and_model_dtype():
    cfg = recipe("fsdp_qlora_70b")
    bnb = build_bnb_config(cfg.quantization)
    assert bnb.bnb_4bit_quant_storage == bnb.bnb_4bit_compute_dtype == torch.bfloat16
    kwargs = from_pretrained_kwargs(cfg.model, cfg.quantization, fsdp=True)
    assert kwargs["dtype"] == kwargs["quantization_config"].bnb_4bit_quant_storage == torch.bfloat16
    assert bnb.to_dict()["bnb_4bit_quant_storage"] == "bfloat16"  # what the saved model config records


@pytest.mark.parametrize("name,dtype", [("uint8", torch.uint8), ("bfloat16", torch.bfloat16),
                                        ("float16", torch.float16), ("float32", torch.float32)])
def test_quant_storage_names_reach_bitsandbytes_config(name, dtype):
    cfg = to_typed(compose_cfg(f"quantization.bnb_4bit_quant_storage={name}", "paths.output_dir=unused"))
    assert build_bnb_config(cfg.quantization).bnb_4bit_quant_storage == dtype


def test_quant_storage_defaults_to_uint8_auto_follows_compute_and_a_bad_name_fails_naming_the_key():
    cfg = to_typed(compose_cfg("paths.output_dir=unused"))
    assert cfg.quantization.bnb_4bit_quant_storage == "uint8"
    assert build_bnb_config(cfg.quantization).bnb_4bit_quant_storage == torch.uint8  # HF's default, as before
    cfg.quantization.bnb_4bit_compute_dtype = "float16"
    cfg.quantization.bnb_4bit_quant_storage = "auto"
    assert quant_storage_dtype(cfg.quantization) == torch.float16
    with pytest.raises(ConfigError, match="quantization.bnb_4bit_quant_storage"):
        to_typed(compose_cfg("quantization.bnb_4bit_quant_storage=int4", "paths.output_dir=unused"))


def test_a_run_saved_before_the_storage_key_loads_with_uint8(tmp_path):
    from omegaconf import OmegaConf

    from rmexp.rundir import RUN_CONFIG, read_run_config, write_run_config

    cfg = to_typed(compose_cfg("data.path=data/preference.jsonl", f"paths.output_dir={tmp_path}"))
    write_run_config(tmp_path, OmegaConf.to_container(OmegaConf.structured(cfg), resolve=False, enum_to_str=True))
    old = OmegaConf.load(tmp_path / RUN_CONFIG)
    del old.quantization["bnb_4bit_quant_storage"]
    OmegaConf.save(old, tmp_path / RUN_CONFIG)
    assert read_run_config(tmp_path).quantization.bnb_4bit_quant_storage == "uint8"


def test_device_map_is_per_rank_under_ddp_and_none_under_fsdp(launch_env):
    launch_env.setenv("LOCAL_RANK", "3")  # rank 3 of a torchrun / accelerate launch
    ddp, fsdp = recipe("ddp_qlora"), recipe("fsdp_qlora_70b")
    ddp_bnb, fsdp_bnb = build_bnb_config(ddp.quantization), build_bnb_config(fsdp.quantization)
    assert device_map_for(ddp_bnb, cuda=True) == {"": 3}  # each rank its whole 4-bit copy on its own GPU
    assert device_map_for(None, cuda=True) is None and device_map_for(ddp_bnb, cuda=False) is None
    launch_env.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch exports for an FSDP config
    assert device_map_for(fsdp_bnb, cuda=True) is None and device_map_for(ddp_bnb, cuda=True) is None
    assert from_pretrained_kwargs(fsdp.model, fsdp.quantization)["device_map"] is None


def test_fsdp_refuses_4bit_weights_stored_apart_from_the_model_dtype(launch_env):
    launch_env.setenv("ACCELERATE_USE_FSDP", "true")
    seed = recipe("seed_llama3_8b")  # uint8 storage, bf16 model
    with pytest.raises(ValueError, match="bnb_4bit_quant_storage"):
        from_pretrained_kwargs(seed.model, seed.quantization)
    fixed = recipe("seed_llama3_8b", "quantization.bnb_4bit_quant_storage=bfloat16")
    assert from_pretrained_kwargs(fixed.model, fixed.quantization)["device_map"] is None


def test_the_fsdp_recipe_reaches_the_trainer_arguments(launch_env, tmp_path):
    cfg = recipe("fsdp_qlora_70b")
    args = build_reward_config(cfg.trainer, tmp_path, "none")
    plugin = args.fsdp_plugin_args  # what transformers gives accelerate's FullyShardedDataParallelPlugin
    assert args.fsdp and plugin["fsdp_version"] == 1 and plugin["use_orig_params"] is False
    assert plugin["cpu_ram_efficient_loading"] and plugin["sync_module_states"]
    assert plugin["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and plugin["reshard_after_forward"] == "full_shard"
    assert plugin["state_dict_type"] == "FULL_STATE_DICT" and not plugin.get("cpu_offload")
    assert args.activation_checkpointing and args.activation_checkpointing_kwargs == {"use_reentrant": True}
    assert args.bf16
    t = cfg.trainer  # the speed paths that cannot run sharded are off (rmexp.fsdp)
    assert t.batching.value == "padded" and not t.fused_lora and str(t.dequant_cache).lower() == "false"


def test_the_ddp_recipe_reaches_the_trainer_arguments(launch_env, tmp_path):
    cfg = recipe("ddp_qlora")
    args = build_reward_config(cfg.trainer, tmp_path, "none")
    assert args.ddp_find_unused_parameters is False and not args.fsdp
    assert args.activation_checkpointing
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2, 1)


def test_the_accelerate_file_and_the_recipe_set_fsdp_alike():
    launcher = yaml.safe_load((ROOT / "conf/accelerate/fsdp_qlora.yaml").read_text())
    assert launcher["distributed_type"] == "FSDP" and launcher["num_processes"] == GPUS
    trainer = recipe("fsdp_qlora_70b").trainer.extra["fsdp_config"]
    # accelerate's names -> TrainingArguments.fsdp_config's
    renamed = {"fsdp_version": "version", "fsdp_offload_params": "cpu_offload", "fsdp_sharding_strategy": "reshard_after_forward"}
    for key, value in launcher["fsdp_config"].items():
        name = renamed.get(key, key.removeprefix("fsdp_"))
        assert str(trainer[name]).lower() == str(value).lower(), key


def test_the_trainer_turns_off_what_cannot_run_sharded(caplog):
    from rmexp.fsdp import check_fsdp_batching, fsdp_speed_options
    from rmexp.packing import PackedPairCollator

    with caplog.at_level(logging.WARNING, logger="rmexp.fsdp"):
        assert fsdp_speed_options(True, "auto") == (False, "false")
    assert "trainer.fused_lora" in caplog.text and "dequant_cache" not in caplog.text  # auto is no request
    assert fsdp_speed_options(False, "false") == (False, "false")
    with pytest.raises(ValueError, match="trainer.batching=padded"):
        check_fsdp_batching(PackedPairCollator(pad_token_id=0))
    check_fsdp_batching(None)  # TRL's padded collator


def test_the_docs_give_both_launch_commands():
    readme = Path(ROOT / "docs" / "distributed.md").read_text()
    assert "torchrun --standalone --nproc_per_node 8 -m rmexp.train experiment=ddp_qlora" in readme
    assert "accelerate launch --config_file conf/accelerate/fsdp_qlora.yaml -m rmexp.train experiment=fsdp_qlora_70b" in readme


@pytest.mark.slow
def test_the_ddp_recipe_trains_on_two_cpu_processes(tmp_path):
    """experiment=ddp_qlora's settings (find_unused_parameters off, gradient checkpointing on, batch 2 a rank)
    on the tiny model under torchrun: gloo, 6 steps."""
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "rmexp.train", "experiment=ddp_qlora",
                           "model=tiny", "logger=none",
                           f"data.path={ROOT / 'data/preference.jsonl'}", "trainer.max_steps=6", "trainer.eval_steps=3",
                           "trainer.save_steps=6", "trainer.learning_rate=5e-3", "trainer.max_length=256",
                           f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["global_step"] == 6
    saved = yaml.safe_load((tmp_path / "rmexp_config.yaml").read_text())
    assert saved["trainer"]["extra"] == {"ddp_find_unused_parameters": False}
    assert (tmp_path / "adapter_model.safetensors").is_file()
