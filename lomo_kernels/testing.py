"""Measurement helpers for tests and benchmarks.

``AllocationTracker`` is a ``TorchDispatchMode`` that records the size of every tensor an op creates,
including the ops inside lomo_kernels' own custom ops (whose Python implementations it runs under
itself, so a weight-sized temporary inside a backend cannot hide behind the op boundary). Ops that
return their input (in-place) or a view of it allocate nothing and are not counted. Compiled C++/CUDA
kernels are opaque to it: their allocations go through the torch allocator and are visible to the
profiler's memory events instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch._library import custom_ops
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass
class Allocation:
    op: str
    shape: tuple
    dtype: torch.dtype
    nbytes: int


@dataclass
class AllocationTracker(TorchDispatchMode):
    allocations: list[Allocation] = field(default_factory=list)

    def __post_init__(self):
        super().__init__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "lomo_kernels":
            opdef = custom_ops.OPDEFS[func._schema.name]
            with self:
                return opdef._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.allocations.append(Allocation(str(func), tuple(t.shape), t.dtype, t.numel() * t.element_size()))
        return out

    @property
    def largest(self) -> Allocation | None:
        return max(self.allocations, key=lambda a: a.nbytes, default=None)


def tiny_llama(vocab_size: int = 97, hidden_size: int = 32, intermediate_size: int = 48, layers: int = 2,
               tie_word_embeddings: bool = False, **overrides):
    """A randomly initialized LLaMA-architecture causal LM small enough for CPU tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=tie_word_embeddings, **overrides)
    return LlamaForCausalLM(config)


def tiny_gpt2(vocab_size: int = 97, n_embd: int = 32, layers: int = 2, tie_word_embeddings: bool = True,
              **overrides):
    """A randomly initialized GPT-2 (Conv1D layers; wte tied to lm_head by default) with dropout off."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_embd=n_embd, n_layer=layers, n_head=4, n_positions=128,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                        tie_word_embeddings=tie_word_embeddings, **overrides)
    return GPT2LMHeadModel(config)
