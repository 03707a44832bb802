"""fp16 dynamic loss scaling (overflow found before any write, step skipped whole, scale halves and
later doubles), lomo-optim's DynamicLossScaler rule, and bf16 stochastic vs nearest rounding."""
import copy
from unittest import mock

import pytest
import torch
from lomo_optim.lomo import DynamicLossScaler as LomoOptimScaler

import lomo_kernels as lk
from lomo_kernels.optim import DynamicLossScaler
from lomo_kernels.testing import tiny_llama


def batches(vocab, n, shape=(2, 10)):
    return [torch.randint(0, vocab, shape) for _ in range(n)]


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def bit_identical(model, snap):
    return all(torch.equal(p.detach().view(torch.uint8), q.view(torch.uint8)) for p, q in zip(model.parameters(), snap))


class InjectInf:
    """Makes one entry of a module's output gradient +inf while armed (an fp16 overflow in one layer)."""

    def __init__(self, module):
        self.armed = False
        module.register_forward_hook(self._forward)

    def _forward(self, module, inputs, output):
        if self.armed and output.requires_grad:
            output.register_hook(self._poison)

    @staticmethod
    def _poison(grad):
        grad = grad.clone()
        grad.view(-1)[0] = float("inf")
        return grad


@pytest.mark.parametrize("call_grad_norm", [True, False], ids=["grad_norm-first", "fused_backward-only"])
def test_fp16_overflow_skips_the_whole_step_then_scale_recovers(call_grad_norm):
    model = tiny_llama().half().eval()
    window = 3
    opt = lk.Lomo(model, lr=1e-2, loss_scale_args=dict(init_scale=2**10, scale_window=window))
    injector = InjectInf(model.model.layers[1].mlp.down_proj)
    data = batches(model.config.vocab_size, window + 2)

    def step(ids):
        loss = model(input_ids=ids, labels=ids).loss
        if call_grad_norm:
            opt.grad_norm(loss)
        opt.fused_backward(loss, 1e-2)
        return loss

    before = snapshot(model)
    injector.armed = True
    loss = step(data[0])
    injector.armed = False
    assert opt.skipped_step and opt.skipped_steps == 1
    assert opt.last_grad_norm == float("inf")
    assert bit_identical(model, before)
    assert opt.loss_scale == 2**9
    assert opt.step_count == 0
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()  # the skipped step's backward freed the graph kept by the norm phase

    for i, ids in enumerate(data[1:window + 1]):
        assert opt.loss_scale == 2**9  # raised only after `window` clean steps
        snap = snapshot(model)
        step(ids)
        assert not opt.skipped_step
        assert not bit_identical(model, snap)
    assert opt.loss_scale == 2**10
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("statistics", ["recompute", "materialize"])
def test_adalomo_fp16_overflow_skips_step_and_keeps_statistics(statistics):
    model = tiny_llama().half().eval()
    opt = lk.AdaLomo(model, lr=1e-2, statistics=statistics)
    ids = batches(model.config.vocab_size, 1)[0]
    opt.fused_backward(model(input_ids=ids, labels=ids).loss)
    before, stats = snapshot(model), {k: v.clone() for k, v in opt.exp_avg_sq_row.items()}
    injector = InjectInf(model.model.layers[0].self_attn.o_proj)
    injector.armed = True
    opt.fused_backward(model(input_ids=ids, labels=ids).loss)
    assert opt.skipped_step and opt.step_count == 1 and opt.loss_scale == 2**10  # AdaLomo's scale is fixed
    assert bit_identical(model, before)
    assert all(torch.equal(opt.exp_avg_sq_row[k], v) for k, v in stats.items())
    injector.armed = False
    opt.fused_backward(model(input_ids=ids, labels=ids).loss)
    assert not opt.skipped_step and opt.step_count == 2


def test_fp16_without_overflow_equals_unscaled_update_up_to_fp16_rounding():
    model = tiny_llama().half().eval()
    ref = copy.deepcopy(model)
    ids = batches(model.config.vocab_size, 1)[0]
    opt = lk.Lomo(model, lr=1e-2, loss_scale_args=dict(init_scale=2**8))
    opt.fused_backward(model(input_ids=ids, labels=ids).loss, 1e-2)
    assert not opt.skipped_step and opt.loss_scale == 2**8
    ref.float()
    ref(input_ids=ids, labels=ids).loss.backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        expected = q.detach() - 1e-2 * q.grad
        tol = 2e-3 * expected.abs().max().item() + 1e-4  # fp16 forward/backward and weight rounding
        assert (p.float() - expected).abs().max().item() <= tol, name


def test_fp16_default_scale_is_gradscalers_and_overflow_messages_go_to_logging_not_stdout(capsys, caplog):
    """lomo-optim's 2**32 skipped the first dozen steps of a tiny LLaMA; GradScaler's 2**16 trains at once."""
    assert DynamicLossScaler().loss_scale == 2**16
    model = tiny_llama().half().eval()
    opt = lk.Lomo(model, lr=1e-2)
    assert opt.loss_scale == 2**16
    for ids in batches(model.config.vocab_size, 3):
        opt.fused_backward(model(input_ids=ids, labels=ids).loss, 1e-2)
        assert not opt.skipped_step
    injector = InjectInf(model.model.layers[0].mlp.down_proj)
    injector.armed = True
    capsys.readouterr()
    with caplog.at_level("WARNING", logger="lomo_kernels"):
        ids = batches(model.config.vocab_size, 1)[0]
        opt.fused_backward(model(input_ids=ids, labels=ids).loss, 1e-2)
    assert opt.skipped_step and opt.loss_scale == 2**15
    assert any("OVERFLOW! Skipping step" in r.getMessage() and r.name == "lomo_kernels" for r in caplog.records)
    assert "OVERFLOW" not in capsys.readouterr().out


@pytest.mark.parametrize("delayed_shift,consecutive", [(1, False), (2, False), (3, True)])
def test_loss_scaler_follows_lomo_optim_rule(delayed_shift, consecutive):
    kwargs = dict(init_scale=2**16, scale_window=4, delayed_shift=delayed_shift, consecutive_hysteresis=consecutive)
    ours, theirs = DynamicLossScaler(**kwargs), LomoOptimScaler(**kwargs)
    pattern = [True, False, True, True, False, False, False, False, False, True, False] + [False] * 9
    with mock.patch("torch.distributed.get_rank", return_value=0), mock.patch("builtins.print"):
        for overflow in pattern:
            ours.update_scale(overflow)
            theirs.update_scale(overflow)
            assert (ours.cur_scale, ours.cur_hysteresis) == (theirs.cur_scale, theirs.cur_hysteresis)
    assert ours.cur_scale > 2**16 / 4  # the clean runs raised it again


def test_loss_scaler_at_minimum_raises_and_rejects_bad_arguments():
    scaler = DynamicLossScaler(init_scale=1, min_scale=1)
    with pytest.raises(RuntimeError, match="minimum"):
        scaler.update_scale(True)
    with pytest.raises(ValueError, match="scale_window"):
        DynamicLossScaler(scale_window=0)
    with pytest.raises(ValueError, match="scale_factor"):
        DynamicLossScaler(scale_factor=1.0)


def _train_bf16(base, data, lr, rounding, seed=0):
    model = copy.deepcopy(base).to(torch.bfloat16)
    start = [p.detach().float().clone() for p in model.parameters()]
    opt = lk.Lomo(model, lr=lr, rounding=rounding, seed=seed)
    for ids in data:
        opt.fused_backward(model(input_ids=ids, labels=ids).loss, lr)
    return model, torch.cat([(p.detach().float() - s).flatten() for p, s in zip(model.parameters(), start)])


def test_bf16_stochastic_rounding_moves_weights_that_nearest_leaves_frozen():
    """lr=1e-5: each update is far below half a bf16 ulp of almost every weight. Nearest rounding
    drops it (weights frozen); stochastic rounding realizes it in expectation. Measured as the
    projection of the bf16 weight change onto the exact fp32 change (1 = the whole update)."""
    base = tiny_llama().eval()
    data = batches(base.config.vocab_size, 5)
    lr = 1e-5
    fp32 = copy.deepcopy(base)
    start = [p.detach().clone() for p in fp32.parameters()]
    opt = lk.Lomo(fp32, lr=lr)
    for ids in data:
        opt.fused_backward(fp32(input_ids=ids, labels=ids).loss, lr)
    exact = torch.cat([(p.detach() - s).flatten() for p, s in zip(fp32.parameters(), start)])

    _, nearest = _train_bf16(base, data, lr, "nearest")
    stochastic_model, stochastic = _train_bf16(base, data, lr, None)  # the bf16 default
    realized = {name: (d @ exact / (exact @ exact)).item() for name, d in (("nearest", nearest), ("stochastic", stochastic))}
    assert (nearest == 0).float().mean() > 0.97, realized
    assert realized["nearest"] < 0.1, realized
    assert 0.5 < realized["stochastic"] < 2.0, realized
    assert (stochastic != 0).sum() > 2 * (nearest != 0).sum()

    again, _ = _train_bf16(base, data, lr, None)
    other_seed, _ = _train_bf16(base, data, lr, None, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(stochastic_model.parameters(), again.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(stochastic_model.parameters(), other_seed.parameters()))
