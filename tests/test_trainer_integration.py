"""The Hugging Face Trainer route (lomo_kernels.integrations.transformers.LomoTrainer): with clipping
and a warmup/linear LR schedule it ends with the same parameters as the equivalent manual loop, logs
loss / grad norm / skipped steps, and resumes from its own checkpoint exactly."""
import copy
import math

import pytest
import torch
from transformers import TrainingArguments, get_linear_schedule_with_warmup

import lomo_kernels as lk
from lomo_kernels.integrations.transformers import LomoTrainer
from lomo_kernels.testing import tiny_llama

LR, CLIP, BATCH, SEQ = 1e-2, 0.5, 2, 10


def dataset(vocab, n):
    ids = torch.randint(0, vocab, (n, SEQ))
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def training_args(tmp_path, max_steps, **overrides):
    kwargs = dict(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, max_steps=max_steps, learning_rate=LR,
                  max_grad_norm=CLIP, lr_scheduler_type="linear", warmup_steps=1, weight_decay=0.01, logging_steps=1,
                  save_strategy="no", report_to=[], use_cpu=True, train_sampling_strategy="sequential",
                  dataloader_num_workers=0, disable_tqdm=True, seed=0)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def manual_loop(model, data, steps):
    """What LomoTrainer should do: norm phase, fused backward at the scheduler's lr, scheduler step;
    no weight decay for biases and norm weights (the Trainer's rule)."""
    no_decay = [n for n, _ in model.named_parameters() if "norm" in n or n.endswith("bias")]
    opt = lk.Lomo(model, lr=LR, clip_grad_norm=CLIP, weight_decay=0.01, no_decay=no_decay)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=1, num_training_steps=steps)
    norms = []
    for i in range(steps):
        batch = data[i * BATCH:(i + 1) * BATCH]
        ids = torch.stack([b["input_ids"] for b in batch])
        loss = model(input_ids=ids, labels=ids).loss
        norms.append(opt.grad_norm(loss))
        opt.fused_backward(loss, sched.get_last_lr()[0])
        opt.step()  # a no-op, as in the Trainer
        sched.step()
    return norms


def test_trainer_equals_manual_loop_with_clipping_and_schedule(tmp_path):
    steps = 3
    model = tiny_llama()
    manual, start = copy.deepcopy(model), copy.deepcopy(model)
    data = dataset(model.config.vocab_size, steps * BATCH)
    trainer = LomoTrainer(model=model, args=training_args(tmp_path, steps), train_dataset=data)
    trainer.train()
    norms = manual_loop(manual, data, steps)
    assert all(math.isfinite(n) for n in norms) and max(norms) > CLIP  # clipping was active
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), start.parameters()))
    for (name, p), q in zip(model.named_parameters(), manual.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7), name
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == steps
    assert [entry["grad_norm"] for entry in logged] == pytest.approx(norms, rel=1e-5)
    assert all(entry["skipped_steps"] == 0 for entry in logged)
    assert isinstance(trainer.fused_optimizer, lk.Lomo)
    assert trainer.fused_optimizer.closed and trainer.optimizer is None  # train() released the model


def _update_rel_err(p, q, start):
    return ((p.double() - q.double()).norm() / (q.double() - start.double()).norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("clip", [0.0, CLIP])
def test_trainer_equals_hf_trainer_sgd_with_its_decay_rule(tmp_path, clip):
    from transformers import Trainer
    steps = 3
    model = tiny_llama()
    start, ref = copy.deepcopy(model), copy.deepcopy(model)
    data = dataset(model.config.vocab_size, steps * BATCH)
    args = dict(weight_decay=0.5, max_grad_norm=clip, learning_rate=0.05)
    LomoTrainer(model=model, args=training_args(tmp_path / "lomo", steps, **args), train_dataset=data).train()
    Trainer(model=ref, args=training_args(tmp_path / "sgd", steps, optim="sgd", **args), train_dataset=data).train()
    norm = start.model.norm.weight
    assert not torch.equal(ref.model.norm.weight, norm)  # it trained, without decay (checked below)
    for (name, p), q, s in zip(model.named_parameters(), ref.parameters(), start.parameters()):
        assert _update_rel_err(p, q, s) <= 1e-4, f"{name}: {_update_rel_err(p, q, s):.2e}"


def test_trainer_releases_the_model_when_train_raises(tmp_path):
    model = tiny_llama()
    data = dataset(model.config.vocab_size, 2 * BATCH)

    class Boom(LomoTrainer):
        def training_step(self, *args, **kwargs):
            super().training_step(*args, **kwargs)
            raise KeyboardInterrupt

    trainer = Boom(model=model, args=training_args(tmp_path, 2), train_dataset=data)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert "_lomo_hold" not in model.__dict__ and trainer.optimizer is None


def test_scheduler_does_not_advance_on_a_skipped_step(tmp_path):
    model = tiny_llama().to(torch.float16)
    data = dataset(model.config.vocab_size, 3 * BATCH)
    rates = []

    class Overflowing(LomoTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            rates.append(self._get_learning_rate())
            return loss * float("inf") if len(rates) == 2 else loss  # the second step overflows

    trainer = Overflowing(model=model, args=training_args(tmp_path, 3, max_grad_norm=0.0, warmup_steps=0),
                          train_dataset=data)
    trainer.train()
    assert trainer.fused_optimizer.skipped_steps == 1
    assert rates[2] == rates[1] < rates[0]  # linear decay, paused by the skipped step


def test_trainer_resumes_exactly_from_its_checkpoint(tmp_path):
    steps, kwargs = 4, dict(optimizer_name="adalomo", optimizer_kwargs={"statistics": "recompute"})
    model = tiny_llama()
    start = copy.deepcopy(model.state_dict())
    data = dataset(model.config.vocab_size, steps * BATCH)
    full = LomoTrainer(model=model, args=training_args(tmp_path / "full", steps), train_dataset=data, **kwargs)
    full.train()

    first = tiny_llama()
    first.load_state_dict(start)
    LomoTrainer(model=first, args=training_args(tmp_path / "split", steps, save_strategy="steps", save_steps=2),
                train_dataset=data, **kwargs).train()
    resumed = tiny_llama()  # a fresh model: everything comes from the checkpoint
    trainer = LomoTrainer(model=resumed, args=training_args(tmp_path / "split", steps), train_dataset=data, **kwargs)
    trainer.train(resume_from_checkpoint=str(tmp_path / "split" / "checkpoint-2"))
    assert trainer.fused_optimizer.step_count == steps
    for (name, p), q in zip(resumed.named_parameters(), model.parameters()):
        assert torch.equal(p, q), name


def test_trainer_refuses_what_fused_updates_cannot_do(tmp_path):
    data = dataset(97, 2)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=1"):
        LomoTrainer(model=tiny_llama(), args=training_args(tmp_path, 1, gradient_accumulation_steps=2),
                    train_dataset=data)
    with pytest.raises(ValueError, match="optimizer_name"):
        LomoTrainer(model=tiny_llama(), args=training_args(tmp_path, 1), train_dataset=data, optimizer_name="adam")


@pytest.mark.parametrize("name, extra", [("adamw", {}), ("apollo", {"rank": 4, "update_proj_gap": 2}),
                                         ("apollo-mini", {})])
def test_trainer_with_hift_over_the_adaptive_optimizers_resumes_exactly(tmp_path, name, extra):
    """LomoTrainer(optimizer_name=..., hift=...): 2 steps, a checkpoint mid-cycle (4 groups), then 2 more in a
    fresh trainer and model equal 4 uninterrupted steps bitwise (HiFT's position and per-group states, AdamW's
    moments, APOLLO's projector seeds and limiter norms, all through the Trainer's checkpoint)."""
    from lomo_kernels.optim.hift import HiFT

    steps = 4
    kwargs = dict(optimizer_name=name, optimizer_kwargs=extra, hift=dict(group_size=1, strategy="random", seed=3))
    overrides = dict(learning_rate=1e-2, max_grad_norm=1.0, warmup_steps=0)  # HF warmup starts at lr 0: a lost cycle
    torch.manual_seed(0)
    model = tiny_llama()
    start = copy.deepcopy(model.state_dict())
    data = dataset(model.config.vocab_size, steps * BATCH)
    full = LomoTrainer(model=model, args=training_args(tmp_path / "full", steps, **overrides), train_dataset=data,
                       **kwargs)
    full.train()
    hift = full.fused_optimizer
    expected = {"adamw": lk.AdamW, "apollo": lk.Apollo, "apollo-mini": lk.ApolloMini}[name]
    assert isinstance(hift, HiFT) and type(hift.optimizer) is expected and hift.closed
    assert hift.step_count == steps and hift.group_steps == [1, 1, 1, 1]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, start[n])}
    assert changed == {n for n, _ in model.named_parameters()}  # every group trained once

    first = tiny_llama()
    first.load_state_dict(start)
    LomoTrainer(model=first, args=training_args(tmp_path / "split", steps, save_strategy="steps", save_steps=2,
                                                **overrides), train_dataset=data, **kwargs).train()
    resumed = tiny_llama()
    trainer = LomoTrainer(model=resumed, args=training_args(tmp_path / "split", steps, **overrides),
                          train_dataset=data, **kwargs)
    trainer.train(resume_from_checkpoint=str(tmp_path / "split" / "checkpoint-2"))
    assert trainer.fused_optimizer.step_count == steps
    for (n, p), q in zip(resumed.named_parameters(), model.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("name", ["lomo", "adamw"])
def test_trainer_fused_cross_entropy_on_equals_off(tmp_path, name):
    """LomoTrainer(fused_cross_entropy=True/False): 2 steps with the LM head's update inside the loss log the
    same losses as the logits path (within 1e-5)."""
    losses = {}
    torch.manual_seed(0)
    start = tiny_llama().state_dict()
    data = dataset(97, 2 * BATCH)
    for flag in (True, False):
        model = tiny_llama()
        model.load_state_dict(start)
        trainer = LomoTrainer(model=model, args=training_args(tmp_path / str(flag), 2, warmup_steps=0),
                              train_dataset=data, optimizer_name=name, fused_cross_entropy=flag)
        trainer.train()
        assert trainer.fused_optimizer.fused_cross_entropy is flag, trainer.fused_optimizer.fused_cross_entropy_reason
        losses[flag] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses[True]) == 2
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    with pytest.raises(TypeError, match="fused_cross_entropy must be"):
        LomoTrainer(model=tiny_llama(), args=training_args(tmp_path, 1), train_dataset=data, fused_cross_entropy=1)
