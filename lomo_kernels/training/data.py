"""Training data: reading text / JSONL, tokenizing, packing into fixed-length sequences, batching.

Every document becomes ``[bos] + tokens + [eos]`` (bos only if the tokenizer has one) and all documents
are concatenated into one token stream cut into ``seq_len`` blocks, the last one padded. Each token
carries a loss flag: text tokens and eos count; bos, padding and the ``prompt`` of a prompt/completion
record do not (the loss is on the completion only). Blocks without any counted token are dropped.
"""
from __future__ import annotations

import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .errors import UsageError

IGNORE_INDEX = -100  # the label value Hugging Face causal-LM losses skip
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass(frozen=True)
class Document:
    text: str
    prompt: str | None = None  # if set, `text` is the completion and only it is trained on


class TokenizerAdapter:
    """One interface over the built-in ByteTokenizer and a Hugging Face tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.is_hf = hasattr(tokenizer, "convert_tokens_to_ids")
        self.bos_id = tokenizer.bos_token_id if self.is_hf else tokenizer.bos_id
        self.eos_id = tokenizer.eos_token_id if self.is_hf else tokenizer.eos_id
        pad = tokenizer.pad_token_id if self.is_hf else tokenizer.pad_id
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

    def encode(self, text: str) -> np.ndarray:
        if not self.is_hf:
            return np.frombuffer(self.tokenizer.encode(text), dtype=np.uint8).astype(np.int32)
        return np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int32)


# --- reading -----------------------------------------------------------------------------------------

def stdlib_source_files() -> list[Path]:
    """The standard library's own .py files (no site-packages, no test suites), in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return files


def _unreadable(path, exc: OSError) -> UsageError:
    """A data path the file system refuses: named as what it is (permission denied, not 'no files')."""
    try:
        what = "directory " if Path(path).is_dir() else "file "
    except OSError:
        what = "path "
    if isinstance(exc, PermissionError):
        return UsageError(f"data {what}{path}: permission denied (cannot read it as this user; check its "
                          "permissions, e.g. ls -ld)")
    return UsageError(f"data {what}{path}: cannot read it ({exc.strerror or exc})")


def _raise_unreadable(exc: OSError):
    raise _unreadable(exc.filename, exc)


def _files_under(path: Path) -> list[Path]:
    files = []
    # onerror: os.walk skips a directory it cannot list unless told otherwise; an unreadable data
    # directory is an error, not an empty one
    for dirpath, dirnames, filenames in os.walk(path, onerror=_raise_unreadable):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        files += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    return files


def read_jsonl(path: Path) -> Iterator[Document]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = list(enumerate(f, start=1))
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise _unreadable(path, exc) from None
    for number, line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path} line {number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        yield _record_to_document(record, f"{path} line {number}")


def _record_to_document(record, where: str) -> Document:
    if isinstance(record, dict) and "text" in record:
        if not isinstance(record["text"], str):
            raise UsageError(f"{where}: \"text\" must be a string, got {type(record['text']).__name__}")
        return Document(record["text"])
    if isinstance(record, dict) and "prompt" in record and "completion" in record:
        for key in ("prompt", "completion"):
            if not isinstance(record[key], str):
                raise UsageError(f"{where}: \"{key}\" must be a string, got {type(record[key]).__name__}")
        return Document(record["completion"], prompt=record["prompt"])
    got = f"keys {sorted(record)}" if isinstance(record, dict) else f"a JSON {type(record).__name__}"
    raise UsageError(f"{where}: expected an object with a \"text\" field, or \"prompt\" and \"completion\" fields; got {got}")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                         "pass text or JSONL files") from None
    except OSError as exc:
        raise _unreadable(path, exc) from None


def read_documents(paths: list[str] | None) -> Iterator[Document]:
    """Documents from files / directories (JSONL by the .jsonl suffix, else plain text; a whole file
    is one document). ``None`` means the standard library's source files."""
    if paths is None:
        for file in stdlib_source_files():
            yield Document(_read_text(file))
        return
    for raw in paths:
        path = Path(raw)
        try:
            path.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise UsageError(f"data path {raw} does not exist") from None
        except OSError as exc:  # e.g. a parent directory without search permission
            raise _unreadable(raw, exc) from None
        files = _files_under(path) if path.is_dir() else [path]
        if not files:
            raise UsageError(f"data directory {raw} holds no files")
        for file in files:
            if file.suffix == ".jsonl":
                yield from read_jsonl(file)
            else:
                yield Document(_read_text(file))


# --- packing -----------------------------------------------------------------------------------------

@dataclass
class PackedData:
    """``tokens``/``labels``: int64 [n_blocks, seq_len]; labels are IGNORE_INDEX where no loss is taken."""

    tokens: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def subset(self, index: torch.Tensor) -> "PackedData":
        return PackedData(self.tokens[index], self.labels[index])

    @property
    def n_targets(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def pack(documents, tokenizer: TokenizerAdapter, seq_len: int, max_tokens: int | None = None,
         source: str = "data") -> PackedData:
    pieces, flags, total = [], [], 0
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    for doc in documents:
        prompt = tokenizer.encode(doc.prompt) if doc.prompt is not None else np.zeros(0, np.int32)
        body = tokenizer.encode(doc.text)
        if len(body) == 0 and len(prompt) == 0:
            continue
        ids = np.concatenate([np.asarray(bos, np.int32), prompt, body, np.asarray(eos, np.int32)])
        counted = np.zeros(len(ids), dtype=bool)
        counted[len(bos) + len(prompt):] = True
        pieces.append(ids)
        flags.append(counted)
        total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    if total == 0:
        raise UsageError(f"no text found in {source}")
    ids = np.concatenate(pieces)[:max_tokens]
    counted = np.concatenate(flags)[:max_tokens]
    n_blocks = -(-len(ids) // seq_len)
    pad = n_blocks * seq_len - len(ids)
    ids = np.concatenate([ids, np.full(pad, tokenizer.pad_id, np.int32)]).reshape(n_blocks, seq_len)
    counted = np.concatenate([counted, np.zeros(pad, bool)]).reshape(n_blocks, seq_len)
    # A block's first token is never predicted (nothing precedes it), so a block needs a counted
    # token at position >= 1 to contribute to the loss.
    keep = counted[:, 1:].any(axis=1)
    if not keep.any():
        raise UsageError(f"{source}: no token to train on (every record is prompt only?)")
    tokens = torch.from_numpy(ids[keep].astype(np.int64))
    labels = torch.where(torch.from_numpy(counted[keep]), tokens, torch.full_like(tokens, IGNORE_INDEX))
    return PackedData(tokens, labels)


def split_eval(data: PackedData, fraction: float, max_eval: int, seed: int) -> tuple[PackedData, PackedData | None]:
    """A fixed random held-out subset (``fraction`` of blocks, at most ``max_eval``, at least 1 if
    ``fraction > 0``); the training set always keeps at least one block."""
    n = len(data)
    n_eval = 0 if fraction <= 0 or n < 2 else min(max(1, round(fraction * n)), max_eval, n - 1)
    if n_eval == 0:
        return data, None
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return data.subset(order[n_eval:].sort().values), data.subset(order[:n_eval].sort().values)


class BatchOrder:
    """Which training blocks form each batch: a fresh seeded permutation per epoch.

    The position (epoch, offset) is the whole state, so a resumed run draws exactly the batches the
    uninterrupted run would have.
    """

    def __init__(self, n_blocks: int, batch_size: int, seed: int, epoch: int = 0, offset: int = 0):
        self.n_blocks, self.batch_size, self.seed = n_blocks, batch_size, seed
        self.epoch, self.offset = epoch, offset
        self._perm = self._permutation(epoch)

    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n_blocks, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))

    def next_batch(self) -> torch.Tensor:
        taken = []
        need = self.batch_size
        while need:
            if self.offset == self.n_blocks:
                self.epoch, self.offset = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            chunk = self._perm[self.offset:self.offset + need]
            taken.append(chunk)
            self.offset += len(chunk)
            need -= len(chunk)
        return torch.cat(taken)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "n_blocks": self.n_blocks}
