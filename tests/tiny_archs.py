"""Tiny random-weight causal LMs for every architecture the installed ``transformers`` knows.

The list comes from ``transformers``' own auto mapping (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``), not a
hand-written list, so a newer ``transformers`` brings its new architectures into the sweep by itself.
Each config starts from its class's defaults and is shrunk by generic rules on attribute names
(``_shrink``): hidden size 64, 2 layers (or one layer per distinct entry of ``layer_types``), 4 heads,
head_dim 16, intermediate 128, vocabulary 256, 64 positions, 4 experts with top-2 routing, windows of 8,
every dropout-like probability 0, ``use_cache`` off. Sub-configs (``text_config``, ``attn_config``, ...)
are shrunk by the same rules. ``_OVERRIDES`` holds the few per-architecture values that no generic rule
gets right; ``_SKIP`` the architectures that cannot run from ``input_ids`` alone, with the reason.

Nothing is downloaded: configs are built from their classes, models from those configs.

    model, batch = build_tiny("llama")
    model(**batch).loss.backward()
"""

from __future__ import annotations

import copy
import warnings

import torch

__all__ = [
    "ArchSkip",
    "causal_lm_model_types",
    "tiny_config",
    "build_tiny",
    "make_batch",
    "sgd_reference_steps",
    "weight_uses",
    "weight_use_notes",
    "SEQ_LEN",
    "BATCH",
]

HIDDEN = 64
HEADS = 4
HEAD_DIM = 16
LAYERS = 2
MAX_LAYERS = 4
INTERMEDIATE = 128
MOE_INTERMEDIATE = 64
VOCAB = 256
POSITIONS = 64
EXPERTS = 4
TOP_K = 2
WINDOW = 8
BATCH = 2
SEQ_LEN = 16


class ArchSkip(Exception):
    """This architecture cannot be built/run as a tiny text-only causal LM here; ``str()`` says why."""


def causal_lm_model_types() -> list[str]:
    """Every ``model_type`` in the installed transformers' causal-LM auto mapping, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


# --------------------------------------------------------------------------------------------------
# generic shrinking rules, keyed by attribute name

_HIDDEN_KEYS = {"hidden_size", "d_model", "n_embd", "emb_dim", "embed_dim", "model_dim", "dim"}
_LAYER_KEYS = {
    "num_hidden_layers", "n_layer", "n_layers", "num_layers", "encoder_layers", "decoder_layers",
    "num_decoder_layers", "num_encoder_layers",
}
_HEAD_KEYS = {
    "num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads",
    "decoder_attention_heads", "attention_heads", "num_encoder_attention_heads",
    "num_decoder_attention_heads",
}
_KV_HEAD_KEYS = {"num_key_value_heads", "n_kv_heads", "num_kv_heads", "kv_n_heads", "multi_query_group_num",
                 "n_head_kv", "num_kv_heads_per_layer"}
_HEAD_DIM_KEYS = {"head_dim", "kv_channels", "attention_head_dim", "d_head", "head_size"}
_INTERMEDIATE_KEYS = {
    "intermediate_size", "ffn_dim", "n_inner", "encoder_ffn_dim", "decoder_ffn_dim", "ffn_hidden_size",
    "d_ff", "dim_ff", "dff", "inner_hidden_size", "d_inner", "dim_feedforward", "mlp_dim", "intermediate_dim",
}
_MOE_INTERMEDIATE_KEYS = {
    "moe_intermediate_size", "shared_expert_intermediate_size", "expert_ffn_hidden_size",
    "moe_ffn_hidden_size", "expert_intermediate_size", "shared_intermediate_size",
    "moe_shared_expert_intermediate_size", "moe_dense_intermediate_size",
}
_VOCAB_KEYS = {"vocab_size", "n_words", "n_token"}
_POSITION_KEYS = {
    "max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "context_length",
    "model_max_length", "max_sequence_length", "max_target_positions", "max_source_positions",
    "original_max_position_embeddings", "max_seq_length", "seq_length",
}
_EXPERT_KEYS = {"num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "n_experts"}
_TOPK_KEYS = {"num_experts_per_tok", "moe_k", "moe_topk", "moe_top_k", "num_experts_per_token", "top_k",
              "num_selected_experts"}
_ONE_KEYS = {"n_group", "num_expert_group", "topk_group", "n_groups", "mamba_n_groups", "num_groups"}
_AT_MOST_ONE_KEYS = {"n_shared_experts", "num_shared_experts", "first_k_dense_replace", "moe_shared_expert_count"}
_ZERO_KEYS = {"num_nextn_predict_layers", "num_mtp_layers", "mtp_num_layers", "num_mtp_modules"}
_WINDOW_KEYS = {"sliding_window", "attention_window_size", "sliding_window_size", "window_size", "local_window_size",
                "keep_window_size"}
_STATE_KEYS = {"state_size", "ssm_state_size", "d_state", "mamba_d_state"}
_MAMBA_HEADS_KEYS = {"mamba_n_heads", "mamba_num_heads", "ssm_num_heads"}
_MAMBA_HEAD_DIM_KEYS = {"mamba_d_head", "mamba_head_dim", "ssm_head_dim"}
_CHUNK_KEYS = {"chunk_size", "mamba_chunk_size", "ssm_chunk_size"}
_DT_RANK_KEYS = {"time_step_rank", "mamba_dt_rank", "dt_rank"}
_FIXED = {
    # MLA (DeepSeek-V2/V3 style)
    "q_lora_rank": 32, "kv_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    # linear-attention layers (Qwen3-Next style)
    "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "rotary_dim": HEAD_DIM,
    # LongCat-Flash's identity ("zero computation") experts
    "zero_expert_num": 2,
}
_CONFIG_PLUMBING = {
    "transformers_version", "architectures", "output_hidden_states", "return_dict", "dtype",
    "torch_dtype", "id2label", "label2id", "problem_type", "_name_or_path", "model_type",
    "output_attentions", "chunk_size_feed_forward", "is_encoder_decoder",
}


def _is_config(x) -> bool:
    from transformers import PretrainedConfig

    return isinstance(x, PretrainedConfig)


def _is_dropoutish(key: str) -> bool:
    k = key.lower()
    return any(s in k for s in ("dropout", "pdrop", "layerdrop", "drop_path", "jitter", "drop_rate")) \
        or k.endswith("_drop")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_KEEP = object()


def _shrink_int(k: str, v: int, ctx: dict):
    """The tiny value of integer attribute ``k`` (default ``v``), or ``_KEEP``."""
    if k in _LAYER_KEYS:
        return ctx["n_layers"]
    if k in _KV_HEAD_KEYS:
        return HEADS if v == ctx["heads"] else (1 if v == 1 else 2)
    if k in _FIXED:
        return min(v, _FIXED[k])
    if k in ("head_dim",) and ctx.get("rope_head_dim") == v:
        return _FIXED["qk_rope_head_dim"]  # MLA: head_dim is the rotary part
    for keys, target in (
        (_HIDDEN_KEYS, HIDDEN), (_HEAD_KEYS, HEADS), (_HEAD_DIM_KEYS, HEAD_DIM),
        (_INTERMEDIATE_KEYS, INTERMEDIATE), (_MOE_INTERMEDIATE_KEYS, MOE_INTERMEDIATE),
        (_VOCAB_KEYS, VOCAB), (_POSITION_KEYS, POSITIONS), (_EXPERT_KEYS, EXPERTS), (_TOPK_KEYS, TOP_K),
        (_ONE_KEYS, 1), (_AT_MOST_ONE_KEYS, 1), (_ZERO_KEYS, 0), (_WINDOW_KEYS, WINDOW), (_STATE_KEYS, 16),
        (_MAMBA_HEADS_KEYS, 8), (_MAMBA_HEAD_DIM_KEYS, 16), (_CHUNK_KEYS, 8), (_DT_RANK_KEYS, 8),
    ):
        if k in keys:
            return min(v, target)
    if k.endswith("_layer_period"):
        return min(v, 2)
    if k.endswith("_layer_offset"):
        return v % 2
    if k.endswith(("token_id", "_token_index", "token_idx")):
        return vocab_safe_id(v, ctx)
    if ("vocab_size" in k or k.endswith("_vocab")) and "divisible" not in k:
        return min(v, VOCAB)
    if k.startswith("hidden_size") or k.endswith("_hidden_size"):
        return min(v, HIDDEN) if v else v
    if k.startswith("intermediate_size") or k.endswith("_intermediate_size"):
        return min(v, INTERMEDIATE)
    if k.endswith(("_head_dim", "_head_size")):
        return min(v, HEAD_DIM)
    if k.endswith(("_key_value_heads", "_kv_heads")):
        return min(v, 2)
    if k.endswith(("_num_heads", "_n_heads", "_attention_heads")):
        return min(v, HEADS)
    if k.endswith(("_num_layers", "_n_layers")) and v > LAYERS:
        return LAYERS
    if ctx.get("hidden") and v == ctx["hidden"] and any(s in k for s in ("size", "dim", "embd")):
        return HIDDEN  # e.g. OPT's word_embed_proj_dim, a projection width that defaults to hidden_size
    return _KEEP


def vocab_safe_id(v: int, ctx: dict) -> int:
    """A special token id that fits the tiny vocabulary: distinct ids stay distinct (the top ones)."""
    if v < VOCAB:
        return v
    ids = ctx.setdefault("ids", {})
    return ids.setdefault(v, VOCAB - 1 - len(ids))


def _per_layer_value(k, v, global_orig, ctx):
    """A per-layer override: shrunk like the global value, then kept larger/smaller than the shrunk global
    when the original was, so heterogeneous layers stay heterogeneous."""
    if not _is_int(v) or not _is_int(global_orig):
        return v
    g = _shrink_int(k, global_orig, ctx)
    if g is _KEEP:
        return v
    if k in _HEAD_KEYS or k in _KV_HEAD_KEYS or k == "head_dim":
        # head counts and head_dim keep their relation to the global value (heterogeneous shapes);
        # other sizes follow the shrunk global value (they are tied by constraints such as
        # head_dim = qk_nope_head_dim + qk_rope_head_dim)
        if v > global_orig:
            return g * 2
        if v < global_orig:
            return max(1, g // 2)
    return g


def _pick_layers(kinds: list, n: int = LAYERS) -> list[int]:
    """Indices of the layers to keep: the first layer of each distinct kind, padded with the earliest
    other layers to at least ``n``; in their original order."""
    keep, seen = [], set()
    for i, t in enumerate(kinds):
        if t not in seen:
            seen.add(t)
            keep.append(i)
    i = 0
    while len(keep) < min(n, len(kinds)):
        if i not in keep:
            keep.append(i)
        i += 1
    return sorted(keep)


def _is_index_list(k, v, n_layers) -> bool:
    """A list of layer indices (mlp_only_layers, full_attn_idxs, hybrid_layer_ids, ...)."""
    if not isinstance(v, (list, tuple)) or not v or not all(_is_int(x) for x in v):
        return False
    if not (any(s in k for s in ("idx", "ids", "indices", "index")) or k.endswith("_layers")):
        return False
    return not n_layers or all(0 <= x < n_layers for x in v)


def _layer_lists(d: dict, n_layers: int | None) -> dict:
    lists = {}
    for k, v in d.items():
        if _is_index_list(k, v, n_layers):
            continue
        if isinstance(v, (list, tuple)) and n_layers and len(v) == n_layers and n_layers > 1:
            lists[k] = list(v)
        elif k == "hybrid_override_pattern" and isinstance(v, str) and v:
            lists[k] = list(v)
    return lists


def _shrink(cfg, top: bool = True) -> dict:
    """Overrides (a kwargs dict) that turn ``cfg``, a default-constructed config, into a tiny one. Only
    changed attributes are returned, so attributes derived in ``__post_init__`` are derived anew."""
    d = {k: v for k, v in cfg.__dict__.items() if not k.startswith("__")}
    try:
        per_layer = cfg.to_dict().get("per_layer_config") or {}
    except Exception:  # noqa: BLE001
        per_layer = {}
    per_layer = {int(i): dict(o) for i, o in per_layer.items()}

    n_layers_orig = next((d[k] for k in ("num_hidden_layers", "n_layer", "n_layers", "num_layers",
                                         "decoder_layers") if _is_int(d.get(k))), None)
    for k in ("layer_types", "layers_block_type", "hybrid_override_pattern"):
        if n_layers_orig is None and isinstance(d.get(k), (list, tuple, str)) and d[k]:
            n_layers_orig = len(d[k])
    lists = _layer_lists(d, n_layers_orig)

    # Keep one layer of each distinct kind: a layer's kind is everything per-layer about it (its entries
    # in every per-layer list, e.g. layer_types / mlp_layer_types, and its per_layer_config overrides).
    keep = None
    if n_layers_orig:
        sig = [tuple(repr(v[i]) for v in lists.values()) + (repr(sorted(per_layer.get(i, {}).items())),)
               for i in range(n_layers_orig)]
        keep = _pick_layers(sig)[:MAX_LAYERS]
    n_layers = len(keep) if keep else LAYERS
    heads = next((d[k] for k in _HEAD_KEYS if _is_int(d.get(k))), None)
    hidden = next((d[k] for k in _HIDDEN_KEYS if _is_int(d.get(k))), None)
    ctx = {"n_layers": n_layers, "heads": heads, "hidden": hidden, "rope_head_dim": d.get("qk_rope_head_dim")}

    out: dict = {}
    for k, v in d.items():
        if k in _CONFIG_PLUMBING or k.startswith("_"):
            continue
        if _is_config(v):
            sub = {**v.to_diff_dict(), **_shrink(v, top=False)}
            for p in _CONFIG_PLUMBING - {"model_type"}:
                sub.pop(p, None)
            sub.pop("per_layer_config", None) if "per_layer_config" not in _shrink(v, top=False) else None
            out[k] = sub
            continue
        if isinstance(v, bool):
            if k == "use_cache" and v:
                out[k] = False
            elif k == "is_decoder" and top and not v:
                out[k] = True  # BERT-style LM heads: causal attention, as a causal LM
            continue
        if isinstance(v, float):
            if _is_dropoutish(k) and v != 0.0:
                out[k] = 0.0
            continue
        if _is_int(v):
            new = _shrink_int(k, v, ctx)
            if new is not _KEEP and new != v:
                out[k] = new
            continue
        if v is None:
            if k in ("head_dim",):
                out[k] = HEAD_DIM
            elif k in _KV_HEAD_KEYS and heads:
                out[k] = HEADS
            continue
        if k in lists and keep:
            new = [lists[k][i] for i in keep]
            if k in _INTERMEDIATE_KEYS or k.startswith("intermediate_size"):
                new = [INTERMEDIATE if _is_int(x) else x for x in new]
            out[k] = "".join(new) if isinstance(v, str) else new
            continue
        if isinstance(v, (list, tuple)) and v:
            if k.endswith("token_id") and all(_is_int(x) for x in v):
                new = [vocab_safe_id(x, ctx) for x in v]
                if new != list(v):
                    out[k] = new
            elif keep and _is_index_list(k, v, n_layers_orig):
                # a list of layer indices (mlp_only_layers, attn_layer_indices, full_attn_idxs, ...)
                out[k] = [keep.index(x) for x in v if x in keep]
            continue
    if per_layer and keep:
        out["per_layer_config"] = {
            str(new_i): {k: _per_layer_value(k, v, d.get(k), ctx) for k, v in per_layer[i].items()}
            for new_i, i in enumerate(keep) if i in per_layer
        }
    return out


_QWEN4_INDEXER = {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8,
                  "indexer_compress_ratio": 4}
_GEMMA3N_TEXT = {"layer_types": ["sliding_attention", "full_attention"] * 2, "num_hidden_layers": 4,
                 "num_kv_shared_layers": 2, "intermediate_size": [INTERMEDIATE] * 4,
                 "activation_sparsity_pattern": [0.95, 0.0, 0.0, 0.0]}

# Per-architecture values that no generic rule gets right (applied after _shrink), each with its why.
_OVERRIDES: dict[str, dict] = {
    # mamba2 mixer: num_heads * head_dim must equal expand * hidden_size (2 * 64)
    "mamba2": {"num_heads": 8, "head_dim": 16},
    # default is all-attention (full_attn_idxs = every layer): keep one short-conv layer too
    "lfm2": {"layer_types": ["conv", "full_attention"], "num_hidden_layers": 2},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_hidden_layers": 2, "num_dense_layers": 1},
    # the forward raises unless a language is chosen
    "xmod": {"default_language": "en_XX"},
    # defaults leave the MoE routing sizes None (not runnable as is)
    "deepseek_v2": {"num_experts_per_tok": 2},
    "dots1": {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1},
    # default rope_parameters is {} but the rotary embedding reads rope_parameters[layer_type]
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    # the indexed-attention layer's indexer sizes default to None
    "qwen4_exp_text": _QWEN4_INDEXER,
    "qwen4_exp": {"text_config": _QWEN4_INDEXER},
    # KV sharing: the last num_kv_shared_layers reuse the KV of the last unshared layer of their type, so
    # every type needs an unshared layer first (4 layers: sliding, full, then both shared)
    "gemma3n_text": _GEMMA3N_TEXT,
    "gemma3n": {"text_config": _GEMMA3N_TEXT},
    # the shared transformer block is tied across hybrid layers: it needs at least two of them
    "zamba": {"layers_block_type": ["linear_attention", "hybrid", "hybrid"], "num_hidden_layers": 3},
    # axial position embeddings: the shape's product must equal the (training) sequence length and the
    # dims must sum to hidden_size; the sequence length must be a multiple of the attention chunk lengths
    "reformer": {"axial_pos_shape": [4, 4], "axial_pos_embds_dim": [32, 32], "max_position_embeddings": SEQ_LEN,
                 "local_attn_chunk_length": 8, "lsh_attn_chunk_length": 8, "num_buckets": 4,
                 "attn_layers": ["local", "lsh"], "num_hidden_layers": 2,
                 "hash_seed": 0},  # LSH draws random rotations on every forward unless seeded
    # hybrids whose default is all-recurrent (or whose pattern list is not per layer): one layer of each
    "bamba": {"attn_layer_indices": [1]},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"], "num_hidden_layers": 2},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"], "num_hidden_layers": 2},
    # mamba_d_ssm must equal mamba_n_heads * mamba_d_head (8 * 16)
    "falcon_h1": {"mamba_d_ssm": 128},
    # the vision/audio adapters project to the text model's width
    "dots3_note": {"vision_config": {"adapter_out_dim": HIDDEN}, "audio_config": {"adapter_out_dim": HIDDEN}},
}

# Architectures that cannot run as a text-only causal LM from input_ids here, and why.
_SKIP: dict[str, str] = {
    "git": "image captioning model: GitForCausalLM's loss drops the first num_image_tokens positions "
           "(from the vision config) whether or not pixel_values are given, so it needs pixel inputs",
    "musicgen": "text-to-audio: the composite MusicgenConfig does not build MusicgenForCausalLM (that takes "
                "the decoder sub-config) and its input_ids are audio codebooks, (batch x num_codebooks, seq)",
    "musicgen_melody": "text-to-audio: the composite MusicgenMelodyConfig does not build "
                       "MusicgenMelodyForCausalLM (that takes the decoder sub-config) and its input_ids are "
                       "audio codebooks, (batch x num_codebooks, seq)",
    "gemma4_assistant": "speculative-decoding drafter: forward needs the backbone's inputs_embeds and "
                        "shared_kv_states, not input_ids (and its default config does not validate)",
    "gemma4_unified_assistant": "speculative-decoding drafter: forward needs the backbone's inputs_embeds "
                                "and shared_kv_states, not input_ids",
}


def _config_class(model_type):
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type]


def tiny_config(model_type: str):
    """A tiny config for ``model_type``; raises :class:`ArchSkip` (with the reason) if there is none."""
    if model_type in _SKIP:
        raise ArchSkip(_SKIP[model_type])
    cls = _config_class(model_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            default = cls()
        except Exception as e:  # noqa: BLE001 - the default config itself is broken
            raise ArchSkip(f"default {cls.__name__}() does not construct: {type(e).__name__}: {e}") from e
        kw = _drop_derived(cls, default, _shrink(default))
        for k, v in _OVERRIDES.get(model_type, {}).items():
            if isinstance(v, dict) and isinstance(kw.get(k), dict) and k.endswith("config"):
                kw[k] = {**kw[k], **v}  # a sub-config: merge
            else:
                kw[k] = v
        try:
            cfg = cls(**kw)
        except ImportError as e:
            raise ArchSkip(_import_reason(e)) from e
        _FIXUPS.get(model_type, lambda c: None)(cfg)
    cfg.use_cache = False
    for sub in _sub_configs(cfg):
        if hasattr(sub, "use_cache"):
            sub.use_cache = False
    return cfg


# Attributes that the shrunk sizes determine: if constructing the config from these alone changes another
# attribute, that attribute is derived in __post_init__ (zamba2's attention_hidden_size = 2 * hidden_size,
# head_dim = hidden_size // heads, ...), and it is left to be derived rather than shrunk independently.
_PRIMARY = _HIDDEN_KEYS | _LAYER_KEYS | _HEAD_KEYS | _KV_HEAD_KEYS | _VOCAB_KEYS | _POSITION_KEYS | {
    "layer_types", "layers_block_type", "per_layer_config", "hybrid_override_pattern", "intermediate_size"}


def _drop_derived(cls, default, kw: dict) -> dict:
    primary = {k: v for k, v in kw.items() if k in _PRIMARY}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe = cls(**primary)
    except Exception:  # noqa: BLE001 - the primary sizes alone do not validate: keep everything
        return kw
    derived = {
        k for k in kw
        if k not in primary and not isinstance(kw[k], (dict, list, str))  # chosen per-layer lists stay
        and k in probe.__dict__ and k in default.__dict__ and probe.__dict__[k] != default.__dict__[k]
    }
    return {k: v for k, v in kw.items() if k not in derived}


def _import_reason(e: ImportError) -> str:
    import re

    m = re.search(r"requires the (\S+) library", str(e))
    if m:
        return f"needs the optional package `{m.group(1)}` (not installed)"
    return f"import error: {str(e).strip().splitlines()[0]}"


def _fix_dbrx(cfg):
    # transformers 5.23: DbrxAttention reads attn_config.rope_theta, which DbrxAttentionConfig no longer has
    if not hasattr(cfg.attn_config, "rope_theta"):
        cfg.attn_config.rope_theta = cfg.rope_parameters["rope_theta"]
    # ... and calls clamp(min=None, max=clip_qkv), which torch rejects for clip_qkv=None (the default):
    # use the released DBRX checkpoints' value
    if cfg.attn_config.clip_qkv is None:
        cfg.attn_config.clip_qkv = 8.0


# Per-architecture fix-ups applied to the built config (bugs of the installed transformers).
_FIXUPS = {"dbrx": _fix_dbrx}


def _sub_configs(cfg):
    for v in list(cfg.__dict__.values()):
        if _is_config(v):
            yield v
            yield from _sub_configs(v)


def _special_ids(cfg) -> set[int]:
    ids = set()
    for c in (cfg, *_sub_configs(cfg)):
        for k, v in c.__dict__.items():
            if ("token" in k and ("id" in k or "index" in k)) or k.endswith(("_idx", "_index")):
                if isinstance(v, int) and not isinstance(v, bool):
                    ids.add(v)
                elif isinstance(v, (list, tuple)):
                    ids.update(x for x in v if isinstance(x, int))
    return ids


def _vocab_of(cfg) -> int:
    for c in (cfg, *_sub_configs(cfg)):
        v = getattr(c, "vocab_size", None)
        if isinstance(v, int):
            return v
    return VOCAB


def make_batch(cfg, seed: int = 0, batch: int = BATCH, seq_len: int = SEQ_LEN) -> dict:
    """``input_ids`` (no special tokens), ``labels = input_ids``; deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    vocab = _vocab_of(cfg)
    special = _special_ids(cfg)
    allowed = torch.tensor([i for i in range(vocab) if i not in special])
    ids = allowed[torch.randint(0, len(allowed), (batch, seq_len), generator=g)]
    return {"input_ids": ids, "labels": ids.clone()}


def build_tiny(model_type: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """``(model, batch)``: a tiny random ``AutoModelForCausalLM`` for ``model_type`` on CPU in train
    mode (eager attention where supported, else sdpa; dropout 0; no cache) and a batch for it, such that
    ``model(**batch).loss`` works. Deterministic in ``seed``. Raises :class:`ArchSkip`."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(model_type)
    torch.manual_seed(seed)
    model = None
    errors = []
    for impl in ("eager", "sdpa", None):
        torch.manual_seed(seed)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                kwargs = {"dtype": dtype}
                if impl is not None:
                    kwargs["attn_implementation"] = impl
                model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), **kwargs)
            break
        except ImportError as e:
            if "library" in str(e) and "requires" in str(e):
                raise ArchSkip(_import_reason(e)) from e
            raise
        except ValueError as e:  # attention implementation not supported
            if "attn_implementation" in str(e) or "attention" in str(e).lower() and "support" in str(e).lower():
                errors.append(e)
                continue
            raise
    if model is None:
        raise errors[-1]
    model = model.to(dtype)
    model.train()
    batch = make_batch(model.config, seed=seed)
    batch.update(_EXTRA_INPUTS.get(model_type, lambda m, b: {})(model, batch))
    return model, batch


# Per-architecture extra inputs (functions of (model, batch) -> dict).
_EXTRA_INPUTS: dict = {}


def sgd_reference_steps(model, batch, steps: int, lr: float, weight_decay: float = 0.0,
                        clip_grad_norm: float | None = None) -> list[dict]:
    """Plain PyTorch reference: ``steps`` steps of ``torch.optim.SGD(lr, weight_decay)`` on a deepcopy of
    ``model`` (global-norm clipping with ``clip_grad_norm_`` when given). Returns the state_dict (cloned
    tensors) after each step. ``model`` itself is not touched."""
    ref = copy.deepcopy(model)
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    states = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = ref(**batch).loss
        loss.backward()
        if clip_grad_norm is not None and clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
        opt.step()
        states.append({k: v.detach().clone() for k, v in ref.state_dict().items()})
    return states


# --------------------------------------------------------------------------------------------------
# how a model uses its weights (for the fused optimizer, which routes weight *uses*)

_METADATA_OPS = {"__get__", "type", "is_floating_point", "dim", "size", "numel", "dtype", "device",
                 "is_contiguous", "requires_grad", "shape", "data_ptr", "__len__"}


def weight_uses(model, batch, min_dim: int = 2) -> dict:
    """``{parameter name: Counter(torch function name -> calls)}`` for every parameter with at least
    ``min_dim`` dimensions, recorded during one ``model(**batch).loss`` forward with a
    ``TorchFunctionMode``. Only calls that receive the parameter itself are seen (``w.t()`` shows as
    ``t``/``transpose``, the matmul on the view is not attributed). Metadata reads are dropped."""
    import collections

    from torch.overrides import TorchFunctionMode

    ids = {}
    for n, p in model.named_parameters():
        if p.dim() >= min_dim:
            ids.setdefault(id(p), n)
    uses: dict = {n: collections.Counter() for n in ids.values()}

    class _Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = getattr(func, "__name__", str(func))
            if name not in _METADATA_OPS:
                for a in (*args, *kwargs.values()):
                    for x in (a if isinstance(a, (list, tuple)) else (a,)):
                        if isinstance(x, torch.Tensor) and id(x) in ids:
                            uses[ids[id(x)]][name] += 1
            return func(*args, **kwargs)

    with _Record():
        model(**batch).loss
    return uses


def weight_use_notes(model, batch) -> list[str]:
    """Short notes on what is unusual, for the fused optimizer, about how ``model`` uses its weights:
    tied weights, nn.Embedding / nn.Linear subclasses with their own ``forward``, weights of 2+ dims
    used other than through F.linear / F.embedding (grouped parameters name their layer as ``N``),
    weights that one forward passes to F.linear / F.embedding more than once (a module called several
    times), and weights of 2+ dims the forward does not use at all."""
    import collections
    import re

    notes = []
    all_names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    n_tied = len(all_names) - len(list(model.parameters()))
    if n_tied:
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        lm = (out_emb is not None and in_emb is not None and getattr(out_emb, "weight", None) is not None
              and out_emb.weight is in_emb.weight)
        notes.append(f"tied: {n_tied} shared parameter(s)" + (" (lm_head = input embedding)" if lm else ""))
    subs = collections.Counter()
    for _, mod in model.named_modules():
        for base in (torch.nn.Embedding, torch.nn.Linear):
            if isinstance(mod, base) and type(mod).forward is not base.forward:
                subs[f"{base.__name__} subclass {type(mod).__name__}"] += 1
    notes += [f"{k} (own forward) x{v}" for k, v in sorted(subs.items())]
    groups: dict = {}
    reused: dict = {}
    unused = []
    for n, u in weight_uses(model, batch).items():
        g = re.sub(r"\.\d+\.", ".N.", n)
        if not u:
            unused.append(g)
            continue
        for op in ("linear", "embedding"):
            if u.get(op, 0) > 1:
                reused.setdefault(g, set()).add(f"{op} x{u[op]}")
        other = {k: v for k, v in u.items() if k not in ("linear", "embedding")}
        if other:
            groups.setdefault(g, set()).update(other)
    if groups:
        notes.append("non-F.linear/F.embedding uses: " + "; ".join(
            f"{g} [{', '.join(sorted(ops))}]" for g, ops in groups.items()))
    if reused:
        notes.append("used several times per forward: " + "; ".join(
            f"{g} [{', '.join(sorted(ops))}]" for g, ops in reused.items()))
    if unused:
        notes.append(f"unused by a text-only forward: {len(set(unused))} weight group(s), e.g. {sorted(set(unused))[0]}")
    return notes
