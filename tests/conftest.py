"""Shared fixtures: configs composed through Hydra's compose API, and one real tiny training run."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# No progress bars in the suite's output: the hub's and transformers' bars, datasets', and any other tqdm (which
# reads its defaults from TQDM_* when it is imported), in this process and the ones tests start. Set before the
# imports below load those libraries; pytest_configure covers a plugin that loaded one first.
for _name in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
    os.environ.setdefault(_name, "1")

import pytest  # noqa: E402
from hydra import compose, initialize_config_module  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from rmexp.config import CONF_MODULE  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
HH_PAIRS = SHARED_DATA / "hh-rlhf-harmless" / "pairs.jsonl"
DPO_ZH = SHARED_DATA / "llamafactory-dpo" / "dpo_zh_200.json"
DPO_EN = SHARED_DATA / "llamafactory-dpo" / "dpo_en_300.json"

needs_shared = pytest.mark.skipif(not HH_PAIRS.is_file(), reason="../shared/data is absent")

os.environ.setdefault("WANDB_SILENT", "true")
# tokenized datasets of the tests (and of their subprocesses) stay out of the user's datasets cache
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="rmexp-tests-datasets-"))
os.environ.pop("WANDB_API_KEY", None)  # tests never go online


def compose_cfg(*overrides: str) -> DictConfig:
    """The same config `python -m rmexp.train <overrides>` would get (minus hydra's own node)."""
    with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def compose_evaluate(checkpoint, data_path, out_dir, *extra: str) -> DictConfig:
    """The config `python -m rmexp.evaluate checkpoint=... data.path=...` would get, W&B off."""
    with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
        return compose("evaluate", overrides=[f"checkpoint={checkpoint}", f"data.path={data_path}",
                                              f"paths.output_dir={out_dir}", "logger=none", *extra])


@pytest.fixture
def tokenizer():
    """The tiny model's tokenizer, fresh for each test (tests may change its chat template)."""
    from rmexp.builtin import resolve_model_path
    from rmexp.model import load_tokenizer

    cfg = compose_cfg("model=tiny", "data.path=data/preference.jsonl")
    return load_tokenizer(resolve_model_path(cfg.model.name_or_path, cfg.model.cache_dir))


class KeepModel(TrainerCallback):
    """Keeps the model the Trainer trains (the trained model, once training is done)."""

    model = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model


def tiny_overrides(out: Path, *extra: str) -> list[str]:
    return ["model=tiny", f"paths.output_dir={out}", "logger.mode=offline", f"data.path={ROOT / 'data/preference.jsonl'}",
            "trainer.max_steps=8", "trainer.per_device_train_batch_size=4", "trainer.eval_steps=4", "trainer.logging_steps=2", "trainer.learning_rate=5e-3",
            *extra]


def pytest_configure(config):
    """A plugin may have imported the libraries before this file set the variables: turn their bars off too."""
    import datasets
    import huggingface_hub
    import transformers

    huggingface_hub.utils.disable_progress_bars()
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


@pytest.fixture(autouse=True)
def _run_from_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


# ---------------------------------------------------------------- CUDA: the CPU unless a test is marked `cuda`
# A GPU box running `make test` gets this machine's results. CUDA is hidden from the session's start (so the
# module- and session-scoped fixtures that train, which run before any test's own fixtures, train on the CPU
# too) and for every test not marked `cuda` (`hide_cuda`): in this process torch.cuda and torch.accelerator say
# there is no device, so rmexp.device, the model loader, transformers' Trainer and accelerate all choose the CPU
# (the end-to-end tests' fp32 bounds hold, and the 2-process tests do not share one GPU); the processes a test
# starts get CUDA_VISIBLE_DEVICES="". A test marked `cuda` (tests/test_cuda.py; its fixtures function-scoped)
# sees the machine as it is (`show_cuda`), and where torch sees no CUDA device it is skipped with
# CUDA_SKIP_REASON. Code run at import (a module-level environment snapshot) is not covered.

import torch  # noqa: E402  (transformers, above, has imported it already)

CUDA_SKIP_REASON = "needs a CUDA device (torch.cuda.is_available() is False here)"
_CUDA_PRESENT: list[bool] = []  # asked once, before anything hides CUDA
_REAL_CUDA = [(torch.cuda, name, getattr(torch.cuda, name)) for name in ("is_available", "device_count")] + [
    (torch.accelerator, name, getattr(torch.accelerator, name))
    for name in ("is_available", "device_count", "current_accelerator") if hasattr(torch, "accelerator")]
_REAL_VISIBLE = os.environ.get("CUDA_VISIBLE_DEVICES")
_CUDA_CACHES: list = []


def cuda_present() -> bool:
    """Whether torch sees a CUDA device, as the machine is (asked at session start, before anything hides it)."""
    if not _CUDA_PRESENT:
        _CUDA_PRESENT.append(bool(torch.cuda.is_available()))
    return _CUDA_PRESENT[0]


def forget_cuda_answers() -> None:
    """Clear transformers' cached answers about CUDA (`is_torch_cuda_available`, `is_torch_bf16_gpu_available`, ...:
    functools.lru_cache), so that none outlives the state, hidden or shown, it was given in."""
    if not _CUDA_CACHES:
        import inspect

        import transformers.utils.import_utils as import_utils

        for fn in vars(import_utils).values():
            try:
                if hasattr(fn, "cache_clear") and "cuda" in inspect.getsource(fn):
                    _CUDA_CACHES.append(fn)
            except (OSError, TypeError):  # no source to read: not one of them
                continue
    for fn in _CUDA_CACHES:
        fn.cache_clear()


def hide_cuda(monkeypatch) -> None:
    """What a test not marked `cuda` runs under: no CUDA device for torch, in this process and its children."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    if hasattr(torch, "accelerator"):  # the Trainer's DataLoader asks it whether to pin memory, transformers where
        monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
        monkeypatch.setattr(torch.accelerator, "device_count", lambda: 0)
        monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *args, **kwargs: None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    forget_cuda_answers()


def show_cuda(monkeypatch) -> None:
    """What a `cuda` test runs under: torch and CUDA_VISIBLE_DEVICES as the machine has them."""
    for owner, name, real in _REAL_CUDA:
        monkeypatch.setattr(owner, name, real)
    if _REAL_VISIBLE is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", _REAL_VISIBLE)
    forget_cuda_answers()


def cuda_hidden(item) -> bool:
    """Whether `hide_cuda` applies to a test: every test but those marked `cuda`."""
    return item.get_closest_marker("cuda") is None


def pytest_sessionstart(session):
    # Ask the driver before anything hides CUDA: it reads CUDA_VISIBLE_DEVICES once, when first asked, so a first
    # question under CUDA_VISIBLE_DEVICES="" would hide the GPU from the `cuda` tests of this process too. And
    # bitsandbytes registers its CUDA kernels at import only where CUDA is visible then: import it now.
    if cuda_present():
        import bitsandbytes  # noqa: F401


def pytest_collection_modifyitems(config, items):
    if cuda_present():
        return
    skip = pytest.mark.skip(reason=CUDA_SKIP_REASON)
    for item in items:
        if not cuda_hidden(item):
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _cpu_for_the_session():
    with pytest.MonkeyPatch.context() as mp:
        hide_cuda(mp)
        yield
    forget_cuda_answers()


@pytest.fixture(autouse=True)
def _cpu_unless_marked_cuda(request, monkeypatch):
    if cuda_hidden(request.node):
        hide_cuda(monkeypatch)
    else:
        show_cuda(monkeypatch)
    yield
    forget_cuda_answers()  # whatever the test faked or asked; its monkeypatch then restores the session's state
