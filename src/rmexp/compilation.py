"""`trainer.compile`: the decoder layer's training forward compiled with torch.compile (regional compilation).

One compiled function per decoder-layer class serves every layer of that class (torch.compile traces the
forward with the layer as an input, so its weights are arguments, not constants), with dynamic sequence
lengths, so packed rows of new lengths reuse the graph. What it saves is the work between the matmuls
(norms, rotary, activations, residual adds, casts: fused into a few kernels) and the Python of each layer's
call; the matmuls themselves stay oneDNN's (CPU) or cuBLAS' (CUDA).

The first optimizer step runs eagerly: it fills the 4-bit layers' dequantized copies (trainer.dequant_cache),
which the graph would otherwise trace twice, empty and then filled. The second compiles, once: the first
layer stays eager (its input, the frozen embedding's output, needs no gradient, and a graph of its own would
double the compile time for one layer's saving). Evaluation and scoring stay eager: each would cost a compile
of its own for a few forwards.

`auto` compiles where the run is long enough to win the compile time back: at least `AUTO_MIN_STEPS` planned
optimizer steps (the whole run's, a resumed one's too; none under a time budget, whose clock the compile
would spend), at packed batch 1 or padded batches (a packed batch of several pairs compiles per row layout),
with a compiler present (a C++ compiler on CPU, Triton on CUDA) and without FSDP (not tested
sharded). The break-even was measured on CPU (docs/performance.md: compile time, saving per step); on CUDA
the same rule holds unmeasured.
"""

from __future__ import annotations

import logging
import shutil
from importlib.util import find_spec

import torch

from rmexp._compat import compile_with_constant_floats
from rmexp.config import ConfigError, Switch, switch

log = logging.getLogger(__name__)

# about four times the break-even measured at batch 1: 242 steps, Gemma-3-270M on a 2-core CPU, a 25 s compile
# (docs/performance.md, bench/throughput.py --compile); a GPU's faster steps would need more
AUTO_MIN_STEPS = 1000


def compiler_available(device: torch.device | str) -> bool:
    """Whether torch.compile's default backend (inductor) can build kernels for `device`."""
    kind = torch.device(device).type
    if kind == "cuda":
        return find_spec("triton") is not None
    if kind == "cpu":
        return any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++"))
    return False


def should_compile(setting, planned_steps: int | None, device, fsdp: bool = False, layers: bool = True,
                   packed_batch: int | None = None) -> bool:
    """`trainer.compile` (auto, true, false) for a run of `planned_steps` optimizer steps (None: unknown, as
    under a time budget, whose clock the compile would spend) on `device`, for a model with decoder `layers`,
    training on packed batches of `packed_batch` pairs (None: padded). `true` where it cannot compile is a
    ConfigError; `auto` says why it leaves compilation off."""
    setting = switch(setting, "trainer.compile")
    if setting is Switch.false:
        return False
    # the packed kernel walks each row's segments in Python: the graph unrolls them, so a batch of several
    # pairs compiles a larger graph, and each new row layout compiles anew (eager after torch's recompile limit)
    varying = packed_batch is not None and packed_batch > 1
    if varying and setting is Switch.true:
        log.warning("trainer.compile=true with packed batches of %d pairs: each new row layout compiles anew "
                    "(eager after torch's recompile limit); batch 1 or trainer.batching=padded compile once",
                    packed_batch)
    reason = ("FSDP: not tested sharded" if fsdp else
              "the model has no decoder layers (model.layers or h) to compile" if not layers else
              None if compiler_available(device) else f"no compiler for {torch.device(device).type} "
              "(torch.compile needs a C++ compiler on CPU, Triton on CUDA)")
    if setting is Switch.true:
        if reason:
            raise ConfigError(f"trainer.compile=true: {reason}; set trainer.compile=false")
        return True
    if reason is None and varying:
        reason = f"packed batches of {packed_batch} pairs: each new row layout would compile anew"
    if reason is None and (planned_steps is None or planned_steps < AUTO_MIN_STEPS):
        reason = (f"{planned_steps} planned steps, fewer than the {AUTO_MIN_STEPS} that win the compile time back"
                  if planned_steps is not None else "the planned steps are unknown (a time budget or a stream)")
    log.info("trainer.compile=auto: %s", f"off ({reason})" if reason else f"on ({planned_steps} planned steps)")
    return reason is None


def compiled_forward(own_forward):
    """A decoder layer's forward, compiled while training once `compile_after_first_step` marked the layer warm,
    where its input carries a gradient (every layer but the first, whose input is the frozen embedding's
    output, unless gradient checkpointing asks for input gradients: one graph, not two); eager otherwise.
    The flag flips between steps, not inside one, so a step's recomputation under (non-reentrant) gradient
    checkpointing runs the forward its first pass ran; reentrant checkpointing runs the first pass without
    gradients, eagerly, and recomputes compiled: the same sums to rounding, as any eager-compiled pair."""
    compiled = compile_with_constant_floats(torch.compile(own_forward, dynamic=True))

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        if (getattr(self, WARM, False) and self.training and torch.is_grad_enabled()
                and getattr(hidden, "requires_grad", False)):
            return compiled(self, *args, **kwargs)
        return own_forward(self, *args, **kwargs)

    return forward


WARM = "rmexp_compile_warm"


def compile_after_first_step(layers: list):
    """A TrainerCallback that marks `layers` warm at the end of each optimizer step, so from the first one on, a
    resumed run's too (that step runs eagerly: it fills the 4-bit layers' dequantized copies, so the compiled
    graph never traces the filling)."""
    from transformers import TrainerCallback

    class CompileAfterFirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            for layer in layers:
                setattr(layer, WARM, True)

    return CompileAfterFirstStep()
