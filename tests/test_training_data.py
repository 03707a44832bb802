"""Data reading, packing, splitting and ordering; the byte tokenizer; lr schedules; atomic checkpoints."""
import json
import math
import os
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from lomo_kernels.training import checkpoint as ckpt
from lomo_kernels.training.data import (IGNORE_INDEX, BatchOrder, Document, TokenizerAdapter, pack, read_documents,
                                        split_eval, stdlib_source_files)
from lomo_kernels.training.errors import UsageError
from lomo_kernels.training.tokenizer import ByteTokenizer, save_byte_tokenizer
from lomo_kernels.training.trainer import lr_at

BYTES = TokenizerAdapter(ByteTokenizer())
BOS, EOS, PAD = ByteTokenizer.bos_id, ByteTokenizer.eos_id, ByteTokenizer.pad_id


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_prompt_completion_packs_with_loss_on_the_completion_only():
    docs = [Document(" 42.", prompt="6 times 7 is"), Document("hi")]
    data = pack(docs, BYTES, seq_len=8)
    stream = [BOS, *b"6 times 7 is", *b" 42.", EOS, BOS, *b"hi", EOS]
    counted = [False] * 13 + [True] * 5 + [False] + [True] * 3
    n_blocks = math.ceil(len(stream) / 8)
    padded = stream + [PAD] * (n_blocks * 8 - len(stream))
    counted += [False] * (len(padded) - len(counted))
    expected_tokens = torch.tensor(padded).view(n_blocks, 8)
    expected_labels = torch.where(torch.tensor(counted).view(n_blocks, 8), expected_tokens, IGNORE_INDEX)
    # the first block is prompt only: nothing to train on, so it is dropped
    assert torch.equal(data.tokens, expected_tokens[1:])
    assert torch.equal(data.labels, expected_labels[1:])


def test_max_tokens_truncates_the_stream():
    data = pack([Document("a" * 100), Document("b" * 100)], BYTES, seq_len=10, max_tokens=25)
    assert data.tokens.numel() == 30 and int((data.tokens == ord("b")).sum()) == 0
    assert int((data.labels != IGNORE_INDEX).sum()) == 25 - 1  # bos is not a target


def test_data_without_any_target_is_refused():
    no_eos = TokenizerAdapter(ByteTokenizer())
    no_eos.eos_id = None  # as with a tokenizer that has no eos token: empty completions leave no target
    with pytest.raises(UsageError, match="no token to train on"):
        pack([Document("", prompt="just a prompt")], no_eos, seq_len=4)
    with pytest.raises(UsageError, match="no text found in here"):
        pack([Document("")], BYTES, seq_len=4, source="here")


@pytest.mark.parametrize("lines, message", [
    (['{"text": "ok"}', '{"text": "ok"}', '{"text": "unterminated'], "line 3: not valid JSON"),
    (['{"text": "ok"}', '{"foo": 1}'], "line 2: expected an object"),
    (['["text"]'], "line 1: expected an object .* got a JSON list"),
    (['{"text": 5}'], 'line 1: "text" must be a string'),
    (['{"prompt": "a", "completion": null}'], 'line 1: "completion" must be a string'),
])
def test_malformed_jsonl_names_the_line(tmp_path, lines, message):
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    with pytest.raises(UsageError, match=message):
        list(read_documents([str(path)]))


def test_directory_reading_skips_hidden_and_parses_jsonl(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / ".hidden").write_text("secret")
    write_jsonl(tmp_path / "sub" / "b.jsonl", [{"prompt": "p", "completion": "c"}, "", {"text": "t"}])
    docs = list(read_documents([str(tmp_path)]))
    assert docs == [Document("alpha"), Document("c", prompt="p"), Document("t")]


def test_non_utf8_and_missing_paths_are_refused(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"ok \xff\xfe")
    with pytest.raises(UsageError, match="bin.txt: not UTF-8"):
        list(read_documents([str(tmp_path / "bin.txt")]))
    with pytest.raises(UsageError, match="does not exist"):
        list(read_documents([str(tmp_path / "nope")]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="holds no files"):
        list(read_documents([str(tmp_path / "empty")]))


def _deny(monkeypatch, denied: Path):
    """The file system refuses ``denied`` (listing a directory, opening a file), as for another user's
    unreadable path; chmod alone does not do it when the tests run as root."""
    import builtins
    import io

    scandir, open_ = os.scandir, io.open

    def refuse(path):
        if isinstance(path, (str, Path)) and Path(path) == denied:
            raise PermissionError(13, "Permission denied", str(path))

    def guarded_open(file, *args, **kwargs):
        refuse(file)
        return open_(file, *args, **kwargs)

    monkeypatch.setattr(os, "scandir", lambda path=".": refuse(path) or scandir(path))
    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_open)


def test_unreadable_data_is_named_permission_denied_not_empty(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text("some text")
    (data / "sub" / "b.jsonl").write_text('{"text": "x"}\n')
    for denied, kind in ((data, "directory"), (data / "sub", "directory"), (data / "a.txt", "file"),
                         (data / "sub" / "b.jsonl", "file")):
        with monkeypatch.context() as m:
            _deny(m, denied)
            with pytest.raises(UsageError, match=f"data {kind} {denied}: permission denied"):
                list(read_documents([str(data)]))
    if os.geteuid() != 0:  # the real thing, when not root
        (data / "sub").chmod(0)
        try:
            with pytest.raises(UsageError, match="permission denied"):
                list(read_documents([str(data)]))
        finally:
            (data / "sub").chmod(0o755)


def test_warmup_defaults_to_a_tenth_of_a_short_run():
    from lomo_kernels.training.trainer import default_warmup

    assert [default_warmup(s) for s in (1, 5, 9, 10, 55, 100, 300, 10_000)] == [0, 0, 0, 1, 5, 10, 10, 10]


def test_stdlib_corpus_is_the_standard_library_without_tests_or_site_packages():
    files = stdlib_source_files()
    names = {f.name for f in files}
    assert {"os.py", "json", "argparse.py"} - names == {"json"}  # json is a package: its files are inside
    assert any(f.parent.name == "json" for f in files)
    assert not any({"site-packages", "test", "tests"} & set(f.parts) for f in files)


def test_split_eval_is_disjoint_bounded_and_seeded():
    data = pack([Document("x" * 1000)], BYTES, seq_len=10)
    train, held = split_eval(data, fraction=0.1, max_eval=7, seed=3)
    assert len(held) == 7 and len(train) + len(held) == len(data)
    rows = {tuple(r.tolist()) + (i,) for i, r in enumerate(data.tokens)}
    assert len(rows) == len(data)
    train2, held2 = split_eval(data, fraction=0.1, max_eval=7, seed=3)
    assert torch.equal(held.tokens, held2.tokens)
    assert split_eval(data, fraction=0.0, max_eval=7, seed=3)[1] is None
    one = data.subset(torch.tensor([0]))
    assert split_eval(one, fraction=0.5, max_eval=7, seed=3)[1] is None  # training keeps its one block


def test_batch_order_covers_each_epoch_and_resumes_exactly():
    order = BatchOrder(n_blocks=10, batch_size=4, seed=1)
    batches = [order.next_batch() for _ in range(5)]  # 20 draws = 2 epochs
    drawn = torch.cat(batches)
    assert sorted(drawn[:10].tolist()) == list(range(10)) and sorted(drawn[10:].tolist()) == list(range(10))
    assert not torch.equal(drawn[:10], drawn[10:])  # a fresh permutation per epoch
    again = BatchOrder(n_blocks=10, batch_size=4, seed=1)
    for _ in range(3):
        again.next_batch()
    resumed = BatchOrder(10, 4, 1, **{k: again.state_dict()[k] for k in ("epoch", "offset")})
    assert torch.equal(torch.cat([resumed.next_batch(), resumed.next_batch()]), torch.cat(batches[3:]))


def test_byte_tokenizer_round_trips_through_transformers(tmp_path):
    from transformers import AutoTokenizer

    save_byte_tokenizer(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    text = "def f(x):\n\treturn 'héllo ✓ 😀'\x00\xff"
    assert hf(text, add_special_tokens=False)["input_ids"] == list(text.encode("utf-8"))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (BOS, EOS, PAD)
    assert hf.decode(list(text.encode("utf-8"))) == text
    assert torch.equal(torch.from_numpy(TokenizerAdapter(hf).encode(text)), torch.from_numpy(BYTES.encode(text)))


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_lr_schedules_with_warmup(schedule):
    args = Namespace(lr=2.0, warmup_steps=4, steps=9, schedule=schedule)
    assert [lr_at(step, args) for step in (1, 2, 3, 4)] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    progress = [0.0, 0.2, 0.4, 0.6, 0.8]  # steps 5..9 over the 5 steps after warmup
    want = {"constant": [1.0] * 5, "linear": [1 - p for p in progress],
            "cosine": [0.5 * (1 + math.cos(math.pi * p)) for p in progress]}[schedule]
    assert [lr_at(step, args) for step in range(5, 10)] == pytest.approx([2.0 * w for w in want], abs=1e-12)


def _tiny_model():
    from transformers import AutoModelForCausalLM

    from lomo_kernels.training.presets import preset_config

    return AutoModelForCausalLM.from_config(preset_config("tiny"))


def test_a_crash_mid_checkpoint_leaves_the_previous_one_latest(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    model = _tiny_model()
    first = ckpt.save_checkpoint(tmp_path, 1, model, save_byte_tokenizer, {"step": 1}, keep=2)
    saved = load_file(tmp_path / "model.safetensors")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        ckpt.save_checkpoint(tmp_path, 2, model, save_byte_tokenizer, {"step": 2}, keep=2)
    assert ckpt.latest_checkpoint(tmp_path) == first
    assert [p.name for p in (tmp_path / ckpt.CHECKPOINTS).iterdir()] == [first.name]  # no temporary left
    published = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(published[k], saved[k]) for k in saved)
    assert ckpt.load_training_state(first) == {"step": 1}


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    model = _tiny_model()
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, model, save_byte_tokenizer, {"step": step}, keep=2)
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step-00000003", "step-00000004"]
