"""scripts/gpu_check.sh and its Python parts (bench/gpu_check.py) keep working, on a CPU with tiny shapes.

No GPU has run the script yet; these tests make sure that when one is lent, the minutes go to measuring:
the dry run lists the steps, every step's Python runs end to end (``--tiny``: tiny model and shapes, CPU
allowed; the build step only forms its command), results land as JSON and Markdown, and a step that fails
or runs past its limit is recorded while the run goes on. About 40 s here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STEP_NAMES = [s.name for s in gpu_check.STEPS]


def _script(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_steps_fit_the_time_budgets():
    assert STEP_NAMES == ["env", "build", "pytest_gpu", "kernels", "train_step", "finetune"]
    assert gpu_check.BUDGET_S == {False: 480, True: 180}  # under 8 minutes, --quick under 3
    assert all(s.quick_timeout_s <= s.timeout_s <= gpu_check.BUDGET_S[False] for s in gpu_check.STEPS)


def test_dry_run_lists_every_step_and_runs_nothing(tmp_path):
    out = tmp_path / "out"
    run = _script("--dry-run", "--quick", "--out", str(out))
    assert run.returncode == 0, run.stderr
    for name in STEP_NAMES:
        assert f"  {name} " in run.stdout
    assert "budget 180 s" in run.stdout
    assert not out.exists()


def test_unknown_step_is_a_usage_error():
    run = _script("--dry-run", "--skip", "nosuchstep")
    assert run.returncode == 2 and "unknown step" in run.stderr


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The whole script on this CPU: --tiny shapes, --quick pytest selection, the build's command only."""
    out = tmp_path_factory.mktemp("gpu_check")
    run = _script("--tiny", "--quick", "--dry-build", "--out", str(out), timeout=600)
    return run, out


def test_tiny_run_completes_every_step(tiny_run):
    run, out = tiny_run
    summary = json.loads((out / "gpu_check.json").read_text())
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert status == dict.fromkeys(STEP_NAMES, "ok"), (status, run.stdout[-3000:])
    assert run.returncode == 0
    assert all(s["seconds"] > 0 for s in summary["steps"])
    for name in STEP_NAMES:
        record = json.loads((out / f"{name}.json").read_text())
        assert record["status"] == "ok" and "result" in record
        assert (out / f"{name}.md").read_text().startswith(f"# gpu_check step `{name}`: ok")
    assert "| env | ok |" in (out / "gpu_check.md").read_text()
    assert (out / "gpu_check_bundle.tar.gz").stat().st_size > 0


def test_tiny_run_results(tiny_run):
    _, out = tiny_run
    build = json.loads((out / "build.json").read_text())["result"]
    assert build["way"] in ("cmake", "cpp_extension") and build["LOMO_CUDA_ARCHS"]
    pytest_counts = json.loads((out / "pytest_gpu.json").read_text())["result"]["counts"]
    assert pytest_counts["tests"] > 0 and pytest_counts["failures"] == pytest_counts["errors"] == 0
    kernels = json.loads((out / "kernels.json").read_text())["result"]["rows"]
    variants = {r["variant"] for r in kernels}
    assert {"matmul (floor)", "hook (lomo-optim)", "fused update [torch]"} <= variants
    assert not [r for r in kernels if "error" in r]
    assert all(r["TFLOPs"] >= 0 and r["median_ms"] > 0 for r in kernels)
    steps = {r["method"]: r for r in json.loads((out / "train_step.json").read_text())["result"]["rows"]}
    for method in ("torch AdamW", "lomo_kernels Lomo", "lomo_kernels AdaLomo"):
        assert steps[method]["tokens_per_s"] > 0, steps[method]
    finetune = json.loads((out / "finetune.json").read_text())["result"]
    assert finetune["summary"]["steps"] == 3 and (out / "finetune_loss_curve.png").exists()


def test_a_failing_or_hanging_step_is_recorded_and_the_run_goes_on(tmp_path):
    py = sys.executable
    steps = [(gpu_check.Step("crash", "exits 3", 30, 30), [py, "-c", "raise SystemExit(3)"], 30),
             (gpu_check.Step("hang", "sleeps, and so does its child", 30, 30),
              [py, "-c", "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
               "'import time; time.sleep(60)']); time.sleep(60)"], 2),
             (gpu_check.Step("env", "real step", 60, 60),
              [py, str(ROOT / "bench" / "gpu_check.py"), "--run-step", "env", "--out", str(tmp_path)], 120),
             (gpu_check.Step("late", "after the budget", 30, 30), [py, "-c", "pass"], 30)]
    summary = gpu_check.run_steps(steps, tmp_path, budget_s=60, header={"budget_s": 60})
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert status["crash"] == "failed" and "exit code 3" in summary["steps"][0]["error"]
    assert status["hang"] == "timeout"
    assert status["env"] == "ok"
    assert json.loads((tmp_path / "env.json").read_text())["result"]["info"]["versions"]["torch"] == torch.__version__
    assert status["late"] == "failed"  # it ran (a command that leaves no result file is a failure)
    for name in status:
        assert (tmp_path / f"{name}.json").exists() and (tmp_path / f"{name}.md").exists()


def test_budget_used_up_skips_the_rest(tmp_path):
    steps = [(gpu_check.Step("first", "", 30, 30), [sys.executable, "-c", "import time; time.sleep(3)"], 30),
             (gpu_check.Step("second", "", 30, 30), [sys.executable, "-c", "pass"], 30)]
    summary = gpu_check.run_steps(steps, tmp_path, budget_s=6, header={})
    assert [s["status"] for s in summary["steps"]] == ["failed", "skipped"]  # no result file: failed


def test_build_command_targets_the_local_gpu(monkeypatch):
    monkeypatch.setenv("LOMO_CUDA_ARCHS", "90")
    way, cmd, env = gpu_check.build_commands(gpu_check.cuda_archs(), 4)
    assert env["LOMO_CUDA_ARCHS"] == "90" and env["LOMO_REQUIRE_EXTENSION"] == "1"
    assert (way == "cmake") == ("setup.py" in cmd)


def test_backend_report_after_a_build():
    report = gpu_check.backend_report()
    assert isinstance(report, dict), report
    assert set(report) == {"torch", "cpu", "cuda", "triton"} and report["torch"][0] is True


def test_kernel_bench_odd_shapes_on_cpu():
    rows = gpu_check.bench_kernels(torch.device("cpu"), torch.float32, {"odd": (37, 29)}, (5,), repeats=1)
    assert {r["variant"] for r in rows} >= {"matmul (floor)", "hook (lomo-optim)"}
    assert not [r for r in rows if "error" in r]
