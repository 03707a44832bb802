"""Installs carry what they import: the wheel's metadata declares every dependency a public entry point
imports and pins torch to the major.minor its `_C` was built against; a `_C` built for another torch is
refused by name; and the wheel, installed into a fresh venv holding only torch and its declared
dependencies, runs `train`, `plan --method all` (no lomo-optim there) and a LomoTrainer from outside
the repository."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch

from lomo_kernels import backends

REPO = Path(__file__).resolve().parents[1]
_NOT_SOURCE = (".venv", "venv", ".git", "build", "dist", "runs", "outputs", "__pycache__", ".pytest_cache",
               ".hypothesis", "*.egg-info", "*.so", "bench", "shared")


# --- the runtime guard (fast) ------------------------------------------------------------------------

class _Dist:
    def __init__(self, requires):
        self.requires = requires


@pytest.mark.parametrize("running, refused", [("2.12.1", True), ("2.14.0+cpu", True), ("2.13.5+cpu", False)])
def test_a_C_built_for_another_torch_is_refused_naming_both_versions(monkeypatch, running, refused):
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "distribution",
                        lambda name: _Dist(["torch<2.14,>=2.13", "accelerate>=1.1.0", 'triton; extra == "triton"']))
    monkeypatch.setattr(torch, "__version__", running)
    why = backends.torch_build_mismatch()
    if not refused:
        assert why == ""
        return
    assert "built against torch 2.13" in why and f"torch {running} is installed" in why
    for name in ("cpu", "cuda"):
        info = backends._probe(name)
        assert not info.available and "built against torch 2.13" in info.detail, name


def test_an_unpinned_or_uninstalled_build_is_not_refused(monkeypatch):
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: _Dist(["torch>=2.4"]))
    assert backends.torch_build_mismatch() == ""

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    assert backends.torch_build_mismatch() == ""


def test_the_torch_pin_is_the_build_torchs_major_minor():
    namespace = {"__file__": str(REPO / "setup.py")}
    source = (REPO / "setup.py").read_text()
    exec(compile(source.split("\nclass CMakeExtension")[0], "setup.py", "exec"), namespace)  # without setup()
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    assert namespace["torch_requirement"]() == f"torch>={major}.{minor},<{major}.{int(minor) + 1}"
    declared = " ".join(namespace["RUNTIME_DEPENDENCIES"])
    for module in ("transformers", "accelerate", "safetensors", "numpy", "tqdm", "pyyaml", "matplotlib"):
        assert module in declared, module


# --- the wheel in a fresh venv (slow) ------------------------------------------------------------------

_LOMO_TRAINER = textwrap.dedent("""
    import sys
    import torch
    from transformers import TrainingArguments
    import lomo_kernels
    from lomo_kernels.integrations.transformers import LomoTrainer
    from lomo_kernels.testing import tiny_llama

    assert "site-packages" in lomo_kernels.__file__, lomo_kernels.__file__
    torch.manual_seed(0)
    model = tiny_llama()
    vocab = model.config.vocab_size
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, vocab, (8, 12))]
    args = TrainingArguments(output_dir=sys.argv[1], max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                             report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = LomoTrainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    assert result.global_step == 2, result
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before)), "no weight changed"
    print("LOMOTRAINER OK", result.global_step, round(result.training_loss, 4))
""")


def _copy_source(dest: Path) -> None:
    shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(*_NOT_SOURCE), symlinks=True)


def _run(argv, cwd, env, timeout, what):
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - started
    assert done.returncode == 0, f"{what} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    print(f"{what}: {seconds:.1f} s")
    return done


@pytest.mark.slow
def test_the_wheel_installs_into_a_fresh_venv_and_runs_outside_the_repository(tmp_path):
    """About 2 minutes on the 2-core CPU machine: build (C++ extension), venv, install, three runs."""
    source, wheels, venv, work = tmp_path / "src", tmp_path / "wheels", tmp_path / "venv", tmp_path / "work"
    _copy_source(source)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(LOMO_BUILD_CUDA="0", LOMO_REQUIRE_EXTENSION="1", LOMO_BUILD_JOBS=str(min(4, os.cpu_count() or 1)),
               OMP_NUM_THREADS="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    # the build environment is this one (torch, pybind11, cmake, ninja: scripts/setup.sh), no isolation:
    # an isolated build would fetch another (multi-GB CUDA) torch
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(wheels),
          str(source)], tmp_path, env, 600, "build the wheel")
    wheel = next(wheels.glob("lomo_kernels-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert any(n.startswith("lomo_kernels/_C.") for n in names)
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    assert f"torch<{major}.{int(minor) + 1},>={major}.{minor}" in requires, requires
    assert any(r.startswith("accelerate") for r in requires), requires
    assert not any(r.startswith("lomo-optim") and "extra" not in r for r in requires)

    base = getattr(sys, "_base_executable", sys.executable)
    _run([base, "-m", "venv", str(venv)], tmp_path, env, 120, "create the venv")
    python = venv / "bin" / "python"
    # only torch (this build's version) and what the wheel declares; versions as the repository pins them
    constraints = [str(REPO / "requirements.txt")] if (REPO / "requirements.txt").is_file() else []
    _run([str(python), "-m", "pip", "install", "-qq", "--no-compile",
          *(["-c", constraints[0]] if constraints else []), f"torch=={torch.__version__.split('+')[0]}", str(wheel)],
         tmp_path, env, 600, "install into the venv")
    listed = _run([str(python), "-m", "pip", "list", "--format", "json"], tmp_path, env, 60, "pip list").stdout
    installed = {p["name"].lower() for p in json.loads(listed)}
    assert "lomo-optim" not in installed and "lomo_optim" not in installed and "pytest" not in installed

    work.mkdir()
    (work / "data.jsonl").write_text("".join(json.dumps({"text": f"line {i}: " + "ab " * (i % 9)}) + "\n"
                                             for i in range(200)))
    (work / "config.json").write_text(json.dumps(
        {"model_type": "llama", "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
         "num_attention_heads": 4, "vocab_size": 300, "max_position_embeddings": 64, "tie_word_embeddings": False}))
    cli = str(venv / "bin" / "lomo-kernels")
    probe = _run([str(python), "-c", "import lomo_kernels as lk; print(lk.__file__); "
                  "print(lk.available_backends()['cpu'])"], work, env, 120, "import").stdout
    assert str(venv) in probe and "available:" in probe and "unavailable" not in probe.splitlines()[1], probe

    done = _run([cli, "train", "--model", "tiny", "--data", "data.jsonl", "--steps", "3", "--seq-len", "16",
                 "--batch-size", "2", "--no-progress", "--output", "run"], work, env, 300, "lomo-kernels train")
    assert (work / "run" / "model.safetensors").is_file() and "outputs in" in done.stdout

    done = _run([cli, "plan", "--model", "config.json", "--method", "all", "--seq-len", "8"], work, env, 300,
                "lomo-kernels plan --method all")
    assert "| lomo |" in done.stdout and "| adamw |" in done.stdout and "lomo-optim skipped" in done.stdout
    assert "Traceback" not in done.stderr

    (work / "lomo_trainer.py").write_text(_LOMO_TRAINER)
    done = _run([str(python), "lomo_trainer.py", str(work / "hf")], work, env, 300, "LomoTrainer, 2 steps")
    assert "LOMOTRAINER OK 2" in done.stdout
