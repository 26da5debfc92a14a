"""bench/gpu_check.py (`make gpu-check`) runs on this CPU too, with `--device cpu --quick`, so it cannot rot: every
section reports, nothing fails, and what only CUDA has says `skipped: <reason>`."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import CUDA_SKIP_REASON, ROOT

sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402

SECTIONS = ("device", "models", "rewards", "flex", "training", "trained_run", "pytest_cuda")


def test_quick_sizes_shrink_and_the_full_check_keeps_llama_3_1_8b_shapes():
    quick, full = gpu_check.parse_args(["--device", "cpu", "--quick"]), gpu_check.parse_args([])
    assert (quick.steps, quick.batch, quick.pairs, quick.deep_models) == (6, 2, 12, 1)
    assert (full.device, full.steps, full.batch, full.deep_models, full.layers) == ("cuda", 20, 4, 2, 2)
    assert full.models == ["llama3_8b_shape", "gemma3_270m"] and tuple(full.sections) == SECTIONS
    shape = gpu_check.LLAMA_3_1_8B
    assert (shape["hidden_size"], shape["num_attention_heads"], shape["num_key_value_heads"], shape["intermediate_size"],
            shape["vocab_size"], shape["rope_parameters"]["rope_theta"]) == (4096, 32, 8, 14336, 128256, 500000.0)


@pytest.mark.slow
@pytest.mark.numerics
def test_the_quick_check_on_the_cpu_reports_every_section(tmp_path):
    """One quick CPU check (one test, so pytest-xdist runs it once: about a minute on 2 cores once torch.compile's
    cache is warm; a cold compile of the decoder layer adds about 40 s), its JSON report parsed from stdout."""
    report = run_quick_check(tmp_path)
    check_device_and_models(report)
    check_rewards(report)
    check_training(report)
    check_flex_and_pytest(report)


def run_quick_check(tmp) -> dict:
    out = tmp / "report.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--work-dir", str(tmp / "work"), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    try:
        parsed = json.loads(proc.stdout)  # stdout holds the report alone
    except json.JSONDecodeError:
        pytest.fail(f"no JSON report (rc {proc.returncode}): {proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    assert json.loads(out.read_text()) == parsed
    assert proc.returncode == 0 and parsed["errors"] == [], (parsed["errors"], proc.stderr[-4000:])
    return parsed


def check_device_and_models(report: dict) -> None:
    """Every section there; on the CPU, what only CUDA has says `skipped: `; the 4-bit layers and the fp32 head."""
    assert all(section in report for section in SECTIONS)
    device = report["device"]
    from rmexp.device import place

    assert device["device"] == "cpu" and device["dtype"] == str(place("cpu").dtype).removeprefix("torch.")
    assert device["gpu"].startswith("skipped: ") and device["compute_capability"].startswith("skipped: ")
    assert set(report["models"]) == {"llama3_8b_shape", "tiny"}  # --quick: the tiny model for Gemma-3-270M
    for name, model in report["models"].items():
        assert model["4bit"]["n_4bit_layers"] == 7 * model["shape"]["num_hidden_layers"], name  # q k v o gate up down
        assert model["4bit"]["devices"] == ["cpu"] and model["4bit"]["quant_types"] == ["nf4"], name
        assert model["head"]["dtypes"] == ["float32"] and model["packed_attention"], name
    llama = report["models"]["llama3_8b_shape"]["shape"]
    assert (llama["num_attention_heads"] // llama["num_key_value_heads"], llama["rope_theta"]) == (4, 500000.0)


def check_rewards(report: dict) -> None:
    """Each path within fp32's bound of a float64 copy of the same 4-bit weights, so packed and padded within
    twice it: k * eps(fp32) * size * sqrt(n) (tests/numerics.py: forward_bound), k = 15 roundings a layer and 5
    more (embedding, final norm and head, the reference's own norm and head), `size` the terms the float64 head
    sums (max |h| . |w|), n the longest sum (a sequence, or the widest projection)."""
    for name, rewards in report["rewards"].items():
        fp32 = rewards["float32"]
        shape = report["models"][name]["shape"]
        n = max(fp32["longest_tokens"], shape["hidden_size"], shape["intermediate_size"])
        bound = (15 * shape["num_hidden_layers"] + 5) * torch.finfo(torch.float32).eps * fp32["float64_head_size"] * math.sqrt(n)
        assert fp32["bound_vs_float64"] == pytest.approx(bound)  # the bound the report states is this one
        assert fp32["max_abs_packed_vs_float64"] <= bound and fp32["max_abs_padded_vs_float64"] <= bound, name
        assert fp32["max_abs_packed_vs_padded"] <= 2 * bound and fp32["within_bound"], name
        assert fp32["finite"] and fp32["pairs"] == 12 and fp32["decisions_differ_packed_vs_padded"] == 0, name
        for dtype, result in rewards.items():  # the placement's dtype too (bf16 on a CPU with AVX512-BF16)
            assert result["finite"] and result["within_bound"], (name, dtype)


def check_training(report: dict) -> None:
    """packed, padded and compiled runs finite, with their `auto` decisions; the run and its export scored."""
    runs = report["training"]["llama3_8b_shape"]
    assert set(runs) >= {"packed", "padded", "compiled"}
    for kind, run in runs.items():
        if kind == "seconds":
            continue
        if run.get("skipped"):  # only where this CPU has no C++ compiler for torch.compile
            assert kind == "compiled" and "no compiler" in run["skipped"]
            continue
        assert run["status"] == "ok" and run["steps"] == 6 and run["loss_finite"], kind
        assert all(math.isfinite(loss) for loss in run["losses"]) and run["s_per_step"] > 0, kind
        assert run["4bit"]["devices"] == ["cpu"] and run["trainable_dtypes"] == ["float32"], kind
        assert run["max_memory_allocated_gib"].startswith("skipped: "), kind
        assert any("trainer.gradient_checkpointing=auto" in line for line in run["auto"]["log"]), kind
    if not runs["compiled"].get("skipped"):
        assert runs["compiled"]["auto"]["compiled_layers"] == 2 and runs["compiled"]["compile_s"] > 0
    assert runs["packed"]["auto"]["compiled_layers"] == 0  # 6 planned steps: `auto` leaves it eager
    trained = report["trained_run"]
    for kind in ("run", "export"):
        assert trained[kind]["devices"] == ["cpu"] and trained[kind]["finite"], kind
        assert trained[kind]["head"]["dtypes"] == ["float32"], kind
    assert trained["run"]["4bit"]["n_4bit_layers"] == 14 and trained["export"]["4bit"]["n_4bit_layers"] == 0
    assert trained["run"]["dequantized_4bit_layers"] == 14  # on a CPU scoring keeps each one dequantized
    assert math.isfinite(trained["max_abs_export_vs_run"])


def check_flex_and_pytest(report: dict) -> None:
    """flex against the segment walk where this build has it (else the report says so); `pytest -m cuda` skips."""
    flex = report["flex"]
    if not flex["available"]:
        assert flex["skipped"].startswith("flex: not available in this build")
    else:
        compared = flex["llama3_8b_shape"]
        for path in (flex["segment"], flex["flex"]):
            assert compared[path]["s_per_step"] > 0 and compared[path]["per_layer"] > 0, path
        assert math.isfinite(compared["max_abs_rewards"]) and math.isfinite(compared["max_abs_grad_over_max_grad"])
        assert compared[flex["segment"]]["attn_implementation"] != compared[flex["flex"]]["attn_implementation"]
    tests = report["pytest_cuda"]
    assert tests["ok"] and tests["rc"] == 0 and tests["counts"].get("skipped", 0) >= 4 and not tests["counts"].get("passed")
    assert tests["skip_reasons"] == [CUDA_SKIP_REASON]


@pytest.mark.slow
def test_the_check_asked_for_a_gpu_on_a_cpu_says_so_and_exits_2():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cuda"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2
    assert "torch sees no CUDA device" in json.loads(proc.stdout)["device"]["error"]
