"""The packed, prefix-shared forward gives every pair the rewards of the plain per-sequence forward."""

from __future__ import annotations

import json
from unittest import mock

import pytest
import torch
from omegaconf import OmegaConf

from conftest import ROOT, KeepModel, compose_cfg, tiny_overrides
from numerics import (
    assert_same_decisions,
    assert_within,
    decided,
    float64_rewards,
    forward_bound,
    rounding_bound,
    training_bound,
)
from rmexp import packing
from rmexp.data import Pair, tokenize_pairs
from rmexp.dataset import read_pairs
from rmexp.model import load_reward_model
from rmexp.packing import (
    PackedPairCollator,
    attention_layout,
    pack_rows,
    packed_rewards,
    packed_sdpa,
)
from rmexp.prepare import upcast_reward_head, use_packed_attention
from rmexp.reward_model import score_sequences
from rmexp.train import main


def fp32_model(name: str):
    cfg = compose_cfg(f"model={name}", "quantization=none", "model.dtype=float32", "data.path=data/preference.jsonl")
    model, tok, _ = load_reward_model(cfg.model, cfg.quantization)
    return upcast_reward_head(model).eval(), tok


def pairs_with_a_long_one(n: int, long_words: int) -> list[Pair]:
    pairs, _ = read_pairs(ROOT / "data" / "preference.jsonl", max_pairs=n)
    story = " ".join(f"The river {i} flows past the old mill and the town." for i in range(long_words))
    return pairs + [Pair(prompt=[{"role": "user", "content": story + " Summarise this."}],
                         chosen="A river runs by a mill.", rejected="I like turtles.")]


def assert_packed_equals_plain(model, tok, pairs, max_length, row_tokens):
    """Plain and packed fp32 rewards, each within fp32's bound of the float64 plain forward's."""
    ds, counts = tokenize_pairs(tok, pairs, max_length)
    assert counts.get("n_truncated", 0) >= 1  # a pair cut by truncation is among them
    examples = [ds[i] for i in range(len(ds))]
    sequences = [list(e["chosen_ids"]) for e in examples] + [list(e["rejected_ids"]) for e in examples]
    exact, size = float64_rewards(model, lambda m: score_sequences(m, sequences, tok.pad_token_id, batch_size=1))
    # the attention sums run over up to max_length tokens, the projections over up to the MLP's width
    bound = forward_bound(model.config, size, max(max_length, model.config.intermediate_size))
    plain = score_sequences(model, sequences, tok.pad_token_id, batch_size=1)
    assert_within(plain, exact, bound, "plain")
    collator = PackedPairCollator.for_model(model, tok.pad_token_id, row_tokens=row_tokens)
    batch = collator(examples)
    assert batch["input_ids"].shape[0] < len(examples)  # several pairs share rows
    # the packed kernel at its threshold (some segments split, some one block), then every segment split
    assert {packing.splits(s) for row in batch["segments"] for s in row} == {True, False}
    for kernel, split_min in (("sdpa with the dense 4D block mask", packing.SPLIT_MIN_SCORES),
                              ("packed kernel", packing.SPLIT_MIN_SCORES), ("packed kernel, every segment split", 0)):
        if kernel.startswith("packed kernel"):
            use_packed_attention(model)
        with torch.no_grad(), mock.patch.object(packing, "SPLIT_MIN_SCORES", split_min):
            chosen, rejected = packed_rewards(model, batch)
        assert_within(torch.cat([chosen, rejected]), exact, bound, kernel)
    # the plain path still works (and agrees) once the model uses the packed kernel
    again = score_sequences(model, sequences, tok.pad_token_id, batch_size=4)
    assert_within(again, exact, bound, "plain after the packed kernel")


@pytest.mark.numerics
def test_packed_forward_equals_plain_forward_tiny():
    model, tok = fp32_model("tiny")
    assert_packed_equals_plain(model, tok, pairs_with_a_long_one(12, 40), max_length=256, row_tokens=700)


@pytest.mark.slow
@pytest.mark.numerics
def test_packed_forward_equals_plain_forward_gemma3_270m():
    """Gemma 3 mixes sliding-window (512) and full layers: a 700-token prompt exercises both masks."""
    model, tok = fp32_model("gemma3_270m")
    assert attention_layout(model.config) == (512, False)
    assert_packed_equals_plain(model, tok, pairs_with_a_long_one(6, 80), max_length=700, row_tokens=1400)


@pytest.mark.numerics
def test_packed_forward_equals_plain_forward_mistral_sliding_window():
    """Mistral-style: one `sliding_window` for every layer and no `layer_types`."""
    from transformers import MistralConfig, MistralForSequenceClassification

    _, tok = fp32_model("tiny")
    config = MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                           sliding_window=16, num_labels=1, pad_token_id=tok.pad_token_id,
                           attn_implementation="sdpa")
    torch.manual_seed(0)
    model = MistralForSequenceClassification(config).eval()
    assert attention_layout(model.config) == (16, True)
    assert_packed_equals_plain(model, tok, pairs_with_a_long_one(6, 10), max_length=96, row_tokens=600)


def test_mask_keeps_answers_apart_and_positions_continue_from_the_prompt():
    ex = {"chosen_ids": [1, 2, 3, 10, 11], "rejected_ids": [1, 2, 3, 20], "prompt_len": 3}
    batch = PackedPairCollator(pad_token_id=0)([ex, ex])
    assert batch["input_ids"].shape == (1, 12)  # two 6-token segments, one row, no padding
    m = batch["attention_mask"][0, 0]
    assert batch["position_ids"][0, :6].tolist() == [0, 1, 2, 3, 4, 3]  # rejected continues at the prompt's end
    assert m[5, :3].all() and not m[5, 3:5].any() and m[5, 5]  # rejected sees prompt and itself, not chosen
    assert m[4, :5].all() and not m[4, 5:].any()  # chosen is causal over prompt + chosen
    assert not m[6:, :6].any()  # the second pair never sees the first
    assert batch["chosen_index"].tolist() == [4, 10] and batch["rejected_index"].tolist() == [5, 11]


# (how the kernel runs, the (queries, keys) of each block it computes): three blocks a segment on CPU; by
# size, with SPLIT_MIN_SCORES 4: three blocks for the segments skipping at least 4 scores split (37, 7 and,
# from 2CR alone, 4), one for the segment skipping 2; one block a segment under torch.compile (a compiled
# layer); SDPA's, as on CUDA, which CPU takes under dropout (1e-12: never drops in these few scores, and
# rescales by 1 + 1e-12, far below fp32's rounding), three blocks a segment
PATHS = {"blocks": [(5, 5), (3, 8), (2, 7), (1, 1), (2, 3), (1, 2), (2, 2), (1, 3), (2, 2), (1, 1)],
         "by size": [(5, 5), (3, 8), (2, 7), (1, 1), (2, 3), (1, 2), (3, 3), (2, 2), (1, 1)],
         "whole segments": [(10, 10), (4, 4), (3, 3), (3, 3)], "sdpa": []}


@pytest.mark.numerics
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("window", [None, 3])
def test_block_wise_attention_equals_sdpa_over_the_whole_mask(window, path, monkeypatch):
    """The packed kernel gives the dense mask's outputs and gradients, with grouped key/value heads, a sliding
    window, an answer cut to nothing and a pair without a prompt, each way it runs."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    examples = [{"chosen_ids": [1, 2, 3, 4, 5, 10, 11, 12], "rejected_ids": [1, 2, 3, 4, 5, 20, 21], "prompt_len": 5},
                {"chosen_ids": [7, 8, 30], "rejected_ids": [7, 8], "prompt_len": 2},  # rejected cut to nothing
                {"chosen_ids": [9, 40, 41], "rejected_ids": [9, 50], "prompt_len": 1},
                {"chosen_ids": [60, 61], "rejected_ids": [70], "prompt_len": 0}]  # no prompt
    batch = PackedPairCollator(pad_token_id=0, row_tokens=14, sliding_window=window, all_sliding=True)(examples)
    rows, width = batch["input_ids"].shape
    assert rows == 2 and batch["segments"] == [[(0, 5, 8, 10), (10, 11, 13, 14)], [(0, 2, 3, 3), (3, 3, 5, 6)]]
    blocks, block_attention = [], packing.block_attention
    monkeypatch.setattr(packing, "block_attention", lambda q, k, *rest: blocks.append((q.shape[2], k.shape[2]))
                        or block_attention(q, k, *rest))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: path == "whole segments")
    assert [packing.skipped_scores(*s) for row in batch["segments"] for s in row] == [37, 7, 2, 4]
    monkeypatch.setattr(packing, "SPLIT_MIN_SCORES", 4 if path == "by size" else 0)
    torch.manual_seed(0)
    q = torch.randn(rows, 4, width, 8, requires_grad=True)
    kv = [torch.randn(rows, 2, width, 8, requires_grad=True) for _ in range(2)]
    module = SimpleNamespace(num_key_value_groups=2, training=True)
    out, _ = packed_sdpa(module, q, *kv, batch["attention_mask"], scaling=0.3, rmexp_segments=batch["segments"],
                         dropout=1e-12 if path == "sdpa" else 0.0)
    assert blocks == PATHS[path]
    dense = F.scaled_dot_product_attention(q, *(t.repeat_interleave(2, dim=1) for t in kv),
                                           attn_mask=batch["attention_mask"], scale=0.3).transpose(1, 2)
    real = batch["input_ids"] != 0
    weights = torch.randn_like(out[real])
    grads = torch.autograd.grad((out[real] * weights).sum(), [q, *kv])
    # the exact outputs and gradients: the dense kernel in float64
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, *kv))
    exact = F.scaled_dot_product_attention(q64, k64.repeat_interleave(2, dim=1), v64.repeat_interleave(2, dim=1),
                                           attn_mask=batch["attention_mask"], scale=0.3).transpose(1, 2)
    exact_grads = torch.autograd.grad((exact[real] * weights.double()).sum(), [q64, k64, v64])
    # Sizes of the terms each result sums, from the float64 attention weights P (by query row): out = P v,
    # dP = dout v^T, dS = P (dP - sum P dP), dq = s dS k, dk = s dS^T q, dv = P^T dout, with |.| on every
    # factor. A score rounded by e (relative to its own terms' size S) moves P by a relative e: x (1 + S)
    qa, ka, va = (t.detach().double().abs() for t in (q, *(t.repeat_interleave(2, dim=1) for t in kv)))
    logits = 0.3 * q64.detach() @ k64.detach().repeat_interleave(2, dim=1).transpose(-1, -2)
    p = torch.nan_to_num(logits.masked_fill(~batch["attention_mask"], float("-inf")).softmax(-1))
    dout = torch.zeros_like(exact.detach())
    dout[real] = weights.double().abs()
    dout = dout.transpose(1, 2)
    d_p = dout @ va.transpose(-1, -2)
    d_s = p * (d_p + (p * d_p).sum(-1, keepdim=True))
    grouped = lambda t: t.unflatten(1, (2, 2)).sum(2)  # noqa: E731 (a key/value head serves 2 query heads)
    sizes = [0.3 * d_s @ ka, grouped(0.3 * d_s.transpose(-1, -2) @ qa), grouped(p.transpose(-1, -2) @ dout)]
    amplify = 1 + (0.3 * qa @ ka.transpose(-1, -2)).masked_fill(~batch["attention_mask"], 0).max()
    # roundings: the score's 8-term dot, softmax (exp, sum, divide), the weighted sum over <= 14 keys, and
    # the backward's 3 more: k=8, n=14
    out_bound = rounding_bound(torch.float32, amplify * (p @ va).transpose(1, 2)[real], 14, k=8)
    assert_within(out[real], exact[real], out_bound, "block-wise")
    assert_within(dense[real], exact[real], out_bound, "dense")
    for g, e, size in zip(grads, exact_grads, sizes, strict=True):
        assert_within(g, e, rounding_bound(torch.float32, amplify * size, 14, k=8), "gradient")


def test_rows_respect_the_token_budget():
    rows = pack_rows([5, 9, 3, 7, 2], row_tokens=10)
    assert sorted(i for r in rows for i in r) == [0, 1, 2, 3, 4]
    assert all(sum([5, 9, 3, 7, 2][i] for i in r) <= 10 for r in rows) and len(rows) == 3


@pytest.mark.numerics
def test_packed_and_padded_training_reach_the_same_accuracy(tmp_path):
    results = {}
    for batching in ("packed", "padded"):
        out = tmp_path / batching
        cfg = compose_cfg(*tiny_overrides(out, f"trainer.batching={batching}", "trainer.bf16=false", "logger=none",
                                          "lora.lora_dropout=0", "quantization=none", "model.dtype=float32"))
        # fp32 throughout and no dropout (its draws depend on the batch shape): the two paths must agree
        main(cfg, callbacks=[probe := KeepModel()])
        results[batching] = json.loads((out / "metrics.json").read_text())
        scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
        results[batching]["rewards"] = torch.tensor([[s["reward_chosen"], s["reward_rejected"]] for s in scores])
    packed, padded = results["packed"], results["padded"]
    bound = training_bound(probe.model, cfg.trainer.max_steps, cfg.trainer.max_length)  # the padded run's model
    assert_within(packed["rewards"], padded["rewards"], bound, "packed vs padded")
    assert_same_decisions(packed["rewards"], padded["rewards"], bound, "packed vs padded")
    # accuracy can differ only on the pairs rounding can flip
    undecided = (~decided(padded["rewards"], bound)).float().mean().item()
    assert abs(packed["pairwise_accuracy"] - padded["pairwise_accuracy"]) <= undecided
    for loss in ("eval_loss", "train_loss"):  # -log sigmoid(margin) moves by at most the margin's error
        assert packed[loss] == pytest.approx(padded[loss], abs=2 * bound), loss
    assert OmegaConf.select(compose_cfg(), "trainer.batching").value == "packed"  # the default
