"""The datasets-backed pipeline (rmexp.dataset): the same pairs, tokens and split as the in-memory path,
bad records named or counted, the cache reused, sources mixed, and a stream trained on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import DPO_EN, DPO_ZH, HH_PAIRS, compose_cfg, needs_shared
from reference_reader import load_data
from rmexp.config import ConfigError, sample_path, to_typed
from rmexp.data import DataError, encode_pairs, parse_record, tokenize_pairs
from rmexp.dataset import build_datasets, read_pairs

SAMPLE = Path(sample_path("preference.jsonl"))  # data/preference.jsonl, as the package ships it (rmexp.sample)


def data_cfg(tmp_path, *overrides):
    return to_typed(compose_cfg("model=tiny", f"data.cache_dir={tmp_path / 'cache'}", f"paths.output_dir={tmp_path}",
                                *overrides)).data


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def assert_same_as_in_memory(cfg, tokenizer, max_length=128):
    train, held, stats = build_datasets(cfg, tokenizer, max_length)
    a, b, old_stats = load_data(cfg)
    (a_ds, a_trunc), (b_ds, b_trunc) = tokenize_pairs(tokenizer, a, max_length), tokenize_pairs(tokenizer, b, max_length)
    assert train.to_list() == a_ds.to_list() and held.to_list() == b_ds.to_list()
    assert stats["truncation"] == {"train": a_trunc, "eval": b_trunc}
    for role in old_stats:
        assert {k: stats[role][k] for k in old_stats[role]} == old_stats[role]
    return train, held, stats


def test_same_pairs_tokens_and_split_as_the_in_memory_path(tmp_path, tokenizer):
    train, held, stats = assert_same_as_in_memory(data_cfg(tmp_path, "data=sample"), tokenizer)
    assert (len(train), len(held)) == (384, 96)  # grouped split: translations stay on one side
    assert stats["sources"][str(SAMPLE)]["n_train"] == 384


@needs_shared
@pytest.mark.parametrize("overrides", [
    (f"data.path={HH_PAIRS}", "data.on_error=skip"),  # implicit prompts, 3 empty answers skipped
    (f"data.path={DPO_ZH}", f"data.eval_path={DPO_EN}", "data.on_error=skip", "data.system_prompt=Be brief."),
])
def test_same_as_the_in_memory_path_on_real_data(tmp_path, tokenizer, overrides):
    _, _, stats = assert_same_as_in_memory(data_cfg(tmp_path, *overrides), tokenizer)
    assert stats["train_file"]["n_pairs"] > 150


@needs_shared
@pytest.mark.parametrize("path", [HH_PAIRS, DPO_ZH, DPO_EN])
def test_evaluate_reads_the_shared_files_as_before(path):
    # the reader rmexp.evaluate uses, against the in-memory reader it replaced: the same pairs, places and counts
    from reference_reader import load_pairs

    old, old_stats = load_pairs(path, on_error="skip")
    new, new_stats = read_pairs(path, on_error="skip")
    assert [(p.prompt, p.chosen, p.rejected, p.margin, p.source, p.group, p.where) for p in new] == \
        [(p.prompt, p.chosen, p.rejected, p.margin, p.source, p.group, p.where) for p in old]
    assert new_stats.as_dict() == old_stats.as_dict()


def test_bad_records_are_named_or_skipped_and_counted(tmp_path, tokenizer):
    good = [{"question": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(6)]
    f = write_jsonl(tmp_path / "bad.jsonl", [good[0], good[1], "{not json", {"question": "q", "chosen": "a"},
                                            good[2], good[0], good[3], good[4], good[5]])
    with f.open("ab") as fh:
        fh.write(b'{"question": "\xff", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(DataError, match=rf"{f}:3: malformed JSON .*3 more bad records"):
        build_datasets(data_cfg(tmp_path, f"data.path={f}"), tokenizer, 64)
    train, held, stats = build_datasets(data_cfg(tmp_path, f"data.path={f}", "data.on_error=skip"), tokenizer, 64)
    assert stats["train_file"]["skipped"] == {"malformed_json": 1, "missing_field": 1, "duplicate_pair": 1,
                                              "encoding": 1}
    assert stats["train_file"]["n_records"] == 10 and len(train) + len(held) == 6
    ok = write_jsonl(tmp_path / "ok.jsonl", good)
    held_file = write_jsonl(tmp_path / "held.jsonl", [good[1], {"question": "new", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=rf"{ok}:2: the same pair is in the eval file {held_file}"):
        build_datasets(data_cfg(tmp_path, f"data.path={ok}", f"data.eval_path={held_file}"), tokenizer, 64)
    _, held, stats = build_datasets(data_cfg(tmp_path, f"data.path={ok}", f"data.eval_path={held_file}",
                                             "data.on_error=skip"), tokenizer, 64)
    assert stats["train_file"]["skipped"] == {"in_eval_file": 1} and stats["train_file"]["n_train"] == 5
    short = write_jsonl(tmp_path / "short.jsonl", [*good[:3], {"question": "q", "chosen": "a"}])
    with pytest.raises(DataError, match=rf"{short}:4: field 'rejected' is missing"):
        build_datasets(data_cfg(tmp_path, f"data.path={short}"), tokenizer, 64)


def test_a_second_run_reads_the_cache_and_a_changed_file_does_not(tmp_path, tokenizer):
    f = write_jsonl(tmp_path / "pairs.jsonl", SAMPLE.read_text(encoding="utf-8").splitlines()[:200])
    cfg = data_cfg(tmp_path, f"data.path={f}", "data.num_proc=1")

    def cache_files():
        return {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("cache-*.arrow")}

    first, _, _ = build_datasets(cfg, tokenizer, 64)
    written = cache_files()
    again, _, _ = build_datasets(cfg, tokenizer, 64)
    assert written and cache_files() == written  # nothing re-tokenized: the same files, untouched
    assert again.to_list() == first.to_list()
    # its own cache: datasets would take the one-process cache for a two-process map
    two, _, _ = build_datasets(data_cfg(tmp_path / "two", f"data.path={f}", "data.num_proc=2"), tokenizer, 64)
    assert two.to_list() == first.to_list()  # two worker processes, the same rows
    write_jsonl(f, SAMPLE.read_text(encoding="utf-8").splitlines()[:210])
    grown, _, _ = build_datasets(cfg, tokenizer, 64)
    assert len(grown) > len(first)  # the file changed: its old cache is not used


def test_mixture_fraction_weights_and_parquet(tmp_path, tokenizer):
    import pandas as pd

    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    en = write_jsonl(tmp_path / "en.jsonl", [r for r in rows if r["lang"] == "en"])
    zh = tmp_path / "zh.parquet"
    pd.DataFrame([r for r in rows if r["lang"] == "zh"]).to_parquet(zh)
    sources = f"data.sources=[{{path:'{en}',fraction:0.5,weight:3}},{{path:'{zh}',weight:1}}]"
    train, held, stats = build_datasets(data_cfg(tmp_path, "data=mixture", sources, "data.eval_fraction=0.1"), tokenizer, 64)
    s_en, s_zh = stats["sources"][str(en)], stats["sources"][str(zh)]
    assert s_en["n_records"] == 120 and s_zh["n_records"] == 240  # fraction: the first half of en
    assert s_en["n_train"] + s_zh["n_train"] == len(train) and s_en["n_eval"] + s_zh["n_eval"] == len(held)
    # one grouped split over both sources: an English item and its Chinese translation on the same side
    pairs = [parse_record(r, "x") for r in rows]
    group_of = {tuple(e.chosen.ids): r["group"] for r, e in zip(rows, encode_pairs(tokenizer, pairs, 64), strict=True)}
    train_groups = {group_of[tuple(r["chosen_ids"])] for r in train.to_list()}
    eval_groups = {group_of[tuple(r["chosen_ids"])] for r in held.to_list()}
    assert eval_groups and not train_groups & eval_groups
    # weights 3:1 until the first source runs out: about three English pairs to a Chinese one
    assert 2 <= s_en["n_train"] / max(s_zh["n_train"], 1) <= 4.5 and s_en["n_train"] + s_en["n_eval"] == 120
    again, _, _ = build_datasets(data_cfg(tmp_path, "data=mixture", sources, "data.eval_fraction=0.1"), tokenizer, 64)
    assert again.to_list() == train.to_list()  # seeded by data.split_seed


def test_few_good_records_first_an_empty_file_and_a_raw_line_separator(tmp_path, tokenizer):
    good = [{"question": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(5)]
    f = write_jsonl(tmp_path / "late.jsonl", [{"question": "q"}, {"question": "q"}, *good])
    train, held, stats = build_datasets(data_cfg(tmp_path, f"data.path={f}", "data.max_pairs=3", "data.on_error=skip"),
                                        tokenizer, 64)
    assert len(train) + len(held) == 3 and stats["train_file"]["n_records"] == 5  # read up to the third good pair
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match=f"{empty}: no preference pairs"):
        build_datasets(data_cfg(tmp_path, f"data.path={empty}"), tokenizer, 64)
    # U+2028 is legal raw inside a JSON string: a record holding one is one record in both readers
    sep = write_jsonl(tmp_path / "sep.jsonl", [{"question": "a\u2028b", "chosen": "c", "rejected": "d"}, *good])
    assert_same_as_in_memory(data_cfg(tmp_path, f"data.path={sep}"), tokenizer)


def test_a_stream_reads_each_source_once_without_weights_and_refuses_eval_pairs(tmp_path, tokenizer):
    good = [{"question": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(8)]
    a, b = write_jsonl(tmp_path / "a.jsonl", good[:5]), write_jsonl(tmp_path / "b.jsonl", good[5:])
    held = write_jsonl(tmp_path / "held.jsonl", [good[0], {"question": "new", "chosen": "x", "rejected": "y"}])
    common = ("data=mixture", f"data.sources=[{{path:'{a}'}},{{path:'{b}'}}]", f"data.eval_path={held}",
              "data.streaming=true", "trainer.max_steps=10")
    train, _, stats = build_datasets(data_cfg(tmp_path, *common, "data.on_error=skip"), tokenizer, 64)
    assert len(list(train)) == 7  # 8 pairs, the one also in the eval file skipped, none twice
    assert stats["sources"][str(a)] == {"n_pairs_read": 4, "n_skipped": 1, "skipped": {"in_eval_file": 1}}
    assert stats["sources"][str(b)]["n_pairs_read"] == 3
    capped, _, _ = build_datasets(data_cfg(tmp_path, *common, "data.on_error=skip", "data.max_pairs=2"), tokenizer, 64)
    assert len(list(capped)) == 4  # the first 2 pairs of each source
    with pytest.raises(DataError, match=rf"{a}:1: the same pair is in the eval file"):
        list(build_datasets(data_cfg(tmp_path, *common), tokenizer, 64)[0])


@pytest.mark.parametrize("overrides, message", [
    (("data.path=x.jsonl", "data.sources=[{path:y.jsonl}]"), "not both"),
    (("data.path=null",), "set data.path"),
    (("data=mixture", "data.sources=[{path:a.jsonl,weight:1},{path:b.jsonl}]"), "every source a weight"),
    (("data=mixture", "data.sources=[{path:a.jsonl,fraction:0}]"), "fraction must be in"),
    (("data.path=x.jsonl", "data.streaming=true"), "needs data.eval_path"),
])
def test_data_config_errors_before_anything_is_read(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        data_cfg(tmp_path, *overrides)


def test_a_source_key_typo_fails_at_composition(tmp_path):
    with pytest.raises(Exception, match="pth"):
        to_typed(compose_cfg("data.sources=[{pth:a.jsonl}]", f"paths.output_dir={tmp_path}"))
    cfg = to_typed(compose_cfg("data=mixture", "data.sources=[{path:a.jsonl,weight:2}]", f"paths.output_dir={tmp_path}"))
    assert OmegaConf.structured(cfg).data.sources[0].weight == 2.0 and cfg.data.sources[0].fraction == 1.0


@pytest.mark.slow
def test_streaming_trains_max_steps_and_counts_what_it_read(tmp_path):
    from rmexp.train import main

    rows = SAMPLE.read_text(encoding="utf-8").splitlines()
    train_file = write_jsonl(tmp_path / "train.jsonl", [*rows[:300], '{"question": "q", "chosen": "a"}'])
    eval_file = write_jsonl(tmp_path / "eval.jsonl", rows[300:340])
    with pytest.raises(ConfigError, match="needs trainer.max_steps"):
        main(compose_cfg("model=tiny", f"paths.output_dir={tmp_path / 'no'}", "logger=none", f"data.path={train_file}",
                         f"data.eval_path={eval_file}", "data.streaming=true"))
    main(compose_cfg("model=tiny", f"paths.output_dir={tmp_path / 'run'}", "logger=none", f"data.path={train_file}",
                     f"data.eval_path={eval_file}", "data.streaming=true", "data.on_error=skip",
                     "trainer.max_steps=4", "trainer.per_device_train_batch_size=4", "trainer.eval_strategy=no",
                     "trainer.save_strategy=no"))
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["status"] == "ok" and m["global_step"] == 4 and m["n_eval_pairs"] == 40 and m["n_train_pairs"] is None
    read = m["data"]["sources"][str(train_file)]
    # the shuffle buffer (10,000) holds the whole file: each pass over it reads 300 pairs and the bad record
    assert read["n_pairs_read"] >= 300 and read["n_pairs_read"] == 300 * read["skipped"]["missing_field"]


def test_small_holes_bom_margin_whitespace_and_a_bad_byte(tmp_path, tokenizer):
    good = [{"question": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(4)]
    bom = "\ufeff"
    lines = tmp_path / "bom.jsonl"
    lines.write_text(bom + "".join(json.dumps(r) + "\n" for r in good), encoding="utf-8")
    array = tmp_path / "bom.json"
    array.write_text(bom + json.dumps(good, indent=1), encoding="utf-8")
    for f in (lines, array):  # the first record is read, not lost to the mark
        train, held, stats = build_datasets(data_cfg(tmp_path, f"data.path={f}"), tokenizer, 64)
        assert len(train) + len(held) == 4 and not stats["train_file"]["skipped"]
        assert [p.prompt[0]["content"] for p in read_pairs(f)[0]] == ["q0", "q1", "q2", "q3"]
    for value, shown in (("NaN", "nan"), ("Infinity", "inf"), ("-Infinity", "-inf")):
        f = tmp_path / "margin.jsonl"
        f.write_text(json.dumps(good[0]) + "\n" + json.dumps(good[1])[:-1] + f', "margin": {value}}}\n',
                     encoding="utf-8")
        with pytest.raises(DataError, match=rf"{f}:2: field 'margin' must be finite, got {shown}"):
            build_datasets(data_cfg(tmp_path, f"data.path={f}"), tokenizer, 64)
    spaced = write_jsonl(tmp_path / "spaced.jsonl", [*good, {"question": "q", "chosen": "Yes,  it is.\n",
                                                             "rejected": " Yes, it\tis."}])
    with pytest.raises(DataError, match=rf"{spaced}:5: fields 'chosen' and 'rejected' are identical apart from "
                                        "whitespace"):
        build_datasets(data_cfg(tmp_path, f"data.path={spaced}"), tokenizer, 64)
    _, _, stats = build_datasets(data_cfg(tmp_path, f"data.path={spaced}", "data.on_error=skip"), tokenizer, 64)
    assert stats["train_file"]["skipped"] == {"identical_pair": 1}


def test_the_rung_split_stands_apart_from_training_and_evaluation_pairs(tmp_path, tokenizer):
    """data.rung_path: a pair it shares with the training file is leakage (named, or skipped and counted), one it
    shares with the eval file is refused; data.rung_fraction holds a seeded share out of the training pairs."""
    rows = [{"question": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(20)]
    train_file = write_jsonl(tmp_path / "train.jsonl", rows[:12])
    eval_file = write_jsonl(tmp_path / "eval.jsonl", rows[12:16])
    rung_file = write_jsonl(tmp_path / "rung.jsonl", [rows[3], *rows[16:]])
    common = [f"data.path={train_file}", f"data.eval_path={eval_file}", f"data.rung_path={rung_file}"]
    with pytest.raises(DataError, match=rf"{train_file}:4: the same pair is in the rung file {rung_file}"):
        build_datasets(data_cfg(tmp_path, *common), tokenizer, 64)
    train, held, stats = build_datasets(data_cfg(tmp_path, *common, "data.on_error=skip"), tokenizer, 64)
    assert stats["train_file"]["skipped"] == {"in_rung_file": 1} and len(train) == 11 and len(held) == 4
    assert len(stats["rung"]) == 5 and stats["rung_file"]["n_pairs"] == 5
    assert len({i["pair_id"] for i in stats["rung_identity"]}) == 5
    shared = write_jsonl(tmp_path / "shared.jsonl", [rows[13], rows[17]])
    with pytest.raises(DataError, match=rf"{shared}:1: the same pair is in the eval file {eval_file}"):
        build_datasets(data_cfg(tmp_path, f"data.path={train_file}", f"data.eval_path={eval_file}",
                                f"data.rung_path={shared}"), tokenizer, 64)

    whole = write_jsonl(tmp_path / "whole.jsonl", rows)
    split = [f"data.path={whole}", "data.eval_fraction=0.2", "data.rung_fraction=0.25"]
    train, held, stats = build_datasets(data_cfg(tmp_path, *split), tokenizer, 64)
    keys = {name: {tuple(ids) for ids in ds["chosen_ids"]}  # every chosen answer differs: one per pair
            for name, ds in (("train", train), ("eval", held), ("rung", stats["rung"]))}
    assert (len(keys["eval"]), len(keys["rung"]), len(keys["train"])) == (4, 4, 12)  # 0.25 of the 16 left
    assert not (keys["train"] & keys["eval"] or keys["train"] & keys["rung"] or keys["eval"] & keys["rung"])
    again = build_datasets(data_cfg(tmp_path, *split), tokenizer, 64)[2]["rung"]
    assert {tuple(ids) for ids in again["chosen_ids"]} == keys["rung"]  # seeded by data.split_seed
