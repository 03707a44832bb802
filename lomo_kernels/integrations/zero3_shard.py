"""ZeRO-3 shard geometry and configuration checks; pure functions, no DeepSpeed import.

DeepSpeed ZeRO-3 flattens each parameter, pads it to a multiple of the data-parallel world size W,
and gives rank r the flat range ``[r·P, min((r+1)·P, numel))`` with ``P = ceil(numel / W)``; the
rank is the one *within the parameter's partition group* (``param.ds_process_group``), which is not
the global rank (nor ``LOCAL_RANK``) as soon as there is model or sequence parallelism.
"""
from __future__ import annotations

from dataclasses import dataclass

STRATEGIES = ("auto", "reduce_scatter", "activation_gather")


def shard_range(numel: int, partition_size: int, rank: int) -> tuple[int, int]:
    """The flat ``[start, end)`` of the full parameter that ``rank``'s shard holds (may be empty)."""
    start = min(rank * partition_size, numel)
    return start, min(start + partition_size, numel)


@dataclass(frozen=True)
class Block:
    """A rectangle ``W[row0:row0+rows, col0:col0+cols]`` of a row-major matrix, stored contiguously
    at flat offsets ``[flat_start, flat_start + rows·cols)``."""

    flat_start: int
    row0: int
    rows: int
    col0: int
    cols: int

    @property
    def numel(self) -> int:
        return self.rows * self.cols


def flat_range_blocks(start: int, end: int, cols: int) -> list[Block]:
    """Split the flat range ``[start, end)`` of a row-major ``[*, cols]`` matrix into at most three
    rectangles, each contiguous in memory: a partial first row, the full rows, a partial last row."""
    blocks = []
    pos = start
    while pos < end:
        row, col = divmod(pos, cols)
        if col != 0 or end - pos < cols:  # a partial row: up to the row's end or the range's end
            width = min(cols - col, end - pos)
            blocks.append(Block(pos, row, 1, col, width))
            pos += width
        else:
            rows = (end - pos) // cols
            blocks.append(Block(pos, row, rows, 0, cols))
            pos += rows * cols
    return blocks


def choose_strategy(gathered_elements: int, gradient_elements: int) -> str:
    """Per rank, an all-gather of the activations moves (W-1)/W of ``gathered_elements`` (all ranks'
    tokens: T·(in+out) for a linear layer) and a reduce-scatter of the gradient (W-1)/W of
    ``gradient_elements`` (in·out): pick the smaller."""
    return "activation_gather" if gathered_elements < gradient_elements else "reduce_scatter"


def _get(config: dict, path: str, default=None):
    node = config
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def _offload_device(config: dict, key: str) -> str:
    section = _get(config, f"zero_optimization.{key}")
    if section is None:
        return "none"
    device = section.get("device", "none") if isinstance(section, dict) else section
    return str(device if device is not None else "none").lower()


def check_zero3_config(config: dict) -> None:
    """Raise ``ValueError`` naming the setting when a DeepSpeed config cannot drive fused updates."""
    if not isinstance(config, dict):
        raise TypeError(f"DeepSpeed config must be a dict (load the JSON first), got {type(config).__name__}")
    stage = _get(config, "zero_optimization.stage", 0)
    if stage != 3:
        raise ValueError(
            f"zero_optimization.stage is {stage}: fused updates need ZeRO stage 3. Stages 1 and 2 shard optimizer "
            "states and gradients, which a fused optimizer never creates; use stage 3 to shard the parameters, "
            "or no DeepSpeed at all")
    problems = []
    if "optimizer" in config:
        problems.append("the 'optimizer' section: the fused optimizer (Lomo/AdaLomo) is the optimizer; remove it")
    if "scheduler" in config:
        problems.append("the 'scheduler' section: pass the learning rate to optimizer.fused_backward(loss, lr)")
    for key in ("offload_param", "offload_optimizer"):
        device = _offload_device(config, key)
        if device != "none":
            why = ("the fused update writes each shard on the device that computes the layer"
                   if key == "offload_param" else "there is no optimizer state or gradient to offload")
            problems.append(f"zero_optimization.{key}.device={device!r} ({why})")
    gas = config.get("gradient_accumulation_steps", 1)
    if gas not in (1, "auto", None):
        problems.append(f"gradient_accumulation_steps={gas} (the update happens inside each backward; "
                        "use a larger micro batch)")
    clip = config.get("gradient_clipping", 0)
    if clip not in (0, 0.0, "auto", None):
        problems.append(f"gradient_clipping={clip} (DeepSpeed never sees a gradient; use the optimizer's "
                        "clip_grad_norm)")
    for path, bad, why in (
            ("zero_optimization.zero_hpz_partition_size", lambda v: v not in (None, 1), "secondary (hpZ) partitions"),
            ("zero_optimization.zero_quantized_weights", bool, "quantized weight shards"),
            ("zero_optimization.zero_quantized_gradients", bool, "quantized gradients"),
            ("zero_optimization.mics_shard_size", lambda v: v not in (None, -1, 0), "MiCS sharding")):
        value = _get(config, path)
        if value is not None and bad(value):
            problems.append(f"{path}={value!r} ({why} are not supported)")
    if problems:
        raise ValueError("DeepSpeed config not supported with fused updates: " + "; ".join(problems))


def check_resume(saved_world_size: int, saved_rank: int, world_size: int, rank: int) -> None:
    """ZeRO-3 shards are per rank: a shard checkpoint only fits the same layout."""
    if saved_world_size != world_size:
        raise ValueError(f"checkpoint holds ZeRO-3 shards of {saved_world_size} data-parallel ranks, this run has "
                         f"{world_size}: shards do not fit another world size. Resume with {saved_world_size} ranks, or "
                         "start from full weights (Zero3Updater.full_state_dict(), the launcher's --export)")
    if saved_rank != rank:
        raise ValueError(f"this rank ({rank}) was given the shard checkpoint of rank {saved_rank}")
