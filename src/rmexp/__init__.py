"""rmexp: train and compare 4-bit QLoRA reward models with Hydra, TRL and W&B."""

__version__ = "0.1.0"
