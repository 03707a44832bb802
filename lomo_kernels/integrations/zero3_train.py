"""Multi-process fine-tuning of a Hugging Face causal LM with fused Lomo/AdaLomo/AdamW/APOLLO on DeepSpeed ZeRO-3.

Launch one process per GPU with DeepSpeed's launcher (python/launch_zero3.sh does)::

    deepspeed --num_gpus 8 -m lomo_kernels.integrations.zero3_train \\
        --model /path/to/llama-65b --data train.jsonl --ds-config python/zero3_llama65b_8x3090.json \\
        --dtype bf16 --lr 1e-2 --clip-grad-norm 1.0 --steps 1000 --output runs/65b

Every rank loads only its shards (``from_pretrained`` under ZeRO-3), trains on its slice of each
global batch, and at the end writes its shard checkpoint (``shards/rank{r}.pt``, for ``--resume`` with
the same number of ranks) and, with ``--export``, the full model gathered one parameter at a time on
rank 0 (``model.safetensors`` + config + tokenizer: loads with ``from_pretrained``).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .zero3_shard import STRATEGIES, check_resume, check_zero3_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPTIMIZERS = {"lomo": "Lomo", "adalomo": "AdaLomo", "adamw": "AdamW", "apollo": "Apollo", "apollo-mini": "ApolloMini"}


def make_optimizer(args, model):
    """The fused optimizer named by ``--optimizer`` with the run's options."""
    from .. import optim

    kwargs = dict(lr=args.lr, clip_grad_norm=args.clip_grad_norm, weight_decay=args.weight_decay, seed=args.seed)
    if args.clip_grad_value is not None:
        kwargs["clip_grad_value"] = args.clip_grad_value  # APOLLO refuses it (no thin-GEMM form)
    if args.optimizer in ("adamw", "apollo", "apollo-mini"):
        kwargs["state_dtype"] = DTYPES[args.state_dtype]
    elif args.state_dtype != "fp32":
        raise ValueError(f"--state-dtype is for adamw/apollo/apollo-mini, not {args.optimizer}")
    if args.optimizer in ("apollo", "apollo-mini"):
        kwargs["update_proj_gap"] = args.update_proj_gap
        if args.apollo_rank is not None:
            kwargs["rank"] = args.apollo_rank
    elif args.apollo_rank is not None:
        raise ValueError(f"--apollo-rank is for apollo/apollo-mini, not {args.optimizer}")
    return getattr(optim, OPTIMIZERS[args.optimizer])(model, **kwargs)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local Hugging Face model directory (config, weights, tokenizer)")
    p.add_argument("--data", nargs="+", required=True, help=".jsonl ({'text'} / {'prompt','completion'}) or text files")
    p.add_argument("--ds-config", required=True, help="DeepSpeed JSON config (ZeRO stage 3, no optimizer section)")
    p.add_argument("--output", required=True, help="directory for shard checkpoints and the exported model")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--optimizer", choices=tuple(OPTIMIZERS), default="lomo")
    p.add_argument("--state-dtype", choices=("fp32", "bf16"), default="fp32",
                   help="AdamW/APOLLO moments (sharded per rank for AdamW; APOLLO's are rank-sized)")
    p.add_argument("--apollo-rank", type=int, help="APOLLO's projection rank (default: 256; APOLLO-Mini: 1)")
    p.add_argument("--update-proj-gap", type=int, default=200, help="APOLLO: steps between projector refreshes")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip-grad-norm", type=float)
    p.add_argument("--clip-grad-value", type=float)
    p.add_argument("--strategy", choices=STRATEGIES, default="auto", help="how updates reach the shards")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=1, help="sequences per rank per step")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="recompute each layer in the backward pass (needed for 65B on 24 GB cards)")
    p.add_argument("--resume", action="store_true", help="load shards/rank{r}.pt from --output first")
    p.add_argument("--export", action="store_true", help="also write the full model (gathered on rank 0)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def load_ds_config(path: str, batch_size: int) -> dict:
    """Read and check the config before any model is built; fill the micro batch size from --batch-size."""
    config = json.loads(Path(path).read_text())
    check_zero3_config(config)
    given = config.setdefault("train_micro_batch_size_per_gpu", batch_size)
    if given not in (batch_size, "auto"):
        raise ValueError(f"{path}: train_micro_batch_size_per_gpu={given} but --batch-size {batch_size}")
    config["train_micro_batch_size_per_gpu"] = batch_size
    config.pop("train_batch_size", None)  # DeepSpeed derives it from the micro batch and the world size
    return config


def build_model(args, ds_config, dtype):
    """Each rank materializes only its shards: transformers loads under ZeRO-3 while the
    HfDeepSpeedConfig object is alive."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841  -- transformers checks it through a weak reference
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def rank_batches(tokens: torch.Tensor, labels: torch.Tensor, step: int, rank: int, world: int, batch: int):
    """This rank's slice of global batch ``step``: blocks taken in order, wrapping around the data."""
    n = tokens.shape[0]
    index = (torch.arange(batch) + (step * world + rank) * batch) % n
    return tokens[index], labels[index]


def main(argv=None) -> None:
    args = parse_args(argv)
    ds_config = load_ds_config(args.ds_config, args.batch_size)  # bad config: fail before anything heavy
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from transformers import AutoTokenizer

    from ..training.data import TokenizerAdapter, pack, read_documents
    from .deepspeed import attach

    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", 0))))
    torch.manual_seed(args.seed)
    output = Path(args.output)
    shard_file = output / "shards" / f"rank{rank}.pt"
    resume_state = None
    if args.resume:
        if not shard_file.exists():
            raise FileNotFoundError(f"--resume: {shard_file} does not exist (was the run made with {world} ranks?)")
        resume_state = torch.load(shard_file, map_location="cpu", weights_only=True)
        check_resume(resume_state["zero3"]["world_size"], resume_state["zero3"]["rank"], world, rank)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = pack(read_documents(args.data), TokenizerAdapter(tokenizer), args.seq_len, source=" ".join(args.data))
    model = build_model(args, ds_config, DTYPES[args.dtype])
    optimizer = make_optimizer(args, model)
    updater = attach(optimizer, ds_config, strategy=args.strategy)
    start = 0
    if resume_state is not None:
        updater.load_state_dict(resume_state["zero3"])
        start = resume_state["step"]
    model.train()
    began = time.time()
    for step in range(start, args.steps):
        ids, labels = rank_batches(data.tokens, data.labels, step, rank, world, args.batch_size)
        loss = model(input_ids=ids.to(device), labels=labels.to(device)).loss
        optimizer.fused_backward(loss, args.lr)
        mean_loss = loss.detach().float().clone()
        dist.all_reduce(mean_loss)
        if rank == 0:
            tokens_per_gpu_s = (step + 1 - start) * args.batch_size * args.seq_len / (time.time() - began)
            print(f"step {step + 1}/{args.steps} loss {mean_loss.item() / world:.4f} "
                  f"grad_norm {optimizer.last_grad_norm} tokens/GPU/s {tokens_per_gpu_s:.1f}", flush=True)
    shard_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": args.steps, "zero3": updater.state_dict()}, shard_file)
    if args.export:
        export(model, tokenizer, output, rank)
    dist.barrier()


def export(model, tokenizer, output: Path, rank: int) -> None:
    """Gather one parameter at a time; rank 0 keeps a CPU copy and writes a from_pretrained directory."""
    import deepspeed
    from safetensors.torch import save_file

    full = {}
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            if rank == 0:
                full[name] = param.detach().cpu().clone()
    if rank == 0:
        save_file(full, str(output / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(output)
        tokenizer.save_pretrained(output)


if __name__ == "__main__":
    main()
