"""Parity with the real lomo-optim 0.1.1 package: same tiny model, data and settings, fp32, 5 steps;
every parameter within 1e-4 relative (max abs difference / max abs value) of lomo-optim's.

lomo-optim's AdaLomo puts its statistics on the GPU with ``.cuda()``; to run it on CPU the test
replaces ``torch.Tensor.cuda`` by the identity while it is constructed.

GPT-2 is tested with its tied wte/lm_head: on this torch, autograd sums the two uses' gradients
before lomo-optim's hook sees them, so lomo-optim updates the tied weight once, as we do (the router
keeps both uses' tokens and applies one fused update from their concatenation).

For AdaLomo on GPT-2, ``c_attn.bias`` is frozen in both runs: the key third of that bias has an
exactly zero gradient (softmax is invariant to it), and AdaLomo's 1-D rule normalizes each entry to
about ±lr·eps[1], i.e. to the sign of float noise, which no two implementations share.
"""
import copy
from unittest import mock

import lomo_optim
import pytest
import torch

import lomo_kernels as lk
from lomo_kernels.testing import tiny_gpt2, tiny_llama

STEPS = 5
LR = 1e-2
TOL = 1e-4
MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
CLIP_VALUE, CLIP_NORM = 0.005, 0.5
SETTINGS = {
    "plain": {},
    "weight_decay": dict(weight_decay=0.1),
    "clip_value": dict(clip_grad_value=CLIP_VALUE),
    "clip_norm": dict(clip_grad_norm=CLIP_NORM),
    "all": dict(weight_decay=0.1, clip_grad_value=CLIP_VALUE, clip_grad_norm=CLIP_NORM),
}


def make_lomo_optim(cls, model, **kwargs):
    with mock.patch.object(torch.Tensor, "cuda", lambda self, *args, **kw: self):
        return cls(model, lr=LR, **kwargs)


def train(opt, model, data, clip_norm):
    norms = []
    for ids in data:
        loss = model(input_ids=ids, labels=ids).loss
        if clip_norm:
            opt.grad_norm(loss)
            norms.append(float(opt.clip_coef))
        opt.fused_backward(loss, LR)
    return norms


def max_rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def check_parity(arch, setting, ours_cls, ref_cls, freeze=(), **ours_kwargs):
    kwargs = SETTINGS[setting]
    model = MODELS[arch]().eval()
    for name, p in model.named_parameters():
        if name.endswith(freeze) and freeze:
            p.requires_grad_(False)
    ref = copy.deepcopy(model)
    start = copy.deepcopy(model)
    data = [torch.randint(0, model.config.vocab_size, (2, 12)) for _ in range(STEPS)]
    ref_coefs = train(make_lomo_optim(ref_cls, ref, **kwargs), ref, data, "clip_grad_norm" in kwargs)
    our_coefs = train(ours_cls(model, lr=LR, **kwargs, **ours_kwargs), model, data, "clip_grad_norm" in kwargs)
    if "clip_grad_norm" in kwargs:  # the settings must actually clip
        assert min(ref_coefs) < 1.0
        assert our_coefs == pytest.approx(ref_coefs, rel=TOL)
    if "clip_grad_value" in kwargs:
        probe = copy.deepcopy(start)
        probe(input_ids=data[0], labels=data[0]).loss.backward()
        assert max(p.grad.abs().max().item() for p in probe.parameters() if p.grad is not None) > CLIP_VALUE
    errors = {name: max_rel_err(p, q) for (name, p), q in zip(model.named_parameters(), ref.parameters())}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL, f"{worst}: {errors[worst]:.2e}"
    moved = max(max_rel_err(p, q) for p, q in zip(model.parameters(), start.parameters()))
    assert moved > 10 * TOL  # training did something worth comparing
    return errors[worst]


@pytest.mark.parametrize("setting", ["plain", "weight_decay", "clip_value", "clip_norm"])
@pytest.mark.parametrize("arch", MODELS)
def test_lomo_matches_lomo_optim(arch, setting):
    check_parity(arch, setting, lk.Lomo, lomo_optim.Lomo)


@pytest.mark.parametrize("setting", ["plain", "all"])
@pytest.mark.parametrize("statistics", ["recompute", "materialize"])
@pytest.mark.parametrize("arch", MODELS)
def test_adalomo_matches_lomo_optim(arch, statistics, setting):
    check_parity(arch, setting, lk.AdaLomo, lomo_optim.AdaLomo, freeze=("c_attn.bias",), statistics=statistics)

