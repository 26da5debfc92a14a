"""Export a run as a standalone HF model: `python -m rmexp.export checkpoint=<run dir> output_dir=<dir>`.

The LoRA adapter is merged into the de-quantized base (the very weights it was trained against),
with the trained score head, saved as safetensors in `dtype` (bf16 by default) with the tokenizer.
`AutoModelForSequenceClassification.from_pretrained(output_dir)` loads it (num_labels=1); its
config records, under `rmexp`, the reward mean/std of the run's evaluation and its max_length.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import MISSING

from rmexp.cli_args import parse


@dataclass
class ExportArgs:
    checkpoint: str = MISSING  # a training run dir
    output_dir: str = MISSING
    dtype: str = "bfloat16"
    eval_metrics: str | None = None  # an eval_metrics.json whose reward mean/std to record instead of the run's


def export(checkpoint: str | Path, output_dir: str | Path, dtype: str = "bfloat16",
           eval_metrics: str | Path | None = None) -> Path:
    from peft import PeftModel

    from rmexp.model import load_reward_model, load_tokenizer, reward_head, torch_dtype
    from rmexp.reward_model import read_run_config, reward_stats

    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    cfg = read_run_config(checkpoint)
    base, _, _ = load_reward_model(cfg.model, cfg.quantization)
    if getattr(base, "hf_quantizer", None) is not None:
        base = base.dequantize()  # 4-bit -> the dequantized weights the adapter was trained on
    base = base.float()  # merge in fp32, cast once at the end
    merged = PeftModel.from_pretrained(base, str(checkpoint)).merge_and_unload()
    merged = merged.to(torch_dtype(dtype))
    reward_head(merged).float()  # the head stays fp32 in the file: rewards from fp32 weights
    stats = json.loads(Path(eval_metrics).read_text()) if eval_metrics else reward_stats(checkpoint)
    merged.config.rmexp = {
        "reward_mean": stats.get("reward_mean"), "reward_std": stats.get("reward_std"),
        "max_length": int(cfg.trainer.max_length), "system_prompt": cfg.data.get("system_prompt"),
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


def main(argv: list[str] | None = None) -> Path:
    args = parse(ExportArgs, argv, usage=__doc__.strip())
    out = export(args.checkpoint, args.output_dir, args.dtype, args.eval_metrics)
    print(f"exported {args.checkpoint} -> {out}")
    return out


if __name__ == "__main__":
    main()
