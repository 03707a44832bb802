"""End to end: fused training of tiny transformers equals torch.optim.SGD, allocates no weight-sized
tensor during backward, and fails clearly on bad use.

Tolerance: every parameter within 1e-5 relative (Frobenius) of torch.optim.SGD after N steps, fp32.
"""
import copy
import math

import pytest
import torch

import lomo_kernels as lk
from lomo_kernels.testing import AllocationTracker, tiny_gpt2, tiny_llama

STEPS = 3
MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "gpt2-untied": lambda: tiny_gpt2(tie_word_embeddings=False)}


def batches(vocab, n=STEPS, shape=(2, 9)):
    return [torch.randint(0, vocab, shape) for _ in range(n)]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def train_sgd(model, data, lr, weight_decay=0.0, clip_norm=None, clip_value=None):
    """torch.optim.SGD with lomo-optim's clipping order: the norm of the raw gradient gives the
    coefficient, then values are clamped, then scaled by the coefficient."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay)
    for ids in data:
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        params = list(model.parameters())
        coef = 1.0
        if clip_norm is not None:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params]).item()
            coef = min(1.0, clip_norm / (norm + 1e-6))
        if clip_value is not None:
            torch.nn.utils.clip_grad_value_(params, clip_value)
        for p in params:
            p.grad.mul_(coef)
        opt.step()


def train_fused(model, data, lr, weight_decay=0.0, clip_norm=None, clip_value=None):
    opt = lk.Lomo(model, lr=lr, weight_decay=weight_decay, clip_grad_norm=clip_norm, clip_grad_value=clip_value)
    for ids in data:
        loss = model(input_ids=ids, labels=ids).loss
        if clip_norm is not None:
            opt.grad_norm(loss)
        opt.fused_backward(loss, lr)
    return opt


def assert_same_parameters(fused, ref, tol=1e-5):
    for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
        assert rel_err(p, q) <= tol, f"{name}: relative error {rel_err(p, q):.2e}"


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("setting", [
    dict(),
    dict(weight_decay=0.1),
    dict(clip_norm=0.5),
    dict(clip_value=0.01, weight_decay=0.05),
    dict(clip_norm=0.3, clip_value=0.02),
], ids=["plain", "wd", "norm-clip", "value-clip+wd", "both-clips"])
def test_fused_training_equals_torch_sgd(arch, setting):
    model = MODELS[arch]()
    ref = copy.deepcopy(model)
    data = batches(model.config.vocab_size)
    train_sgd(ref, data, lr=0.05, **setting)
    train_fused(model, data, lr=0.05, **setting)
    assert_same_parameters(model, ref)


def test_fused_training_with_gradient_checkpointing():
    model = tiny_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ref = copy.deepcopy(model)
    data = batches(model.config.vocab_size)
    train_sgd(ref, data, lr=0.05, weight_decay=0.1)
    train_fused(model, data, lr=0.05, weight_decay=0.1)
    assert_same_parameters(model, ref)


def test_no_weight_sized_tensor_during_fused_backward():
    # Weights dominate: a 512-row vocabulary and 256-wide layers, 8 tokens.
    model = tiny_llama(vocab_size=512, hidden_size=256, intermediate_size=384, layers=2)
    largest_weight = max(p.numel() * p.element_size() for p in model.parameters() if p.dim() == 2)
    ids = torch.randint(0, 512, (1, 8))

    # The tracker can fail: an ordinary backward builds every weight's gradient.
    baseline = copy.deepcopy(model)
    loss = baseline(input_ids=ids, labels=ids).loss
    with AllocationTracker() as plain:
        loss.backward()
    assert plain.largest.nbytes >= largest_weight

    opt = lk.Lomo(model, lr=0.01, clip_grad_norm=1.0)
    loss = model(input_ids=ids, labels=ids).loss
    with AllocationTracker() as fused:
        opt.grad_norm(loss)
        opt.fused_backward(loss, 0.01)
    assert fused.largest.nbytes < largest_weight / 4, fused.largest
    assert all(p.grad is None for p in model.parameters())


def test_close_restores_ordinary_training():
    model = tiny_llama()
    ids = batches(model.config.vocab_size, n=1)[0]
    before = model(input_ids=ids, labels=ids).loss.item()
    opt = lk.Lomo(model, lr=0.0)
    opt.fused_backward(model(input_ids=ids, labels=ids).loss, 0.0)
    opt.close()
    loss = model(input_ids=ids, labels=ids).loss
    assert loss.item() == pytest.approx(before, rel=1e-6)  # lr=0 changed nothing
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_frozen_parameters_are_left_alone():
    model = tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)
    frozen = model.model.embed_tokens.weight.clone()
    opt = lk.Lomo(model, lr=0.1)
    ids = batches(model.config.vocab_size, n=1)[0]
    opt.fused_backward(model(input_ids=ids, labels=ids).loss, 0.1)
    assert torch.equal(model.model.embed_tokens.weight, frozen)


def test_bf16_model_trains_with_stochastic_rounding_by_default():
    model = tiny_llama().to(torch.bfloat16)
    ref = copy.deepcopy(model).float()
    data = batches(model.config.vocab_size)
    train_fused(model, data, lr=0.05)
    train_sgd(ref, data, lr=0.05)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert rel_err(p.float(), q) < 0.05  # bf16 forward/backward noise, not a parity claim


def test_bad_use_raises_clear_errors_and_writes_nothing():
    model = tiny_llama()
    snapshot = [p.detach().clone() for p in model.parameters()]
    ids = batches(model.config.vocab_size, n=1)[0]
    with pytest.raises(TypeError, match="nn.Module"):
        lk.Lomo(list(model.parameters()))
    with pytest.raises(ValueError, match="clip_grad_norm must be > 0, got 0.0"):
        lk.Lomo(model, clip_grad_norm=0.0)
    frozen = tiny_llama().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        lk.Lomo(frozen)
    opt = lk.Lomo(model, lr=0.1, clip_grad_norm=1.0)
    with pytest.raises(RuntimeError, match="already held by lomo_kernels.Lomo"):
        lk.Lomo(model)
    loss = model(input_ids=ids, labels=ids).loss
    for bad_lr in (math.nan, math.inf, -1.0):
        with pytest.raises(ValueError, match="lr must be"):
            opt.fused_backward(loss, bad_lr)
    with torch.no_grad():
        detached = model(input_ids=ids, labels=ids).loss
    with pytest.raises(ValueError, match="does not require grad"):
        opt.fused_backward(detached, 0.1)
    for p, q in zip(model.parameters(), snapshot):
        assert torch.equal(p, q)


def test_unfusable_use_of_a_held_weight_is_found_in_the_forward():
    lin = torch.nn.Linear(4, 3)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(x).sum() + (x @ self.lin.weight.t()).sum()

    model = Model()
    opt = lk.Lomo(model, lr=0.1)
    before = lin.weight.detach().clone()
    with pytest.raises(lk.UnfusedUseError, match=r"'lin.weight'.*Tensor.t"):
        model(torch.randn(2, 4))
    assert torch.equal(lin.weight, before)
    assert opt.held.forward_depth == 0  # the failed forward left routing off
