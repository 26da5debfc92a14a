"""Each record format loads; each bad input gives a DataError naming file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import DPO_EN, DPO_ZH, HH_PAIRS, ROOT, needs_shared
from reference_reader import split_pairs
from rmexp.data import DataError, encode_pair, tokenize_pairs
from rmexp.dataset import read_pairs


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def test_seed_format(tmp_path):
    f = write_jsonl(tmp_path / "seed.jsonl", [{"question": "2+2?", "chosen": "4", "rejected": "5"},
                                              {"question": "你好吗？", "chosen": "很好，谢谢！", "rejected": "走开。"}])
    pairs, stats = read_pairs(f)
    assert [p.prompt for p in pairs] == [[{"role": "user", "content": "2+2?"}], [{"role": "user", "content": "你好吗？"}]]
    assert (pairs[1].chosen, pairs[1].rejected) == ("很好，谢谢！", "走开。")
    assert stats.n_pairs == 2 and not stats.skipped


def test_trl_explicit_prompt_string_and_conversational(tmp_path):
    f = write_jsonl(tmp_path / "trl.jsonl", [
        {"prompt": "Sky colour?", "chosen": "Blue.", "rejected": "Green.", "margin": 1.5},
        {"prompt": [{"role": "user", "content": "Hi"}],
         "chosen": [{"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "assistant", "content": "Go away."}]},
    ])
    pairs, _ = read_pairs(f)
    assert pairs[0].prompt == [{"role": "user", "content": "Sky colour?"}] and pairs[0].margin == 1.5
    assert pairs[1].prompt == [{"role": "user", "content": "Hi"}] and pairs[1].chosen == "Hello!"
    assert pairs[1].margin == 0.0  # one margin column: missing ones are 0


def test_implicit_prompt_dialogues_split_at_last_assistant_turn(tmp_path):
    shared = "\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in water.\n\nHuman: Then?\n\nAssistant:"
    f = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": shared + " Boil it for 8 minutes.",
                                             "rejected": shared + " Boil it for an hour."}])
    (pair,), _ = read_pairs(f)
    assert [m["role"] for m in pair.prompt] == ["user", "assistant", "user"]
    assert pair.prompt[-1]["content"] == "Then?"
    assert (pair.chosen, pair.rejected) == ("Boil it for 8 minutes.", "Boil it for an hour.")


def test_implicit_message_lists(tmp_path):
    user = {"role": "user", "content": "Capital of France?"}
    f = write_jsonl(tmp_path / "conv.jsonl", [{"chosen": [user, {"role": "assistant", "content": "Paris."}],
                                               "rejected": [user, {"role": "assistant", "content": "Lyon."}]}])
    (pair,), _ = read_pairs(f)
    assert pair.prompt == [user] and (pair.chosen, pair.rejected) == ("Paris.", "Lyon.")


def test_sharegpt_array_with_system_message(tmp_path):
    records = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "1+1?"}],
                "chosen": {"from": "gpt", "value": "2"}, "rejected": {"from": "gpt", "value": "3"}},
               {"conversations": [{"from": "human", "value": "天空是什么颜色？"}],
                "chosen": {"from": "gpt", "value": "蓝色。"}, "rejected": {"from": "gpt", "value": "绿色。"}}]
    f = tmp_path / "dpo.json"
    f.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    pairs, _ = read_pairs(f)
    assert pairs[0].prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}]
    assert pairs[1].chosen == "蓝色。"
    assert pairs[1].where.endswith(f"dpo.json:{json.dumps(records, ensure_ascii=False, indent=1).splitlines().index(' {', 2) + 1}")


def test_max_pairs_reads_only_the_first(tmp_path):
    f = write_jsonl(tmp_path / "many.jsonl", [{"question": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(10)]
                    + ["{broken"])
    pairs, _ = read_pairs(f, max_pairs=3)
    assert [p.prompt[0]["content"] for p in pairs] == ["q0", "q1", "q2"]


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such preference file"):
        read_pairs(tmp_path / "nope.jsonl")


def test_malformed_line_names_file_and_line(tmp_path):
    ok = {"question": "q", "chosen": "a", "rejected": "b"}
    f = write_jsonl(tmp_path / "bad.jsonl", [ok, {**ok, "question": "q2"}, '{"question": "q3", "chosen": '])
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON"):
        read_pairs(f)


def test_malformed_array_names_line(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text('[\n {"question": "q", "chosen": "a", "rejected": "b"},\n {"question": oops}\n]\n')
    with pytest.raises(DataError, match=r"bad\.json:3: malformed JSON"):
        read_pairs(f)


def test_a_broken_array_stops_the_read_whatever_on_error_says(tmp_path, tokenizer):
    from rmexp.dataset import build_datasets, data_config

    rows = [json.dumps({"question": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"}) for i in range(1, 6)]
    rows[2] = rows[2].replace('", "chosen"', '" "chosen"')  # a missing comma in the third record
    f = tmp_path / "five.json"
    f.write_text("[\n" + ",\n".join(rows) + "\n]\n", encoding="utf-8")
    broken = (rf"{f}:4: malformed JSON \(Expecting ',' delimiter at column \d+\): the JSON array cannot be read past "
              "this point, so the records after it would be unread")
    for on_error in ("raise", "skip"):  # before, skip gave 2 pairs and {malformed_json: 1}: records 4 and 5 gone
        with pytest.raises(DataError, match=broken) as e:
            read_pairs(f, on_error=on_error)
        assert e.value.reason == "broken_array"
        with pytest.raises(DataError, match=broken):
            build_datasets(data_config(path=str(f), on_error=on_error, cache_dir=str(tmp_path / "cache")), tokenizer, 64)
    from rmexp.config import SourceConfig
    from rmexp.dataset import read_source

    with pytest.raises(DataError, match=broken):  # a stream is refused before it starts, not at the break
        read_source(SourceConfig(path=str(f)), None, streaming=True)
    bad_byte = tmp_path / "byte.json"
    bad_byte.write_bytes(b"[\n" + b",\n".join(r.encode() for r in rows[:2]) + b',\n{"question": "\xff"}\n]')
    with pytest.raises(DataError, match=rf"{bad_byte}:4: not UTF-8 text .*: the JSON array cannot be read past this "
                                        "point, so none of its records can be read"):
        read_pairs(bad_byte, on_error="skip")


@pytest.mark.parametrize("record,message", [
    ({"question": "q", "rejected": "b"}, "field 'chosen' is missing"),
    ({"question": "q", "chosen": "a"}, "field 'rejected' is missing"),
    ({"question": "q", "chosen": 3, "rejected": "b"}, "field 'chosen' must be a string, got int"),
    ({"question": "q", "chosen": "a", "rejected": None}, "field 'rejected' must be a string, got NoneType"),
    ({"question": "q", "chosen": "  ", "rejected": "b"}, "field 'chosen' is empty"),
    ({"question": "", "chosen": "a", "rejected": "b"}, "field 'question' is empty"),
    ({"question": "q", "chosen": "same", "rejected": "same"}, "'chosen' and 'rejected' are identical"),
    ({"question": "q", "chosen": [{"from": "alien", "value": "x"}], "rejected": "b"}, "chosen\\[0\\]"),
    (["not", "an", "object"], "record is a list"),
])
def test_bad_record_names_file_line_and_field(tmp_path, record, message):
    f = write_jsonl(tmp_path / "rec.jsonl", [{"question": "fine", "chosen": "a", "rejected": "b"}, record])
    with pytest.raises(DataError, match=rf"rec\.jsonl:2: .*{message}"):
        read_pairs(f)


def test_no_pairs_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no preference pairs"):
        read_pairs(write_jsonl(tmp_path / "empty.jsonl", []))
    with pytest.raises(DataError, match="no preference pairs"):
        read_pairs(write_jsonl(tmp_path / "allbad.jsonl", [{"chosen": "x"}]), on_error="skip")


def test_skip_counts_every_skipped_record_by_reason(tmp_path):
    ok = {"question": "q", "chosen": "a", "rejected": "b"}
    f = write_jsonl(tmp_path / "mixed.jsonl", [ok, "{oops", {"question": "q"}, ok, {**ok, "rejected": "a"},
                                               {**ok, "question": "other"}])
    pairs, stats = read_pairs(f, on_error="skip")
    assert len(pairs) == 2
    assert dict(stats.skipped) == {"malformed_json": 1, "missing_field": 1, "duplicate_pair": 1, "identical_pair": 1}
    assert stats.as_dict()["n_skipped"] == 4 and stats.n_records == 6


def test_split_is_seeded_disjoint_and_complete(tmp_path):
    f = write_jsonl(tmp_path / "s.jsonl", [{"question": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(50)])
    pairs, _ = read_pairs(f)
    train, held = split_pairs(pairs, 0.1, seed=1)
    again, held_again = split_pairs(pairs, 0.1, seed=1)
    assert len(held) == 5 and len(train) == 45
    assert [p.where for p in held] == [p.where for p in held_again]
    assert {p.where for p in train} | {p.where for p in held} == {p.where for p in pairs}
    assert [p.where for p in split_pairs(pairs, 0.1, seed=2)[1]] != [p.where for p in held]


def test_truncation_cuts_the_prompt_from_the_left_and_keeps_answers(tmp_path, tokenizer):
    long_q = " ".join(f"word{i}" for i in range(400))
    f = write_jsonl(tmp_path / "long.jsonl", [{"question": long_q, "chosen": "yes indeed", "rejected": "no"},
                                              {"question": "short", "chosen": "a", "rejected": "b"}])
    pairs, _ = read_pairs(f)
    full = encode_pair(tokenizer, pairs[0], 10_000)
    cut = encode_pair(tokenizer, pairs[0], 64)
    for side in ("chosen", "rejected"):
        f, c = getattr(full, side), getattr(cut, side)
        assert c.prompt_truncated and not c.answer_truncated
        assert c.ids[c.prompt_len:] == f.ids[f.prompt_len:]  # the answer is whole
        assert len(c.ids) == 64 and c.ids[0] == tokenizer.bos_token_id  # BOS kept, the oldest prompt tokens dropped
        assert c.ids[c.prompt_len - 5:c.prompt_len] == f.ids[f.prompt_len - 5:f.prompt_len]
    ds, counts = tokenize_pairs(tokenizer, pairs, 64)
    assert len(ds) == 2 and counts["n_truncated"] == 1 and counts["n_prompt_truncated"] == 1
    assert max(len(x) for x in list(ds["chosen_ids"]) + list(ds["rejected_ids"])) <= 64


def test_over_long_answer_is_cut_and_counted(tmp_path, tokenizer):
    f = write_jsonl(tmp_path / "a.jsonl", [{"question": "q", "chosen": "lo" * 300, "rejected": "b"}])
    pairs, _ = read_pairs(f)
    ds, counts = tokenize_pairs(tokenizer, pairs, 32)
    assert counts["n_answer_truncated"] == 1 and len(ds[0]["chosen_ids"]) == 32 and len(ds) == 1


def test_chat_template_is_used_when_present(tokenizer):
    from rmexp.data import render

    head, answer = render(tokenizer, [{"role": "user", "content": "hi"}], "there")
    assert "<|user|>" in head and head.endswith("<|assistant|>\n") and answer.startswith("there")


record_values = st.one_of(st.none(), st.integers(), st.text(max_size=8), st.lists(st.text(max_size=3), max_size=2),
                          st.dictionaries(st.sampled_from(["from", "value", "role", "content"]), st.text(max_size=4)))
records = st.one_of(
    st.dictionaries(st.sampled_from(["question", "prompt", "chosen", "rejected", "conversations", "margin"]),
                    record_values, max_size=5),
    record_values)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.one_of(records.map(lambda r: json.dumps(r)), st.text(max_size=20)), max_size=6),
       as_array=st.booleans(), on_error=st.sampled_from(["raise", "skip"]))
def test_random_files_load_or_raise_data_error(tmp_path, rows, as_array, on_error):
    f = tmp_path / ("r.json" if as_array else "r.jsonl")
    f.write_text(("[" + ",".join(rows) + "]") if as_array else "\n".join(rows), encoding="utf-8")
    try:
        pairs, stats = read_pairs(f, on_error=on_error)
    except DataError as e:
        assert str(f) in str(e)
    else:
        assert pairs and stats.n_pairs == len(pairs)
        assert all(p.chosen.strip() and p.rejected.strip() and p.chosen != p.rejected for p in pairs)


@needs_shared
def test_shared_hh_rlhf_pairs_have_prompts():
    with pytest.raises(DataError, match=r"pairs\.jsonl:923: field 'chosen' has an empty answer"):
        read_pairs(HH_PAIRS)  # one real pair prefers an empty answer: named, not silently used
    pairs, stats = read_pairs(HH_PAIRS, on_error="skip")
    assert stats.n_records == 1600 and stats.n_pairs + sum(stats.skipped.values()) == 1600
    assert set(stats.skipped) == {"empty_field"}  # a few real pairs prefer an empty answer
    assert all(p.prompt and p.prompt[-1]["role"] == "user" for p in pairs)


@needs_shared
@pytest.mark.parametrize("path,n", [(DPO_ZH, 200), (DPO_EN, 300)])
def test_shared_llamafactory_dpo(path, n):
    with pytest.raises(DataError, match="duplicate of the pair at"):
        read_pairs(path)
    pairs, stats = read_pairs(path, on_error="skip")
    assert stats.n_records == n and len(pairs) + stats.skipped["duplicate_pair"] == n
    assert all(p.prompt for p in pairs)


def test_sample_data_is_bilingual_and_large_enough():
    pairs, _ = read_pairs(ROOT / "data" / "preference.jsonl")
    zh = sum(any("\u4e00" <= ch <= "\u9fff" for ch in p.chosen) for p in pairs)
    assert len(pairs) >= 120 and 0.3 < zh / len(pairs) < 0.7
