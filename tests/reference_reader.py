"""The in-memory reader rmexp had before issue 23 (src/rmexp/data.py at 7c68345), kept as a reference only:
tests compare the one datasets-backed reader (rmexp.dataset) with it on the files both read, so a file
that loaded before loads to the same pairs and tokens. Not used by rmexp itself."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rmexp.data import (
    HH_ASSISTANT,
    HH_TURN,
    ROLE_NAMES,
    Answer,
    DataError,
    LoadStats,
    Pair,
    held_out,
    with_system_prompt,
)

log = logging.getLogger(__name__)


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
    # "\n" only: str.splitlines would also split inside a record at U+2028 or \x0c, which JSON allows raw
    for lineno, line in enumerate(text.split("\n"), start=1):
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


def _as_answer(messages: list[dict[str, str]]) -> Answer:
    if len(messages) == 1 and messages[0]["role"] == "assistant":
        return messages[0]["content"]
    return messages


def parse_record(record: Any, where: str) -> Pair:
    if not isinstance(record, dict):
        raise DataError(f"{where}: record is a {type(record).__name__}, expected a JSON object",
                        reason="not_an_object")
    chosen = _text(record, "chosen", where)
    rejected = _text(record, "rejected", where)
    # An answer given as several messages (a reply, a follow-up, a reply...) keeps every turn.
    chosen, rejected = (_as_answer(_messages(record[k], where, k)) if isinstance(record[k], list) and len(record[k]) > 1
                        else text for k, text in (("chosen", chosen), ("rejected", rejected)))
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
        # Everything after the shared turns is the answer, however many turns it holds.
        prompt, chosen, rejected = c[:k], _as_answer(c[k:]), _as_answer(r[k:])
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
    group = record.get("group")
    return Pair(prompt=prompt, chosen=chosen, rejected=rejected,
                margin=None if margin is None else float(margin),
                source=None if source is None else str(source),
                group=None if group is None else str(group), where=where)


def load_pairs(path: str | Path, max_pairs: int | None = None, on_error: str = "raise") -> tuple[list[Pair], LoadStats]:
    """Read up to `max_pairs` valid pairs from a file. Raises DataError, or skips and counts with on_error=skip."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if max_pairs is not None and max_pairs <= 0:
        raise DataError(f"{path}: data.max_pairs must be positive, got {max_pairs}", reason="config")
    stats = LoadStats()
    pairs: list[Pair] = []
    seen: dict[str, str] = {}
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
            key = pair.key()
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
    """`held_out` applied to pairs: (train, eval), each in file order."""
    held = held_out([p.group for p in pairs], eval_fraction, seed, pairs[0].where if pairs else "data")
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


def drop_leaked(train: list[Pair], eval_: list[Pair], on_error: str) -> tuple[list[Pair], int]:
    """Train pairs that also stand in the eval file: a DataError naming both places, or skipped and counted."""
    in_eval = {p.key(): p.where for p in eval_}
    leaked = [p for p in train if p.key() in in_eval]
    if leaked and on_error == "raise":
        p = leaked[0]
        raise DataError(f"{p.where}: the same pair is in the eval file at {in_eval[p.key()]} ({len(leaked)} such "
                        "pairs): train/eval leakage (data.on_error=skip drops them from training and counts them)",
                        reason="in_eval_file")
    return [p for p in train if p.key() not in in_eval], len(leaked)


def load_data(data_cfg):
    """Train and eval pairs, and what was read/skipped, before any model is loaded."""
    on_error = data_cfg.on_error.value
    files = {"train_file": data_cfg.path}
    if data_cfg.eval_path:
        files["eval_file"] = data_cfg.eval_path
    loaded, file_stats = {}, {}
    for role, path in files.items():
        loaded[role], file_stats[role] = load_pairs(path, data_cfg.max_pairs, on_error)
    if data_cfg.eval_path:
        loaded["train_file"], n_leaked = drop_leaked(loaded["train_file"], loaded["eval_file"], on_error)
        if n_leaked:
            file_stats["train_file"].skipped["in_eval_file"] += n_leaked
            file_stats["train_file"].n_pairs -= n_leaked
    stats = {role: st.as_dict() for role, st in file_stats.items()}
    for role, path in files.items():
        if file_stats[role].skipped:
            msg = (f"{path}: skipped {stats[role]['n_skipped']} of {file_stats[role].n_records} records "
                   f"(data.on_error=skip): {stats[role]['skipped']}")
            log.warning(msg)
            print(msg)
    for pairs in loaded.values():
        for pair in pairs:
            pair.prompt = with_system_prompt(pair.prompt, data_cfg.system_prompt)
    if data_cfg.eval_path:
        return loaded["train_file"], loaded["eval_file"], stats
    train_pairs, eval_pairs = split_pairs(loaded["train_file"], data_cfg.eval_fraction, data_cfg.split_seed)
    return train_pairs, eval_pairs, stats
