"""Exact resume: 6 steps in one go equal 3 steps, save, load into a *fresh process*, 3 more steps,
bit for bit. Covers what a checkpoint must carry: AdaLomo statistics and step (β2 schedule), the fp16
loss scaler (its scale changes every 2 clean steps here), the step counter that seeds bf16
stochastic rounding, AdamW's moments (bf16), APOLLO's projector seeds and limiter norms, and HiFT's
position, permutation and per-group states."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lomo_kernels as lk
from lomo_kernels.testing import tiny_llama

STEPS = 6
CONFIGS = {
    "lomo-bf16": (torch.bfloat16, lambda m: lk.Lomo(m, lr=1e-2, clip_grad_norm=1.0, weight_decay=0.1, seed=7)),
    "lomo-fp16": (torch.float16, lambda m: lk.Lomo(m, lr=1e-2, loss_scale_args=dict(init_scale=2**10, scale_window=2))),
    "adalomo": (torch.float32, lambda m: lk.AdaLomo(m, lr=1e-2, clip_grad_norm=1.0, weight_decay=0.1)),
    # m and v in bf16 (stochastically rounded: the seed sequence), the bias-correction step
    "adamw-bf16-state": (torch.float32, lambda m: lk.AdamW(m, lr=1e-2, clip_grad_norm=1.0, weight_decay=0.1,
                                                           state_dtype=torch.bfloat16)),
    # projections refreshed at steps 0, 2, 4 from advanced seeds, the limiter's previous norms
    "apollo": (torch.float32, lambda m: lk.Apollo(m, lr=1e-2, rank=4, update_proj_gap=2, weight_decay=0.1)),
    # HiFT's cycle position, the next cycle's permutation, per-group clocks, over ApolloMini
    "hift-apollo-mini": (torch.float32, lambda m: lk.HiFT(lk.ApolloMini(m, lr=1e-2, update_proj_gap=2),
                                                          strategy="random", seed=5)),
}


def train(opt, model, data):
    for ids in data:
        opt.fused_backward(model(input_ids=ids, labels=ids).loss)


def resume_and_finish(checkpoint: Path) -> None:
    """The fresh process: a new (differently initialized) model gets everything from the checkpoint."""
    saved = torch.load(checkpoint, weights_only=True)
    dtype, make = CONFIGS[saved["config"]]
    model = tiny_llama().to(dtype).eval()
    model.load_state_dict(saved["model"])
    opt = make(model)
    opt.load_state_dict(saved["optimizer"])
    train(opt, model, saved["data"])
    torch.save({"model": model.state_dict(), "step": opt.step_count}, checkpoint.with_suffix(".done"))


def test_resume_in_a_fresh_process_is_exact(tmp_path):
    expected = {}
    for name, (dtype, make) in CONFIGS.items():
        init = tiny_llama().to(dtype).eval()
        data = [torch.randint(0, init.config.vocab_size, (2, 10)) for _ in range(STEPS)]
        start = {k: v.clone() for k, v in init.state_dict().items()}
        train(make(init), init, data)
        expected[name] = init.state_dict()

        split = tiny_llama().to(dtype).eval()
        split.load_state_dict(start)
        opt = make(split)
        train(opt, split, data[:STEPS // 2])
        torch.save({"config": name, "model": split.state_dict(), "optimizer": opt.state_dict(),
                    "data": data[STEPS // 2:]}, tmp_path / f"{name}.pt")
        if name == "lomo-fp16":
            assert opt.loss_scale != 2**10  # the scaler's state is part of what must be restored

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    subprocess.run([sys.executable, __file__, *[str(tmp_path / f"{name}.pt") for name in CONFIGS]],
                   check=True, env=env, cwd=repo)
    for name in CONFIGS:
        done = torch.load(tmp_path / f"{name}.done", weights_only=True)
        assert done["step"] == STEPS
        for key, value in expected[name].items():
            assert torch.equal(done["model"][key], value), f"{name}: {key}"


def test_checkpoint_mismatches_are_refused():
    model = tiny_llama()
    state = lk.AdaLomo(model).state_dict()
    with pytest.raises(ValueError, match="cannot load it into Lomo"):
        lk.Lomo(tiny_llama()).load_state_dict(state)
    other = tiny_llama(layers=1)
    with pytest.raises(ValueError, match="do not match this model"):
        lk.AdaLomo(other).load_state_dict(state)
    with pytest.raises(ValueError, match="loss scal"):
        lk.Lomo(tiny_llama().half()).load_state_dict(lk.Lomo(tiny_llama()).state_dict())


if __name__ == "__main__":
    for path in sys.argv[1:]:
        resume_and_finish(Path(path))
