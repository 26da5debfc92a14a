"""Every touch of a private name of transformers, TRL, peft, bitsandbytes, torch, datasets, submitit or uvicorn, in one place.

A private name can move at any upgrade without notice. Each one rmexp relies on is reached only
through a function here, and `check()` verifies that every one is still where it was, naming the
installed version when it is not (tests/test_compat.py runs it; so does a run's start, cheaply).
Where a public route exists, it is used instead: right-padding by torch's pad_sequence (not TRL's pad),
the collator's columns kept by `remove_unused_columns=False` (not Trainer's `_signature_columns`).
"""

from __future__ import annotations

import asyncio
import inspect
from importlib.metadata import version
from importlib.util import find_spec


class CompatError(RuntimeError):
    """A private name rmexp relies on moved: the message names the library, its version and the name."""


def _require(ok: bool, lib: str, name: str, why: str) -> None:
    if not ok:
        raise CompatError(f"{lib} {version(lib)}: {name} is gone or changed ({why}); rmexp is tested with the "
                          "versions pinned in pyproject.toml")


# ---------------------------------------------------------------- transformers


def attn_implementation(model) -> str | None:
    """The attention kernel a loaded model runs (transformers keeps it in `config._attn_implementation`)."""
    return getattr(model.config, "_attn_implementation", None)


def is_quantized(model) -> bool:
    """Whether transformers loaded `model` through a quantizer (it keeps one in `model.hf_quantizer`)."""
    return getattr(model, "hf_quantizer", None) is not None


def drop_quantizer(model) -> None:
    """Forget the quantizer of a model whose weights are plain tensors again, so save_pretrained writes a plain model."""
    model.hf_quantizer = None


def update_fsdp_plugin_peft(model, accelerator) -> None:
    """transformers' FSDP setup for a peft model (peft's wrap policy, mixed precision in the 4-bit storage dtype),
    which its Trainer runs only when `train()` wraps the model."""
    from transformers.integrations.fsdp import update_fsdp_plugin_peft as update

    update(model, accelerator)


# ---------------------------------------------------------------- TRL


def log_metric(trainer, mode: str, key: str, value: float) -> None:
    """Append a value to what RewardTrainer averages into its next log line (`_metrics[mode][key]`)."""
    trainer._metrics[mode][key].append(value)


def count_train_tokens(trainer, n: int | None, mode: str) -> None:
    """RewardTrainer's running token count (`num_tokens` in its logs): add `n` training tokens gathered over
    every process (tensor-parallel ranks see the same batch: counted once), log the total."""
    if n is not None:
        trainer._total_train_tokens += n // trainer._tp_size
    trainer._metrics[mode]["num_tokens"] = [trainer._total_train_tokens]


def expected_new_head():
    """TRL's context that silences transformers' "newly initialized: score.weight" warning (a new head is the point)."""
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    return suppress_seqcls_warning()


def from_lazy_state_dict(cls, config, state: dict, **kwargs):
    """`cls.from_pretrained` from a state dict whose values are read on access (`value[...]`, as transformers reads a
    safetensors slice) rather than tensors: transformers' loader takes `state_dict` as it takes a checkpoint's
    slices, which its documentation does not promise (rmexp.export reads a base a tensor at a time through it;
    tests/test_export.py compares the result with the plain load, tensor for tensor)."""
    return cls.from_pretrained(None, config=config, state_dict=state, **kwargs)


# ---------------------------------------------------------------- peft


def lora_is_plain(layer, adapter: str) -> bool:
    """Whether a peft LoRA layer adds adapter `adapter` as the plain `B(A(x)) * scaling`: not merged into the
    base weight (`merged`) and no variant such as DoRA (`lora_variant`)."""
    return not layer.merged and adapter not in layer.lora_variant


# ---------------------------------------------------------------- torch


def cpu_has_bf16_units() -> bool:
    """Whether this CPU has AVX512-BF16 or AMX tiles, as torch's own probes say (`torch.cpu._is_*`; a torch without
    them: no)."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


# ---------------------------------------------------------------- bitsandbytes


def cpu_inference_packed(quant_state) -> bool:
    """Whether bitsandbytes repacked a 4-bit weight for its CPU inference kernel (`packing_format_for_cpu`)."""
    return bool(getattr(quant_state, "packing_format_for_cpu", False))


def undo_cpu_inference_packing(module) -> None:
    """Keep a Linear4bit on bitsandbytes' plain layout: with AVX512-BF16, bitsandbytes 0.50 repacks a weight
    for its CPU inference kernel at the first eval-mode forward (`support_avx512bf16_for_cpu`), and the
    repacked kernel has no backward; undo a repacking already made."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    module.support_avx512bf16_for_cpu = False
    state = module.weight.quant_state
    if cpu_inference_packed(state):
        module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(module.weight.data, state)


# ---------------------------------------------------------------- torch (dynamo)


def compile_with_constant_floats(compiled):
    """`compiled` (a torch.compile'd function) tracing Python floats as constants (dynamo's `specialize_float`):
    with `dynamic=True` they become graph inputs, which inductor turns back into constants and restarts the
    whole trace for: about a sixth of the compile time (78 s against 66 s for the tiny model on CPU)."""
    import torch._dynamo

    return torch._dynamo.config.patch(specialize_float=True)(compiled)


COMPILE_TIMERS = ("_compile.compile_inner", "backward._backward_impl")  # a frame's compilation; a lazy backward's


def compile_seconds() -> float:
    """Seconds torch.compile has spent compiling in this process (dynamo's `compilation_time_metrics`): each
    frame's compilation with its forward, and each backward compiled later, at its first call."""
    from torch._dynamo.utils import compilation_time_metrics

    return sum(sum(compilation_time_metrics.get(timer, [])) for timer in COMPILE_TIMERS)


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process (dynamo's `unique_graphs` counter): each recompile adds."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def flex_attention_reference(query, key, value, block_mask, scale: float):
    """torch's unfused flex_attention (its `flex_attention` operator's math implementation, with its backward),
    called eagerly: torch 2.13's public `flex_attention` refuses CPU inputs that need a gradient ("does not
    support backward on CPU"), though this reference computes one. Grouped query heads as flex's enable_gqa;
    output B x H x L x D (rmexp.flex)."""
    from torch._higher_order_ops.flex_attention import flex_attention as flex_attention_op

    out, _, _ = flex_attention_op(query, key, value, _unchanged_score, block_mask.as_tuple(), scale, {})
    return out


def _unchanged_score(score, batch, head, q_idx, kv_idx):  # flex_attention's score_mod: the score as it is
    return score


# ---------------------------------------------------------------- datasets


def grid_cells(overrides) -> list[list[str]]:
    """Every cell of a multirun grid, as Hydra's basic sweeper expands parsed overrides (`lora.r=4,8` x ...): one
    list of `key=value` strings per cell, in the basic sweeper's order (hydra._internal's BasicSweeper)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    return [list(cell) for cell in BasicSweeper.split_arguments(overrides, None)[0]]


def dataset_fingerprint(ds) -> str:
    """The fingerprint datasets keys a dataset's cache files by (`Dataset._fingerprint`): rmexp passes its
    own `new_fingerprint` to map, built from it, instead of letting datasets hash a tokenizer (15 s for Gemma's)."""
    return ds._fingerprint


# ---------------------------------------------------------------- submitit


def submitit_preempt_signal() -> int:
    """The signal submitit's jobs get before a preemption or the time limit (`JobEnvironment._usr_sig()`:
    USR2 unless SUBMITIT_PREEMPT_SIGNAL names another)."""
    from submitit import JobEnvironment

    return JobEnvironment._usr_sig()


# ---------------------------------------------------------------- uvicorn


def read_timeout_protocol(timeout_s: float, body: bytes):
    """uvicorn's h11 protocol with a deadline on reading each request: uvicorn times out idle
    keep-alive connections but not one that opens and sends a partial header or body, so a few hundred
    slow clients could hold the server. A request not read whole `timeout_s` after its connection
    opened or its first byte came (pipelined bytes included) is answered 408 with the JSON `body` and
    its connection closed. Builds on the protocol's connection (`conn`, h11's state machine, with its
    `trailing_data`), `cycle`, `transport` and `loop`; `handle_events` runs after every read and after
    every response, so the deadline follows each request."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class ReadTimeoutProtocol(H11Protocol):
        deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.follow_request()

        def handle_events(self) -> None:
            super().handle_events()
            self.follow_request()

        def connection_lost(self, exc) -> None:
            self.stop_deadline()
            super().connection_lost(exc)

        def reading(self) -> bool:
            """A request is being read: its body, or the bytes of one not yet parsed, or none yet on a new
            connection (an idle keep-alive connection is uvicorn's timeout_keep_alive's to close)."""
            state = self.conn.their_state
            return state is h11.SEND_BODY or (state is h11.IDLE and (bool(self.conn.trailing_data[0])
                                                                     or self.cycle is None))

        def follow_request(self) -> None:
            if not self.reading():
                self.stop_deadline()
            elif self.deadline is None:
                self.deadline = self.loop.call_later(timeout_s, self.read_timed_out)

        def stop_deadline(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

        def read_timed_out(self) -> None:
            self.deadline = None
            if self.transport.is_closing() or not self.reading():
                return
            if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):  # no answer begun: say why before closing
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                     b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
            self.transport.close()

    return ReadTimeoutProtocol


def check_server() -> None:
    """The uvicorn internals read_timeout_protocol builds on, still there."""
    _require(_h11_protocol_has_its_parts(), "uvicorn",
             "protocols.http.h11_impl.H11Protocol.conn/cycle/transport/loop/handle_events", "the request read deadline")


def _h11_protocol_has_its_parts() -> bool:
    import h11
    from uvicorn import Config
    from uvicorn.protocols.http.h11_impl import H11Protocol
    from uvicorn.server import ServerState

    async def app(scope, receive, send):  # never called
        pass

    protocol = H11Protocol(Config(app, http="h11", log_config=None), ServerState(), {}, _loop=asyncio.new_event_loop())
    try:
        return (isinstance(protocol.conn, h11.Connection) and isinstance(protocol.conn.trailing_data, tuple)
                and protocol.cycle is None and hasattr(protocol, "transport") and all(
                    callable(getattr(protocol, n, None)) for n in ("connection_made", "handle_events", "connection_lost")))
    finally:
        protocol.loop.close()


# ---------------------------------------------------------------- the check


def check(trainer=None) -> None:
    """Raise CompatError naming the library and version if any private name used above has moved.
    With a RewardTrainer, also check the attributes it must have."""
    import bitsandbytes.functional as bnb_functional
    import transformers
    import transformers.integrations.fsdp as transformers_fsdp
    import trl.trainer.reward_trainer as trl_reward_trainer
    from bitsandbytes.nn import Linear4bit
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    _require(hasattr(bnb_functional, "_convert_weight_packed_for_cpu_inverse"), "bitsandbytes",
             "functional._convert_weight_packed_for_cpu_inverse", "undoing the CPU inference repacking")
    _require(hasattr(Linear4bit(8, 8), "support_avx512bf16_for_cpu"), "bitsandbytes",
             "Linear4bit.support_avx512bf16_for_cpu", "the switch to its CPU inference kernel")
    _require("packing_format_for_cpu" in inspect.getsource(bnb_functional._convert_weight_packed_for_cpu_inverse),
             "bitsandbytes", "QuantState.packing_format_for_cpu", "telling a weight repacked for CPU inference")
    _require(isinstance(inspect.getattr_static(BaseTunerLayer, "merged", None), property), "peft",
             "BaseTunerLayer.merged", "telling an adapter merged into its base weight")
    _require("self.lora_variant" in inspect.getsource(LoraLayer.__init__), "peft", "LoraLayer.lora_variant",
             "telling a LoRA variant such as DoRA")
    _require(callable(getattr(transformers_fsdp, "update_fsdp_plugin_peft", None)), "transformers",
             "integrations.fsdp.update_fsdp_plugin_peft", "readying a peft model for FSDP before it is wrapped")
    _require("hf_quantizer" in inspect.getsource(transformers.PreTrainedModel.save_pretrained), "transformers",
             "PreTrainedModel.hf_quantizer", "telling and dropping a model's quantizer")
    _require(hasattr(transformers.PretrainedConfig(), "_attn_implementation"), "transformers",
             "PretrainedConfig._attn_implementation", "the attention kernel a model runs")
    _require(hasattr(trl_reward_trainer, "suppress_seqcls_warning"), "trl",
             "trainer.reward_trainer.suppress_seqcls_warning", "silencing the new-head warning")
    import torch._dynamo
    import torch._dynamo.utils as dynamo_utils

    _require(hasattr(torch._dynamo.config, "specialize_float"), "torch", "_dynamo.config.specialize_float",
             "compiling with Python floats as constants")
    _require(isinstance(getattr(dynamo_utils, "compilation_time_metrics", None), dict), "torch",
             "_dynamo.utils.compilation_time_metrics", "the time trainer.compile spent compiling")
    from importlib import import_module

    flex_ops = import_module("torch._higher_order_ops.flex_attention")  # the module: the package's attribute is the op
    _require(callable(getattr(flex_ops, "flex_attention", None)), "torch", "_higher_order_ops.flex_attention."
             "flex_attention", "flex_attention's reference with a backward on CPU (trainer.attention=flex)")
    from datasets import Dataset

    _require(isinstance(getattr(Dataset.from_dict({"a": [1]}), "_fingerprint", None), str), "datasets",
             "Dataset._fingerprint", "the cache key of a dataset")
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    _require(callable(getattr(BasicSweeper, "split_arguments", None)), "hydra-core",
             "_internal.core_plugins.basic_sweeper.BasicSweeper.split_arguments", "a halving sweep's grid of cells")
    if find_spec("submitit"):  # the `sweep` extra
        from submitit import JobEnvironment

        _require(callable(getattr(JobEnvironment, "_usr_sig", None)), "submitit", "JobEnvironment._usr_sig",
                 "the signal a job gets before preemption")
    if find_spec("uvicorn") and find_spec("h11"):  # the `serve` extra (rmexp.serve checks it at its start too)
        check_server()
    if trainer is not None:
        metrics = getattr(trainer, "_metrics", None)
        _require(isinstance(metrics, dict) and "train" in metrics, "trl", "RewardTrainer._metrics",
                 "the values averaged into a log line")
        _require(isinstance(getattr(trainer, "_total_train_tokens", None), int), "trl",
                 "RewardTrainer._total_train_tokens", "the running token count")
        _require(isinstance(getattr(trainer, "_tp_size", None), int), "trl", "RewardTrainer._tp_size",
                 "the tensor-parallel ranks that see one batch")
