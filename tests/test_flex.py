"""trainer.attention=flex (rmexp.flex): one flex_attention call a layer, with a BlockMask built from the collator's
segments, gives the segment walk's attention, gradients and rewards; `auto` takes it on CUDA only.

On this CPU flex runs torch's unfused flex_attention reference (torch 2.13 has no CPU flex_attention backward);
on CUDA the same BlockMask goes to the compiled kernel, which computes only the blocks the mask lists and skips
the mask inside the blocks it marks full: `test_the_block_mask_lists_every_allowed_block` holds those two sets to
the dense mask, so what the GPU skips is what the mask forbids.
"""

from __future__ import annotations

import copy
import json
import random
from types import SimpleNamespace

import pytest
import torch

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
from rmexp import compilation, flex, packing, prepare
from rmexp._compat import attn_implementation
from rmexp.config import ConfigError
from rmexp.packing import (
    PACKED_ATTENTION,
    PACKED_FLEX_ATTENTION,
    PackedPairCollator,
    packed_rewards,
    packed_sdpa,
)

# four pairs in two rows of 14 tokens: a rejected answer cut to nothing, a one-token prompt, a pair without a prompt
EXAMPLES = [{"chosen_ids": [1, 2, 3, 4, 5, 10, 11, 12], "rejected_ids": [1, 2, 3, 4, 5, 20, 21], "prompt_len": 5},
            {"chosen_ids": [7, 8, 30], "rejected_ids": [7, 8], "prompt_len": 2},
            {"chosen_ids": [9, 40, 41], "rejected_ids": [9, 50], "prompt_len": 1},
            {"chosen_ids": [60, 61], "rejected_ids": [70], "prompt_len": 0}]


def random_examples(n: int, seed: int = 0) -> list[dict]:
    """`n` pairs of random prompt and answer lengths (0-60 prompt tokens, 0-40 per answer, at least one token)."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        p, c, r = rng.randint(0, 60), rng.randint(0, 40), rng.randint(0, 40)
        c = max(c, 1 - p - r)
        prompt = [rng.randint(1, 99) for _ in range(p)]
        examples.append({"chosen_ids": prompt + [rng.randint(1, 99) for _ in range(c)],
                         "rejected_ids": prompt + [rng.randint(1, 99) for _ in range(r)], "prompt_len": p})
    return examples


def dense_masks(batch) -> dict:
    """The collator's dense masks by layer type (the one mask under the key of the only layer type there is)."""
    mask = packing.model_mask(batch)
    return mask if isinstance(mask, dict) else {"only": mask}


def block_masks_by_type(batch, window, all_sliding, **kwargs) -> dict:
    masks = flex.block_masks(batch, window, all_sliding, **kwargs)
    return masks if isinstance(masks, dict) else {"only": masks}


LAYOUTS = [  # (examples, row tokens, sliding window, every layer slides)
    pytest.param(EXAMPLES, 14, None, False, id="pairs"),
    pytest.param(EXAMPLES, 14, 3, True, id="pairs, every layer slides"),
    pytest.param(EXAMPLES, 14, 3, False, id="pairs, sliding and full layers"),
    pytest.param([{"input_ids": e["chosen_ids"]} for e in EXAMPLES], 9, 2, False, id="single answers"),
    pytest.param(random_examples(24), 400, 32, False, id="24 random pairs, 400-token rows"),
]


@pytest.mark.parametrize("examples,row_tokens,window,all_sliding", LAYOUTS)
def test_the_mask_mod_is_the_collators_mask(examples, row_tokens, window, all_sliding):
    """The BlockMask's mask_mod, evaluated at every (query, key), is the collator's dense mask, entry for entry."""
    from torch.nn.attention.flex_attention import create_mask

    batch = PackedPairCollator(pad_token_id=0, row_tokens=row_tokens, sliding_window=window,
                               all_sliding=all_sliding)(examples)
    rows, width = batch["input_ids"].shape
    assert rows >= 2  # several rows, each of several segments
    dense, blocks = dense_masks(batch), block_masks_by_type(batch, window, all_sliding)
    assert dense.keys() == blocks.keys()
    for layer_type, mask in dense.items():
        got = create_mask(blocks[layer_type].mask_mod, rows, 1, width, width, device="cpu")
        assert torch.equal(got, mask), layer_type
    assert flex.block_masks(batch, window, all_sliding) is flex.block_masks(batch, window, all_sliding)  # cached


@pytest.mark.parametrize("block_size", [4, 128])
@pytest.mark.parametrize("examples,row_tokens,window,all_sliding", LAYOUTS)
def test_the_block_mask_lists_every_allowed_block(examples, row_tokens, window, all_sliding, block_size):
    """The blocks the GPU kernel computes are exactly those holding an allowed score, and the blocks it computes
    without evaluating the mask ("full") hold nothing but allowed scores."""
    from torch.nn.attention.flex_attention import BlockMask

    batch = PackedPairCollator(pad_token_id=0, row_tokens=row_tokens, sliding_window=window,
                               all_sliding=all_sliding)(examples)
    rows, width = batch["input_ids"].shape
    n = -(-width // block_size)
    inside = torch.arange(n * block_size) < width
    inside = (inside[:, None] & inside[None, :]).view(n, block_size, n, block_size)  # entries within the rows
    for layer_type, mask in dense_masks(batch).items():
        window_here = window if layer_type == "sliding_attention" or (layer_type == "only" and all_sliding) else None
        block_mask = flex.packed_block_mask(batch["segments"], batch["position_ids"], window_here, block_size)
        tiles = torch.zeros(rows, 1, n * block_size, n * block_size, dtype=torch.bool)
        tiles[..., :width, :width] = mask
        tiles = tiles.view(rows, 1, n, block_size, n, block_size)
        listed = block_mask.to_dense().bool()
        assert torch.equal(listed, tiles.any(5).any(3)), layer_type  # computed iff it holds an allowed score
        full = BlockMask.from_kv_blocks(block_mask.full_kv_num_blocks, block_mask.full_kv_indices,
                                        BLOCK_SIZE=block_size).to_dense().bool()
        every = (tiles | ~inside).all(5).all(3)  # every entry inside the rows allowed
        assert not (full & ~every).any(), layer_type  # a full block's mask is never evaluated: it must allow all
        assert torch.equal(full, tiles.all(5).all(3)), layer_type  # and every block that allows all is full


def attention_bounds(q, kv, mask, scale, real, dout, group):
    """fp32 rounding bounds of the attention's output and of its q, k, v gradients (per element), from the float64
    attention weights P and the sizes of the terms each result sums: out = P v, dP = dout v^T,
    dS = P (dP - sum P dP), dq = s dS k, dk = s dS^T q, dv = P^T dout, with |.| on every factor; a score rounded
    by e relative to its terms' size S moves P by a relative e: x (1 + max S). Roundings: the score's dot over the
    head dim, softmax (exp, sum, divide), the weighted sum over at most n keys, and the backward's 3 more: k=8."""
    qa, ka, va = (t.detach().double().abs() for t in (q, *(t.repeat_interleave(group, dim=1) for t in kv)))
    logits = scale * q.detach().double() @ kv[0].detach().double().repeat_interleave(group, dim=1).transpose(-1, -2)
    p = logits.masked_fill(~mask, float("-inf")).softmax(-1)
    d_p = dout @ va.transpose(-1, -2)
    d_s = p * (d_p + (p * d_p).sum(-1, keepdim=True))
    grouped = lambda t: t.unflatten(1, (-1, group)).sum(2)  # noqa: E731 (a key/value head serves `group` heads)
    sizes = [scale * d_s @ ka, grouped(scale * d_s.transpose(-1, -2) @ qa), grouped(p.transpose(-1, -2) @ dout)]
    amplify = 1 + (scale * qa @ ka.transpose(-1, -2)).masked_fill(~mask, 0).max()
    n = mask.shape[-1]
    out = rounding_bound(torch.float32, amplify * (p @ va).transpose(1, 2)[real], n, k=8)
    return out, [rounding_bound(torch.float32, amplify * s, n, k=8) for s in sizes]


@pytest.mark.numerics
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # the public call, below
def test_flex_equals_the_segment_walk_and_float64(window):
    """Outputs and gradients of the flex kernel and of the segment walk, on random q, k, v of the collator's
    layout (two rows of several pairs, 4 query heads sharing 2 key/value heads, a sliding window, an answer cut
    to nothing, a pair without a prompt), each within fp32's rounding bound of a float64 masked softmax."""
    batch = PackedPairCollator(pad_token_id=0, row_tokens=14, sliding_window=window, all_sliding=True)(EXAMPLES)
    rows, width = batch["input_ids"].shape
    mask = batch["attention_mask"]
    torch.manual_seed(0)
    q = torch.randn(rows, 4, width, 8, requires_grad=True)
    kv = [torch.randn(rows, 2, width, 8, requires_grad=True) for _ in range(2)]
    real = batch["input_ids"] != 0
    weights = torch.randn(int(real.sum()), 4, 8)
    module = SimpleNamespace(num_key_value_groups=2, training=True)
    results = {}
    for name, kernel, attention_mask in (("flex", flex.packed_flex, flex.block_masks(batch, window, True)),
                                         ("segments", packed_sdpa, mask)):
        out, _ = kernel(module, q, *kv, attention_mask, scaling=0.3, rmexp_segments=batch["segments"])
        results[name] = out[real], torch.autograd.grad((out[real] * weights).sum(), [q, *kv])
    # the exact outputs and gradients: the masked softmax written out in float64
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, *kv))
    logits = 0.3 * q64 @ k64.repeat_interleave(2, dim=1).transpose(-1, -2)
    exact = (logits.masked_fill(~mask, float("-inf")).softmax(-1) @ v64.repeat_interleave(2, dim=1)).transpose(1, 2)
    exact_grads = torch.autograd.grad((exact[real] * weights.double()).sum(), [q64, k64, v64])
    dout = torch.zeros(rows, width, 4, 8, dtype=torch.float64)
    dout[real] = weights.double().abs()
    out_bound, grad_bounds = attention_bounds(q, kv, mask, 0.3, real, dout.transpose(1, 2), group=2)
    for name, (out, grads) in results.items():
        assert_within(out, exact[real], out_bound, name)
        for g, e, bound, what in zip(grads, exact_grads, grad_bounds, "qkv", strict=True):
            assert_within(g, e, bound, f"{name}: gradient of {what}")
    # what CUDA calls: the public flex_attention (enable_gqa, no gradient: torch 2.13 has none on CPU), here its
    # uncompiled reference, with the same BlockMask
    from torch.nn.attention.flex_attention import flex_attention

    public = flex_attention(q.detach(), *(t.detach() for t in kv), block_mask=flex.block_masks(batch, window, True),
                            scale=0.3, enable_gqa=True).transpose(1, 2)
    assert_within(public[real], exact[real], out_bound, "public flex_attention")


# ---------------------------------------------------------------- the model


def fp32_tiny():
    from rmexp.model import load_reward_model

    cfg = compose_cfg("model=tiny", "quantization=none", "model.dtype=float32", "data.path=data/preference.jsonl")
    model, tok, _ = load_reward_model(cfg.model, cfg.quantization)
    return prepare.upcast_reward_head(model).eval(), tok


def small_model(arch: str, tok):
    """A random 2-layer model of `arch`'s attention layout: the tiny Llama's grouped heads, Gemma 3's sliding and
    full layers (window 16), Mistral's one window for every layer."""
    from transformers import (
        Gemma3TextConfig,
        Gemma3TextForSequenceClassification,
        MistralConfig,
        MistralForSequenceClassification,
    )

    shape = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024, num_labels=1, pad_token_id=tok.pad_token_id,
                 attn_implementation="sdpa")
    torch.manual_seed(0)
    if arch == "gemma3":
        config = Gemma3TextConfig(**shape, head_dim=16, sliding_window=16,
                                  layer_types=["sliding_attention", "full_attention"])
        model = Gemma3TextForSequenceClassification(config)
    else:
        model = MistralForSequenceClassification(MistralConfig(**shape, sliding_window=16))
    return prepare.upcast_reward_head(model).eval()


def model_examples(tok, max_length: int = 256) -> list[dict]:
    """12 sample pairs, one with a long prompt cut by truncation, and a pair without a prompt."""
    from rmexp.data import Pair, tokenize_pairs
    from rmexp.dataset import read_pairs

    pairs, _ = read_pairs(ROOT / "data" / "preference.jsonl", max_pairs=12)
    story = " ".join(f"The river {i} flows past the old mill and the town." for i in range(40))
    pairs.append(Pair(prompt=[{"role": "user", "content": story + " Summarise this."}],
                      chosen="A river runs by a mill.", rejected="I like turtles."))
    ds, counts = tokenize_pairs(tok, pairs, max_length)
    assert counts.get("n_truncated", 0) >= 1
    examples = [dict(ds[i]) for i in range(len(ds))]
    first = examples[0]
    answer = list(first["chosen_ids"][first["prompt_len"]:])
    examples.append({"chosen_ids": answer, "rejected_ids": answer[:3], "prompt_len": 0})
    return examples


@pytest.mark.numerics
@pytest.mark.parametrize("arch", ["tiny", "gemma3", "mistral"])
def test_flex_rewards_and_a_training_step_equal_the_segment_walk(arch):
    """Rewards of packed rows (several pairs a row, a truncated pair, a pair without a prompt) with each kernel
    within fp32's bound of the float64 per-sequence forward; one SGD step on each kernel's gradients leaves
    rewards within the bound two such trainings may differ by (numerics.training_bound), while it moves them by
    far more than that."""
    from rmexp.loss import bradley_terry
    from rmexp.reward_model import score_sequences

    model, tok = fp32_tiny()
    if arch != "tiny":
        model = small_model(arch, tok)
    examples = model_examples(tok)
    sequences = [list(e["chosen_ids"]) for e in examples] + [list(e["rejected_ids"]) for e in examples]
    exact, size = float64_rewards(model, lambda m: score_sequences(m, sequences, tok.pad_token_id, batch_size=1))
    bound = forward_bound(model.config, size, max(256, model.config.intermediate_size))
    collator = PackedPairCollator.for_model(model, tok.pad_token_id, row_tokens=700)
    assert (collator.sliding_window, collator.all_sliding) == {"tiny": (None, False), "gemma3": (16, False),
                                                               "mistral": (16, True)}[arch]
    before, after, moved = {}, {}, {}
    for kernel in (PACKED_ATTENTION, PACKED_FLEX_ATTENTION):
        trained = copy.deepcopy(model)
        prepare.use_packed_attention(trained, kernel)
        batch = collator(examples)
        assert batch["input_ids"].shape[0] < len(examples)  # several pairs share rows
        with torch.no_grad():
            before[kernel] = torch.cat(packed_rewards(trained, batch))
        assert_within(before[kernel], exact, bound, kernel)
        trained.train()
        loss, _ = bradley_terry(*packed_rewards(trained, collator(examples)), None, None)
        loss.backward()
        with torch.no_grad():
            for p in trained.parameters():
                p -= 0.05 * p.grad
        trained.eval()
        with torch.no_grad():
            after[kernel] = torch.cat(packed_rewards(trained, collator(examples)))
        moved[kernel] = (after[kernel] - before[kernel]).abs().max()
    step_bound = training_bound(model, steps=1, max_length=256)
    assert_within(after[PACKED_FLEX_ATTENTION], after[PACKED_ATTENTION], step_bound, "after a step")
    assert min(moved.values()) > 100 * step_bound  # the step's gradients moved the rewards: a wrong one would show


@pytest.mark.slow
@pytest.mark.numerics
def test_training_with_flex_is_training_with_the_segment_walk(tmp_path, monkeypatch):
    """The tiny model trained 8 steps (packed batches of 4, fp32) with trainer.attention=flex and =sdpa_segments:
    the same held-out rewards, decisions and losses within two fp32 trainings' bound; the flex run ran flex."""
    calls, attend = [], flex.attend
    monkeypatch.setattr(flex, "attend", lambda *args: calls.append(args[0].shape) or attend(*args))
    results, kernels = {}, {}
    for attention in ("flex", "sdpa_segments"):
        out = tmp_path / attention
        cfg = compose_cfg(*tiny_overrides(out, f"trainer.attention={attention}", "trainer.bf16=false", "logger=none",
                                          "lora.lora_dropout=0", "quantization=none", "model.dtype=float32"))
        from rmexp.train import main

        main(cfg, callbacks=[probe := KeepModel()])
        kernels[attention] = attn_implementation(probe.model)
        results[attention] = json.loads((out / "metrics.json").read_text())
        scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
        results[attention]["rewards"] = torch.tensor([[s["reward_chosen"], s["reward_rejected"]] for s in scores])
        if attention == "flex":
            assert calls, "trainer.attention=flex never ran flex_attention"
    assert kernels == {"flex": PACKED_FLEX_ATTENTION, "sdpa_segments": PACKED_ATTENTION}
    got, ref = results["flex"], results["sdpa_segments"]
    bound = training_bound(probe.model, cfg.trainer.max_steps, cfg.trainer.max_length)
    assert_within(got["rewards"], ref["rewards"], bound, "flex vs sdpa_segments")
    assert_same_decisions(got["rewards"], ref["rewards"], bound, "flex vs sdpa_segments")
    undecided = (~decided(ref["rewards"], bound)).float().mean().item()
    assert abs(got["pairwise_accuracy"] - ref["pairwise_accuracy"]) <= undecided
    for loss in ("eval_loss", "train_loss"):  # -log sigmoid(margin) moves by at most the margin's error
        assert got[loss] == pytest.approx(ref[loss], abs=2 * bound), loss


# ---------------------------------------------------------------- auto


def test_auto_takes_flex_on_cuda_only():
    assert flex.choose("auto", None) == ("flex", "trainer.attention=auto: CUDA with flex_attention")
    assert flex.choose("auto", "on cpu ...")[0] == "sdpa_segments"
    assert flex.choose("auto", None, dropout=0.1)[0] == "sdpa_segments"  # flex_attention has no dropout
    assert flex.choose("sdpa_segments", None)[0] == "sdpa_segments"
    assert flex.choose("flex", "on cpu ...")[0] == "flex"  # asked for: the reference runs (a warning says so)
    with pytest.raises(ConfigError, match="trainer.attention=flex: the model's attention_dropout is 0.1"):
        flex.choose("flex", None, dropout=0.1)
    with pytest.raises(ConfigError, match="trainer.attention must be auto or sdpa_segments or flex"):
        flex.choose("flash", None)
    assert "cpu" in flex.unsupported("cpu")


@pytest.fixture
def cuda_present(monkeypatch):
    """This machine as one with a CUDA device of compute capability `capability` (8.0) and Triton; training runs
    there. Nothing runs on it: only the decisions read it."""
    capability = [(8, 0)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    monkeypatch.setattr(compilation, "compiler_available", lambda device: True)
    monkeypatch.setattr(prepare, "training_device", lambda: torch.device("cuda"))
    return capability


def test_auto_trains_with_flex_where_cuda_has_it_and_with_the_segment_walk_here(cuda_present, monkeypatch):
    model, _ = fp32_tiny()
    on = prepare.TrainingOptions(packed=True, attention="auto")
    assert attn_implementation(prepare.for_training(copy.deepcopy(model), on)) == PACKED_FLEX_ATTENTION
    cuda_present[0] = (7, 0)  # a V100: flex_attention's kernel needs 7.5
    assert "compute capability 7.0" in flex.unsupported("cuda")
    assert attn_implementation(prepare.for_training(copy.deepcopy(model), on)) == PACKED_ATTENTION
    monkeypatch.undo()  # this CPU
    assert attn_implementation(prepare.for_training(copy.deepcopy(model), on)) == PACKED_ATTENTION
    asked = prepare.TrainingOptions(packed=True, attention="flex")
    assert attn_implementation(prepare.for_training(copy.deepcopy(model), asked)) == PACKED_FLEX_ATTENTION
    # scoring decides for the device the model is on: this CPU
    assert attn_implementation(prepare.for_scoring(copy.deepcopy(model))) == PACKED_ATTENTION
    assert attn_implementation(prepare.for_scoring(copy.deepcopy(model), attention="flex")) == PACKED_FLEX_ATTENTION


def test_the_trainer_key_reaches_the_training_options():
    from rmexp.config import to_typed

    cfg = to_typed(compose_cfg("trainer.attention=flex", "data.path=data/preference.jsonl", "paths.output_dir=unused"))
    assert prepare.TrainingOptions.of(cfg.trainer).attention == "flex"
    assert to_typed(compose_cfg("data.path=data/preference.jsonl", "paths.output_dir=unused")).trainer.attention == "auto"
