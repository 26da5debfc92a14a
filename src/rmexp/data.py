"""Preference pairs: read, validate, split, format and tokenize.

Every record format becomes a `Pair`: the prompt as chat messages plus the chosen and rejected
answers. Formats are detected per record:

- seed        {"question", "chosen", "rejected"}
- TRL         {"prompt", "chosen", "rejected"} (strings or message lists)
- implicit    {"chosen", "rejected"}: whole dialogues sharing a prefix (HH-RLHF); the prompt is the
              common prefix cut at the last turn boundary
- ShareGPT    {"conversations": [{"from", "value"}], "chosen": {"from", "value"}, "rejected": {...}}

Files are JSONL or one JSON array. Bad input raises `DataError` naming the file, line and field;
with `on_error=skip` the record is skipped and counted by reason. Nothing is dropped silently.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
              "model": "assistant", "system": "system", "bot": "assistant"}
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ASSISTANT = "\n\nAssistant:"


class DataError(ValueError):
    """A preference file or record that cannot be used; the message names file, line and field."""

    def __init__(self, message: str, reason: str = "invalid"):
        super().__init__(message)
        self.reason = reason


@dataclass
class Pair:
    prompt: list[dict[str, str]]  # chat messages before the answer; may be empty
    chosen: str
    rejected: str
    margin: float | None = None
    source: str | None = None  # a record's `source`/`subset` field, for per-source evaluation
    where: str = ""  # "file:line" for messages


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
    """Yield (location, record) for each record of a JSONL file or JSON array, location "file:line"."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such preference file", reason="missing_file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})", reason="encoding") from e
    if text.lstrip().startswith("["):
        yield from _iter_array(path, text)
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            yield f"{path}:{lineno}", DataError(
                f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})", reason="malformed_json")


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
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})",
                            reason="malformed_json") from e
        yield f"{path}:{line_at(pos)}", record
        pos = ws.match(text, end).end()
        if pos < len(text) and text[pos] == ",":
            pos = ws.match(text, pos + 1).end()
            continue
        if pos < len(text) and text[pos] == "]":
            if text[pos + 1:].strip():
                raise DataError(f"{path}:{line_at(pos + 1)}: malformed JSON (text after the array)",
                                reason="malformed_json")
            return
        raise DataError(f"{path}:{line_at(pos)}: malformed JSON (expected ',' or ']' in the array)",
                        reason="malformed_json")


# ---------------------------------------------------------------- record formats


def _text(record: dict, key: str, where: str) -> str:
    if key not in record:
        raise DataError(f"{where}: field '{key}' is missing", reason="missing_field")
    value = record[key]
    if isinstance(value, dict) and "value" in value:  # ShareGPT answer {"from": "gpt", "value": ...}
        value = value["value"]
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        value = _messages(value, where, key)
        if value[-1]["role"] != "assistant":
            raise DataError(f"{where}: field '{key}' must end with an assistant message", reason="bad_field")
        value = value[-1]["content"]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}",
                        reason="not_a_string")
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
        out.append({"role": ROLE_NAMES[role], "content": content})
    return out


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


def _split_implicit(chosen: str, rejected: str) -> tuple[list[dict[str, str]], str, str]:
    """Shared dialogue up to the last assistant turn is the prompt; the rest are the answers."""
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    cut = chosen.rfind(HH_ASSISTANT, 0, n)
    if cut < 0:
        return [], chosen, rejected
    cut += len(HH_ASSISTANT)
    return split_hh_dialogue(chosen[:cut]), chosen[cut:].strip(), rejected[cut:].strip()


def parse_record(record: Any, where: str) -> Pair:
    if not isinstance(record, dict):
        raise DataError(f"{where}: record is a {type(record).__name__}, expected a JSON object",
                        reason="not_an_object")
    chosen = _text(record, "chosen", where)
    rejected = _text(record, "rejected", where)
    if "conversations" in record:
        prompt = _messages(record["conversations"], where, "conversations")
    elif "question" in record:
        prompt = [{"role": "user", "content": _text(record, "question", where)}]
    elif "prompt" in record:
        if isinstance(record["prompt"], list):
            prompt = _messages(record["prompt"], where, "prompt")
        else:
            prompt = [{"role": "user", "content": _text(record, "prompt", where)}]
    elif isinstance(record["chosen"], list) and isinstance(record["rejected"], list):
        c = _messages(record["chosen"], where, "chosen")
        r = _messages(record["rejected"], where, "rejected")
        k = 0
        while k < min(len(c), len(r)) - 1 and c[k] == r[k]:
            k += 1
        prompt = c[:k]
    else:
        prompt, chosen, rejected = _split_implicit(chosen, rejected)
        if not chosen.strip() or not rejected.strip():
            field_name = "chosen" if not chosen.strip() else "rejected"
            raise DataError(f"{where}: field '{field_name}' has an empty answer after the shared prompt",
                            reason="empty_field")
    if chosen == rejected:
        raise DataError(f"{where}: fields 'chosen' and 'rejected' are identical", reason="identical_pair")
    margin = record.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        raise DataError(f"{where}: field 'margin' must be a number, got {type(margin).__name__}",
                        reason="bad_field")
    source = record.get("source", record.get("subset"))
    return Pair(prompt=prompt, chosen=chosen, rejected=rejected,
                margin=None if margin is None else float(margin),
                source=None if source is None else str(source), where=where)


def load_pairs(path: str | Path, max_pairs: int | None = None, on_error: str = "raise") -> tuple[list[Pair], LoadStats]:
    """Read up to `max_pairs` valid pairs from a file. Raises DataError, or skips and counts with on_error=skip."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if max_pairs is not None and max_pairs <= 0:
        raise DataError(f"{path}: data.max_pairs must be positive, got {max_pairs}", reason="config")
    stats = LoadStats()
    pairs: list[Pair] = []
    seen: dict[tuple, str] = {}
    records = iter_records(path)
    while True:
        try:
            where, record = next(records)
        except StopIteration:
            break
        except DataError as e:  # the array itself is broken: nothing after it can be read
            if on_error == "raise":
                raise
            stats.skipped[e.reason] += 1
            break
        stats.n_records += 1
        try:
            if isinstance(record, DataError):
                raise record
            pair = parse_record(record, where)
            key = (json.dumps(pair.prompt, ensure_ascii=False), pair.chosen, pair.rejected)
            if key in seen:
                raise DataError(f"{where}: duplicate of the pair at {seen[key]}", reason="duplicate_pair")
            seen[key] = where
        except DataError as e:
            if on_error == "raise":
                raise DataError(f"{e} (data.on_error=skip skips and counts such records)", e.reason) from None
            stats.skipped[e.reason] += 1
            continue
        pairs.append(pair)
        if max_pairs is not None and len(pairs) >= max_pairs:
            break
    if not pairs:
        raise DataError(f"{path}: no preference pairs (read {stats.n_records} records, "
                        f"skipped {dict(stats.skipped) or 0})", reason="no_pairs")
    if any(p.margin is not None for p in pairs):  # one margin column: pairs without one get 0
        for p in pairs:
            p.margin = 0.0 if p.margin is None else p.margin
    stats.n_pairs = len(pairs)
    return pairs, stats


def split_pairs(pairs: list[Pair], eval_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Seeded held-out split; both sides keep at least one pair."""
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"data.eval_fraction must be in (0, 1), got {eval_fraction}", reason="config")
    if len(pairs) < 2:
        raise DataError(f"{pairs[0].where if pairs else 'data'}: need at least 2 pairs to hold some out for "
                        "evaluation; set data.eval_path", reason="no_pairs")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(pairs) - 1, max(1, round(len(pairs) * eval_fraction)))
    held = set(order[:n_eval])
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


# ---------------------------------------------------------------- formatting and tokens


def render(tokenizer, prompt: list[dict[str, str]], answer: str) -> tuple[str, str]:
    """Text of the prompt and of the answer, through the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) if prompt else ""
        full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": answer}], tokenize=False)
        if full.startswith(head):
            return head, full[len(head):]
        return "", full  # a template that rewrites earlier turns: score the whole text as one
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    head = "".join(f"{names[m['role']]}: {m['content']}\n\n" for m in prompt)
    return head + ("Assistant: " if prompt else ""), answer


@dataclass
class Encoded:
    prompt_ids: list[int]
    chosen_ids: list[int]  # answer tokens only
    rejected_ids: list[int]
    prompt_truncated: bool
    answer_truncated: bool


def encode_pair(tokenizer, pair: Pair, max_length: int) -> Encoded:
    """Tokens of prompt and answers; each full sequence fits max_length.

    Over-long pairs lose prompt tokens from the left (a leading BOS is kept), and only when an
    answer alone is too long is it cut from the right.
    """
    templated = bool(getattr(tokenizer, "chat_template", None))
    head, chosen_text = render(tokenizer, pair.prompt, pair.chosen)
    _, rejected_text = render(tokenizer, pair.prompt, pair.rejected)
    # A chat template writes its own BOS; plain text gets the tokenizer's special tokens on the prompt.
    prompt_ids = tokenizer(head, add_special_tokens=not templated)["input_ids"] if head or not templated else []
    chosen_ids = tokenizer(chosen_text, add_special_tokens=False)["input_ids"]
    rejected_ids = tokenizer(rejected_text, add_special_tokens=False)["input_ids"]
    if not templated and tokenizer.eos_token_id is not None:
        chosen_ids = chosen_ids + [tokenizer.eos_token_id]
        rejected_ids = rejected_ids + [tokenizer.eos_token_id]

    prompt_truncated = answer_truncated = False
    keep = max_length - max(len(chosen_ids), len(rejected_ids))
    if len(prompt_ids) > max(keep, 0):
        prompt_truncated = True
        bos = tokenizer.bos_token_id
        lead = prompt_ids[:1] if bos is not None and prompt_ids and prompt_ids[0] == bos else []
        keep = max(keep - len(lead), 0)
        prompt_ids = lead + (prompt_ids[-keep:] if keep else [])
    room = max_length - len(prompt_ids)
    if len(chosen_ids) > room or len(rejected_ids) > room:
        answer_truncated = True
        chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
    return Encoded(prompt_ids, chosen_ids, rejected_ids, prompt_truncated, answer_truncated)


def tokenize_pairs(tokenizer, pairs: list[Pair], max_length: int):
    """A datasets.Dataset of full `chosen_ids`/`rejected_ids` (TRL's processed format) and truncation counts."""
    from datasets import Dataset

    if max_length < 8:
        raise DataError(f"trainer.max_length must be at least 8, got {max_length}", reason="config")
    rows, counts = [], Counter()
    for pair in pairs:
        enc = encode_pair(tokenizer, pair, max_length)
        counts["prompt_truncated"] += enc.prompt_truncated
        counts["answer_truncated"] += enc.answer_truncated
        counts["truncated"] += enc.prompt_truncated or enc.answer_truncated
        row = {"chosen_ids": enc.prompt_ids + enc.chosen_ids, "rejected_ids": enc.prompt_ids + enc.rejected_ids,
               "prompt_len": len(enc.prompt_ids)}
        if pair.margin is not None:
            row["margin"] = pair.margin
        rows.append(row)
    return Dataset.from_list(rows), {f"n_{k}": v for k, v in sorted(counts.items())}
