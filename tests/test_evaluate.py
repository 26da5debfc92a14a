"""Evaluate, score and export a trained tiny reward model."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import DPO_EN, ROOT, compose_cfg, compose_evaluate, needs_shared, tiny_overrides
from rmexp import RewardModel
from rmexp.config import to_typed
from rmexp.data import DataError, encode_pair
from rmexp.dataset import read_pairs
from rmexp.evaluate import evaluate
from rmexp.export import export
from rmexp.metrics import wilson_interval
from rmexp.rundir import pair_id, pair_id_of_key
from rmexp.train import main

EXPORT_TOLERANCE = 1e-2  # measured 2.2e-3 on the tiny model: bf16 rounding of the merged weights


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_run")
    main(compose_cfg(*tiny_overrides(out, "logger=none")))
    return SimpleNamespace(dir=out, model=RewardModel.load(out), tmp=tmp_path_factory.mktemp("eval_files"))


def run_evaluate(checkpoint, data_path, out_dir, *extra):
    metrics = evaluate(compose_evaluate(checkpoint, data_path, out_dir, *extra))
    scores = [json.loads(line) for line in (out_dir / "scores.jsonl").read_text().splitlines()]
    return metrics, scores


FORMATS = {
    "seed.jsonl": [{"question": "What is 2+2?", "chosen": "4.", "rejected": "5.", "source": "math"},
                   {"question": "天空是什么颜色？", "chosen": "蓝色。", "rejected": "绿色。", "source": "zh"},
                   {"question": "Capital of France?", "chosen": "Paris.", "rejected": "Rome.", "source": "geo"}],
    "trl.jsonl": [{"prompt": "Say hi.", "chosen": "Hello!", "rejected": "Go away."},
                  {"prompt": [{"role": "user", "content": "Sky?"}], "chosen": [{"role": "assistant", "content": "Blue."}],
                   "rejected": [{"role": "assistant", "content": "Red."}]}],
    "hh.jsonl": [{"chosen": "\n\nHuman: Boil an egg?\n\nAssistant: Eight minutes.",
                  "rejected": "\n\nHuman: Boil an egg?\n\nAssistant: An hour."},
                 {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello, how can I help?",
                  "rejected": "\n\nHuman: Hi\n\nAssistant: What."}],
    "sharegpt.json": [{"conversations": [{"from": "human", "value": "1+1?"}], "chosen": {"from": "gpt", "value": "2"},
                       "rejected": {"from": "gpt", "value": "3"}}] * 1,
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_evaluate_reads_every_format_and_its_outputs_agree(run, name):
    f = run.tmp / name
    rows = FORMATS[name]
    f.write_text(json.dumps(rows) if name.endswith(".json") else "\n".join(json.dumps(r) for r in rows),
                 encoding="utf-8")
    metrics, scores = run_evaluate(run.dir, f, run.tmp / f"out-{name}")
    assert metrics["n_pairs"] == len(rows) == len(scores)
    assert metrics["ci_low"] <= metrics["pairwise_accuracy"] <= metrics["ci_high"]
    # independent of evaluate's chunked, streamed path: the same pairs through RewardModel's padded forward
    pairs, _ = read_pairs(f)
    again = RewardModel(run.model.model, run.model.tokenizer, run.model.max_length, "check", packed=False).score_pairs(pairs)
    saved = torch.tensor([[s["reward_chosen"], s["reward_rejected"]] for s in scores])
    assert torch.allclose(again, saved, atol=2e-2)
    decided = sum(c > r for c, r in again.tolist())
    close = sum(abs(c - r) <= 2e-2 for c, r in again.tolist())  # pairs the tolerance lets flip
    assert abs(metrics["pairwise_accuracy"] - decided / len(rows)) <= close / len(rows)
    assert sum(b["n_pairs"] for b in metrics["by_prompt_tokens"].values()) == len(rows)
    if name == "seed.jsonl":
        assert set(metrics["by_source"]) == {"math", "zh", "geo"}
        assert [s["source"] for s in scores] == ["math", "zh", "geo"]
    else:
        assert not any("source" in s for s in scores)
    assert [s["pair_id"] for s in scores] == [pair_id(p) for p in pairs]
    assert len({s["pair_id"] for s in scores}) == len(rows) and all(len(s["pair_id"]) == 16 for s in scores)


def test_evaluate_scores_match_the_training_run_scores(run):
    # the run's own held-out pairs, rebuilt with its split, scored again through RewardModel
    from reference_reader import load_data

    _, held, _ = load_data(compose_cfg(*tiny_overrides(run.dir)).data)
    rewards = run.model.score_pairs(held)
    saved = torch.tensor([[s["reward_chosen"], s["reward_rejected"]]
                          for s in map(json.loads, (run.dir / "scores.jsonl").read_text().splitlines())])
    assert torch.allclose(rewards, saved, atol=2e-2)
    # the training run's lines name the same pairs, by the id rmexp-evaluate gives them
    ids = [json.loads(line)["pair_id"] for line in (run.dir / "scores.jsonl").read_text().splitlines()]
    assert ids == [pair_id(p) for p in held]
    metrics = json.loads((run.dir / "metrics.json").read_text())
    assert metrics["data_formats"] == {str(ROOT / "data/preference.jsonl"): "triple"}  # what auto chose, named


def test_scoring_multiplies_the_4bit_base_as_training_did(run):
    """Every 4-bit layer scores through the weight dequantized once (what training and its evaluation use), never
    through bitsandbytes' CPU inference repacking, whose kernel rounds even an fp32 model's matmuls to bf16."""
    from bitsandbytes.nn import Linear4bit

    from rmexp._compat import cpu_inference_packed

    pairs, _ = read_pairs(ROOT / "data/preference.jsonl", max_pairs=4)
    run.model.score_pairs(pairs)
    layers = [m for m in run.model.model.modules() if isinstance(m, Linear4bit)]
    assert layers and all(type(m).__name__.startswith("Cached") for m in layers)
    assert all(m.rmexp_dequantized is not None and not cpu_inference_packed(m.weight.quant_state) for m in layers)
    # and bitsandbytes may not switch a layer to its kernel later either (where the copy is off, or on a GPU)
    assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in layers)


def test_skip_drops_the_bad_line_not_the_file(run):
    f = run.tmp / "one-bad-byte.jsonl"
    rows = [json.dumps(r, ensure_ascii=False).encode() for r in FORMATS["seed.jsonl"]]
    f.write_bytes(b"\n".join([rows[0], b'{"question": "\xff", "chosen": "a", "rejected": "b"}', *rows[1:]]))
    metrics, scores = run_evaluate(run.dir, f, run.tmp / "out-bad-byte", "data.on_error=skip")
    assert metrics["n_pairs"] == len(scores) == 3
    assert metrics["data_stats"]["skipped"] == {"encoding": 1} and metrics["data_stats"]["n_records"] == 4


def test_evaluate_counts_as_training_does_on_parquet_json_and_jsonl(run):
    import pandas as pd

    from rmexp.dataset import build_datasets

    good = [{"question": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": f"Wrong {i}."} for i in range(5)]
    records = [*good, good[1], {"question": "q", "chosen": "a", "rejected": None}, {"question": "q", "chosen": "Same  a",
                                                                                     "rejected": "Same a"}, *good[2:4]]
    files = {"jsonl": run.tmp / "same.jsonl", "json": run.tmp / "same.json", "parquet": run.tmp / "same.parquet"}
    files["jsonl"].write_text("\n".join(json.dumps(r) for r in records) + "\n{broken\n", encoding="utf-8")
    files["json"].write_text(json.dumps(records, indent=1), encoding="utf-8")
    pd.DataFrame(records).to_parquet(files["parquet"])
    for kind, f in files.items():
        metrics, scores = run_evaluate(run.dir, f, run.tmp / f"out-same-{kind}", "data.on_error=skip")
        cfg = compose_cfg(*tiny_overrides(run.tmp / f"train-{kind}"), f"data.path={f}", "data.on_error=skip")
        _, _, stats = build_datasets(to_typed(cfg).data, run.model.tokenizer, 64)
        trained = stats["train_file"]
        assert metrics["n_pairs"] == len(scores) == trained["n_pairs"] == 5, kind
        assert metrics["data_stats"] == {k: trained[k] for k in ("n_records", "n_pairs", "n_skipped", "skipped")}, kind
        # None is missing in Parquet and a wrong type in JSON; the broken line is JSONL's alone
        assert metrics["data_stats"]["n_skipped"] == 5 + (kind == "jsonl"), kind
        assert metrics["data_format"] == "triple"


def messages(caplog, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger]


@pytest.fixture
def transformers_logs(monkeypatch):
    """transformers' own warnings reach caplog (its library logger does not propagate by default)."""
    monkeypatch.setattr(logging.getLogger("transformers"), "propagate", True)


def test_evaluate_scores_a_duplicate_once_skips_a_bad_record_and_says_what_it_cut(run, caplog, transformers_logs):
    f = run.tmp / "dup-bad-long.jsonl"
    long_question = " ".join(f"Question word {i}, and more." for i in range(800))
    rows = [*FORMATS["seed.jsonl"],
            FORMATS["seed.jsonl"][0],  # line 4: the pair of line 1 again
            {"question": "No rejected answer?", "chosen": "Yes."},  # line 5: bad
            {"question": long_question, "chosen": "Long.", "rejected": "Longer."}]  # line 6: over-long
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    # the long prompt is over the tokenizer's own model_max_length: transformers would warn of "indexing errors"
    fresh = RewardModel.load(run.dir).tokenizer
    long_pair = read_pairs(f, on_error="skip")[0][-1]
    assert encode_pair(fresh, long_pair, run.model.max_length).chosen.prompt_tokens > fresh.model_max_length
    caplog.clear()
    with caplog.at_level(logging.INFO):
        metrics, scores = run_evaluate(run.dir, f, run.tmp / "out-dup-bad-long", "data.on_error=skip")

    # scored: each distinct pair once, in file order; the copy on line 4 is counted and named with its first copy
    assert metrics["n_pairs"] == len(scores) == 4
    ids = [s["pair_id"] for s in scores]
    assert len(set(ids)) == 4 and ids[0] == pair_id(read_pairs(f, on_error="skip")[0][0])
    assert metrics["n_duplicates"] == 1 and metrics["duplicates"] == [{"line": f"{f}:4", "first": f"{f}:1"}]
    assert metrics["data_stats"] == {"n_records": 6, "n_pairs": 4, "n_skipped": 2,
                                     "skipped": {"duplicate_pair": 1, "missing_field": 1}}
    assert metrics["data_format"] == "triple" and metrics["max_length"] == run.model.max_length == 512
    assert metrics["n_truncated"] == 1
    assert metrics["truncation"] == {"n_truncated": 1, "n_prompt_truncated": 1, "n_answer_truncated": 0,
                                     "n_identical_after_truncation": 0}
    saved = json.loads((run.tmp / "out-dup-bad-long" / "eval_metrics.json").read_text())
    assert {k: saved[k] for k in ("n_duplicates", "duplicates", "truncation", "data_stats", "max_length")} == {
        k: metrics[k] for k in ("n_duplicates", "duplicates", "truncation", "data_stats", "max_length")}

    read, *_ = messages(caplog, "rmexp.evaluate")
    assert read.startswith(f"{f}: read as triple (data.format=auto): 4 pairs scored of 6 records")
    assert "skipped 1 bad records (data.on_error=skip): {'missing_field': 1}" in read
    assert "1 duplicate pairs scored once, as their first copy (line 4 repeats line 1)" in read
    assert [m for m in messages(caplog, "rmexp.evaluate") if "truncated" in m] == [
        f"{f}: 1 pairs truncated to max_length=512 (the run's trainer.max_length) (the prompt cut from the left in 1, "
        "an answer cut in 0); none dropped"]
    assert not [r for r in caplog.records if "indexing errors" in r.getMessage()]


def test_evaluate_keeps_on_error_raise_for_bad_records_and_training_still_refuses_a_duplicate(run, tmp_path):
    f = tmp_path / "dup.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [*FORMATS["seed.jsonl"], FORMATS["seed.jsonl"][1]]), encoding="utf-8")
    metrics, scores = run_evaluate(run.dir, f, tmp_path / "out")  # data.on_error=raise, the default
    assert metrics["n_pairs"] == len(scores) == 3
    assert metrics["n_duplicates"] == 1 and metrics["duplicates"] == [{"line": f"{f}:4", "first": f"{f}:2"}]
    with pytest.raises(DataError, match=r"dup.jsonl:4: duplicate of the pair at .*dup.jsonl:2") as e:
        read_pairs(f)  # training's reader, on_error=raise: a duplicate in a training file still stops it
    assert e.value.reason == "duplicate_pair"
    with f.open("a", encoding="utf-8") as out:
        out.write("\n" + json.dumps({"question": "q?", "chosen": "a"}))
    with pytest.raises(DataError, match=r"dup.jsonl:5: field 'rejected' is missing") as e:
        run_evaluate(run.dir, f, tmp_path / "out-bad")
    assert e.value.reason == "missing_field" and "more bad records" not in str(e.value)  # the duplicate is not one


@needs_shared
def test_evaluate_reads_llamafactory_dpo_demo_with_its_duplicates(run, tmp_path, caplog, transformers_logs):
    with caplog.at_level(logging.INFO):
        metrics, scores = run_evaluate(run.dir, DPO_EN, tmp_path / "out")
    assert metrics["n_pairs"] == len(scores) == len({s["pair_id"] for s in scores}) == 295
    assert metrics["n_duplicates"] == 5 and metrics["data_stats"]["n_records"] == 300
    assert metrics["data_format"] == "sharegpt" and metrics["truncation"]["n_truncated"] > 100
    read, *_ = messages(caplog, "rmexp.evaluate")
    assert "295 pairs scored of 300 records; 5 duplicate pairs scored once" in read
    assert any(f"{metrics['n_truncated']} pairs truncated to max_length=512 (the run's trainer.max_length)" in m
               for m in messages(caplog, "rmexp.evaluate"))
    assert not [r for r in caplog.records if "indexing errors" in r.getMessage()]


def test_pair_id_is_the_pairs_content_whatever_the_file_format(tmp_path):
    hh, trl = tmp_path / "hh.jsonl", tmp_path / "trl.jsonl"
    hh.write_text(json.dumps({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go."}))
    trl.write_text(json.dumps({"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello!", "rejected": "Go.",
                               "subset": "greetings"}))
    (a,), _ = read_pairs(hh)
    (b,), _ = read_pairs(trl)
    assert pair_id(a) == pair_id(b)
    swapped = read_pairs(trl)[0][0]
    swapped.chosen, swapped.rejected = swapped.rejected, swapped.chosen
    assert pair_id(swapped) != pair_id(b)
    # rmexp.dataset's int64 `key` column holds the same 8 bytes
    key = int.from_bytes(bytes.fromhex(pair_id(b)), "little", signed=True)
    assert pair_id_of_key(key) == pair_id(b) and b.source == "greetings"


def test_max_pairs_is_honoured(run):
    metrics, scores = run_evaluate(run.dir, ROOT / "data/preference.jsonl", run.tmp / "maxpairs", "data.max_pairs=7")
    assert metrics["n_pairs"] == len(scores) == 7


def test_wilson_interval():
    low, high = wilson_interval(8, 10)
    assert 0.44 < low < 0.8 < high < 0.97
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0


def test_evaluate_streams_chunks_in_file_order_and_agrees_with_the_padded_path(run, tmp_path):
    data = ROOT / "data" / "preference.jsonl"
    metrics, scores = run_evaluate(run.dir, data, tmp_path / "packed", "data.max_pairs=40", "eval.chunk_pairs=7",
                                   "eval.row_tokens=512")
    padded_metrics, padded = run_evaluate(run.dir, data, tmp_path / "padded", "data.max_pairs=40",
                                          "eval.packed=false")
    assert metrics["packed"] and not padded_metrics["packed"] and metrics["pairs_per_s"] > 0
    assert [s["index"] for s in scores] == list(range(40)) and not (tmp_path / "packed" / "scores.jsonl.partial").exists()
    diff = max(abs(s[k] - p[k]) for s, p in zip(scores, padded, strict=True) for k in ("reward_chosen", "reward_rejected"))
    assert diff < 2e-2  # the run's compute dtype (bf16 where the CPU has it); fp32 is compared above to 1e-4
    assert metrics["length_baseline_accuracy"] == padded_metrics["length_baseline_accuracy"]
    assert ({k: v["n_pairs"] for k, v in metrics["by_prompt_tokens"].items()}
            == {k: v["n_pairs"] for k, v in padded_metrics["by_prompt_tokens"].items()})
    assert json.loads((tmp_path / "packed" / "eval_metrics.json").read_text())["n_pairs"] == 40


@pytest.mark.parametrize("question,answer", [("What is the capital of Japan?", "Tokyo is the capital of Japan."),
                                             ("日本的首都是哪里？", "日本的首都是东京。")])
def test_score_chinese_and_english_is_finite_deterministic_and_batched_alike(run, question, answer):
    one = run.model.score(question, answer)
    assert math.isfinite(one) and one == run.model.score(question, answer)
    batch = run.model.score_batch([(question, answer), (question, "no"), (question, answer)])
    assert batch[0] == pytest.approx(one, abs=1e-2) and batch[2] == pytest.approx(batch[0], abs=1e-5)


def test_export_loads_in_plain_transformers_and_matches_the_adapter(run):
    from transformers import AutoModelForSequenceClassification

    out = export(run.dir, run.tmp / "exported")
    plain = AutoModelForSequenceClassification.from_pretrained(out)
    assert plain.config.num_labels == 1 and plain.dtype == torch.bfloat16
    metrics = json.loads((run.dir / "metrics.json").read_text())
    assert plain.config.rmexp["reward_mean"] == metrics["reward_mean"]
    assert plain.config.rmexp["reward_std"] == metrics["reward_std"]
    assert not list(out.glob("*.bin")) and list(out.glob("*.safetensors"))

    pairs, _ = read_pairs(ROOT / "data/preference.jsonl", max_pairs=40)
    adapter = run.model.score_pairs(pairs)
    exported = RewardModel.load(out)
    merged = exported.score_pairs(pairs)
    assert (adapter - merged).abs().max().item() < EXPORT_TOLERANCE
    # through plain transformers, no rmexp code: the same rewards as RewardModel on the exported dir
    tok = exported.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": pairs[0].prompt[0]["content"]},
                                   {"role": "assistant", "content": pairs[0].chosen}], return_tensors="pt",
                                  return_dict=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        direct = plain(**ids).logits.float().item()
    assert direct == pytest.approx(merged[0, 0].item(), abs=EXPORT_TOLERANCE)


@pytest.mark.slow
def test_score_and_evaluate_clis(run):
    # free text as the shell passes it: Chinese punctuation, a quote, a comma, `${`, a trailing backslash
    question, answer = "你好吗？It's ${HOME}, [really]", "很好，谢谢！\\"
    proc = subprocess.run([sys.executable, "-m", "rmexp.score", f"checkpoint={run.dir}", f"question={question}",
                           f"answer={answer}"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.strip().splitlines()[-1]) == pytest.approx(run.model.score(question, answer), abs=1e-4)
    bad = subprocess.run([sys.executable, "-m", "rmexp.score", f"checkpoint={run.dir}", "questoin=x", "answer=y"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode != 0 and "questoin" in bad.stderr

    out = run.tmp / "cli-eval"
    proc = subprocess.run([sys.executable, "-m", "rmexp.evaluate", f"checkpoint={run.dir}",
                           f"data.path={ROOT / 'data/preference.jsonl'}", "data.max_pairs=20", "logger.mode=offline",
                           f"hydra.run.dir={out}"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "eval_metrics.json").read_text())["n_pairs"] == 20
    from wandb_records import OfflineRun

    logged = {k for h in OfflineRun(out).history for k in h}
    assert "eval/pairwise_accuracy" in logged and any(k.startswith("eval/worst_pairs") for k in logged)
    # the diagnostics: in the eval dir and in W&B (a logged object's fields are key/field in the run file)
    assert (out / "reliability.png").stat().st_size > 1000 and (out / "rewards.png").is_file()
    assert {"eval/margin_hist/_type", "eval/reliability/_type", "eval/ece", "eval/brier"} <= logged
    assert any(k.startswith("eval/by_source/") and k.endswith("/pairwise_accuracy") for k in logged)
