"""Packed scoring (prompt once, many segments to a row) gives the padded forward's rewards, in input order."""

from __future__ import annotations

import pytest
import torch

from conftest import ROOT, compose_cfg
from numerics import assert_same_decisions, assert_within, float64_rewards, forward_bound
from rmexp import RewardModel
from rmexp.data import Pair
from rmexp.dataset import read_pairs
from rmexp.model import load_reward_model


@pytest.fixture(scope="module")
def fp32_tiny():
    cfg = compose_cfg("model=tiny", "quantization=none", "model.dtype=float32", "data.path=data/preference.jsonl")
    torch.manual_seed(0)
    model, tok, _ = load_reward_model(cfg.model, cfg.quantization)
    return model.eval(), tok


def mixed_pairs() -> list[Pair]:
    pairs, _ = read_pairs(ROOT / "data" / "preference.jsonl", max_pairs=30)
    story = " ".join(f"Line {i} of a long story about a lighthouse keeper." for i in range(40))
    return pairs + [Pair(prompt=[{"role": "user", "content": story}], chosen="A keeper's story.", rejected="No.")]


@pytest.mark.numerics
def test_packed_pairs_and_answers_equal_the_padded_forward_in_fp32(fp32_tiny):
    model, tok = fp32_tiny
    packed = RewardModel(model, tok, 128, "tiny", packed=True, row_tokens=300)
    padded = RewardModel(model, tok, 128, "tiny", packed=False)
    assert packed.packed and not padded.packed
    pairs = mixed_pairs()  # mixed lengths (packing sorts them), one cut by truncation
    exact, size = float64_rewards(model, lambda m: RewardModel(m, tok, 128, "tiny", packed=False).score_pairs(pairs))
    bound = forward_bound(model.config, size, 128)  # sums over up to 128 tokens and the MLP's 128-wide projection
    got, expected = packed.score_pairs(pairs), padded.score_pairs(pairs, batch_size=4)
    assert got.shape == (len(pairs), 2)
    for name, rewards in (("packed", got), ("padded", expected)):
        assert_within(rewards, exact, bound, name)
        assert_same_decisions(rewards, exact, bound, name)
    assert (got[:, 0] != got[:, 1]).all()  # no ties in fp32
    items = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in reversed(pairs)]
    singles, singles_padded = packed.score_batch(items), padded.score_batch(items)
    exact_items = torch.cat([exact[:, 0], exact[:, 1].flip(0)])
    for name, rewards in (("packed answers", singles), ("padded answers", singles_padded)):
        assert_within(torch.tensor(rewards), exact_items, bound, name)
