"""Error bounds for tests that compare two floating-point computations (docs/development.md, "Numerics tests").

A result computed in `dtype` with sums of `n` terms of size up to `magnitude` is off the exact one by at most
`n * eps * magnitude` (Higham, Accuracy and Stability of Numerical Algorithms, 3.1) and, rounding errors being
independent, by `sqrt(n) * eps * magnitude` with overwhelming probability (Higham and Mary, SIAM J. Sci. Comput.
2019): `k` counts the roundings stacked along the computation (layers, ops). Which summation order a CPU takes
(its SIMD width, its thread count, oneDNN's kernel) moves results within that bound and no further.
"""

from __future__ import annotations

import math

import torch


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def rounding_bound(dtype: torch.dtype, magnitude, n: int, k: float = 1.0):
    """k * eps(dtype) * magnitude * sqrt(n): how far a `dtype` result may lie from the exact (float64) one
    (`magnitude` a number, or a tensor: one bound per element)."""
    return k * eps(dtype) * math.sqrt(n) * magnitude


def assert_within(got: torch.Tensor, reference: torch.Tensor, bound: float | torch.Tensor, what: str = "") -> None:
    """|got - reference| <= bound, elementwise where `bound` is a tensor (one per element of the reference)."""
    over = (got.double() - reference.double()).abs() - torch.as_tensor(bound, dtype=torch.float64)
    worst = over.argmax()
    assert over.max() <= 0, (f"{what}: |diff| {(got.double() - reference.double()).abs().flatten()[worst]:.3g} over "
                             f"its bound {torch.as_tensor(bound).double().expand_as(over).flatten()[worst]:.3g}")


def decided(rewards: torch.Tensor, bound: float) -> torch.Tensor:
    """Pairs (rows: chosen, rejected) whose margin exceeds what rounding both rewards by `bound` can flip."""
    return (rewards[:, 0] - rewards[:, 1]).abs() > 2 * bound


def assert_same_decisions(got: torch.Tensor, reference: torch.Tensor, bound: float, what: str = "") -> None:
    """chosen > rejected agrees on every pair the reference decides beyond `bound` (most pairs must be)."""
    sure = decided(reference, bound)
    assert sure.float().mean() >= 0.5, f"{what}: only {int(sure.sum())} of {len(sure)} pairs beyond the bound"
    assert torch.equal((got[sure, 0] > got[sure, 1]), (reference[sure, 0] > reference[sure, 1])), what


def float64_rewards(model, score) -> tuple[torch.Tensor, float]:
    """`score(reference)` on a float64 copy of `model` (the exact rewards, to rounding far below fp32's), and
    the size of the terms the reward head summed: max over tokens of |h| . |w|. Every hidden state off by a
    relative `r` moves a reward by at most r times that. (rmexp's final norm and head compute in fp32 in any
    model, so the reference has their rounding too: forward_bound counts it twice.)"""
    import copy

    from rmexp.model import reward_head

    reference, sizes = copy.deepcopy(model).double(), []
    hook = reward_head(reference).register_forward_hook(
        lambda module, args, out: sizes.append((args[0].double().abs() @ module.weight.double().abs().T).max().item()))
    try:
        rewards = score(reference)
    finally:
        hook.remove()
    return rewards.double(), max(sizes)


def forward_bound(config, magnitude: float, n: int, dtype: torch.dtype = torch.float32) -> float:
    """A decoder's reward in `dtype` against the exact one: ~15 roundings a layer (2 norms, 3 attention and 3 MLP
    projections, rotary, scores, softmax, weighted sum, activation and product, 2 residual adds), 3 more
    (embedding, final norm, head) and the reference's own final norm and head (2), over sums of up to `n` terms
    (sequence length or width)."""
    return rounding_bound(dtype, magnitude, n, k=15 * config.num_hidden_layers + 5)


def head_size(model) -> float:
    """An upper bound on the terms the reward head sums, |h| . |w|, from the weights alone: the final RMSNorm's
    output has rms 1 before its weight g, so by Cauchy-Schwarz |h| . |w| <= ||w|| sqrt(width) max|g|."""
    from rmexp.model import final_norm, reward_head

    weight = reward_head(model).weight.detach().double()
    norm = final_norm(model)
    gain = norm.weight.detach().double() + (1.0 if "Gemma" in type(norm).__name__ else 0.0)  # Gemma: x_hat (1 + w)
    return (weight.norm() * math.sqrt(weight.shape[-1]) * gain.abs().max()).item()


def training_bound(model, steps: int, max_length: int) -> float:
    """How far the rewards of two fp32 trainings of `model` (the trained one) that differ only in rounding may
    end apart (both runs' error, x2): the final forward's rounding (forward_bound), plus each step's, whose
    gradient carries the same relative error into the weights; at a test's rates a step moves a reward by at
    most its own size (lr x curvature << 1: nothing amplifies)."""
    n = max(max_length, model.config.intermediate_size)
    return 2 * (1 + steps) * forward_bound(model.config, head_size(model), n)
