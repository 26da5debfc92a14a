"""The one reader of preference data (training, rmexp.evaluate, the benches), built on 🤗 datasets.

A source (`data.path`, or each of `data.sources`: a local JSONL/JSON/Parquet file or a hub dataset
id) is read into Arrow on disk, then validated and tokenized by `Dataset.map` in `data.num_proc`
processes, a batch of pairs per tokenizer call. Both steps are cached by fingerprint (the file's
path, size and mtime; the tokenizer, max_length, system prompt and this code), so a second run on
the same data and tokenizer reads the result back memory-mapped instead of redoing the work; under
torchrun rank 0 builds while the other ranks wait, then they read its cache (`main_process_first`).

A bad record becomes a row holding its error: with data.on_error=skip it is counted by reason and
left out; with raise the first one in file order stops the run, naming file, line and field. Then
duplicates are found (a bad record to training; rmexp.evaluate keeps the first copy and counts the others),
a train pair that stands in the eval file is refused, and the seeded split keeps a group on one side. Sources are mixed by `weight`
(sampled in proportion, seeded by data.split_seed) or, with no weights, taken whole. With
`data.streaming=true` the train file is read and tokenized while training consumes it.

Each source is read in its `format` with its `columns` (data.format/data.columns unless the source
sets its own); `auto` takes the one format of a source's first records, names it, and refuses a later
record of another format (rmexp.data documents the formats). `source_pairs` reads a source to Pairs through the same map, checks and
counts, without tokenizing: what rmexp.evaluate scores.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets.fingerprint import Hasher

from rmexp import data as data_module
from rmexp._compat import dataset_fingerprint
from rmexp.config import DataConfig, DataFormat, SourceConfig, local_data_file
from rmexp.data import (
    BOM,
    DataError,
    LoadStats,
    Pair,
    detect_format,
    encode_pairs,
    held_out,
    iter_records,
    parse_record,
    with_system_prompt,
)

log = logging.getLogger(__name__)

TRAIN_COLUMNS = ["chosen_ids", "rejected_ids", "prompt_len", "chosen_tokens", "rejected_tokens"]
MAP_BATCH = 256  # pairs per tokenizer call: large enough to amortise the call, small for the worker's memory
DETECT_RECORDS = 100  # records data.format=auto looks at: one format among them, or a DataError
STREAM_SHUFFLE_BUFFER = 10_000  # pairs; a streamed file is shuffled within this window (memory stays fixed)
# Any edit to validation or tokenization must miss the old cache: the code itself is in the fingerprint.
CODE_HASH = hashlib.sha256(Path(data_module.__file__).read_bytes() + Path(__file__).read_bytes()).hexdigest()[:16]


def _features():
    from datasets import Features, List, Value

    return Features({
        "chosen_ids": List(Value("int32")), "rejected_ids": List(Value("int32")), "prompt_len": Value("int32"),
        "chosen_tokens": Value("int32"), "rejected_tokens": Value("int32"), "margin": Value("float64"),
        "group": Value("string"), "source": Value("string"), "key": Value("int64"), "line": Value("int64"),
        "reason": Value("string"), "error": Value("string"),
        "prompt_truncated": Value("bool"), "answer_truncated": Value("bool"), "identical": Value("bool")})


def _pair_features():
    from datasets import Features, Value

    return Features({"pair": Value("string"), "key": Value("int64"), "line": Value("int64"),
                     "reason": Value("string"), "error": Value("string")})


def _raw_features():
    from datasets import Features, Value

    return Features({"line": Value("int64"), "json": Value("string"), "reason": Value("string"),
                     "error": Value("string")})


# ---------------------------------------------------------------- reading a source


def json_rows(path: str, size: int, mtime_ns: int, code: str):
    """(line, JSON text) of each record of a JSONL file or a JSON array; a record that cannot be read
    is a row with its error. `size`, `mtime_ns` and `code` (CODE_HASH) are not read: they key the Arrow
    cache to the file's state and to this code."""
    with open(path, "rb") as f:
        is_array = f.read(4096).removeprefix(BOM).lstrip().startswith(b"[")
    if is_array:  # an array is parsed whole, as rmexp.data reads it
        try:
            for where, record in iter_records(path):
                yield {"line": int(where.rsplit(":", 1)[1]), "json": json.dumps(record, ensure_ascii=False),
                       "reason": None, "error": None}
        except DataError as e:  # the array itself is broken: read_source refuses the file
            yield {"line": 0, "json": None, "reason": e.reason, "error": str(e)}
        return
    with open(path, "rb") as f:  # JSONL: parsed in the map's workers, one line a row
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1:
                raw = raw.removeprefix(BOM)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield {"line": lineno, "json": None, "reason": "encoding",
                       "error": f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start})"}
                continue
            if line.strip():
                yield {"line": lineno, "json": line, "reason": None, "error": None}


def read_source(src: SourceConfig, cache_dir: str | None, streaming: bool):
    """A source as an Arrow dataset (or an iterable one), its name in messages, and whether its rows are
    JSON text (local JSON files) or records (Parquet, hub datasets)."""
    from datasets import Dataset, IterableDataset, load_dataset

    local = local_data_file(src.path)
    if local is not None:  # a missing file is not a hub id
        if not local.is_file():
            raise DataError(f"{src.path}: no such preference file", reason="missing_file")
        if local.suffix == ".parquet":
            return (load_dataset("parquet", data_files=str(local), split="train", cache_dir=cache_dir,
                                 streaming=streaming), src.path, False)
        st = local.stat()
        kwargs = {"path": str(local.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "code": CODE_HASH}
        # A JSON array that does not parse stops the run under either data.on_error: the records after the break
        # cannot be read, and skipping them as one bad record would lose them without a count.
        if streaming:
            with open(local, "rb") as f:
                if f.read(4096).removeprefix(BOM).lstrip().startswith(b"["):
                    for _ in iter_records(local):  # parsed once more before the stream starts
                        pass
            return IterableDataset.from_generator(json_rows, features=_raw_features(), gen_kwargs=kwargs), src.path, True
        try:
            ds = Dataset.from_generator(json_rows, features=_raw_features(), gen_kwargs=kwargs, cache_dir=cache_dir)
        except ValueError as e:  # datasets refuses to build an empty dataset
            raise DataError(f"{src.path}: no preference pairs (no records: {e})", reason="no_pairs") from None
        last = ds[len(ds) - 1]  # json_rows ends with the array's error row, if any
        if last["reason"] == "broken_array":
            raise DataError(last["error"], reason="broken_array")
        return ds, src.path, True
    return (load_dataset(src.path, src.name, split=src.split, cache_dir=cache_dir, streaming=streaming),
            f"{src.path}[{src.split}]", False)


def source_format(src: SourceConfig, data_cfg: DataConfig) -> tuple[str, dict | None]:
    """A source's data.format and data.columns (as a dict of the roles set): its own, else data's."""
    fmt = src.format if src.format is not None else data_cfg.format
    columns = src.columns if src.columns is not None else data_cfg.columns
    columns = {k: v for k, v in vars(columns).items() if v is not None} if columns is not None else {}
    return DataFormat(fmt).value, columns or None


def choose_format(raw, origin: str, json_text: bool, fmt: str, columns: dict | None) -> str:
    """`fmt`, or for auto the one format of the source's first DETECT_RECORDS records, logged; a record of
    another format further on is then a mixed_formats error (parse_rows). Two formats there: a DataError."""
    from datasets import IterableDataset

    if fmt != "auto":
        return fmt
    rows = raw.take(DETECT_RECORDS) if isinstance(raw, IterableDataset) else raw.select(range(min(DETECT_RECORDS, len(raw))))
    seen, ambiguous = {}, None
    for i, row in enumerate(rows):
        where = f"{origin}:{row['line'] if json_text else i + 1}"
        try:
            record = json.loads(row["json"]) if json_text else {k: v for k, v in row.items() if v is not None}
            if isinstance(record, dict):
                seen.setdefault(detect_format(record, where, columns), where)
        except (TypeError, json.JSONDecodeError):  # an unreadable row: its error comes from the map, in order
            continue
        except DataError as e:
            ambiguous = ambiguous or e
    if len(seen) > 1:
        found = ", ".join(f"{where} reads as {f}" for f, where in seen.items())
        raise DataError(f"{origin}: records in more than one format under data.format=auto ({found}): set data.format, "
                        "or give each format its own source in data.sources", reason="mixed_formats")
    if not seen and ambiguous is not None:
        raise ambiguous
    if not seen:  # no readable record among the first: each is detected on its own
        log.info(f"{origin}: data.format=auto found no readable record among the first {DETECT_RECORDS}: it detects "
                 "each record's format on its own")
        return "auto"
    chosen = next(iter(seen))
    log.info(f"{origin}: data.format=auto reads it as {chosen} ({seen[chosen]} was the first such record; a later "
             "record in another format is a mixed_formats error)")
    return chosen


# ---------------------------------------------------------------- validating and tokenizing


class PortableTokenizer:
    """A tokenizer that travels to map's worker processes by the standard pickle (1 s for Gemma's) instead
    of dill, which datasets' multiprocess pickles with: ~5 s a worker for Gemma's 262k vocabulary, one
    worker after another, so the second started when the first was done (measured)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __reduce__(self):
        return _unpickle_tokenizer, (pickle.dumps(self.tokenizer, protocol=pickle.HIGHEST_PROTOCOL),)


def _unpickle_tokenizer(blob: bytes) -> PortableTokenizer:
    return PortableTokenizer(pickle.loads(blob))


def _check_detected(record: dict, where: str, fmt: str, columns: dict | None) -> None:
    """A record past the first DETECT_RECORDS must be in the format auto chose from them: read in another
    format it would pass with its fields misplaced (an HH text read as trl keeps its markers in the prompt)."""
    try:
        found = detect_format(record, where, columns)
    except DataError:  # the prompt fields of two formats: parse_record names the one `fmt` would not read
        return
    if found != fmt:
        raise DataError(f"{where}: the record reads as {found}, the source as {fmt} (data.format=auto chose it from "
                        f"the first {DETECT_RECORDS} records): set data.format, or give each format its own source in "
                        "data.sources", reason="mixed_formats")


def parse_rows(batch: dict, indices: list[int], out: dict[str, list], origin: str, json_text: bool, fmt: str,
               columns: dict | None, detected: bool = False) -> tuple[list, list[int]]:
    """A batch of source rows read into Pairs, with the row numbers they came from; each other row gets its
    line, error and reason in `out`. Training's map and evaluate's read both go through here."""
    names = list(batch)
    pairs, slots = [], []
    for i in range(len(indices)):
        line = batch["line"][i] if json_text else indices[i] + 1  # Parquet/hub: the record's number
        where = f"{origin}:{line}"
        out["line"][i] = line
        try:
            if json_text:
                if batch["error"][i] is not None:
                    raise DataError(batch["error"][i], batch["reason"][i])
                try:
                    record = json.loads(batch["json"][i])
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})",
                                    reason="malformed_json") from None
            else:  # an Arrow row has every column of its dataset: a record's absent fields are None
                record = {k: batch[k][i] for k in names if batch[k][i] is not None}
            if detected and fmt != "auto" and isinstance(record, dict):
                _check_detected(record, where, fmt, columns)
            pair = parse_record(record, where, fmt, columns,
                                "data.format=auto chose it for this source" if detected else "data.format")
        except DataError as e:
            out["reason"][i], out["error"][i], out["key"][i] = e.reason, str(e), 0
            continue
        out["key"][i] = int.from_bytes(hashlib.blake2b(pair.key().encode(), digest_size=8).digest(), "little",
                                       signed=True)
        pairs.append(pair)
        slots.append(i)
    return pairs, slots


def encode_rows(batch: dict, indices: list[int], *, tokenizer: PortableTokenizer, max_length: int,
                system_prompt: str | None, origin: str, json_text: bool, fmt: str = "auto",
                columns: dict | None = None, detected: bool = False) -> dict:
    """`Dataset.map` function: a batch of source rows -> token rows, or error rows (reason, message)."""
    tokenizer = tokenizer.tokenizer
    n = len(indices)
    out: dict[str, list] = {k: [None] * n for k in _features()}
    pairs, slots = parse_rows(batch, indices, out, origin, json_text, fmt, columns, detected)
    for i, pair in zip(slots, pairs, strict=True):
        out["margin"][i], out["group"][i], out["source"][i] = pair.margin, pair.group, pair.source
        pair.prompt = with_system_prompt(pair.prompt, system_prompt)
    for i, enc in zip(slots, encode_pairs(tokenizer, pairs, max_length), strict=True):
        out["chosen_ids"][i], out["rejected_ids"][i] = enc.chosen.ids, enc.rejected.ids
        out["prompt_len"][i] = enc.shared_len
        out["chosen_tokens"][i], out["rejected_tokens"][i] = enc.chosen.answer_tokens, enc.rejected.answer_tokens
        out["prompt_truncated"][i] = enc.chosen.prompt_truncated or enc.rejected.prompt_truncated
        out["answer_truncated"][i] = enc.chosen.answer_truncated or enc.rejected.answer_truncated
        out["identical"][i] = enc.identical
    for i in set(range(n)) - set(slots):  # error rows: empty ids, no flags
        out["chosen_ids"][i] = out["rejected_ids"][i] = []
        out["prompt_truncated"][i] = out["answer_truncated"][i] = out["identical"][i] = False
    return out


def pair_rows(batch: dict, indices: list[int], *, origin: str, json_text: bool, fmt: str,
              columns: dict | None, detected: bool = False) -> dict:
    """`Dataset.map` function: a batch of source rows -> each Pair as JSON (`pair`), or error rows."""
    out: dict[str, list] = {k: [None] * len(indices) for k in _pair_features()}
    pairs, slots = parse_rows(batch, indices, out, origin, json_text, fmt, columns, detected)
    for i, p in zip(slots, pairs, strict=True):
        out["pair"][i] = json.dumps([p.prompt, p.chosen, p.rejected, p.margin, p.source, p.group], ensure_ascii=False)
    return out


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides a tokenizer's ids: its vocabulary and rules, chat template and special tokens (0.4 s for
    Gemma's 262k vocabulary, where datasets' own hash of the object takes 15 s)."""
    parts = [type(tokenizer).__name__, str(getattr(tokenizer, "chat_template", None)),
             str([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id])]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts.append(backend.to_str() if backend is not None else Hasher.hash(tokenizer))
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def encode_source(raw, origin: str, json_text: bool, tokenizer, data_cfg: DataConfig, max_length: int,
                  num_proc: int | None, tokenizer_fp: str, fmt: str = "auto", columns: dict | None = None,
                  detected: bool = False):
    """`encode_rows` over a whole source, cached under a fingerprint of the rows, the tokenizer, the
    settings and this code: a second run with the same ones reads the cached Arrow files."""
    from datasets import IterableDataset

    fn_kwargs = dict(tokenizer=PortableTokenizer(tokenizer), max_length=max_length, system_prompt=data_cfg.system_prompt,
                     origin=origin, json_text=json_text, fmt=fmt, columns=columns, detected=detected)
    kwargs = dict(batched=True, batch_size=MAP_BATCH, with_indices=True, features=_features(),
                  remove_columns=list(raw.column_names or []), fn_kwargs=fn_kwargs)
    if isinstance(raw, IterableDataset):
        return raw.map(encode_rows, **kwargs)
    key = [dataset_fingerprint(raw), tokenizer_fp, max_length,
           data_cfg.system_prompt, origin, json_text, fmt, sorted((columns or {}).items()), detected, CODE_HASH]
    num_proc = num_proc if num_proc and num_proc > 1 and len(raw) > 1 else None
    if num_proc:  # the workers are the parallelism: a tokenizer's own threads in forked workers would deadlock
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return raw.map(encode_rows, num_proc=num_proc, new_fingerprint=Hasher.hash(key),
                   desc=f"Validating and tokenizing {origin}", **kwargs)


def auto_num_proc(n_rows: int) -> int:
    """data.num_proc=null: one process per core (at most 8) for large sources; one for small ones,
    where starting workers costs more than it saves."""
    return min(os.cpu_count() or 1, 8) if n_rows >= 20_000 else 1


# ---------------------------------------------------------------- choosing the pairs


def _column(ds, name: str, as_list: bool = False):
    """One column of a dataset without an indices mapping (a fresh map's output), from Arrow: numpy, or a list."""
    column = ds.with_format("arrow", columns=[name])[:].column(name)
    return column.to_pylist() if as_list else column.to_numpy(zero_copy_only=False)


def _columns(ds, names: list[str], chunk: int = 65_536) -> dict[str, np.ndarray]:
    """Columns of the rows a dataset shows (its selection or mixture applied). Gathered a chunk at a time:
    datasets gathers rows one by one, and a million at once held 3 GB of row objects (measured)."""
    view = ds.select_columns(names).with_format("arrow")
    parts = [view[i:i + chunk] for i in range(0, len(view), chunk)]
    return {n: np.concatenate([p.column(n).to_numpy(zero_copy_only=False) for p in parts]) if parts
            else np.zeros(0, dtype=np.int64) for n in names}


@dataclass
class SourceStats(LoadStats):
    """LoadStats (its `as_dict` unchanged) with where each duplicate pair's first copy is: {line of the copy
    left out: line of the first copy} (file lines; for Parquet and hub datasets, record numbers)."""

    duplicates: dict[int, int] = field(default_factory=dict)


def kept_rows(mapped, origin: str, on_error: str, max_pairs: int | None,
              on_duplicate: str | None = None) -> tuple[np.ndarray, SourceStats]:
    """Row numbers of the valid, first-seen pairs (at most max_pairs), and what was read and skipped.
    With on_error=raise the first bad or duplicate record raises, naming where. `on_duplicate="skip"` counts a
    duplicate pair (as `duplicate_pair`) and leaves it out whatever on_error says: rmexp.evaluate scores it once."""
    reasons = _column(mapped, "reason", as_list=True)
    bad = np.fromiter((r is not None for r in reasons), dtype=bool, count=len(reasons))
    ok = np.flatnonzero(~bad)
    keys = _column(mapped, "key")[ok] if len(ok) else np.zeros(0, dtype=np.int64)
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    is_first = np.zeros(len(ok), dtype=bool)
    is_first[first] = True
    kept = ok[is_first]
    limit = len(reasons)  # rows read: up to the max_pairs-th pair, as the in-memory path counts
    if max_pairs is not None and len(kept) >= max_pairs:
        kept = kept[:max_pairs]
        limit = int(kept[-1]) + 1
    duplicates = {int(ok[j]): int(ok[first[inverse[j]]]) for j in np.flatnonzero(~is_first) if ok[j] < limit}
    problems = sorted([int(i) for i in np.flatnonzero(bad[:limit])] + list(duplicates))
    stats = SourceStats(n_records=limit, n_pairs=len(kept))
    if problems:
        lines = _column(mapped, "line")
        for i in problems:
            stats.skipped["duplicate_pair" if i in duplicates else reasons[i]] += 1
        stats.duplicates = {int(lines[i]): int(lines[j]) for i, j in duplicates.items()}
        fatal = [i for i in problems if ((on_duplicate or on_error) if i in duplicates else on_error) == "raise"]
        if fatal:
            i = fatal[0]
            message = (f"{origin}:{lines[i]}: duplicate of the pair at {origin}:{lines[duplicates[i]]}"
                       if i in duplicates else mapped[i]["error"])
            raise DataError(message + data_module.skip_hint(origin, len(kept), len(fatal)),
                            "duplicate_pair" if i in duplicates else reasons[i])
    if not len(kept):
        raise DataError(f"{origin}: no preference pairs (read {stats.n_records} records, "
                        f"skipped {dict(stats.skipped) or 0})", reason="no_pairs")
    return kept, stats


STAT_COLUMNS = ["source_id", "prompt_truncated", "answer_truncated", "identical", "margin"]


def truncation_counts(cols: dict[str, np.ndarray]) -> dict[str, int]:
    """What fitting to max_length cost, as rmexp.data.tokenize_pairs counts it."""
    prompt, answer = cols["prompt_truncated"], cols["answer_truncated"]
    return {"n_answer_truncated": int(answer.sum()), "n_identical_after_truncation": int(cols["identical"].sum()),
            "n_prompt_truncated": int(prompt.sum()), "n_truncated": int((prompt | answer).sum())}


def log_truncation(truncation: dict, limit: str, logger: logging.Logger) -> None:
    """What fitting pairs to `limit` (e.g. "trainer.max_length=512") cost, per split or file: one line each, in
    training's and evaluation's logs alike (counted, never dropped)."""
    for split, counts in truncation.items():
        if counts.get("n_truncated"):
            logger.warning("%s: %d pairs truncated to %s (the prompt cut from the left in %d, an answer cut in %d); "
                           "none dropped", split, counts["n_truncated"], limit, counts.get("n_prompt_truncated", 0),
                           counts.get("n_answer_truncated", 0))


def with_margins(ds, margins: np.ndarray):
    """The training columns; `margin` only when a pair has one (the others get 0, as in rmexp.data)."""
    margins = margins.astype(float)
    if not np.isfinite(margins).any():
        return ds.select_columns(TRAIN_COLUMNS)
    if np.isnan(margins).any():
        ds = ds.map(lambda b: {"margin": [0.0 if m is None else m for m in b["margin"]]}, batched=True,
                    desc="Margins")
    return ds.select_columns([*TRAIN_COLUMNS, "margin"])


def eval_identity(ds) -> list[dict]:
    """Each eval pair's scores.jsonl identity (rundir.pair_identity: pair_id, source), in dataset order, the
    order of the trainer's eval rewards; in the stats (`eval_identity`), as no collator is to see the columns."""
    from rmexp.rundir import pair_id_of_key, pair_identity

    cols = ds.select_columns(["key", "source"]).with_format("arrow")[:]
    return [pair_identity(pair_id_of_key(k), s) for k, s in
            zip(cols.column("key").to_pylist(), cols.column("source").to_pylist(), strict=True)]


# ---------------------------------------------------------------- the datasets of a run


def sources_of(data_cfg: DataConfig) -> list[SourceConfig]:
    """data.sources, or data.path as the one source (the config's checks ran in rmexp.config)."""
    return list(data_cfg.sources) or ([SourceConfig(path=data_cfg.path, split=data_cfg.split)] if data_cfg.path else [])


def map_first(raw, mapper, origin: str, data_cfg: DataConfig, on_duplicate: str | None = None):
    """`mapper` over the source's rows, the first max_pairs alone when they hold enough good pairs; then
    `kept_rows` (`on_duplicate` passed on): (mapped rows, kept row numbers, stats)."""
    max_pairs = data_cfg.max_pairs
    if max_pairs is not None and max_pairs < len(raw):  # the first max_pairs records usually suffice
        mapped = mapper(raw.select(range(max_pairs)))
        try:
            enough = len(kept_rows(mapped, origin, "skip", max_pairs)[0]) >= max_pairs
        except DataError:  # not one good pair among them
            enough = False
        if not enough:
            mapped = mapper(raw)
    else:
        mapped = mapper(raw)
    kept, stats = kept_rows(mapped, origin, data_cfg.on_error.value, max_pairs, on_duplicate)
    return mapped, kept, stats


def source_pairs(src: SourceConfig, data_cfg: DataConfig,
                 on_duplicate: str | None = None) -> tuple[list[Pair], SourceStats, str, str]:
    """A source's valid, first-seen pairs as Pairs (what rmexp.evaluate scores), read and validated as
    training reads it, skips counted the same: (pairs, stats, its name, its format). No system prompt added.
    `on_duplicate="skip"` (rmexp.evaluate's) keeps the first copy of a repeated pair whatever data.on_error
    says; the stats' `duplicates` say where each copy and its first are."""
    raw, origin, json_text = read_source(src, data_cfg.cache_dir, streaming=False)
    fmt, columns = source_format(src, data_cfg)
    fmt, detected = choose_format(raw, origin, json_text, fmt, columns), fmt == "auto"
    kwargs = dict(origin=origin, json_text=json_text, fmt=fmt, columns=columns, detected=detected)
    fingerprint = lambda rows: Hasher.hash([dataset_fingerprint(rows), origin, json_text, fmt,  # noqa: E731
                                            sorted((columns or {}).items()), detected, CODE_HASH, "pairs"])
    num_proc = data_cfg.num_proc or auto_num_proc(len(raw))
    mapper = lambda rows: rows.map(pair_rows, batched=True, batch_size=MAP_BATCH, with_indices=True,  # noqa: E731
                                   features=_pair_features(), remove_columns=list(rows.column_names),
                                   num_proc=num_proc if num_proc > 1 and len(rows) > 1 else None, fn_kwargs=kwargs,
                                   new_fingerprint=fingerprint(rows), desc=f"Validating {origin}")
    mapped, kept, stats = map_first(raw, mapper, origin, data_cfg, on_duplicate)
    pairs = []
    for line, text in zip(_column(mapped, "line")[kept], np.asarray(_column(mapped, "pair", as_list=True),
                                                                    dtype=object)[kept], strict=True):
        prompt, chosen, rejected, margin, source, group = json.loads(text)
        pairs.append(Pair(prompt, chosen, rejected, margin, source, group, f"{origin}:{line}"))
    if any(p.margin is not None for p in pairs):  # one margin column: pairs without one get 0, as in training
        for p in pairs:
            p.margin = 0.0 if p.margin is None else p.margin
    return pairs, stats, origin, fmt


def data_config(**overrides) -> DataConfig:
    """conf/data/base.yaml's DataConfig with `overrides` (for code and benches that read without Hydra)."""
    from importlib import resources

    from omegaconf import OmegaConf

    base = OmegaConf.create(resources.files("rmexp.conf").joinpath("data/base.yaml").read_text(encoding="utf-8"))
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), base, overrides))


def read_pairs(path: str | Path, max_pairs: int | None = None, on_error: str = "raise",
               **overrides) -> tuple[list[Pair], LoadStats]:
    """`source_pairs` of one file or hub id with data.base's settings and `overrides` (format, columns, split...)."""
    cfg = data_config(max_pairs=max_pairs, on_error=on_error, **overrides)
    pairs, stats, _, _ = source_pairs(SourceConfig(path=str(path), split=cfg.split), cfg)
    return pairs, stats


def eval_source(data_cfg: DataConfig) -> SourceConfig:
    return SourceConfig(path=data_cfg.eval_path, split=data_cfg.eval_split)


def load_source(src: SourceConfig, index: int, tokenizer, data_cfg: DataConfig, max_length: int, tokenizer_fp: str):
    """One source validated and tokenized: (rows with a `source_id` column, kept row numbers, stats, its name
    and format)."""
    raw, origin, json_text = read_source(src, data_cfg.cache_dir, streaming=False)
    fmt, columns = source_format(src, data_cfg)
    fmt, detected = choose_format(raw, origin, json_text, fmt, columns), fmt == "auto"
    if src.fraction < 1.0:
        raw = raw.select(range(max(1, round(len(raw) * src.fraction))))
    num_proc = data_cfg.num_proc or auto_num_proc(len(raw))
    encode = lambda rows: encode_source(rows, origin, json_text, tokenizer, data_cfg, max_length, num_proc,  # noqa: E731
                                        tokenizer_fp, fmt, columns, detected)
    mapped, kept, stats = map_first(raw, encode, origin, data_cfg)
    mapped = mapped.add_column("source_id", np.full(len(mapped), index, dtype=np.int32))
    return mapped, kept, stats, origin, fmt


def build_datasets(data_cfg: DataConfig, tokenizer, max_length: int):
    """(train, eval, stats): memory-mapped datasets of TRAIN_COLUMNS (+ margin), and per-source counts (with
    `truncation` and `eval_identity`, which a run pops before logging the rest).
    Rank 0 builds first; the other ranks then read its cache."""
    from accelerate import PartialState

    sources = sources_of(data_cfg)
    tokenizer_fp = tokenizer_fingerprint(tokenizer)
    # one build, by rank 0, into data.cache_dir: on several nodes it must be a shared file system
    with PartialState().main_process_first():
        if data_cfg.streaming:
            return build_streamed(sources, data_cfg, tokenizer, max_length, tokenizer_fp)
        return build_mapped(sources, data_cfg, tokenizer, max_length, tokenizer_fp)


def drop_leaked(mapped, kept: np.ndarray, held_keys: np.ndarray, stats: LoadStats, origin: str,
                data_cfg: DataConfig, held_path: str | None = None, reason: str = "in_eval_file") -> np.ndarray:
    """`kept` without the pairs that also stand in a held-out file (the eval file; the rung file): a DataError
    naming the first, or counted under `reason`."""
    held_path, what = held_path or data_cfg.eval_path, reason.removeprefix("in_").replace("_", " ")
    in_held = np.isin(_column(mapped, "key")[kept], held_keys)
    if in_held.any():
        if data_cfg.on_error.value == "raise":
            line = _column(mapped, "line")[int(kept[np.argmax(in_held)])]
            raise DataError(f"{origin}:{line}: the same pair is in the {what} {held_path} "
                            f"({int(in_held.sum())} such pairs): train/{what.split()[0]} leakage (data.on_error=skip "
                            "drops them from training and counts them)", reason=reason)
        stats.skipped[reason] += int(in_held.sum())
        stats.n_pairs -= int(in_held.sum())
        kept = kept[~in_held]
        if not len(kept):
            raise DataError(f"{origin}: every pair is in the {what} {held_path}", reason="no_pairs")
    return kept


def load_rung_file(data_cfg: DataConfig, index: int, eval_keys: np.ndarray | None, tokenizer, max_length: int,
                   tokenizer_fp: str, stats: dict):
    """data.rung_path validated and tokenized: (its pairs, their keys); a pair it shares with the eval file is a
    DataError (the rung split decides a sweep, the eval pairs report on its winner: never the same pairs)."""
    mapped, kept, st, origin, fmt = load_source(SourceConfig(path=data_cfg.rung_path, split=data_cfg.split), index,
                                                tokenizer, data_cfg, max_length, tokenizer_fp)
    stats["formats"][origin], stats["rung_file"] = fmt, st.as_dict()
    keys = _column(mapped, "key")[kept]
    if eval_keys is not None and (shared := np.isin(keys, eval_keys)).any():
        line = _column(mapped, "line")[int(kept[np.argmax(shared)])]
        raise DataError(f"{origin}:{line}: the same pair is in the eval file {data_cfg.eval_path} ({int(shared.sum())} "
                        "such pairs): the rung split and the evaluation pairs must be apart", reason="in_eval_file")
    return mapped.select(kept), keys


def split_rung(train, data_cfg: DataConfig):
    """data.rung_fraction of the training pairs held out as the rung split (grouped and seeded as the eval split,
    by a seed of its own): (train, rung)."""
    # an ungrouped pair is its own group by its content (key): two copies of it (two sources, oversampling) stay
    # on one side
    groups = [g if g is not None else f"\0{k}" for g, k in zip(_column(train, "group", as_list=True),
                                                               _column(train, "key"), strict=True)]
    out = held_out(groups, data_cfg.rung_fraction, data_cfg.split_seed + 1, "data.rung_fraction")
    mask = np.zeros(len(train), dtype=bool)
    mask[list(out)] = True
    return train.select(np.flatnonzero(~mask)), train.select(np.flatnonzero(mask))


def build_mapped(sources: list[SourceConfig], data_cfg: DataConfig, tokenizer, max_length: int, tokenizer_fp: str):
    from datasets import concatenate_datasets, interleave_datasets

    stats: dict = {"sources": {}, "formats": {}}
    eval_keys = held = None
    if data_cfg.eval_path:
        eval_mapped, eval_kept, eval_stats, eval_origin, eval_fmt = load_source(
            eval_source(data_cfg), len(sources), tokenizer, data_cfg, max_length, tokenizer_fp)
        stats["formats"][eval_origin] = eval_fmt
        eval_keys = _column(eval_mapped, "key")[eval_kept]
        held = eval_mapped.select(eval_kept)
        stats["eval_file"] = eval_stats.as_dict()
    rung = rung_keys = None
    if data_cfg.rung_path:
        rung, rung_keys = load_rung_file(data_cfg, len(sources) + 1, eval_keys, tokenizer, max_length, tokenizer_fp,
                                         stats)
    parts, origins = [], []
    for k, src in enumerate(sources):
        mapped, kept, st, origin, fmt = load_source(src, k, tokenizer, data_cfg, max_length, tokenizer_fp)
        stats["formats"][origin] = fmt
        if eval_keys is not None:
            kept = drop_leaked(mapped, kept, eval_keys, st, origin, data_cfg)
        if rung_keys is not None:
            kept = drop_leaked(mapped, kept, rung_keys, st, origin, data_cfg, data_cfg.rung_path, "in_rung_file")
        parts.append((mapped, kept))
        origins.append(origin)
        stats["sources"][origin] = st.as_dict() | {"fraction": src.fraction, "weight": src.weight}
        if st.skipped:
            msg = (f"{origin}: skipped {sum(st.skipped.values())} of {st.n_records} records "
                   f"(data.on_error=skip): {dict(st.skipped)}")
            log.warning(msg)
            print(msg)
    if held is None:  # one grouped split over every source: an item and its translation may sit in two sources
        groups = [g for mapped, kept in parts
                  for g in np.asarray(_column(mapped, "group", as_list=True), dtype=object)[kept]]
        out = held_out(groups, data_cfg.eval_fraction, data_cfg.split_seed,
                       f"{origins[0]}:{_column(parts[0][0], 'line')[parts[0][1][0]]}")
        mask, offset, splits = np.zeros(len(groups), dtype=bool), 0, []
        mask[list(out)] = True
        for mapped, kept in parts:
            part_mask = mask[offset:offset + len(kept)]
            offset += len(kept)
            splits.append((mapped.select(kept[~part_mask]), mapped.select(kept[part_mask])))
        held = concatenate_datasets([e for _, e in splits if len(e)])
    else:
        splits = [(mapped.select(kept), None) for mapped, kept in parts]
    mix = [(t, s.weight) for (t, _), s in zip(splits, sources, strict=True) if len(t)]  # a source all held out adds none
    if sources[0].weight is not None and len(mix) > 1:
        total = sum(w for _, w in mix)
        train = interleave_datasets([t for t, _ in mix], probabilities=[w / total for _, w in mix],
                                    seed=data_cfg.split_seed, stopping_strategy=data_cfg.stopping_strategy)
    else:
        train = concatenate_datasets([t for t, _ in mix])
    if data_cfg.rung_fraction > 0 and rung is None:
        train, rung = split_rung(train, data_cfg)
    elif data_cfg.rung_fraction > 0:
        log.info("data.rung_path=%s is the rung split; data.rung_fraction=%g is not used", data_cfg.rung_path,
                 data_cfg.rung_fraction)
    truncation, margins = {}, {}
    for split, ds in (("train", train), ("eval", held), ("rung", rung)):
        if ds is None:
            continue
        cols = _columns(ds, STAT_COLUMNS)
        counts = np.bincount(cols["source_id"], minlength=len(sources) + 2)
        for k, origin in enumerate(origins):
            stats["sources"][origin][f"n_{split}"] = int(counts[k])
        truncation[split], margins[split] = truncation_counts(cols), cols["margin"]
    if data_cfg.path:  # the one-file shorthand keeps its name
        stats["train_file"] = stats["sources"][origins[0]]
    extra = {} if rung is None else {"rung": with_margins(rung, margins["rung"]), "rung_identity": eval_identity(rung)}
    return (with_margins(train, margins["train"]), with_margins(held, margins["eval"]),
            stats | {"truncation": truncation, "eval_identity": eval_identity(held)} | extra)


class StreamCounts(dict):
    """What a stream has read so far, by source: pairs and skipped records, a pair that stands in the eval
    file among them. A live dict (JSON as it is), shared rather than copied when datasets copies the
    pipeline; with dataloader workers it sees none. A record read twice (a new pass) counts twice."""

    def __init__(self, origins: list[str], on_error: str, eval_keys: set[int], eval_path: str):
        super().__init__({o: {"n_pairs_read": 0, "n_skipped": 0, "skipped": {}} for o in origins})
        self.origins, self.on_error, self.eval_keys, self.eval_path = origins, on_error, eval_keys, eval_path

    def keep(self, row: dict) -> bool:
        counts, reason, error = self[self.origins[row["source_id"]]], row["reason"], row["error"]
        if reason is None and row["key"] in self.eval_keys:
            reason = "in_eval_file"
            error = (f"{self.origins[row['source_id']]}:{row['line']}: the same pair is in the eval file "
                     f"{self.eval_path}: train/eval leakage")
        if reason is None:
            counts["n_pairs_read"] += 1
            return True
        if self.on_error == "raise":
            raise DataError(error + data_module.skip_hint(self.origins[row["source_id"]], counts["n_pairs_read"],
                                                          counts["n_skipped"] + 1), reason)
        counts["n_skipped"] += 1
        counts["skipped"][reason] = counts["skipped"].get(reason, 0) + 1
        return False

    def __deepcopy__(self, memo):
        return self


def build_streamed(sources: list[SourceConfig], data_cfg: DataConfig, tokenizer, max_length: int, tokenizer_fp: str):
    """An iterable train dataset read and tokenized as training consumes it (duplicates are not looked
    for: that would hold every pair's key), and the eval file as usual.

    Under several processes every rank reads the whole stream, in the same order, and trains on its own
    slice of each global batch (accelerate's IterableDatasetShard; TRL's RewardTrainer turns accelerate's
    dispatch_batches off for a stream, so each rank packs its own rows): every rank gets as many batches
    as the others and the same bad record stops them all. accelerate does that for a stream of fewer shards
    than processes; one of more (a hub dataset of several files) it deals out to the ranks by shard, which
    run out at different steps: refused here, before the model loads (a ConfigError naming what works)."""
    from accelerate import PartialState
    from datasets import Value, interleave_datasets

    from rmexp.config import ConfigError

    eval_mapped, eval_kept, eval_stats, eval_origin, eval_fmt = load_source(
        eval_source(data_cfg), len(sources), tokenizer, data_cfg, max_length, tokenizer_fp)
    formats = {eval_origin: eval_fmt}
    eval_ = eval_mapped.select(eval_kept)
    counts = StreamCounts([], data_cfg.on_error.value, set(_column(eval_mapped, "key")[eval_kept].tolist()),
                          data_cfg.eval_path)
    streams, features = [], _features()
    features["source_id"] = Value("int32")
    for k, src in enumerate(sources):
        raw, origin, json_text = read_source(src, data_cfg.cache_dir, streaming=True)
        fmt, columns = source_format(src, data_cfg)
        detected = fmt == "auto"
        formats[origin] = fmt = choose_format(raw, origin, json_text, fmt, columns)
        counts.origins.append(origin)
        counts[origin] = {"n_pairs_read": 0, "n_skipped": 0, "skipped": {}}
        # features given at each step: without them datasets runs rows ahead to find them, and counts twice
        stream = (encode_source(raw, origin, json_text, tokenizer, data_cfg, max_length, None, tokenizer_fp, fmt, columns,
                                detected)
                  .map(lambda b, k=k: {"source_id": [k] * len(b["line"])}, batched=True, features=features)
                  .filter(counts.keep))
        streams.append(stream.take(data_cfg.max_pairs) if data_cfg.max_pairs else stream)
    if sources[0].weight is not None and len(streams) > 1:
        total = sum(s.weight for s in sources)
        train = interleave_datasets(streams, probabilities=[s.weight / total for s in sources],
                                    seed=data_cfg.split_seed, stopping_strategy=data_cfg.stopping_strategy)
    else:  # no weights: every pair of every source once, the sources taken in turn (one shard, not one per source)
        train = (interleave_datasets(streams, stopping_strategy="all_exhausted_without_replacement")
                 if len(streams) > 1 else streams[0])
    processes = PartialState().num_processes
    if processes > 1 and train.n_shards >= processes:
        shards = ", ".join(f"{o}: {s.n_shards}" for o, s in zip(counts.origins, streams, strict=True))
        raise ConfigError(
            f"data.streaming=true under {processes} processes: the stream has {train.n_shards} shards ({shards}), "
            "which accelerate deals out to the ranks by shard, and ranks whose shards run out at different steps "
            "wait on each other; every rank must read the whole stream, which needs fewer shards than processes. "
            "Use data.streaming=false, a local file of the data (data.path=<file>.jsonl or .parquet: one shard), "
            "or one process")
    train = (train.map(lambda b: {"margin": [0.0 if m is None else m for m in b["margin"]]}, batched=True,
                       features=features)
             .shuffle(seed=data_cfg.split_seed, buffer_size=STREAM_SHUFFLE_BUFFER))
    log.warning("data.streaming=true: duplicate pairs are not looked for in a stream")
    cols = _columns(eval_, STAT_COLUMNS)
    stats = {"sources": counts, "formats": formats, "eval_file": eval_stats.as_dict(),
             "truncation": {"eval": truncation_counts(cols)}, "eval_identity": eval_identity(eval_)}
    # margin kept (0 for a pair without one): whether any pair of the stream has one is not known in advance
    return train.select_columns([*TRAIN_COLUMNS, "margin"]), with_margins(eval_, cols["margin"]), stats
