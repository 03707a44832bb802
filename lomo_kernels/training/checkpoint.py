"""Run directories and checkpoints that survive crashes and damage.

Layout of a run directory::

    run.json                 the resolved options of the run (marks the directory as a run)
    metrics.jsonl            one JSON record per logged step / evaluation
    config.json, model.safetensors, tokenizer files
                             the latest good weights: transformers.AutoModelForCausalLM.from_pretrained(dir);
                             copies (own files, never hard links) of the newest checkpoint's
    checkpoints/step-NNNNNNNN/
                             the same model files + training_state.pt (optimizer state, data position,
                             RNG states, step) + manifest.json (each file's size and SHA-256, at save time)
    checkpoints/damaged-step-NNNNNNNN/
                             a checkpoint that failed verification at resume, set aside (safe to delete)
    loss_curve.png, summary.json   written at the end

Guarantees (docs/reliability.md):

* a checkpoint is written into ``checkpoints/.tmp-step-N-PID-*``, every file and the directory are
  fsync'd, and only then is it renamed to ``step-N`` (and the parent fsync'd); the top-level model
  files are replaced one by one (copy to a temporary, fsync, ``os.replace``): a crash at any point,
  SIGKILL included, leaves the previous checkpoint as the newest complete one and never a half-written
  one under a final name;
* what a crash leaves behind (``.tmp-*``) is removed when the run is next started or resumed;
* ``--resume`` verifies checkpoints newest first (recorded sizes and SHA-256, safetensors headers
  against the bytes that follow, the training state loads) and resumes from the newest intact one,
  naming each damaged one and setting it aside.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UsageError

RUN_FILE = "run.json"
STATE_FILE = "training_state.pt"
MANIFEST = "manifest.json"  # sizes and SHA-256 of a checkpoint's files, recorded at save time
TMP_PREFIX = ".tmp-"
CHECKPOINTS = "checkpoints"
_PREFIX = "step-"


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2))
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


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
    """Checkpoint directories (``step-N``, complete or damaged), oldest first; temporaries are never listed."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX):].isdigit()]
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
    only the newest ``keep`` checkpoints. ``save_tokenizer(dir)`` writes the tokenizer files.

    The files are written into ``checkpoints/.tmp-step-N-PID-*``, their sizes and SHA-256 recorded in
    ``manifest.json`` (written last), every file and the directory fsync'd, and only then is the
    directory renamed to ``step-N`` (and the parent fsync'd): a crash at any point leaves either no
    ``step-N`` or a complete one."""
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}-{os.getpid()}-", dir=root))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tmp)
        torch.save(training_state, tmp / STATE_FILE)
        files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir())
                 if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"format": 1, "step": step, "files": files}, indent=1))
        for p in tmp.iterdir():
            fsync_file(p)
        fsync_dir(tmp)
        if final.exists():  # a re-saved step (e.g. a resumed final step)
            _remove_atomically(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_model_files(final, run_dir)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        _remove_atomically(old)
    return final


def _remove_atomically(directory: Path) -> None:
    """Delete a checkpoint so that a crash part-way leaves no half-deleted one under its final name:
    rename it to a temporary first (removed at the next start if the deletion is interrupted)."""
    doomed = directory.with_name(f"{TMP_PREFIX}delete-{directory.name}-{os.getpid()}")
    if doomed.exists():
        shutil.rmtree(doomed)
    os.replace(directory, doomed)
    fsync_dir(directory.parent)
    shutil.rmtree(doomed)


def publish_model_files(checkpoint: Path, run_dir: Path) -> None:
    """Copy the checkpoint's model files (config, weights, tokenizer) to the top of ``run_dir``.

    Each is its own file (never a hard link, so damage to one copy leaves the other intact), written
    to a temporary name, fsync'd and renamed over the old one; weights first, config last, so a reader
    that sees the new config.json sees the new weights too."""
    files = sorted((p for p in checkpoint.iterdir() if p.is_file() and p.name not in (STATE_FILE, MANIFEST)),
                   key=lambda p: p.name == "config.json")
    for src in files:
        tmp = run_dir / f"{TMP_PREFIX}{src.name}-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        try:
            shutil.copyfile(src, tmp)
            fsync_file(tmp)
            os.replace(tmp, run_dir / src.name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    fsync_dir(run_dir)


def load_training_state(checkpoint: Path) -> dict:
    try:
        return torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(f"cannot read {checkpoint / STATE_FILE} ({type(exc).__name__}: {exc})") from None


# --- durability ------------------------------------------------------------------------------------

def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename into it, a new file) durable; a no-op where directories
    cannot be opened (not POSIX)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; the rename itself stands
        pass
    finally:
        os.close(fd)


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Remove what an interrupted save left behind (``checkpoints/.tmp-*`` directories, ``.tmp-*``
    files at the top of the run), except those of a process that is still running. Returns them."""
    removed = []
    for parent in (run_dir / CHECKPOINTS, run_dir):
        if not parent.is_dir():
            continue
        for p in parent.iterdir():
            if not p.name.startswith(TMP_PREFIX) or _owner_is_alive(p.name):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _owner_is_alive(name: str) -> bool:
    """Whether the process whose pid is in a temporary's name is another live process."""
    for part in name[len(TMP_PREFIX):].split("-"):
        if part.isdigit() and len(part) < 8:  # the pid field (step numbers have 8 digits)
            pid = int(part)
            if pid == os.getpid():
                return False
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
            return True
    return False


# --- verification ----------------------------------------------------------------------------------

@dataclass
class Intact:
    """A checkpoint that passed verification, with its training state already loaded."""

    path: Path
    state: dict
    checksummed: bool  # False: saved before manifests existed (structure checked, no checksum to compare)


def verify_checkpoint(checkpoint: Path) -> tuple[Intact | None, str]:
    """``(Intact, "")`` when every file the checkpoint recorded is there with its size and SHA-256, the
    safetensors headers describe exactly the bytes that follow them, and the training state loads;
    else ``(None, what is wrong)``."""
    manifest_path = checkpoint / MANIFEST
    recorded = None
    if manifest_path.exists():
        try:
            recorded = json.loads(manifest_path.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return None, f"{MANIFEST} is unreadable ({type(exc).__name__}: {exc})"
        for name, want in recorded.items():
            path = checkpoint / name
            if not path.is_file():
                return None, f"{name} is missing"
            size = path.stat().st_size
            if size != want["bytes"]:
                return None, f"{name} is {size} bytes, {want['bytes']} when saved (truncated or overwritten)"
    elif not (checkpoint / STATE_FILE).is_file():
        return None, f"{STATE_FILE} is missing (and there is no {MANIFEST})"
    weights = sorted(checkpoint.glob("*.safetensors"))
    if not weights:
        return None, "no model weights (*.safetensors)"
    for path in weights:
        problem = safetensors_problem(path)
        if problem:
            return None, f"{path.name}: {problem}"
    if recorded is not None:
        for name, want in recorded.items():
            if sha256_file(checkpoint / name) != want["sha256"]:
                return None, f"{name} does not match the SHA-256 recorded when it was saved (its bytes changed)"
    try:
        state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:
        return None, f"{STATE_FILE} does not load ({type(exc).__name__}: {exc})"
    if not isinstance(state, dict) or "step" not in state:
        return None, f"{STATE_FILE} holds no training step"
    return Intact(checkpoint, state, recorded is not None), ""


_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def safetensors_problem(path: Path) -> str:
    """What is wrong with a safetensors file's structure ("" if nothing): the 8-byte header length, the
    JSON header, and every tensor's byte range (inside the file, sized by dtype and shape, the ranges
    tiling the data exactly)."""
    size = path.stat().st_size
    if size < 8:
        return f"{size} bytes, shorter than the 8-byte header length"
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        if n > size - 8:
            return f"header length {n} exceeds the file's {size} bytes (truncated)"
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            return f"header is not valid JSON ({exc})"
    if not isinstance(header, dict):
        return "header is not a JSON object"
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            numel = math.prod(info["shape"])
            width = _DTYPE_BYTES.get(info["dtype"])
        except (KeyError, TypeError, ValueError):
            return f"header entry {name!r} is malformed"
        if width is not None and end - begin != numel * width:
            return f"tensor {name!r} spans {end - begin} bytes, its shape and dtype need {numel * width}"
        spans.append((begin, end))
    data = size - 8 - n
    spans.sort()
    at = 0
    for begin, end in spans:
        if begin != at:
            return f"tensor bytes do not tile the data (a gap or overlap at byte {begin})"
        at = end
    if at != data:
        return (f"the header describes {at} bytes of tensor data, the file holds {data}"
                + (" (truncated)" if data < at else " (trailing bytes)"))
    return ""


def newest_intact_checkpoint(run_dir: Path) -> tuple[Intact | None, list[tuple[Path, str]]]:
    """The newest checkpoint that verifies, and the newer ones that did not (each with its problem)."""
    damaged = []
    for checkpoint in reversed(checkpoint_dirs(run_dir)):
        intact, problem = verify_checkpoint(checkpoint)
        if intact is not None:
            return intact, damaged
        damaged.append((checkpoint, problem))
    return None, damaged


def set_aside(checkpoint: Path) -> Path:
    """Rename a damaged checkpoint out of the way (``damaged-step-N``), kept for inspection."""
    target = checkpoint.with_name(f"damaged-{checkpoint.name}")
    n = 1
    while target.exists():
        n += 1
        target = checkpoint.with_name(f"damaged-{checkpoint.name}-{n}")
    os.replace(checkpoint, target)
    fsync_dir(checkpoint.parent)
    return target
