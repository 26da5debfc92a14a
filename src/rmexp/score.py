"""Print the reward of one answer: `rmexp-score checkpoint=<dir> question=... answer=...` (a mean ensemble's dir:
its uncertainty too, on the same line).

`question=` and `answer=` take any text as the shell passes it (Chinese punctuation, quotes, commas,
`${`): it is quoted for Hydra's override grammar before Hydra parses it.
"""

from __future__ import annotations

import re
from pathlib import Path

import hydra
from omegaconf import DictConfig

from rmexp import console
from rmexp.config import CONF_PATH, ScoreConfig, literal, to_typed
from rmexp.rundir import locate

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
    """Print the reward; a mean ensemble's line adds its uncertainty (the members' spread) after it."""
    from rmexp.reward_model import RewardModel

    rm = RewardModel.load(cfg.checkpoint, device=cfg.device)
    reward = rm.score(cfg.question, cfg.answer)
    spread = getattr(rm, "last_uncertainty", None)  # an EnsembleRewardModel's, of this answer
    print(f"{reward:.6f}" if spread is None else
          f"{reward:.6f} uncertainty {float(spread[0]):.6f} (the spread of {len(rm.adapters)} members' standardized "
          "rewards)")
    return reward


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="score")
def app(cfg: DictConfig) -> float:
    with console.reported():
        cfg = to_typed(cfg)
        locate(Path(cfg.checkpoint).expanduser())  # what the path holds, before torch loads
        return score(cfg)


def cli() -> None:
    console.run(app, ScoreConfig, argv_rewrite=quote_free_text)


if __name__ == "__main__":
    cli()
