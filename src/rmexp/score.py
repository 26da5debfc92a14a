"""Print the reward of one answer: `python -m rmexp.score checkpoint=<dir> question=... answer=...`."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from rmexp.cli_args import parse


@dataclass
class ScoreArgs:
    checkpoint: str = MISSING  # a training run dir or an exported model dir
    question: str = MISSING
    answer: str = MISSING


def main(argv: list[str] | None = None) -> float:
    args = parse(ScoreArgs, argv, usage=__doc__.strip())
    from rmexp.reward_model import RewardModel

    reward = RewardModel.load(args.checkpoint).score(args.question, args.answer)
    print(f"{reward:.6f}")
    return reward


if __name__ == "__main__":
    main()
