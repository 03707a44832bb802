"""End-of-run reporting: the summary table and the loss-curve PNG, both from the metrics records."""
from __future__ import annotations

import math
from pathlib import Path

FINAL_WINDOW = 10  # the final loss is the mean of the last steps, so one noisy batch does not decide it


def summarize(history: list[dict], out: Path, wall_s: float, device) -> dict:
    train = [r for r in history if r["type"] == "train"]
    evals = [r for r in history if r["type"] == "eval"]
    last = train[-FINAL_WINDOW:]
    numbers = {
        "steps": train[-1]["step"] if train else 0,
        "first_loss": train[0]["loss"] if train else None,
        "final_loss": sum(r["loss"] for r in last) / len(last) if last else None,
        "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "final_eval_perplexity": evals[-1]["eval_perplexity"] if evals else None,
        "tokens_per_s": sum(r["tokens_per_s"] for r in last) / len(last) if last else None,
        "peak_memory_mb": max((r["peak_memory_mb"] for r in train), default=None),
        "skipped_steps": sum(r["skipped"] for r in train),
        # records written before the guard existed have no such field
        "partial_steps": sum(1 for r in train if r.get("nonfinite_updates", 0)),
        "nonfinite_updates": sum(r.get("nonfinite_updates", 0) for r in train),
        "wall_s_this_invocation": wall_s,
    }
    ratio = (numbers["final_loss"] / numbers["first_loss"]) if train and numbers["first_loss"] else math.nan
    numbers["final_over_first"] = ratio
    memory_kind = "peak GPU memory allocated" if device.type == "cuda" else "peak process memory (RSS)"
    rows = [
        ("steps", f"{numbers['steps']}"),
        ("first-step loss", _fmt(numbers["first_loss"])),
        (f"final loss (mean of last {len(last)} steps)", f"{_fmt(numbers['final_loss'])} ({ratio:.0%} of the first)"),
        ("held-out loss / perplexity", f"{_fmt(numbers['final_eval_loss'])} / {_fmt(numbers['final_eval_perplexity'], 2)}"),
        ("tokens/s (last steps)", _fmt(numbers["tokens_per_s"], 0)),
        (memory_kind, f"{_fmt(numbers['peak_memory_mb'], 0)} MiB"),
        ("skipped steps (fp16 overflow)", f"{numbers['skipped_steps']}"),
        ("partial steps (non-finite updates kept)",
         f"{numbers['partial_steps']} ({numbers['nonfinite_updates']} weight elements)"),
        ("wall time (this invocation)", f"{wall_s:.1f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    table = "\n".join([f"run summary ({out})"] + [f"  {name.ljust(width)}  {value}" for name, value in rows])
    return {"numbers": numbers, "table": table}


def _fmt(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def plot_loss_curve(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in history if r["type"] == "train"]
    evals = [r for r in history if r["type"] == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, label="training loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out loss")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)
