"""Fused AdamW (lomo_kernels.AdamW) against torch.optim.AdamW, its ops, memory, bf16 state and resume."""
import copy
import math

import pytest
import torch

import lomo_kernels as lk
from lomo_kernels.kernels import reference_adamw
from lomo_kernels.ops import adamw_update as ops
from lomo_kernels.testing import AllocationTracker, tiny_gpt2, tiny_llama

STEPS = 5
LR = 1e-2
MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
SETTINGS = {
    "plain": {},
    "weight_decay": dict(weight_decay=0.1),
    "all": dict(weight_decay=0.1, clip_grad_norm=0.5, clip_grad_value=0.005),
}


def batches(vocab, n=STEPS, shape=(2, 9)):
    return [torch.randint(0, vocab, shape) for _ in range(n)]


def train_torch(model, data, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, clip_grad_norm=None,
                clip_grad_value=None):
    """torch.optim.AdamW with lomo-optim's clipping order (norm of the raw gradient, clamp, scale)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                            foreach=False)
    coefs = []
    for ids in data:
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        params = [p for p in model.parameters() if p.requires_grad]
        coef = 1.0
        if clip_grad_norm is not None:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params]).item()
            coef = min(1.0, clip_grad_norm / (norm + 1e-6))
            coefs.append(coef)
        if clip_grad_value is not None:
            torch.nn.utils.clip_grad_value_(params, clip_grad_value)
        for p in params:
            p.grad.mul_(coef)
        opt.step()
    return coefs


def train_fused(opt, model, data, lr=LR):
    coefs = []
    for ids in data:
        loss = model(input_ids=ids, labels=ids).loss
        if opt.clip_grad_norm is not None:
            opt.grad_norm(loss)
            coefs.append(opt.clip_coef)
        opt.fused_backward(loss, lr)
    return coefs


def update_rel_err(ours, ref, start):
    """max |ours - ref| / max |ref - start|: the error relative to the update."""
    return ((ours.double() - ref.double()).abs().max() / (ref.double() - start.double()).abs().max()
            .clamp_min(1e-30)).item()


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_parity_with_torch_adamw(arch, setting):
    torch.manual_seed(0)
    kwargs = SETTINGS[setting]
    model = MODELS[arch]().eval()
    if arch == "gpt2":
        # the key third of c_attn.bias has an exactly zero gradient (softmax ignores it): Adam turns its
        # float noise into ±lr steps of no two implementations agree on (DESIGN.md, lomo-optim's note)
        for block in model.transformer.h:
            block.attn.c_attn.bias.requires_grad_(False)
    ref, start = copy.deepcopy(model), copy.deepcopy(model)
    data = batches(model.config.vocab_size)
    ref_coefs = train_torch(ref, data, **kwargs)
    # the optimizer's parity: the same loss as torch's run (the model's own, from logits; the fused loss
    # agrees with it to fp32 rounding, which AdamW's first, sign-like steps amplify: test_fused_loss.py)
    our_coefs = train_fused(lk.AdamW(model, lr=LR, backend="torch", fused_cross_entropy=False, **kwargs), model, data)
    if "clip_grad_norm" in kwargs:
        assert min(ref_coefs) < 1.0  # the setting really clips
        assert our_coefs == pytest.approx(ref_coefs, rel=1e-5)
    if "clip_grad_value" in kwargs:
        probe = copy.deepcopy(start)
        probe(input_ids=data[0], labels=data[0]).loss.backward()
        assert max(p.grad.abs().max().item() for p in probe.parameters() if p.grad is not None) > kwargs["clip_grad_value"]
    errors = {n: update_rel_err(p, q, s) for (n, p), q, s in
              zip(model.named_parameters(), ref.parameters(), start.parameters()) if p.requires_grad}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-5, f"{worst}: {errors[worst]:.2e}"
    moved = {n: (p - s).abs().max().item() for (n, p), s in zip(model.named_parameters(), start.parameters())
             if p.requires_grad}
    assert min(moved.values()) > 0  # every parameter, embedding rows included, was updated


def test_cpu_backend_matches_torch_reference():
    # the compiled AdamW kernels (csrc/cpu/adamw.cpp) are bitwise the reference on fp32 activations
    torch.manual_seed(0)
    model = tiny_llama().eval()
    other = copy.deepcopy(model)
    data = batches(model.config.vocab_size, n=2)
    train_fused(lk.AdamW(model, lr=LR, weight_decay=0.1), model, data)
    train_fused(lk.AdamW(other, lr=LR, weight_decay=0.1, backend="torch"), other, data)
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)


def test_ops_match_torch_adamw_on_a_dense_gradient():
    """Each op against torch.optim.AdamW fed the gradient the op never builds; embeddings: untouched
    rows still move, padding rows get no gradient, repeated rows are summed."""
    torch.manual_seed(1)
    w = torch.randn(40, 24)
    x, dy = torch.randn(13, 24), torch.randn(13, 40)
    idx = torch.tensor([3, 5, 3, 0, 7, 7, 7, 2])
    dy_e = torch.randn(8, 24)
    cases = {
        "linear": (dy.t() @ x, lambda p, m, v, rule: ops.adamw_linear_update_(p, m, v, x, dy, rule, backend="torch")),
        "embedding": (torch.zeros(40, 24).index_add_(0, idx[idx != 7], dy_e[idx != 7]),
                      lambda p, m, v, rule: ops.adamw_embedding_update_(p, m, v, idx, dy_e, rule, padding_idx=7,
                                                                        backend="torch")),
        "dense": (torch.randn(40, 24), None),
    }
    for kind, (grad, call) in cases.items():
        if call is None:
            call = lambda p, m, v, rule, g=grad: ops.adamw_dense_update_(p, m, v, g, rule, backend="torch")  # noqa: E731
        ref = w.clone().requires_grad_(True)
        opt = torch.optim.AdamW([ref], lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.2, foreach=False)
        ours, m, v = w.clone(), torch.zeros_like(w), torch.zeros_like(w)
        for t in range(1, 4):
            ref.grad = grad.clone()
            opt.step()
            call(ours, m, v, ops.AdamRule.torch_adamw(0.01, (0.8, 0.95), 1e-6, 0.2, t))
        upd = (ref.detach() - w).abs().max()
        assert (ours - ref.detach()).abs().max() / upd < 1e-6, kind
        assert torch.allclose(m, opt.state[ref]["exp_avg"], rtol=1e-5, atol=1e-7), kind
        assert torch.allclose(v, opt.state[ref]["exp_avg_sq"], rtol=1e-5, atol=1e-9), kind
        if kind == "embedding":
            assert (ours[1] != w[1]).all() and (ours[7] != w[7]).all()  # untouched and padding rows moved


def test_apollo_style_rule_folds_decay_after_the_update():
    w, g = torch.randn(6, 5), torch.randn(6, 5)
    m, v, p = torch.zeros_like(w), torch.zeros_like(w), w.clone()
    ops.adamw_dense_update_(p, m, v, g, ops.AdamRule.apollo_adamw(0.1, (0.9, 0.99), 1e-6, 0.3, 1), backend="torch")
    m_ref, v_ref = 0.1 * g, 0.01 * g * g
    step = 0.1 * math.sqrt(1 - 0.99) / (1 - 0.9)
    expected = (w - step * m_ref / (v_ref.sqrt() + 1e-6)) * (1 - 0.1 * 0.3)
    assert torch.allclose(p, expected, rtol=1e-6, atol=1e-7)


def test_no_weight_sized_tensor_beyond_the_moments():
    # weights dominate: 4 MiB embedding, 2 MiB MLP weights; the reference's blocks are 1 MiB
    torch.manual_seed(0)
    model = tiny_llama(vocab_size=4096, hidden_size=256, intermediate_size=2048, layers=1)
    weights = [p.numel() * p.element_size() for p in model.parameters() if p.dim() == 2]
    ids = torch.randint(0, 4096, (1, 8))
    baseline = copy.deepcopy(model)
    loss = baseline(input_ids=ids, labels=ids).loss
    with AllocationTracker() as plain:
        loss.backward()
    assert plain.largest.nbytes >= max(weights)  # the tracker sees an ordinary backward's gradients

    opt = lk.AdamW(model, lr=1e-3, weight_decay=0.1, clip_grad_norm=1.0, backend="torch")
    opt.fused_backward(model(input_ids=ids, labels=ids).loss, 1e-3)  # the first step makes m and v (state)
    loss = model(input_ids=ids, labels=ids).loss
    with AllocationTracker() as fused:
        opt.grad_norm(loss)
        opt.fused_backward(loss, 1e-3)
    assert fused.largest.nbytes <= reference_adamw.CHUNK_ELEMENTS * 4 < min(w for w in weights if w > 2**21), \
        fused.largest
    assert all(p.grad is None for p in model.parameters())


def test_bf16_state_is_stochastically_rounded_and_reproducible():
    torch.manual_seed(0)
    start = tiny_llama().eval()
    data = batches(start.config.vocab_size, n=3)
    runs = []
    for seed in (0, 0, 1):
        model = copy.deepcopy(start)
        opt = lk.AdamW(model, lr=LR, state_dtype=torch.bfloat16, seed=seed, backend="torch")
        train_fused(opt, model, data)
        runs.append((opt, [p.detach().clone() for p in model.parameters()]))
    (a, pa), (b, pb), (c, pc) = runs
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert all(t.dtype == torch.bfloat16 for t in a.exp_avg.values())
    assert any(not torch.equal(a.exp_avg[n], c.exp_avg[n]) for n in a.exp_avg)  # the seed drives the rounding
    # close to fp32 state
    ref = copy.deepcopy(start)
    train_fused(lk.AdamW(ref, lr=LR, backend="torch"), ref, data)
    for p, q, s in zip(pa, ref.parameters(), start.parameters()):
        assert update_rel_err(p, q, s) < 0.05


def test_stochastic_state_rounding_is_unbiased():
    # one step on m = 0: m = (1-β1)·g exactly representable in fp32, rounded into bf16 many times
    g = torch.full((4096,), 1.0 + 2.0 ** -10)  # between two bf16 neighbours: 1 and 1 + 2**-7
    rule = ops.AdamRule.torch_adamw(1e-3, (0.0, 0.0), 1e-8, 0.0, 1, state_stochastic=True, seed=5)
    p, m, v = torch.zeros(4096), torch.zeros(4096, dtype=torch.bfloat16), torch.zeros(4096, dtype=torch.bfloat16)
    ops.adamw_dense_update_(p, m, v, g, rule, backend="torch")
    values = set(m.float().unique().tolist())
    assert values == {1.0, 1.0 + 2.0 ** -7}
    mean = m.float().mean().item()
    stderr = 2.0 ** -7 * math.sqrt(1 / 8 * 7 / 8 / 4096)
    assert abs(mean - (1.0 + 2.0 ** -10)) < 4 * stderr


def test_bf16_weights_train():
    torch.manual_seed(0)
    model = tiny_llama().to(torch.bfloat16).eval()
    data = batches(model.config.vocab_size, n=3, shape=(2, 16))
    opt = lk.AdamW(model, lr=3e-3, state_dtype=torch.bfloat16)
    first = model(input_ids=data[0], labels=data[0]).loss.item()
    for _ in range(6):
        for ids in data:
            opt.fused_backward(model(input_ids=ids, labels=ids).loss, 3e-3)
    assert model(input_ids=data[0], labels=data[0]).loss.item() < first


def test_resume_is_exact():
    torch.manual_seed(0)
    start = tiny_gpt2().eval()
    data = batches(start.config.vocab_size, n=4)
    kwargs = dict(lr=LR, weight_decay=0.1, clip_grad_norm=0.5, state_dtype=torch.bfloat16)
    full = copy.deepcopy(start)
    train_fused(lk.AdamW(full, **kwargs), full, data)

    first = copy.deepcopy(start)
    opt = lk.AdamW(first, **kwargs)
    train_fused(opt, first, data[:2])
    saved = {"model": copy.deepcopy(first.state_dict()), "opt": opt.state_dict()}
    opt.close()
    resumed = tiny_gpt2().eval()
    resumed.load_state_dict(saved["model"])
    opt2 = lk.AdamW(resumed, **kwargs)
    opt2.load_state_dict(saved["opt"])
    assert opt2.step_count == 2
    train_fused(opt2, resumed, data[2:])
    for (n, p), q in zip(resumed.named_parameters(), full.parameters()):
        assert torch.equal(p, q), n
    with pytest.raises(ValueError, match="cannot load it into AdamW"):
        lk.AdamW(tiny_llama()).load_state_dict(lk.Lomo(tiny_llama()).state_dict())
    two_layers = tiny_llama()
    stepped = lk.AdamW(two_layers)
    train_fused(stepped, two_layers, data[:1])  # moments exist once a parameter was updated
    with pytest.raises(ValueError, match="does not match this model"):
        lk.AdamW(tiny_llama(layers=1)).load_state_dict(stepped.state_dict())


def test_fp16_overflow_skips_without_touching_state():
    torch.manual_seed(0)
    model = tiny_llama().half().eval()
    ids = batches(model.config.vocab_size, n=1)[0]
    opt = lk.AdamW(model, lr=1e-3, loss_scale_args=dict(init_scale=2.0 ** 60))
    before = [p.detach().clone() for p in model.parameters()]
    opt.fused_backward(model(input_ids=ids, labels=ids).loss, 1e-3)
    assert opt.skipped_step and opt.step_count == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(not m.any() for m in opt.exp_avg.values())


@pytest.mark.parametrize("kwargs, match", [
    (dict(betas=(1.0, 0.9)), "betas\\[0\\]"),
    (dict(betas=(0.9, -0.1)), "betas\\[1\\]"),
    (dict(betas=0.9), "betas must be two"),
    (dict(eps=-1e-8), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(lr=float("nan")), "lr"),
    (dict(state_dtype=torch.float16), "state_dtype"),
    (dict(state_rounding="up"), "state_rounding"),
])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        lk.AdamW(tiny_llama(), **kwargs)


def test_ops_under_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        w, m, v = torch.zeros(8, 4), torch.zeros(8, 4), torch.zeros(8, 4)
        ops.adamw_linear_update_(w, m, v, torch.zeros(3, 4), torch.zeros(3, 8),
                                 ops.AdamRule.torch_adamw(0.1, (0.9, 0.99), 1e-8, 0.0, 1), backend="torch")


def test_lomo_trainer_builds_the_adaptive_optimizers(tmp_path):
    from transformers import TrainingArguments

    from lomo_kernels.integrations.transformers import build_optimizer
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, weight_decay=0.1, max_grad_norm=1.0,
                             report_to=[], use_cpu=True)
    for name, cls, extra in (("adamw", lk.AdamW, {}), ("apollo", lk.Apollo, dict(rank=4)),
                             ("apollo-mini", lk.ApolloMini, {})):
        opt = build_optimizer(tiny_llama(), args, name, **extra)
        assert type(opt) is cls and opt.clip_grad_norm == 1.0 and opt.weight_decay == 0.1
        opt.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_linear_kernel_matches_reference(dtype):
    if not lk.available_backends()["triton"].available:
        pytest.skip("triton backend unavailable (set TRITON_INTERPRET=1 for CPU tensors)")
    torch.manual_seed(3)
    out_f, in_f, tokens = 45, 37, 21  # partial tiles in both directions and in the token loop
    w0 = torch.randn(out_f, in_f).to(dtype)
    x, dy = torch.randn(tokens, in_f).to(dtype), torch.randn(tokens, out_f).to(dtype)
    state = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    results = {}
    for backend in ("torch", "triton"):
        w, m, v = w0.clone(), torch.zeros(out_f, in_f, dtype=state), torch.zeros(out_f, in_f, dtype=state)
        for t in range(1, 4):
            rule = ops.AdamRule.torch_adamw(0.01, (0.9, 0.99), 1e-8, 0.1, t, inv_loss_scale=0.5, clip_value=3.0,
                                            coef=0.7, stochastic=dtype != torch.float32,
                                            state_stochastic=state != torch.float32, seed=11 + t)
            ops.adamw_linear_update_(w, m, v, x, dy, rule, backend=backend)
        results[backend] = (w.float(), m.float(), v.float())
    (w_r, m_r, v_r), (w_t, m_t, v_t) = results["torch"], results["triton"]
    if dtype == torch.float32:
        upd = (w_r - w0).abs().max()
        assert ((w_t - w_r).abs().max() / upd).item() < 1e-5
        assert torch.allclose(m_t, m_r, rtol=1e-5, atol=1e-6) and torch.allclose(v_t, v_r, rtol=1e-5, atol=1e-6)
    else:
        # same rounding counters: equal except where the fp32 values straddle a rounding threshold
        for ours, ref in ((w_t, w_r), (m_t, m_r), (v_t, v_r)):
            assert (ours == ref).float().mean() > 0.97
            assert torch.allclose(ours, ref, rtol=2 ** -6, atol=1e-6)
