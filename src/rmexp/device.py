"""Where a model scores and in which dtype: one decision (`decide`), fed by the hardware probes (`place`).

`device` (rmexp-evaluate, rmexp-score, rmexp-serve, rmexp-export and `RewardModel.load`) is `auto`, `cpu`,
`cuda` or `cuda:N`. auto is the current CUDA device where torch sees one, else the CPU. A setting of
`auto` for a dtype (`model.dtype`, `quantization.bnb_4bit_compute_dtype`) is bf16 where that device computes
bf16 natively and fp32 elsewhere: `native_bf16` holds that rule, for scoring and for training
(`rmexp.model.compute_dtype`, `trainer.bf16=auto`) alike. On CUDA `from_pretrained` puts every weight on the
device as it loads (`device_map={"": N}`; bitsandbytes quantizes a 4-bit model on the GPU it runs on); on
the CPU nothing moves (`device_map=None`), as before. The reward head and the hidden states it reads stay
fp32 wherever the model runs (rmexp.prepare.for_scoring).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rmexp.config import DEVICES, is_device, require
from rmexp.errors import UserError

log = logging.getLogger(__name__)


class DeviceError(UserError, RuntimeError):
    """A `device` this machine does not have: cuda without a CUDA device, cuda:N beyond its devices."""


@dataclass(frozen=True)
class Placement:
    """Where a model scores (`device`), the dtype `auto` means there (`dtype`), and why (`why`, for the log)."""

    device: torch.device
    dtype: torch.dtype
    why: str

    @property
    def device_map(self) -> dict | None:
        """`from_pretrained`'s device_map: on CUDA every weight loads onto the device; on the CPU None (as before)."""
        return {"": self.device.index} if self.device.type == "cuda" else None

    def __str__(self) -> str:
        return f"device {self.device}, dtype {str(self.dtype).removeprefix('torch.')} ({self.why})"


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX).

    A CPU without them runs bf16 matmuls far slower than fp32 (measured on an AVX2-only EPYC: a 2048^3 bf16
    matmul 58.9 s, fp32 0.13 s).
    """
    from rmexp._compat import cpu_has_bf16_units

    return cpu_has_bf16_units()


def native_bf16(device: torch.device | str) -> bool:
    """The one rule for what `auto` means: whether `device` computes bf16 natively.

    A CUDA device does from compute capability 8.0 (Ampere) on: `torch.cuda.is_bf16_supported()` alone
    also counts a T4's or V100's emulation, which is slower than fp32 there, so it is asked with
    `including_emulation=False` (about the device asked for: it answers for the current one). A CPU does
    with AVX512-BF16 or AMX (`cpu_native_bf16`).
    """
    device = torch.device(device)
    if device.type == "cuda":
        with torch.cuda.device(device):
            return torch.cuda.is_bf16_supported(including_emulation=False)
    return cpu_native_bf16()


def training_device() -> torch.device:
    """Where training computes: the current CUDA device where torch sees one (the Trainer's), else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def auto_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """bf16 where `device` (by default `training_device()`) computes it natively, else fp32."""
    return torch.bfloat16 if native_bf16(training_device() if device is None else device) else torch.float32


def decide(requested: str, cuda_devices: int, bf16: Callable[[torch.device], bool], current: int = 0,
           key: str = "device") -> Placement:
    """Where a model asked to run on `requested` (auto, cpu, cuda, cuda:N) scores, and in which dtype.

    The hardware comes in as arguments: `cuda_devices`, how many CUDA devices torch sees (0: none);
    `bf16(device)`, whether a device computes bf16 natively (`native_bf16`); `current`, the current CUDA
    device (what auto and cuda mean). auto is cuda:`current` where there is a CUDA device, else the CPU;
    cpu is the CPU even beside a GPU; cuda:N must exist. The dtype is bf16 where the device computes it
    natively, else fp32. A value that names no device is a ConfigError naming `key`; a device this machine
    lacks, a DeviceError naming it.
    """
    require(is_device(requested), key, DEVICES, requested)
    gpus = f"{cuda_devices} CUDA device{'s' if cuda_devices != 1 else ''}"
    if requested == "cpu":
        device, why = torch.device("cpu"), f"{key}=cpu" + (f" ({gpus} left unused)" if cuda_devices else "")
    elif requested == "auto" and not cuda_devices:
        device, why = torch.device("cpu"), f"{key}=auto and no CUDA device"
    else:
        index = current if requested in ("auto", "cuda") else int(requested.split(":")[1])
        if not cuda_devices:
            raise DeviceError(f"{key}={requested}, but torch sees no CUDA device (torch.cuda.is_available() is "
                              f"False: a CPU build of torch, or no GPU or driver); pass {key}=auto or {key}=cpu")
        if index >= cuda_devices:
            raise DeviceError(f"{key}={requested}, but this machine has {gpus} (cuda:0 to cuda:{cuda_devices - 1}); "
                              f"pass one of them, or {key}=auto")
        device = torch.device("cuda", index)
        why = f"{key}={requested}" + (f": {gpus}, the current one" if requested == "auto" else "")
    native = bf16(device)
    how = "compute capability 8.0 or later" if device.type == "cuda" else "AVX512-BF16 or AMX"
    why += f"; bf16 native there ({how})" if native else f"; no native bf16 there ({how}), so fp32"
    return Placement(device, torch.bfloat16 if native else torch.float32, why)


def place(requested: str = "auto", key: str = "device") -> Placement:
    """`decide` for this machine's hardware, logged (one INFO line: device, dtype, why)."""
    cuda_devices = torch.cuda.device_count() if is_device(requested) and torch.cuda.is_available() else 0
    current = torch.cuda.current_device() if cuda_devices and requested in ("auto", "cuda") else 0
    placement = decide(requested, cuda_devices, native_bf16, current, key)
    log.info("model on %s", placement)
    return placement
