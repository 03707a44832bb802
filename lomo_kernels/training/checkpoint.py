"""Run directories and atomic checkpoints.

Layout of a run directory::

    run.json                 the resolved options of the run (marks the directory as a run)
    metrics.jsonl            one JSON record per logged step / evaluation
    config.json, model.safetensors, tokenizer files
                             the latest good weights: transformers.AutoModelForCausalLM.from_pretrained(dir)
    checkpoints/step-NNNNNNNN/
                             the same model files + training_state.pt (optimizer state, data position,
                             RNG states, step)
    loss_curve.png, summary.json   written at the end

A checkpoint is written into ``checkpoints/.tmp-*`` and renamed into place only when complete, and
the top-level model files are replaced one by one with ``os.replace``; so a crash mid-write leaves
the previous checkpoint as the latest one and never a half-written one.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import UsageError

RUN_FILE = "run.json"
STATE_FILE = "training_state.pt"
CHECKPOINTS = "checkpoints"
_PREFIX = "step-"


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def holds_run(directory: Path) -> bool:
    return (directory / RUN_FILE).is_file()


def read_run_info(directory: Path) -> dict:
    """run.json: {"options": ..., "model_source": ..., "data_sha256": ...}."""
    try:
        info = json.loads((directory / RUN_FILE).read_text())
        if not {"options", "model_source", "data_sha256"} <= set(info):
            raise ValueError("fields are missing")
        return info
    except (OSError, ValueError) as exc:
        raise UsageError(f"{directory / RUN_FILE} is unreadable ({exc}); cannot resume this run") from None


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are never listed)."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoint_dirs(run_dir)
    return found[-1] if found else None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model, save_tokenizer, training_state: dict, keep: int) -> Path:
    """Write checkpoint ``step`` atomically, publish its weights at the top of ``run_dir``, and keep
    only the newest ``keep`` checkpoints. ``save_tokenizer(dir)`` writes the tokenizer files."""
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tmp)
        torch.save(training_state, tmp / STATE_FILE)
        if final.exists():  # only when a run re-saves a step it already saved (e.g. a resumed final step)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish_model_files(final, run_dir)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def _publish_model_files(checkpoint: Path, run_dir: Path) -> None:
    # Weights first, config last: a reader that sees the new config.json sees the new weights too.
    files = sorted((p for p in checkpoint.iterdir() if p.name != STATE_FILE), key=lambda p: p.name == "config.json")
    for src in files:
        tmp = run_dir / f".tmp-{src.name}-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)  # checkpoint files are never modified after the rename, so sharing is safe
        except OSError:
            shutil.copy2(src, tmp)
        os.replace(tmp, run_dir / src.name)


def load_training_state(checkpoint: Path) -> dict:
    try:
        return torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(f"cannot read {checkpoint / STATE_FILE} ({type(exc).__name__}: {exc})") from None
