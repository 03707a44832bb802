"""Two-rank ZeRO-3 training run on CPU (gloo), driven by tests/test_zero3.py.

Usage: python train_zero3.py OUT_FILE PORT — spawns 2 ranks; each case builds a tiny LLaMA under
``deepspeed.zero.Init``, attaches a fused ``Lomo`` or ``AdaLomo`` and trains 3 steps; rank 0 writes the initial and
final gathered parameters, the batches and per-step norms of every case to OUT_FILE (torch.save).
"""
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_iter

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: lomo_kernels

WORLD_SIZE = 2
STEPS = 3
LOCAL_BATCH, SEQ = 2, 4  # 8 tokens per rank: few enough that activation-gather is the cheaper route
MODEL = dict(vocab_size=101, hidden_size=64, intermediate_size=75, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=32, mlp_bias=True, tie_word_embeddings=False)
DS_CONFIG = {"train_micro_batch_size_per_gpu": LOCAL_BATCH,
             # 70 elements: the norm weights and q/o biases stay gathered (persistent), the rest does not
             "zero_optimization": {"stage": 3, "param_persistence_threshold": 70}}


@dataclass(frozen=True)
class Case:
    optimizer: str  # a class of lomo_kernels.optim
    strategy: str
    args: dict  # the optimizer's keyword arguments
    checkpointing: bool = False  # layers recomputed inside backward: DeepSpeed gathers them a second time
    poisoned: tuple | None = None  # (step, rank) whose loss is made inf; a 4th step keeps 3 applied ones
    bf16: bool = False
    frozen_small: bool = False  # 1-D parameters (norms, biases) frozen: their autograd gradients (bf16 sums
    #                             over each rank's tokens) cannot match one process bit for bit
    resume: bool = False  # save the state before the last step, then redo it from the loaded state


CASES = {
    # Lomo's LM head: through the fused cross-entropy (the default; its chunks' dr all-gathered), except in
    # these two, where the model computes logits and the head takes the linear routes
    "reduce_scatter": Case("Lomo", "reduce_scatter", dict(lr=0.05, weight_decay=0.01, fused_cross_entropy=False)),
    "activation_gather": Case("Lomo", "activation_gather", dict(lr=0.05, weight_decay=0.01,
                                                                fused_cross_entropy=False)),
    "reduce_scatter_clip": Case("Lomo", "reduce_scatter", dict(lr=0.5, clip_grad_norm=0.3)),
    "activation_gather_clip": Case("Lomo", "activation_gather", dict(lr=0.5, clip_grad_norm=0.3, clip_grad_value=0.02)),
    # both ranks must skip the step where only rank 1 saw a non-finite gradient
    "auto_clip": Case("Lomo", "auto", dict(lr=0.5, clip_grad_norm=0.3, weight_decay=0.01), checkpointing=True,
                      poisoned=(1, 1)),
    "adalomo_reduce_scatter": Case("AdaLomo", "reduce_scatter", dict(lr=0.05, weight_decay=0.01)),
    "adalomo_activation_gather_clip": Case("AdaLomo", "activation_gather",
                                           dict(lr=0.05, clip_grad_norm=0.3, clip_grad_value=0.02)),
    # bf16 weights, nearest rounding: the same per-element rule, so it can be compared with one process
    "bf16_auto_clip": Case("Lomo", "auto", dict(lr=2.0, clip_grad_norm=0.3, rounding="nearest"), bf16=True),
    # AdamW with shard-local moments; APOLLO with its all-reduced projected gradient (issue 11)
    "adamw_reduce_scatter_clip": Case("AdamW", "reduce_scatter", dict(lr=0.01, weight_decay=0.1, clip_grad_norm=0.3),
                                      resume=True),
    "adamw_activation_gather_clip": Case("AdamW", "activation_gather",
                                         dict(lr=0.01, weight_decay=0.1, clip_grad_norm=0.3, clip_grad_value=0.02)),
    "apollo_auto_clip": Case("Apollo", "auto", dict(lr=0.01, rank=4, update_proj_gap=2, weight_decay=0.1,
                                                    clip_grad_norm=0.3), resume=True),
    "apollo_reduce_scatter_clip": Case("Apollo", "reduce_scatter", dict(lr=0.01, rank=4, update_proj_gap=2,
                                                                        weight_decay=0.1, clip_grad_norm=0.3)),
    "apollomini_activation_gather_clip": Case("ApolloMini", "activation_gather",
                                              dict(lr=0.01, update_proj_gap=2, weight_decay=0.1, clip_grad_norm=0.3)),
    # bf16 weights, stochastic rounding keyed by the element's index in the full parameter (issue 10):
    # on the activation-gather route a shard rounds exactly like one process
    "bf16_sr_lomo_gather": Case("Lomo", "activation_gather", dict(lr=2.0, weight_decay=0.01), bf16=True,
                                frozen_small=True),
    "bf16_sr_adamw_gather": Case("AdamW", "activation_gather", dict(lr=0.01, weight_decay=0.1,
                                                                    state_dtype=torch.bfloat16),
                                 bf16=True, frozen_small=True),
    "bf16_sr_adamw_auto_clip": Case("AdamW", "auto", dict(lr=0.01, weight_decay=0.1, clip_grad_norm=0.3,
                                                          state_dtype=torch.bfloat16), bf16=True),
}


def batches():
    """The same global batches on every rank: [STEPS + 1, WORLD_SIZE * LOCAL_BATCH, SEQ] token ids."""
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, MODEL["vocab_size"], (STEPS + 1, WORLD_SIZE * LOCAL_BATCH, SEQ), generator=gen)


class LargestNewStorage(TorchDispatchMode):
    """Largest storage (in elements) that any op creates, ignoring outputs that alias an input."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        seen = {t.untyped_storage().data_ptr() for t in tree_iter((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_iter(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


def trace_linear_updates(updater, records):
    """Record, per fused linear update, the largest new tensor against the weight's size."""
    linear = updater.linear

    def traced(param, x, dy, **kwargs):
        with LargestNewStorage() as tracker:
            linear(param, x, dy, **kwargs)
        info = updater.shards[id(param)]
        records.append((info.name, updater.last_strategy[info.name], tracker.largest, info.numel))

    updater.linear = traced


def run_case(name, rank):
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    from lomo_kernels import optim
    from lomo_kernels.integrations.deepspeed import attach

    case = CASES[name]
    ds_config = dict(DS_CONFIG, bf16={"enabled": case.bf16})
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = LlamaForCausalLM(LlamaConfig(**MODEL))
    if case.checkpointing:
        model.gradient_checkpointing_enable()
    if case.frozen_small:
        for p in model.parameters():
            p.requires_grad_(len(p.ds_shape) != 1)
    refused_rank = ""
    if name == "apollo_auto_clip":  # rank 40 > the 32 rows of k_proj: refused from the full shapes
        too_large = optim.Apollo(model, backend="torch", **dict(case.args, rank=40))
        try:
            attach(too_large, ds_config, strategy=case.strategy)
        except ValueError as err:
            refused_rank = str(err)
        too_large.close()
    optimizer = getattr(optim, case.optimizer)(model, backend="torch", **case.args)
    updater = attach(optimizer, ds_config, strategy=case.strategy)
    initial = updater.full_state_dict()
    records, norms, skipped = [], [], []
    trace_linear_updates(updater, records)
    data = batches()
    n_steps = STEPS + (case.poisoned is not None)

    def train_step(step):
        ids = data[step, rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH]
        loss = model(input_ids=ids, labels=ids).loss
        if (step, rank) == case.poisoned:
            loss = loss * float("inf")
        norm = optimizer.grad_norm(loss) if optimizer.clip_grad_norm is not None else None
        optimizer.fused_backward(loss, optimizer.lr)
        return norm

    snapshot = None
    for step in range(n_steps):
        if case.resume and step == n_steps - 1:
            snapshot = updater.state_dict()  # clones: this rank's shards and optimizer state
        norm = train_step(step)
        if norm is not None:
            norms.append(norm)
        skipped.append(optimizer.skipped_step)
    final = updater.full_state_dict()
    result = dict(asdict(case), initial=initial, final=final, norms=norms, records=records,
                  skipped=skipped, routes=dict(updater.last_strategy),
                  persistent=sorted(n for n, p in model.named_parameters() if p.ds_persist),
                  memory=state_memory(updater),
                  fused_loss=updater.last_strategy.get("lm_head.weight") == "fused_loss", refused_rank=refused_rank)
    if name in ("reduce_scatter", "adalomo_reduce_scatter", "adamw_reduce_scatter_clip"):
        result["resume"] = check_resume(updater)
    if case.resume:  # the last step again, from the state saved before it: the same bits
        updater.load_state_dict(snapshot)
        train_step(n_steps - 1)
        again = updater.full_state_dict()
        result["resume_exact"] = all(torch.equal(again[n], t) for n, t in final.items())
    return result


def state_memory(updater):
    """Per rank: elements of optimizer state by kind, against this rank's shards and the full model."""
    opt = updater.optimizer
    params = dict(opt.model.named_parameters())
    adam = {n: (opt.exp_avg[n].numel(), opt.exp_avg_sq[n].numel(),
                updater.shards[id(params[n])].end - updater.shards[id(params[n])].start, int(params[n].ds_numel))
            for n in getattr(opt, "exp_avg", {})}
    projected = {n: (st.exp_avg.numel() + st.exp_avg_sq.numel() + (st.projector.numel() if st.projector is not None
                                                                    else 0), int(params[n].ds_numel))
                 for n, st in getattr(opt, "projectors", {}).items()}
    return dict(adam=adam, projected=projected)


def check_resume(updater):
    """A shard checkpoint restores the shards and the optimizer state (AdaLomo: sharded statistics);
    one from another world size is refused before any write."""
    saved = updater.state_dict()
    params = dict(updater.optimizer.model.named_parameters())
    first = next(iter(updater.shards.values()))
    with torch.no_grad():
        params[first.name].ds_tensor.zero_()
        for entry in updater.optimizer._named_state().values():
            for tensor in entry.values():
                tensor.zero_()
    wrong = dict(saved, world_size=4)
    try:
        updater.load_state_dict(wrong)
        refused = ""
    except ValueError as err:
        refused = str(err)
    untouched = bool((params[first.name].ds_tensor == 0).all())
    updater.load_state_dict(saved)
    reloaded = updater.state_dict()
    restored = all(torch.equal(params[n].ds_tensor[:t.numel()], t) for n, t in saved["shards"].items())
    state, state_again = saved["optimizer"]["state"], reloaded["optimizer"]["state"]
    restored_state = state.keys() == state_again.keys() and all(
        torch.equal(t, state_again[n][k]) for n, entry in state.items() for k, t in entry.items())
    return dict(refused=refused, untouched=untouched, restored=restored, restored_state=restored_state,
                state_entries=sum(len(entry) for entry in state.values()))


def worker(rank, out_file, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD_SIZE), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import transformers  # noqa: F401  -- import model classes before zero.Init patches tensor construction
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
    chosen = os.environ.get("ZERO3_CASES")  # a comma-separated subset (development runs)
    results = {name: run_case(name, rank) for name in (chosen.split(",") if chosen else CASES)}
    if rank == 0:
        torch.save(dict(results=results, batches=batches(), model=MODEL), out_file)
    # a clean shutdown: gloo's threads still running at interpreter exit can abort a rank ("terminate called
    # without an active exception"), which fails the run after its results were written
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1], int(sys.argv[2])), nprocs=WORLD_SIZE)
