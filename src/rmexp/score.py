"""Print the reward of one answer: `rmexp-score checkpoint=<dir> question=... answer=...`.

`question=` and `answer=` take any text as the shell passes it (Chinese punctuation, quotes, commas,
`${`): it is quoted for Hydra's override grammar before Hydra parses it.
"""

from __future__ import annotations

import re
import sys

import hydra
from omegaconf import DictConfig

from rmexp.config import CONF_PATH, ScoreConfig, literal, to_typed

FREE_TEXT = ("question", "answer")


def quote_free_text(argv: list[str]) -> list[str]:
    """`question=<text>` -> `question='<text>'` in Hydra's quoting: a quote and the backslashes before
    it (or at the end) escaped, `${` kept literal."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in FREE_TEXT:
            value = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
            value = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, value)
            value = literal(value)  # `${` stays text
            arg = f"{key}='{value}'"
        out.append(arg)
    return out


def score(cfg: ScoreConfig) -> float:
    from rmexp.reward_model import RewardModel

    reward = RewardModel.load(cfg.checkpoint).score(cfg.question, cfg.answer)
    print(f"{reward:.6f}")
    return reward


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="score")
def _hydra_cli(cfg: DictConfig) -> float:
    return score(to_typed(cfg))


def cli() -> None:
    sys.argv[1:] = quote_free_text(sys.argv[1:])
    _hydra_cli()


if __name__ == "__main__":
    cli()
