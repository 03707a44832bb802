"""Every causal-LM architecture of the installed transformers builds tiny, runs forward with labels to
a finite loss, and backpropagates (tests/tiny_archs.py builds them). An architecture that cannot run
from input_ids alone is skipped with its reason; any other error fails."""

import math

import pytest
import torch

from tiny_archs import ArchSkip, build_tiny, causal_lm_model_types, make_batch, sgd_reference_steps

MODEL_TYPES = causal_lm_model_types()
MIN_BUILDING = 60
_OUTCOME: dict = {}  # model_type -> None (built) or the skip reason; filled as the tests build


def _build(model_type, seed=0):
    try:
        built = build_tiny(model_type, seed=seed)
    except ArchSkip as e:
        _OUTCOME[model_type] = str(e)
        pytest.skip(str(e))
    _OUTCOME[model_type] = None
    return built


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_forward_backward(model_type):
    model, batch = _build(model_type)
    assert model.training
    loss = model(**batch).loss
    assert loss is not None and loss.dim() == 0
    assert math.isfinite(loss.item()), loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads, "no parameter received a gradient"
    assert all(torch.isfinite(g).all() for g in grads)
    assert model.get_input_embeddings().weight.grad is not None
    assert any(g.abs().sum() > 0 for g in grads)


def test_at_least_60_architectures_build():
    """(Reuses the outcomes of test_forward_backward when it ran first; builds the others.)"""
    for mt in MODEL_TYPES:
        if mt not in _OUTCOME:
            try:
                build_tiny(mt)
                _OUTCOME[mt] = None
            except ArchSkip as e:
                _OUTCOME[mt] = str(e)
    built = [mt for mt in MODEL_TYPES if _OUTCOME[mt] is None]
    skipped = {mt: _OUTCOME[mt] for mt in MODEL_TYPES if _OUTCOME[mt] is not None}
    assert len(built) >= MIN_BUILDING, (len(built), skipped)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "mixtral", "gemma2", "reformer"])
def test_deterministic(model_type):
    """Same seed, same weights, batch and logits; a second forward gives bitwise the same logits."""
    m1, b1 = _build(model_type)
    m2, b2 = _build(model_type)
    for (n1, p1), (n2, p2) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert all(torch.equal(b1[k], b2[k]) for k in b1)
    out = m1(**b1).logits
    assert torch.equal(out, m1(**b1).logits)
    assert torch.equal(out, m2(**b2).logits)


def test_seed_changes_weights_and_batch():
    m1, b1 = _build("llama", seed=0)
    m2, b2 = _build("llama", seed=1)
    assert not torch.equal(b1["input_ids"], b2["input_ids"])
    assert not torch.equal(m1.model.embed_tokens.weight, m2.model.embed_tokens.weight)


def test_batch_avoids_special_tokens():
    model, batch = _build("llama")
    cfg = model.config
    ids = set(batch["input_ids"].flatten().tolist())
    assert not ids & {cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id}
    assert max(ids) < cfg.vocab_size
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert batch["input_ids"].shape == make_batch(cfg)["input_ids"].shape


def test_sgd_reference_steps_matches_a_hand_written_loop():
    model, batch = _build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    states = sgd_reference_steps(model, batch, steps=2, lr=0.1, weight_decay=0.01, clip_grad_norm=1.0)
    assert len(states) == 2
    for k, v in model.state_dict().items():  # the model itself is untouched
        assert torch.equal(v, before[k]), k
    params = dict(model.named_parameters())
    w = {k: v.clone() for k, v in params.items()}
    for step in range(2):
        for k, p in params.items():
            p.data.copy_(w[k])
            p.grad = None
        model(**batch).loss.backward()
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params.values()]))
        coef = torch.clamp(1.0 / (norm + 1e-6), max=1.0)
        for k, p in params.items():
            w[k] = w[k] - 0.1 * (p.grad * coef + 0.01 * w[k])
        for k in params:
            torch.testing.assert_close(states[step][k], w[k], rtol=1e-5, atol=1e-6)
    # a step changes the weights
    assert not torch.equal(states[0]["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
