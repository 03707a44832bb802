#!/usr/bin/env python
"""Write docs/architectures.md: which causal-LM architectures of the installed transformers work.

    .venv/bin/python scripts/architecture_table.py              # the sweep if it exists, else build-only
    .venv/bin/python scripts/architecture_table.py --build-only # tiny build + forward + backward only

The sweep is ``tests.test_architecture_sweep:sweep_results`` (``--sweep MODULE:FUNCTION`` for another):
a function of no arguments returning one dict per architecture, ``{"model_type", "status": "ok" |
"skipped" | "failed" | (any other, e.g. "refused"), "reason", "max_rel_err_lomo", "max_rel_err_adalomo",
"fused_loss"}``
(``lomo_err`` / ``adalomo_err`` are read as the two errors too). Without that module the
table comes from the build-only check of tests/tiny_archs.py (a tiny random model of each type is built,
runs forward with labels to a finite loss and backpropagates). Either way every row also gets notes on
how that architecture uses its weights (tied weights, embedding/linear subclasses with their own
forward, weights used other than through F.linear/F.embedding, weights a text-only forward leaves
unused), unless ``--no-notes``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import math
import os
import sys
import time
import traceback
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SWEEP = "tests.test_architecture_sweep:sweep_results"
DEFAULT_OUT = os.path.join(REPO, "docs", "architectures.md")


def _setup_env():
    # tests/ as pytest puts it on sys.path (the sweep imports `tiny_archs`), and the repository root
    # (for `tests.test_architecture_sweep`)
    sys.path.insert(0, REPO)
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import torch

    if not torch.cuda.is_available():  # as tests/conftest.py: Triton kernels run under the interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")


def load_sweep(spec: str):
    """The sweep function named by ``spec`` (``module:function``), or None if the module does not exist.
    A module that exists but fails to import is an error, not a fallback."""
    mod_name, _, fn_name = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and (mod_name == e.name or mod_name.startswith(e.name + ".")):
            return None
        raise
    return getattr(mod, fn_name or "sweep_results")


def build_only_results() -> list[dict]:
    """Build, forward with labels, backward for every model type (tests/tiny_archs.py)."""
    import torch

    from tiny_archs import ArchSkip, build_tiny, causal_lm_model_types

    rows = []
    for mt in causal_lm_model_types():
        t0 = time.perf_counter()
        row = {"model_type": mt, "status": "ok", "reason": "", "max_rel_err_lomo": None,
               "max_rel_err_adalomo": None}
        try:
            model, batch = build_tiny(mt)
            loss = model(**batch).loss
            if loss is None or not math.isfinite(loss.item()):
                raise RuntimeError(f"loss is {loss}")
            loss.backward()
            if not any(p.grad is not None for p in model.parameters()):
                raise RuntimeError("no parameter received a gradient")
            n = sum(p.numel() for p in model.parameters())
            row["reason"] = f"{n / 1e3:.0f} k params, loss {loss.item():.2f}"
        except ArchSkip as e:
            row.update(status="skipped", reason=str(e))
        except Exception as e:  # noqa: BLE001 - a failure is a row of the table
            row.update(status="failed", reason=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}")
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(f"{row['status']:8s} {mt:28s} {row['seconds']:5.2f}s {row['reason'][:90]}", file=sys.stderr)
    return rows


def notes_for(model_type: str) -> str:
    from tiny_archs import ArchSkip, build_tiny, weight_use_notes

    try:
        model, batch = build_tiny(model_type)
        return "; ".join(weight_use_notes(model, batch))
    except ArchSkip:
        return ""
    except Exception as e:  # noqa: BLE001
        return f"(notes unavailable: {type(e).__name__})"


def _fmt_err(x) -> str:
    if x is None:
        return "-"
    try:
        return f"{float(x):.1e}"
    except (TypeError, ValueError):
        return str(x)


def _first(row: dict, *keys):
    return next((row[k] for k in keys if row.get(k) is not None), None)


def _counts(rows: list[dict]) -> dict:
    """Rows per status: ok, skipped, failed first (always), then any other status the sweep uses."""
    order = ["ok", "skipped", "failed"] + sorted({r.get("status", "?") for r in rows} - {"ok", "skipped", "failed"})
    return {s: sum(r.get("status", "?") == s for r in rows) for s in order}


def _cell(s) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ").strip()


def render(rows: list[dict], source: str, notes: dict | None, why: str = "") -> str:
    import torch
    import transformers

    counts = _counts(rows)
    sweep = source != "build-only"
    today = datetime.date.today().isoformat()
    lines = [
        "# Architectures",
        "",
        f"Causal-LM architectures of **transformers {transformers.__version__}** (torch {torch.__version__}), "
        f"every `model_type` in its `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, each as a tiny random model built "
        f"by `tests/tiny_archs.py` (hidden 64, 2-4 layers, vocabulary 256, CPU, fp32). Generated {today}.",
        "",
        "Source: " + (f"the sweep `{source}`." if sweep else
                      f"the build-only check ({why}): build, forward with labels (finite loss), backward."),
        "",
        "**" + ", ".join(f"{n} {s}" for s, n in counts.items()) + f"** of {len(rows)}.",
        "",
        "Regenerate: `.venv/bin/python scripts/architecture_table.py` "
        "(`--build-only` for the build check alone, `--no-notes` to skip the weight-use notes).",
        "",
    ]
    if notes is not None:
        lines += [
            "Notes say how each model uses its weights, recorded during one forward with a "
            "`TorchFunctionMode` (`tests.tiny_archs.weight_uses`): tied parameters; `nn.Embedding` / "
            "`nn.Linear` subclasses with their own `forward`; weights of 2+ dims that reach a torch "
            "function other than `F.linear` / `F.embedding` (the functions that received the parameter "
            "itself, so `w.t()` shows as `t` or `transpose` and MoE expert tensors as `transpose` / "
            "`bmm` / `_grouped_mm`; `N` stands for the layer index); weights a text-only forward leaves "
            "unused (vision/audio towers, cross-attention of decoder-only BART-style models).",
            "",
        ]
    header = "| architecture | status | " + ("max rel. error (Lomo / AdaLomo; fused loss: trained through the fused "
                                           "cross-entropy) or reason" if sweep else "details / reason")
    header += " | notes |" if notes is not None else " |"
    lines.append(header)
    lines.append("|---|---|---|" + ("---|" if notes is not None else ""))
    for r in sorted(rows, key=lambda r: r["model_type"]):
        status = r.get("status", "?")
        errs = (_first(r, "max_rel_err_lomo", "lomo_err"), _first(r, "max_rel_err_adalomo", "adalomo_err"))
        if sweep and (status == "ok" or any(e is not None for e in errs)):
            detail = f"{_fmt_err(errs[0])} / {_fmt_err(errs[1])}"
            if r.get("fused_loss"):
                detail += ", fused loss"
            if r.get("reason"):
                detail += f" ({r['reason']})"
        else:
            detail = r.get("reason") or ""
        line = f"| `{r['model_type']}` | {status} | {_cell(detail)} |"
        if notes is not None:
            line += f" {_cell(notes.get(r['model_type'], ''))} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


README_START, README_END = "<!-- architectures:start -->", "<!-- architectures:end -->"


def _update_readme(path: str, rows: list, counts: dict) -> None:
    """Rewrite the README's generated block: counts and the architectures by outcome."""
    with open(path) as f:
        text = f.read()
    if README_START not in text or README_END not in text:
        print(f"{path} has no {README_START} ... {README_END} block: not updated", file=sys.stderr)
        return
    by_status: dict = {}
    for r in rows:
        by_status.setdefault(r.get("status", "failed"), []).append(r["model_type"])
    import transformers
    lines = [README_START, "",
             f"Generated by `scripts/architecture_table.py` from the sweep, transformers {transformers.__version__}: "
             + ", ".join(f"**{n} {k}**" for k, n in sorted(counts.items())) + ". Per architecture, with errors, "
             "reasons and notes: [`docs/architectures.md`](docs/architectures.md).", ""]
    for status in sorted(by_status):
        names = sorted(by_status[status])
        lines.append(f"* {status} ({len(names)}): " + ", ".join(f"`{n}`" for n in names))
    fused = sorted(r["model_type"] for r in rows if r.get("fused_loss"))
    if fused:
        lines.append(f"* of those ok, trained through the fused cross-entropy ({len(fused)}; the others' loss comes "
                     "from logits): " + ", ".join(f"`{n}`" for n in fused))
    lines += ["", README_END]
    head, rest = text.split(README_START, 1)
    tail = rest.split(README_END, 1)[1]
    with open(path, "w") as f:
        f.write(head + "\n".join(lines) + tail)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", default=DEFAULT_SWEEP, help="MODULE:FUNCTION returning the sweep rows")
    ap.add_argument("--build-only", action="store_true", help="ignore the sweep; build/forward/backward only")
    ap.add_argument("--no-notes", action="store_true", help="leave out the weight-use notes column")
    ap.add_argument("--out", default=DEFAULT_OUT, help="Markdown file to write (default docs/architectures.md)")
    ap.add_argument("--readme", default=os.path.join(REPO, "README.md"),
                    help="README whose block between the architecture markers is rewritten ('' for none)")
    args = ap.parse_args(argv)
    _setup_env()

    t0 = time.perf_counter()
    fn = None if args.build_only else load_sweep(args.sweep)
    why = "`--build-only`" if args.build_only else f"`{args.sweep.partition(':')[0]}` does not exist"
    if fn is None:
        if not args.build_only:
            print(f"{args.sweep.partition(':')[0]} does not exist: build-only table", file=sys.stderr)
        rows, source = build_only_results(), "build-only"
    else:
        rows, source = list(fn()), args.sweep
    notes = None
    if not args.no_notes:
        notes = {r["model_type"]: notes_for(r["model_type"]) for r in rows if r.get("status") != "skipped"}
    text = render(rows, source, notes, why)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    counts = _counts(rows)
    if args.readme and source != "build-only":
        _update_readme(args.readme, rows, counts)
    print(f"wrote {args.out}: {counts} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 1 if counts.get("failed") else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        sys.exit(2)
