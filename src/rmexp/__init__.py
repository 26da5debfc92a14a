"""rmexp: train and compare 4-bit QLoRA reward models with Hydra, TRL and W&B."""

__version__ = "0.1.0"
__all__ = ["RewardModel"]


def __getattr__(name: str):
    if name == "RewardModel":  # imported on use, so `import rmexp` stays light
        from rmexp.reward_model import RewardModel

        return RewardModel
    raise AttributeError(f"module 'rmexp' has no attribute {name!r}")
