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
