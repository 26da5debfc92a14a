"""Correct rewards: fp32, seeded, formatted the same everywhere, with the baselines beside them."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, compose_cfg, compose_evaluate, tiny_overrides
from reference_reader import load_data, split_pairs
from rmexp import RewardModel
from rmexp.data import (
    DataError,
    Pair,
    encode_answer,
    encode_pair,
    tokenize_pairs,
)
from rmexp.dataset import read_pairs
from rmexp.metrics import length_baseline_accuracy
from rmexp.train import main

SYSTEM = "Answer as a careful assistant."


def bf16_representable(values) -> float:
    """Share of values that bf16 holds exactly (every value does when they come out of a bf16 head)."""
    t = torch.tensor(values, dtype=torch.float32)
    return (t.bfloat16().float() == t).float().mean().item()


def read_scores(run_dir):
    return [json.loads(line) for line in (run_dir / "scores.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality_run")
    main(compose_cfg(*tiny_overrides(out, "logger=none", f"data.system_prompt='{SYSTEM}'")))
    return SimpleNamespace(dir=out, metrics=json.loads((out / "metrics.json").read_text()), rm=RewardModel.load(out))


def test_rewards_are_fp32_in_training_and_in_reward_model(run):
    scores = read_scores(run.dir)
    rewards = [s["reward_chosen"] for s in scores] + [s["reward_rejected"] for s in scores]
    assert bf16_representable(rewards) < 0.2  # a bf16 head gives 1.0
    assert run.metrics["n_ties"] == 0
    single = run.rm.score_batch([("What is 2+2?", f"It is {i}.") for i in range(16)])
    assert bf16_representable(single) < 0.2


def test_same_seed_same_run_whatever_the_rng_state_before(tmp_path):
    """The new score head and LoRA weights are drawn from trainer.seed, not from whatever ran before."""
    metrics = []
    for i, prior in enumerate((1, 12345)):
        torch.manual_seed(prior)
        torch.rand(prior % 7 + 1)
        out = tmp_path / str(i)
        main(compose_cfg(*tiny_overrides(out, "logger=none", "trainer.max_steps=4")))
        metrics.append(json.loads((out / "metrics.json").read_text()))
    a, b = metrics
    assert a["pairwise_accuracy"] == b["pairwise_accuracy"]
    assert a["eval_loss"] == pytest.approx(b["eval_loss"], abs=1e-6)
    assert a["initial_pairwise_accuracy"] == b["initial_pairwise_accuracy"]
    assert read_scores(tmp_path / "0") == read_scores(tmp_path / "1")


def test_reward_model_and_evaluate_apply_the_run_system_prompt(run, tmp_path):
    from rmexp.evaluate import evaluate

    rm = run.rm
    assert rm.system_prompt == SYSTEM
    with_system = encode_answer(rm.tokenizer, [{"role": "system", "content": SYSTEM},
                                               {"role": "user", "content": "Hi"}], "Hello!", rm.max_length).ids
    assert rm.tokens("Hi", "Hello!") == with_system
    assert SYSTEM in rm.tokenizer.decode(with_system)
    # evaluate on the run's own held-out pairs gives the run's own rewards
    _, eval_pairs, _ = load_data(compose_cfg(*tiny_overrides(tmp_path)).data)  # without the system prompt
    f = tmp_path / "held.jsonl"
    f.write_text("".join(json.dumps({"question": p.prompt[-1]["content"], "chosen": p.chosen,
                                     "rejected": p.rejected}, ensure_ascii=False) + "\n" for p in eval_pairs))
    metrics = evaluate(compose_evaluate(run.dir, f, tmp_path / "eval"))
    assert metrics["pairwise_accuracy"] == run.metrics["pairwise_accuracy"]
    ours = read_scores(tmp_path / "eval")
    for a, b in zip(ours, read_scores(run.dir), strict=True):
        assert a["reward_chosen"] == pytest.approx(b["reward_chosen"], abs=2e-2)


def test_export_records_the_system_prompt(run, tmp_path):
    from rmexp.export import export

    out = export(run.dir, tmp_path / "exported")
    exported = RewardModel.load(out)
    assert exported.system_prompt == SYSTEM and exported.model.config.rmexp["system_prompt"] == SYSTEM
    assert exported.tokens("Hi", "Hello!") == run.rm.tokens("Hi", "Hello!")
    assert bf16_representable(exported.score_batch([("Hi", f"Hello {i}!") for i in range(16)])) < 0.2


def test_single_answer_scoring_sees_the_tokens_pair_scoring_sees(run):
    """A long prompt and one long answer: each answer is fitted to max_length on its own."""
    rm = run.rm
    question = " ".join(f"word{i}" for i in range(600))
    pair = Pair(prompt=[{"role": "user", "content": question}], chosen="Yes.",
                rejected="No, " + " ".join(["because"] * 120) + ".")
    enc = rm.encode([pair])[0]
    assert enc.chosen.prompt_truncated
    assert rm.tokens(question, pair.chosen) == enc.chosen.ids
    assert rm.tokens(question, pair.rejected) == enc.rejected.ids
    single = rm.score_batch([(question, pair.chosen), (question, pair.rejected)])
    paired = rm.score_pairs([pair])[0].tolist()
    assert single == pytest.approx(paired, abs=1e-3)


class TemplateRewritingTokenizer:
    """The tiny tokenizer with a template whose generation prompt is not a prefix of the whole render."""

    TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>\n(thinking)\n{% endif %}")

    def __init__(self, tok):
        self.tok = tok
        tok.chat_template = self.TEMPLATE

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def __call__(self, *args, **kwargs):
        return self.tok(*args, **kwargs)


def test_template_without_a_prefix_render_keeps_the_answers_apart(tokenizer):
    tok = TemplateRewritingTokenizer(tokenizer)
    question = " ".join(f"word{i}" for i in range(300))
    pair = Pair(prompt=[{"role": "user", "content": question}], chosen="The answer is yes.",
                rejected="The answer is no.")
    enc = encode_pair(tok, pair, 64)
    assert enc.chosen.ids != enc.rejected.ids  # before: the prompt became "", cut from the right: a sure tie
    assert enc.chosen.prompt_truncated and not enc.chosen.answer_truncated
    assert tok.decode(enc.chosen.ids).rstrip().endswith("The answer is yes.<|end|>")
    _, counts = tokenize_pairs(tok, [pair], 64)
    assert counts["n_identical_after_truncation"] == 0


def test_message_lists_that_part_early_keep_every_later_turn(tmp_path, tokenizer):
    q = {"role": "user", "content": "Name a fruit."}
    row = {"chosen": [q, {"role": "assistant", "content": "An apple."}, {"role": "user", "content": "Another?"},
                      {"role": "assistant", "content": "A pear."}],
           "rejected": [q, {"role": "assistant", "content": "A chair."}]}
    f = tmp_path / "turns.jsonl"
    f.write_text(json.dumps(row) + "\n")
    (pair,), _ = read_pairs(f)
    assert pair.prompt == [q] and pair.rejected == "A chair."
    assert [m["content"] for m in pair.chosen] == ["An apple.", "Another?", "A pear."]
    text = tokenizer.decode(encode_pair(tokenizer, pair, 512).chosen.ids)
    assert "An apple." in text and "Another?" in text and text.rstrip().endswith("A pear.<|end|>")


def test_a_pair_in_both_train_and_eval_files_is_named_or_skipped(tmp_path):
    rows = [{"question": f"q{i}", "chosen": "good", "rejected": "bad"} for i in range(6)]
    train, held = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held.write_text("".join(json.dumps(r) + "\n" for r in rows[4:] + [{"question": "x", "chosen": "y", "rejected": "z"}]))
    cfg = compose_cfg("data=file", f"data.path={train}", f"data.eval_path={held}")
    with pytest.raises(DataError, match=r"train\.jsonl:5: the same pair is in the eval file at .*eval\.jsonl:1"):
        load_data(cfg.data)
    train_pairs, eval_pairs, stats = load_data(compose_cfg("data=file", f"data.path={train}", f"data.eval_path={held}",
                                                           "data.on_error=skip").data)
    assert len(train_pairs) == 4 and len(eval_pairs) == 3
    assert stats["train_file"]["skipped"] == {"in_eval_file": 2} and stats["train_file"]["n_pairs"] == 4


def test_split_keeps_a_group_on_one_side(tmp_path):
    rows = [{"question": f"q{g}-{lang}", "chosen": "a", "rejected": "b", "group": f"g{g}"}
            for g in range(40) for lang in ("en", "zh")]
    f = tmp_path / "g.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, _ = read_pairs(f)
    train, held = split_pairs(pairs, 0.25, seed=3)
    assert len(held) == 20 and len(train) == 60
    assert not {p.group for p in train} & {p.group for p in held}


def test_length_baseline_counts_ties_as_wrong():
    assert length_baseline_accuracy([5, 3, 4, 2], [1, 3, 9, 1]) == 0.5


def test_metrics_and_summary_line_carry_the_baselines(run):
    m = run.metrics
    assert m["ci_low"] <= m["pairwise_accuracy"] <= m["ci_high"] and m["ci_high"] - m["ci_low"] > 0.05
    assert 0.0 <= m["initial_pairwise_accuracy"] <= 1.0 and 0.0 <= m["length_baseline_accuracy"] <= 1.0
    _, eval_pairs, _ = load_data(compose_cfg(*tiny_overrides(run.dir)).data)
    enc = run.rm.encode(eval_pairs)
    expected = sum(e.chosen.answer_tokens > e.rejected.answer_tokens for e in enc) / len(enc)
    assert m["length_baseline_accuracy"] == pytest.approx(expected)


def test_default_sample_is_honest():
    """The embedded default: bilingual, no length shortcut, groups kept apart, 80+ eval pairs."""
    cfg = compose_cfg()
    train, held, _ = load_data(cfg.data)
    assert len(train) + len(held) >= 400 and len(held) >= 80
    assert not {p.group for p in train} & {p.group for p in held}
    pairs, _ = read_pairs(ROOT / cfg.data.path)
    shorter = sum(len(p.chosen) < len(p.rejected) for p in pairs) / len(pairs)
    assert 0.4 <= shorter <= 0.6
    zh = sum(any("\u4e00" <= ch <= "\u9fff" for ch in p.chosen) for p in pairs) / len(pairs)
    assert 0.4 <= zh <= 0.6
