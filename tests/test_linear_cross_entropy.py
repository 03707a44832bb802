"""Fused linear cross-entropy with the LM-head update in its backward (issue 13, the op layer)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.loss.loss_utils import ForCausalLMLoss

import lomo_kernels as lk
from lomo_kernels.fused_cross_entropy import LomoHead, NormHead, OptimizerHead, fused_linear_cross_entropy
from lomo_kernels.ops import linear_cross_entropy as lce
from lomo_kernels.testing import AllocationTracker


def _inputs(B=2, S=9, d=16, V=97, dtype=torch.float32, seed=0, ignored=3):
    g = torch.Generator().manual_seed(seed)
    H = torch.randn(B, S, d, generator=g).to(dtype)
    W = (torch.randn(V, d, generator=g) * 0.5).to(dtype)
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, :ignored] = -100
    return H, W, labels


def _softcapped(logits, cap):
    if cap is None:
        return logits
    # Gemma-2's final_logit_softcapping, as in Gemma2ForCausalLM.forward
    logits = logits / cap
    logits = torch.tanh(logits)
    return logits * cap


def _rel(a, b):
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)


# --- the loss ------------------------------------------------------------------------------------

@pytest.mark.parametrize("V,chunk", [(97, 32), (97, None), (1000, 128), (1000, 300)])
@pytest.mark.parametrize("num_items", [None, 11, "tensor"])
@pytest.mark.parametrize("softcap", [None, 2.5])
def test_loss_equals_transformers(V, chunk, num_items, softcap):
    H, W, labels = _inputs(V=V, seed=V)
    n = torch.tensor(13) if num_items == "tensor" else num_items
    got = fused_linear_cross_entropy(H, W, labels, updater=None, shift=True, num_items_in_batch=n,
                                     softcap=softcap, chunk_size=chunk)
    ref = ForCausalLMLoss(_softcapped(H @ W.t(), softcap), labels, V, num_items_in_batch=n)
    assert got.dtype == torch.float32 and got.shape == ()
    assert abs(got.item() - ref.item()) <= 1e-6 * abs(ref.item())


@pytest.mark.parametrize("num_items", [None, 11])
def test_label_smoothing_equals_cross_entropy_and_label_smoother(num_items):
    from transformers.trainer_pt_utils import LabelSmoother

    H, W, labels = _inputs(V=1000, seed=3)
    eps = 0.1
    got = fused_linear_cross_entropy(H, W, labels, updater=None, shift=True, label_smoothing=eps,
                                     num_items_in_batch=num_items, chunk_size=256)
    logits = (H @ W.t()).float()
    shifted = lk.fused_cross_entropy.shift_labels(labels)
    red = "mean" if num_items is None else "sum"
    ref = F.cross_entropy(logits.view(-1, 1000), shifted.reshape(-1), label_smoothing=eps, reduction=red)
    if num_items is not None:
        ref = ref / num_items
    assert abs(got.item() - ref.item()) <= 1e-6 * abs(ref.item())
    smoother = LabelSmoother(epsilon=eps)(
        {"logits": logits}, labels, shift_labels=True, num_items_in_batch=num_items)
    assert abs(got.item() - smoother.item()) <= 1e-6 * abs(smoother.item())


def test_bias_and_unshifted_labels():
    H, W, labels = _inputs(V=300, seed=5)
    b = torch.randn(300) * 0.1
    got = fused_linear_cross_entropy(H, W, labels, b, updater=None, chunk_size=128)
    ref = F.cross_entropy((H @ W.t() + b).view(-1, 300), labels.view(-1))
    assert abs(got.item() - ref.item()) <= 1e-6 * abs(ref.item())


# --- backward: dH and the LM-head update against the unfused path ---------------------------------

def _unfused_step(H, W, labels, b=None, *, lr, wd, clip_value, loss_scale, softcap=None, eps=0.0, num_items=None):
    """Plain logits + F.cross_entropy + autograd + torch SGD (decay) with value clipping and loss scale."""
    Hr = H.detach().clone().requires_grad_()
    Wr = nn.Parameter(W.detach().clone())
    br = nn.Parameter(b.detach().clone()) if b is not None else None
    logits = _softcapped(F.linear(Hr, Wr, br).float(), softcap)
    shifted = lk.fused_cross_entropy.shift_labels(labels)
    if num_items is None:
        loss = F.cross_entropy(logits.view(-1, W.shape[0]), shifted.reshape(-1), label_smoothing=eps)
    else:
        loss = F.cross_entropy(logits.view(-1, W.shape[0]), shifted.reshape(-1), label_smoothing=eps,
                               reduction="sum") / num_items
    (loss * loss_scale).backward()
    Wr.grad.div_(loss_scale)
    if clip_value is not None:
        torch.nn.utils.clip_grad_value_([Wr], clip_value)
    opt = torch.optim.SGD([Wr], lr=lr, weight_decay=wd)
    opt.step()
    return loss.detach(), Hr.grad / loss_scale, Wr.detach(), (br.grad / loss_scale if br is not None else None)


@pytest.mark.parametrize("V,chunk", [(97, 40), (1000, 128)])
@pytest.mark.parametrize("softcap,eps,num_items", [(None, 0.0, None), (3.0, 0.1, 17)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_dh_and_update_equal_unfused(V, chunk, softcap, eps, num_items, with_bias):
    H, W, labels = _inputs(V=V, seed=7)
    b = torch.randn(V) * 0.1 if with_bias else None
    hp = dict(lr=0.5, wd=0.1, clip_value=2e-3, loss_scale=8.0)
    ref_loss, ref_dh, ref_w, ref_db = _unfused_step(H, W, labels, b, softcap=softcap, eps=eps, num_items=num_items,
                                                    **hp)
    Hf = H.clone().requires_grad_()
    Wf = W.clone()
    bf = nn.Parameter(b.clone()) if b is not None else None
    head = LomoHead(lr=hp["lr"], weight_decay=hp["wd"], clip_value=hp["clip_value"], loss_scale=hp["loss_scale"])
    loss = fused_linear_cross_entropy(Hf, Wf, labels, bf, updater=head, shift=True, softcap=softcap,
                                      label_smoothing=eps, num_items_in_batch=num_items, chunk_size=chunk)
    assert abs(loss.item() - ref_loss.item()) <= 1e-6 * abs(ref_loss.item())
    (loss * hp["loss_scale"]).backward()
    assert _rel(Hf.grad / hp["loss_scale"], ref_dh) <= 1e-5
    assert _rel(Wf, ref_w) <= 1e-5
    assert (Wf - W).abs().max() > 0  # it moved
    if b is not None:
        assert _rel(bf.grad / hp["loss_scale"], ref_db) <= 1e-5


def test_op_api_equals_function():
    H, W, labels = _inputs(V=1000, seed=9)
    shifted = lk.fused_cross_entropy.shift_labels(labels)
    W1, W2 = W.clone(), W.clone()
    args = dict(lr=0.3, weight_decay=0.05, clip_value=None, loss_scale=4.0)
    loss1, dh1, db1 = lk.linear_cross_entropy_update_(H, W1, shifted, grad_loss=4.0, chunk_size=256, **args)
    H2 = H.clone().requires_grad_()
    loss2 = fused_linear_cross_entropy(H2, W2, shifted, updater=LomoHead(**args), chunk_size=256)
    (loss2 * 4.0).backward()
    assert db1 is None and dh1.shape == H.shape
    assert torch.equal(loss1, loss2.detach()) and torch.allclose(dh1, H2.grad, rtol=1e-6, atol=1e-9)
    assert _rel(W1, W2) <= 1e-6


def test_norm_phase_is_exact():
    H, W, labels = _inputs(V=1000, seed=11)
    Wr = nn.Parameter(W.clone())
    logits = H @ Wr.t()
    (ForCausalLMLoss(logits, labels, 1000) * 16.0).backward()
    expect = (Wr.grad / 16.0).double().square().sum().item()
    stats = torch.zeros(2)
    Wf = W.clone()
    Hf = H.clone().requires_grad_()
    loss = fused_linear_cross_entropy(Hf, Wf, labels, updater=NormHead(stats, loss_scale=16.0), shift=True,
                                      chunk_size=128)
    (loss * 16.0).backward()
    assert torch.equal(Wf, W)  # the norm phase writes nothing
    assert abs(stats[0].item() - expect) <= 1e-5 * expect and stats[1].item() == 0
    stats2 = torch.zeros(2)
    lk.linear_cross_entropy_grad_sqnorm_(stats2, H, W, lk.fused_cross_entropy.shift_labels(labels), loss_scale=16.0,
                                         grad_loss=16.0, chunk_size=300)
    assert abs(stats2[0].item() - expect) <= 1e-5 * expect


# --- 16-bit inputs, fp32 accumulation ------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_inputs_fp32_accumulation(dtype):
    H, W, labels = _inputs(V=1000, seed=13, dtype=dtype)
    H32, W32 = H.float(), W.float()
    lr, wd = 0.05, 0.1
    # the exact math on the 16-bit values, in fp32
    Wr = nn.Parameter(W32.clone())
    Hr = H32.clone().requires_grad_()
    ref = ForCausalLMLoss(Hr @ Wr.t(), labels, 1000)
    ref.backward()
    exact_w = W32 * (1 - lr * wd) - lr * Wr.grad
    Hf = H.clone().requires_grad_()
    Wf = W.clone()
    loss = fused_linear_cross_entropy(Hf, Wf, labels, updater=LomoHead(lr=lr, weight_decay=wd), shift=True,
                                      chunk_size=256)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) <= 1e-6 * abs(ref.item())
    loss.backward()
    assert Hf.grad.dtype == dtype
    assert torch.equal(Hf.grad, Hr.grad.to(dtype)) or _rel(Hf.grad.float(), Hr.grad) <= 1e-2
    # nearest rounding: within one ulp of the rounded exact update
    rounded = exact_w.to(dtype)
    ulps = (Wf.view(torch.int16).int() - rounded.view(torch.int16).int()).abs()
    assert ulps.max() <= 1 and (ulps == 0).float().mean() > 0.99


def test_bf16_stochastic_rounding_matches_whole_weight_update():
    H, W, labels = _inputs(V=1000, seed=17, dtype=torch.bfloat16)
    shifted = lk.fused_cross_entropy.shift_labels(labels)
    # dlogits of the whole vocabulary, in fp32 (fine at this size), for the unfused fused-op update
    Hr = H.float().reshape(-1, 16)
    logits = (Hr @ W.float().t()).requires_grad_()
    F.cross_entropy(logits, shifted.reshape(-1)).backward()
    W_ref = W.clone()
    lk.linear_update_(W_ref, Hr, logits.grad, lr=0.05, rounding="stochastic", seed=1234, backend="torch")
    Wf = W.clone()
    loss = fused_linear_cross_entropy(H.clone().requires_grad_(), Wf, shifted,
                                      updater=LomoHead(lr=0.05, rounding="stochastic", seed=1234), chunk_size=128)
    loss.backward()
    diff = (Wf.view(torch.int16).int() - W_ref.view(torch.int16).int()).abs()
    assert diff.max() <= 1 and (diff != 0).float().mean() < 1e-3  # same per-element random numbers
    Wg = W.clone()
    fused_linear_cross_entropy(H.clone().requires_grad_(), Wg, shifted,
                               updater=LomoHead(lr=0.05, rounding="stochastic", seed=1234), chunk_size=300).backward()
    assert (Wg.view(torch.int16).int() - Wf.view(torch.int16).int()).abs().max() <= 1  # chunking is not the key


# --- edge cases ----------------------------------------------------------------------------------

@pytest.mark.parametrize("num_items", [None, 5])
def test_all_ignored_batch(num_items):
    H, W, labels = _inputs(V=97)
    labels[:] = -100
    Hf, Wf = H.clone().requires_grad_(), W.clone()
    loss = fused_linear_cross_entropy(Hf, Wf, labels, updater=LomoHead(lr=0.1, weight_decay=0.0), shift=True,
                                      num_items_in_batch=num_items, chunk_size=32)
    assert loss.item() == 0.0 and math.isfinite(loss.item())
    loss.backward()
    assert torch.equal(Wf, W) and torch.isfinite(Hf.grad).all() and Hf.grad.abs().max() == 0


def test_label_out_of_range_raises_before_any_write():
    H, W, labels = _inputs(V=97)
    labels[1, 4] = 97
    Wf = W.clone()
    with pytest.raises(ValueError, match="label 97 is out of range for a vocabulary of 97"):
        fused_linear_cross_entropy(H, Wf, labels, updater=LomoHead(lr=0.1), shift=True)
    with pytest.raises(ValueError, match="out of range"):
        lk.linear_cross_entropy_update_(H, Wf, labels, lr=0.1)
    labels[1, 4] = -5
    with pytest.raises(ValueError, match="label -5"):
        fused_linear_cross_entropy(H, Wf, labels, updater=None)
    assert torch.equal(Wf, W)


def test_argument_errors():
    H, W, labels = _inputs(V=97)
    with pytest.raises(ValueError, match="does not match"):
        fused_linear_cross_entropy(H[..., :8], W, labels, updater=None)
    with pytest.raises(ValueError, match="labels"):
        fused_linear_cross_entropy(H, W, labels[:, :3], updater=None)
    with pytest.raises(ValueError, match="label_smoothing"):
        fused_linear_cross_entropy(H, W, labels, updater=None, label_smoothing=1.5)
    with pytest.raises(ValueError, match="softcap"):
        fused_linear_cross_entropy(H, W, labels, updater=None, softcap=-1.0)
    with pytest.raises(ValueError, match="lr"):
        LomoHead(lr=float("nan"))


# --- memory ----------------------------------------------------------------------------------------

def test_no_logits_and_no_weight_sized_tensor():
    T, d, V, chunk = 64, 32, 1000, 128
    g = torch.Generator().manual_seed(0)
    H = torch.randn(1, T, d, generator=g).requires_grad_()
    W = torch.randn(V, d, generator=g) * 0.3
    labels = torch.randint(0, V, (1, T), generator=g)
    with AllocationTracker() as tracker:
        loss = fused_linear_cross_entropy(H, W, labels, updater=LomoHead(lr=0.1, weight_decay=0.01, clip_value=1e-3),
                                          shift=True, chunk_size=chunk)
        loss.backward()
    sizes = [a.shape for a in tracker.allocations]
    biggest = max(math.prod(s) for s in sizes)
    assert biggest <= T * chunk, tracker.largest          # one chunk of logits at most
    assert biggest < V * d                                  # nothing weight-sized (V·d = 32000)
    assert not any(len(s) == 2 and s[0] == T and s[1] > chunk for s in sizes)
    assert any(s == (T, chunk) for s in sizes)              # the tracker does see the chunks
    with AllocationTracker() as tracker:                    # the 16-bit path too (fp32 copies of one chunk of W)
        Hb = H.detach().bfloat16().requires_grad_()
        fused_linear_cross_entropy(Hb, W.bfloat16(), labels, updater=LomoHead(lr=0.1, rounding="stochastic"),
                                   shift=True, chunk_size=chunk).backward()
    assert max(a.nbytes for a in tracker.allocations if a.shape != (V, d)) <= 4 * T * chunk


def test_chunk_size_from_memory_budget():
    assert lce.choose_chunk_size(512, 32000) == 2048                      # CPU: 16 MiB
    assert lce.choose_chunk_size(512, 32000, device="cuda") == 8192       # accelerators: 64 MiB
    assert lce.choose_chunk_size(8192, 128256, device="cuda") == 512
    assert lce.choose_chunk_size(8192, 128256, 4096, torch.bfloat16, device="cuda") == 384
    assert lce.choose_chunk_size(8192, 128256) == 128
    assert lce.choose_chunk_size(10**6, 97) == 97
    assert lce.choose_chunk_size(16, 32000, memory_budget=1 << 20) == 4096
    with pytest.raises(ValueError):
        lce.choose_chunk_size(16, 100, memory_budget=0)


def test_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        H = torch.randn(2, 8192, 64, dtype=torch.bfloat16).requires_grad_()
        W = torch.randn(128256, 64, dtype=torch.bfloat16)
        labels = torch.randint(0, 128256, (2, 8192))
        loss = fused_linear_cross_entropy(H, W, labels, updater=LomoHead(lr=0.1, clip_value=1.0), shift=True)
        loss.backward()
        assert loss.shape == () and H.grad.shape == H.shape and H.grad.dtype == torch.bfloat16


# --- the optimizers' rules through OptimizerHead -----------------------------------------------------

class _Head(nn.Module):
    def __init__(self, W):
        super().__init__()
        self.lm_head = nn.Linear(W.shape[1], W.shape[0], bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(W)


def test_optimizer_head_lomo_norm_and_apply():
    H, W, labels = _inputs(V=1000, seed=19)
    model = _Head(W)
    opt = lk.Lomo(model, lr=0.2, clip_grad_norm=0.5, clip_grad_value=1e-2, weight_decay=0.1)
    head = OptimizerHead(opt)
    weight = model.lm_head.weight
    Hf = H.clone().requires_grad_()
    loss = fused_linear_cross_entropy(Hf, weight, labels, updater=head, shift=True, chunk_size=256)
    # the protocol by hand: norm phase, clip coefficient, apply phase (what fused_backward does)
    opt.phase = "norm"
    opt._norm_stats.clear()
    loss.backward(retain_graph=True)
    sq = sum(s[0].item() for s in opt._norm_stats.values())
    opt.clip_coef = min(1.0, 0.5 / (math.sqrt(sq) + 1e-6))
    opt.phase = "apply"
    Hf.grad = None
    loss.backward()
    # reference: torch, unfused, global-norm then value clipping as lomo-optim
    Wr = nn.Parameter(W.clone())
    ForCausalLMLoss(H @ Wr.t(), labels, 1000).backward()
    norm = Wr.grad.norm().item()
    assert abs(math.sqrt(sq) - norm) <= 1e-5 * norm
    c = min(1.0, 0.5 / (norm + 1e-6))
    expect = W * (1 - 0.2 * 0.1) - 0.2 * c * Wr.grad.clamp(-1e-2, 1e-2)
    assert _rel(weight.detach(), expect) <= 1e-5
    opt.close()


@pytest.mark.parametrize("clip_grad_value", [None, 1e-3])
def test_optimizer_head_adalomo_equals_its_linear_apply(clip_grad_value):
    H, W, labels = _inputs(V=1000, seed=23)
    shifted = lk.fused_cross_entropy.shift_labels(labels)
    m1, m2 = _Head(W), _Head(W)
    kw = dict(lr=0.05, clip_grad_value=clip_grad_value, weight_decay=0.01, loss_scale=2.0)
    opt1, opt2 = lk.AdaLomo(m1, **kw), lk.AdaLomo(m2, **kw)
    loss = fused_linear_cross_entropy(H.clone().requires_grad_(), m1.lm_head.weight, shifted,
                                      updater=OptimizerHead(opt1), chunk_size=128)
    (loss * 2.0).backward()
    # reference: AdaLomo's own rule on the full gradient of the same step (loss scale 2)
    H2 = H.reshape(-1, 16)
    logits = (H2 @ W.t()).requires_grad_()
    (F.cross_entropy(logits, shifted.reshape(-1)) * 2.0).backward()
    opt2.linear_apply(m2.lm_head.weight, H2, logits.grad)
    w1, w2 = m1.lm_head.weight.detach(), m2.lm_head.weight.detach()
    assert (w1 - W).abs().max() > 0
    assert _rel(w1 - W, w2 - W) <= 1e-4  # the update itself
    assert _rel(w1, w2) <= 1e-6
    assert _rel(opt1.exp_avg_sq_row["lm_head.weight"], opt2.exp_avg_sq_row["lm_head.weight"]) <= 1e-5
    assert _rel(opt1.exp_avg_sq_col["lm_head.weight"], opt2.exp_avg_sq_col["lm_head.weight"]) <= 1e-5
    opt1.close()
    opt2.close()


def test_optimizer_head_adamw_chunks_round_independently():
    """bf16 AdamW head, stochastic rounding: rows 0..127 and 128..255 are the same weights with the same
    gradients (no label reaches them), so they see the same fp32 updates; in different chunks they must still
    draw different rounding bits (one seed per chunk), and the state keeps its dtype."""
    H, W, labels = _inputs(V=512, seed=29)
    W = W.to(torch.bfloat16)
    W[128:256] = W[0:128]
    labels = labels.clamp_min(256)
    model = _Head(W.float()).to(torch.bfloat16)
    opt = lk.AdamW(model, lr=1e-2, rounding="stochastic", state_dtype=torch.bfloat16)
    opt.phase = "apply"
    fused_linear_cross_entropy(H.to(torch.bfloat16).requires_grad_(), model.lm_head.weight, labels,
                               updater=OptimizerHead(opt), shift=True, chunk_size=128).backward()
    w = model.lm_head.weight.detach()
    assert not torch.equal(w[:256], W[:256])
    differ = (w[0:128] != w[128:256]).float().mean().item()
    assert differ > 0.05, differ  # the same draws would leave the two copies bitwise equal
    m = opt.exp_avg["lm_head.weight"]
    assert m.dtype == torch.bfloat16 and (m[0:128] != m[128:256]).any()
    opt.close()


def test_optimizer_head_skip_phase_writes_nothing():
    H, W, labels = _inputs(V=97)
    model = _Head(W)
    opt = lk.Lomo(model, lr=0.2)
    opt.phase = "skip"
    Hf = H.clone().requires_grad_()
    fused_linear_cross_entropy(Hf, model.lm_head.weight, labels, updater=OptimizerHead(opt), shift=True).backward()
    assert torch.equal(model.lm_head.weight.detach(), W) and Hf.grad.abs().max() > 0
    opt.close()


# --- a weight with other uses in the step (tied embedding): the deferred record ----------------------

class _Deferring:
    """What a routing site would do for a tied weight: keep the record until the last use's backward."""

    def __init__(self):
        self.records = []

    def passes(self, weight):
        raise AssertionError("a deferring updater is never asked for passes")

    def defer(self, weight):
        return True

    def keep(self, weight, record):
        self.records.append(record)


@pytest.mark.parametrize("clip_value", [None, 1e-3])
def test_tied_embedding_one_update_from_the_summed_gradient(clip_value):
    V, d, B, S = 300, 16, 2, 11
    g = torch.Generator().manual_seed(29)
    W = torch.randn(V, d, generator=g) * 0.5
    A = torch.randn(d, d, generator=g) * 0.3
    ids = torch.randint(0, V, (B, S), generator=g)
    ids[1, 0] = 0                                   # the padding row: no gradient through the embedding
    labels = ids.clone()
    labels[0, :2] = -100
    lr, wd = 0.3, 0.1
    # unfused: tied embedding + head, autograd sums both uses' gradients, one SGD step
    Wr = nn.Parameter(W.clone())
    h = torch.tanh(F.embedding(ids, Wr, padding_idx=0) @ A)
    ForCausalLMLoss(h @ Wr.t(), labels, V).backward()
    if clip_value is not None:
        torch.nn.utils.clip_grad_value_([Wr], clip_value)
    torch.optim.SGD([Wr], lr=lr, weight_decay=wd).step()
    # fused: the head's backward gives dH with the old W and keeps its record; the embedding's dy joins it
    Wf = W.clone()
    e = F.embedding(ids, Wf, padding_idx=0).requires_grad_()
    keeper = _Deferring()
    loss = fused_linear_cross_entropy(torch.tanh(e @ A), Wf, labels, updater=keeper, shift=True, chunk_size=128)
    loss.backward()
    assert torch.equal(Wf, W) and len(keeper.records) == 1   # nothing written yet
    keeper.records[0].apply(Wf, LomoHead(lr=lr, weight_decay=wd, clip_value=clip_value),
                            embedding=[(ids, e.grad, 0)])
    assert _rel(Wf, Wr.detach()) <= 1e-5
    # a norm phase over the same record sees the summed gradient too
    stats = torch.zeros(2)
    keeper.records[0].apply(W.clone(), NormHead(stats), embedding=[(ids, e.grad, 0)])
    Wn = nn.Parameter(W.clone())
    ForCausalLMLoss(torch.tanh(F.embedding(ids, Wn, padding_idx=0) @ A) @ Wn.t(), labels, V).backward()
    assert abs(stats[0].item() - Wn.grad.double().square().sum().item()) <= 1e-5 * stats[0].item()


def test_deferred_with_a_linear_use():
    V, d, T = 200, 8, 10
    g = torch.Generator().manual_seed(31)
    W = torch.randn(V, d, generator=g)
    H = torch.randn(1, T, d, generator=g)
    x2, dy2 = torch.randn(5, d, generator=g), torch.randn(5, V, generator=g)
    labels = torch.randint(0, V, (1, T), generator=g)
    Wr = nn.Parameter(W.clone())
    (ForCausalLMLoss(H @ Wr.t(), labels, V) + (F.linear(x2, Wr) * dy2).sum()).backward()
    keeper = _Deferring()
    Wf = W.clone()
    fused_linear_cross_entropy(H.requires_grad_(), Wf, labels, updater=keeper, shift=True, chunk_size=64).backward()
    keeper.records[0].apply(Wf, LomoHead(lr=0.1), linear=[(x2, dy2)])
    assert _rel(Wf, W - 0.1 * Wr.grad) <= 1e-5


def test_optimizer_head_lomo_bf16_stochastic_equals_its_linear_apply():
    H, W, labels = _inputs(V=1000, seed=37, dtype=torch.bfloat16)
    shifted = lk.fused_cross_entropy.shift_labels(labels)
    m1, m2 = _Head(W.float()).bfloat16(), _Head(W.float()).bfloat16()
    opt1, opt2 = (lk.Lomo(m, lr=0.05, weight_decay=0.1, clip_grad_value=5e-3, seed=7) for m in (m1, m2))
    loss = fused_linear_cross_entropy(H.clone().requires_grad_(), m1.lm_head.weight, shifted,
                                      updater=OptimizerHead(opt1), chunk_size=256)
    loss.backward()
    H2 = H.float().reshape(-1, 16)
    logits = (H2 @ W.float().t()).requires_grad_()
    F.cross_entropy(logits, shifted.reshape(-1)).backward()
    opt2.linear_apply(m2.lm_head.weight, H2, logits.grad)     # its own rule: stochastic rounding, seed per step
    w1, w2 = m1.lm_head.weight.detach(), m2.lm_head.weight.detach()
    diff = (w1.view(torch.int16).int() - w2.view(torch.int16).int()).abs()
    assert not torch.equal(w1, W) and diff.max() <= 1 and (diff != 0).float().mean() < 1e-3
    opt1.close()
    opt2.close()


def test_one_call_op_under_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        H = torch.randn(4096, 64, dtype=torch.bfloat16)
        W = torch.randn(32000, 64, dtype=torch.bfloat16)
        labels = torch.randint(0, 32000, (4096,))
        loss, dh, db = lk.linear_cross_entropy_update_(H, W, labels, lr=0.1, rounding="stochastic", chunk_size=4096)
        stats = torch.zeros(2)
        lk.linear_cross_entropy_grad_sqnorm_(stats, H, W, labels, chunk_size=4096)
    assert dh.shape == H.shape and dh.dtype == torch.bfloat16 and db is None and loss.shape == ()


# --- backends -------------------------------------------------------------------------------------

@pytest.mark.skipif(not lk.available_backends()["cpu"].available, reason="the compiled cpu backend is not built")
@pytest.mark.parametrize("wdtype,rounding,clip", [(torch.float32, "nearest", None), (torch.float32, "nearest", 2e-3),
                                                  (torch.bfloat16, "stochastic", None)])
def test_cpu_backend_equals_torch_backend(wdtype, rounding, clip):
    """backend="cpu": the reference loss math with the C++ rows update; = backend="torch" (fp32 W ≤ 1e-5 of the
    update plus one ulp; bf16 W within one ulp, < 1% of elements differing), loss and dH equal."""
    H, W, labels = _inputs(V=300, dtype=torch.float32, seed=21)
    W = W.to(wdtype)
    out = {}
    for backend in ("torch", "cpu"):
        Wb = W.clone()
        loss, gh, _ = lce.linear_cross_entropy_update_(_flat_hidden(H), Wb, _flat_shifted_labels(labels), lr=0.3,
                                                       weight_decay=0.1, clip_value=clip, rounding=rounding, seed=4,
                                                       chunk_size=128, backend=backend)
        out[backend] = (loss, gh, Wb)
    (l_t, g_t, w_t), (l_c, g_c, w_c) = out["torch"], out["cpu"]
    assert l_c.item() == l_t.item() and torch.equal(g_c, g_t)  # the same torch math
    if wdtype == torch.float32:
        ulp = torch.finfo(torch.float32).eps * w_t.abs().max().item()
        assert (w_c - w_t).abs().max().item() <= 1e-5 * (w_t - W).abs().max().item() + ulp
    else:
        c32, t32 = w_c.float(), w_t.float()
        assert bool(((c32 - t32).abs() <= torch.finfo(wdtype).eps * torch.maximum(c32.abs(), t32.abs())).all())
        assert (c32 != t32).float().mean().item() < 0.01 and not torch.equal(w_c, W)


def _flat_hidden(H):
    return H.reshape(-1, H.shape[-1])


def _flat_shifted_labels(labels):
    from lomo_kernels.fused_cross_entropy import shift_labels
    return shift_labels(labels).reshape(-1)
