"""The built-in byte-level tokenizer: token ``i`` is byte ``i`` (0-255), then a few special tokens.

It needs no vocabulary file and nothing downloaded. ``save_byte_tokenizer`` writes it as a standard
Hugging Face ``tokenizer.json`` (byte-level pre-tokenizer, no merges), so
``transformers.AutoTokenizer.from_pretrained(run_dir)`` loads the same tokenizer back; the ids it
produces equal ``list(text.encode("utf-8"))``, which is what ``ByteTokenizer.encode`` computes directly.
"""
from __future__ import annotations

import json
from pathlib import Path

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)
BYTE_VOCAB = 256


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map (the alphabet of byte-level BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


class ByteTokenizer:
    """UTF-8 bytes as token ids; ``bos_id``/``eos_id``/``pad_id`` follow the 256 byte ids."""

    bos_id = BYTE_VOCAB
    eos_id = BYTE_VOCAB + 1
    pad_id = BYTE_VOCAB + 2
    vocab_size = BYTE_VOCAB + len(SPECIAL_TOKENS)

    def encode(self, text: str) -> bytes:
        """Token ids as a ``bytes`` object (every id is < 256); no special tokens added."""
        return text.encode("utf-8")

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < BYTE_VOCAB).decode("utf-8", errors="replace")


def save_byte_tokenizer(directory: str | Path) -> None:
    """Write tokenizer.json + tokenizer_config.json so AutoTokenizer loads the byte tokenizer."""
    directory = Path(directory)
    char_of_byte = bytes_to_unicode()
    vocab = {char_of_byte[b]: b for b in range(BYTE_VOCAB)}
    added = [{"id": BYTE_VOCAB + i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, tok in enumerate(SPECIAL_TOKENS)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": []},
    }
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
              "pad_token": PAD, "model_max_length": 1_000_000, "clean_up_tokenization_spaces": False}
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False))
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
