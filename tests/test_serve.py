"""The trained reward model in an RL loop: as TRL's reward function, and behind the HTTP server."""

from __future__ import annotations

import copy
import json
import logging
import socket
import subprocess
import sys
import time
import timeit
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
    """A tiny reward model trained in fp32 (so server and in-process rewards compare to rounding), with
    checkpoints/checkpoint-8, its last step's."""
    out = tmp_path_factory.mktemp("serve_run")
    main(compose_cfg(*tiny_overrides(out, "logger=none", "model.dtype=float32", "trainer.bf16=false",
                                     "trainer.save_steps=8")))
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


def test_normalize_means_the_same_for_every_scoring_method(run):
    """normalize=True: score, score_batch, score_tokens, score_pairs and the TRL call all return
    (raw - reward_mean) / reward_std of metrics.json; normalize=False: all return the raw reward."""
    from rmexp.data import Pair

    metrics = json.loads((run / "metrics.json").read_text())
    mean, std = metrics["reward_mean"], metrics["reward_std"]
    items = list(zip(PROMPTS, COMPLETIONS, strict=True))
    pairs = [Pair([{"role": "user", "content": p}], c, "No.") for p, c in items]
    raw, norm = RewardModel.load(run), RewardModel.load(run, normalize=True)
    rewards = [raw.score(p, c) for p, c in items]  # one text at a time: the call of that one text, exactly
    assert rewards == [raw(prompts=[p], completions=[c])[0] for p, c in items]
    assert raw(prompts=PROMPTS, completions=COMPLETIONS) == pytest.approx(rewards, abs=1e-6)  # packed together
    assert raw.score_tokens([raw.tokens(p, c) for p, c in items]) == pytest.approx(rewards, abs=1e-6)
    expected = [(r - mean) / std for r in rewards]
    assert [norm.score(p, c) for p, c in items] == [norm(prompts=[p], completions=[c])[0] for p, c in items]
    assert [norm.score(p, c) for p, c in items] == pytest.approx(expected, abs=1e-6)
    assert norm(prompts=PROMPTS, completions=COMPLETIONS) == pytest.approx(expected, abs=1e-6)
    assert norm.score_batch(items) == pytest.approx(expected, abs=1e-6)
    assert norm.score_tokens([norm.tokens(p, c) for p, c in items]) == pytest.approx(expected, abs=1e-6)
    raw_pairs = raw.score_pairs(pairs)
    assert torch.allclose(norm.score_pairs(pairs), (raw_pairs - mean) / std, atol=1e-5)
    assert raw_pairs[:, 0].tolist() == pytest.approx(rewards, abs=1e-4)  # the packed pair path: raw too


def test_a_checkpoint_is_scored_as_the_model_at_its_step(run, tmp_path, caplog):
    """checkpoint=<run>/checkpoints/checkpoint-8 loads that step's adapter with the run's config: here the
    last step, so the run's own rewards. It has no reward statistics of its own: normalize=True is refused."""
    from rmexp.reward_model import NormalizeError

    checkpoint = run / "checkpoints" / "checkpoint-8"
    items = list(zip(PROMPTS, COMPLETIONS, strict=True))
    with caplog.at_level(logging.INFO, logger="rmexp.reward_model"):
        scored = RewardModel.load(checkpoint).score_batch(items)
    assert scored == pytest.approx(RewardModel.load(run).score_batch(items), abs=1e-6)
    assert f"{checkpoint}: a checkpoint of the run {run}" in caplog.text
    with pytest.raises(NormalizeError, match=f"a checkpoint has none .*pass normalize=False .*or the run dir {run}$"):
        RewardModel.load(checkpoint, normalize=True)


def test_the_server_normalizes_once(run):
    """serve.normalize=true: the server answers what the model loaded with normalize=True returns, not that
    standardized twice."""
    from fastapi.testclient import TestClient

    from rmexp.serve import build_app

    rm = RewardModel.load(run, normalize=True)
    expected = rm(prompts=PROMPTS, completions=COMPLETIONS)
    with TestClient(build_app(rm, serve_config("serve.normalize=true"))) as client:
        got = client.post("/score", json={"prompts": PROMPTS, "completions": COMPLETIONS})
        assert client.get("/health").json()["normalize"] is True
    assert got.status_code == 200, got.text
    assert got.json()["rewards"] == pytest.approx(expected, abs=1e-6)


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
    """OpenRLHF sends its templated sequences decoded with special tokens: left pads, the end-of-turn
    marker, a closing EOS. The reward is the one training's tokens give that (prompt, response)."""
    rm = RewardModel.load(run)
    tok = rm.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], tokenize=False,
                                     add_generation_prompt=True)
    assert rm.is_templated(prompt) and not rm.is_templated(PROMPTS[0])
    expected = rm.score(PROMPTS[0], COMPLETIONS[0])
    query = prompt + COMPLETIONS[0] + rm.template_parts()["end_of_turn"].strip() + tok.eos_token
    got = httpx.post(f"{server}/get_reward", timeout=60, json={
        "query": [tok.pad_token * 3 + query, query + tok.pad_token], "prompts": [tok.pad_token * 3 + prompt, prompt]})
    assert got.status_code == 200, got.text
    assert got.json()["rewards"] == pytest.approx([expected, expected], abs=1e-4)


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

    from rmexp.serve import build_app

    app = build_app(Stub(), serve_config())  # the shipped defaults
    for _ in range(2):
        with TestClient(app) as client:
            got = client.post("/score", json={"prompts": ["ab", "c"], "completions": ["d", "ef"]})
            assert got.status_code == 200 and got.json() == {"rewards": [3.0, 3.0]}


# ---------------------------------------------------------------- train/serve token identity

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
PHI3 = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}")  # EOS after the last turn
REWRITES = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|User|>{{ m['content'] }}"
            "{% else %}<|Assistant|>{{ m['content'] }}<|end|>{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|Assistant|><think>\n{% endif %}")  # DeepSeek-R1's shape
MARKERS = {"gemma": "<end_of_turn>", "chatml": "<|im_end|>", "llama3": "<|eot_id|>", "phi3": "<|end|>"}
CONVERSATIONS = [  # (prompt messages, response)
    ([{"role": "user", "content": PROMPTS[0]}], COMPLETIONS[0]),
    ([{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": PROMPTS[1]}], COMPLETIONS[1]),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
      {"role": "user", "content": PROMPTS[2]}], " " + COMPLETIONS[2] + "\n"),
]


def serve_config(*overrides: str):
    from hydra import compose, initialize_config_module

    from rmexp.config import CONF_MODULE, to_typed

    with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
        return to_typed(compose("serve", overrides=["checkpoint=unused", *overrides]).serve)


def openrlhf_request(rm, marker: str) -> dict:
    """What OpenRLHF's remote reward call sends: prompts through the chat template, each query the
    left-padded prompt + response + end-of-turn marker + EOS (+ right pads), decoded with specials."""
    tok = rm.tokenizer
    prompts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m, _ in CONVERSATIONS]
    queries = [tok.pad_token * 2 + p + r + marker + tok.eos_token + tok.pad_token * i
               for i, (p, (_, r)) in enumerate(zip(prompts, CONVERSATIONS, strict=True))]
    return {"query": queries, "prompts": prompts, "labels": [""] * len(prompts)}


def assert_served_as_trained(rm, marker: str) -> None:
    from fastapi.testclient import TestClient

    from rmexp.serve import build_app, encode, parse_get_reward

    body = openrlhf_request(rm, marker)
    items = parse_get_reward(body, 100, rm.tokenizer)
    assert encode(rm, items, "query") == [rm.tokens(m, r) for m, r in CONVERSATIONS]  # the same token ids
    expected = rm.score_batch(CONVERSATIONS)
    with TestClient(build_app(rm, serve_config())) as client:
        got = client.post("/get_reward", json=body)
    assert got.status_code == 200, got.text
    # the same ids packed the same way: only a kernel's run-to-run rounding could differ
    assert got.json()["rewards"] == pytest.approx(expected, abs=1e-6)


@pytest.fixture(scope="module")
def fp32_tiny():
    from rmexp.model import load_reward_model

    cfg = compose_cfg("model=tiny", "quantization=none", "model.dtype=float32", "data.path=data/preference.jsonl")
    model, tok, _ = load_reward_model(cfg.model, cfg.quantization)
    return model.eval(), tok


@pytest.mark.parametrize("template", list(MARKERS))
def test_get_reward_scores_the_token_ids_training_gives_the_pair(fp32_tiny, template):
    from rmexp.builtin import GEMMA_CHAT_TEMPLATE

    model, tok = fp32_tiny
    tok = copy.deepcopy(tok)
    tok.chat_template = {"gemma": GEMMA_CHAT_TEMPLATE, "chatml": CHATML, "llama3": LLAMA3, "phi3": PHI3}[template]
    rm = RewardModel(model, tok, max_length=256, path="tiny")
    assert rm.template_parts()["end_of_turn"].startswith(MARKERS[template])
    assert_served_as_trained(rm, MARKERS[template])
    # the seed recipe pads with EOS (Llama has no pad token): pads and EOS strip as one run
    tok.pad_token = tok.eos_token
    assert_served_as_trained(RewardModel(model, tok, max_length=256, path="tiny"), MARKERS[template])


def test_a_prompt_that_cannot_be_scored_as_trained_is_refused_by_name(fp32_tiny):
    """A template that rewrites the prompt once an answer follows, and a run's system prompt missing from
    a templated prompt: a named 422, not a reward for other tokens than training's."""
    from rmexp.serve import BadRequest, encode, parse_get_reward

    model, tok = fp32_tiny
    tok = copy.deepcopy(tok)
    tok.chat_template = REWRITES
    rm = RewardModel(model, tok, max_length=256, path="tiny")
    with pytest.raises(BadRequest, match="rewrites the prompt") as caught:
        encode(rm, parse_get_reward(openrlhf_request(rm, "<|end|>"), 100, tok), "query")
    assert caught.value.field == "query[0]" and caught.value.status == 422

    tok.chat_template = CHATML
    rm = RewardModel(model, tok, max_length=256, path="tiny", system_prompt="Answer briefly.")
    with pytest.raises(BadRequest, match="system prompt") as caught:
        encode(rm, parse_get_reward(openrlhf_request(rm, "<|im_end|>"), 100, tok), "query")
    assert caught.value.field == "query[0]"  # the first conversation has no system message
    # the second one carries the run's system prompt: scored as RewardModel.score scores its user turn
    prompt_messages, response = CONVERSATIONS[1]
    body = openrlhf_request(rm, "<|im_end|>")
    item = parse_get_reward({"query": body["query"][1:2], "prompts": body["prompts"][1:2]}, 100, tok)
    assert encode(rm, item, "query") == [rm.tokens(prompt_messages[1]["content"], response)]


@pytest.mark.slow
def test_get_reward_scores_gemma3_as_trained():
    """The make-train default model, its own tokenizer (`<end_of_turn>` one special token)."""
    from rmexp.model import load_reward_model

    cfg = compose_cfg("quantization=none", "model.dtype=float32", "data.path=data/preference.jsonl")
    model, tok, _ = load_reward_model(cfg.model, cfg.quantization)
    rm = RewardModel(model.eval(), tok, max_length=512, path="gemma")
    assert rm.template_parts()["end_of_turn"] == "<end_of_turn>\n"
    assert_served_as_trained(rm, "<end_of_turn>")


# ---------------------------------------------------------------- exposure: keys, limits, shapes


class Stub:  # a RewardModel's serving surface, rewards = token counts
    normalize, path, n_truncated = False, "/secret/run/dir", 0
    gate = None  # a threading.Event tokenization waits for, when a test sets one

    class tokenizer:  # noqa: N801 - stands in for a tokenizer object
        pad_token, eos_token = "<pad>", "</s>"

    def is_templated(self, text):
        return False

    def tokens(self, prompt, answer):
        if self.gate is not None:
            assert self.gate.wait(timeout=20)
        return list(range(len(prompt) + len(answer)))

    def score_tokens(self, sequences):
        return [float(len(s)) for s in sequences]


def test_strip_is_linear_in_the_pads_it_removes():
    from rmexp.serve import strip

    assert strip("<pad><pad>Q: hi</s><pad></s>", ("<pad>",), ("<pad>", "</s>")) == "Q: hi"
    assert strip("<pad>", ("<pad>",), ("<pad>",)) == "" and strip("ab", ("",), ("",)) == "ab"

    def seconds(n: int) -> float:
        text = "<pad>" * n + "Q" + "</s>" * n
        return min(timeit.repeat(lambda: strip(text, ("<pad>",), ("<pad>", "</s>")), number=1, repeat=3))

    # removing one pad per pass with a copy each time is quadratic: 4x the pads would take ~16x
    small, large = seconds(20_000), seconds(80_000)
    assert large < 8 * small, (small, large)


def test_a_huge_padded_query_is_answered():
    from fastapi.testclient import TestClient

    from rmexp.serve import build_app

    with TestClient(build_app(Stub(), serve_config())) as client:
        body = {"query": ["<pad>" * 100_000 + "Q: hi A" + "</s>"], "prompts": ["Q: hi "]}
        got = client.post("/get_reward", json=body)
        assert got.status_code == 200 and got.json() == {"rewards": [7.0]}


def test_an_api_key_guards_every_route_but_health():
    from fastapi.testclient import TestClient

    from rmexp.serve import build_app

    body = {"prompts": ["ab"], "completions": ["c"]}
    with TestClient(build_app(Stub(), serve_config("serve.api_key=s3cret"))) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            got = client.post("/score", json=body, headers=headers)
            assert got.status_code == 401 and got.json()["field"] == "authorization", got.text
            assert got.headers["www-authenticate"] == "Bearer"
        assert client.get("/nowhere").status_code == 401  # no route is named to a caller without the key
        assert client.get("/health").status_code == 200
        got = client.post("/score", json=body, headers={"Authorization": "Bearer s3cret"})
        assert got.status_code == 200 and got.json() == {"rewards": [3.0]}


def test_the_api_key_comes_from_the_environment(monkeypatch):
    from rmexp.serve import api_key

    monkeypatch.setenv("RMEXP_API_KEY", "from-env")
    assert api_key(serve_config()) == "from-env"
    assert api_key(serve_config("serve.api_key=given")) == "given"
    monkeypatch.delenv("RMEXP_API_KEY")
    assert api_key(serve_config()) is None


def test_errors_share_one_shape_and_nothing_else_is_served():
    from fastapi.testclient import TestClient

    from rmexp.serve import build_app

    with TestClient(build_app(Stub(), serve_config())) as client:
        for method, path, status, field in [("GET", "/nowhere", 404, "path"), ("GET", "/score", 405, "method"),
                                            ("GET", "/docs", 404, "path"), ("GET", "/redoc", 404, "path"),
                                            ("GET", "/openapi.json", 404, "path")]:
            got = client.request(method, path)
            assert got.status_code == status and got.json()["field"] == field and got.json()["error"], got.text
        assert client.head("/health").status_code == 200
        health = client.get("/health").json()
        assert health["status"] == "ok" and "/secret" not in json.dumps(health)
    with TestClient(build_app(Stub(), serve_config("serve.docs=true"))) as client:
        assert client.get("/openapi.json").status_code == 200


def test_serving_beyond_loopback_without_a_key_warns(caplog):
    from rmexp.serve import is_loopback, warn_if_exposed

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("gpu-node-7")
    with caplog.at_level(logging.WARNING, logger="rmexp.serve"):
        warn_if_exposed(serve_config("serve.host=127.0.0.1"))
        warn_if_exposed(serve_config("serve.host=0.0.0.0", "serve.api_key=k"))
        assert not caplog.records
        warn_if_exposed(serve_config("serve.host=0.0.0.0"))
    assert len(caplog.records) == 1 and "without an API key" in caplog.text and "RMEXP_API_KEY" in caplog.text


@pytest.fixture
def stub_server(caplog):
    """The Stub behind the real uvicorn server and its read deadline (1 s), in a thread."""
    import threading

    import uvicorn

    from rmexp.serve import build_app, server_config

    cfg = serve_config("serve.read_timeout_s=1", f"serve.port={free_port()}")
    server = uvicorn.Server(uvicorn.Config(build_app(Stub(), cfg), **server_config(cfg)))
    thread = threading.Thread(target=server.run, daemon=True)
    with caplog.at_level(logging.INFO):
        thread.start()
        deadline = time.time() + 30
        while not server.started:
            assert time.time() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        yield cfg
        server.should_exit = True
        thread.join(timeout=10)


def test_slow_clients_are_answered_408_and_closed_within_the_read_timeout(stub_server):
    cfg = stub_server
    partial = [b"", b"POST /score HTTP/1.1\r\nHost: x\r\n",  # nothing yet; half a header
               b"POST /score HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"pr"]
    clients = []
    for i in range(20):
        sock = socket.create_connection(("127.0.0.1", cfg.port))
        sock.sendall(partial[i % 3])
        clients.append(sock)
    start = time.time()
    for sock in clients:
        sock.settimeout(cfg.read_timeout_s + 5)
        answer = b""
        while chunk := sock.recv(4096):  # until the server closes the connection
            answer += chunk
        sock.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["field"] == "body"
    assert time.time() - start < cfg.read_timeout_s + 3  # all closed by the deadline, not one after another
    assert httpx.get(f"http://127.0.0.1:{cfg.port}/health", timeout=5).status_code == 200


def test_a_client_gone_mid_body_is_one_info_line(stub_server, caplog):
    cfg = stub_server
    sock = socket.create_connection(("127.0.0.1", cfg.port))
    sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{")
    time.sleep(0.3)
    sock.close()
    time.sleep(0.5)
    assert httpx.get(f"http://127.0.0.1:{cfg.port}/health", timeout=5).status_code == 200
    gone = [r for r in caplog.records if "disconnected" in r.getMessage()]
    assert len(gone) == 1 and gone[0].levelno == logging.INFO
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def raw_exchange(port: int, chunks: list[tuple[float, bytes]], timeout: float) -> tuple[bytes, float]:
    """Send each chunk after its pause; read until the server closes. Returns (all it said, seconds)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(timeout)
    start = time.time()
    for pause, chunk in chunks:
        time.sleep(pause)
        sock.sendall(chunk)
    answer = b""
    try:
        while chunk := sock.recv(4096):
            answer += chunk
    except TimeoutError:
        pass
    sock.close()
    return answer, time.time() - start


SCORE = b'{"prompts": ["ab"], "completions": ["c"]}'
FULL = b"POST /score HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
    len(SCORE), SCORE)


def test_a_slow_request_pipelined_behind_a_whole_one_is_timed_out_too(stub_server):
    cfg = stub_server
    half = b"POST /score HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{"
    for chunks in ([(0, FULL + half)], [(0, FULL), (0.2, half)]):  # one packet, or two
        answer, seconds = raw_exchange(cfg.port, chunks, cfg.read_timeout_s + 5)
        assert answer.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408" in answer, answer[-300:]
        assert seconds < cfg.read_timeout_s + 3


def test_a_healthy_request_on_a_kept_alive_connection_is_not_timed_out(stub_server):
    """An early answer (404 before the body) leaves no deadline behind for the next request."""
    cfg = stub_server
    early = b"POST /nowhere HTTP/1.1\r\nHost: x\r\ncontent-length: 5\r\n\r\n"
    health = b"GET /health HTTP/1.1\r\nHost: x\r\n"
    wait = cfg.read_timeout_s * 0.8
    answer, _ = raw_exchange(cfg.port, [(0, early), (0.1, b"hello"), (wait, health), (wait, b"Connection: close\r\n\r\n")],
                             cfg.read_timeout_s + 5)
    assert answer.startswith(b"HTTP/1.1 404") and b"HTTP/1.1 408" not in answer, answer[-300:]
    assert answer.count(b"HTTP/1.1 200") == 1  # /health answered, within its own deadline


def test_parsing_and_tokenizing_run_off_the_event_loop(stub_server):
    """A request stuck in tokenization does not hold /health: it would, were it on the event loop."""
    import threading

    cfg = stub_server
    Stub.gate = threading.Event()
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, f"http://127.0.0.1:{cfg.port}/score", timeout=30,
                                  json={"prompts": ["ab"], "completions": ["c"]})
            time.sleep(0.3)
            assert httpx.get(f"http://127.0.0.1:{cfg.port}/health", timeout=5).status_code == 200
            assert not pending.done()
            Stub.gate.set()
            assert pending.result().json() == {"rewards": [3.0]}
    finally:
        Stub.gate = None
