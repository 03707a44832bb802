"""Shared benchmark plumbing: timing, measured peak memory, the device record, and result files."""
from __future__ import annotations

import csv
import os
import platform
import statistics
import time
from dataclasses import dataclass

import torch

MiB = float(1 << 20)


@dataclass
class Timing:
    median_ms: float      # wall clock
    q1_ms: float
    q3_ms: float
    cpu_median_ms: float  # CPU time of this process: on a shared machine, not inflated by other processes
    repeats: int

    @property
    def spread(self) -> str:
        return f"{self.q1_ms:.2f}-{self.q3_ms:.2f}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, repeats: int, warmup: int = 1, device: torch.device = torch.device("cpu")) -> Timing:
    """Median and interquartile range of ``fn()``'s wall time over ``repeats`` runs (after ``warmup``),
    and the median CPU time."""
    wall, cpu = [], []
    for i in range(warmup + repeats):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        if i >= warmup:
            wall.append((time.perf_counter() - t0) * 1e3)
            cpu.append((time.process_time() - c0) * 1e3)
    if len(wall) >= 4:
        q1, _, q3 = statistics.quantiles(wall, n=4)
    else:
        q1, q3 = min(wall), max(wall)
    return Timing(statistics.median(wall), q1, q3, statistics.median(cpu), len(wall))


def load_average() -> str:
    try:
        return "%.1f %.1f %.1f" % os.getloadavg()
    except OSError:
        return "unknown"


def device_record() -> dict:
    """What the numbers were measured on."""
    import lomo_kernels
    rec = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
           "cpu": _cpu_name(), "cpu simd": _cpu_simd(), "cpu_count": os.cpu_count(), "load average at the end": load_average(),
           "backends": ", ".join(n for n, info in lomo_kernels.available_backends().items() if info.available)}
    if torch.cuda.is_available():
        rec["gpu"] = torch.cuda.get_device_name(0)
    return rec


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_simd() -> str:
    """The widest x86 vector extension the CPU reports (the compiled CPU kernels' epilogues use it)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    return next((isa for isa in ("avx512f", "avx2") if isa in flags), "none")


def bench_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


# --- results ---------------------------------------------------------------------------------------

def markdown_table(rows: list[dict]) -> str:
    headers = list(rows[0])
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_fmt(row[h]) for h in headers) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.2f}" if v == 0 or abs(v) >= 0.1 else f"{v:.3g}"
    return str(v)


def write_results(out_dir: str, name: str, title: str, rows: list[dict], notes: list[str], device: dict) -> str:
    """``name``.csv (all rows) and ``name``.md (title, device, notes, table); returns the Markdown path."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    md_path = os.path.join(out_dir, f"{name}.md")
    with open(md_path, "w") as f:
        f.write(f"# {title}\n\n")
        f.write("Device: " + "; ".join(f"{k} {v}" for k, v in device.items()) + "\n\n")
        for note in notes:
            f.write(f"- {note}\n")
        f.write("\n" + markdown_table(rows) + "\n")
    return md_path


def new_figure(ncols: int = 1):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4), squeeze=False)
    return fig, axes[0]


def save_figure(fig, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, f"{name}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path
