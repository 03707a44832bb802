"""AdaLomo beyond lomo-optim parity: the two statistics modes agree (including a tied weight, whose
2-D gradient takes the factored rule at the end of backward), recompute never builds a weight-sized
tensor while materialize builds exactly one layer's gradient, embedding statistics decay on
untouched rows, and bad arguments are refused."""
import copy
import math

import pytest
import torch

import lomo_kernels as lk
from lomo_kernels.testing import AllocationTracker, tiny_gpt2, tiny_llama


def train(model, data, **kwargs):
    opt = lk.AdaLomo(model, lr=1e-2, **kwargs)
    for ids in data:
        opt.fused_backward(model(input_ids=ids, labels=ids).loss)
    return opt


def gpt2_without_attention_bias():
    """Tied GPT-2 with c_attn.bias frozen: its key third has an exactly zero gradient, which AdaLomo's
    1-D rule turns into ±lr·eps[1] by the sign of float noise (see test_optim_parity)."""
    model = tiny_gpt2()
    for name, p in model.named_parameters():
        if name.endswith("c_attn.bias"):
            p.requires_grad_(False)
    return model


@pytest.mark.parametrize("make", [gpt2_without_attention_bias, lambda: tiny_llama(pad_token_id=0)],
                         ids=["gpt2-tied", "llama-padding"])
def test_recompute_equals_materialize(make):
    model = make().eval()
    other = copy.deepcopy(model)
    data = [torch.randint(0, model.config.vocab_size, (2, 12)) for _ in range(3)]
    settings = dict(weight_decay=0.1, clip_grad_value=0.005, clip_grad_norm=0.5)
    a = train(model, data, statistics="recompute", **settings)
    b = train(other, data, statistics="materialize", **settings)
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        assert (p - q).abs().max() <= 1e-5 * q.abs().max(), name
    for name in a.exp_avg_sq_row:
        assert torch.allclose(a.exp_avg_sq_row[name], b.exp_avg_sq_row[name], rtol=1e-4, atol=1e-30), name


def test_recompute_builds_no_weight_sized_tensor_materialize_builds_one():
    largest_weight = None
    peaks = {}
    for statistics in ("recompute", "materialize"):
        model = tiny_llama(hidden_size=64, intermediate_size=256).eval()
        largest_weight = max(p.numel() * 4 for p in model.parameters() if p.dim() == 2)
        ids = torch.randint(0, model.config.vocab_size, (1, 4))  # few tokens: activations stay small
        # the head's loss the plain way: the fused loss's vocabulary chunks (>= 128 rows) cover all 97 rows of
        # this tiny head (its memory is tested in test_linear_cross_entropy.py at realistic sizes)
        opt = lk.AdaLomo(model, statistics=statistics, fused_cross_entropy=False)
        loss = model(input_ids=ids, labels=ids).loss
        with AllocationTracker() as tracker:
            opt.fused_backward(loss)
        peaks[statistics] = tracker.largest.nbytes
    assert peaks["recompute"] < largest_weight / 4, peaks
    assert peaks["materialize"] >= largest_weight, peaks


def test_embedding_statistics_decay_on_untouched_rows():
    model = tiny_llama().eval()
    opt = lk.AdaLomo(model, lr=1e-2)
    name = "model.embed_tokens.weight"
    first, second = torch.tensor([[1, 2, 3, 1]]), torch.tensor([[4, 5, 4, 6]])
    opt.fused_backward(model(input_ids=first, labels=first).loss)
    after_first = opt.exp_avg_sq_row[name].clone()
    eps0 = opt.eps[0]
    assert (after_first[[1, 2, 3]] > 1e3 * eps0).all()
    assert torch.all(after_first[7:] == eps0)  # untouched rows: zero gradient, the eps floor
    opt.fused_backward(model(input_ids=second, labels=second).loss)
    beta = 1 - 2 ** opt.decay_rate  # step 2
    expected = beta * after_first[[1, 2, 3]] + (1 - beta) * eps0
    assert torch.allclose(opt.exp_avg_sq_row[name][[1, 2, 3]], expected, rtol=1e-6)


def test_bad_arguments_are_refused():
    model = tiny_llama()
    for kwargs, match in [(dict(decay_rate=0.5), "decay_rate"), (dict(statistics="lazy"), "statistics"),
                          (dict(loss_scale=math.inf), "loss_scale"), (dict(eps=(1e-30,)), "eps"),
                          (dict(clip_threshold=0), "clip_threshold"), (dict(weight_decay=-1), "weight_decay")]:
        with pytest.raises(ValueError, match=match):
            lk.AdaLomo(model, **kwargs)
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3))
    with pytest.raises(ValueError, match="1-D and 2-D"):
        lk.AdaLomo(conv)
