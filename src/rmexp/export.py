"""Export a run as a standalone HF model: `rmexp-export checkpoint=<run dir> output_dir=<dir>`.

The LoRA adapter is merged into the de-quantized base (the very weights it was trained against),
with the trained score head, saved as safetensors in `dtype` (bf16 by default) with the tokenizer.
`AutoModelForSequenceClassification.from_pretrained(output_dir)` loads it (num_labels=1); its
config records, under `rmexp`, the reward mean/std of the run's evaluation and its max_length.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig

from rmexp.config import CONF_PATH, to_typed


def export(checkpoint: str | Path, output_dir: str | Path, dtype: str = "bfloat16",
           eval_metrics: str | Path | None = None) -> Path:
    from peft import PeftModel

    from rmexp._compat import is_quantized
    from rmexp.model import load_reward_model, load_tokenizer, reward_head, torch_dtype
    from rmexp.rundir import read_run_config, reward_stats

    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    cfg = read_run_config(checkpoint)
    base, _, _ = load_reward_model(cfg.model, cfg.quantization)
    if is_quantized(base):
        base = base.dequantize()  # 4-bit -> the dequantized weights the adapter was trained on
    base = base.float()  # merge in fp32, cast once at the end
    merged = PeftModel.from_pretrained(base, str(checkpoint)).merge_and_unload()
    merged = merged.to(torch_dtype(dtype))
    reward_head(merged).float()  # the head stays fp32 in the file: rewards from fp32 weights
    stats = json.loads(Path(eval_metrics).read_text()) if eval_metrics else reward_stats(checkpoint)
    merged.config.rmexp = {
        "reward_mean": stats.get("reward_mean"), "reward_std": stats.get("reward_std"),
        "max_length": int(cfg.trainer.max_length), "system_prompt": cfg.data.system_prompt,
        "source_run": str(checkpoint.resolve()),
        "lora_r": int(cfg.lora.r), "base_model": str(cfg.model.name_or_path),
    }
    if stats.get("reward_mean") is not None and stats.get("reward_std"):
        # OpenRLHF's reward models read these two: (r - mean) / std when it runs with --normalize_reward
        merged.config.mean, merged.config.std = stats["reward_mean"], stats["reward_std"]
    merged.config.num_labels = 1
    output_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(output_dir, safe_serialization=True)
    load_tokenizer(str(checkpoint)).save_pretrained(output_dir)
    return output_dir


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="export")
def cli(cfg: DictConfig) -> Path:
    args = to_typed(cfg)
    out = export(args.checkpoint, args.output_dir, args.dtype, args.eval_metrics)
    print(f"exported {args.checkpoint} -> {out}")
    return out


if __name__ == "__main__":
    cli()
