"""Read an offline W&B run (`run-*.wandb`) without a server: the LevelDB-style log of protobuf records."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
HEADER = struct.Struct("<4sHB")  # ":W&B", magic 0xBEE1, version
RECORD = struct.Struct("<IHB")  # crc32, length, type (1 full, 2 first, 3 middle, 4 last)


def records(path: Path):
    data = Path(path).read_bytes()
    ident, magic, _ = HEADER.unpack_from(data)
    assert ident == b":W&B" and magic == 0xBEE1, f"{path} is not a W&B transaction log"
    pos, buf = HEADER.size, b""
    while pos + RECORD.size <= len(data):
        left = BLOCK - pos % BLOCK
        if left < RECORD.size:
            pos += left
            continue
        _, n, kind = RECORD.unpack_from(data, pos)
        pos += RECORD.size
        if (kind == 0 and n == 0) or pos + n > len(data):  # the end, or a record still being written
            break
        chunk, pos = data[pos:pos + n], pos + n
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


class OfflineRun:
    def __init__(self, run_dir: Path, wait_s: float = 30.0):
        """The last offline run under `run_dir`. W&B's service may still be writing its log when
        `wandb.finish()` returns, so it is read again until its exit record is in (up to `wait_s`)."""
        deadline = time.monotonic() + wait_s
        while True:
            self._read(run_dir)
            if self.exit_code is not None or time.monotonic() > deadline:
                return
            time.sleep(0.5)

    def _read(self, run_dir: Path) -> None:
        files = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
        assert files, f"no offline W&B run under {run_dir}/wandb"
        self.path = files[-1]
        self.config: dict = {}
        self.history: list[dict] = []
        self.summary: dict = {}
        self.exit_code = None
        for rec in records(self.path):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                self.run_id, self.group, self.name = rec.run.run_id, rec.run.run_group, rec.run.display_name
                self.tags = list(rec.run.tags)
                self.config.update({_key(i): json.loads(i.value_json) for i in rec.run.config.update})
            elif kind == "config":
                self.config.update({_key(i): json.loads(i.value_json) for i in rec.config.update})
            elif kind == "history":
                self.history.append({_key(i): json.loads(i.value_json) for i in rec.history.item})
            elif kind == "summary":
                self.summary.update({_key(i): json.loads(i.value_json) for i in rec.summary.update})
            elif kind == "exit":
                self.exit_code = rec.exit.exit_code
