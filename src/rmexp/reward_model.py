"""A trained reward model, loaded for scoring: `RewardModel.load(run_dir or exported_dir)`.

Text is formatted exactly as in training (same chat template, system prompt and truncation to the
run's `trainer.max_length`) and scored by an fp32 head. Packed (the default): a pair is one
`[prompt][chosen][rejected]` segment, prompt computed once (rmexp.packing); single answers are
`[prompt + answer]` segments; segments are sorted by length and packed many to a row up to
`row_tokens`, so rows stay full. Padded (`packed=False`, the check): right-padded batches of whole
sequences, as TRL's collator makes them. Both return rewards in input order.

A `RewardModel` is also a reward function for TRL's GRPO/RLOO trainers:
`GRPOTrainer(reward_funcs=RewardModel.load(run_dir, normalize=True), ...)` calls it as
`rm(prompts=..., completions=..., **kwargs) -> list[float]`.

`normalize=True` applies to every scoring method alike (`score`, `score_batch`, `score_tokens`,
`score_pairs`, `score_encoded` and the call): each returns (r - reward_mean) / reward_std. Loaded
without it (the default, and what rmexp-evaluate and rmexp-score do), each returns the raw reward.

`load` takes a run dir, a checkpoint of one (`<run>/checkpoints/checkpoint-N`: the model as it was at
step N) or an exported dir; any other path is a `UserError` whose message names what to pass instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from rmexp.data import Pair, encode_answer, encode_pair, encode_rendered, render, with_system_prompt
from rmexp.device import Placement, place
from rmexp.errors import UserError
from rmexp.packing import PackedPairCollator, packed_rewards, uses_packed_attention
from rmexp.prepare import for_scoring
from rmexp.rundir import (
    RUN_OR_EXPORT,
    CheckpointPathError,
    locate,
    mean_ensemble,
    read_run_config,
    reward_stats,
)

log = logging.getLogger(__name__)

class NormalizeError(UserError, ValueError):
    """`normalize=True` (serve.normalize=true) for a model without recorded reward statistics."""


class RewardModel:
    def __init__(self, model, tokenizer, max_length: int, path: str, system_prompt: str | None = None,
                 packed: bool = True, row_tokens: int = 2048):
        model = for_scoring(model, packed)
        self.model, self.tokenizer, self.max_length, self.path = model.eval(), tokenizer, max_length, path
        self.system_prompt = system_prompt  # the run's data.system_prompt, put before every prompt
        self.row_tokens = row_tokens  # tokens per packed row: memory grows with it, padding never does
        self.packed = packed and uses_packed_attention(model)  # False: the padded forward (or a non-SDPA model)
        self.normalize = False  # every scoring method returns (r - reward_mean) / reward_std (set by `load`)
        self.reward_mean: float | None = None
        self.reward_std: float | None = None
        self.n_truncated = 0  # answers scored that lost tokens to max_length
        self._count = threading.Lock()  # tokens() may run on several threads (the reward server)
        self._template: dict[str, str] | None = None
        # TRL logs a reward function under its __name__ (rewards/<name>/mean): the run's, so two models differ
        self.__name__ = "-".join(Path(path).resolve().parts[-2:])

    @classmethod
    def load(cls, path: str | Path, packed: bool = True, row_tokens: int = 2048, normalize: bool = False,
             device: str = "auto") -> RewardModel:
        """A training run dir (4-bit base + LoRA adapter, as trained), a checkpoint of one
        (`<run>/checkpoints/checkpoint-N`, the model at step N) or an exported HF dir; any other path
        is a UserError naming what to pass instead (`locate`), raised before anything loads.

        `normalize=True`: every scoring method (`score`, `score_batch`, `score_tokens`, `score_pairs`,
        `score_encoded`, the call) returns rewards standardized by the reward mean/std of the run's
        held-out evaluation (`metrics.json`, or what an exported model recorded).

        `device`: auto (the current CUDA device where there is one, else the CPU), cpu, cuda or cuda:N; the model
        loads onto it and scores in the dtype it computes natively (bf16 or fp32; the head fp32), as
        `rmexp.device.place` decides and logs. A device this machine lacks is a UserError, before anything loads."""
        path = Path(path).expanduser()
        run = locate(path)
        if (record := mean_ensemble(path)) is not None:
            return EnsembleRewardModel.from_record(path, record, packed, row_tokens, place(device))
        if normalize and run is not None and run != path:
            raise NormalizeError(f"{path}: normalize=True needs the reward mean and std of the model's evaluation, and "
                                 f"a checkpoint has none (the run's metrics.json describes its final model, {run}): "
                                 f"pass normalize=False (serve.normalize=false) or the run dir {run}")
        rm = cls._load(path, run, packed, row_tokens, place(device))
        stats = rm.info()
        rm.reward_mean, rm.reward_std = stats.get("reward_mean"), stats.get("reward_std")
        if normalize and not (rm.reward_mean is not None and rm.reward_std):
            raise NormalizeError(f"{path}: normalize=True needs the reward mean and std of the run's evaluation "
                                 f"(reward_mean/reward_std in metrics.json or the exported config); it has none: "
                                 f"pass normalize=False (serve.normalize=false)")
        rm.normalize = normalize
        return rm

    @classmethod
    def _load(cls, path: Path, run: Path | None, packed: bool, row_tokens: int, placement: Placement) -> RewardModel:
        """`run`: the run dir whose config `path` (the run dir itself, or a checkpoint of it) was trained
        with; None for an exported dir. `placement`: where the model loads and what a dtype of `auto` is there."""
        from rmexp.model import load_reward_model, load_tokenizer

        if run is not None:
            from peft import PeftModel

            if run != path:
                log.info("%s: a checkpoint of the run %s, scored as it was at that step (the run's final model "
                         "is the run dir)", path, run)
            cfg = read_run_config(run)
            base, _, _ = load_reward_model(cfg.model, cfg.quantization, device=placement)
            # the head fp32 before it loads; the adapter read straight onto the model's device
            model = PeftModel.from_pretrained(for_scoring(base, packed), str(path), torch_device=str(placement.device))
            return cls(model, load_tokenizer(str(path)), int(cfg.trainer.max_length), str(path),
                       cfg.data.system_prompt, packed, row_tokens)
        if (path / "config.json").is_file():
            from transformers import AutoModelForSequenceClassification

            # bf16 weights compute in bf16 only where the device does (else fp32); the head in fp32 (__init__)
            model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True, dtype=placement.dtype,
                                                                       device_map=placement.device_map)
            info = getattr(model.config, "rmexp", None) or {}
            return cls(model, load_tokenizer(str(path)), int(info.get("max_length", 512)), str(path),
                       info.get("system_prompt"), packed, row_tokens)
        raise CheckpointPathError(f"{path}: neither an rmexp run dir nor a HF model dir; pass {RUN_OR_EXPORT}")

    def _prompt(self, question) -> list[dict[str, str]]:
        prompt = question if isinstance(question, list) else [{"role": "user", "content": question}]
        return with_system_prompt(prompt, self.system_prompt)

    def tokens(self, question, answer) -> list[int]:
        """Token ids of one (question, answer), formatted and truncated as in training."""
        encoded = encode_answer(self.tokenizer, self._prompt(question), answer, self.max_length)
        with self._count:
            self.n_truncated += encoded.prompt_truncated or encoded.answer_truncated
        return encoded.ids

    def template_parts(self) -> dict[str, str]:
        """What the chat template writes around turns, found by rendering marker contents: `head`, the
        text every rendered conversation starts with (with or without a system turn); `end_of_turn`,
        what follows an assistant turn's content (Gemma's `<end_of_turn>\\n`). Empty without a template."""
        if self._template is None:
            parts = {"head": "", "end_of_turn": ""}
            if getattr(self.tokenizer, "chat_template", None):
                mark = "\u2063rmexp\u2063"
                apply = self.tokenizer.apply_chat_template
                heads = [apply([{"role": "user", "content": mark}], tokenize=False).split(mark)[0]]
                with contextlib.suppress(Exception):  # a template may refuse a system turn
                    heads.append(apply([{"role": "system", "content": mark}, {"role": "user", "content": "u"}],
                                       tokenize=False).split(mark)[0])
                parts["head"] = os.path.commonprefix(heads)
                turn = apply([{"role": "user", "content": "u"}, {"role": "assistant", "content": mark}], tokenize=False)
                parts["end_of_turn"] = turn.split(mark)[-1] if mark in turn else ""
            self._template = parts
        return self._template

    def is_templated(self, text: str) -> bool:
        """Whether `text` already starts the way the chat template starts a conversation."""
        head = self.template_parts()["head"]
        return bool(head) and text.startswith(head)

    def templated_tokens(self, prompt: str, response: str) -> list[int]:
        """Token ids of a response to a prompt already through the chat template (OpenRLHF's
        `--apply_chat_template`), the ids training gives that (prompt, response) pair: a closing
        end-of-turn marker (where generation stopped) is taken off the response, which is then
        rendered by the template as the assistant turn, tokenized apart from the prompt and fitted to
        max_length as in training. The assistant turn's render must not depend on the turns before it
        (true of Gemma-3, ChatML, Llama-3 and Phi-3, which the tests check); a template that rewrites
        the prompt once an answer follows, or a prompt without the run's `data.system_prompt`, cannot
        be scored as trained and is a ValueError saying so."""
        if self.system_prompt and self.system_prompt.strip() not in prompt:
            raise ValueError("the model was trained with a system prompt (data.system_prompt) that this templated "
                             "prompt does not contain: send the prompt with it as its system message, or send the "
                             "prompt untemplated so that it is added")
        end, eos = self.template_parts()["end_of_turn"], self.tokenizer.eos_token or ""
        # Phi-3 writes the EOS after the turn's own marker; the request has lost its EOS already
        for marker in dict.fromkeys((end, end.strip(), end.replace(eos, "").strip() if eos else "")):
            if marker and response.endswith(marker):
                response = response[:-len(marker)]
                break
        head, answer_text = render(self.tokenizer, [{"role": "user", "content": "u"}], response)
        if head is None:
            raise ValueError("this chat template rewrites the prompt once an answer follows it, so a prompt that "
                             "went through the template cannot be split from its answer as in training: send the "
                             "prompt untemplated (OpenRLHF without --apply_chat_template) or use /score")
        encoded = encode_rendered(self.tokenizer, prompt, answer_text, self.max_length)
        with self._count:
            self.n_truncated += encoded.prompt_truncated or encoded.answer_truncated
        return encoded.ids

    def score(self, question, answer: str) -> float:
        """Reward of one answer; `question` is a string or a list of chat messages."""
        return self.score_batch([(question, answer)])[0]

    def score_batch(self, items, batch_size: int = 8) -> list[float]:
        """Rewards of (question, answer) items, in order; `batch_size` is for the padded path."""
        return self.score_tokens([self.tokens(q, a) for q, a in items], batch_size)

    def score_tokens(self, sequences: list[list[int]], batch_size: int = 8) -> list[float]:
        """Rewards of `tokens()` outputs, in order (normalized with `normalize`); `batch_size` is for the padded
        path. Every other scoring method of one answer goes through this one."""
        pad = self.tokenizer.pad_token_id
        if self.packed:
            rewards = score_sequences_packed(self.model, sequences, pad, self.row_tokens).tolist()
        else:
            rewards = score_sequences(self.model, sequences, pad, batch_size).tolist()
        return self.normalized(rewards) if self.normalize else rewards

    def __call__(self, prompts: list, completions: list, **kwargs) -> list[float]:
        """TRL's reward-function call: one reward per (prompt, completion), formatted as in training.

        Prompts are strings or chat message lists, completions strings or message lists (TRL's
        conversational format); TRL's other keyword arguments are accepted and ignored.
        """
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        return self.score_batch(list(zip(prompts, completions, strict=True)))  # normalized with `normalize`

    def normalized(self, rewards: list[float]) -> list[float]:
        """(r - reward_mean) / reward_std, the run's held-out reward statistics (what the scoring methods
        return with `normalize`; raw rewards in, whatever `normalize` says)."""
        return [(r - self.reward_mean) / self.reward_std for r in rewards]

    def score_pairs(self, pairs: list[Pair], batch_size: int = 8, progress=None) -> torch.Tensor:
        """Rewards (n x 2: chosen, rejected) of Pairs, with the run's formatting and truncation (normalized
        with `normalize`)."""
        return self.score_encoded(self.encode(pairs), batch_size, progress)

    def encode(self, pairs: list[Pair]):
        """`rmexp.data.encode_pair` of each pair, with the run's system prompt and max_length."""
        return [encode_pair(self.tokenizer, Pair(self._prompt(p.prompt), p.chosen, p.rejected), self.max_length)
                for p in pairs]

    def score_encoded(self, encoded, batch_size: int = 8, progress=None) -> torch.Tensor:
        """Rewards (n x 2) of `rmexp.data.encode_pair` outputs (normalized with `normalize`; rmexp-evaluate
        loads without it and scores raw rewards); `progress` a tqdm bar to advance by pairs."""
        chosen, rejected = [e.chosen.ids for e in encoded], [e.rejected.ids for e in encoded]
        pad = self.tokenizer.pad_token_id
        if self.packed:
            rewards = score_pairs_packed(self.model, chosen, rejected, [e.shared_len for e in encoded], pad,
                                         self.row_tokens, progress)
        else:
            rewards = score_pairs(self.model, chosen, rejected, pad, batch_size)
            if progress is not None:
                progress.update(len(encoded))
        if self.normalize:  # in float64, as `normalized` computes it
            rewards = ((rewards.double() - self.reward_mean) / self.reward_std).float()
        return rewards

    def info(self) -> dict:
        """The reward mean/std of the run's evaluation, and what an exported model recorded about itself."""
        run = reward_stats(Path(self.path)) if (Path(self.path) / "metrics.json").is_file() else {}
        return run | dict(getattr(self.model.config, "rmexp", None) or {}) | {"path": self.path}


class EnsembleRewardModel(RewardModel):
    """A mean ensemble (rmexp-ensemble mode=mean): the members' LoRA adapters on one base, each scored in turn
    (peft's set_adapter; the packed forward of one member at a time), each member's rewards standardized by its
    own mean and spread on the selection pairs (ensemble.json). Every scoring method returns the members' mean;
    `last_members` (K x ...) holds the standardized member rewards of the last call and `last_uncertainty` their
    standard deviation (population: a one-member ensemble's is 0). As a TRL reward function (`__call__`) it returns
    mean - uncertainty_penalty * std, or with `worst_case` the lowest member's reward (Coste et al. 2024).
    Its rewards are standardized already: `normalize` changes nothing."""

    def __init__(self, *args, adapters: list[str], stats: list[tuple[float, float]], members: list[str],
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.adapters, self.stats, self.members = adapters, stats, members
        self.uncertainty_penalty, self.worst_case = 0.0, False
        self.last_members: torch.Tensor | None = None
        self.last_uncertainty: torch.Tensor | None = None

    @classmethod
    def from_record(cls, path: Path, record: dict, packed: bool, row_tokens: int,
                    placement: Placement) -> EnsembleRewardModel:
        members = [Path(m["path"]) for m in record["members"]]
        for member in members:
            locate(member)  # each a finished run dir, before anything loads
        first = RewardModel._load(members[0], members[0], packed, row_tokens, placement)
        names = [f"member{k}" for k in range(len(members))]
        for name, member in zip(names[1:], members[1:], strict=True):
            first.model.load_adapter(str(member), adapter_name=name, torch_device=str(placement.device))
        names[0] = "default"  # the adapter PeftModel.from_pretrained loaded
        rm = cls(first.model, first.tokenizer, first.max_length, str(path), first.system_prompt, packed, row_tokens,
                 adapters=names, stats=[(m["reward_mean"], m["reward_std"]) for m in record["members"]],
                 members=[str(m) for m in members])
        rm.packed = first.packed
        return rm

    def _each(self, score) -> torch.Tensor:
        """score() under every member's adapter, standardized (float64), stacked: K x ..."""
        out = []
        try:
            for name, (mean, std) in zip(self.adapters, self.stats, strict=True):
                self.model.set_adapter(name)
                out.append((torch.as_tensor(score()).double() - mean) / std)
        finally:
            self.model.set_adapter(self.adapters[0])
        members = torch.stack(out)
        self.last_members = members.float()
        self.last_uncertainty = members.std(dim=0, correction=0).float()
        return members

    def score_tokens(self, sequences: list[list[int]], batch_size: int = 8) -> list[float]:
        pad = self.tokenizer.pad_token_id
        if self.packed:
            members = self._each(lambda: score_sequences_packed(self.model, sequences, pad, self.row_tokens))
        else:
            members = self._each(lambda: score_sequences(self.model, sequences, pad, batch_size))
        return members.mean(dim=0).float().tolist()

    def __call__(self, prompts: list, completions: list, **kwargs) -> list[float]:
        mean = torch.tensor(super().__call__(prompts, completions, **kwargs), dtype=torch.float64)
        if self.worst_case:
            return self.last_members.double().min(dim=0).values.tolist()
        return (mean - self.uncertainty_penalty * self.last_uncertainty.double()).tolist()

    def score_encoded(self, encoded, batch_size: int = 8, progress=None) -> torch.Tensor:
        normalize, self.normalize = self.normalize, False
        try:
            bar = progress
            def one():  # noqa: E306
                nonlocal bar
                rewards = RewardModel.score_encoded(self, encoded, batch_size, bar)
                bar = None  # the bar counts pairs once, not once per member
                return rewards
            return self._each(one).mean(dim=0).float()
        finally:
            self.normalize = normalize

    def info(self) -> dict:
        return {"path": self.path, "mode": "mean", "members": self.members, "reward_mean": 0.0, "reward_std": 1.0}


# ---------------------------------------------------------------- forward passes


def autocast_for(model) -> contextlib.AbstractContextManager:
    """bf16 autocast when any weight is bf16: on CPU a bf16 score head cannot take fp32 hidden states."""
    device = next(model.parameters()).device
    if any(p.dtype == torch.bfloat16 for p in model.parameters()):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def score_sequences(model, sequences: list[list[int]], pad_token_id: int, batch_size: int = 8) -> torch.Tensor:
    """Reward of each token sequence (right-padded batches, as in training), as float32 on CPU."""
    from torch.nn.utils.rnn import pad_sequence

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        with autocast_for(model):
            for i in range(0, len(sequences), batch_size):
                ids = [torch.tensor(s) for s in sequences[i:i + batch_size]]
                input_ids = pad_sequence(ids, batch_first=True, padding_value=pad_token_id).to(device)  # right-padded
                mask = pad_sequence([torch.ones_like(t) for t in ids], batch_first=True, padding_value=0).to(device)
                logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
                out.append(logits.float().squeeze(-1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def score_pairs(model, chosen: list[list[int]], rejected: list[list[int]], pad_token_id: int,
                pairs_per_batch: int = 8, progress: bool = False) -> torch.Tensor:
    """Rewards (n_pairs x 2: chosen, rejected) of token sequences.

    Chosen and rejected of a batch share one padded forward, as in TRL's collator, so scores match
    the trainer's evaluation.
    """
    from tqdm.auto import tqdm

    rows = []
    steps = range(0, len(chosen), pairs_per_batch)
    for i in tqdm(steps, desc="scoring pairs", unit="batch", disable=not progress or len(steps) < 4):
        c, r = chosen[i:i + pairs_per_batch], rejected[i:i + pairs_per_batch]
        rewards = score_sequences(model, [list(x) for x in c + r], pad_token_id, batch_size=2 * len(c))
        rows.append(torch.stack(rewards.chunk(2), dim=1))
    return torch.cat(rows)


def length_batches(lengths: list[int], row_tokens: int) -> Iterator[list[int]]:
    """Indices, longest first, in groups of at most `row_tokens` tokens (an oversize item alone)."""
    group, used = [], 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if group and used + lengths[i] > row_tokens:
            yield group
            group, used = [], 0
        group.append(i)
        used += lengths[i]
    if group:
        yield group


@torch.inference_mode()
def _score_packed(model, examples: list[dict], lengths: list[int], pad_token_id: int, row_tokens: int,
                  progress=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    collator = PackedPairCollator.for_model(model, pad_token_id, row_tokens)
    device = next(model.parameters()).device
    single = "rejected_ids" not in examples[0]
    chosen = torch.empty(len(examples))
    rejected = None if single else torch.empty(len(examples))
    was_training = model.training
    model.eval()
    try:
        with autocast_for(model):
            for group in length_batches(lengths, row_tokens):
                batch = collator([examples[i] for i in group])
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                c, r = packed_rewards(model, batch)
                chosen[group] = c.float().cpu()
                if r is not None:
                    rejected[group] = r.float().cpu()
                if progress is not None:
                    progress.update(len(group))
    finally:
        model.train(was_training)
    return chosen, rejected


def score_pairs_packed(model, chosen: list[list[int]], rejected: list[list[int]], prompt_lens: list[int],
                       pad_token_id: int, row_tokens: int = 2048, progress=None) -> torch.Tensor:
    """Rewards (n_pairs x 2: chosen, rejected) from packed, prefix-shared segments; `prompt_lens` are
    the leading tokens the two sequences share."""
    examples = [{"chosen_ids": list(c), "rejected_ids": list(r), "prompt_len": p}
                for c, r, p in zip(chosen, rejected, prompt_lens, strict=True)]
    if not examples:
        return torch.empty(0, 2)
    lengths = [len(c) + len(r) - p for c, r, p in zip(chosen, rejected, prompt_lens, strict=True)]
    c, r = _score_packed(model, examples, lengths, pad_token_id, row_tokens, progress)
    return torch.stack([c, r], dim=1)


def score_sequences_packed(model, sequences: list[list[int]], pad_token_id: int, row_tokens: int = 2048) -> torch.Tensor:
    """Reward of each token sequence, many sequences to a packed row."""
    if not sequences:
        return torch.empty(0)
    examples = [{"input_ids": list(s)} for s in sequences]
    return _score_packed(model, examples, [len(s) for s in sequences], pad_token_id, row_tokens)[0]
