"""rmexp.ensemble: soups of LoRA adapters (exact mean of the members' updates) and the members' checks."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from conftest import ROOT, compose_cfg, tiny_overrides
from rmexp import RewardModel
from rmexp.config import SourceConfig, to_typed
from rmexp.dataset import source_pairs
from rmexp.ensemble import EnsembleError, build, lora_scaling, soup
from rmexp.train import main

U32 = 2.0 ** -24  # fp32 unit roundoff


def member(rank: int, alpha: float, seed: int, rslora: bool = False, d_in: int = 12, d_out: int = 10):
    g = torch.Generator().manual_seed(seed)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "use_rslora": rslora,
              "target_modules": ["q_proj", "v_proj"], "rank_pattern": {}, "alpha_pattern": {}}
    tensors = {}
    for name in ("q_proj", "v_proj"):
        prefix = f"base_model.model.model.layers.0.self_attn.{name}"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, d_in, generator=g)
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(d_out, rank, generator=g)
    tensors["base_model.model.score.weight"] = torch.randn(1, d_in, generator=g)
    return config, tensors


def update(config: dict, tensors: dict, name: str, dtype=torch.float64) -> torch.Tensor:
    prefix = f"base_model.model.model.layers.0.self_attn.{name}"
    a, b = tensors[f"{prefix}.lora_A.weight"].to(dtype), tensors[f"{prefix}.lora_B.weight"].to(dtype)
    return lora_scaling(config) * b @ a


@pytest.mark.numerics
@pytest.mark.parametrize("weights", [None, [0.5, 0.3, 0.2]])
def test_soup_update_is_the_mean_of_the_members_updates(weights):
    members = [member(4, 16, 0), member(8, 16, 1), member(16, 8, 2, rslora=True)]
    weights = weights or [1 / 3] * 3
    config, tensors = soup(members, weights)
    assert config["r"] == 28 and lora_scaling(config) == 1.0
    for name in ("q_proj", "v_proj"):
        reference = sum(w * update(c, t, name) for (c, t), w in zip(members, weights, strict=True))  # float64
        merged = update(config, tensors, name, torch.float32).double()
        # fp32 forward error of the rank-28 dot products and the one scaling of A (Higham: gamma_{n+2} |B||A|)
        prefix = f"base_model.model.model.layers.0.self_attn.{name}"
        bound = (config["r"] + 2) * U32 / (1 - (config["r"] + 2) * U32) * (
            tensors[f"{prefix}.lora_B.weight"].double().abs() @ tensors[f"{prefix}.lora_A.weight"].double().abs())
        assert ((merged - reference).abs() <= bound + 1e-300).all()
        # and the bound is tight enough to mean something: a member left out breaks it
        partial = sum(w * update(c, t, name) for (c, t), w in zip(members[:2], weights[:2], strict=True))
        assert not ((merged - partial).abs() <= bound).all()
    heads = [w * t["base_model.model.score.weight"].double() for (_, t), w in zip(members, weights, strict=True)]
    # K fp32 products and K-1 sums, w rounded to fp32 too: gamma_{K+2} times the sum of |w_k h_k|
    bound = (len(members) + 2) * U32 / (1 - (len(members) + 2) * U32) * sum(h.abs() for h in heads)
    assert ((tensors["base_model.model.score.weight"].double() - sum(heads)).abs() <= bound).all()


@pytest.mark.numerics
def test_one_member_soup_is_the_member():
    # scaling 16/8 = 2, a power of two: s*A is exact, so the soup computes B(2Ax) = 2 B(Ax), the member's update
    config, tensors = member(8, 16, 3)
    out_config, out = soup([(config, tensors)], [1.0])
    assert out_config["r"] == 8 and lora_scaling(out_config) == 1.0
    for key, t in tensors.items():
        assert torch.equal(out[key], 2 * t if ".lora_A." in key else t), key


def test_soup_refuses_members_adapting_other_modules():
    a, b = member(4, 8, 0), member(4, 8, 1)
    b[0]["target_modules"] = ["q_proj", "k_proj"]
    with pytest.raises(EnsembleError, match="target_modules"):
        soup([a, b], [0.5, 0.5])


# ---------------------------------------------------------------- on the tiny model: members trained for real


@pytest.fixture(scope="module")
def selection(tmp_path_factory):
    """48 pairs of the sample file: what the members are ranked and standardized on (the scoring is the cost here)."""
    path = tmp_path_factory.mktemp("selection") / "selection.jsonl"
    path.write_text("".join((ROOT / "data/preference.jsonl").read_text().splitlines(keepends=True)[:48]))
    return path


@pytest.fixture(scope="module")
def members(tmp_path_factory, selection):
    """Three tiny runs on one base: two learning rates sharing the seed, and another seed (lora.r 4 and 8)."""
    runs = []
    for name, extra in (("a", ("lora.r=8",)), ("b", ("lora.r=4", "trainer.learning_rate=1e-2")),
                        ("c", ("lora.r=8", "trainer.seed=7"))):
        out = tmp_path_factory.mktemp(f"member_{name}")
        main(compose_cfg(*tiny_overrides(out, "logger=none", *extra)))
        runs.append(out)
    return runs


@pytest.fixture(scope="module")
def mean_ensemble(members, selection, tmp_path_factory):
    """The three members' mean ensemble, built once: (its dir, rmexp-ensemble's record)."""
    out = tmp_path_factory.mktemp("mean") / "ensemble"
    return out, build(ensemble_cfg(members, out, selection))


def ensemble_cfg(runs, out, selection, *extra):
    with initialize_config_module(config_module="rmexp.conf", version_base="1.3"):
        cfg = compose("ensemble", overrides=[f"members=[{','.join(str(m) for m in runs)}]", f"output_dir={out}",
                                             f"data.path={selection}", *extra])
    return to_typed(cfg)


def selection_pairs(selection):
    cfg = ensemble_cfg([], "x", selection)
    pairs, *_ = source_pairs(SourceConfig(path=cfg.data.path, split=cfg.data.split), cfg.data, on_duplicate="skip")
    return pairs


def test_a_one_member_mean_ensemble_scores_as_the_member_standardized(members, selection, tmp_path):
    record = build(ensemble_cfg(members[:1], tmp_path / "one", selection))
    member = RewardModel.load(members[0])
    ens = RewardModel.load(tmp_path / "one")
    pairs = selection_pairs(selection)
    raw = member.score_pairs(pairs).double()
    (stats,) = record["members"]
    # the standardization is the member's own on the selection pairs, and exactly what the ensemble returns
    assert stats["reward_mean"] == pytest.approx(float(raw.mean()), rel=0, abs=1e-12 * float(raw.abs().max()))
    expected = ((raw - stats["reward_mean"]) / stats["reward_std"]).float()
    assert torch.equal(ens.score_pairs(pairs), expected)
    assert torch.equal(ens.last_uncertainty, torch.zeros_like(expected))
    assert record["selection_accuracy"] == float((raw[:, 0] > raw[:, 1]).double().mean())


def test_mean_ensemble_is_the_mean_of_each_member_scored_alone(mean_ensemble, selection):
    path, record = mean_ensemble
    ens = RewardModel.load(path)
    pairs = selection_pairs(selection)
    mean = ens.score_pairs(pairs).double()
    alone = []
    for stats in record["members"]:
        raw = RewardModel.load(stats["path"]).score_pairs(pairs).double()
        alone.append((raw - stats["reward_mean"]) / stats["reward_std"])
    alone = torch.stack(alone)
    # the same fp32 forwards, the same float64 standardization: equal up to the final cast to fp32
    assert torch.allclose(mean, alone.mean(0), rtol=2 * U32, atol=0)
    assert torch.allclose(ens.last_uncertainty.double(), alone.std(0, correction=0), rtol=4 * U32, atol=1e-6)
    # as a TRL reward function: mean - penalty * std, and the worst member
    prompts, answers = [p.prompt for p in pairs[:3]], [p.chosen for p in pairs[:3]]
    plain = torch.tensor(ens(prompts=prompts, completions=answers), dtype=torch.float64)
    spread = ens.last_uncertainty.double()
    worst = ens.last_members.double().min(0).values
    ens.uncertainty_penalty = 0.5
    f64 = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    # the penalty is applied in float64 to the fp32 spread: one rounding of each (and of the fp32 mean)
    assert torch.allclose(f64(ens(prompts=prompts, completions=answers)), plain - 0.5 * spread, rtol=0,
                          atol=4 * U32 * float((plain.abs() + spread).max()))
    ens.worst_case = True
    assert torch.allclose(f64(ens(prompts=prompts, completions=answers)), worst, rtol=0, atol=0)


def test_a_soup_dir_is_a_run_dir_that_scores_its_merged_adapter(members, selection, tmp_path):
    record = build(ensemble_cfg(members[:2], tmp_path / "soup", selection, "mode=soup"))
    rm = RewardModel.load(tmp_path / "soup")  # a run dir like any other
    assert rm.model.peft_config["default"].r == 12 and len(record["members"]) == 2
    pairs = selection_pairs(selection)
    rewards = rm.score_pairs(pairs)
    assert record["selection_accuracy"] == float((rewards[:, 0] > rewards[:, 1]).double().mean())
    # and it exports as a run does: one standalone model scoring as the soup, within a run's export bound
    from rmexp.export import export
    from test_evaluate import EXPORT_TOLERANCE

    exported = RewardModel.load(export(tmp_path / "soup", tmp_path / "exported"))
    assert (exported.score_pairs(pairs[:8]) - rewards[:8]).abs().max().item() < EXPORT_TOLERANCE


def test_greedy_soup_keeps_a_member_only_when_selection_accuracy_holds(members, selection, tmp_path):
    ranked = build(ensemble_cfg(members, tmp_path / "all", selection))["members"]  # best first on the selection pairs
    record = build(ensemble_cfg(members, tmp_path / "greedy", selection, "mode=soup", "greedy=true"))
    assert record["members"][0]["path"] == ranked[0]["path"]
    best, kept = ranked[0]["selection_accuracy"], [ranked[0]["path"]]
    assert [t["path"] for t in record["greedy_trials"]] == [m["path"] for m in ranked[1:]]
    for trial in record["greedy_trials"]:
        assert trial["kept"] == (trial["selection_accuracy"] >= best)
        if trial["kept"]:
            best, kept = trial["selection_accuracy"], kept + [trial["path"]]
    assert [m["path"] for m in record["members"]] == kept and record["selection_accuracy"] == best


@pytest.mark.parametrize(("field", "override"), [("max_length", "trainer.max_length=64"),
                                                  ("system prompt", "data.system_prompt=Be brief."),
                                                  ("base model", "model.name_or_path=some/other-model")])
def test_members_that_would_score_text_differently_are_refused_by_name(members, selection, tmp_path, field, override):
    other = tmp_path / "other"
    shutil.copytree(members[1], other)
    cfg = OmegaConf.load(other / "rmexp_config.yaml")
    key, value = override.split("=", 1)
    OmegaConf.update(cfg, key, value)
    OmegaConf.save(cfg, other / "rmexp_config.yaml")
    with pytest.raises(EnsembleError, match=f"differ in their {field}"):
        build(ensemble_cfg([members[0], other], tmp_path / "refused", selection))
    assert not (tmp_path / "refused").exists()


def test_members_with_another_chat_template_are_refused_by_name(members, selection, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(members[1], other)
    (other / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    with pytest.raises(EnsembleError, match="differ in their chat template"):
        build(ensemble_cfg([members[0], other], tmp_path / "refused", selection))
    assert not (tmp_path / "refused").exists()


def sweep_dir(tmp_path, statuses):
    """A sweep dir as Hydra's multirun leaves it, its jobs with the given metrics.json statuses (None: none yet)."""
    sweep = tmp_path / "sweep"
    for n, status in enumerate(statuses):
        (sweep / str(n) / ".hydra").mkdir(parents=True)
        (sweep / str(n) / ".hydra" / "overrides.yaml").write_text(f"- lora.r={4 * (n + 1)}\n")
        if status is not None:
            (sweep / str(n) / "metrics.json").write_text(json.dumps({"status": status}))
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    return sweep


@pytest.mark.parametrize(("members_of", "extra", "message"), [
    (lambda runs, tmp: [], (), r"members=\[\] is empty"),
    (lambda runs, tmp: [runs[0], runs[0]], (), "lists a run twice"),
    (lambda runs, tmp: runs[:2], ("top=1",), "top=<k> ranks a sweep's runs"),
    (lambda runs, tmp: [next((runs[0] / "checkpoints").glob("checkpoint-*"))], (), "not a checkpoint"),
    (lambda runs, tmp: [sweep_dir(tmp, ["failed", None])], ("top=1",), "no finished run"),
])
def test_member_lists_that_make_no_ensemble_are_refused_before_anything_loads(members, selection, tmp_path, members_of,
                                                                              extra, message):
    runs = members_of(members, tmp_path)
    with initialize_config_module(config_module="rmexp.conf", version_base="1.3"):
        cfg = compose("ensemble", overrides=[f"members=[{','.join(str(m) for m in runs)}]",
                                             f"output_dir={tmp_path / 'refused'}", f"data.path={selection}", *extra])
    with pytest.raises(EnsembleError, match=message):
        build(to_typed(cfg))
    assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize(("key", "value"), [("use_dora", True), ("rank_pattern", {"q_proj": 2}),
                                            ("target_modules", ["q_proj"]), ("modules_to_save", None)])
def test_a_soup_refuses_adapters_it_cannot_average_before_scoring(members, selection, tmp_path, monkeypatch, key, value):
    other = tmp_path / "other"
    shutil.copytree(members[1], other)
    if key == "modules_to_save":  # the same config, another saved tensor: the head left out of the weights
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(other / "adapter_model.safetensors"))
        save_file({k: v for k, v in tensors.items() if ".score." not in k}, str(other / "adapter_model.safetensors"))
    else:
        config = json.loads((other / "adapter_config.json").read_text())
        (other / "adapter_config.json").write_text(json.dumps(config | {key: value}))
    monkeypatch.setattr("rmexp.ensemble.score_members", lambda *a: pytest.fail("scored before refusing"))
    with pytest.raises(EnsembleError, match="use mode=mean"):
        build(ensemble_cfg([members[0], other], tmp_path / "refused", selection, "mode=soup"))
    assert not (tmp_path / "refused").exists()


def test_evaluate_of_a_mean_ensemble_writes_member_rewards_and_judges_its_uncertainty(members, mean_ensemble, selection,
                                                                                      tmp_path):
    from conftest import compose_evaluate
    from rmexp.evaluate import evaluate

    metrics = evaluate(compose_evaluate(mean_ensemble[0], selection, tmp_path / "eval"))
    lines = [json.loads(line) for line in (tmp_path / "eval" / "scores.jsonl").read_text().splitlines()]
    assert len(lines) == metrics["n_pairs"] and all(len(line["members_chosen"]) == 3 for line in lines)
    for line in lines:  # the reward is the members' mean, the uncertainty the spread of their margins
        margins = torch.tensor(line["members_chosen"], dtype=torch.float64) - torch.tensor(line["members_rejected"],
                                                                                          dtype=torch.float64)
        assert line["uncertainty"] == pytest.approx(float(margins.std(correction=0)), rel=1e-6)
        assert line["reward_chosen"] == pytest.approx(sum(line["members_chosen"]) / 3, rel=1e-6, abs=1e-6)
    assert set(metrics["uncertainty"]) == {"abs_margin", "spread", "disagreement"}
    # one run gets the |margin| baseline only
    single = evaluate(compose_evaluate(members[0], selection, tmp_path / "eval1"))
    assert set(single["uncertainty"]) == {"abs_margin"}


def test_the_server_answers_an_ensembles_uncertainty_beside_openrlhfs_rewards(mean_ensemble):
    from fastapi.testclient import TestClient

    from rmexp.serve import build_app
    from test_serve import COMPLETIONS, PROMPTS, serve_config

    rm = RewardModel.load(mean_ensemble[0])
    expected = rm(prompts=PROMPTS, completions=COMPLETIONS)
    spread = rm.last_uncertainty.tolist()
    with TestClient(build_app(rm, serve_config())) as client:
        got = client.post("/score", json={"prompts": PROMPTS, "completions": COMPLETIONS})
        openrlhf = client.post("/get_reward", json={"query": [p + c for p, c in zip(PROMPTS, COMPLETIONS, strict=True)],
                                                    "prompts": PROMPTS, "labels": ["x"] * len(PROMPTS)})
    assert got.status_code == 200, got.text
    assert got.json()["rewards"] == pytest.approx(expected, abs=1e-6)
    assert got.json()["uncertainty"] == pytest.approx(spread, abs=1e-6)
    assert openrlhf.status_code == 200, openrlhf.text
    body = openrlhf.json()
    assert len(body["rewards"]) == len(body["uncertainty"]) == len(PROMPTS)


def test_rmexp_score_prints_an_ensembles_uncertainty_beside_its_reward(mean_ensemble, capsys):
    from rmexp.config import ScoreConfig
    from rmexp.score import score

    question, answer = "Why is the sky blue?", "Rayleigh scattering."
    reward = score(ScoreConfig(checkpoint=str(mean_ensemble[0]), question=question, answer=answer, device="auto"))
    rm = RewardModel.load(mean_ensemble[0])
    assert reward == rm.score(question, answer)
    printed = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert float(printed[0]) == pytest.approx(reward, abs=1e-6) and printed[1] == "uncertainty"
    assert float(printed[2]) == pytest.approx(float(rm.last_uncertainty[0]), abs=1e-6)


def test_grpo_steps_on_an_ensemble_with_an_uncertainty_penalty(members, mean_ensemble, tmp_path):
    from test_serve import grpo_steps

    rm = RewardModel.load(mean_ensemble[0])
    rm.uncertainty_penalty = 1.0
    single = RewardModel.load(members[0])
    assert rm.__name__ != single.__name__  # TRL logs each under its own name
    history, moved = grpo_steps(tmp_path, [rm, single], "ensemble")
    assert moved
    for name in (rm.__name__, single.__name__):
        assert any(f"rewards/{name}/mean" in h for h in history), name
