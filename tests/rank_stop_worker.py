"""One rank of tests/test_rank_stops.py's 2-process runs on CPU:
`python tests/rank_stop_worker.py CASE OUT [overrides...]`, with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set
as torchrun sets them (the test starts both ranks itself, so that one rank's exit does not kill the other, as
torchrun's agent would, and each rank's outcome is seen).

The process group is started here, on gloo with a short timeout, before rmexp.train.main (accelerate takes a group
already started): a rank left waiting in a collective fails in seconds instead of gloo's default 30 minutes. The
fault is made on rank 1 alone, at the end of step 3 (before the trainer's StopAgreement), or during step 3:

- `budget`: rank 1's clock (rmexp.callbacks' `time`) jumps past trainer.time_budget_s;
- `nonfinite`: rank 1's loss of step 3 is NaN;
- `signal`: rank 1 sends itself SIGTERM;
- `stream`: no fault; every training batch's pairs are recorded (decoded), to see which rank trained on what.

Each rank writes OUT/rank<r>.json: the steps it ended, the learning rate after each, its error (type and message)
or none, and for `stream` the question of each pair of each training batch, in order.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import torch.distributed as dist
from transformers import TrainerCallback

from conftest import ROOT, compose_cfg

FAULT_STEP = 3


class Probe(TrainerCallback):
    """Records each step end on this rank; on rank 1 makes the case's fault at FAULT_STEP."""

    def __init__(self, case: str, rank: int):
        self.case, self.rank, self.steps, self.lrs, self.training = case, rank, [], [], False
        self.clock_offset = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.training = True

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step + 1  # the step now computed

    def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
        self.steps.append(state.global_step)
        self.lrs.append(lr_scheduler.get_last_lr()[0])
        if self.rank == 1 and state.global_step == FAULT_STEP:
            if self.case == "budget":
                self.clock_offset = 1e9
            elif self.case == "signal":
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.01)
        return control


def inject(case: str, probe: Probe, rank: int) -> None:
    import rmexp.callbacks
    import rmexp.trainer

    if case == "budget":  # this rank's clock, as rmexp.callbacks reads it
        rmexp.callbacks.time = SimpleNamespace(monotonic=lambda: time.monotonic() + probe.clock_offset)
    if case == "nonfinite" and rank == 1:
        loss_of = rmexp.trainer.bradley_terry

        def bradley_terry(*args, **kwargs):
            loss, stats = loss_of(*args, **kwargs)
            if probe.training and probe.step == FAULT_STEP:
                loss = loss * float("nan")
            return loss, stats

        rmexp.trainer.bradley_terry = bradley_terry


def record_batches(probe: Probe, batches: list) -> None:
    """Each training batch the packed collator makes on this rank: its pairs' questions."""
    from rmexp.builtin import resolve_model_path
    from rmexp.model import load_tokenizer
    from rmexp.packing import PackedPairCollator

    cfg = compose_cfg("model=tiny")
    tok = load_tokenizer(resolve_model_path(cfg.model.name_or_path, cfg.model.cache_dir))
    collate = PackedPairCollator.__call__

    def recording(self, examples):
        if probe.training and "rejected_ids" in examples[0]:
            batches.append([tok.decode(ex["chosen_ids"][:int(ex["prompt_len"])]) for ex in examples])
        return collate(self, examples)

    PackedPairCollator.__call__ = recording


def main(case: str, out: Path, overrides: list[str]) -> int:
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    probe, batches = Probe(case, rank), []
    inject(case, probe, rank)
    if case == "stream":
        record_batches(probe, batches)
    from rmexp.train import main as train

    cfg = compose_cfg("model=tiny", f"paths.output_dir={out}", "logger=none", *overrides)
    result = {"rank": rank, "error": None}
    try:
        train(cfg, callbacks=[probe])
    except BaseException as e:  # noqa: BLE001 - recorded, then the exit status says it failed
        result["error"] = {"type": type(e).__name__, "message": str(e)}
        traceback.print_exc()
    result |= {"steps": probe.steps, "lrs": probe.lrs, "batches": batches}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    return 1 if result["error"] else 0


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main(sys.argv[1], Path(sys.argv[2]), sys.argv[3:]))
