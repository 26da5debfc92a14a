"""Preference pairs: read, validate, split, format and tokenize.

Every record becomes a `Pair`: the prompt as chat messages plus the chosen and rejected answers,
read in one of the formats of `data.format` (docs/data-formats.md): triple, trl, hh, sharegpt,
alpaca, ultrafeedback, openrlhf, or auto, which detects the format of a source and names it.

Bad input raises `DataError` naming the file, line and field; with `on_error=skip` the record is
skipped and counted by reason. Nothing is dropped silently. Files are read by rmexp.dataset (the one
reader of training, evaluation and the benches); this module reads records, splits and tokenizes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rmexp.errors import UserError

ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
              "model": "assistant", "system": "system", "bot": "assistant"}
HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")  # a text may start with its first marker, no blank line
HH_ASSISTANT = "\n\nAssistant:"
BOM = b"\xef\xbb\xbf"  # UTF-8 byte order mark, which some editors write at the start of a file

log = logging.getLogger(__name__)


class DataError(UserError, ValueError):
    """A preference file or record that cannot be used; the message names file, line and field."""

    def __init__(self, message: str, reason: str = "invalid"):
        super().__init__(message)
        self.reason = reason


Answer = str | list[dict[str, str]]  # an assistant reply, or the rest of a dialogue where two branches part


@dataclass
class Pair:
    prompt: list[dict[str, str]]  # chat messages before the answer; may be empty
    chosen: Answer
    rejected: Answer
    margin: float | None = None
    source: str | None = None  # a record's `source`/`subset` field, for per-source evaluation
    group: str | None = None  # a record's `group`: pairs of one group stay on one side of the split
    where: str = ""  # "file:line" for messages

    def key(self) -> str:
        """Identity of the pair's content, for duplicate and train/eval leakage checks."""
        return json.dumps([self.prompt, self.chosen, self.rejected], ensure_ascii=False)


def with_system_prompt(prompt: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """`prompt` with `system_prompt` as its first message, unless it has a system message already."""
    if not system_prompt or (prompt and prompt[0]["role"] == "system"):
        return prompt
    return [{"role": "system", "content": system_prompt}, *prompt]


def answer_text(answer: Answer) -> str:
    """The answer as plain text (for tables and logs)."""
    return answer if isinstance(answer, str) else "\n\n".join(m["content"] for m in answer)


@dataclass
class LoadStats:
    n_records: int = 0
    n_pairs: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count

    def as_dict(self) -> dict[str, Any]:
        return {"n_records": self.n_records, "n_pairs": self.n_pairs,
                "n_skipped": sum(self.skipped.values()), "skipped": dict(self.skipped)}


# ---------------------------------------------------------------- reading files


def iter_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield (location, record) for each record of a JSONL file or JSON array, location "file:line".
    A leading UTF-8 byte order mark is read past; a JSONL line that is not UTF-8 or not JSON is that line's
    error. A JSON array is one document: one that does not parse raises `broken_array`, whatever on_error says."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such preference file", reason="missing_file")
    data = path.read_bytes().removeprefix(BOM)
    if data.lstrip().startswith(b"["):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:  # one JSON document: one bad byte breaks it whole
            raise _broken_array(path, data.count(b"\n", 0, e.start) + 1,
                                f"not UTF-8 text ({e.reason} at byte {e.start})", "none of its records can be read") from e
        yield from _iter_array(path, text)
        return
    # b"\n" only: str.splitlines would also split inside a record at U+2028 or \x0c, which JSON allows raw
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield f"{path}:{lineno}", DataError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start})",
                                                reason="encoding")
            continue
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            yield f"{path}:{lineno}", DataError(
                f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})", reason="malformed_json")


def skip_hint(origin: str, n_good: int, n_bad: int) -> str:
    """What follows the first bad record's error under data.on_error=raise, given the source's good pairs and bad
    records (a stream: those read so far). data.on_error=skip is offered only while the good pairs outnumber the
    bad records: records that mostly fail share one problem (a layout that data.format or data.columns reads, a
    file of something else), and skipping them would train on the little left, or fail with no pairs."""
    more = f"{n_bad - 1} more bad records in {origin}" if n_bad > 1 else ""
    if n_good > n_bad:
        return f" (data.on_error=skip skips and counts such records{'; ' + more if more else ''})"
    return f" ({more}; {n_good} good pairs)" if more else ""


def _broken_array(path: Path, line: int, what: str, lost: str = "the records after it would be unread") -> DataError:
    """A JSON array that stops parsing: skipping the bad part is impossible, and going on without it would
    drop every record after it silently."""
    return DataError(f"{path}:{line}: {what}: the JSON array cannot be read past this point, so {lost}; fix the "
                     "file (data.on_error=skip skips bad JSONL lines, not part of an array)",
                     reason="broken_array")


def _iter_array(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    """Walk a JSON array element by element so each record keeps its line number."""
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")

    def line_at(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    pos = ws.match(text, text.index("[") + 1).end()
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise _broken_array(path, e.lineno, f"malformed JSON ({e.msg} at column {e.colno})") from e
        yield f"{path}:{line_at(pos)}", record
        pos = ws.match(text, end).end()
        if pos < len(text) and text[pos] == ",":
            pos = ws.match(text, pos + 1).end()
            continue
        if pos < len(text) and text[pos] == "]":
            if text[pos + 1:].strip():
                raise _broken_array(path, line_at(pos + 1), "malformed JSON (text after the array)",
                                    "that text (another array?) would be unread")
            return
        raise _broken_array(path, line_at(pos), "malformed JSON (expected ',' or ']' in the array)")


# ---------------------------------------------------------------- record formats
#
# A format names where a record keeps its prompt and answers (`data.format`; `auto` detects it per
# source). Each follows the tool its files come from: LLaMA-Factory's `alpaca` and `sharegpt`
# converters (src/llamafactory/data/converter.py), TRL's standard and conversational preference
# formats (`maybe_extract_prompt` for an implicit prompt), OpenRLHF's reward_dataset.py keys. Every
# format reads `system` as a system message and `history` ([[user, assistant], ...] or messages) as
# the turns before the prompt; `data.columns.<role>` renames a role's field for any format.

ROLES = ("prompt", "chosen", "rejected", "system", "history", "margin", "group", "source")
PROMPT_KEYS = {"triple": "question", "trl": "prompt", "hh": None, "sharegpt": "conversations", "alpaca": "instruction",
               "ultrafeedback": "prompt", "openrlhf": None}  # OpenRLHF's --prompt_key has no default either
EXTRA_KEYS = {"alpaca": ("input",), "sharegpt": ("tools",), "ultrafeedback": ("messages",)}  # read besides the roles
# What a message or a record can carry besides text; non-empty, it would be dropped, so it is refused.
UNREAD_MESSAGE_KEYS = ("tool_calls", "function_call", "reasoning", "reasoning_content", "images")
MEDIA_FIELDS = ("images", "videos", "audios")  # LLaMA-Factory's multimodal columns
# Fields that hold text some format (or a trainer's layout) reads: one left unread means the record was read in the
# wrong format. Which setting would read it is found by trying them (`_settings_that_read`), not from a table.
TEXT_FIELDS = frozenset({"question", "prompt", "conversations", "messages", "tools", "instruction", "input", "system",
                         "history", "chosen", "rejected", "output", "response", "completion", "query"})
# The formats a suggestion names, in the order tried. Not openrlhf: without data.columns it reads any two answer texts
# whole, with no prompt (HH dialogues with their markers), and with them any format reads the same fields.
FORMATS = ("triple", "trl", "hh", "sharegpt", "alpaca", "ultrafeedback")
LAYOUT_REASONS = ("unused_field", "missing_field", "ambiguous_format")  # errors a data.format or data.columns may fix
# Fields a format reads under their own name: never offered as a renamed role (data.columns.rejected=question would
# "read" a record that lacks its rejected answer).
FORMAT_FIELDS = frozenset({k for k in PROMPT_KEYS.values() if k} | {k for ks in EXTRA_KEYS.values() for k in ks}
                          | {"chosen", "rejected", "system", "history"})


def format_keys(fmt: str, columns: dict | None = None, record: dict | None = None) -> dict[str, Any]:
    """The field each role is read from in `fmt`, `columns` (data.columns, None: the format's own) applied.

    sharegpt reads its turns from `messages` in a `record` that has no prompt field of any format (OpenAI's
    layout, which LLaMA-Factory reads as sharegpt with columns.messages=messages). Beside a `prompt`,
    `messages` is UltraFeedback's copy of the chosen dialogue, not a prompt: that record stays ultrafeedback's."""
    prompt = PROMPT_KEYS[fmt]
    if fmt == "sharegpt" and record is not None and "messages" in record and not any(
            PROMPT_KEYS[f] in record for f in ("triple", "sharegpt", "alpaca", "trl")):
        prompt = "messages"
    keys = {"prompt": prompt, "chosen": "chosen", "rejected": "rejected", "system": "system",
            "history": "history", "margin": "margin", "group": "group", "source": ("source", "subset")}
    return keys | {k: v for k, v in (columns or {}).items() if v is not None}


def detect_format(record: dict, where: str, columns: dict | None = None) -> str:
    """The one format whose prompt field `record` has (by data.columns.prompt: trl, or ultrafeedback; `messages`
    alone: sharegpt, see format_keys); none: an implicit prompt (hh for texts with 'Human:'/'Assistant:' turns,
    trl for other texts and message lists). Two: a DataError naming a setting that reads the record, if one does."""
    try:
        return _detect_format(record, where, columns)
    except DataError as e:
        raise _with_suggestion(e, record, where, "auto", columns) from None


def _detect_format(record: dict, where: str, columns: dict | None = None) -> str:
    if (columns or {}).get("prompt"):
        found = {"trl": columns["prompt"]} if columns["prompt"] in record else {}
    else:
        found = {f: k for f in ("triple", "sharegpt", "alpaca", "trl")
                 if (k := format_keys(f, columns, record)["prompt"]) in record}
    if len(found) > 1:
        named = " and ".join(f"data.format={f} ('{k}')" for f, k in found.items())
        raise DataError(f"{where}: the record has the prompt fields of {named}: data.format=auto does not choose",
                        reason="ambiguous_format")
    if not found:  # an implicit prompt: HH's dialogues have its turn markers, TRL's standard texts do not
        keys = format_keys("hh", columns)
        chosen, rejected = record.get(keys["chosen"]), record.get(keys["rejected"])
        if isinstance(chosen, list) or (isinstance(chosen, str) and isinstance(rejected, str)
                                        and not HH_TURN.search(chosen) and not HH_TURN.search(rejected)):
            return "trl"
        return "hh"
    fmt = next(iter(found))
    if fmt == "trl":  # UltraFeedback as HuggingFaceH4 ships it: a prompt text the answers repeat as their first turn
        keys = format_keys("ultrafeedback", columns)
        prompt, answers = record[keys["prompt"]], [record.get(keys[k]) for k in ("chosen", "rejected")]
        if isinstance(prompt, str) and all(isinstance(a, list) and a and isinstance(a[0], dict)
                                           and _same_text(a[0].get("content", a[0].get("value")), prompt)
                                           for a in answers):
            return "ultrafeedback"
    return fmt


def _same_text(a: Any, b: Any) -> bool:
    """Two texts equal but for their ends' whitespace: a turn repeated from the prompt often gains or loses a
    trailing space or newline, and is still the same turn."""
    return isinstance(a, str) and isinstance(b, str) and a.strip() == b.strip()


def _same_turns(a: list[dict[str, str]], b: list[dict[str, str]]) -> bool:
    return len(a) == len(b) and all(x["role"] == y["role"] and _same_text(x["content"], y["content"])
                                    for x, y in zip(a, b, strict=True))


def _text(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}", reason="not_a_string")
    if not value.strip():
        raise DataError(f"{where}: field '{key}' is empty", reason="empty_field")
    return value


def _messages(items: Any, where: str, key: str) -> list[dict[str, str]]:
    if not isinstance(items, list):
        raise DataError(f"{where}: field '{key}' must be a list of messages, got {type(items).__name__}",
                        reason="bad_field")
    out = []
    for i, m in enumerate(items):
        if not isinstance(m, dict):
            raise DataError(f"{where}: field '{key}[{i}]' must be a message object", reason="bad_field")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if role not in ROLE_NAMES:
            raise DataError(f"{where}: field '{key}[{i}]' has unknown role {role!r}", reason="bad_field")
        if not isinstance(content, str):
            raise DataError(f"{where}: field '{key}[{i}]' content must be a string, got "
                            f"{type(content).__name__}", reason="not_a_string")
        unread = [k for k in UNREAD_MESSAGE_KEYS if m.get(k) not in (None, "", [], {})]
        if unread:
            raise DataError(f"{where}: field '{key}[{i}]' has {', '.join(map(repr, unread))}, which rmexp does not read: "
                            "the reward would be trained without it", reason="unread_content")
        out.append({"role": ROLE_NAMES[role], "content": content})
    return out


def _answer_turns(value: Any, where: str, key: str) -> list[dict[str, str]]:
    """An answer as messages: a text, one message ({"from": "gpt", "value": ...}) or a list ending with a reply."""
    if isinstance(value, dict):
        turns = _messages([value], where, key)
        if turns[0]["role"] != "assistant":
            raise DataError(f"{where}: field '{key}' must be an assistant message", reason="bad_field")
    elif isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        turns = _messages(value, where, key)
        if turns[-1]["role"] != "assistant":
            raise DataError(f"{where}: field '{key}' must end with an assistant message", reason="bad_field")
    else:
        turns = [{"role": "assistant", "content": _text(value, where, key)}]
    _text(turns[-1]["content"], where, key)
    return turns


def _history(value: Any, where: str, key: str) -> list[dict[str, str]]:
    """LLaMA-Factory's [[user, assistant], ...] or a list of messages."""
    if isinstance(value, list) and all(isinstance(t, (list, tuple)) for t in value):
        out = []
        for i, turn in enumerate(value):
            if len(turn) != 2:
                raise DataError(f"{where}: field '{key}[{i}]' must be a [user, assistant] pair", reason="bad_field")
            out += [{"role": "user", "content": _text(turn[0], where, f"{key}[{i}][0]")},
                    {"role": "assistant", "content": _text(turn[1], where, f"{key}[{i}][1]")}]
        return out
    return _messages(value, where, key)


def split_hh_dialogue(text: str) -> list[dict[str, str]]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> messages; text before the first marker becomes a user turn."""
    parts = HH_TURN.split(text)
    messages = []
    if parts[0].strip():
        messages.append({"role": "user", "content": parts[0].strip()})
    for speaker, content in zip(parts[1::2], parts[2::2], strict=True):
        role = "user" if speaker == "Human" else "assistant"
        if content.strip():
            messages.append({"role": role, "content": content.strip()})
    return messages


def _hh_turns(text: str, where: str, key: str) -> list[dict[str, str]]:
    """A whole HH dialogue as messages, ending with an assistant reply that has text."""
    turns = split_hh_dialogue(text)
    if not turns or turns[-1]["role"] != "assistant":
        last = HH_TURN.findall(text)[-1:]
        if last == ["Assistant"]:  # "...\n\nAssistant:" and nothing after it
            raise DataError(f"{where}: field '{key}' has an empty answer after the shared prompt", reason="empty_field")
        raise DataError(f"{where}: field '{key}' must end with an 'Assistant:' turn", reason="bad_field")
    return turns


def _implicit_cut(chosen: str, rejected: str) -> int:
    """Where two dialogues' answers start: after the last assistant marker in their shared part (0: none)."""
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    cut = chosen.rfind(HH_ASSISTANT, 0, n)
    return 0 if cut < 0 else cut + len(HH_ASSISTANT)


def _split_text_prefix(chosen: str, rejected: str) -> tuple[list[dict[str, str]], str, str]:
    """TRL's implicit prompt of two texts (maybe_extract_prompt): their common prefix, cut before a space."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if 0 < n and chosen[n - 1] == " ":
        n -= 1
    prompt = chosen[:n]
    return ([{"role": "user", "content": prompt.strip()}] if prompt.strip() else []), chosen[n:].strip(), rejected[n:].strip()


def _as_answer(messages: list[dict[str, str]]) -> Answer:
    if len(messages) == 1 and messages[0]["role"] == "assistant":
        return messages[0]["content"]
    return messages


def normalized(answer: Answer) -> Any:
    """An answer with each run of whitespace as one space, for the identical-pair check."""
    if isinstance(answer, str):
        return " ".join(answer.split())
    return [(m["role"], " ".join(m["content"].split())) for m in answer]


def _shared_turns(c: list[dict[str, str]], r: list[dict[str, str]]) -> int:
    """Leading messages two answers share, the last reply of each excepted."""
    k = 0
    while k < min(len(c), len(r)) - 1 and c[k] == r[k]:
        k += 1
    return k


def _prompt_and_answers(fmt: str, record: dict, where: str, keys: dict) -> tuple[list, list, list, bool]:
    """The prompt messages and both answers' messages of one record in `fmt`, before system and history, and
    whether the prompt was a field of its own (explicit) rather than what the answers share."""
    turns = {}
    for role in ("chosen", "rejected"):
        if keys[role] not in record:
            raise DataError(f"{where}: field '{keys[role]}' is missing", reason="missing_field")
        turns[role] = _answer_turns(record[keys[role]], where, keys[role])
    c, r, pk = turns["chosen"], turns["rejected"], keys["prompt"]
    if fmt == "sharegpt":
        tools = record.get("tools")
        if tools not in (None, "", "[]", [], {}):
            raise DataError(f"{where}: field 'tools' is not empty: tool use is not read (its calls and results would "
                            "be scored as plain text); remove the record or its tools", reason="tools")
        if pk not in record:
            raise DataError(f"{where}: field '{pk}' is missing", reason="missing_field")
        prompt = _messages(record[pk], where, pk)
        if not prompt or prompt[-1]["role"] != "user":  # LLaMA-Factory's ranking rule: the answers reply to a user turn
            raise DataError(f"{where}: field '{pk}' must end with a user turn", reason="bad_field")
        return prompt, c, r, True
    if fmt == "alpaca":  # LLaMA-Factory's converter: "instruction\ninput" is the user turn
        parts = [record[k] for k in (pk, "input") if record.get(k) not in (None, "")]
        for k in (pk, "input"):
            if record.get(k) is not None and not isinstance(record[k], str):
                _text(record[k], where, k)  # names the field and its type
        if not "".join(parts).strip():
            raise (DataError(f"{where}: field '{pk}' is empty", reason="empty_field") if pk in record
                   else DataError(f"{where}: field '{pk}' is missing", reason="missing_field"))
        return [{"role": "user", "content": "\n".join(parts)}], c, r, True
    if pk is not None and (pk in record or fmt in ("triple", "ultrafeedback") or pk != PROMPT_KEYS[fmt]):
        if pk not in record:  # the format's own prompt field, or one data.columns named
            raise DataError(f"{where}: field '{pk}' is missing", reason="missing_field")
        value = record[pk]
        prompt = (_messages(value, where, pk) if isinstance(value, list)
                  else [{"role": "user", "content": _text(value, where, pk)}])
        if fmt == "ultrafeedback" and record.get("messages") not in (None, record[keys["chosen"]]):
            raise DataError(f"{where}: field 'messages' differs from '{keys['chosen']}' (UltraFeedback keeps a copy of "
                            "the chosen dialogue there)", reason="bad_field")
        return prompt, c, r, True
    raw_c, raw_r = record[keys["chosen"]], record[keys["rejected"]]  # an implicit prompt: what both dialogues share
    if isinstance(raw_c, str) and isinstance(raw_r, str):
        if fmt == "hh":
            cut = _implicit_cut(raw_c, raw_r)
            if any(m[1] == "Human" and m.start() >= cut for text in (raw_c, raw_r) for m in HH_TURN.finditer(text)):
                # the dialogues part before a user turn: read as messages, as trl reads message lists
                c, r = _hh_turns(raw_c, where, keys["chosen"]), _hh_turns(raw_r, where, keys["rejected"])
                k = _shared_turns(c, r)
                return c[:k], c[k:], r[k:], False
            prompt, chosen, rejected = split_hh_dialogue(raw_c[:cut]) if cut else [], raw_c[cut:].strip(), raw_r[cut:].strip()
        elif fmt == "openrlhf":  # OpenRLHF without --prompt_key: each text whole, no prompt
            prompt, chosen, rejected = [], raw_c, raw_r
        else:
            for key, text in ((keys["chosen"], raw_c), (keys["rejected"], raw_r)):
                if HH_TURN.search(text):  # its shared text would be a prompt with the markers in it
                    raise DataError(f"{where}: field '{key}' holds 'Human:'/'Assistant:' turns, which {fmt}'s implicit "
                                    "prompt reads as plain text", reason="bad_field")
            prompt, chosen, rejected = _split_text_prefix(raw_c, raw_r)
        for key, text in ((keys["chosen"], chosen), (keys["rejected"], rejected)):
            if not text.strip():
                raise DataError(f"{where}: field '{key}' has an empty answer after the shared prompt",
                                reason="empty_field")
        return prompt, [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}], False
    k = _shared_turns(c, r)
    return c[:k], c[k:], r[k:], False


def parse_record(record: Any, where: str, fmt: str = "auto", columns: dict | None = None,
                 chosen_by: str = "data.format") -> Pair:
    """One record read as `fmt` (auto: as `detect_format` finds it) into a Pair; a DataError names what is wrong,
    and for a layout error the data.format/data.columns that reads this very record, if one does.
    `chosen_by` says in messages who chose `fmt`."""
    try:
        return _read_record(record, where, fmt, columns, chosen_by)
    except DataError as e:
        raise _with_suggestion(e, record, where, fmt, columns) from None


def _with_suggestion(e: DataError, record: Any, where: str, fmt: str, columns: dict | None) -> DataError:
    """`e`, and for a layout error (LAYOUT_REASONS) the settings that read `record` whole: each was tried on it,
    so the advice works on the record it is printed for. Without one, a missing answer field gets the fields
    the record has and how to name them. A field of the wrong shape (bad_field: HH dialogues read as trl texts)
    gets a setting only when one reads the record: most such records are wrong in any format."""
    if e.reason not in (*LAYOUT_REASONS, "bad_field") or not isinstance(record, dict):
        return e
    settings = _settings_that_read(record, where, fmt, columns)
    if settings:
        return DataError(f"{e}; {' or '.join(settings)} would read the record", e.reason)
    if e.reason == "bad_field":
        return e
    if e.reason != "missing_field":
        return DataError(f"{e}; no data.format reads the record", e.reason)
    others = _unread_fields(record, fmt if fmt != "auto" else _detect_format(record, where, columns), columns)
    if not others:
        return e
    return DataError(f"{e}; the record's fields {', '.join(map(repr, others))} are read by naming them: "
                     "data.format=openrlhf data.columns.prompt=<field> data.columns.chosen=<field> "
                     "data.columns.rejected=<field>", e.reason)


def _layout(record: dict, fmt: str, columns: dict | None) -> tuple[dict, dict]:
    """`record` and the field each role is read from in `fmt`, alpaca's `output` pair split as _read_record does."""
    keys = format_keys(fmt, columns, record)
    with contextlib.suppress(DataError):  # an `output` that is no pair stays as it is, unread
        record, keys = _output_pair(fmt, record, "", keys)
    return record, keys


def _unread_fields(record: dict, fmt: str, columns: dict | None) -> list[str]:
    """Fields of `record` that could hold a role's text and that `fmt` does not read."""
    record, keys = _layout(record, fmt, columns)
    read = {v for v in keys.values() if isinstance(v, str)} | set(EXTRA_KEYS.get(fmt, ()))
    return [k for k, v in record.items() if isinstance(v, (str, list, dict)) and k not in read and k not in MEDIA_FIELDS]


def _settings_that_read(record: dict, where: str, fmt: str, columns: dict | None) -> list[str]:
    """The data.format/data.columns settings under which `record` reads, each tried on it: every other format
    (data.columns kept), and under each format one prompt or answer role read from a field it leaves unread (a
    renamed field). Of those that read it, the ones that leave the fewest of its fields unread (`instr` beside
    `input`: data.format=alpaca data.columns.prompt=instr, not alpaca alone), a format before a renaming; a renaming
    only when one field does, as two would be a guess (which of them is the chosen answer?)."""
    columns = columns or {}
    ranked: dict[tuple, list[str]] = {}  # (fields left unread, renamed?) -> the settings
    seen: set = set()  # renamings and readings named: each once

    def consider(f: str, cols: dict, renamed: tuple | None) -> None:
        if renamed in seen:  # a renaming is named under the first format that reads with it
            return
        try:
            pair = _read_record(record, where, f, cols or None, "")
        except DataError:
            return
        reading = renamed or pair.key()  # formats that read the record alike (trl, ultrafeedback) are named once
        if reading in seen:
            return
        seen.add(reading)
        read_as = _detect_format(record, where, cols) if f == "auto" else f
        # a renaming names its format too: read through rmexp.dataset, `fmt` is what auto chose, and under auto the
        # renaming could be read in another format than the one it was tried in
        setting = ([f"data.format={f}"] if f != "auto" else []) + ([f"data.columns.{renamed[0]}={renamed[1]}"]
                                                                   if renamed else [])
        ranked.setdefault((len(_unread_fields(record, read_as, cols)), renamed is not None), []).append(" ".join(setting))

    for f in FORMATS:
        if f != fmt:
            consider(f, columns, None)
    for f in dict.fromkeys((fmt, *FORMATS)):
        try:
            read_as = _detect_format(record, where, columns) if f == "auto" else f
        except DataError:  # the prompt fields of two formats: no renaming makes auto read both
            continue
        split, keys = _layout(record, read_as, columns)
        missing = [role for role in ("chosen", "rejected") if keys[role] not in split]
        if len(missing) > 1:  # one renaming cannot supply two answers
            continue
        for role in missing or (["prompt"] if keys["prompt"] not in split else []):
            for k in _unread_fields(record, read_as, columns):
                if k not in FORMAT_FIELDS:
                    consider(f, columns | {role: k}, (role, k))
    if not ranked:
        return []
    best = min(ranked)
    return ranked[best] if not best[1] or len(ranked[best]) == 1 else []


def _output_pair(fmt: str, record: dict, where: str, keys: dict) -> tuple[dict, dict]:
    """LLaMA-Factory's older alpaca ranking layout keeps both answers in `output`: [chosen, rejected] (its converter
    made the list the responses, the first one preferred). Read as two fields named by their place, so that an
    error names `output[0]` or `output[1]`."""
    if fmt != "alpaca" or "output" not in record or keys["chosen"] in record or keys["rejected"] in record:
        return record, keys
    output = record["output"]
    if not isinstance(output, list) or len(output) != 2:
        got = (f"a list of {len(output)}" if isinstance(output, list) else "one text (a fine-tuning record: no "
               "rejected answer)" if isinstance(output, str) else type(output).__name__)
        raise DataError(f"{where}: field 'output' must be [chosen, rejected], two answers, got {got}", reason="bad_field")
    answers = {"output[0]": output[0], "output[1]": output[1]}
    return ({k: v for k, v in record.items() if k != "output"} | answers,
            keys | {"chosen": "output[0]", "rejected": "output[1]"})


def _read_record(record: Any, where: str, fmt: str, columns: dict | None, chosen_by: str) -> Pair:
    """parse_record without the suggestion, which is found by calling this."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: record is a {type(record).__name__}, expected a JSON object",
                        reason="not_an_object")
    if fmt == "auto":
        fmt, chosen_by = _detect_format(record, where, columns), "data.format=auto"
    keys = format_keys(fmt, columns, record)
    record, keys = _output_pair(fmt, record, where, keys)
    readable = {keys[k] for k in ROLES if isinstance(keys[k], str)} | set(EXTRA_KEYS.get(fmt, ()))
    unread = [k for k in record if k in TEXT_FIELDS and k not in readable]
    if unread:
        raise DataError(f"{where}: field{'s' if len(unread) > 1 else ''} {', '.join(repr(k) for k in unread)} not read "
                        f"as {fmt} ({chosen_by})", reason="unused_field")
    media = [k for k in MEDIA_FIELDS if record.get(k) not in (None, "", [], {})]
    if media:
        raise DataError(f"{where}: field{'s' if len(media) > 1 else ''} {', '.join(map(repr, media))} not read: rmexp "
                        "trains on text, and the text alone would be scored", reason="unread_content")
    prompt, c, r, explicit = _prompt_and_answers(fmt, record, where, keys)
    if explicit:
        # Turns that end the prompt and start both answers (UltraFeedback repeats the user turn) are taken once,
        # the prompt's copy kept. Any other turn before an answer's reply would be scored as part of the answer.
        k = min(len(prompt), len(c) - 1, len(r) - 1)
        while k > 0 and not (_same_turns(c[:k], prompt[-k:]) and _same_turns(r[:k], prompt[-k:])):
            k -= 1
        c, r = c[k:], r[k:]
        for key, turns in ((keys["chosen"], c), (keys["rejected"], r)):
            if turns[0]["role"] == "assistant":
                continue
            if prompt and _same_turns(turns[:1], prompt[-1:]):
                raise DataError(f"{where}: field '{key}' repeats the prompt's last turn and the other answer does not",
                                reason="bad_field")
            raise DataError(f"{where}: field '{key}' starts with a {turns[0]['role']} turn that is not the end of the "
                            f"prompt ('{keys['prompt']}'): an answer after an explicit prompt must start with the "
                            "reply, or repeat the prompt's last turns", reason="bad_field")
    system = record.get(keys["system"])
    history = _history(record[keys["history"]], where, keys["history"]) if record.get(keys["history"]) else []
    own = prompt[:1] if prompt and prompt[0]["role"] == "system" else []
    if system not in (None, ""):
        system = _text(system, where, keys["system"])
        if own and own[0]["content"] != system:
            raise DataError(f"{where}: field '{keys['system']}' and the prompt's own system message differ",
                            reason="bad_field")
        own = [{"role": "system", "content": system}]
    prompt = own + history + prompt[1 if prompt and prompt[0]["role"] == "system" else 0:]
    chosen, rejected = _as_answer(c), _as_answer(r)
    if normalized(chosen) == normalized(rejected):  # a pair that differs in spacing alone teaches nothing
        raise DataError(f"{where}: fields '{keys['chosen']}' and '{keys['rejected']}' are identical"
                        + ("" if chosen == rejected else " apart from whitespace"), reason="identical_pair")
    margin = record.get(keys["margin"])
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        raise DataError(f"{where}: field '{keys['margin']}' must be a number, got {type(margin).__name__}",
                        reason="bad_field")
    if margin is not None and not math.isfinite(margin):  # JSON's NaN/Infinity, Parquet's nan: a loss of nan
        raise DataError(f"{where}: field '{keys['margin']}' must be finite, got {margin}", reason="bad_field")
    source_keys = keys["source"] if isinstance(keys["source"], tuple) else (keys["source"],)
    source = next((record[k] for k in source_keys if record.get(k) is not None), None)
    group = record.get(keys["group"])
    return Pair(prompt=prompt, chosen=chosen, rejected=rejected,
                margin=None if margin is None else float(margin),
                source=None if source is None else str(source),
                group=None if group is None else str(group), where=where)


def held_out(groups: list[str | None], eval_fraction: float, seed: int, where: str = "data") -> set[int]:
    """Indices held out for evaluation: a seeded share of the groups (None: an item is its own group);
    both sides keep at least one group.

    Grouping keeps an item and its translation (or paraphrase) on one side, so the eval set never
    scores an answer the model was trained on in another language.
    """
    if all(g is None for g in groups):  # each pair its own group: the same draw without a dict of a million keys
        members, order = None, list(range(len(groups)))
    else:
        members = {}
        for i, g in enumerate(groups):
            members.setdefault(g if g is not None else f"\0{i}", []).append(i)
        order = list(members)
    if len(order) < 2:
        raise DataError(f"{where}: need at least 2 pairs (or groups) to hold some out for evaluation; "
                        "set data.eval_path", reason="no_pairs")
    random.Random(seed).shuffle(order)  # a shuffle's permutation depends on the length alone, not the items
    n_eval = min(len(order) - 1, max(1, round(len(order) * eval_fraction)))
    return set(order[:n_eval]) if members is None else {i for g in order[:n_eval] for i in members[g]}


# ---------------------------------------------------------------- formatting and tokens


def _answer_messages(answer: Answer) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": answer}] if isinstance(answer, str) else answer


def render(tokenizer, prompt: list[dict[str, str]], answer: Answer,
           heads: dict | None = None) -> tuple[str | None, str]:
    """Text of the prompt and of the answer, through the chat template when the tokenizer has one.

    Returns (None, whole text) for a template that rewrites earlier turns once an answer follows, so
    that the prompt render is not a prefix of the whole. `heads` caches prompt renders by prompt
    object: a pair's two answers share one.
    """
    messages = _answer_messages(answer)
    replies = messages[0]["role"] == "assistant"
    if getattr(tokenizer, "chat_template", None):
        heads = {} if heads is None else heads
        key = (id(prompt), replies)
        if key not in heads:
            heads[key] = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=replies) if prompt else ""
        head = heads[key]
        full = tokenizer.apply_chat_template(prompt + messages, tokenize=False)
        return (head, full[len(head):]) if full.startswith(head) else (None, full)
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    head = "".join(f"{names[m['role']]}: {m['content']}\n\n" for m in prompt)
    turns = [f"{names[m['role']]}: {m['content']}" for m in messages]
    if replies:
        turns[0] = messages[0]["content"]
        head += "Assistant: " if prompt else ""
    return head, "\n\n".join(turns)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass
class Encoded:
    """One answer's token ids (prompt + answer, fitted to max_length)."""

    ids: list[int]
    prompt_len: int  # prompt tokens kept in `ids`
    prompt_tokens: int  # prompt tokens before truncation
    answer_tokens: int  # answer tokens before truncation
    prompt_truncated: bool
    answer_truncated: bool


def keep_last(ids: list[int], n: int, bos_token_id: int | None) -> list[int]:
    """The last `n` tokens of `ids` (none when n <= 0), a leading BOS kept within them."""
    lead = ids[:1] if bos_token_id is not None and ids and ids[0] == bos_token_id else []
    keep = max(n - len(lead), 0)
    return lead + (ids[-keep:] if keep else [])


def _token_ids(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """Token ids of many texts in one tokenizer call (the same ids as one call each). verbose=False: rmexp fits
    each sequence to max_length itself (encode_answers), so transformers' warning that a text is longer than the
    tokenizer's model_max_length ("... will result in indexing errors") is untrue of what is trained or scored."""
    return tokenizer(texts, add_special_tokens=add_special_tokens, verbose=False)["input_ids"] if texts else []


def encode_answers(tokenizer, items: list[tuple[list[dict[str, str]], Answer]], max_length: int) -> list[Encoded]:
    """Tokens of each (prompt, answer) after its prompt, fitted to max_length on its own.

    Over-long sequences lose prompt tokens from the left (a leading BOS is kept), and only an answer
    that alone is too long is cut from the right. Each answer is fitted by itself, so a pair's
    answers and a single `RewardModel.score` call see the same tokens. All texts go through the
    tokenizer in two batched calls, and a prompt object shared by several items is rendered and
    tokenized once.
    """
    templated = bool(getattr(tokenizer, "chat_template", None))
    heads: dict = {}
    rendered = [render(tokenizer, prompt, answer, heads) for prompt, answer in items]
    # the prompt gets the tokenizer's special tokens only for plain text (a chat template writes its own BOS)
    prompt_texts = list(dict.fromkeys(h for h, _ in rendered if h is not None and (h or not templated)))
    prompt_ids = dict(zip(prompt_texts, _token_ids(tokenizer, prompt_texts, not templated), strict=True))
    answer_ids_all = _token_ids(tokenizer, [text for _, text in rendered], False)
    out = []
    for (prompt, _), (head, _), answer_ids in zip(items, rendered, answer_ids_all, strict=True):
        if head is None:  # no clean prompt/answer boundary: split where the prompt's own render stops matching
            p_ids = _token_ids(tokenizer, [tokenizer.apply_chat_template(prompt, tokenize=False,
                                                                         add_generation_prompt=True)], False)[0]
            k = min(_common_prefix(p_ids, answer_ids), len(answer_ids) - 1)
            p_ids, answer_ids = answer_ids[:k], answer_ids[k:]
        else:
            p_ids = prompt_ids.get(head, [])
            if not templated and tokenizer.eos_token_id is not None:
                answer_ids = answer_ids + [tokenizer.eos_token_id]
        out.append(_fit(tokenizer, p_ids, answer_ids, max_length))
    return out


def _fit(tokenizer, prompt_ids: list[int], answer_ids: list[int], max_length: int) -> Encoded:
    n_prompt, n_answer = len(prompt_ids), len(answer_ids)
    keep = max_length - len(answer_ids)
    prompt_truncated = len(prompt_ids) > max(keep, 0)
    if prompt_truncated:
        prompt_ids = keep_last(prompt_ids, keep, tokenizer.bos_token_id)
    room = max_length - len(prompt_ids)
    answer_truncated = len(answer_ids) > room
    answer_ids = answer_ids[:room]
    return Encoded(prompt_ids + answer_ids, len(prompt_ids), n_prompt, n_answer, prompt_truncated, answer_truncated)


def encode_answer(tokenizer, prompt: list[dict[str, str]], answer: Answer, max_length: int) -> Encoded:
    """`encode_answers` of one answer."""
    return encode_answers(tokenizer, [(prompt, answer)], max_length)[0]


def encode_rendered(tokenizer, prompt_text: str, answer_text: str, max_length: int) -> Encoded:
    """Tokens of a prompt already through the chat template and of the answer text the template
    wrote after it, tokenized apart and fitted as `encode_answers` does for templated pairs."""
    prompt_ids, answer_ids = _token_ids(tokenizer, [prompt_text, answer_text], False)
    return _fit(tokenizer, prompt_ids, answer_ids, max_length)


def last_non_pad(ids: list[int], pad_token_id: int | None) -> int:
    for k in range(len(ids) - 1, -1, -1):
        if ids[k] != pad_token_id:
            return k
    return len(ids) - 1


@dataclass
class EncodedPair:
    chosen: Encoded
    rejected: Encoded
    shared_len: int  # leading tokens the two sequences share (computed once in packed batches)

    @property
    def truncated(self) -> bool:
        return any(e.prompt_truncated or e.answer_truncated for e in (self.chosen, self.rejected))

    @property
    def identical(self) -> bool:
        """Both answers fitted to the same tokens (only possible after truncation): a certain tie."""
        return self.chosen.ids == self.rejected.ids


def encode_pairs(tokenizer, pairs: list[Pair], max_length: int) -> list[EncodedPair]:
    """Both answers of each pair, each fitted to max_length as `encode_answers` does, and their shared prefix.

    The shared prefix stops before the token each reward is read at (the last non-pad token), so
    each answer keeps that token in its own part of a packed segment.
    """
    answers = encode_answers(tokenizer, [(p.prompt, a) for p in pairs for a in (p.chosen, p.rejected)], max_length)
    pad = tokenizer.pad_token_id
    out = []
    for chosen, rejected in zip(answers[0::2], answers[1::2], strict=True):
        shared = min(_common_prefix(chosen.ids, rejected.ids), last_non_pad(chosen.ids, pad),
                     last_non_pad(rejected.ids, pad))
        out.append(EncodedPair(chosen, rejected, shared))
    return out


def encode_pair(tokenizer, pair: Pair, max_length: int) -> EncodedPair:
    """`encode_pairs` of one pair."""
    return encode_pairs(tokenizer, [pair], max_length)[0]


def tokenize_pairs(tokenizer, pairs: list[Pair], max_length: int):
    """A datasets.Dataset of full `chosen_ids`/`rejected_ids` (TRL's processed format) plus `prompt_len`
    (the shared prefix) and answer lengths, and the truncation counts."""
    from datasets import Dataset

    rows, counts = [], Counter()
    for pair, enc in zip(pairs, encode_pairs(tokenizer, pairs, max_length), strict=True):
        counts["prompt_truncated"] += enc.chosen.prompt_truncated or enc.rejected.prompt_truncated
        counts["answer_truncated"] += enc.chosen.answer_truncated or enc.rejected.answer_truncated
        counts["truncated"] += enc.truncated
        counts["identical_after_truncation"] += enc.identical
        row = {"chosen_ids": enc.chosen.ids, "rejected_ids": enc.rejected.ids, "prompt_len": enc.shared_len,
               "chosen_tokens": enc.chosen.answer_tokens, "rejected_tokens": enc.rejected.answer_tokens}
        if pair.margin is not None:
            row["margin"] = pair.margin
        rows.append(row)
    return Dataset.from_list(rows), {f"n_{k}": v for k, v in sorted(counts.items())}
