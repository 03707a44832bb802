"""Built-in LLaMA-style model configs, randomly initialised, using the byte-level tokenizer."""
from __future__ import annotations

from .tokenizer import ByteTokenizer

# name: (hidden, layers, heads, intermediate, max positions)
PRESETS = {
    "tiny": (32, 2, 2, 64, 256),        # tests: trains in seconds
    "small": (128, 4, 4, 352, 1024),    # the default run: a few minutes on 2 CPU cores
    "base": (512, 8, 8, 1408, 2048),    # ~25 M parameters: for a GPU or a patient CPU
}


def preset_config(name: str):
    """A ``transformers.LlamaConfig`` for preset ``name`` (a key of ``PRESETS``)."""
    from transformers import LlamaConfig

    hidden, layers, heads, intermediate, positions = PRESETS[name]
    tok = ByteTokenizer()
    return LlamaConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=intermediate,
                       max_position_embeddings=positions, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                       pad_token_id=tok.pad_id, tie_word_embeddings=False, initializer_range=0.02)
