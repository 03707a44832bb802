"""ZeRO-3 fused updates: shard geometry, config checks, and real 2-rank DeepSpeed runs on CPU (gloo).

The 2-rank run (tests/zero3_workers/train_zero3.py) trains a tiny LLaMA for 3 steps per case; here
the same steps run in one process on the concatenated batch, and the gathered parameters must agree.
"""
import importlib.util
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lomo_kernels.integrations.zero3_shard import (check_resume, check_zero3_config, choose_strategy,
                                                   flat_range_blocks, shard_range)

WORKER = Path(__file__).parent / "zero3_workers" / "train_zero3.py"
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")
GOOD = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}


# --- shard geometry --------------------------------------------------------------------------------

@pytest.mark.parametrize("numel,world", [(1, 2), (7, 2), (75, 2), (75, 4), (4800, 2), (123 * 77, 3), (5, 8)])
def test_shard_ranges_tile_the_parameter(numel, world):
    partition = -(-numel // world)  # DeepSpeed pads numel to a multiple of the world size
    ranges = [shard_range(numel, partition, r) for r in range(world)]
    covered = [i for start, end in ranges for i in range(start, end)]
    assert covered == list(range(numel))
    assert all(end - start <= partition for start, end in ranges)


@pytest.mark.parametrize("rows,cols,world", [(75, 64, 2), (5, 123, 3), (77, 5, 4), (1, 9, 4), (3, 1, 2)])
def test_flat_range_blocks_cover_the_shard_as_rectangles(rows, cols, world):
    matrix = torch.arange(rows * cols).view(rows, cols)
    partition = -(-rows * cols // world)
    for rank in range(world):
        start, end = shard_range(rows * cols, partition, rank)
        blocks = flat_range_blocks(start, end, cols)
        assert len(blocks) <= 3
        pieces = []
        for b in blocks:
            rect = matrix[b.row0:b.row0 + b.rows, b.col0:b.col0 + b.cols]
            assert rect.numel() == b.numel
            assert rect.reshape(-1).tolist() == list(range(b.flat_start, b.flat_start + b.numel))
            pieces.append(rect.reshape(-1))
        got = torch.cat(pieces).tolist() if pieces else []
        assert got == list(range(start, end))


def test_choose_strategy_by_volume():
    assert choose_strategy(16 * (4096 + 4096), 4096 * 4096) == "activation_gather"
    assert choose_strategy(8192 * (4096 + 4096), 4096 * 4096) == "reduce_scatter"


# --- configuration checks (no process group needed) ---------------------------------------------

@pytest.mark.parametrize("config,message", [
    ({"zero_optimization": {"stage": 2}}, "stage is 2"),
    ({"zero_optimization": {"stage": 1}}, "stage is 1"),
    ({}, "stage is 0"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}, "offload_param.device='cpu'"),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}}, "offload_optimizer.device='nvme'"),
    ({"zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW"}}, "'optimizer' section"),
    ({"zero_optimization": {"stage": 3}, "gradient_accumulation_steps": 4}, "gradient_accumulation_steps=4"),
    ({"zero_optimization": {"stage": 3}, "gradient_clipping": 1.0}, "gradient_clipping=1.0"),
    ({"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 8}}, "zero_hpz_partition_size=8"),
    ({"zero_optimization": {"stage": 3, "zero_quantized_weights": True}}, "zero_quantized_weights"),
])
def test_bad_configs_are_named(config, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        check_zero3_config(config)


def test_good_configs_pass():
    check_zero3_config(GOOD)
    check_zero3_config({"zero_optimization": {"stage": 3, "offload_param": {"device": "none"}},
                        "bf16": {"enabled": True}, "gradient_accumulation_steps": 1, "gradient_clipping": 0})


@needs_deepspeed
def test_deepspeed_version_gate():
    from lomo_kernels.integrations.deepspeed import check_deepspeed_version

    check_deepspeed_version("0.19.8")
    for version in ("0.18.9", "0.20.0", "1.0.0"):
        with pytest.raises(RuntimeError, match=f"deepspeed {version} is not supported"):
            check_deepspeed_version(version)


@needs_deepspeed
def test_shipped_65b_config_is_accepted():
    import json

    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    config = json.loads((Path(__file__).parents[1] / "python" / "zero3_llama65b_8x3090.json").read_text())
    check_zero3_config(config)
    zero = DeepSpeedZeroConfig(**config["zero_optimization"])  # DeepSpeed's own schema (unknown keys fail)
    assert zero.stage == 3 and zero.param_persistence_threshold == 10000


def test_resume_layout_checks():
    check_resume(2, 1, 2, 1)
    with pytest.raises(ValueError, match="shards of 8 data-parallel ranks, this run has 2"):
        check_resume(8, 1, 2, 1)
    with pytest.raises(ValueError, match="shard checkpoint of rank 0"):
        check_resume(2, 0, 2, 1)


@needs_deepspeed
def test_attach_refuses_before_touching_the_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    from lomo_kernels.integrations.deepspeed import attach
    from lomo_kernels.optim import Lomo

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = Lomo(model, lr=0.1)
    with pytest.raises(ValueError, match="stage is 2"):
        attach(optimizer, {"zero_optimization": {"stage": 2}})
    with pytest.raises(ValueError, match="offload_param"):
        attach(optimizer, {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}})
    with pytest.raises(ValueError, match="strategy must be one of"):
        attach(optimizer, GOOD, strategy="allreduce")
    with pytest.raises(ValueError, match="projected= is for Apollo"):
        attach(optimizer, GOOD, projected=["lm_head.weight"])
    with pytest.raises(ValueError, match="not ZeRO-3 partitioned.*deepspeed.zero.Init"):
        attach(optimizer, GOOD)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


# --- the 2-rank runs ---------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    if not HAS_DEEPSPEED:
        pytest.skip("deepspeed is not installed")
    out = tmp_path_factory.mktemp("zero3") / "result.pt"
    proc = subprocess.run([sys.executable, str(WORKER), str(out), str(_free_port())], capture_output=True,
                          text=True, timeout=600, env={**__import__("os").environ, "DS_ACCELERATOR": "cpu"})
    if proc.returncode != 0:
        pytest.fail(f"2-rank ZeRO-3 run failed (rc {proc.returncode}):\n{proc.stderr[-6000:]}")
    return torch.load(out, weights_only=False)


def _single_process_run(run, case):
    """The same steps on one process: the plain fused optimizer on the concatenated (both ranks') batch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lomo_kernels import optim

    result = run["results"][case]
    model = LlamaForCausalLM(LlamaConfig(**run["model"])).to(result["initial"]["model.norm.weight"].dtype)
    model.load_state_dict(result["initial"], strict=True)
    if result["frozen_small"]:
        for p in model.parameters():
            p.requires_grad_(p.dim() != 1)
    args = dict(result["args"], fused_cross_entropy=result["fused_loss"])  # the LM head as the 2-rank run did
    optimizer = getattr(optim, result["optimizer"])(model, backend="torch", **args)
    assert getattr(optimizer, "fused_cross_entropy", False) == result["fused_loss"]
    norms = []
    poisoned_step = result["poisoned"][0] if result["poisoned"] is not None else None
    for step, ids in enumerate(run["batches"][:len(result["skipped"])]):
        loss = model(input_ids=ids, labels=ids).loss
        if step == poisoned_step:  # one rank's half of the batch had an inf loss: so has the whole batch
            loss = loss * float("inf")
        if optimizer.clip_grad_norm is not None:
            norms.append(optimizer.grad_norm(loss))
        optimizer.fused_backward(loss, optimizer.lr)
    return {n: p.detach() for n, p in model.named_parameters()}, norms


def _assert_bf16_close(got, want, initial, label):
    """bf16 weights: the split and the concatenated batch run bf16 GEMMs of other shapes, and nearest
    rounding turns tiny differences into whole bf16 steps, so the runs drift apart slowly. Measured:
    the difference is at most 14% of the update (3 steps); a wrong scale or a lost update is ~100%."""
    assert got.dtype == want.dtype == torch.bfloat16
    changed = int((want != initial).sum())
    assert changed > 0.01 * want.numel(), f"{label}: only {changed} elements trained: the check would be weak"
    update = (want.float() - initial.float()).norm().item()
    drift = (got.float() - want.float()).norm().item()
    assert drift <= 0.25 * update, f"{label}: differs by {drift:.3g}, the update is {update:.3g}"


CASES = ["reduce_scatter", "activation_gather", "reduce_scatter_clip", "activation_gather_clip", "auto_clip",
         "adalomo_reduce_scatter", "adalomo_activation_gather_clip", "bf16_auto_clip",
         "adamw_reduce_scatter_clip", "adamw_activation_gather_clip", "apollo_auto_clip", "apollo_reduce_scatter_clip",
         "apollomini_activation_gather_clip", "bf16_sr_lomo_gather", "bf16_sr_adamw_gather", "bf16_sr_adamw_auto_clip"]
# fp32 parity, relative to the tensor's largest entry: 1e-5 for LOMO/AdaLomo. AdamW: 2e-4 (measured 8.9e-5 on
# reduce_scatter, 3.8e-5 on activation_gather, in attention weights): its step m/(√v+ε) ≈ g/|g| divides each
# element by its own gradient, so elements whose gradient nearly cancels (|g| ~ 1e-7 of the largest) turn the
# ~1e-7 relative difference of the two runs' fp32 sums (split vs concatenated batch) into a visible part of
# lr. APOLLO: 1e-4 (measured 4.4e-7: its scale is per channel, not per element).
TOLERANCE = {"adamw_reduce_scatter_clip": 2e-4, "adamw_activation_gather_clip": 2e-4, "apollo_auto_clip": 1e-4,
             "apollo_reduce_scatter_clip": 1e-4, "apollomini_activation_gather_clip": 1e-4}
BITWISE = ("bf16_sr_lomo_gather", "bf16_sr_adamw_gather")


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_equal_one_process_on_the_concatenated_batch(two_rank_run, case):
    result = two_rank_run["results"][case]
    expected, expected_norms = _single_process_run(two_rank_run, case)
    assert result["final"].keys() == expected.keys()
    for name, want in expected.items():
        got, initial = result["final"][name], result["initial"][name]
        if case in BITWISE:  # stochastic rounding keyed by the full parameter's index: the same bits
            if want.dim() == 2:  # the frozen 1-D parameters stay as they were, on both sides
                assert (want != initial).float().mean() > 0.2, f"{case}: {name} barely trained"
            assert torch.equal(got, want), f"{case}: {name} differs in {int((got != want).sum())} elements"
            continue
        if result["bf16"]:
            _assert_bf16_close(got, want, initial, f"{case}: {name}")
            continue
        moved = (want - initial).abs().max().item()
        err = (got - want).abs().max().item()
        scale = want.abs().max().item()
        assert moved > 1e-4 * scale, f"{case}: {name} barely trained (moved {moved:.3g}): the check would be weak"
        assert err <= TOLERANCE.get(case, 1e-5) * scale, f"{case}: {name} differs by {err:.3g} (scale {scale:.3g})"
    assert result["skipped"].count(False) == 3
    if result["poisoned"] is not None:  # the inf flag of one rank reached the other: both skipped the step
        assert result["skipped"][result["poisoned"][0]]
    if "clip_grad_norm" in result["args"]:
        torch.testing.assert_close(torch.tensor(result["norms"]), torch.tensor(expected_norms),
                                   rtol=2e-3 if result["bf16"] else 1e-5, atol=0)
        # the clip bound is active at every applied step, so the coefficient is exercised
        assert min(expected_norms) > result["args"]["clip_grad_norm"]


def test_routes_taken(two_rank_run):
    results = two_rank_run["results"]
    for case in CASES:
        strategy = two_rank_run["results"][case]["strategy"]
        routes = results[case]["routes"]
        linear_routes = {route for name, route in routes.items() if name.endswith("proj.weight")}
        if strategy == "auto":  # 16 tokens: activation-gather for every linear layer and the embedding
            assert linear_routes == {"activation_gather"}
            assert routes["model.embed_tokens.weight"] == "activation_gather"
        else:
            assert linear_routes == {strategy}
        if not results[case]["frozen_small"]:
            assert routes["model.norm.weight"] == "reduce_scatter"  # small parameters: from their gradient


def test_lm_head_update_inside_the_fused_loss(two_rank_run):
    """Under ZeRO-3 the LM head of Lomo, AdaLomo, AdamW and APOLLO (AdamW-ruled head) is updated inside the
    fused cross-entropy (no logits) unless turned off."""
    results = two_rank_run["results"]
    for case in CASES:
        result = results[case]
        expected = result["args"].get("fused_cross_entropy", True)
        assert result["fused_loss"] == expected, case
        assert (result["routes"]["lm_head.weight"] == "fused_loss") == expected, case


def test_persistent_and_partitioned_parameters_both_present(two_rank_run):
    """Parameters under the persistence threshold stay gathered between steps: the run covers them
    (their stale full copies must be refreshed after each update) and ordinary partitioned ones."""
    persistent = set(two_rank_run["results"]["reduce_scatter"]["persistent"])
    assert "model.norm.weight" in persistent
    assert "model.layers.0.mlp.up_proj.bias" not in persistent  # 75 elements: padded on rank 1
    assert "model.layers.0.mlp.up_proj.weight" not in persistent


def test_activation_gather_allocates_nothing_weight_sized(two_rank_run):
    """Inside every linear update on the activation-gather route no new tensor reaches the size of the
    weight (Lomo: no gradient at all; AdaLomo: a shard-sized one); on the reduce-scatter route the
    same tracker sees the full layer gradient."""
    for case in ("activation_gather", "activation_gather_clip", "adalomo_activation_gather_clip"):
        records = two_rank_run["results"][case]["records"]
        assert records and all(route == "activation_gather" for _, route, _, _ in records)
        for name, _, largest, weight_numel in records:
            assert largest < weight_numel, f"{case}: {name} allocated {largest} elements (weight {weight_numel})"
    records = two_rank_run["results"]["reduce_scatter"]["records"]
    assert all(largest >= weight_numel for _, _, largest, weight_numel in records)


@pytest.mark.parametrize("case", ["reduce_scatter", "adalomo_reduce_scatter", "adamw_reduce_scatter_clip"])
def test_resume_from_shards(two_rank_run, case):
    resume = two_rank_run["results"][case]["resume"]
    assert "shards of 4 data-parallel ranks, this run has 2" in resume["refused"]
    assert resume["untouched"], "the refused checkpoint wrote into a shard"
    assert resume["restored"] and resume["restored_state"]
    if not case.startswith("reduce_scatter"):  # their state round-trips too (Lomo's fp32 run keeps none)
        assert resume["state_entries"] > 0


@pytest.mark.parametrize("case", ["adamw_reduce_scatter_clip", "apollo_auto_clip"])
def test_resume_redoes_the_last_step_exactly(two_rank_run, case):
    """Each rank's state saved before the last step (shards, AdamW moments of the shard, APOLLO's
    rank-sized moments, projector and its seed, limiter norm), loaded after it: the step again gives
    the same bits."""
    assert two_rank_run["results"][case]["resume_exact"]


def test_apollo_rank_larger_than_a_projected_weight_is_refused(two_rank_run):
    """Checked against the full shapes (zero.Init's placeholders hide them), before DeepSpeed is set up."""
    assert "rank must be <= min(m, n)" in two_rank_run["results"]["apollo_auto_clip"]["refused_rank"]


def test_adamw_moments_are_shard_local(two_rank_run):
    """AdamW's m and v of each parameter cover this rank's shard only (1/W of the weight); APOLLO keeps
    rank-sized state (moments of R, projector) for its projected weights and AdamW moments for the rest."""
    for case in ("adamw_reduce_scatter_clip", "apollo_auto_clip", "bf16_sr_adamw_gather"):
        memory = two_rank_run["results"][case]["memory"]
        assert memory["adam"]
        for name, (m, v, shard, full) in memory["adam"].items():
            assert m == v == shard <= -(-full // 2), f"{case}: {name} moments {m}, {v} for a shard of {shard}/{full}"
    projected = two_rank_run["results"]["apollo_auto_clip"]["memory"]["projected"]
    assert projected and "lm_head.weight" not in projected and "model.layers.0.mlp.up_proj.weight" in projected
    for name, (state, full) in projected.items():
        assert state < full, f"{name}: APOLLO state {state} elements for a weight of {full}"


@needs_deepspeed
def test_launcher_entry_point_trains_saves_and_exports(tmp_path):
    """python/launch_zero3.sh's program, with 2 CPU ranks under torchrun: trains a tiny saved LLaMA
    (loaded shard-wise by from_pretrained under ZeRO-3), writes per-rank shards and a full export."""
    import json
    import os

    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from lomo_kernels.training.tokenizer import ByteTokenizer, save_byte_tokenizer

    model_dir, out = tmp_path / "model", tmp_path / "run"
    LlamaForCausalLM(LlamaConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=32, intermediate_size=40,
                                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                 bos_token_id=ByteTokenizer.bos_id, eos_token_id=ByteTokenizer.eos_id,
                                 pad_token_id=ByteTokenizer.pad_id)).save_pretrained(model_dir)
    save_byte_tokenizer(model_dir)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"sample {i}: the quick brown fox"}) + "\n" for i in range(12)))
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "lomo_kernels.integrations.zero3_train", "--model",
           str(model_dir), "--data", str(data), "--ds-config", str(config), "--output", str(out), "--dtype", "fp32",
           "--optimizer", "adalomo", "--lr", "0.01", "--clip-grad-norm", "1.0", "--steps", "2", "--batch-size", "2",
           "--seq-len", "16", "--export"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1],
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "step 2/2 loss" in proc.stdout
    assert (out / "shards" / "rank0.pt").exists() and (out / "shards" / "rank1.pt").exists()
    before, after = load_file(model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].shape == after[name].shape
        assert not torch.equal(before[name], after[name]), f"{name} was not trained"


def test_launcher_builds_each_optimizer():
    """zero3_train's --optimizer choices and their options (no process group: a plain tiny model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lomo_kernels.integrations.zero3_train import make_optimizer, parse_args

    base = ["--model", "m", "--data", "d", "--ds-config", "c", "--output", "o", "--clip-grad-norm", "1.0"]
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    for choice, cls, extra in (("adamw", "AdamW", ["--state-dtype", "bf16"]), ("apollo", "Apollo", ["--apollo-rank", "4"]),
                               ("apollo-mini", "ApolloMini", []), ("lomo", "Lomo", [])):
        optimizer = make_optimizer(parse_args(base + ["--optimizer", choice] + extra), model)
        assert type(optimizer).__name__ == cls
        if choice == "adamw":
            assert optimizer.state_dtype == torch.bfloat16
        if choice == "apollo":
            assert optimizer.rank == 4
        optimizer.close()
    with pytest.raises(ValueError, match="--apollo-rank is for apollo"):
        make_optimizer(parse_args(base + ["--optimizer", "adamw", "--apollo-rank", "4"]), model)
    with pytest.raises(ValueError, match="--state-dtype is for"):
        make_optimizer(parse_args(base + ["--optimizer", "lomo", "--state-dtype", "bf16"]), model)
