"""rmexp: train and compare 4-bit QLoRA reward models with Hydra, TRL and W&B."""

import logging
import warnings

__version__ = "0.1.0"
__all__ = ["RewardModel"]

# bitsandbytes warns at import, on every CPU with AVX512-BF16, that the optional `kernels` package (a
# CPU inference kernel fetched from the hub) is missing, and falls back to its own kernel: nothing to
# act on, and no hub here. Training never takes that path (rmexp.prepare.keep_4bit_layers_trainable).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` inside get_peft_model: a
# warning for peft's authors, printed before every run; rmexp itself uses the new names.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def __getattr__(name: str):
    if name == "RewardModel":  # imported on use, so `import rmexp` stays light
        from rmexp.reward_model import RewardModel

        return RewardModel
    raise AttributeError(f"module 'rmexp' has no attribute {name!r}")
