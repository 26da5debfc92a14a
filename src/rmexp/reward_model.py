"""A trained reward model, loaded for scoring: `RewardModel.load(run_dir or exported_dir)`.

Text is formatted exactly as in training (same chat template, same truncation to the run's
`trainer.max_length`) and scored in right-padded batches.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from rmexp.data import Pair, encode_pair
from rmexp.scoring import score_pairs, score_sequences

RUN_CONFIG = "rmexp_config.yaml"  # the resolved config a run was trained with, written by rmexp.train


def read_run_config(run_dir: str | Path) -> DictConfig:
    run_dir = Path(run_dir)
    for candidate in (run_dir / RUN_CONFIG, run_dir / ".hydra" / "config.yaml"):
        if candidate.is_file():
            return OmegaConf.load(candidate)
    raise FileNotFoundError(f"{run_dir}: not an rmexp run dir (no {RUN_CONFIG} or .hydra/config.yaml)")


def is_run_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


class RewardModel:
    def __init__(self, model, tokenizer, max_length: int, path: str):
        self.model, self.tokenizer, self.max_length, self.path = model.eval(), tokenizer, max_length, path

    @classmethod
    def load(cls, path: str | Path) -> RewardModel:
        """A training run dir (4-bit base + LoRA adapter, as trained) or an exported HF dir."""
        from rmexp.model import load_reward_model, load_tokenizer

        path = Path(path)
        if is_run_dir(path):
            from peft import PeftModel

            cfg = read_run_config(path)
            base, _, _ = load_reward_model(cfg.model, cfg.quantization)
            model = PeftModel.from_pretrained(base, str(path))
            return cls(model, load_tokenizer(str(path)), int(cfg.trainer.max_length), str(path))
        if (path / "config.json").is_file():
            from transformers import AutoModelForSequenceClassification

            model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True)
            info = getattr(model.config, "rmexp", None) or {}
            return cls(model, load_tokenizer(str(path)), int(info.get("max_length", 512)), str(path))
        raise FileNotFoundError(f"{path}: neither an rmexp run dir (adapter_config.json) nor a HF model dir")

    def _sequence(self, question, answer: str) -> list[int]:
        prompt = question if isinstance(question, list) else [{"role": "user", "content": question}]
        enc = encode_pair(self.tokenizer, Pair(prompt=prompt, chosen=answer, rejected=answer), self.max_length)
        return enc.prompt_ids + enc.chosen_ids

    def score(self, question, answer: str) -> float:
        """Reward of one answer; `question` is a string or a list of chat messages."""
        return self.score_batch([(question, answer)])[0]

    def score_batch(self, items, batch_size: int = 8) -> list[float]:
        sequences = [self._sequence(q, a) for q, a in items]
        return score_sequences(self.model, sequences, self.tokenizer.pad_token_id, batch_size).tolist()

    def score_pairs(self, pairs: list[Pair], batch_size: int = 8, progress: bool = False) -> torch.Tensor:
        """Rewards (n x 2: chosen, rejected) of Pairs, with the run's formatting and truncation."""
        encoded = [encode_pair(self.tokenizer, p, self.max_length) for p in pairs]
        return self.score_encoded(encoded, batch_size, progress)

    def score_encoded(self, encoded, batch_size: int = 8, progress: bool = False) -> torch.Tensor:
        """Rewards (n x 2) of `rmexp.data.encode_pair` outputs."""
        return score_pairs(self.model, [e.prompt_ids + e.chosen_ids for e in encoded],
                           [e.prompt_ids + e.rejected_ids for e in encoded], self.tokenizer.pad_token_id,
                           batch_size, progress)

    def info(self) -> dict:
        """What an exported model recorded about itself (reward mean/std, max_length), if anything."""
        return dict(getattr(self.model.config, "rmexp", None) or {}) | {"path": self.path}


def reward_stats(run_dir: Path) -> dict:
    """Reward mean/std of a run's held-out evaluation (metrics.json), for normalising rewards downstream."""
    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    return {k: metrics[k] for k in ("reward_mean", "reward_std", "pairwise_accuracy", "n_eval_pairs") if k in metrics}
