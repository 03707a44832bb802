"""HiFT (lomo_kernels.optim.hift) over the fused optimizers: grouping rule and bad arguments, one active
group per step, truncated backward, state offload, parity with references written from HiFT's
algorithm (torch SGD / AdamW on the active group; badam's BlockOptimizer where their semantics
coincide), exact resume, the LR-schedule gate and the Hugging Face trainer.

fused AdamW: until ``lomo_kernels.AdamW`` exists, the AdamW parity runs HiFT over ``AdamWDouble``, a
test-only fused optimizer (gradient materialized per use, ``torch.optim.AdamW``'s math, state in
name-keyed dicts created at the first update, bias correction from the optimizer's ``step_count``: the
way this package's optimizers count steps). It checks HiFT's part (groups, per-group step clocks,
state placement) against the torch reference; the real fused AdamW joins the parametrization when it lands.
"""
import copy
import io
import math

import pytest
import torch
from torch import nn

import lomo_kernels as lk
from lomo_kernels.optim.base import FusedOptimizer
from lomo_kernels.optim.hift import LAYER_PATTERN, HiFT, hift_groups
from lomo_kernels.testing import tiny_gpt2, tiny_llama

LAYERS = 4
TOL = 1e-5


def data(steps, batch=2, seq=12, vocab=97):
    return [torch.randint(0, vocab, (batch, seq)) for _ in range(steps)]


def loss_of(model, ids):
    return model(input_ids=ids, labels=ids).loss


def max_rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def assert_models_close(model, ref, tol=TOL):
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        err = max_rel_err(p.detach(), ref_params[name].detach())
        assert err <= tol, f"{name}: {err:.2e}"


class AdamWDouble(FusedOptimizer):
    """Test-only fused AdamW (see the module doc)."""

    def __init__(self, model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, clip_grad_norm=None):
        self.weight_decay, self.betas, self.eps = weight_decay, betas, eps
        super().__init__(model, dict(lr=lr, weight_decay=weight_decay), clip_grad_norm=clip_grad_norm,
                         clip_grad_value=None, backend="torch", rounding=None, seed=0)
        self.exp_avg, self.exp_avg_sq = {}, {}

    def _adamw(self, param, grad):
        name, (b1, b2) = self._name(param), self.betas
        grad = grad.to(torch.float32) * self.clip_coef
        m = self.exp_avg.setdefault(name, torch.zeros_like(param))
        v = self.exp_avg_sq.setdefault(name, torch.zeros_like(param))
        t = self.step_count + 1
        with torch.no_grad():
            param.mul_(1 - self.lr * self.weight_decay_for(param))
            m.lerp_(grad, 1 - b1)
            v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            denom = (v.sqrt() / math.sqrt(1 - b2 ** t)).add_(self.eps)
            param.addcdiv_(m, denom, value=-self.lr / (1 - b1 ** t))

    def linear_apply(self, param, x, dy):
        self._adamw(param, dy.t().to(torch.float32) @ x.to(torch.float32))

    def embedding_apply(self, param, indices, dy, padding_idx):
        idx, rows = indices.reshape(-1), dy.reshape(-1, dy.shape[-1]).to(torch.float32)
        if padding_idx is not None:
            keep = idx != padding_idx
            idx, rows = idx[keep], rows[keep]
        self._adamw(param, torch.zeros(param.shape, dtype=torch.float32).index_add_(0, idx, rows))

    def dense_apply(self, param, grad):
        self._adamw(param, grad)

    def _named_state(self):
        return {n: {"exp_avg": self.exp_avg[n], "exp_avg_sq": self.exp_avg_sq[n]} for n in self.exp_avg}

    def _load_named_state(self, state):
        for name, entry in state.items():
            self.exp_avg[name] = entry["exp_avg"].clone()
            self.exp_avg_sq[name] = entry["exp_avg_sq"].clone()


ADAMW_CLASSES = {"double": AdamWDouble}
if hasattr(lk, "AdamW"):  # the package's fused AdamW; the reference's loss comes from logits, so this one's too
    for backend in ("cpu", "torch"):
        ADAMW_CLASSES[f"fused-{backend}"] = (lambda model, backend=backend, **kw:
                                             lk.AdamW(model, fused_cross_entropy=False, backend=backend, **kw))


def order(strategy, n, hift, cycle):
    if strategy == "down2up":
        return list(range(n))
    if strategy == "up2down":
        return list(range(n))[::-1]
    return hift._order_for(cycle)  # random: the reference takes HiFT's seeded permutation


# --- construction, grouping --------------------------------------------------------------------------

def test_grouping_rule_llama():
    model = tiny_llama(layers=LAYERS)
    labels = [g.label for g in hift_groups(model, 1)]
    assert labels == ["embedding"] + [f"model.layers.{i}" for i in range(LAYERS)] + ["head"]
    groups = hift_groups(model, 3)
    assert [g.label for g in groups] == ["embedding", "model.layers.0-2", "model.layers.3", "head"]
    assert groups[0].names == ("model.embed_tokens.weight",)
    assert groups[-1].names == ("model.norm.weight", "lm_head.weight")
    names = [n for g in groups for n in g.names]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())


def test_grouping_rule_gpt2_tied():
    model = tiny_gpt2(layers=3)
    groups = hift_groups(model, 2)
    assert groups[0].names == ("transformer.wte.weight", "transformer.wpe.weight")  # lm_head is tied to wte
    assert [g.label for g in groups[1:]] == ["transformer.h.0-1", "transformer.h.2", "head"]
    assert groups[-1].names == ("transformer.ln_f.weight", "transformer.ln_f.bias")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(group_size=0), ValueError, r"between 1 and the number of decoder layers \(4"),
    (dict(group_size=5), ValueError, r"between 1 and the number of decoder layers \(4"),
    (dict(group_size=True), TypeError, "group_size must be an int"),
    (dict(strategy="bottom2up"), ValueError, "strategy must be one of"),
    (dict(lr_schedule="per_epoch"), ValueError, "lr_schedule must be one of"),
    (dict(seed=-1), ValueError, "seed must be"),
    (dict(offload="disk"), ValueError, "offload must be one of"),
])
def test_bad_arguments_fail_at_construction(kwargs, error, match):
    model = tiny_llama(layers=LAYERS)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with lk.Lomo(model, lr=1e-3) as opt:
        with pytest.raises(error, match=match):
            HiFT(opt, **kwargs)
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_model_without_layers_names_the_pattern():
    model = nn.Sequential()
    model.add_module("embed", nn.Embedding(10, 8))
    model.add_module("proj", nn.Linear(8, 8))
    with lk.Lomo(model, lr=1e-3) as opt:
        with pytest.raises(ValueError, match="no decoder layers") as info:
            HiFT(opt)
    assert LAYER_PATTERN in str(info.value)


def test_wraps_fused_optimizers_only():
    model = tiny_llama(layers=2)
    with pytest.raises(TypeError, match="fused optimizer"):
        HiFT(torch.optim.SGD(model.parameters(), lr=1e-3))
    opt = lk.Lomo(model, lr=1e-3)
    hift = HiFT(opt)
    with pytest.raises(ValueError, match="already wrapped"):
        HiFT(opt)
    hift.close()
    with pytest.raises(ValueError, match="closed"):
        HiFT(opt)


@pytest.mark.parametrize("fused", [True, False])
def test_says_whether_the_wrapped_loss_is_fused(fused):
    """HiFT answers for the wrapped optimizer (the trainer's --fused-cross-entropy check and run header ask it)."""
    model = tiny_llama(layers=2)
    opt = lk.Lomo(model, lr=1e-3, fused_cross_entropy=fused)
    with HiFT(opt) as hift:
        assert hift.fused_cross_entropy is fused is opt.fused_cross_entropy
        assert hift.fused_cross_entropy_reason == opt.fused_cross_entropy_reason
        assert (hift.fused_cross_entropy_reason is None) is fused


def test_orders_and_random_permutations():
    model = tiny_llama(layers=LAYERS)
    with lk.Lomo(model, lr=1e-3) as opt:
        hift = HiFT(opt, strategy="up2down")
        assert hift.order == [5, 4, 3, 2, 1, 0] and hift.active_group.label == "head"
        hift.close()
    model = tiny_llama(layers=LAYERS)
    with lk.Lomo(model, lr=1e-3) as opt:
        hift = HiFT(opt, strategy="random", seed=7)
        perms = [hift._order_for(c) for c in range(4)]
        assert all(sorted(p) == list(range(6)) for p in perms)
        assert len({tuple(p) for p in perms}) > 1  # a new permutation per cycle
        assert perms[0] == hift.order
        hift.close()
    model = tiny_llama(layers=LAYERS)
    with lk.Lomo(model, lr=1e-3) as opt:
        assert HiFT(opt, strategy="random", seed=7)._order_for(3) == perms[3]  # seeded
        assert HiFT.__init__ is not None


# --- one group per step, truncated backward -----------------------------------------------------------

@pytest.mark.parametrize("strategy", ["down2up", "up2down", "random"])
def test_one_active_group_per_step(strategy):
    model = tiny_llama(layers=LAYERS)
    hift = HiFT(lk.Lomo(model, lr=1e-2, weight_decay=0.1), group_size=2, strategy=strategy, seed=3)
    visited = []
    for ids in data(2 * hift.num_groups):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        active = set(hift.active_group.names)
        assert {n for n, p in model.named_parameters() if p.requires_grad} == active
        visited.append(hift.active)
        hift.fused_backward(loss_of(model, ids), 1e-2)
        changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
        assert changed == active
    n = hift.num_groups
    assert sorted(visited[:n]) == list(range(n)) and sorted(visited[n:]) == list(range(n))
    assert hift.cycle == 2 and hift.position == 0 and hift.group_steps == [2] * n
    hift.close()
    assert all(p.requires_grad for p in model.parameters())
    assert model.__dict__.get("_lomo_hold") is None


def layer_backward_trace(model):
    """Per decoder layer: did its output take part in the backward (its gradient computed)?"""
    ran = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        def hook(module, args, output, i=i):
            out = output[0] if isinstance(output, tuple) else output
            ran[i] = False
            if out.requires_grad:
                out.register_hook(lambda g, i=i: ran.__setitem__(i, True))
        handles.append(layer.register_forward_hook(hook))
    return ran, handles


class MatmulCounter(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_truncated_backward():
    model = tiny_llama(layers=LAYERS)
    hift = HiFT(lk.Lomo(model, lr=1e-3), group_size=1, strategy="down2up")
    ran, handles = layer_backward_trace(model)
    matmuls = {}
    for ids in data(hift.num_groups):
        label = hift.active_group.label
        loss = loss_of(model, ids)
        with MatmulCounter() as counter:
            hift.fused_backward(loss, 1e-3)
        matmuls[label] = counter.count
        lowest = 0 if label == "embedding" else LAYERS if label == "head" else int(label.rsplit(".", 1)[1])
        assert ran == {i: i >= lowest for i in range(LAYERS)}, label
    # every frozen layer below the active one is skipped: fewer GEMMs the higher the group
    counts = [matmuls[g.label] for g in hift.groups]
    assert all(a > b for a, b in zip(counts[1:-1], counts[2:])), counts
    for h in handles:
        h.remove()
    hift.close()


def test_forward_before_activation_raises_before_any_write():
    model = tiny_llama(layers=LAYERS)
    opt = lk.Lomo(model, lr=1e-2)
    loss = loss_of(model, data(1)[0])  # every parameter trainable in this forward
    hift = HiFT(opt)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="active group is 'embedding'"):
        hift.fused_backward(loss, 1e-2)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    hift.fused_backward(loss_of(model, data(1)[0]), 1e-2)  # a fresh forward trains
    hift.close()


# --- optimizer state placement --------------------------------------------------------------------------

@pytest.mark.parametrize("offload", ["auto", "always"])
def test_state_offload_round_trips_bit_exactly(offload):
    model = tiny_llama(layers=LAYERS)
    opt = lk.AdaLomo(model, lr=1e-3)
    hift = HiFT(opt, group_size=2, offload=offload)
    ids_list = data(2 * hift.num_groups)
    state_ids = {(n, k): id(t) for n, e in opt._named_state().items() for k, t in e.items()}
    for i, ids in enumerate(ids_list):
        active = hift.active
        resident = {n for n, e in opt._named_state().items()
                    if all((n, k) not in hift.store.on_host for k in e)}
        assert resident == set(hift.groups[active].names)
        assert hift.device_state_bytes() == sum(t.numel() * t.element_size() for n in hift.groups[active].names
                                                for t in opt._named_state()[n].values())
        snapshot = {(n, k): t.clone() for n, e in opt._named_state().items() for k, t in e.items()}
        hift.fused_backward(loss_of(model, ids), 1e-3)
        after = {(n, k): t for n, e in opt._named_state().items() for k, t in e.items()}
        for key, t in after.items():
            assert id(t) == state_ids[key]  # the optimizer's own tensors, moved in place
            if key[0] not in hift.groups[active].names:
                assert torch.equal(t, snapshot[key]), key  # untouched by the step, bit-exact after the moves
    assert hift.store.moves > 0
    if offload == "always":
        assert hift.store.bytes_copied > 0
    else:
        assert hift.store.bytes_copied == 0  # CPU: the same calls, no copies
    hift.close()


def test_offload_always_equals_no_offload():
    results = []
    ids_list = data(8)
    for offload in ("never", "always"):
        torch.manual_seed(0)
        model = tiny_llama(layers=LAYERS)
        hift = HiFT(lk.AdaLomo(model, lr=1e-3), offload=offload, strategy="random")
        for ids in ids_list:
            hift.fused_backward(loss_of(model, ids), 1e-3)
        results.append(model)
        hift.close()
    for a, b in zip(*(m.parameters() for m in results)):
        assert torch.equal(a, b)


# --- parity -----------------------------------------------------------------------------------------

def hift_torch_reference(model, hift, make_opt, ids_list, clip=None, norms=None):
    """HiFT's algorithm with a torch optimizer: per step, the active group is made trainable and
    becomes the optimizer's param group (the state of the others kept), backward, clip, step.

    Clipping: the active group's norm (torch's) must equal the fused run's ``norms[step]`` (≤ 1e-6);
    the gradients are then scaled by the coefficient computed from the fused run's norm, because
    AdamW's normalized step turns the last-bit difference of two fp32 norms into visible differences
    on entries with a near-zero gradient (seen: 5e-5 relative after 2 cycles, vs 0 without clipping)."""
    params = dict(model.named_parameters())
    opt = make_opt([{"params": list(params.values())}])
    n = hift.num_groups
    for step, ids in enumerate(ids_list):
        group = hift.groups[order(hift.strategy, n, hift, step // n)[step % n]]
        for name, p in params.items():
            p.requires_grad_(name in group.names)
        opt.param_groups[0]["params"] = [params[name] for name in group.names]
        loss_of(model, ids).backward()
        if clip is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], float("inf")))
            assert abs(norm - norms[step]) <= 1e-6 * norms[step], (step, norm, norms[step])
            coef = min(1.0, clip / (norms[step] + 1e-6))
            for p in opt.param_groups[0]["params"]:
                p.grad = p.grad * coef
        opt.step()
        opt.zero_grad(set_to_none=True)
    for p in params.values():
        p.requires_grad_(True)


def run_hift(model, opt, ids_list, lr, **kwargs):
    hift = HiFT(opt, **kwargs)
    for ids in ids_list:
        hift.fused_backward(loss_of(model, ids), lr)
    return hift


@pytest.mark.parametrize("strategy", ["down2up", "up2down", "random"])
def test_lomo_equals_sgd_on_the_active_group(strategy):
    model = tiny_llama(layers=LAYERS)
    ref = copy.deepcopy(model)
    lr, clip = 5e-2, 0.5
    hift = HiFT(lk.Lomo(model, lr=lr, weight_decay=0.1, clip_grad_norm=clip), group_size=2,
                strategy=strategy, seed=11)
    ids_list = data(2 * hift.num_groups)  # 2 full cycles
    for ids in ids_list:
        hift.fused_backward(loss_of(model, ids), lr)
    # HiFT's algorithm with plain SGD on the active group; weight decay decoupled (lomo-optim's order)
    params = dict(ref.named_parameters())
    n = hift.num_groups
    for step, ids in enumerate(ids_list):
        group = hift.groups[order(strategy, n, hift, step // n)[step % n]]
        for name, p in params.items():
            p.requires_grad_(name in group.names)
        loss_of(ref, ids).backward()
        active = [params[name] for name in group.names]
        norm = torch.nn.utils.clip_grad_norm_(active, float("inf"))
        coef = min(1.0, clip / (float(norm) + 1e-6))
        with torch.no_grad():
            for p in active:
                p.mul_(1 - lr * 0.1).add_(p.grad, alpha=-lr * coef)
                p.grad = None
    assert_models_close(model, ref)
    hift.close()


@pytest.mark.parametrize("strategy", ["down2up", "up2down", "random"])
def test_adalomo_equals_adalomo_restricted_to_the_active_group(strategy):
    """The reference: a plain AdaLomo on a copy of the model, its trainable set restricted by hand to
    HiFT's group of the step and its step counter set to that group's own count."""
    model = tiny_llama(layers=LAYERS)
    ref = copy.deepcopy(model)
    hift = HiFT(lk.AdaLomo(model, lr=1e-2, clip_grad_norm=1.0, weight_decay=0.01), group_size=1,
                strategy=strategy, seed=5)
    n = hift.num_groups
    ids_list = data(2 * n)
    for ids in ids_list:
        hift.fused_backward(loss_of(model, ids), 1e-2)
    ref_opt = lk.AdaLomo(ref, lr=1e-2, clip_grad_norm=1.0, weight_decay=0.01)
    params = dict(ref.named_parameters())
    steps = [0] * n
    for step, ids in enumerate(ids_list):
        g = order(strategy, n, hift, step // n)[step % n]
        for name, p in params.items():
            p.requires_grad_(name in hift.groups[g].names)
        ref_opt.step_count = steps[g]
        ref_opt.fused_backward(loss_of(ref, ids), 1e-2)
        steps[g] += 1
    assert steps == hift.group_steps
    assert_models_close(model, ref)
    state = hift.state_dict()["optimizer"]["state"]
    for name, entry in ref_opt.state_dict()["state"].items():
        for key, t in entry.items():
            assert max_rel_err(state[name][key], t) <= TOL, (name, key)
    hift.close()
    ref_opt.close()


@pytest.mark.parametrize("adamw", sorted(ADAMW_CLASSES))
@pytest.mark.parametrize("strategy", ["down2up", "up2down", "random"])
def test_adamw_equals_torch_adamw_reference(strategy, adamw):
    torch.manual_seed(0)
    model = tiny_llama(layers=LAYERS)
    ref = copy.deepcopy(model)
    lr, wd = 1e-2, 0.05
    hift = run_hift(model, ADAMW_CLASSES[adamw](model, lr=lr, weight_decay=wd, clip_grad_norm=1.0), [], lr,
                    group_size=2, strategy=strategy, seed=2, offload="always")
    ids_list = data(2 * hift.num_groups)
    norms = []
    for ids in ids_list:
        hift.fused_backward(loss_of(model, ids), lr)
        norms.append(hift.last_grad_norm)
    hift_torch_reference(ref, hift, lambda g: torch.optim.AdamW(g, lr=lr, weight_decay=wd, foreach=False),
                         ids_list, clip=1.0, norms=norms)
    # both equal the reference within 1e-5 of each weight's largest entry (measured: bit for bit; the fused
    # AdamW takes √v from torch's own sqrt, as torch.optim.AdamW does)
    assert_models_close(model, ref)
    hift.close()


badam = pytest.importorskip("badam", reason="badam==1.4 (requirements.txt) gives the BlockOptimizer parity")


@pytest.mark.parametrize("strategy, switch_mode", [("down2up", "ascending"), ("up2down", "descending")])
def test_torch_reference_equals_badam_block_optimizer(strategy, switch_mode):
    """BAdam's BlockOptimizer (switch every step, one layer per block, embedding and head blocks) over
    torch AdamW visits the same blocks in the same order; it clears the AdamW state at every switch, so the
    semantics coincide on the first cycle (every block's first step): there, HiFT's torch reference and
    HiFT over the fused AdamW equal it."""
    import warnings

    model = tiny_llama(layers=LAYERS)
    ref, bad = copy.deepcopy(model), copy.deepcopy(model)
    lr, wd = 1e-2, 0.05
    hift = run_hift(model, AdamWDouble(model, lr=lr, weight_decay=wd), [], lr, group_size=1, strategy=strategy)
    ids_list = data(hift.num_groups)
    for ids in ids_list:
        hift.fused_backward(loss_of(model, ids), lr)
    hift_torch_reference(ref, hift, lambda g: torch.optim.AdamW(g, lr=lr, weight_decay=wd, foreach=False), ids_list)
    base = torch.optim.AdamW(bad.parameters(), lr=lr, weight_decay=wd, foreach=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        block = badam.BlockOptimizer(base, list(bad.named_parameters()), switch_block_every=1,
                                     switch_mode=switch_mode, include_embedding=True, include_lm_head=True,
                                     verbose=0)
        assert len(block.block_prefix_list) == hift.num_groups
        for ids in ids_list:
            loss_of(bad, ids).backward()
            block.step()
            block.zero_grad(set_to_none=True)
    assert_models_close(ref, bad)
    assert_models_close(model, bad)
    hift.close()


# --- resume, schedules, trainer -------------------------------------------------------------------------

@pytest.mark.parametrize("inner", ["adalomo", "adamw"])
def test_exact_resume(inner):
    make = {"adalomo": lambda m: lk.AdaLomo(m, lr=1e-2), "adamw": lambda m: AdamWDouble(m, lr=1e-2)}[inner]
    torch.manual_seed(0)
    base = tiny_llama(layers=LAYERS)
    ids_list = data(13)
    straight = copy.deepcopy(base)
    hift = run_hift(straight, make(straight), ids_list, 1e-2, group_size=1, strategy="random", seed=9,
                    offload="always")
    hift.close()

    first = copy.deepcopy(base)
    hift = run_hift(first, make(first), ids_list[:8], 1e-2, group_size=1, strategy="random", seed=9,
                    offload="always")
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": hift.state_dict()}, buffer)
    hift.close()
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["opt"]["hift"]["cycle"] == 1 and saved["opt"]["hift"]["position"] == 2

    resumed = tiny_llama(layers=LAYERS)
    resumed.load_state_dict(saved["model"])
    hift = HiFT(make(resumed), group_size=1, strategy="random", seed=9, offload="always")
    hift.load_state_dict(saved["opt"])
    assert hift.active == hift._order_for(1)[2]
    assert {n for n, p in resumed.named_parameters() if p.requires_grad} == set(hift.active_group.names)
    for ids in ids_list[8:]:
        hift.fused_backward(loss_of(resumed, ids), 1e-2)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="strategy"):
        other = tiny_llama(layers=LAYERS)
        HiFT(lk.AdaLomo(other, lr=1e-2), strategy="down2up", seed=9).load_state_dict(saved["opt"])
    hift.close()


@pytest.mark.parametrize("lr_schedule", ["per_cycle", "per_step"])
def test_lr_schedule(lr_schedule):
    model = tiny_llama(layers=2)
    hift = HiFT(lk.Lomo(model, lr=1.0), lr_schedule=lr_schedule)  # 4 groups
    sched = hift.wrap_scheduler(torch.optim.lr_scheduler.LambdaLR(hift, lambda k: 0.5 ** k))
    lrs = []
    for ids in data(9):
        lrs.append(hift.lr)
        hift.fused_backward(loss_of(model, ids))  # lr=None: the scheduler's
        hift.step()  # a no-op, called as a Trainer does (the scheduler checks the order)
        sched.step()
    if lr_schedule == "per_cycle":
        assert lrs == [1.0] * 4 + [0.5] * 4 + [0.25]
    else:
        assert lrs == [0.5 ** k for k in range(9)]
    assert hift.optimizer.lr == hift.param_groups[0]["lr"] == sched.get_last_lr()[0]
    hift.close()


def test_lomo_trainer_with_hift(tmp_path):
    """LomoTrainer(hift=...): HiFT's rotation and per-cycle schedule through the Trainer, hold and
    requires_grad given back after train(), and an exact resume from a mid-cycle checkpoint."""
    from transformers import TrainingArguments

    from lomo_kernels.integrations.transformers import LomoTrainer

    rows = data(16, batch=1)
    dataset = [{"input_ids": r[0], "labels": r[0].clone()} for r in rows]

    def trainer(model, out, steps, **overrides):
        kwargs = dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=1, learning_rate=1e-2,
                      lr_scheduler_type="linear", max_grad_norm=1.0, logging_steps=1, save_strategy="no",
                      report_to=[], use_cpu=True, train_sampling_strategy="sequential", dataloader_num_workers=0,
                      seed=0, disable_tqdm=True)
        kwargs.update(overrides)
        return LomoTrainer(model=model, args=TrainingArguments(**kwargs), train_dataset=dataset,
                           optimizer_name="adalomo", hift=dict(group_size=2, strategy="up2down"))

    base = tiny_llama(layers=LAYERS)  # 4 groups
    start = copy.deepcopy(base.state_dict())
    t = trainer(base, tmp_path / "full", 10)
    t.train()
    hift = t.fused_optimizer
    assert isinstance(hift, HiFT) and hift.closed and hift.step_count == 10 and hift.cycle == 2
    assert all(p.requires_grad for p in base.parameters())
    lrs = [log["learning_rate"] for log in t.state.log_history if "learning_rate" in log]
    assert lrs[:4] == [lrs[0]] * 4 and lrs[4:8] == [lrs[4]] * 4 and lrs[8] < lrs[4] < lrs[0]  # once per cycle

    first = tiny_llama(layers=LAYERS)
    first.load_state_dict(start)
    trainer(first, tmp_path / "split", 10, save_strategy="steps", save_steps=6).train()
    resumed = tiny_llama(layers=LAYERS)  # everything comes from the checkpoint (mid-cycle: position 2)
    t2 = trainer(resumed, tmp_path / "split", 10)
    t2.train(resume_from_checkpoint=str(tmp_path / "split" / "checkpoint-6"))
    assert t2.fused_optimizer.step_count == 10
    for (name, p), q in zip(resumed.named_parameters(), base.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("input_grads", [True, False])
def test_gradient_checkpointing_same_as_without(input_grads):
    """Non-reentrant checkpointing recomputes frozen layers' forwards plainly; results are bitwise equal.
    transformers' activation_checkpointing_enable also makes the embedding output require grad, which
    undoes the truncation: HiFT warns; without that hook the backward is truncated again."""
    ids_list = data(6)
    models = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = tiny_llama(layers=LAYERS)
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
            if not input_grads:
                model.disable_input_require_grads()
        model.train()
        opt = lk.AdaLomo(model, lr=1e-2)
        if checkpointing and input_grads:
            with pytest.warns(UserWarning, match="not truncated"):
                hift = HiFT(opt, group_size=2, strategy="up2down")
        else:
            hift = HiFT(opt, group_size=2, strategy="up2down")
        ran, handles = layer_backward_trace(model)
        for step, ids in enumerate(ids_list):
            label = hift.active_group.label
            hift.fused_backward(loss_of(model, ids), 1e-2)
            if label == "head":
                assert any(ran.values()) == (checkpointing and input_grads), ran
        for h in handles:
            h.remove()
        hift.close()
        models.append(model)
    for a, b in zip(*(m.parameters() for m in models)):
        assert torch.equal(a, b)


def test_fp16_overflow_skips_the_step_and_moves_on():
    """A non-finite gradient skips the active group's step (no write, its step clock unchanged, the loss
    scale lowered); the rotation goes on, as in HiFT's trainer."""
    model = tiny_llama(layers=2).to(torch.float16)
    hift = HiFT(lk.Lomo(model, lr=1e-3))
    first = hift.active
    before = [p.detach().clone() for p in model.parameters()]
    scale = hift.loss_scale
    loss = loss_of(model, data(1)[0]) * 1e4  # finite, but its scaled gradient overflows fp16
    hift.fused_backward(loss, 1e-3)
    assert hift.skipped_step and hift.skipped_steps == 1 and hift.loss_scale < scale
    assert hift.group_steps[first] == 0 and hift.optimizer.step_count == 0 and hift.position == 1
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    hift.fused_backward(loss_of(model, data(1)[0]), 1e-3)
    assert not hift.skipped_step and hift.group_steps[hift.order[1]] == 1 and hift.optimizer.step_count == 1
    hift.close()
