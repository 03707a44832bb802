"""`lomo-kernels train` end to end on a tiny model: train, resume exactly, load with transformers; bad input."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lomo_kernels.cli import EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_OS, EXIT_USAGE, build_parser, main
from lomo_kernels.training.data import BatchOrder
from lomo_kernels.training.optimizers import DEFAULT_CLIP_VALUE, DEFAULT_LR

TINY = ["--model", "tiny", "--seq-len", "32", "--batch-size", "4", "--no-progress", "--eval-every", "0",
        "--warmup-steps", "0"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """Prompt/completion records plus plain text records, a few thousand tokens."""
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    records = []
    for i in range(60):
        a, b = (7 * i) % 50, (13 * i) % 50
        records.append({"prompt": f"{a} plus {b} is", "completion": f" {a + b}."})
        records.append({"text": f"The number {i} is {'even' if i % 2 == 0 else 'odd'}."})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def train(capsys, *argv):
    code = main(["train", *TINY, *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def train_losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["type"] == "train"}


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model.safetensors")


RESUME_CASES = {
    "lomo": ("lomo", []),
    "lomo-bf16": ("lomo", ["--dtype", "bf16"]),  # stochastic rounding: its seed sequence must resume too
    "adamw": ("adamw", ["--lr", "0.01"]),        # the fused AdamW: m, v and the bias-correction step
    "torch-adamw": ("torch-adamw", ["--lr", "0.01"]),
    # projections refreshed at steps 0, 2, 4 (the refresh after the resume needs the advanced seeds), the
    # limiter's previous norms, the norm phase of global-norm clipping
    "apollo": ("apollo", ["--apollo-rank", "4", "--apollo-update-proj-gap", "2", "--clip-grad-norm", "1.0"]),
    # HiFT: position in the cycle (step 3 of 4 groups), the next cycle's permutation, per-group clocks and states
    "hift-adamw": ("adamw", ["--lr", "0.01", "--hift-group-size", "1", "--hift-strategy", "random"]),
    "hift-apollo": ("apollo", ["--apollo-rank", "4", "--hift-group-size", "1", "--hift-strategy", "up2down"]),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_train_resume_exactly_and_load_with_transformers(tmp_path, data_file, capsys, monkeypatch, case):
    optimizer, extra = RESUME_CASES[case]
    full, part = tmp_path / "full", tmp_path / "part"
    common = ["--data", data_file, "--optimizer", optimizer, "--save-every", 3, "--steps", 6, *extra]
    code, out, err = train(capsys, *common, "--output", full)
    assert code == 0, err
    assert f"outputs in {full.resolve()}" in out

    # the same run, interrupted while drawing the batch of step 5 (after the checkpoint of step 3)
    draw = BatchOrder.next_batch
    calls = []

    def interrupted(self):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return draw(self)

    monkeypatch.setattr(BatchOrder, "next_batch", interrupted)
    code, _, err = train(capsys, *common, "--output", part)
    assert code == EXIT_INTERRUPTED and "Traceback" not in err
    monkeypatch.undo()
    assert [p.name for p in (part / "checkpoints").iterdir()] == ["step-00000003"]
    code, out, err = train(capsys, *common, "--output", part, "--resume")
    assert code == 0, err
    assert "resuming" in out and "from step 3" in out

    losses = train_losses(full)
    assert list(losses) == [1, 2, 3, 4, 5, 6]
    assert losses[6] < losses[1]
    if "--hift-group-size" in extra:  # per_cycle: the lr is held for each cycle of the 4 groups
        lrs = [r["lr"] for r in map(json.loads, (full / "metrics.jsonl").read_text().splitlines())
               if r["type"] == "train"]
        assert lrs[:4] == [lrs[0]] * 4 and lrs[4] == lrs[5] < lrs[0]
    assert train_losses(part) == losses  # the resumed run sees the same batches and computes the same losses
    uninterrupted, resumed = weights(full), weights(part)
    assert uninterrupted.keys() == resumed.keys()
    for name in uninterrupted:
        assert torch.equal(uninterrupted[name], resumed[name]), name

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(full)
    for name, param in model.state_dict().items():
        assert torch.equal(param, uninterrupted[name].to(param.dtype)), name
    tokenizer = AutoTokenizer.from_pretrained(full)
    ids = torch.tensor([tokenizer("1 plus 2 is", add_special_tokens=False)["input_ids"]])
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
    summary = json.loads((full / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["first_loss"] == losses[1]
    assert (full / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_metrics_schedule_clipping_and_activation_checkpointing(tmp_path, data_file, capsys):
    run = tmp_path / "run"
    code, out, err = train(capsys, "--data", data_file, "--steps", 4, "--eval-every", 2, "--schedule", "linear",
                           "--warmup-steps", 1, "--clip-grad-norm", 1.0, "--clip-grad-value", 0.5,
                           "--weight-decay", 0.01, "--gradient-checkpointing", "--output", run)
    assert code == 0, err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(abs(r["eval_perplexity"] - torch.tensor(r["eval_loss"]).exp().item()) < 1e-3 for r in evals)
    train_records = [r for r in records if r["type"] == "train"]
    assert all(r["grad_norm"] is not None and r["grad_norm"] > 0 for r in train_records)  # clipping measured it
    assert all(r["tokens_per_s"] > 0 and r["peak_memory_mb"] > 0 for r in train_records)
    assert "held-out loss / perplexity" in out


@pytest.mark.parametrize("optimizer", ["adalomo", "sgd", "adamw", "torch-adamw", "apollo", "apollo-mini", "lomo-optim"])
def test_the_other_optimizers_train_with_their_default_lr(tmp_path, data_file, capsys, optimizer):
    run = tmp_path / "run"
    code, out, err = train(capsys, "--data", data_file, "--optimizer", optimizer, "--steps", 4, "--output", run)
    assert code == 0, err
    losses = train_losses(run)
    assert losses[4] < losses[1]
    options = json.loads((run / "run.json").read_text())["options"]
    assert (options["optimizer"], options["lr"]) == (optimizer, DEFAULT_LR[optimizer])
    assert options["clip_grad_value"] == DEFAULT_CLIP_VALUE.get(optimizer, 0.0)  # resolved, stored
    if optimizer == "apollo":  # the default rank 256 is capped by the tiny model's 32-wide weights, and said so
        assert options["apollo_rank"] == 32 and options["apollo_update_proj_gap"] == 200
        assert "the default 256 exceeds the smallest dimension of the projected weights (32" in out


def test_hift_bf16_gradient_checkpointing_and_norm_clipping(tmp_path, data_file, capsys):
    run = tmp_path / "run"
    code, out, err = train(capsys, "--data", data_file, "--optimizer", "adalomo", "--hift-group-size", 2,
                           "--hift-lr-schedule", "per_step", "--dtype", "bf16", "--gradient-checkpointing",
                           "--clip-grad-norm", 1.0, "--rounding", "nearest", "--steps", 3, "--output", run)
    assert code == 0, err
    assert "HiFT over adalomo (2 layers per group, down2up, lr per step)" in out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] is not None for r in records if r["type"] == "train")  # the group's norm phase
    state = torch.load(run / "checkpoints" / "step-00000003" / "training_state.pt", weights_only=True)
    assert state["optimizer"]["hift"]["step"] == 3 and state["optimizer"]["hift"]["group_steps"] == [1, 1, 1]


def test_resume_a_run_from_when_adamw_meant_torch_adamw(tmp_path, data_file, capsys):
    run = tmp_path / "run"
    assert train(capsys, "--data", data_file, "--optimizer", "torch-adamw", "--steps", 2, "--output", run)[0] == 0
    info = json.loads((run / "run.json").read_text())
    info["options"].update(optimizer="adamw", clip_grad_value=None)  # as such a run wrote it (0 was None)
    for key in [k for k in info["options"] if k.startswith(("apollo_", "hift_"))]:
        del info["options"][key]
    (run / "run.json").write_text(json.dumps(info))
    code, _, err = train(capsys, "--data", data_file, "--steps", 3, "--output", run, "--resume")
    assert code == 0, err
    assert "resuming it as torch-adamw" in err
    options = json.loads((run / "run.json").read_text())["options"]
    assert options["optimizer"] == "torch-adamw" and options["clip_grad_value"] == 0.0


def test_max_minutes_stops_early_with_a_checkpoint(tmp_path, data_file, capsys):
    run = tmp_path / "run"
    code, out, err = train(capsys, "--data", data_file, "--steps", 50, "--max-minutes", 1e-6, "--output", run)
    assert code == 0, err
    assert "stopped after step 1 of 50" in out + err
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000001"]


def test_a_full_disk_is_reported_without_traceback(tmp_path, data_file, capsys, monkeypatch):
    import lomo_kernels.training.checkpoint as ckpt

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    code, _, err = train(capsys, "--data", data_file, "--steps", 1, "--output", tmp_path / "run")
    assert code == EXIT_OS and "No space left on device" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints" / "step-00000001").exists()


def test_config_file_sets_options_and_the_command_line_wins(tmp_path, data_file, capsys):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(f"data: [{data_file}]\nsteps: 5\nseq_len: 16\nprogress: false\n")
    code, _, err = train(capsys, "--config", yaml_file, "--steps", 2, "--output", tmp_path / "a")
    assert code == 0, err
    options = json.loads((tmp_path / "a" / "run.json").read_text())["options"]
    assert options["steps"] == 2 and options["seq_len"] == 32  # TINY's --seq-len 32 is on the command line too
    toml_file = tmp_path / "run.toml"
    toml_file.write_text(f'data = ["{data_file}"]\nsteps = 2\nmax_eval_sequences = 3\n')
    assert train(capsys, "--config", toml_file, "--output", tmp_path / "b")[0] == 0
    options = json.loads((tmp_path / "b" / "run.json").read_text())["options"]
    assert options["steps"] == 2 and options["max_eval_sequences"] == 3


def test_overwrite_replaces_a_run(tmp_path, data_file, capsys):
    run = tmp_path / "run"
    assert train(capsys, "--data", data_file, "--steps", 2, "--output", run)[0] == 0
    assert train(capsys, "--data", data_file, "--steps", 3, "--output", run, "--overwrite")[0] == 0
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000003"]
    assert list(train_losses(run)) == [1, 2, 3]


# --- bad input: a clear message, exit status 2, no traceback, nothing written --------------------------

def snapshot(directory: Path) -> dict:
    if not directory.exists():
        return {}
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(directory.rglob("*"))}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_file) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *TINY, "--data", str(data_file), "--steps", "2", "--output", str(run)]) == 0
    return run


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


BAD_INPUT = {
    "missing data": (lambda t, d: ["--data", t / "nope.jsonl"], "data path .*nope.jsonl does not exist"),
    "empty data": (lambda t, d: ["--data", _write(t / "empty.txt", "")], "no text found in"),
    "malformed JSONL": (lambda t, d: ["--data", _write(t / "bad.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": \n')],
                        "bad.jsonl line 3: not valid JSON"),
    "JSONL without text": (lambda t, d: ["--data", _write(t / "odd.jsonl", '{"text": "a"}\n{"body": "b"}\n')],
                           "odd.jsonl line 2: expected an object with a \"text\" field"),
    "model dir without config": (lambda t, d: ["--data", d, "--model", (t / "m").mkdir() or t / "m"],
                                 "is not a Hugging Face model directory"),
    "unknown model name": (lambda t, d: ["--data", d, "--model", "gigantic"], "not a built-in model"),
    "seq-len beyond positions": (lambda t, d: ["--data", d, "--seq-len", 300], "--seq-len 300 exceeds the model's 256 positions"),
    "unknown option": (lambda t, d: ["--data", d, "--frobnicate"], "unrecognized arguments: --frobnicate"),
    "bad option value": (lambda t, d: ["--data", d, "--lr", "fast"], "argument --lr: invalid float value"),
    "zero batch size": (lambda t, d: ["--data", d, "--batch-size", 0], "--batch-size must be > 0"),
    "fp16 with sgd": (lambda t, d: ["--data", d, "--optimizer", "sgd", "--dtype", "fp16"], "needs loss scaling"),
    "fp16 with torch-adamw": (lambda t, d: ["--data", d, "--optimizer", "torch-adamw", "--dtype", "fp16"],
                              "needs loss scaling"),
    "rounding with sgd": (lambda t, d: ["--data", d, "--optimizer", "sgd", "--rounding", "nearest"],
                          "--rounding only applies to the fused optimizers"),
    "apollo value clipping": (lambda t, d: ["--data", d, "--optimizer", "apollo", "--clip-grad-value", "0.1"],
                              "apollo cannot clip gradient values .*use --clip-grad-norm"),
    "apollo rank too large": (lambda t, d: ["--data", d, "--optimizer", "apollo", "--apollo-rank", "64"],
                              r"--apollo-rank 64 exceeds the smallest dimension .* \(32: .*pass --apollo-rank 32"),
    "apollo option without apollo": (lambda t, d: ["--data", d, "--apollo-rank", "4"],
                                     "--apollo-rank only applies to --optimizer apollo or apollo-mini, not lomo"),
    "apollo-mini rank": (lambda t, d: ["--data", d, "--optimizer", "apollo-mini", "--apollo-rank", "4"],
                         "apollo-mini is APOLLO with rank 1"),
    "hift over a torch optimizer": (lambda t, d: ["--data", d, "--optimizer", "torch-adamw", "--hift-group-size", "1"],
                                    "--optimizer torch-adamw keeps whole gradients and cannot be wrapped"),
    "hift group too large": (lambda t, d: ["--data", d, "--hift-group-size", "3"],
                             r"--hift-group-size 3: group_size must be between 1 and the number of decoder layers \(2"),
    "hift strategy alone": (lambda t, d: ["--data", d, "--hift-strategy", "random"], "needs --hift-group-size"),
    "hift group size zero": (lambda t, d: ["--data", d, "--hift-group-size", "0"], "must be >= 1"),
    "unknown config key": (lambda t, d: ["--data", d, "--config", _write(t / "c.yaml", "lr: 1\nlearning_rat: 2\n")],
                           "unknown option 'learning_rat'"),
    "resume nothing": (lambda t, d: ["--data", d, "--resume"], "holds no run to resume"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_refused_before_anything_is_written(tmp_path, data_file, capsys, case):
    make_argv, message = BAD_INPUT[case]
    output = tmp_path / "out"
    code, out, err = train(capsys, *make_argv(tmp_path, data_file), "--steps", 2, "--output", output)
    assert code == EXIT_USAGE
    assert "Traceback" not in err + out
    assert pytest.importorskip("re").search(message, err), err
    assert not output.exists()


@pytest.mark.parametrize("argv, message", [
    ([], "already holds a run; pass --resume to continue it or --overwrite"),
    (["--resume", "--lr", "0.1"], "--resume continues the same run, but --lr is 0.1"),
    (["--resume", "--overwrite"], "contradict"),
    (["--overwrite", "--data", "/nonexistent/file"], "does not exist"),  # checked before the old run is removed
])
def test_a_run_in_the_output_directory_is_never_clobbered(finished_run, data_file, capsys, argv, message):
    before = snapshot(finished_run)
    code, out, err = train(capsys, "--data", data_file, "--steps", 4, "--output", finished_run, *argv)
    assert code == EXIT_USAGE and message in err and "Traceback" not in err
    assert snapshot(finished_run) == before


def test_a_directory_of_other_files_is_refused_even_with_overwrite(tmp_path, data_file, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = train(capsys, "--data", data_file, "--output", tmp_path, "--overwrite")
    assert code == EXIT_USAGE and "holds no lomo-kernels run" in err
    assert snapshot(tmp_path) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, data_file, capsys):
    run = tmp_path / "run"
    # lr 1e30: the weights overflow after a couple of steps and the loss becomes NaN
    code, out, err = train(capsys, "--data", data_file, "--lr", "1e30", "--steps", 20, "--save-every", 1,
                           "--output", run)
    assert code == EXIT_DIVERGED and "Traceback" not in err
    assert "training stopped" in err and "last good checkpoint" in err
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    last_step = int(checkpoints[-1].split("-")[1])
    nan_step = max(train_losses(run)) + 1
    assert f"the loss is nan at step {nan_step}" in err and last_step == nan_step - 1
    assert torch.load(run / "checkpoints" / checkpoints[-1] / "training_state.pt", weights_only=True)["step"] == last_step


def test_every_option_is_documented():
    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    for action in train_parser._actions:
        assert action.help and len(action.help) > 10, action.option_strings


def test_python_dash_m_entry_point():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "lomo_kernels", "train", "--bogus"], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)
    assert done.returncode == EXIT_USAGE
    assert "unrecognized arguments: --bogus" in done.stderr and "Traceback" not in done.stderr


def test_help_shows_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    shown = capsys.readouterr().out
    assert done.value.code == 0 and "(default: lomo)" in shown and "(default: runs/default)" in shown
    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    for action in train_parser._actions:
        assert all(flag in shown for flag in action.option_strings)


def test_no_arguments_runs_the_embedded_default(monkeypatch, capsys):
    import lomo_kernels.cli as cli

    seen = {}
    monkeypatch.setattr(cli, "run_training", lambda args, explicit: seen.update(args=args, explicit=explicit))
    assert main([]) == 0
    args = seen["args"]
    assert (args.model, args.data, args.optimizer, args.output) == ("small", None, "lomo", "runs/default")
    assert seen["explicit"] == set()
    assert "running the default" in capsys.readouterr().out


def test_plan_subcommand_is_wired_to_the_memory_planner(capsys):
    with pytest.raises(SystemExit) as done:
        main(["plan", "--help"])
    assert done.value.code == 0 and "--method" in capsys.readouterr().out


@pytest.mark.parametrize("example", ["train_plain_loop.py", "train_hf_trainer.py"])
def test_python_examples_train_and_save_a_loadable_model(tmp_path, example):
    from transformers import AutoModelForCausalLM

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "python" / example), "--steps", "12", "--batch-size", "2",
                           "--seq-len", "16", "--max-data-tokens", "20000", "--output", str(tmp_path / "m")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "held-out loss" in done.stdout
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fine_tune_a_local_model_directory_then_resume(tmp_path, finished_run, data_file, capsys):
    run = tmp_path / "ft"
    common = ["--data", data_file, "--model", finished_run, "--save-every", 1, "--keep-checkpoints", 1]
    code, out, err = train(capsys, *common, "--steps", 2, "--output", run)
    assert code == 0, err
    assert f"model {finished_run}" in out
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(run)("héllo", add_special_tokens=False)["input_ids"] == list("héllo".encode())
    code, out, err = train(capsys, *common, "--steps", 3, "--output", run, "--resume")
    assert code == 0, err
    assert list(train_losses(run)) == [1, 2, 3]
    assert json.loads((run / "run.json").read_text())["model_source"] == {"kind": "path", "spec": str(finished_run)}


# --- small traps (issue 10, item 5) ------------------------------------------------------------------

def test_a_short_run_warms_up_for_a_tenth_of_its_steps(tmp_path, data_file, capsys):
    no_warmup = TINY[:TINY.index("--warmup-steps")] + TINY[TINY.index("--warmup-steps") + 2:]
    run = tmp_path / "run"
    assert main(["train", *no_warmup, "--data", str(data_file), "--steps", "5", "--output", str(run)]) == 0, \
        capsys.readouterr().err
    assert json.loads((run / "run.json").read_text())["options"]["warmup_steps"] == 0
    code, _, err = train(capsys, "--data", data_file, "--steps", 5, "--warmup-steps", 6, "--output", tmp_path / "b")
    assert code == EXIT_USAGE and "--warmup-steps (6) exceeds --steps (5)" in err  # an explicit one is still checked


def test_an_unreadable_data_directory_is_named_permission_denied(tmp_path, data_file, capsys, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("text")
    scandir = os.scandir

    def refuse(path="."):
        if Path(path) == data:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)
    code, out, err = train(capsys, "--data", data, "--steps", 1, "--output", tmp_path / "run")
    assert code == EXIT_USAGE and f"data directory {data}: permission denied" in err
    assert "holds no files" not in err and "Traceback" not in err and not (tmp_path / "run").exists()


def test_a_permission_error_while_writing_is_named_as_such(tmp_path, data_file, capsys, monkeypatch):
    import lomo_kernels.training.checkpoint as ckpt

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "run" / "checkpoints"))

    monkeypatch.setattr(ckpt.torch, "save", refuse)
    code, _, err = train(capsys, "--data", data_file, "--steps", 1, "--output", tmp_path / "run")
    assert code == EXIT_OS and "permission denied" in err and "Traceback" not in err


@pytest.mark.parametrize("value", ["-5", "0", "nan", "inf", "lots"])
def test_plan_refuses_a_gpu_size_that_is_not_positive(capsys, value):
    assert main(["plan", "--model", "llama-7b", "--gpu-gib", value]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--gpu-gib" in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["--help"], ["plan", "--help"], ["train", "--help"]])
def test_help_lists_the_exit_statuses(capsys, argv):
    with pytest.raises(SystemExit) as done:
        main(argv)
    shown = " ".join(capsys.readouterr().out.split())
    assert done.value.code == 0 and "exit status" in shown
    if argv[0] != "train":
        assert "1 a method does not fit in --gpu-gib" in shown and "2 bad input" in shown
    if argv[0] != "plan":
        assert "3 the loss became NaN/inf" in shown and "130 interrupted" in shown


@pytest.mark.parametrize("optimizer", ["lomo", "adamw"])
def test_fused_cross_entropy_on_equals_off_on_the_default_model(tmp_path, capsys, optimizer):
    """The default model (small preset, its default batch and sequence length), 2 steps: the loss with the
    LM head's update fused into the cross-entropy equals the logits path's within 1e-5, and so do the weights."""
    from lomo_kernels.training.optimizers import takes_fused_cross_entropy

    if not takes_fused_cross_entropy(optimizer):
        pytest.skip(f"{optimizer} takes no fused_cross_entropy yet")
    runs = {}
    for flag in ("--fused-cross-entropy", "--no-fused-cross-entropy"):
        run = tmp_path / flag.strip("-")
        code = main(["train", "--optimizer", optimizer, flag, "--steps", "2", "--max-data-tokens", "100000",
                     "--no-progress", "--eval-every", "0", "--output", str(run)])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert ("fused cross-entropy on" in out) == (flag == "--fused-cross-entropy"), out
        runs[flag] = run
    on, off = (train_losses(runs[f]) for f in ("--fused-cross-entropy", "--no-fused-cross-entropy"))
    assert list(on) == [1, 2]
    for step in on:
        assert abs(on[step] - off[step]) <= 1e-5 * abs(off[step]), (step, on[step], off[step])
    a, b = weights(runs["--fused-cross-entropy"]), weights(runs["--no-fused-cross-entropy"])
    lr = DEFAULT_LR[optimizer] * (1 if optimizer == "lomo" else 2)  # AdamW: a step moves a weight by <= ~lr
    for name in b:  # AdamW's normalized step turns round-off in near-zero gradients into visible steps: vs lr
        tol = 1e-6 if optimizer == "lomo" else 1e-2 * lr
        assert (a[name] - b[name]).abs().max() <= tol, (name, (a[name] - b[name]).abs().max())


@pytest.mark.parametrize("hift", [[], ["--hift-group-size", "1"]], ids=["plain", "hift"])
def test_explicit_fused_cross_entropy_that_cannot_engage_is_refused(tmp_path, capsys, monkeypatch, hift):
    """--fused-cross-entropy typed for a model whose loss is not verified: exit 2 naming why, before any write
    (left out, the run takes the model's own loss and its header says why); HiFT says its optimizer's reason."""
    from lomo_kernels.integrations import causal_lm_loss

    monkeypatch.setattr(causal_lm_loss, "FUSED_LOSS_CLASSES", {})
    run = tmp_path / "run"
    code = main(["train", "--optimizer", "lomo", "--fused-cross-entropy", "--steps", "1", "--max-data-tokens",
                 "20000", "--no-progress", "--eval-every", "0", "--output", str(run), *hift])
    err = capsys.readouterr().err
    assert code == 2 and "--fused-cross-entropy does not apply" in err and "verified" in err, err
    assert not run.exists()
