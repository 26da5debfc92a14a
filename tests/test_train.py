"""A real 4-bit QLoRA training run on the tiny model: what changes, what must not, what is written."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import bitsandbytes as bnb
import pytest
import torch
from transformers import TrainerCallback

from conftest import HH_PAIRS, ROOT, compose_cfg, needs_shared, tiny_overrides
from reference_reader import load_data
from rmexp.builtin import resolve_model_path
from rmexp.data import DataError, tokenize_pairs
from rmexp.model import load_reward_model, load_tokenizer
from rmexp.reward_model import score_pairs
from rmexp.train import main
from wandb_records import OfflineRun


class Probe(TrainerCallback):
    """Snapshots the quantized base, the trainable weights and the eval rewards around training."""

    def __init__(self, eval_ds, pad_id):
        self.eval_ds, self.pad_id = eval_ds, pad_id

    def snapshot(self, model):
        rewards = score_pairs(model, list(self.eval_ds["chosen_ids"]), list(self.eval_ds["rejected_ids"]), self.pad_id)
        return {
            "rewards": rewards,
            "q4": {n: (m.weight.data.clone(), m.weight.quant_state.absmax.clone())
                   for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)},
            "trainable": {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad},
        }

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = self.snapshot(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.after = self.snapshot(model)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_run")
    cfg = compose_cfg(*tiny_overrides(out))
    _, eval_pairs, _ = load_data(cfg.data)
    tok = load_tokenizer(resolve_model_path(cfg.model.name_or_path, cfg.model.cache_dir))
    eval_ds, _ = tokenize_pairs(tok, eval_pairs, cfg.trainer.max_length)
    probe = Probe(eval_ds, tok.pad_token_id)
    accuracy = main(cfg, callbacks=[probe])
    return SimpleNamespace(out=out, cfg=cfg, accuracy=accuracy, probe=probe, eval_ds=eval_ds,
                           metrics=json.loads((out / "metrics.json").read_text()))


def test_training_changes_rewards_and_keeps_the_4bit_base_frozen(tiny_run):
    before, after = tiny_run.probe.before, tiny_run.probe.after
    assert before["q4"], "no 4-bit layers: the base was not quantized"
    assert all(torch.equal(b, a) for n in before["q4"] for b, a in zip(before["q4"][n], after["q4"][n], strict=True))
    changed = {n for n in before["trainable"] if not torch.equal(before["trainable"][n], after["trainable"][n])}
    assert any("lora_A" in n or "lora_B" in n for n in changed)
    assert any("score" in n for n in changed)  # the reward head trains in full
    assert not any("lora" not in n and "score" not in n for n in before["trainable"])  # nothing else trains
    assert (before["rewards"] - after["rewards"]).abs().max() > 1e-3


def test_metrics_json_and_run_dir(tiny_run):
    m, out = tiny_run.metrics, tiny_run.out
    assert m["status"] == "ok" and m["pairwise_accuracy"] == tiny_run.accuracy
    assert m["n_eval_pairs"] == len(tiny_run.eval_ds) > 0 and m["global_step"] == 8
    assert m["eval_loss"] > 0 and m["data"]["train_file"]["n_skipped"] == 0
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and "score" in adapter["modules_to_save"] and adapter["task_type"] == "SEQ_CLS"
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == m["n_eval_pairs"]
    # independent of the trainer's evaluation: the Probe's own padded forward at the end of training
    rewards = tiny_run.probe.after["rewards"]
    probe_accuracy = (rewards[:, 0] > rewards[:, 1]).float().mean().item()
    assert abs(probe_accuracy - m["pairwise_accuracy"]) <= 2 / len(scores)  # a bf16 near-tie may flip


def test_saved_adapter_reloads_and_reproduces_eval_scores(tiny_run):
    from peft import PeftModel

    from rmexp.prepare import for_scoring

    base, tok, _ = load_reward_model(tiny_run.cfg.model, tiny_run.cfg.quantization)
    model = PeftModel.from_pretrained(for_scoring(base), str(tiny_run.out))
    rewards = score_pairs(model, list(tiny_run.eval_ds["chosen_ids"]), list(tiny_run.eval_ds["rejected_ids"]),
                          tok.pad_token_id)
    saved = torch.tensor([[s["reward_chosen"], s["reward_rejected"]]
                          for s in map(json.loads, (tiny_run.out / "scores.jsonl").read_text().splitlines())])
    assert torch.allclose(rewards, saved, atol=2e-2), (rewards - saved).abs().max()
    assert torch.allclose(rewards, tiny_run.probe.after["rewards"], atol=2e-2)


def test_bad_data_fails_before_the_model_with_a_named_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "chosen": "a", "rejected": "b"}\n{"question": "q2", "chosen": 1, "rejected": "b"}\n')
    cfg = compose_cfg(*tiny_overrides(tmp_path / "run", f"data.path={bad}"))
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'chosen' must be a string"):
        main(cfg)
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["status"] == "failed" and "bad.jsonl:2" in m["error"]
    assert not (tmp_path / "run" / "adapter_config.json").exists()


def test_non_finite_loss_stops_the_run_without_an_adapter(tmp_path):
    from rmexp.trainer import NonFiniteLossError

    cfg = compose_cfg(*tiny_overrides(tmp_path, "trainer.learning_rate=1e30", "trainer.max_grad_norm=0",
                                      "logger=none"))
    with pytest.raises(NonFiniteLossError):
        main(cfg)
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "failed"
    assert not (tmp_path / "adapter_config.json").exists()


@needs_shared
@pytest.mark.slow
def test_cli_run_on_hh_rlhf_logs_the_same_accuracy_to_wandb(tmp_path):
    """The issue's acceptance command, through the real CLI and Hydra."""
    cmd = [sys.executable, "-m", "rmexp.train", "model=tiny", "lora.r=16", "data=file", f"data.path={HH_PAIRS}",
           "data.max_pairs=120", "trainer.max_steps=6", "logger.mode=offline", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert "held-out pairwise accuracy" in proc.stdout
    assert (tmp_path / ".hydra" / "config.yaml").is_file()
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 16
    run = OfflineRun(tmp_path)
    assert run.summary["eval/pairwise_accuracy"] == metrics["pairwise_accuracy"]
    assert any(h.get("eval/pairwise_accuracy") == metrics["pairwise_accuracy"] for h in run.history)
    assert run.config["lora"]["r"] == 16 and run.exit_code == 0
    assert metrics["n_eval_pairs"] == 12


def test_the_data_adds_the_system_prompt_and_reports_skips(tmp_path, capsys, tokenizer):
    from rmexp.config import to_typed
    from rmexp.dataset import build_datasets

    f = tmp_path / "d.jsonl"
    rows = [{"question": f"q{i}", "chosen": "good", "rejected": "bad"} for i in range(10)] + [{"question": "x"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = compose_cfg("data=file", f"data.path={f}", "data.on_error=skip", "data.system_prompt=Be kind.")
    train, held, stats = build_datasets(to_typed(cfg.data), tokenizer, 64)
    assert len(train) + len(held) == 10 and stats["train_file"]["skipped"] == {"missing_field": 1}
    system = tokenizer.apply_chat_template([{"role": "system", "content": "Be kind."}], tokenize=False)
    assert all(tokenizer.decode(r["chosen_ids"]).startswith(system) for r in train.to_list() + held.to_list())
    assert "skipped 1 of 11 records" in capsys.readouterr().out


def test_an_evaluation_between_steps_leaves_the_gradients_intact():
    """bitsandbytes repacks 4-bit weights for CPU inference at an eval forward; training must not see it."""
    from peft import get_peft_model

    from rmexp.model import build_lora_config
    from rmexp.prepare import keep_4bit_layers_trainable, upcast_reward_head

    cfg = compose_cfg("model=tiny", "data.path=data/preference.jsonl", "lora.lora_dropout=0")  # deterministic
    base, tok, _ = load_reward_model(cfg.model, cfg.quantization)
    model = get_peft_model(upcast_reward_head(base), build_lora_config(cfg.lora))
    assert keep_4bit_layers_trainable(model) > 0
    ids = torch.tensor([tok("a question and its answer")["input_ids"]])
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def grads():
        model.train()
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids).logits.float().sum().backward()
        return {n: p.grad.clone() for n, p in trainable.items()}

    before = grads()
    assert any(g.abs().sum() > 0 for n, g in before.items() if "layers.0." in n)  # gradient reaches layer 0
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids)  # an evaluation
    after = grads()
    assert all(torch.equal(after[n], before[n]) for n in before)


def test_a_failed_save_names_the_path(tmp_path, monkeypatch):
    import errno

    from rmexp.trainer import PairwiseRewardTrainer

    def full_disk(self, output_dir=None, _internal_call=False):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PairwiseRewardTrainer, "save_model", full_disk)
    cfg = compose_cfg(*tiny_overrides(tmp_path, "logger=none", "trainer.max_steps=2"))
    with pytest.raises(OSError, match=f"cannot write the run to {tmp_path}: No space left"):
        main(cfg)
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "failed"


def test_outputs_are_safetensors_and_remote_code_is_off(tiny_run):
    assert compose_cfg().model.trust_remote_code is False
    assert not [p.name for p in tiny_run.out.iterdir() if p.suffix in (".bin", ".pt", ".pkl")]
    assert (tiny_run.out / "adapter_model.safetensors").is_file()


def test_the_padded_loss_and_its_logged_metrics_are_trls(tmp_path):
    """PairwiseRewardTrainer's padded path (rmexp.loss) gives TRL RewardTrainer's loss and log values, bit for bit."""
    from trl import RewardTrainer

    from rmexp.config import to_typed
    from rmexp.model import build_lora_config
    from rmexp.prepare import for_training
    from rmexp.trainer import PairwiseRewardTrainer
    from rmexp.training_args import build_reward_config

    cfg = to_typed(compose_cfg(*tiny_overrides(tmp_path), "quantization=none", "model.dtype=float32",
                               "data.max_pairs=16", "trainer.batching=padded", "lora.lora_dropout=0",
                               "trainer.center_rewards_coefficient=0.01", "trainer.eval_strategy=no"))
    train, _, _ = load_data(cfg.data)
    model, tok, _ = load_reward_model(cfg.model, cfg.quantization)
    ds, _ = tokenize_pairs(tok, train, cfg.trainer.max_length)
    ds = ds.add_column("margin", [0.1 * i for i in range(len(ds))])
    trainer = PairwiseRewardTrainer(model=for_training(model, cfg.trainer), train_dataset=ds, processing_class=tok,
                                    args=build_reward_config(cfg.trainer, tmp_path, "none"),
                                    peft_config=build_lora_config(cfg.lora))
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    ours = trainer.compute_loss(trainer.model, dict(batch))
    logged = {k: list(v) for k, v in trainer._metrics["train"].items()}
    trainer._metrics["train"].clear()
    trainer._total_train_tokens = 0
    trls = RewardTrainer.compute_loss(trainer, trainer.model, dict(batch))
    assert torch.equal(ours, trls)
    assert logged == {k: list(v) for k, v in trainer._metrics["train"].items()}
    assert set(logged) == {"num_tokens", "min_reward", "mean_reward", "max_reward", "accuracy", "margin"}
