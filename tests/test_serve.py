"""The trained reward model in an RL loop: as TRL's reward function, and behind the HTTP server."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from conftest import ROOT, compose_cfg, tiny_overrides
from rmexp import RewardModel
from rmexp.export import export
from rmexp.train import main

PROMPTS = ["What is 2+2?", "天空是什么颜色？", "Name a fruit.", "Say hello."]
COMPLETIONS = ["4.", "蓝色。", "An apple.", "Hello!"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny reward model trained in fp32 (so server and in-process rewards compare to rounding)."""
    out = tmp_path_factory.mktemp("serve_run")
    main(compose_cfg(*tiny_overrides(out, "logger=none", "model.dtype=float32", "trainer.bf16=false")))
    return out


def test_reward_model_is_a_trl_reward_function_with_normalization(run):
    raw = RewardModel.load(run)
    expected = raw.score_batch(list(zip(PROMPTS, COMPLETIONS, strict=True)))
    assert raw(prompts=PROMPTS, completions=COMPLETIONS, completion_ids=None, trainer_state=None) == expected
    conversational = raw(prompts=[[{"role": "user", "content": p}] for p in PROMPTS],
                         completions=[[{"role": "assistant", "content": c}] for c in COMPLETIONS])
    assert conversational == pytest.approx(expected, abs=1e-5)  # the same chat formatting either way

    normalized = RewardModel.load(run, normalize=True)
    metrics = json.loads((run / "metrics.json").read_text())
    assert normalized(prompts=PROMPTS, completions=COMPLETIONS) == pytest.approx(
        [(r - metrics["reward_mean"]) / metrics["reward_std"] for r in expected], abs=1e-5)
    with pytest.raises(ValueError, match="completions"):
        raw(prompts=PROMPTS, completions=COMPLETIONS[:2])


def test_normalize_without_recorded_stats_is_a_named_error(run, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in run.iterdir():
        if f.is_file() and f.name != "metrics.json":
            (bare / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ValueError, match="normalize=True needs the reward mean and std"):
        RewardModel.load(bare, normalize=True)


def grpo_steps(tmp_path, reward_funcs, name: str):
    """Two GRPO steps of the tiny LM as the policy, rewarded by `reward_funcs`; returns (log, moved)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from rmexp.builtin import resolve_model_path

    policy_dir = resolve_model_path("builtin:tiny", compose_cfg("model=tiny").model.cache_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(policy_dir)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in PROMPTS * 2])
    args = GRPOConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=8, max_steps=2, learning_rate=1e-2, logging_steps=1,
                      report_to="none", save_strategy="no", use_cpu=True, bf16=False, seed=0)
    trainer = GRPOTrainer(model=policy, reward_funcs=reward_funcs, args=args, train_dataset=data,
                          processing_class=tok)
    trainer.train()
    moved = any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    return trainer.state.log_history, moved


def test_grpo_trains_a_policy_on_the_reward_model_callable_and_exported_dir(run, tmp_path):
    calls = []
    rm = RewardModel.load(run)

    def scored(prompts, completions, **kwargs):  # rm itself, with a record of what it returned
        rewards = rm(prompts=prompts, completions=completions, **kwargs)
        calls.append((len(prompts), rewards))
        return rewards

    history, moved = grpo_steps(tmp_path, [scored], "callable")
    assert moved and calls and all(n == len(r) == 4 for n, r in calls)
    logged = [h["rewards/scored/mean"] for h in history if "rewards/scored/mean" in h]
    assert logged and logged[0] == pytest.approx(sum(calls[0][1]) / 4, abs=1e-4)

    exported = export(run, tmp_path / "exported", dtype="float32")
    config = json.loads((exported / "config.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert config["mean"] == metrics["reward_mean"] and config["std"] == metrics["reward_std"]
    history, moved = grpo_steps(tmp_path, str(exported), "exported")
    key = "rewards/exported/mean"
    assert moved and any(key in h and h[key] == h[key] for h in history)  # logged and not NaN


# ---------------------------------------------------------------- the HTTP server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(run, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve_log") / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rmexp.serve", f"checkpoint={run}", f"serve.port={port}", "serve.max_items=40",
         "serve.max_request_bytes=20000", f"hydra.run.dir={log.parent}"],
        cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.slow
def test_server_rewards_equal_the_reward_model(server, run):
    rm = RewardModel.load(run)
    expected = rm.score_batch(list(zip(PROMPTS, COMPLETIONS, strict=True)))
    got = httpx.post(f"{server}/score", json={"prompts": PROMPTS, "completions": COMPLETIONS}, timeout=60)
    assert got.status_code == 200
    assert got.json()["rewards"] == pytest.approx(expected, abs=1e-4)
    # OpenRLHF: full texts and their prompts; the response is what follows the prompt
    got = httpx.post(f"{server}/get_reward", timeout=60, json={
        "query": [p + c for p, c in zip(PROMPTS, COMPLETIONS, strict=True)], "prompts": PROMPTS, "labels": [""] * 4})
    assert got.status_code == 200
    assert got.json()["rewards"] == pytest.approx(expected, abs=1e-4)


BAD = [  # (endpoint, raw body, status, field)
    ("/score", b'{"prompts": ["a"], "completions": ', 422, "body"),
    ("/score", b"\xff\xfe not utf-8", 422, "body"),
    ("/score", b'["a", "b"]', 422, "body"),
    ("/score", b'{"prompts": [' + b"1" * 5000 + b'], "completions": ["a"]}', 422, "body"),  # int over 4300 digits
    ("/score", b"[" * 15000, 422, "body"),  # nesting past the JSON parser's recursion limit
    ("/score", b'{"prompts": [["\\ud800"]], "completions": ["a"]}', 422, "prompts[0]"),  # a lone surrogate
    ("/score", b'{"completions": ["a"]}', 422, "prompts"),
    ("/score", b'{"prompts": "a", "completions": ["a"]}', 422, "prompts"),
    ("/score", b'{"prompts": ["a", 3], "completions": ["a", "b"]}', 422, "prompts[1]"),
    ("/score", b'{"prompts": [[{"role": "user"}]], "completions": ["a"]}', 422, "prompts[0]"),
    ("/score", b'{"prompts": ["a", [{"role": "robot", "content": "x"}]], "completions": ["a", "b"]}', 422, "prompts[1]"),
    ("/score", b'{"prompts": ["a"], "completions": [[]]}', 422, "completions[0]"),
    ("/score", b'{"prompts": ["a", "b"], "completions": ["a"]}', 422, "completions"),
    ("/get_reward", b'{"query": ["hello"]}', 422, "prompts"),
    ("/get_reward", b'{"query": ["hello", null], "prompts": ["h", "x"]}', 422, "query[1]"),
    ("/get_reward", b'{"query": ["hello"], "prompts": ["bye"]}', 422, "query[0]"),
    ("/get_reward", json.dumps({"query": ["q"] * 41, "prompts": ["q"] * 41}).encode(), 413, "query"),
    ("/get_reward", json.dumps({"query": ["x" * 30000], "prompts": ["x"]}).encode(), 413, "body"),
]


@pytest.mark.slow
@pytest.mark.parametrize("endpoint,body,status,field", BAD, ids=[f"{e}-{f}-{s}" for e, _, s, f in BAD])
def test_server_answers_bad_input_with_a_named_4xx(server, endpoint, body, status, field):
    got = httpx.post(f"{server}{endpoint}", content=body, headers={"content-type": "application/json"}, timeout=60)
    assert got.status_code == status, got.text
    assert got.json()["field"] == field and got.json()["error"]
    assert httpx.get(f"{server}/health", timeout=10).json()["status"] == "ok"  # and it lives on


@pytest.mark.slow
def test_get_reward_takes_openrlhf_decoded_text(server, run):
    """OpenRLHF sends its templated sequences decoded with special tokens: left pads, a closing EOS.
    They are stripped, and a templated prompt is not wrapped in the chat template again."""
    rm = RewardModel.load(run)
    tok = rm.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], tokenize=False,
                                     add_generation_prompt=True)
    assert rm.is_templated(prompt) and not rm.is_templated(PROMPTS[0])
    expected = rm.score_tokens([rm.text_tokens(prompt + COMPLETIONS[0])])[0]
    query = prompt + COMPLETIONS[0] + tok.eos_token
    got = httpx.post(f"{server}/get_reward", timeout=60, json={
        "query": [tok.pad_token * 3 + query, query], "prompts": [tok.pad_token * 3 + prompt, prompt]})
    assert got.status_code == 200, got.text
    assert got.json()["rewards"] == pytest.approx([expected, expected], abs=1e-4)
    assert rm.text_tokens(prompt + COMPLETIONS[0]) != rm.tokens(prompt, COMPLETIONS[0])  # wrapped twice otherwise


def test_an_item_the_chat_template_rejects_fails_its_own_request_by_name(run):
    from rmexp.serve import BadRequest, encode

    rm = RewardModel.load(run)
    rm.tokenizer.chat_template = ("{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('start with a user') }}"
                                  "{% endif %}" + rm.tokenizer.chat_template)
    assert len(encode(rm, [("Hi", "Hello")], "prompts")) == 1
    with pytest.raises(BadRequest, match="start with a user") as caught:
        encode(rm, [("Hi", "Hello"), ([{"role": "assistant", "content": "x"}], "y")], "prompts")
    assert caught.value.field == "prompts[1]" and caught.value.status == 422


@pytest.mark.slow
def test_server_body_limit_holds_for_a_streamed_body_without_length(server):
    def chunks():
        for _ in range(30):
            yield b"x" * 1000

    got = httpx.post(f"{server}/score", content=chunks(), timeout=60)
    assert got.status_code == 413 and got.json()["field"] == "body"


@pytest.mark.slow
def test_server_answers_32_concurrent_clients(server, run):
    rm = RewardModel.load(run)
    items = [(PROMPTS[i % 4], f"{COMPLETIONS[i % 4]} ({i})") for i in range(32)]
    expected = rm.score_batch(items)

    def client(i):
        prompt, completion = items[i]
        return httpx.post(f"{server}/score", json={"prompts": [prompt], "completions": [completion]}, timeout=120)

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(client, range(32)))
    assert all(a.status_code == 200 for a in answers)
    got = [a.json()["rewards"][0] for a in answers]
    assert got == pytest.approx(expected, abs=1e-4)
    health = httpx.get(f"{server}/health", timeout=10).json()
    assert health["texts"] >= 32


def test_the_app_serves_again_after_a_restart():
    """Its queue and scoring thread belong to one lifetime: a second start gets new ones."""
    from fastapi.testclient import TestClient
    from hydra import compose, initialize_config_module

    from rmexp.config import CONF_MODULE, to_typed
    from rmexp.serve import build_app

    class Stub:  # a RewardModel's serving surface, rewards = token counts
        normalize, path, n_truncated, tokenizer = False, "stub", 0, None

        def is_templated(self, text):
            return False

        def tokens(self, prompt, answer):
            return list(range(len(prompt) + len(answer)))

        def score_tokens(self, sequences):
            return [float(len(s)) for s in sequences]

    with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
        serve_cfg = to_typed(compose("serve", overrides=["checkpoint=unused"]).serve)  # the shipped defaults
    app = build_app(Stub(), serve_cfg)
    for _ in range(2):
        with TestClient(app) as client:
            got = client.post("/score", json={"prompts": ["ab", "c"], "completions": ["d", "ef"]})
            assert got.status_code == 200 and got.json() == {"rewards": [3.0, 3.0]}
