"""Checkpoints survive damage and crashes: `--resume` verifies checkpoints (recorded sizes and SHA-256,
safetensors headers, the training state) and falls back to the newest intact one, naming the bad one;
the published model is its own file; files and directories are fsync'd before the rename; what a
SIGKILL mid-save leaves behind is removed at the next start; `--resume` below the step reached says so."""
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lomo_kernels.cli import EXIT_USAGE, main
from lomo_kernels.training import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny", "--seq-len", "16", "--batch-size", "2", "--no-progress", "--eval-every", "0",
        "--warmup-steps", "0", "--max-data-tokens", "4000", "--schedule", "constant"]  # lr independent of --steps


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps({"text": f"Line {i}: {'ab' * (i % 7)} and {i * i}."}) + "\n" for i in range(200)))
    return path


def _train(capsys, data_file, out, *argv):
    code = main(["train", *TINY, "--data", str(data_file), "--output", str(out), *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_file):
    """A 4-step run with checkpoints at steps 2 and 4, and the same run trained straight to 6 steps."""
    root = tmp_path_factory.mktemp("runs")
    common = ["train", *TINY, "--data", str(data_file), "--save-every", "2", "--keep-checkpoints", "3"]
    assert main([*common, "--steps", "4", "--output", str(root / "four")]) == 0
    assert main([*common, "--steps", "6", "--output", str(root / "six")]) == 0
    return root


@pytest.fixture
def run(runs, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(runs / "four", copy)
    return copy


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(a), load_file(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def tree(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None for p in sorted(directory.rglob("*"))}


# --- damage ----------------------------------------------------------------------------------------

def _truncate(path: Path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def _flip(path: Path, where: float):
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0xFF
    path.write_bytes(bytes(data))


def _flip_tensor_byte(path: Path):
    """One bit of one weight: the header and the size stay right, only the checksum can tell."""
    data = bytearray(path.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    data[8 + n + (len(data) - 8 - n) // 2] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated weights": (lambda c: _truncate(c / "model.safetensors"), "model.safetensors is .* bytes"),
    "flipped weight bit": (lambda c: _flip_tensor_byte(c / "model.safetensors"), "does not match the SHA-256"),
    "flipped header byte": (lambda c: _flip(c / "model.safetensors", 0.0005), "model.safetensors"),
    "deleted weights": (lambda c: (c / "model.safetensors").unlink(), "model.safetensors is missing"),
    "deleted training state": (lambda c: (c / ckpt.STATE_FILE).unlink(), "training_state.pt is missing"),
    "truncated training state": (lambda c: _truncate(c / ckpt.STATE_FILE, 0.9), "training_state.pt is .* bytes"),
    "deleted config": (lambda c: (c / "config.json").unlink(), "config.json is missing"),
    "garbled manifest": (lambda c: (c / ckpt.MANIFEST).write_text("{not json"), "manifest.json is unreadable"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_resume_falls_back_to_the_newest_intact_checkpoint_naming_the_bad_one(run, runs, data_file, capsys, case):
    damage, problem = DAMAGE[case]
    damage(step_dir(run, 4))
    code, out = _train(capsys, data_file, run, "--save-every", 2, "--keep-checkpoints", 3, "--steps", 6, "--resume")
    assert code == 0, out
    assert "checkpoint step-00000004 is damaged" in out and "resuming from step-00000002" in out
    assert pytest.importorskip("re").search(problem, out), out
    assert "from step 2 (step-00000002)" in out
    assert (run / "checkpoints" / "damaged-step-00000004").is_dir()  # set aside, not deleted
    # steps 3..6 recomputed from step 2: exactly the uninterrupted 6-step run
    assert same_weights(run / "model.safetensors", runs / "six" / "model.safetensors")
    intact, damaged = ckpt.newest_intact_checkpoint(run)
    assert intact.path.name == "step-00000006" and intact.state["step"] == 6 and damaged == []


def test_every_checkpoint_damaged_is_a_clear_error_naming_each(run, data_file, capsys):
    _truncate(step_dir(run, 4) / "model.safetensors")
    (step_dir(run, 2) / ckpt.STATE_FILE).unlink()
    before = tree(run)
    code, out = _train(capsys, data_file, run, "--save-every", 2, "--steps", 6, "--resume")
    assert code == EXIT_USAGE and "no intact checkpoint" in out and "Traceback" not in out
    assert "step-00000004: model.safetensors is" in out and "step-00000002: training_state.pt is missing" in out
    assert tree(run) == before  # nothing written


def test_damage_found_by_each_check_independently(tmp_path):
    """The structural check alone catches truncation (a checkpoint saved before manifests existed)."""
    good = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(10.0), "b": torch.ones(3, 4, dtype=torch.bfloat16)}, str(good))
    assert ckpt.safetensors_problem(good) == ""
    data = good.read_bytes()
    for cut, message in ((4, "shorter than the 8-byte"), (20, "exceeds the file"), (len(data) - 2, "truncated")):
        (tmp_path / "t.safetensors").write_bytes(data[:cut])
        assert message in ckpt.safetensors_problem(tmp_path / "t.safetensors")
    (tmp_path / "x.safetensors").write_bytes(data + b"\0\0")
    assert "trailing bytes" in ckpt.safetensors_problem(tmp_path / "x.safetensors")


def test_a_checkpoint_without_manifest_is_checked_structurally(run):
    legacy = step_dir(run, 4)
    (legacy / ckpt.MANIFEST).unlink()
    intact, problem = ckpt.verify_checkpoint(legacy)
    assert intact is not None and not intact.checksummed and problem == ""
    _truncate(legacy / "model.safetensors", 0.99)
    intact, problem = ckpt.verify_checkpoint(legacy)
    assert intact is None and "truncated" in problem


# --- the published model -----------------------------------------------------------------------------

def test_the_published_model_is_its_own_file_not_a_hard_link(tmp_path, data_file, capsys):
    run = tmp_path / "run"  # trained here: a copied run directory would not show hard links
    code, out = _train(capsys, data_file, run, "--steps", 2, "--save-every", 2)
    assert code == 0, out
    top, saved = run / "model.safetensors", step_dir(run, 2) / "model.safetensors"
    assert not top.is_symlink() and os.stat(top).st_ino != os.stat(saved).st_ino and os.stat(top).st_nlink == 1
    before = top.read_bytes()
    _flip_tensor_byte(saved)  # damage to the checkpoint leaves the published model intact
    assert top.read_bytes() == before
    for p in step_dir(run, 2).iterdir():
        if (run / p.name).exists():
            assert os.stat(run / p.name).st_nlink == 1, p.name


# --- durability ------------------------------------------------------------------------------------

def test_files_and_directory_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from lomo_kernels.training.presets import preset_config
    from lomo_kernels.training.tokenizer import save_byte_tokenizer

    events = []
    fsync, replace = os.fsync, os.replace

    def record_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def record_replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return replace(src, dst)

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "replace", record_replace)
    model = AutoModelForCausalLM.from_config(preset_config("tiny"))
    final = ckpt.save_checkpoint(tmp_path, 3, model, save_byte_tokenizer, {"step": 3}, keep=2)
    rename = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(final))
    tmp = Path(events[rename][1])
    synced_before = {Path(e[1]) for e in events[:rename] if e[0] == "fsync"}
    assert {tmp / p.name for p in final.iterdir()} | {tmp} <= synced_before  # every file, and the directory
    assert ("fsync", str(tmp_path / "checkpoints")) in events[rename:]        # the rename itself
    for p in final.iterdir():                                                 # published: fsync'd, then renamed
        if p.name not in (ckpt.STATE_FILE, ckpt.MANIFEST):
            i = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(tmp_path / p.name))
            assert ("fsync", events[i][1]) in events[:i], p.name
    manifest = json.loads((final / ckpt.MANIFEST).read_text())
    assert set(manifest["files"]) == {p.name for p in final.iterdir()} - {ckpt.MANIFEST}
    assert all(v["sha256"] == ckpt.sha256_file(final / k) for k, v in manifest["files"].items())


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_stale_temporaries_are_removed_at_start(run, data_file, capsys):
    pid = _dead_pid()
    stale_dir = run / "checkpoints" / f".tmp-step-00000006-{pid}-abcd1234"
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"\0" * 100_000)
    stale_file = run / f".tmp-model.safetensors-{pid}"
    stale_file.write_bytes(b"\0" * 1000)
    live_dir = run / "checkpoints" / f".tmp-step-00000008-{os.getppid()}-abcd1234"  # a live process's save
    live_dir.mkdir()
    code, out = _train(capsys, data_file, run, "--save-every", 2, "--steps", 6, "--resume")
    assert code == 0, out
    assert not stale_dir.exists() and not stale_file.exists() and "interrupted save left behind" in out
    assert live_dir.exists()


# --- --resume below the step reached -----------------------------------------------------------------

def test_resume_with_steps_below_the_step_reached_says_so(run, data_file, capsys):
    before = tree(run)
    code, out = _train(capsys, data_file, run, "--steps", 3, "--resume")
    assert code == EXIT_USAGE and "already reached step 4" in out and "--steps 3" in out and "Traceback" not in out
    assert tree(run) == before
    code, out = _train(capsys, data_file, run, "--steps", 4, "--resume")  # at the end already: says so, exit 0
    assert code == 0 and "nothing to train" in out


# --- SIGKILL mid-save --------------------------------------------------------------------------------

_KILLED_SAVE = textwrap.dedent("""
    import shutil, sys, time
    import lomo_kernels.training.checkpoint as ckpt
    from lomo_kernels.cli import main

    where, step = sys.argv[1], int(sys.argv[2])
    torch_save, copyfile = ckpt.torch.save, ckpt.shutil.copyfile
    saves = []

    def hang(what):
        print("HANGING IN", what, flush=True)
        time.sleep(120)

    def save(obj, path, *a, **k):          # mid-checkpoint: weights written, training state half written
        if obj.get("step") == step and where == "checkpoint":
            open(path, "wb").write(b"partial")
            hang("checkpoint")
        return torch_save(obj, path, *a, **k)

    def copy(src, dst, *a, **k):           # mid-publish: the new weights half copied to the top level
        if where == "publish" and str(src).endswith(f"step-{step:08d}/model.safetensors"):
            data = open(src, "rb").read()
            open(dst, "wb").write(data[:len(data) // 2])
            hang("publish")
        return copyfile(src, dst, *a, **k)

    rmtree = ckpt.shutil.rmtree

    def remove(path, *a, **k):             # mid-prune: the oldest checkpoint half deleted
        if where == "prune" and "step-00000002" in str(path):
            next(p for p in __import__("pathlib").Path(path).iterdir() if p.name.endswith(".safetensors")).unlink()
            hang("prune")
        return rmtree(path, *a, **k)

    ckpt.torch.save, ckpt.shutil.copyfile, ckpt.shutil.rmtree = save, copy, remove
    sys.exit(main(sys.argv[3:]))
""")


@pytest.mark.parametrize("where", ["checkpoint", "publish", "prune"])
def test_sigkill_during_a_save_loses_nothing(runs, tmp_path, data_file, capsys, where):
    run = tmp_path / "run"
    keep = "1" if where == "prune" else "3"  # prune: saving step 4 deletes step 2
    argv = ["train", *TINY, "--data", str(data_file), "--save-every", "2", "--keep-checkpoints", keep,
            "--steps", "4", "--output", str(run)]
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, where, "4", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        for line in proc.stdout:
            if line.startswith("HANGING IN"):
                break
        else:
            pytest.fail("the training subprocess ended before its step-4 save")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")] + \
                [p.name for p in run.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers  # the kill really interrupted a save
    # never a half-written checkpoint under its final name, and the published model is complete
    intact, damaged = ckpt.newest_intact_checkpoint(run)
    assert damaged == [] and intact.state["step"] == (2 if where == "checkpoint" else 4)
    assert all(ckpt.verify_checkpoint(c)[0] is not None for c in ckpt.checkpoint_dirs(run))
    assert ckpt.safetensors_problem(run / "model.safetensors") == ""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run)  # the top level loads: the previous weights, whole

    code, out = _train(capsys, data_file, run, "--save-every", 2, "--keep-checkpoints", 3, "--steps", 6, "--resume")
    assert code == 0, out
    assert not [p for p in run.rglob(".tmp-*")]
    assert same_weights(run / "model.safetensors", runs / "six" / "model.safetensors")


def test_sigkill_at_random_moments_of_a_saving_run_never_leaves_a_bad_checkpoint(tmp_path, data_file, capsys):
    """No hooks: a run that saves every step, killed at three different moments; after each kill every
    checkpoint verifies, the top level loads, and a resume continues."""
    import random

    run = tmp_path / "run"
    argv = [sys.executable, "-m", "lomo_kernels", "train", *TINY, "--data", str(data_file), "--save-every", "1",
            "--keep-checkpoints", "2", "--steps", "100000", "--output", str(run)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    rng = random.Random(0)
    for attempt in range(3):
        proc = subprocess.Popen(argv + (["--resume"] if attempt else []), cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            reached = ckpt.latest_checkpoint(run)
            for _ in range(600):  # wait for this process's first new checkpoint
                time.sleep(0.05)
                if ckpt.latest_checkpoint(run) not in (None, reached):
                    break
            time.sleep(rng.uniform(0.0, 0.3))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        intact, damaged = ckpt.newest_intact_checkpoint(run)
        assert intact is not None and damaged == [], damaged
        assert all(ckpt.verify_checkpoint(c)[0] is not None for c in ckpt.checkpoint_dirs(run))
        assert ckpt.safetensors_problem(run / "model.safetensors") == ""
    code, out = _train(capsys, data_file, run, "--save-every", 1, "--keep-checkpoints", 2, "--resume",
                       "--steps", intact.state["step"] + 1)
    assert code == 0, out
    assert not list(run.rglob(".tmp-*"))
