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
from rmexp.data import DataError, detect_format, encode_pair, parse_record, skip_hint
from rmexp.dataset import StreamCounts, build_datasets, read_pairs


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
    # OpenAI's layout (LLaMA-Factory's sharegpt with columns.messages=messages): the prompt in `messages`
    "openai": ({"messages": [system("You name pets."), user("Suggest a name for a cat."), assistant("Whiskers."),
                             user("Something shorter?")],
                "chosen": assistant("Tom."), "rejected": assistant("Sir Fluffington.")}, {},
               [system("You name pets."), user("Suggest a name for a cat."), assistant("Whiskers."),
                user("Something shorter?")], "Tom.", "Sir Fluffington."),
    "openai_lists": ({"messages": [user("Is ice cold?")], "chosen": [assistant("Yes.")], "rejected": [assistant("No.")]},
                     {}, [user("Is ice cold?")], "Yes.", "No."),
    # LLaMA-Factory's older alpaca ranking layout: both answers in `output`, the chosen one first
    "alpaca_pairwise": ({"instruction": "Translate to French:", "input": "cat", "output": ["chat", "chien"],
                         "system": "You translate.", "history": [["Translate to French: dog", "chien"]]}, {},
                        [system("You translate."), user("Translate to French: dog"), assistant("chien"),
                         user("Translate to French:\ncat")], "chat", "chien"),
}
AUTO = {"triple": "triple", "trl": "trl", "trl_implicit": "trl", "hh": "hh", "sharegpt": "sharegpt", "alpaca": "alpaca",
        "ultrafeedback": "ultrafeedback", "openrlhf": "openrlhf", "openai": "sharegpt", "openai_lists": "sharegpt",
        "alpaca_pairwise": "alpaca"}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def swap_answers(record: dict, columns: dict) -> dict:
    """`record` with its chosen and rejected answers swapped."""
    if "output" in record:  # alpaca's [chosen, rejected]
        return record | {"output": record["output"][::-1]}
    ck, rk = (columns.get(k, k) for k in ("chosen", "rejected"))
    # UltraFeedback's `messages` copies the chosen dialogue (dropped: trl reads the rest); OpenAI's is the prompt
    rest = {k: v for k, v in record.items() if k != "messages" or v != record[ck]}
    return rest | {ck: record[rk], rk: record[ck]}


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
    held = write_jsonl(tmp_path / f"held-{name}.jsonl", [swap_answers(record, overrides.get("columns", {}))])
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
     r"f\.jsonl:1: the record has the prompt fields of data\.format=triple \('question'\) and data\.format=trl "
     r"\('prompt'\): data\.format=auto does not choose; no data\.format reads the record"),
    ({"conversations": [user("Hi")], "instruction": "Hi", "chosen": "a", "rejected": "b"}, "auto",
     r"prompt fields of data\.format=sharegpt \('conversations'\) and data\.format=alpaca \('instruction'\)"),
    ({"instruction": "Translate to French: cat", "input": "", "chosen": "chat", "rejected": "chien"}, "trl",
     r"f\.jsonl:1: fields 'instruction', 'input' not read as trl \(data\.format\); data\.format=alpaca would read the "
     r"record"),
    ({"question": "Sky?", "chosen": "Blue.", "rejected": "Red.", "output": "Blue."}, "auto",
     r"field 'output' not read as triple \(data\.format=auto chose it for this source\); no data\.format reads the record"),
    ({"prompt": "Hi", "chosen": "Hello.", "rejected": "Go."}, "hh",
     r"field 'prompt' not read as hh \(data\.format\); data\.format=trl would read the record"),
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
                                        "implicit prompt reads as plain text; data.format=hh would read the record"):
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


# A layout, the data.format/data.columns a user set, and what rmexp does: None, it reads the record; else the setting
# its DataError names. Every format of docs/data-formats.md as written there, the issue's layouts, each read in a
# wrong format, and near misses (a renamed field).
LAYOUTS = {
    **{name: (record, overrides.get("format", "auto"), overrides.get("columns"), None)
       for name, (record, overrides, *_) in CASES.items()},
    "openai read as trl": (CASES["openai"][0], "trl", None, "data.format=sharegpt"),
    "openai lists read as hh": (CASES["openai_lists"][0], "hh", None, "data.format=sharegpt"),
    "openai read as ultrafeedback": (CASES["openai"][0], "ultrafeedback", None, "data.format=sharegpt"),
    "alpaca pairwise read as trl": (CASES["alpaca_pairwise"][0], "trl", None, "data.format=alpaca"),
    "alpaca pairwise without an instruction": ({"input": "Name a prime.", "output": ["7", "8"]}, "auto", None,
                                               "data.format=alpaca"),
    "alpaca read as trl": (CASES["alpaca"][0], "trl", None, "data.format=alpaca"),
    "ultrafeedback read as trl": (CASES["ultrafeedback"][0], "trl", None, "data.format=ultrafeedback"),
    "ultrafeedback read as sharegpt": (CASES["ultrafeedback"][0], "sharegpt", None, "data.format=ultrafeedback"),
    "sharegpt read as triple": (CASES["sharegpt"][0], "triple", None, "data.format=sharegpt"),
    "triple read as alpaca": (CASES["triple"][0], "alpaca", None, "data.format=triple"),
    "hh read as trl": (CASES["hh"][0], "trl", None, "data.format=hh"),
    "trl read as hh": ({"prompt": "Hi", "chosen": "Hello.", "rejected": "Go."}, "hh", None, "data.format=trl"),
    "prompt renamed": ({"query": "Why is the sky blue?", "chosen": "Scattering.", "rejected": "Paint."}, "auto", None,
                       "data.columns.prompt=query"),
    "rejected renamed": ({"prompt": "Why?", "chosen": "Because.", "rejected_response": "No."}, "auto", None,
                         "data.columns.rejected=rejected_response"),
    "chosen as response": ({"prompt": "Why?", "response": "Because.", "rejected": "No."}, "auto", None,
                           "data.columns.chosen=response"),
    "instruction renamed": ({"instr": "Translate to French:", "input": "cat", "chosen": "chat", "rejected": "chien"},
                            "auto", None, "data.format=alpaca data.columns.prompt=instr"),
    "openrlhf columns under another format": (CASES["openrlhf"][0], "triple", CASES["openrlhf"][1]["columns"], None),
}


def applied(setting: str, fmt: str, columns: dict | None) -> tuple[str, dict]:
    """The data.format and data.columns after a user sets `setting` ('data.format=x data.columns.role=field')."""
    columns = dict(columns or {})
    for part in setting.split():
        name, value = part.split("=")
        if name == "data.format":
            fmt = value
        else:
            columns[name.removeprefix("data.columns.")] = value
    return fmt, columns


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_layout_reads_or_is_refused_with_a_setting_that_reads_it(name):
    record, fmt, columns, named = LAYOUTS[name]
    if named is None:
        parse_record(record, "f.jsonl:1", fmt, columns)
        return
    with pytest.raises(DataError) as caught:
        parse_record(record, "f.jsonl:1", fmt, columns)
    said = re.search(r"; (.+) would read the record", str(caught.value))
    assert str(caught.value).startswith("f.jsonl:1: field") and said, str(caught.value)
    assert said[1] == named
    for setting in said[1].split(" or "):  # the advice, taken: the very record reads
        parse_record(record, "f.jsonl:1", *applied(setting, fmt, columns))


def test_the_issues_openai_file_reads_under_auto_and_ultrafeedback_keeps_its_name(tmp_path, caplog):
    openai = CASES["openai_lists"][0]
    f = write_jsonl(tmp_path / "openai.jsonl", [openai, openai | {"rejected": [assistant("Maybe.")]}])
    with caplog.at_level(logging.INFO, logger="rmexp.dataset"):
        pairs, _ = read_pairs(f)  # before: read as hh, refused, and the hint (ultrafeedback) failed too
    assert f"{f}: data.format=auto reads it as sharegpt" in caplog.text and [p.rejected for p in pairs] == ["No.", "Maybe."]
    assert [p.prompt for p in read_pairs(f, format="sharegpt")[0]] == [[user("Is ice cold?")]] * 2
    uf = CASES["ultrafeedback"][0]  # `messages` beside `prompt` is UltraFeedback's copy of the chosen dialogue
    assert detect_format(uf, "uf:1") == "ultrafeedback"
    with pytest.raises(DataError, match=r"uf:1: field 'prompt' not read as sharegpt"):  # never its prompt
        parse_record({**uf, "messages": [user("What is 2+2?")]}, "uf:1", "sharegpt", {"prompt": "messages"})
    both = {"conversations": [user("Hi")], "messages": [user("Hi")], "chosen": assistant("a"), "rejected": assistant("b")}
    with pytest.raises(DataError, match=r"b:1: field 'messages' not read as sharegpt"):  # not one silently dropped
        parse_record(both, "b:1")


@pytest.mark.parametrize("output, named", [
    ("chat", r"field 'output' must be \[chosen, rejected\], two answers, got one text"),
    (["chat"], r"field 'output' must be \[chosen, rejected\], two answers, got a list of 1"),
    (["chat", "chien", "cheval"], r"field 'output' must be \[chosen, rejected\], two answers, got a list of 3"),
    ({"chosen": "chat"}, r"field 'output' must be \[chosen, rejected\], two answers, got dict"),
    (["chat", 3], r"field 'output\[1\]' must be a string, got int"),
    (["chat", " "], r"field 'output\[1\]' is empty"),
    (["chat", "chat "], r"fields 'output\[0\]' and 'output\[1\]' are identical apart from whitespace"),
])
def test_an_alpaca_output_that_is_not_two_answers_is_named(tmp_path, output, named):
    record = {"instruction": "Translate to French:", "input": "cat", "output": output}
    f = write_jsonl(tmp_path / "f.jsonl", [CASES["alpaca_pairwise"][0], record])
    for fmt in ("auto", "alpaca"):
        with pytest.raises(DataError, match=rf"{f}:2: {named}"):
            read_pairs(f, format=fmt)
    beside = {"instruction": "Hi", "chosen": "a", "rejected": "b", "output": ["a", "b"]}  # which answers? not guessed
    with pytest.raises(DataError, match=r"a:1: field 'output' not read as alpaca \(data\.format\); no data\.format reads"):
        parse_record(beside, "a:1", "alpaca")


def test_skipping_is_offered_only_when_most_records_are_good(tmp_path):
    # every record in one layout rmexp does not read as auto chose: the setting that reads it, and no offer to skip
    same = write_jsonl(tmp_path / "same.jsonl", [{"query": f"Q{i}?", "chosen": f"a{i}", "rejected": f"b{i}"}
                                                 for i in range(5)])
    with pytest.raises(DataError) as caught:
        read_pairs(same)
    assert str(caught.value) == (f"{same}:1: field 'query' not read as trl (data.format=auto chose it for this source); "
                                 f"data.format=trl data.columns.prompt=query would read the record (4 more bad records "
                                 f"in {same}; 0 good pairs)")
    assert len(read_pairs(same, format="trl", columns={"prompt": "query"})[0]) == 5  # the advice, taken
    one = write_jsonl(tmp_path / "one.jsonl", [{"question": "Q?", "chosen": "a"}])
    with pytest.raises(DataError) as caught:
        read_pairs(one)
    assert str(caught.value) == f"{one}:1: field 'rejected' is missing"
    # a few bad records among good ones: skipping them is the offer
    good = [{"question": f"Q{i}?", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(3)]
    few = write_jsonl(tmp_path / "few.jsonl", [*good, {"question": "Q?", "chosen": "a"}])
    with pytest.raises(DataError, match=rf"{few}:4: field 'rejected' is missing \(data\.on_error=skip skips and counts "
                                        r"such records\)$"):
        read_pairs(few)
    assert skip_hint("f", 3, 2) == " (data.on_error=skip skips and counts such records; 1 more bad records in f)"
    assert skip_hint("f", 2, 2) == " (1 more bad records in f; 2 good pairs)"
    # a stream knows the records read so far: one good pair before the first bad record is no majority
    for read_before, offered in ((1, False), (2, True)):
        counts = StreamCounts(["s.jsonl"], "raise", set(), "eval.jsonl")
        for line in range(read_before):
            assert counts.keep({"source_id": 0, "reason": None, "error": None, "key": line, "line": line + 1})
        with pytest.raises(DataError) as caught:
            counts.keep({"source_id": 0, "reason": "missing_field", "error": "s.jsonl:9: field 'rejected' is missing",
                         "key": 0, "line": 9})
        assert ("data.on_error=skip" in str(caught.value)) is offered
