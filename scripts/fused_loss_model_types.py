"""Which causal-LM classes' training loss the fused linear cross-entropy reproduces.

For every causal-LM type of the installed transformers (the architecture sweep's tiny models,
tests/tiny_archs.py): the plain model's ``model(**batch).loss`` against the loss the held model computes
through ``lomo_kernels.integrations.causal_lm_loss`` (the type allowed for the check), fp32. A type is
listed (its ``AutoModelForCausalLM`` class, the one checked) when they agree within 1e-6 relative and the held forward returns no logits, also with every
logit-scale-like config float set to an unusual value and router logits on (``perturbed``). Prints the dict
``FUSED_LOSS_CLASSES`` (class name -> the model types verified) and, on stderr, why each other type is out.

    .venv/bin/python scripts/fused_loss_model_types.py
"""
from __future__ import annotations

import copy
import os
import sys
import warnings

import torch
from huggingface_hub.errors import StrictDataclassError

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import lomo_kernels as lk  # noqa: E402
from lomo_kernels.integrations import causal_lm_loss  # noqa: E402
from tiny_archs import ArchSkip, build_tiny, causal_lm_model_types, tiny_config  # noqa: E402

TOL = 1e-6


# Config values that may scale or transform logits or add to the loss after the LM head: set to unusual
# values so that a model whose forward uses them between its base model and its loss is caught.
SUSPECT_KEYS = ("scal", "multiplier", "coef", "logit", "z_loss")


def perturbed(model_type: str):
    """Tiny config with every suspect float set to an unusual value and router logits on (None: no suspects)."""
    cfg = tiny_config(model_type)
    changed = False
    text = getattr(cfg, "text_config", None)
    for config in [cfg] + ([text] if text is not None and text is not cfg else []):
        for key, value in list(vars(config).items()):
            if (value is None or type(value) is float) and any(s in key.lower() for s in SUSPECT_KEYS):
                try:
                    setattr(config, key, 0.37 if value in (None, 0.0, 1.0) else value * 1.7)
                except (TypeError, ValueError, StrictDataclassError):  # a validated non-float field (rope_scaling)
                    continue
                changed = True
        if hasattr(config, "output_router_logits"):
            config.output_router_logits = True
            changed = True
    return cfg if changed else None


def check(model_type: str) -> str | None:
    """None when the fused loss equals the model's own, plain and perturbed; else why not."""
    try:
        model, batch = build_tiny(model_type)
    except ArchSkip as err:
        return f"skipped: {err}"
    reason = compare(model, batch)
    if reason is not None:
        return reason
    cfg = perturbed(model_type)
    if cfg is None:
        return None
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    try:
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=model.config._attn_implementation).train()
    except Exception as err:  # noqa: BLE001 - an unbuildable perturbation cannot be verified
        return f"perturbed config does not build ({type(err).__name__}: {str(err)[:100]})"
    reason = compare(model, batch)
    return None if reason is None else f"with perturbed scales / router logits: {reason}"


def compare(model, batch) -> str | None:
    plain = copy.deepcopy(model)
    with torch.no_grad():
        expected = plain(**batch).loss
    if expected is None:
        return "its forward returns no loss for labels"
    allowed = causal_lm_loss.FUSED_LOSS_CLASSES
    causal_lm_loss.FUSED_LOSS_CLASSES = {type(model).__name__: (model.config.model_type,)}
    unfused: list[str] = []  # weights the model uses unfusably go to the dense route, as in the sweep
    try:
        while True:
            try:
                opt = lk.Lomo(model, lr=0.0, unfused=unfused)
            except ValueError as err:
                return f"not held: {err}"
            try:
                out = model(**batch)
                break
            except lk.UnfusedUseError as err:
                opt.close()
                if err.parameter in unfused or len(unfused) >= 8:
                    raise
                unfused.append(err.parameter)
    finally:
        causal_lm_loss.FUSED_LOSS_CLASSES = allowed
    with opt:
        if not opt.fused_cross_entropy:
            return opt.fused_cross_entropy_reason
        if out.logits is not None:
            return "the held forward still returned logits"
        rel = abs(out.loss.item() - expected.item()) / max(abs(expected.item()), 1e-30)
        if not rel <= TOL:
            return f"loss {out.loss.item():.8g} vs the model's {expected.item():.8g} (relative {rel:.1e})"
        opt.fused_backward(out.loss, 0.0)
    return None


def main() -> None:
    ok = []
    for model_type in causal_lm_model_types():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                reason = check(model_type)
            except Exception as err:  # noqa: BLE001 - reported, never listed
                reason = f"{type(err).__name__}: {err}".split("\n")[0][:200]
        if reason is None:
            ok.append(model_type)
        else:
            print(f"{model_type}: {reason}", file=sys.stderr)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    by_class: dict[str, list[str]] = {}
    for t in sorted(ok):
        by_class.setdefault(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[t], []).append(t)
    print("FUSED_LOSS_CLASSES = {")
    for cls in sorted(by_class):
        types = ", ".join(f'"{t}"' for t in by_class[cls])
        print(f'    "{cls}": ({types}{"," if len(by_class[cls]) == 1 else ""}),')
    print("}")
    print(f"# {len(ok)} types", file=sys.stderr)


if __name__ == "__main__":
    main()
