"""rmexp-report's paired verdict and seed rows, and rmexp-compare, over synthetic jobs with known per-pair
decisions (no model: each job is the files a sweep job leaves, written here)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import ROOT
from rmexp.compare import PairingError, compare, read_scores
from rmexp.report import report

N = 40
IDS = [f"{i:016x}" for i in range(N)]


def fake_job(root: Path, name: str, overrides: list[str], correct, ties=(), ids=IDS, sources=None) -> Path:
    """A finished sweep job: overrides, composed config, metrics.json, and scores.jsonl with one line per pair,
    chosen scoring 1 over 0 where `correct`, else 0 under 1, or equal rewards at the indices in `ties`."""
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    values = dict(o.split("=", 1) for o in overrides)
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(
        {"lora": {"r": 8}, "trainer": {"learning_rate": float(values.get("trainer.learning_rate", 2e-4)),
                                       "seed": int(values.get("trainer.seed", 42))},
         "logger": {"backend": "none"}}))
    correct = np.asarray(correct, dtype=bool)
    lines = []
    for i, ok in enumerate(correct):
        c, r = (0.5, 0.5) if i in ties else (1.0, 0.0) if ok else (0.0, 1.0)
        line = {"index": i, "pair_id": ids[i], "reward_chosen": c, "reward_rejected": r, "correct": c > r}
        if sources is not None:
            line["source"] = sources[i]
        lines.append(json.dumps(line))
    (job / "scores.jsonl").write_text("\n".join(lines) + "\n")
    accuracy = float(np.mean([ok and i not in ties for i, ok in enumerate(correct)]))  # a tie is wrong, as in training
    (job / "metrics.json").write_text(json.dumps({"status": "ok", "pairwise_accuracy": accuracy,
                                                  "eval_loss": 0.6, "n_eval_pairs": len(correct)}))
    return job


def first(k: int) -> np.ndarray:
    return np.arange(N) < k


def read_rows(sweep: Path) -> dict[str, dict]:
    return {r["job"]: r for r in csv.DictReader((sweep / "summary.csv").open())}


def test_report_marks_exactly_the_jobs_the_paired_test_cannot_separate_from_the_best(tmp_path, capsys):
    best = first(36)  # 36 of 40
    near = best.copy()
    near[[0, 1]] = False  # 2 pairs worse, none better: p = 2 / 2^2 = 0.5
    tied = range(24, 36)  # best's decisions, but 12 pairs with equal rewards: wrong, as pairwise_accuracy counts them
    swapped = best.copy()
    swapped[[2, 3, 4, 5]], swapped[[36, 37]] = False, True  # 4 worse, 2 better: p = 2 (1 + 6 + 15) / 64
    worse = first(26)  # 10 worse: p = 2 / 2^10
    for k, (correct, extra) in enumerate([(best, {}), (near, {}), (best, {"ties": tied}), (swapped, {}),
                                          (worse, {})]):
        fake_job(tmp_path, str(k), [f"trainer.learning_rate={k + 1}e-4"], correct, **extra)
    fake_job(tmp_path, "5", ["trainer.learning_rate=6e-4"], first(20), ids=[f"{i:016x}" for i in range(100, 140)])

    result = report(tmp_path, use_wandb=False, n_resamples=2000)
    assert result["best"] == "0" and result["tied_with_best"] == ["0", "1", "3"] and result["n_eval_pairs"] == N
    rows = read_rows(tmp_path)
    assert {j for j, r in rows.items() if r["tied_with_best"] == "True"} == {"0", "1", "3"}
    assert {j for j, r in rows.items() if r["tied_with_best"] == "False"} == {"2", "4"}
    # exact p: job 1 2/2^2, job 2 (12 worse) 2/2^12, job 3 2(1 + 6 + 15)/2^6, job 4 2/2^10; Holm over the 4:
    # sorted p 2/4096, 2/1024, 1/2, 44/64 times 4, 3, 2, 1, then non-decreasing
    expected = {"1": 1.0, "2": 8 / 4096, "3": 1.0, "4": 6 / 1024}
    assert {j: float(rows[j]["p_vs_best"]) for j in expected} == pytest.approx(expected)
    assert float(rows["2"]["delta_vs_best"]) == pytest.approx(-12 / 40)
    assert float(rows["2"]["delta_ci_high"]) < 0 < float(rows["1"]["delta_ci_high"]) + 1e-12
    assert float(rows["0"]["delta_vs_best"]) == 0 and rows["0"]["n_eval_pairs"] == "40"
    assert rows["5"]["tied_with_best"] == "" and rows["5"]["pairing"].startswith("refused: scored on different eval pairs")
    out = capsys.readouterr().out
    assert "best: job 0; jobs 0, 1, 3 cannot be told apart on these 40 pairs" in out
    # discordant shares against the best: 2, 12, 6, 10 of 40 pairs, mean psi = 30/160; Connor's n = 40 solved for d
    from scipy.optimize import brentq
    from scipy.stats import norm

    psi = 30 / 160
    d = brentq(lambda d: (norm.ppf(0.975) * psi ** 0.5 + norm.ppf(0.8) * (psi - d * d) ** 0.5) ** 2 / d ** 2 - 40,
               1e-3, psi ** 0.5 - 1e-9)
    assert f"smallest gap this eval set can detect at 80% power, before correction: {d:.2f})" in out
    assert "job 5: refused: scored on different eval pairs: none of the 40 pairs of job 5 is among the 40 of job 0" in out
    assert (tmp_path / "heatmap.png").stat().st_size > 1000
    assert "| p_vs_best | tied_with_best |" in (tmp_path / "summary.md").read_text()


def fake_eval(root: Path, name: str, correct, checkpoint: Path) -> Path:
    """An rmexp-evaluate dir of `checkpoint` on the jobs' pairs: eval_metrics.json and scores.jsonl."""
    out = fake_job(root / "evals", name, [], correct)
    (out / "metrics.json").unlink()
    (out / "eval_metrics.json").write_text(json.dumps({"pairwise_accuracy": float(np.mean(correct)), "ci_low": 0.5,
                                                       "ci_high": 0.9, "n_pairs": len(correct),
                                                       "checkpoint": str(checkpoint)}))
    return out


def test_an_ensemble_of_the_jobs_is_a_row_beside_them_paired_with_the_best_job(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    jobs = [fake_job(sweep, str(k), [f"trainer.learning_rate={k + 1}e-4"], first(n)) for k, n in enumerate((30, 20))]
    ensemble = tmp_path / "mean2"
    ensemble.mkdir()
    (ensemble / "ensemble.json").write_text(json.dumps({"mode": "mean", "members": [{"path": str(j)} for j in jobs]}))
    better = first(38)  # 8 pairs better than job 0, none worse: p = 2 / 2^8
    ens_eval = fake_eval(tmp_path, "eval-mean2", better, ensemble)
    other = fake_eval(tmp_path, "eval-other", first(20)[::-1][:N], tmp_path / "elsewhere")
    alone = report(sweep, use_wandb=False, n_resamples=2000)
    jobs_alone = read_rows(sweep)
    result = report(sweep, use_wandb=False, n_resamples=2000, also=[ens_eval, other])
    # the best is a job's (the ensemble is compared with it, never chosen): the verdict is the sweep's own
    assert result["best"] == "0" and result["tied_with_best"] == alone["tied_with_best"] == ["0"]
    rows = read_rows(sweep)
    assert all(rows[j]["p_vs_best"] == jobs_alone[j]["p_vs_best"] for j in ("0", "1"))  # the rows added change no p
    row = rows["also: eval-mean2"]
    assert row["model"] == "mean ensemble of jobs 0, 1"
    assert float(row["delta_vs_best"]) == pytest.approx(8 / 40)
    # Holm over the two added rows: the ensemble's p the smaller (the other: 10 better, 20 worse), times 2
    assert float(row["p_vs_best"]) == pytest.approx(2 * 2 / 2**8) and row["tied_with_best"] == "False"
    assert rows["also: eval-other"]["model"] == str(tmp_path / "elsewhere")
    assert result["also"]["also: eval-mean2"]["delta"] == pytest.approx(8 / 40)
    out = capsys.readouterr().out
    assert "also: eval-mean2 (mean ensemble of jobs 0, 1): 0.9500 [0.5000, 0.9000]; - best job 0: +0.2000" in out
    with pytest.raises(Exception, match="neither an rmexp-evaluate dir"):
        report(sweep, use_wandb=False, also=[ensemble])
    with pytest.raises(Exception, match="two dirs share a name"):
        report(sweep, use_wandb=False, also=[ens_eval, ens_eval])


def test_compare_shows_a_mean_ensemble_beside_each_of_its_members(tmp_path):
    ensemble = tmp_path / "mean2"
    ensemble.mkdir()
    (ensemble / "ensemble.json").write_text(json.dumps({"mode": "mean", "members": [{"path": "run-a"},
                                                                                     {"path": "run-b"}]}))
    mean = first(30)
    out = fake_eval(tmp_path, "eval-mean2", mean, ensemble)
    member_right = [first(26), first(34)]  # member a: 4 pairs worse than the mean; member b: 4 better
    lines = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    for i, line in enumerate(lines):
        line["members_chosen"] = [1.0 if m[i] else -1.0 for m in member_right]
        line["members_rejected"] = [0.0, 0.0]
    (out / "scores.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = compare(fake_job(tmp_path, "single", [], first(30)), out, n_resamples=2000)
    assert result["members_a"] == {} and list(result["members_b"]) == ["run-a", "run-b"]
    a, b = result["members_b"]["run-a"], result["members_b"]["run-b"]
    assert (a["accuracy_a"], a["delta"], a["n_b_better"], a["p_value"]) == pytest.approx((26 / 40, 4 / 40, 4, 2 / 2**4))
    assert (b["delta"], b["n_a_better"]) == pytest.approx((-4 / 40, 4))


def test_a_seed_axis_is_one_row_per_setting_with_the_mean_sd_and_a_test_on_seed_averaged_decisions(tmp_path):
    correct = {"1e-4": [first(30), first(32), first(34)], "2e-4": [first(20), first(22), first(24)]}
    for k, (lr, seed) in enumerate((lr, s) for lr in correct for s in (1, 2, 3)):
        fake_job(tmp_path, str(k), [f"trainer.learning_rate={lr}", f"trainer.seed={seed}"], correct[lr][seed - 1])
    result = report(tmp_path, use_wandb=False, n_resamples=2000)
    rows = read_rows(tmp_path)
    assert list(rows) == ["0, 1, 2", "3, 4, 5"] and result["best"] == "0, 1, 2"
    a, b = rows["0, 1, 2"], rows["3, 4, 5"]
    assert (a["trainer.seed"], a["n_seeds"]) == ("1,2,3", "3")
    # accuracies 0.75, 0.80, 0.85: mean 0.8, sample sd sqrt((0.05^2 + 0 + 0.05^2) / 2) = 0.05
    assert float(a["pairwise_accuracy"]) == pytest.approx(0.8) and float(a["accuracy_sd"]) == pytest.approx(0.05)
    assert (float(a["accuracy_min"]), float(a["accuracy_max"])) == pytest.approx((0.75, 0.85))
    assert float(b["pairwise_accuracy"]) == pytest.approx(0.55)
    # seed-averaged, the first row decides pairs 20..33 better than the second and none worse: p = 2 / 2^14
    assert float(b["p_vs_best"]) == pytest.approx(2 / 2**14) and b["tied_with_best"] == "False"
    assert float(b["delta_vs_best"]) == pytest.approx(-0.25) and a["tied_with_best"] == "True"
    assert (tmp_path / "heatmap.png").is_file()  # one cell per learning rate, the mean of its seeds


def test_compare_pairs_two_runs_overall_and_by_source(tmp_path):
    sources = ["math"] * 20 + ["chat"] * 20
    a = fake_job(tmp_path, "a", [], first(30), sources=sources)
    b_correct = first(30)
    b_correct[[20, 21, 22]] = False  # 3 chat pairs worse
    b = fake_job(tmp_path, "b", [], b_correct, sources=sources)
    result = compare(a, b, n_resamples=2000)
    o = result["overall"]
    assert (o["n_pairs"], o["n_a_better"], o["n_b_better"]) == (40, 3, 0)
    assert o["p_value"] == pytest.approx(2 / 8) and o["delta"] == pytest.approx(-3 / 40)
    assert set(result["by_source"]) == {"math", "chat"}
    assert result["by_source"]["math"]["delta"] == 0 and result["by_source"]["chat"]["n_a_better"] == 3
    assert read_scores(a).accuracy == pytest.approx(0.75)


@pytest.mark.slow
def test_compare_refuses_runs_with_disjoint_eval_pairs_by_name(tmp_path):
    a = fake_job(tmp_path, "a", [], first(30))
    b = fake_job(tmp_path, "b", [], first(30), ids=[f"{i:016x}" for i in range(100, 140)])
    with pytest.raises(PairingError, match="scored on different eval pairs: none of the 40 pairs"):
        compare(a, b)
    proc = subprocess.run([sys.executable, "-m", "rmexp.compare", f"a={a}", f"b={b}"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and last.startswith(f"error: cannot pair {a} and {b}: scored on different eval pairs: "
                                                    "none of the 40 pairs"), proc.stderr
    ok = subprocess.run([sys.executable, "-m", "rmexp.compare", f"a={a}", f"b={a}", "n_resamples=500"],
                        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert ok.returncode == 0 and "| all | 40 |" in ok.stdout and "cannot be told apart" in ok.stdout


def test_compare_leaves_out_unshared_pairs_and_a_report_names_jobs_scored_before_pair_ids(tmp_path, capsys):
    a = fake_job(tmp_path / "two", "a", [], first(30))
    b = fake_job(tmp_path / "two", "b", [], first(30)[5:], ids=IDS[5:])  # the first 5 pairs not scored
    result = compare(a, b, n_resamples=500)
    assert (result["overall"]["n_pairs"], result["n_only_a"], result["n_only_b"]) == (35, 5, 0)
    assert result["overall"]["accuracy_a"] == pytest.approx(25 / 35)

    sweep = tmp_path / "sweep"
    fake_job(sweep, "0", ["trainer.learning_rate=1e-4"], first(30))
    old = fake_job(sweep, "1", ["trainer.learning_rate=2e-4"], first(20))
    lines = [json.loads(line) for line in (old / "scores.jsonl").read_text().splitlines()]
    (old / "scores.jsonl").write_text("".join(json.dumps({k: v for k, v in s.items() if k != "pair_id"}) + "\n"
                                              for s in lines))
    report(sweep, use_wandb=False, n_resamples=500)
    row = read_rows(sweep)["1"]
    assert row["pairing"].startswith("not paired:") and "no pair_id" in row["pairing"] and row["tied_with_best"] == ""
    assert "best: job 0; no other job is paired with it on these 40 pairs" in capsys.readouterr().out
