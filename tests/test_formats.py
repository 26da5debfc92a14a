"""Every data.format, on a record we wrote: the exact prompt messages (system and history included), the
answers and the token ids the chat template gives the pair; auto names what it chose and refuses to guess."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from conftest import DPO_EN, DPO_ZH, HH_PAIRS, compose_cfg, needs_shared
from rmexp.config import to_typed
from rmexp.data import DataError, encode_pair, parse_record
from rmexp.dataset import build_datasets, read_pairs


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


# format -> (record, data.format/data.columns overrides, prompt, chosen, rejected); records written for these tests
CASES = {
    "triple": ({"question": "Name a prime number.", "chosen": "7", "rejected": "8", "system": "Answer in one word.",
                "history": [["Hello", "Hi! Ask me anything."]]}, {},
               [system("Answer in one word."), user("Hello"), assistant("Hi! Ask me anything."),
                user("Name a prime number.")], "7", "8"),
    "trl": ({"prompt": [system("You are terse."), user("Is ice cold?"), assistant("Yes."), user("And steam?")],
             "chosen": [assistant("Hot.")], "rejected": [assistant("Cold.")]}, {},
            [system("You are terse."), user("Is ice cold?"), assistant("Yes."), user("And steam?")], "Hot.", "Cold."),
    "trl_implicit": ({"chosen": [user("Two plus two?"), assistant("Four.")],
                      "rejected": [user("Two plus two?"), assistant("Five.")], "system": "Be exact."}, {},
                     [system("Be exact."), user("Two plus two?")], "Four.", "Five."),
    "hh": ({"chosen": "\n\nHuman: Can owls see at night?\n\nAssistant: Yes, very well.\n\nHuman: Why?\n\nAssistant: "
                      "Their large eyes gather a lot of light.",
            "rejected": "\n\nHuman: Can owls see at night?\n\nAssistant: Yes, very well.\n\nHuman: Why?\n\nAssistant: "
                        "Because they are birds."}, {},
           [user("Can owls see at night?"), assistant("Yes, very well."), user("Why?")],
           "Their large eyes gather a lot of light.", "Because they are birds."),
    "sharegpt": ({"conversations": [{"from": "human", "value": "Suggest a name for a cat."},
                                    {"from": "gpt", "value": "Whiskers."},
                                    {"from": "human", "value": "Something shorter?"}],
                  "system": "You name pets.", "tools": "",
                  "chosen": {"from": "gpt", "value": "Tom."}, "rejected": {"from": "gpt", "value": "Sir Fluffington."}},
                 {}, [system("You name pets."), user("Suggest a name for a cat."), assistant("Whiskers."),
                      user("Something shorter?")], "Tom.", "Sir Fluffington."),
    "alpaca": ({"instruction": "Translate to French:", "input": "cat", "system": "You translate.",
                "history": [["Translate to French: dog", "chien"]], "chosen": "chat", "rejected": "chien"}, {},
               [system("You translate."), user("Translate to French: dog"), assistant("chien"),
                user("Translate to French:\ncat")], "chat", "chien"),
    "ultrafeedback": ({"prompt": "What is 2+2?", "prompt_id": "p-001",
                       "chosen": [user("What is 2+2?"), assistant("4")], "rejected": [user("What is 2+2?"), assistant("5")],
                       "messages": [user("What is 2+2?"), assistant("4")], "score_chosen": 9.0, "score_rejected": 2.0},
                      {}, [user("What is 2+2?")], "4", "5"),
    "openrlhf": ({"context": "Why is the sea salty?", "good": "Rivers carry dissolved minerals into it.",
                  "bad": "Fish cry a lot.", "pref_margin": 1.5, "sys": "Explain simply."},
                 {"format": "openrlhf", "columns": {"prompt": "context", "chosen": "good", "rejected": "bad",
                                                    "margin": "pref_margin", "system": "sys"}},
                 [system("Explain simply."), user("Why is the sea salty?")],
                 "Rivers carry dissolved minerals into it.", "Fish cry a lot."),
}
AUTO = {"triple": "triple", "trl": "trl", "trl_implicit": "trl", "hh": "hh", "sharegpt": "sharegpt", "alpaca": "alpaca",
        "ultrafeedback": "ultrafeedback", "openrlhf": "openrlhf"}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("name", list(CASES))
def test_each_format_reads_our_record_exactly(tmp_path, tokenizer, caplog, name):
    record, overrides, prompt, chosen, rejected = CASES[name]
    f = write_jsonl(tmp_path / f"{name}.jsonl", [record])
    with caplog.at_level(logging.INFO, logger="rmexp.dataset"):
        (pair,), stats = read_pairs(f, **overrides)
    assert (pair.prompt, pair.chosen, pair.rejected) == (prompt, chosen, rejected)
    assert pair.where == f"{f}:1" and stats.n_pairs == 1
    if "margin" in overrides.get("columns", {}):
        assert pair.margin == 1.5
    if not overrides:  # auto chose it, and said so
        assert f"{f}: data.format=auto reads it as {AUTO[name]}" in caplog.text
    # the ids are the chat template's for the whole dialogue, the prompt's turns in order
    want = [tokenizer.apply_chat_template(prompt + [assistant(answer)], tokenize=True, return_dict=True)["input_ids"]
            for answer in (chosen, rejected)]
    encoded = encode_pair(tokenizer, pair, 512)
    assert [encoded.chosen.ids, encoded.rejected.ids] == want
    # the same ids through training's datasets; held out: the record with its answers swapped
    ck, rk = (overrides.get("columns", {}).get(k, k) for k in ("chosen", "rejected"))
    swapped = {k: v for k, v in record.items() if k != "messages"} | {ck: record[rk], rk: record[ck]}
    held = write_jsonl(tmp_path / f"held-{name}.jsonl", [swapped])
    cfg = to_typed(compose_cfg("model=tiny", f"data.cache_dir={tmp_path / 'cache'}", f"paths.output_dir={tmp_path}",
                               f"data.path={f}", f"data.eval_path={held}",
                               *[f"data.{k}={v}" for k, v in overrides.items() if k == "format"],
                               *[f"data.columns.{k}={v}" for k, v in overrides.get("columns", {}).items()])).data
    train, held_ds, stats = build_datasets(cfg, tokenizer, 512)
    assert [train[0]["chosen_ids"], train[0]["rejected_ids"]] == want
    assert [held_ds[0]["chosen_ids"], held_ds[0]["rejected_ids"]] == want[::-1]
    assert stats["formats"][str(f)] == AUTO[name]


def test_formats_through_training_are_named_in_stats(tmp_path, tokenizer):
    record, _, prompt, chosen, _ = CASES["alpaca"]
    train = write_jsonl(tmp_path / "train.jsonl", [record, {**record, "input": "horse", "chosen": "cheval"}])
    held = write_jsonl(tmp_path / "held.jsonl", [CASES["sharegpt"][0]])
    cfg = to_typed(compose_cfg("model=tiny", f"data.cache_dir={tmp_path / 'cache'}", f"paths.output_dir={tmp_path}",
                               f"data.path={train}", f"data.eval_path={held}")).data
    train_ds, held_ds, stats = build_datasets(cfg, tokenizer, 512)
    assert stats["formats"] == {str(train): "alpaca", str(held): "sharegpt"}
    want = tokenizer.apply_chat_template(prompt + [assistant(chosen)], tokenize=True, return_dict=True)["input_ids"]
    assert train_ds[0]["chosen_ids"] == want


def test_ultrafeedback_user_turn_is_taken_once_even_read_as_trl():
    record = CASES["ultrafeedback"][0]
    without_copy = {k: v for k, v in record.items() if k != "messages"}  # trl reads no `messages`
    for rec, fmt in ((record, "ultrafeedback"), (record, "auto"), (without_copy, "trl")):
        pair = parse_record(rec, "uf:1", fmt)
        assert (pair.prompt, pair.chosen, pair.rejected) == ([user("What is 2+2?")], "4", "5")
    with pytest.raises(DataError, match=r"uf:1: field 'messages' differs from 'chosen'"):
        parse_record({**record, "messages": [user("What is 2+2?"), assistant("5")]}, "uf:1", "ultrafeedback")
    with pytest.raises(DataError, match=r"uf:1: field 'chosen' repeats the prompt's last turn and the other answer"):
        parse_record({"prompt": "Hi", "chosen": [user("Hi"), assistant("Hello")], "rejected": "Go."}, "uf:1", "trl")


def test_a_repeated_user_turn_is_taken_once_whatever_its_end_whitespace(tmp_path):
    spaced = {"prompt": "Q ", "chosen": [user("Q"), assistant("c")], "rejected": [user("Q\n"), assistant("r")]}
    f = write_jsonl(tmp_path / "spaced.jsonl", [spaced])
    for fmt in ("auto", "trl", "ultrafeedback"):
        (pair,), _ = read_pairs(f, format=fmt)  # before: prompt user "Q ", chosen [user "Q", assistant "c"]
        assert (pair.prompt, pair.chosen, pair.rejected) == ([user("Q ")], "c", "r"), fmt
    messages = {"prompt": [user("Hi"), assistant("Hello."), user("Q ")], "chosen": [user("Hi "), assistant("Hello."),
                                                                                   user("Q"), assistant("c")],
                "rejected": [user("Hi"), assistant(" Hello."), user("Q"), assistant("r")]}
    pair = parse_record(messages, "m:1", "auto")
    assert (pair.prompt, pair.chosen, pair.rejected) == (messages["prompt"], "c", "r")
    other = {"prompt": "Q", "chosen": [user("Something else"), assistant("c")],
             "rejected": [user("Something else"), assistant("r")]}
    f = write_jsonl(tmp_path / "other.jsonl", [{"prompt": "P", "chosen": "a", "rejected": "b"}, other])
    with pytest.raises(DataError, match=rf"{f}:2: field 'chosen' starts with a user turn that is not the end of the "
                                        r"prompt \('prompt'\)"):
        read_pairs(f)
    assert read_pairs(f, on_error="skip")[1].skipped == {"bad_field": 1}
    with pytest.raises(DataError, match=r"o:1: field 'rejected' starts with a system turn"):
        parse_record({"prompt": "Q", "chosen": [assistant("c")], "rejected": [system("S"), user("Q"),
                                                                                         assistant("r")]}, "o:1", "trl")


@pytest.mark.parametrize("record, fmt, message", [
    # LLaMA-Factory's alpaca pairwise record, read before as a prompt-less pair: now the instruction is the prompt
    ({"question": "Sky?", "prompt": "Sky?", "chosen": "Blue.", "rejected": "Red."}, "auto",
     r"f\.jsonl:1: the record could be read as data\.format=triple \('question'\) or data\.format=trl \('prompt'\)"),
    ({"conversations": [user("Hi")], "instruction": "Hi", "chosen": "a", "rejected": "b"}, "auto",
     r"could be read as data\.format=sharegpt \('conversations'\) or data\.format=alpaca \('instruction'\)"),
    ({"instruction": "Translate to French: cat", "input": "", "chosen": "chat", "rejected": "chien"}, "trl",
     r"f\.jsonl:1: fields 'instruction', 'input' not read as trl \(data\.format\); data\.format=alpaca would read them"),
    ({"question": "Sky?", "chosen": "Blue.", "rejected": "Red.", "output": "Blue."}, "auto",
     r"field 'output' not read as triple \(data\.format=auto chose it for this source\); data\.columns \(no preference format reads it\) would"),
    ({"prompt": "Hi", "chosen": "Hello.", "rejected": "Go."}, "hh",
     r"field 'prompt' not read as hh \(data\.format\); data\.format=trl would read it"),
    ({"conversations": [user("Hi")], "tools": '[{"name": "search"}]', "chosen": assistant("a"),
      "rejected": assistant("b")}, "sharegpt", r"f\.jsonl:1: field 'tools' is not empty"),
    ({"conversations": [system("Be kind."), user("Hi")], "system": "Be rude.", "chosen": assistant("a"),
      "rejected": assistant("b")}, "auto", r"field 'system' and the prompt's own system message differ"),
    ({"conversations": [user("Hi"), assistant("Hello")], "chosen": assistant("a"), "rejected": assistant("b")}, "auto",
     r"field 'conversations' must end with a user turn"),
])
def test_auto_and_formats_name_what_they_cannot_read(tmp_path, record, fmt, message):
    f = write_jsonl(tmp_path / "f.jsonl", [record])
    with pytest.raises(DataError, match=message):
        read_pairs(f, format=fmt)


def test_auto_refuses_a_source_of_two_formats(tmp_path):
    f = write_jsonl(tmp_path / "mixed.jsonl", [CASES["triple"][0], CASES["alpaca"][0]])
    with pytest.raises(DataError, match=rf"{f}: records in more than one format under data.format=auto \({f}:1 reads "
                                        rf"as triple, {f}:2 reads as alpaca\)"):
        read_pairs(f, on_error="skip")
    pairs, stats = read_pairs(f, on_error="skip", format="triple")  # a format named: the other record is counted
    assert len(pairs) == 1 and stats.skipped == {"unused_field": 1}


def test_auto_refuses_a_record_past_the_first_hundred_in_another_format(tmp_path, tokenizer):
    trl = [{"chosen": [user(f"Add {i} and 1."), assistant(f"{i + 1}")], "rejected": [user(f"Add {i} and 1."),
                                                                               assistant(f"{i + 2}")]} for i in range(100)]
    hh = {"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: hi\n\nAssistant: no"}
    f = write_jsonl(tmp_path / "late.jsonl", [*trl, hh, trl[0] | {"group": "after"}])
    # read as trl it passed with the prompt user "Human: hi\n\nAssistant:"
    with pytest.raises(DataError, match=rf"{f}:101: the record reads as hh, the source as trl \(data\.format=auto chose "
                                        "it from the first 100 records\)"):
        read_pairs(f)
    pairs, stats = read_pairs(f, on_error="skip")
    assert len(pairs) == 100 and stats.skipped == {"mixed_formats": 1, "duplicate_pair": 1}
    cfg = to_typed(compose_cfg("model=tiny", f"data.cache_dir={tmp_path / 'cache'}", f"paths.output_dir={tmp_path}",
                               f"data.path={f}", "data.on_error=skip")).data
    _, _, stats = build_datasets(cfg, tokenizer, 64)
    assert stats["train_file"]["skipped"] == {"mixed_formats": 1, "duplicate_pair": 1}


def test_a_mixture_source_has_its_own_format_and_columns(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", [{"q": f"Question {i}?", "chosen": f"yes {i}", "rejected": f"no {i}"}
                                           for i in range(6)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": f"Do {i}", "chosen": f"done {i}", "rejected": f"not {i}"}
                                           for i in range(6)])
    sources = (f"data.sources=[{{path:'{a}',format:triple,columns:{{prompt:q}}}},{{path:'{b}'}}]")
    cfg = to_typed(compose_cfg("model=tiny", "data=mixture", sources, f"data.cache_dir={tmp_path / 'cache'}",
                               f"paths.output_dir={tmp_path}")).data
    train, held, stats = build_datasets(cfg, tokenizer, 128)
    assert stats["formats"] == {str(a): "triple", str(b): "alpaca"} and len(train) + len(held) == 12


@needs_shared
def test_shared_llamafactory_files_are_read_as_sharegpt_by_auto(tmp_path, caplog):
    for path in (DPO_ZH, DPO_EN):
        with caplog.at_level(logging.INFO, logger="rmexp.dataset"):
            pairs, _ = read_pairs(path, on_error="skip")
        assert f"{path}: data.format=auto reads it as sharegpt" in caplog.text and pairs
    with caplog.at_level(logging.INFO, logger="rmexp.dataset"):
        read_pairs(HH_PAIRS, on_error="skip")
    assert f"{HH_PAIRS}: data.format=auto reads it as hh" in caplog.text


def test_columns_rename_every_role():
    record = {"ask": "And now?", "win": "Now this.", "lose": "Nothing.", "sys": "Be brief.", "before": [user("Hi"),
              assistant("Hello.")], "w": 2, "item": "i-1", "origin": "ours", "subset": "ignored"}
    columns = {"prompt": "ask", "chosen": "win", "rejected": "lose", "system": "sys", "history": "before", "margin": "w",
               "group": "item", "source": "origin"}
    for fmt in ("auto", "trl", "triple", "openrlhf"):
        pair = parse_record(record, "c:1", fmt, columns)
        assert pair.prompt == [system("Be brief."), user("Hi"), assistant("Hello."), user("And now?")]
        assert (pair.chosen, pair.rejected, pair.margin, pair.group, pair.source) == ("Now this.", "Nothing.", 2.0,
                                                                                      "i-1", "ours")
    with pytest.raises(DataError, match="c:1: field 'ask' is missing"):
        parse_record({k: v for k, v in record.items() if k != "ask"}, "c:1", "trl", columns)


def test_a_hub_id_takes_its_split(monkeypatch, tmp_path):
    import datasets

    asked = {}

    def load_dataset(path, name=None, split=None, **kwargs):  # no network in tests: what rmexp asks the hub for
        asked.update(path=path, name=name, split=split)
        return datasets.Dataset.from_list([{"prompt": "Sky?", "question": None, "chosen": "Blue.", "rejected": "Red.", "subset": "chat"},
                                           {"prompt": "Sea?", "question": "Sea?", "chosen": "Blue.", "rejected": "Red."}])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    pairs, stats = read_pairs("org/bench", split="filtered", on_error="skip")
    assert asked == {"path": "org/bench", "name": None, "split": "filtered"}
    assert [p.where for p in pairs] == ["org/bench[filtered]:1"] and pairs[0].source == "chat"
    assert stats.skipped == {"unused_field": 1}  # read as trl, the second record's `question` would be lost
    with pytest.raises(DataError, match=r"org/bench\[filtered\]:2: field 'question' not read as trl"):
        read_pairs("org/bench", split="filtered")


def test_the_issues_three_records_keep_what_they_lost(tmp_path):
    # read before without a word: the instruction dropped, the user turn twice, the system column dropped
    alpaca = {"instruction": "Translate to French: cat", "input": "", "chosen": "chat", "rejected": "chien"}
    uf = {"prompt": "What is 2+2?", "chosen": [user("What is 2+2?"), assistant("4")],
          "rejected": [user("What is 2+2?"), assistant("5")]}
    sharegpt = {"conversations": [{"from": "human", "value": "Hi"}], "system": "Be warm.",
                "chosen": {"from": "gpt", "value": "Hello, friend!"}, "rejected": {"from": "gpt", "value": "What."}}
    for record, prompt in ((alpaca, [user("Translate to French: cat")]), (uf, [user("What is 2+2?")]),
                           (sharegpt, [system("Be warm."), user("Hi")])):
        (pair,), _ = read_pairs(write_jsonl(tmp_path / "one.jsonl", [record]))
        assert pair.prompt == prompt and isinstance(pair.chosen, str) and isinstance(pair.rejected, str)


def test_hh_dialogues_that_part_before_a_human_turn_are_read_as_messages(tmp_path):
    hi = "\n\nHuman: hi\n\nAssistant: a"
    record = {"chosen": hi + "\n\nHuman: x\n\nAssistant: c", "rejected": hi + "\n\nHuman: y\n\nAssistant: r"}
    as_messages = {k: [user("hi"), assistant("a"), user(turn), assistant(reply)]
                   for k, turn, reply in (("chosen", "x", "c"), ("rejected", "y", "r"))}
    for fmt in ("auto", "hh"):  # before: chosen "a\n\nHuman: x\n\nAssistant: c", one assistant message
        pair = parse_record(record, "h:1", fmt)
        assert (pair.prompt, pair.chosen, pair.rejected) == ([user("hi"), assistant("a")], [user("x"), assistant("c")],
                                                             [user("y"), assistant("r")])
        trl = parse_record(as_messages, "t:1", "trl")  # what trl makes of the same dialogues as message lists
        assert (pair.prompt, pair.chosen, pair.rejected) == (trl.prompt, trl.chosen, trl.rejected)
    later = {"chosen": hi + " and b\n\nHuman: x\n\nAssistant: c", "rejected": hi + " and z"}
    pair = parse_record(later, "h:2", "hh")  # parted inside the reply, one answer goes on
    assert (pair.prompt, pair.chosen, pair.rejected) == ([user("hi")], [assistant("a and b"), user("x"), assistant("c")],
                                                         "a and z")
    bare = {"chosen": "Human: hi\n\nAssistant: yes", "rejected": "Human: hi\n\nAssistant: no"}  # no leading blank line
    pair = parse_record(bare, "h:3", "hh")  # before: prompt user "Human: hi"
    assert (pair.prompt, pair.chosen, pair.rejected) == ([user("hi")], "yes", "no")
    with pytest.raises(DataError, match=r"h:4: field 'rejected' has an empty answer"):
        parse_record({"chosen": record["chosen"], "rejected": hi + "\n\nHuman: y\n\nAssistant:"}, "h:4", "hh")
    with pytest.raises(DataError, match=r"h:5: field 'rejected' must end with an 'Assistant:' turn"):
        parse_record({"chosen": record["chosen"], "rejected": hi + "\n\nHuman: y"}, "h:5", "hh")
    f = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": "plain", "rejected": "text"}, bare])
    with pytest.raises(DataError, match=rf"{f}:1 reads as trl, {f}:2 reads as hh"):
        read_pairs(f)  # auto: the markers decide
    with pytest.raises(DataError, match=rf"{f}:2: field 'chosen' holds 'Human:'/'Assistant:' turns, which trl's "
                                        "implicit prompt reads as plain text: data.format=hh reads such dialogues"):
        read_pairs(f, format="trl")  # before: prompt user "Human: hi\n\nAssistant:"


def test_implicit_text_prompts_follow_each_tool():
    record = {"chosen": "The capital of Peru is Lima.", "rejected": "The capital of Peru is Cusco."}
    trl = parse_record(record, "t:1", "trl")  # TRL's maybe_extract_prompt: the shared text, cut before the space
    assert (trl.prompt, trl.chosen, trl.rejected) == ([user("The capital of Peru is")], "Lima.", "Cusco.")
    whole = parse_record(record, "t:1", "openrlhf")  # OpenRLHF without --prompt_key: no prompt, each text whole
    assert (whole.prompt, whole.chosen, whole.rejected) == ([], record["chosen"], record["rejected"])
    for fmt in ("auto", "trl"):  # no HH turn markers: auto reads TRL's standard implicit prompt (before: hh, no prompt)
        pair = parse_record(record, "t:1", fmt)
        assert (pair.prompt, pair.chosen, pair.rejected) == ([user("The capital of Peru is")], "Lima.", "Cusco.")
    hh = parse_record(record, "t:1", "hh")  # named hh: no `\n\nAssistant:` in the shared part, no prompt
    assert (hh.prompt, hh.chosen) == ([], record["chosen"])


@pytest.mark.parametrize("record,named", [
    ({"prompt": "Weather?", "chosen": [{"role": "assistant", "content": "Let me look.", "tool_calls": [{"name": "w"}]}],
      "rejected": [{"role": "assistant", "content": "No idea."}]}, "'chosen[0]' has 'tool_calls'"),
    ({"conversations": [{"from": "human", "value": "<image>What is this?"}], "chosen": {"from": "gpt", "value": "A cat."},
      "rejected": {"from": "gpt", "value": "A dog."}, "images": ["cat.png"]}, "field 'images' not read"),
])
def test_content_rmexp_does_not_read_is_refused_not_dropped(record, named):
    with pytest.raises(DataError, match=re.escape(named)) as caught:
        parse_record(record, "f.jsonl:3")
    assert caught.value.reason == "unread_content" and str(caught.value).startswith("f.jsonl:3: ")


def test_custom_keys_under_auto_are_told_how_to_name_them():
    with pytest.raises(DataError) as caught:
        parse_record({"context": "Why?", "good": "Because.", "bad": "No."}, "f.jsonl:1")
    message = str(caught.value)
    assert message.startswith("f.jsonl:1: field 'chosen' is missing; the record's fields 'context', 'good', 'bad'")
    assert "data.format=openrlhf data.columns.prompt=<field>" in message
    pair = parse_record({"context": "Why?", "good": "Because.", "bad": "No."}, "f.jsonl:1", "openrlhf",
                        {"prompt": "context", "chosen": "good", "rejected": "bad"})
    assert pair.prompt == [{"role": "user", "content": "Why?"}] and (pair.chosen, pair.rejected) == ("Because.", "No.")
