"""Every rank of a multi-process run stops at the same step for the same reason, however few ranks saw it
(rmexp.callbacks.StopAgreement), and a stream trains under several processes with each rank on its own slice of
every global batch. 2 CPU processes on gloo with the tiny model (tests/rank_stop_worker.py): only rank 1's clock
runs out, only rank 1 sees a non-finite loss, only rank 1 receives SIGTERM. A rank that stopped alone would
leave the other in a collective: gloo's timeout there is 30 s and each run has a subprocess timeout, so a
regression fails instead of hanging. No GPU was used."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from rmexp.rundir import last_complete_checkpoint

DATA = ROOT / "data/preference.jsonl"
COMMON = (f"data.path={DATA}", "trainer.max_steps=6", "trainer.per_device_train_batch_size=2",
          "trainer.eval_steps=100", "trainer.save_steps=100", "trainer.logging_steps=1", "trainer.learning_rate=5e-3",
          "trainer.max_length=256")


def write_jsonl_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(case: str, out: Path, *overrides: str, timeout: float = 150) -> list[dict]:
    """Both ranks of `case`, started as torchrun would start them; each rank's record (rank_stop_worker)."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests/rank_stop_worker.py"), case, str(out), *overrides],
                              env=env | {"RANK": str(r), "LOCAL_RANK": str(r)}, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    records = []
    for r, (p, log) in enumerate(zip(procs, logs, strict=True)):
        path = out / f"rank{r}.json"
        assert path.is_file(), f"rank {r} (exit {p.returncode}) left no record:\n{log[-4000:]}"
        records.append(json.loads(path.read_text()) | {"returncode": p.returncode, "log": log[-4000:]})
    return records


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


@pytest.mark.slow
def test_one_ranks_time_budget_stops_every_rank_at_its_step(tmp_path):
    ranks = run_ranks("budget", tmp_path, *COMMON, "trainer.time_budget_s=600")
    for r in ranks:
        assert r["returncode"] == 0 and r["error"] is None, r["log"]
        assert r["steps"] == [1, 2, 3]  # rank 1's clock ran out at step 3: both left there
    assert ranks[0]["lrs"] == ranks[1]["lrs"]  # one schedule: the agreed share of the budget
    m = metrics(tmp_path)  # ended as one process ends a budget: trained, evaluated, saved
    assert m["status"] == "ok" and m["global_step"] == 3
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "scores.jsonl").is_file()


@pytest.mark.slow
def test_one_ranks_non_finite_loss_fails_every_rank_naming_it(tmp_path):
    ranks = run_ranks("nonfinite", tmp_path, *COMMON)
    message = "non-finite loss (nan) at step 3 on rank 1 of 2"
    for r in ranks:
        assert r["returncode"] == 1 and r["error"]["type"] == "NonFiniteLossError", r["log"]
        assert r["error"]["message"].startswith(message), r["error"]
        assert r["steps"] == [1, 2, 3]  # both reached step 3's end (the probe runs before the agreement)
    m = metrics(tmp_path)
    assert m["status"] == "failed" and message in m["error"]
    assert not (tmp_path / "adapter_model.safetensors").exists() and not list(tmp_path.glob("checkpoints/checkpoint-*"))


@pytest.mark.slow
def test_one_ranks_sigterm_saves_the_same_checkpoint_on_every_rank(tmp_path):
    ranks = run_ranks("signal", tmp_path, *COMMON)
    for r in ranks:
        assert r["returncode"] == 1 and r["error"]["type"] == "StoppedBySignal", r["log"]
        assert r["error"]["message"].startswith("stopped by SIGTERM at step 3;"), r["error"]
        assert r["steps"] == [1, 2, 3]
    checkpoint = last_complete_checkpoint(tmp_path / "checkpoints")  # whole, its manifest written after both saved
    assert checkpoint is not None and checkpoint.name == "checkpoint-3"
    assert sorted(p.name for p in checkpoint.glob("rng_state*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]
    m = metrics(tmp_path)
    assert m["status"] == "failed" and "SIGTERM at step 3" in m["error"] and "trainer.resume=auto" in m["error"]
    assert not (tmp_path / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_a_stream_of_two_sources_trains_each_pair_once_across_two_ranks(tmp_path):
    """Two unweighted sources, 8 and 24 pairs, streamed: 8 steps of 2 pairs a rank are one pass over the 32. Each
    rank packs its own rows; the two ranks' pairs never overlap and together are every pair once (before: one
    source a rank, accelerate having dealt the 2-shard stream out by shard, rank 0 cycling through its 8)."""
    lines = DATA.read_text(encoding="utf-8").splitlines()
    a = write_jsonl_lines(tmp_path / "a.jsonl", lines[:8])
    b = write_jsonl_lines(tmp_path / "b.jsonl", lines[8:32])
    held = write_jsonl_lines(tmp_path / "held.jsonl", lines[400:416])
    run = tmp_path / "run"
    ranks = run_ranks("stream", run, "data=mixture", f"data.sources=[{{path:'{a}'}},{{path:'{b}'}}]",
                      f"data.eval_path={held}", "data.streaming=true", "trainer.max_steps=8",
                      "trainer.per_device_train_batch_size=2", "trainer.eval_strategy=no", "trainer.save_strategy=no",
                      "trainer.learning_rate=5e-3", "trainer.max_length=256")
    for r in ranks:
        assert r["returncode"] == 0 and r["error"] is None, r["log"]
        assert r["steps"] == list(range(1, 9)) and all(len(b) == 2 for b in r["batches"])
    m = metrics(run)
    assert m["status"] == "ok" and m["global_step"] == 8 and m["n_train_pairs_seen"] == 32
    trained = [q for r in ranks for batch in r["batches"][:8] for q in batch]  # (a rank may collate one batch ahead)
    prompts = {json.loads(line)["question"] for line in lines[:32]}
    assert len(trained) == 32 and len(set(trained)) == 32  # no pair twice
    assert all(any(p in q for p in prompts) for q in trained)  # and all 32 of the two sources


def test_a_stream_of_more_shards_than_processes_is_refused_by_name(tmp_path, tokenizer, monkeypatch):
    """A stream of several shards (a hub dataset of several files; a local file is one shard) under as many
    processes: accelerate would deal its shards out to the ranks, which run out at different steps. Refused in
    build_streamed, before the model loads, naming what works; one process, or one shard, trains."""
    import accelerate
    from datasets import IterableDataset

    from rmexp import dataset
    from rmexp.config import ConfigError, SourceConfig

    lines = DATA.read_text(encoding="utf-8").splitlines()
    parts = [write_jsonl_lines(tmp_path / f"part{i}.jsonl", lines[i * 8:(i + 1) * 8]) for i in range(2)]
    held = write_jsonl_lines(tmp_path / "held.jsonl", lines[400:404])
    read_source = dataset.read_source

    def json_files(paths):  # datasets gives each shard its part of the list
        for path in paths:
            yield from dataset.json_rows(path, 0, 0, "")

    def two_files_as_a_hub_dataset(src, cache_dir, streaming):
        if src.path != "org/two-files" or not streaming:
            return read_source(src, cache_dir, streaming)
        return IterableDataset.from_generator(json_files, features=dataset._raw_features(),
                                              gen_kwargs={"paths": [str(p) for p in parts]}), src.path, True

    monkeypatch.setattr(dataset, "read_source", two_files_as_a_hub_dataset)
    cfg = dataset.data_config(eval_path=str(held))
    build = lambda *paths: dataset.build_streamed(  # noqa: E731
        [SourceConfig(path=p) for p in paths], cfg, tokenizer, 64, dataset.tokenizer_fingerprint(tokenizer))
    assert len(list(build("org/two-files")[0])) == 16  # one process: both shards, read in turn
    monkeypatch.setattr(accelerate, "PartialState", lambda: type("TwoProcesses", (), {"num_processes": 2})())
    with pytest.raises(ConfigError, match=r"data.streaming=true under 2 processes: the stream has 2 shards "
                                          r"\(org/two-files: 2\).* Use data.streaming=false, a local file"):
        build("org/two-files")
    assert build(*map(str, parts))[0].n_shards == 1  # two local sources: one stream every rank reads whole
