"""One reward model out of several runs on one base: `rmexp-ensemble members=[<run dirs>] mode=mean|soup`.

- soup: one LoRA adapter holding the exact mean of the members' weight updates. For LoRA on one frozen base the
  mean of K updates s_k B_k A_k is itself one LoRA update of rank sum(r_k): the A's stacked (each scaled by
  w_k s_k), the B's side by side, scaling 1 (peft's `add_weighted_adapter(combination_type="cat")` builds the
  same; here it is built from the saved tensors, so no model loads and the score heads, which peft leaves out,
  are averaged too). The soup dir is a run dir: everything that reads a run reads it.
- mean: the members' adapters on one base, each member's rewards standardized by its own mean and spread on the
  selection pairs (never trained on, never reported on); the reward is their mean, `uncertainty` their standard
  deviation (rmexp.reward_model.EnsembleRewardModel).

Members must share the base model, its quantization, chat template, system prompt and max_length: anything else
is an EnsembleError naming the field and the two members.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig

from rmexp.config import CONF_PATH, EnsembleConfig, to_typed
from rmexp.errors import UserError
from rmexp.rundir import ENSEMBLE_FILE

if TYPE_CHECKING:
    import torch

log = logging.getLogger("rmexp.ensemble")  # by name: run as `python -m rmexp.ensemble` this module is __main__
# torch loads in the functions that use it: a bad override fails in composition in about a second
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# what members must share to score one text alike: (config path in rmexp_config.yaml, what the refusal calls it)
SHARED = (("model.name_or_path", "base model"), ("model.revision", "base model revision"),
          ("quantization", "quantization"), ("trainer.max_length", "max_length"),
          ("data.system_prompt", "system prompt"))


class EnsembleError(UserError, ValueError):
    """Members that cannot make one reward model, named with the field they differ in."""


def _select(cfg, dotted: str):
    value = functools.reduce(getattr, dotted.split("."), cfg)
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def chat_template(run: Path) -> str | None:
    """The chat template the run's tokenizer was saved with (chat_template.jinja, or tokenizer_config.json's)."""
    jinja = run / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = run / "tokenizer_config.json"
    return json.loads(config.read_text(encoding="utf-8")).get("chat_template") if config.is_file() else None


def check_members(runs: list[Path]) -> None:
    """Refuse members that would not score one text alike: a different base, quantization, chat template, system
    prompt or max_length, named with both values."""
    from rmexp.rundir import read_run_config

    if not runs:
        raise EnsembleError("members=[] is empty: pass the run dirs to combine, or a sweep dir and top=<k>")
    if len(set(runs)) != len(runs):
        raise EnsembleError(f"members lists a run twice: {[str(r) for r in runs]}")
    first, first_cfg = runs[0], read_run_config(runs[0])
    for run in runs[1:]:
        cfg = read_run_config(run)
        for dotted, what in SHARED:
            a, b = _select(first_cfg, dotted), _select(cfg, dotted)
            if a != b:
                raise EnsembleError(f"{run} and {first} differ in their {what} ({dotted}: {b!r} vs {a!r}); the members "
                                    f"of one ensemble must share it")
        if chat_template(run) != chat_template(first):
            raise EnsembleError(f"{run} and {first} differ in their chat template (chat_template.jinja); the members of "
                                f"one ensemble must format text alike")


def lora_scaling(config: dict) -> float:
    """peft's LoRA scaling: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora."""
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def adapter_config(run: Path) -> dict:
    """A member's adapter config, refused unless a soup can average it (plain LoRA: no DoRA, no per-module ranks)."""
    config = json.loads((run / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    unsupported = [k for k in ("rank_pattern", "alpha_pattern", "use_dora", "lora_bias") if config.get(k)]
    if config.get("peft_type") != "LORA" or unsupported:
        raise EnsembleError(f"{run}: a soup averages plain LoRA adapters; this one has "
                            f"{unsupported or config.get('peft_type')}: use mode=mean")
    return config


def _modules(config: dict):
    targets = config["target_modules"]  # a list of names, or one regex string
    return targets if isinstance(targets, str) else sorted(targets)


def check_soupable(names: list[str], configs: list[dict], keys: list[set[str]]) -> None:
    """Members a soup can average: LoRA on the same modules, saving the same tensors (score head, modules_to_save,
    layers); else an EnsembleError naming the two members."""
    for name, config, saved in zip(names[1:], configs[1:], keys[1:], strict=True):
        if _modules(config) != _modules(configs[0]) or saved != keys[0]:
            raise EnsembleError(f"{name} and {names[0]} adapt different modules (lora.target_modules "
                                f"{_modules(config)} vs {_modules(configs[0])}, or other saved tensors): a soup needs "
                                "the same ones; use mode=mean")


def check_soup(runs: list[Path]) -> None:
    """Refuse, before anything is scored, members a soup cannot average: other adapters than plain LoRA, or LoRA
    on other modules (read from the files' headers: no tensor loads)."""
    from safetensors import safe_open

    keys = []
    for run in runs:
        with safe_open(str(run / ADAPTER_WEIGHTS), framework="pt") as f:
            keys.append(set(f.keys()))
    check_soupable([str(r) for r in runs], [adapter_config(r) for r in runs], keys)


def read_adapter(run: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return adapter_config(run), load_file(str(run / ADAPTER_WEIGHTS))


def soup(adapters: list[tuple[dict, dict[str, torch.Tensor]]], weights: list[float]) -> tuple[dict, dict]:
    """The adapter (config, tensors) whose update is sum_k w_k s_k B_k A_k exactly: rank sum(r_k), scaling 1.
    Every other saved tensor (the score head, modules_to_save) is the weighted mean of the members'."""
    import torch

    if len(adapters) != len(weights) or not adapters:
        raise EnsembleError(f"{len(adapters)} adapters and {len(weights)} weights")
    configs = [c for c, _ in adapters]
    keys = set(adapters[0][1])
    check_soupable([f"member {k}" for k in range(len(adapters))], configs, [set(t) for _, t in adapters])
    rank = sum(c["r"] for c in configs)
    out: dict[str, torch.Tensor] = {}
    for key in sorted(keys):
        if ".lora_A." in key:
            out[key] = torch.cat([w * lora_scaling(c) * t[key].float() for (c, t), w in zip(adapters, weights, strict=True)], 0)
        elif ".lora_B." in key:
            out[key] = torch.cat([t[key].float() for _, t in adapters], 1)
        else:
            out[key] = sum(w * t[key].float() for (_, t), w in zip(adapters, weights, strict=True))
    config = dict(configs[0], r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={})
    return config, out


# ---------------------------------------------------------------- building one from runs


def resolve_members(entries: list[str], top: int | None) -> list[Path]:
    """The run dirs named, or (one entry that is a sweep dir, with top=<k>) its finished runs, all of them
    candidates for the selection split to rank."""
    from rmexp.rundir import is_run_dir, locate
    from rmexp.sweep import read_jobs

    paths = [Path(e).expanduser() for e in entries]
    if len(paths) == 1 and paths[0].is_dir() and not is_run_dir(paths[0]) and (paths[0] / "multirun.yaml").is_file():
        jobs = [j.dir for j in read_jobs(paths[0]) if j.status == "ok"]
        if not jobs:
            raise EnsembleError(f"{paths[0]}: a sweep dir with no finished run (status ok) to take members from")
        log.info("%s: %d finished runs, ranked on the selection pairs%s", paths[0], len(jobs),
                 f" (top={top} kept)" if top else "")
        return jobs
    if top is not None:
        raise EnsembleError("top=<k> ranks a sweep's runs: pass members=<sweep dir>, not a list of run dirs")
    for p in paths:
        if locate(p) != p:
            raise EnsembleError(f"{p}: a member is a run dir rmexp-train wrote (its final model), not a checkpoint "
                                "or an exported model")
    return paths


def score_members(runs: list[Path], pairs, cfg, placement) -> torch.Tensor:
    """Every member's raw rewards on the selection pairs (K x n x 2), the members' adapters on one base."""
    from rmexp.reward_model import EnsembleRewardModel

    record = {"mode": "mean", "members": [{"path": str(r), "reward_mean": 0.0, "reward_std": 1.0} for r in runs]}
    rm = EnsembleRewardModel.from_record(Path(cfg.output_dir), record, cfg.eval.packed, cfg.eval.row_tokens, placement)
    rm.score_encoded(rm.encode(pairs))
    members = rm.last_members
    del rm
    return members


def accuracy(rewards: torch.Tensor) -> float:
    return float((rewards[..., 0] > rewards[..., 1]).double().mean())


def member_record(run: Path, rewards: torch.Tensor) -> dict:
    flat = rewards.double().flatten()
    return {"path": str(run.resolve()), "reward_mean": float(flat.mean()), "reward_std": float(flat.std(correction=0)),
            "selection_accuracy": accuracy(rewards)}


def write_soup(runs: list[Path], weights: list[float], out: Path) -> None:
    """A run dir holding the soup of `runs`: adapter, tokenizer and the first member's config with the soup's rank."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from rmexp.model import load_tokenizer
    from rmexp.rundir import RUN_CONFIG, read_run_config

    config, tensors = soup([read_adapter(r) for r in runs], weights)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
    run_cfg = OmegaConf.structured(read_run_config(runs[0]))  # a run of any rmexp version: today's schema
    run_cfg.lora.r, run_cfg.lora.lora_alpha = config["r"], config["lora_alpha"]
    run_cfg.paths.output_dir = str(out.resolve())
    OmegaConf.save(run_cfg, out / RUN_CONFIG)
    load_tokenizer(str(runs[0])).save_pretrained(str(out))


def soup_accuracy(runs: list[Path], pairs, cfg, where: Path) -> tuple[float, torch.Tensor]:
    from rmexp.reward_model import RewardModel

    shutil.rmtree(where, ignore_errors=True)
    write_soup(runs, [1 / len(runs)] * len(runs), where)
    rm = RewardModel.load(where, packed=cfg.eval.packed, row_tokens=cfg.eval.row_tokens, device=cfg.device)
    rewards = rm.score_encoded(rm.encode(pairs))
    return accuracy(rewards), rewards


def build(cfg) -> dict:
    """rmexp-ensemble: score the candidates on the selection pairs, keep the top k (or all), write the ensemble."""
    import torch

    from rmexp.config import SourceConfig
    from rmexp.dataset import source_pairs
    from rmexp.device import place
    from rmexp.evaluate import log_read
    from rmexp.reward_model import RewardModel
    from rmexp.rundir import write_json

    started = time.time()
    out = Path(cfg.output_dir)
    if (out / ENSEMBLE_FILE).exists() or (out / ADAPTER_WEIGHTS).exists():
        raise EnsembleError(f"{out} holds a model already: pass a new output_dir")
    runs = resolve_members(list(cfg.members), cfg.top)
    check_members(runs)
    mode = getattr(cfg.mode, "value", cfg.mode)
    if mode == "soup":
        check_soup(runs)
    pairs, stats, origin, data_format = source_pairs(SourceConfig(path=cfg.data.path, split=cfg.data.split), cfg.data,
                                                     on_duplicate="skip")
    log_read(origin, stats, data_format, cfg.data)
    placement = place(cfg.device)
    raw = score_members(runs, pairs, cfg, placement)
    records = [member_record(r, raw[k]) for k, r in enumerate(runs)]
    order = sorted(range(len(runs)), key=lambda k: (-records[k]["selection_accuracy"], k))
    if cfg.top is not None:
        order = order[:cfg.top]
    for k in order:
        log.info("member %s: selection accuracy %.3f", runs[k], records[k]["selection_accuracy"])
    result = {"mode": mode, "selection": {"path": str(cfg.data.path), "n_pairs": len(pairs)}}
    if mode == "mean":
        members = [records[k] for k in order]
        z = torch.stack([(raw[k].double() - records[k]["reward_mean"]) / records[k]["reward_std"] for k in order])
        result |= {"members": members, "selection_accuracy": accuracy(z.mean(0))}
        out.mkdir(parents=True, exist_ok=True)
    else:
        chosen = [order[0]]
        best = records[order[0]]["selection_accuracy"]
        trials, scored = [], None  # scored: the selection rewards of the soup of `chosen`, once a trial has them
        if cfg.greedy:  # Wortsman et al. 2022: add a member only if the soup's selection accuracy does not drop
            for k in order[1:]:
                acc, trial = soup_accuracy([runs[j] for j in chosen + [k]], pairs, cfg, out / ".trial")
                trials.append({"path": records[k]["path"], "selection_accuracy": acc, "kept": acc >= best})
                log.info("greedy soup: + %s -> selection accuracy %.3f (%s)", runs[k], acc,
                         "kept" if acc >= best else f"dropped: below {best:.3f}")
                if acc >= best:
                    chosen, best, scored = chosen + [k], acc, trial
            shutil.rmtree(out / ".trial", ignore_errors=True)
        else:
            chosen = order
        write_soup([runs[k] for k in chosen], [1 / len(chosen)] * len(chosen), out)
        if scored is None:  # no trial scored this soup (the same tensors score the same)
            rm = RewardModel.load(out, packed=cfg.eval.packed, row_tokens=cfg.eval.row_tokens, device=cfg.device)
            scored = rm.score_encoded(rm.encode(pairs))
        rewards = scored.double().flatten()
        result |= {"members": [records[k] for k in chosen], "weights": [1 / len(chosen)] * len(chosen),
                   "greedy": bool(cfg.greedy), "greedy_trials": trials, "selection_accuracy": accuracy(scored)}
        # a soup dir is a run dir: its reward statistics are on the selection pairs, which it was not trained on
        write_json(out / "metrics.json", {"status": "ok", "reward_mean": float(rewards.mean()),
                                          "reward_std": float(rewards.std(correction=0)),
                                          "selection_accuracy": result["selection_accuracy"], "ensemble": mode})
    result["runtime_s"] = round(time.time() - started, 2)
    write_json(out / ENSEMBLE_FILE, result)
    print(f"{mode} of {len(result['members'])} members: selection accuracy {result['selection_accuracy']:.3f} on "
          f"{len(pairs)} pairs of {cfg.data.path} -> {out}")
    return result


# ---------------------------------------------------------------- rmexp-ensemble


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="ensemble")
def app(cfg: DictConfig) -> float:
    from rmexp import console
    from rmexp.config import check_paths

    with console.reported():
        cfg = to_typed(cfg)
        check_paths(cfg.data)
        return build(cfg)["selection_accuracy"]


def cli() -> None:
    from rmexp import console

    console.run(app, EnsembleConfig)


if __name__ == "__main__":
    cli()
