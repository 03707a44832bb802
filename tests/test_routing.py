"""Weight uses are routed, not modules: a held model computes exactly the plain model's math.

* forward: bitwise equal to the plain model's, for module subclasses with their own forward;
* every weight used k >= 1 times gets one update from the summed gradient, after every use's input
  gradient saw the old weight: equal to torch.optim.SGD (with weight decay, value and norm clipping)
  within 1e-5 relative, fp32;
* unfusable uses raise before any weight changes; the hold ends with close(), `with`, and GC.
"""
import copy
import gc
import weakref
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lomo_kernels as lk
from lomo_kernels.testing import AllocationTracker, tiny_gpt2, tiny_llama

TOL = 1e-5


@pytest.fixture(params=["by_class", "by_mode"], autouse=True)
def routing_way(request, monkeypatch):
    """Every test runs with both ways of routing: HeldParameter (plain Parameters) and the mode (what
    FakeTensor parameters get)."""
    monkeypatch.setattr(lk.routing, "BY_CLASS", request.param == "by_class")
    return request.param


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def sgd_steps(model, batches, loss_fn, lr, weight_decay=0.0, clip_norm=None, clip_value=None):
    """torch.optim.SGD with lomo-optim's clipping order (coefficient from the raw norm, then clamp, then scale)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay)
    for batch in batches:
        opt.zero_grad()
        loss_fn(model, batch).backward()
        params = [p for p in model.parameters() if p.grad is not None]
        coef = 1.0
        if clip_norm is not None:
            coef = min(1.0, clip_norm / (torch.nn.utils.get_total_norm([p.grad for p in params]).item() + 1e-6))
        if clip_value is not None:
            torch.nn.utils.clip_grad_value_(params, clip_value)
        for p in params:
            p.grad.mul_(coef)
        opt.step()


def fused_steps(model, batches, loss_fn, lr, weight_decay=0.0, clip_norm=None, clip_value=None, **kwargs):
    with lk.Lomo(model, lr=lr, weight_decay=weight_decay, clip_grad_norm=clip_norm, clip_grad_value=clip_value,
                 **kwargs) as opt:
        for batch in batches:
            opt.fused_backward(loss_fn(model, batch), lr)


def assert_same(model, ref, tol=TOL):
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert rel_err(p, q) <= tol, f"{name}: relative error {rel_err(p, q):.2e}"


SETTINGS = [dict(), dict(weight_decay=0.1), dict(clip_norm=0.05, weight_decay=0.05),
            dict(clip_value=0.005, weight_decay=0.05), dict(clip_norm=0.05, clip_value=0.01)]
SETTING_IDS = ["plain", "wd", "norm+wd", "value+wd", "norm+value"]


class Reused(nn.Module):
    """One block called twice per forward (layer sharing), a raw F.linear on a module's weight beside
    the module, and an embedding looked up twice."""

    def __init__(self, vocab=23, dim=12):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.block = nn.Linear(dim, dim)
        self.side = nn.Linear(dim, dim, bias=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids):
        h = self.emb(ids) + 0.5 * self.emb(ids.flip(-1))
        for _ in range(2):
            h = torch.tanh(self.block(h)) + h
        h = h + F.linear(h, self.side.weight) + self.side(h) * 0.3
        return self.head(self.norm(h))


def reused_loss(model, ids):
    logits = model(ids)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1))


def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
def test_reused_weights_equal_torch_sgd(setting):
    model = Reused()
    ref = copy.deepcopy(model)
    data = [torch.randint(0, 23, (3, 7)) for _ in range(3)]
    sgd_steps(ref, data, reused_loss, lr=0.1, **setting)
    fused_steps(model, data, reused_loss, lr=0.1, **setting)
    assert_same(model, ref)


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
def test_tied_gpt2_equals_torch_sgd(setting):
    model = tiny_gpt2()
    ref = copy.deepcopy(model)
    data = [torch.randint(0, 97, (2, 9)) for _ in range(3)]
    sgd_steps(ref, data, lm_loss, lr=0.05, **setting)
    fused_steps(model, data, lm_loss, lr=0.05, **setting)
    assert_same(model, ref)


def test_tied_weight_needs_no_weight_sized_buffer():
    # 8 tokens against an 8192 × 128 tied embedding (4 MiB): the embedding use's one-hot is 8 × 8192, and
    # the reference backend's GEMM blocks are at most 1 MiB.
    model = tiny_gpt2(vocab_size=8192, n_embd=128, layers=1)
    weight = model.transformer.wte.weight
    ids = torch.randint(0, 8192, (1, 8))
    # value clipping: the uses must be summed first; the reference backend (its blocks are visible to the tracker)
    opt = lk.Lomo(model, lr=0.01, clip_grad_value=0.01, backend="torch")
    loss = lm_loss(model, ids)
    with AllocationTracker() as tracker:
        opt.fused_backward(loss, 0.01)
    weight_bytes = weight.numel() * weight.element_size()
    assert tracker.largest.nbytes <= weight_bytes / 4, tracker.largest


def test_adalomo_on_reused_weights_sees_the_summed_gradient():
    """AdaLomo's statistics need the whole gradient: its fused run equals one on a model where each
    use's gradient is materialized and summed by autograd (statistics="materialize" after a hook sum)."""
    model = Reused()
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 23, (3, 7))
    with lk.AdaLomo(model, lr=0.01, weight_decay=0.1, clip_grad_value=0.5) as opt:
        opt.fused_backward(reused_loss(model, ids), 0.01)
    # Reference: autograd sums each weight's uses; the rule runs on the summed gradient (dense path).
    reference_opt = lk.AdaLomo(ref, lr=0.01, weight_decay=0.1, clip_grad_value=0.5)
    grads = torch.autograd.grad(reused_loss(_plain(ref, reference_opt), ids), list(ref.parameters()))
    for p, g in zip(ref.parameters(), grads):
        reference_opt.dense_apply(p, g * reference_opt.loss_scale)
    assert_same(model, ref, tol=1e-5)


def _plain(model, opt):
    """The model as a plain one (the optimizer's rules stay callable)."""
    opt.held.release()
    return model


def test_forward_is_bitwise_the_plain_models():
    from transformers import GemmaConfig, GemmaForCausalLM, OPTConfig, OPTForCausalLM

    models = [
        tiny_llama(), tiny_gpt2(),
        GemmaForCausalLM(GemmaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8)),
        OPTForCausalLM(OPTConfig(vocab_size=97, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                 num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64,
                                 dropout=0.0, attention_dropout=0.0)),
    ]
    ids = torch.randint(1, 97, (2, 9))
    for model in models:
        model.train()
        plain = model(input_ids=ids, labels=ids)
        with lk.Lomo(model, lr=0.0, fused_cross_entropy=False):
            held = model(input_ids=ids, labels=ids)
            assert torch.equal(held.logits, plain.logits), type(model).__name__
            assert torch.equal(held.loss, plain.loss)
            held.loss.detach_()
        # With the fused loss (on by default where it applies): the logits stay bitwise; a labelled training
        # forward returns the loss without logits, equal to the model's own within fp32 rounding.
        with lk.Lomo(model, lr=0.0) as opt:
            assert torch.equal(model(input_ids=ids).logits, plain.logits), type(model).__name__
            held = model(input_ids=ids, labels=ids)
            if opt.fused_cross_entropy:
                assert held.logits is None
                assert abs(held.loss.item() - plain.loss.item()) <= 1e-6 * plain.loss.item()
            else:
                assert torch.equal(held.loss, plain.loss)
            held.loss.detach_()


def test_gemma_scaled_tied_embedding_trains_like_sgd():
    from transformers import GemmaConfig, GemmaForCausalLM

    model = GemmaForCausalLM(GemmaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    ref = copy.deepcopy(model)
    data = [torch.randint(0, 97, (2, 9)) for _ in range(3)]
    sgd_steps(ref, data, lm_loss, lr=0.05, weight_decay=0.1, clip_norm=0.5)
    fused_steps(model, data, lm_loss, lr=0.05, weight_decay=0.1, clip_norm=0.5)
    assert_same(model, ref)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(reentrant):
    model = tiny_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    ref = copy.deepcopy(model)
    data = [torch.randint(0, 97, (2, 9)) for _ in range(2)]
    sgd_steps(ref, data, lm_loss, lr=0.05, weight_decay=0.1, clip_norm=0.5)
    fused_steps(model, data, lm_loss, lr=0.05, weight_decay=0.1, clip_norm=0.5)
    assert_same(model, ref)


def test_peft_lora_trains_only_the_adapters_like_sgd():
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                             init_lora_weights=False)
    model = peft.get_peft_model(base, config)
    ref = copy.deepcopy(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    data = [torch.randint(0, 97, (2, 9)) for _ in range(3)]
    sgd_steps(ref, data, lm_loss, lr=0.05, weight_decay=0.1)
    with lk.Lomo(model, lr=0.05, weight_decay=0.1) as opt:
        held = {site.name for site in opt.held.sites.values()}
        assert held and all("lora_" in name for name in held)
        for ids in data:
            opt.fused_backward(lm_loss(model, ids), 0.05)
    assert_same(model, ref)
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name


# --- unfusable uses ----------------------------------------------------------------------------------

class Misuse(nn.Module):
    def __init__(self, use):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.use = use

    def forward(self, x):
        return self.lin(x).sum() + self.use(x, self.lin.weight)


@pytest.mark.parametrize("use, op", [
    (lambda x, w: (x @ w.t()).sum(), "Tensor.t"),
    (lambda x, w: w.sum(), "Tensor.sum"),
    (lambda x, w: torch.matmul(x, w.T).sum(), "Tensor.T"),
    (lambda x, w: F.linear(x, w.to(torch.float64).float()).sum(), "Tensor.to"),
], ids=["t", "sum", "T", "to"])
def test_unfusable_use_raises_in_the_forward(use, op):
    model = Misuse(use)
    before = [p.detach().clone() for p in model.parameters()]
    with lk.Lomo(model, lr=0.1):
        with pytest.raises(lk.UnfusedUseError, match=rf"'lin.weight'.*`{op}`"):
            model(torch.randn(2, 4))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_use_outside_the_forward_is_found_before_the_backward():
    model = tiny_llama()
    before = [p.detach().clone() for p in model.parameters()]
    opt = lk.Lomo(model, lr=0.1)
    ids = torch.randint(0, 97, (2, 9))
    loss = lm_loss(model, ids) + 1e-3 * model.lm_head.weight.square().sum()  # outside every held forward
    with pytest.raises(lk.UnfusedUseError, match="'lm_head.weight'.*PowBackward0"):
        opt.fused_backward(loss, 0.1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    # reading weights outside the forward (logging, comparisons) is the caller's business
    assert model.lm_head.weight.double().norm().requires_grad


def test_graph_built_before_the_hold_is_refused_before_the_backward():
    model = tiny_llama()
    before = [p.detach().clone() for p in model.parameters()]
    ids = torch.randint(0, 97, (2, 9))
    loss = lm_loss(model, ids)  # an ordinary graph: every weight has its AccumulateGrad
    opt = lk.Lomo(model, lr=0.1)
    with pytest.raises(lk.UnfusedUseError, match="reaches the loss through"):
        opt.fused_backward(loss, 0.1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_no_grad_uses_pass_through():
    model = tiny_llama()
    with lk.Lomo(model, lr=0.1):
        with torch.no_grad():
            model(input_ids=torch.randint(0, 97, (1, 5)))
            model.lm_head.weight.sum()  # fine without autograd
        state = model.state_dict()
        assert all(not t.requires_grad for t in state.values())


# --- the hold and its end ------------------------------------------------------------------------------

def _is_plain(model):
    return ("_lomo_hold" not in model.__dict__
            and not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
            and all(type(p) is nn.Parameter for p in model.parameters()))


def test_close_with_and_gc_end_the_hold():
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 9))
    opt = lk.Lomo(model, lr=0.1)
    assert not _is_plain(model)
    opt.close()
    assert _is_plain(model)
    with pytest.raises(RuntimeError, match="closed"):
        opt.fused_backward(lm_loss(model, ids), 0.1)

    with lk.AdaLomo(model, lr=0.1):
        assert not _is_plain(model)
    assert _is_plain(model)

    opt = lk.Lomo(model, lr=0.1)
    ref = weakref.ref(opt)
    del opt
    gc.collect()
    assert ref() is None and _is_plain(model)
    # a plain optimizer now trains the plain model as usual
    torch.optim.SGD(model.parameters(), lr=0.0).zero_grad()
    lm_loss(model, ids).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_second_optimizer_names_the_holder():
    model = tiny_llama()
    opt = lk.Lomo(model, lr=0.1)
    with pytest.raises(RuntimeError, match=r"already held by lomo_kernels\.Lomo\(lr=0\.1\) at 0x"):
        lk.AdaLomo(model)
    opt.close()
    lk.AdaLomo(model).close()


def test_plain_backward_on_a_held_model_raises_before_any_write():
    model = tiny_llama()
    before = [p.detach().clone() for p in model.parameters()]
    opt = lk.Lomo(model, lr=0.1)
    loss = lm_loss(model, torch.randint(0, 97, (2, 9)))
    with pytest.raises(RuntimeError, match="fused_backward"):
        loss.backward()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())
    assert opt.step_count == 0


def test_release_drops_any_hold():
    model = tiny_llama()
    opt = lk.Lomo(model, lr=0.1)
    lk.release(model)
    assert opt.closed and _is_plain(model)


# --- validation ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls, kwargs, error, message", [
    (lk.AdaLomo, dict(lr="1e-3"), TypeError, r"lr must be a number, got '1e-3' \(str\)"),
    (lk.AdaLomo, dict(lr=-1), ValueError, r"lr must be >= 0, got -1\.0"),
    (lk.Lomo, dict(weight_decay="0.1"), TypeError, r"weight_decay must be a number, got '0\.1'"),
    (lk.Lomo, dict(lr=float("nan")), ValueError, r"lr must be finite, got nan"),
    (lk.Lomo, dict(clip_grad_norm=-2), ValueError, r"clip_grad_norm must be > 0, got -2\.0"),
    (lk.Lomo, dict(clip_grad_value=True), TypeError, r"clip_grad_value must be None or a number, got True"),
    (lk.Lomo, dict(backend="gpu"), ValueError, r"backend must be one of .*'gpu'"),
    (lk.Lomo, dict(loss_scale_args=[1]), TypeError, r"loss_scale_args must be None or a dict"),
    (lk.Lomo, dict(no_decay=["nope"]), ValueError, r"no_decay names .*'nope'"),
    (lk.AdaLomo, dict(decay_rate=0.5), ValueError, r"decay_rate must be < 0, got 0\.5"),
    (lk.AdaLomo, dict(eps=(1e-30, "x")), TypeError, r"eps\[1\] must be a number, got 'x'"),
    (lk.AdaLomo, dict(clip_threshold=0), ValueError, r"clip_threshold must be > 0, got 0\.0"),
    (lk.AdaLomo, dict(statistics="exact"), ValueError, r"statistics must be one of .*'exact'"),
    (lk.AdaLomo, dict(loss_scale=-4), ValueError, r"loss_scale must be >= 0, got -4\.0"),
])
def test_bad_hyper_parameters_fail_at_construction(cls, kwargs, error, message):
    model = tiny_llama()
    with pytest.raises(error, match=message):
        cls(model, **kwargs)
    assert _is_plain(model)


def test_bad_lr_at_fused_backward_names_it_and_writes_nothing():
    model = tiny_llama()
    before = [p.detach().clone() for p in model.parameters()]
    opt = lk.AdaLomo(model, lr=0.1)
    loss = lm_loss(model, torch.randint(0, 97, (2, 9)))
    with pytest.raises(TypeError, match=r"lr must be a number, got '0\.1' \(str\)"):
        opt.fused_backward(loss, "0.1")
    with pytest.raises(ValueError, match=r"lr must be >= 0, got -0\.5"):
        opt.fused_backward(loss, -0.5)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    opt.fused_backward(loss, 0.1)  # the graph is still there: nothing ran


def test_reentrant_checkpointing_of_a_shared_weight_raises():
    from torch.utils.checkpoint import checkpoint

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            for _ in range(2):  # one weight in two reentrant-checkpointed segments: its uses are invisible
                x = checkpoint(lambda t: torch.tanh(self.lin(t)), x, use_reentrant=True)
            return x.sum()

    model = Shared()
    opt = lk.Lomo(model, lr=0.1)
    with pytest.raises(RuntimeError, match="'lin.weight' is used again after its update"):
        opt.fused_backward(model(torch.randn(3, 8, requires_grad=True)), 0.1)


def test_in_place_ops_on_routed_outputs_work_and_stay_exact():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.lin = nn.Embedding(11, 6), nn.Linear(6, 6)

        def forward(self, ids):
            h = self.emb(ids)
            h += 1.0             # in place on the embedding's output
            y = self.lin(h)
            y += h               # and on the linear's (3-D input: F.linear returns a view of its addmm)
            return y.square().mean()

    model = InPlace()
    ref = copy.deepcopy(model)
    data = [torch.randint(0, 11, (2, 5)) for _ in range(2)]
    sgd_steps(ref, data, lambda m, ids: m(ids), lr=0.1, weight_decay=0.1)
    fused_steps(model, data, lambda m, ids: m(ids), lr=0.1, weight_decay=0.1)
    assert_same(model, ref)


def test_unfused_weights_take_the_dense_route_exactly():
    model = Misuse(lambda x, w: (x @ w.t()).square().sum())
    ref = copy.deepcopy(model)
    data = [torch.randn(2, 4) for _ in range(2)]
    with pytest.raises(lk.UnfusedUseError) as info:
        with lk.Lomo(model, lr=0.1):
            model(data[0])
    assert info.value.parameter == "lin.weight" and info.value.op == "Tensor.t"
    sgd_steps(ref, data, lambda m, x: m(x), lr=0.1, weight_decay=0.1, clip_value=0.5)
    fused_steps(model, data, lambda m, x: m(x), lr=0.1, weight_decay=0.1, clip_value=0.5, unfused=["lin.weight"])
    assert_same(model, ref)


def test_graph_is_walked_once_per_step_with_a_norm_phase():
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 9))
    with lk.Lomo(model, lr=0.01, clip_grad_norm=1.0) as opt:
        with mock.patch.object(opt.held, "check_graph", wraps=opt.held.check_graph) as walk:
            opt.fused_backward(model(input_ids=ids, labels=ids).loss, 0.01)  # norm phase + apply phase
            assert walk.call_count == 1
            opt.fused_backward(model(input_ids=ids, labels=ids).loss, 0.01)  # a new graph is walked again
            assert walk.call_count == 2
