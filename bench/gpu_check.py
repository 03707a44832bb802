"""The one prepared call for a GPU machine lent for minutes: build, verify, benchmark, write everything down.

    bash scripts/gpu_check.sh [--quick] [--out DIR] [--dry-run]      (= python -m bench.gpu_check ...)

On a machine with an NVIDIA GPU, a CUDA build of torch and Triton already installed and no network, the
steps below run one after another, each in its own process with its own time limit, inside one overall
budget (8 minutes, ``--quick`` 3). Each step's result goes to ``DIR/<step>.json`` and ``DIR/<step>.md``,
its output to ``DIR/logs/<step>.log``; ``DIR/gpu_check.json`` / ``.md`` collect all steps and are rewritten
after each one (a run cut short still leaves its results), and ``DIR/gpu_check_bundle.tar.gz`` packs the
whole folder at the end. A step that fails or times out is recorded as such and the next one runs.

    env         GPU, driver, torch / CUDA / Triton / transformers versions, build tools present
    build       lomo_kernels._C in place against the torch that is there (LOMO_CUDA_ARCHS = this GPU):
                setup.py's CMake build when cmake, ninja and pybind11 are present, else torch's
                cpp_extension (setuptools); nothing is downloaded
    pytest_gpu  pytest -m gpu (cuda and triton backends vs the torch reference on CUDA tensors)
    kernels     one linear layer's update on LLaMA-7B shapes, bf16: fused triton / cuda vs the hook way
                (lomo-optim's) vs the bare weight-gradient matmul (the floor): time, TFLOP/s, peak memory
    train_step  a ~1B-parameter Llama from scratch in bf16, 1 x 2048 tokens: Lomo / AdaLomo (and fused
                optimizers the package has) vs torch AdamW and lomo-optim when importable: tokens/s, peak
    finetune    ``lomo-kernels train`` (the embedded default) on the GPU, 100 steps; loss curve kept

``--tiny`` shrinks every shape so the steps' Python runs on a CPU in seconds (tests/test_gpu_check.py);
``--skip`` / ``--only`` choose steps.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GiB = float(1 << 30)
MiB = float(1 << 20)


@dataclass(frozen=True)
class Step:
    name: str
    what: str
    timeout_s: int        # full run
    quick_timeout_s: int  # --quick


STEPS = (
    Step("env", "GPU, driver and library versions, build tools", 60, 45),
    Step("build", "build lomo_kernels._C in place for this GPU's architecture (no downloads)", 240, 150),
    Step("pytest_gpu", "pytest -m gpu: cuda and triton backends vs the reference on CUDA tensors", 200, 90),
    Step("kernels", "linear update on LLaMA-7B shapes, bf16: fused triton/cuda vs hook vs matmul floor", 120, 45),
    Step("train_step", "~1B Llama, bf16, 1x2048 tokens: fused optimizers vs torch AdamW / lomo-optim", 150, 60),
    Step("finetune", "lomo-kernels train (embedded default) on the GPU, loss curve", 120, 45),
)
BUDGET_S = {False: 480, True: 180}  # whole run: under 8 minutes, --quick under 3


# --- small helpers ---------------------------------------------------------------------------------

def _python() -> str:
    return sys.executable


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")  # no network on the GPU machine: never wait for a hub
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.pop("TRITON_INTERPRET", None)
    return env


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torch", "triton", "transformers", "numpy", "pytest", "pybind11", "cmake", "ninja", "lomo_optim",
                "deepspeed"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001 - absent or broken: say which
            out[mod] = f"not importable ({type(exc).__name__})"
    return out


def _md_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)\n"
    headers = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        cells = []
        for h in headers:
            v = r.get(h, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _device(tiny: bool):
    import torch
    if torch.cuda.is_available():
        return torch.device("cuda")
    if tiny:
        return torch.device("cpu")
    raise RuntimeError("no CUDA GPU visible to torch (torch.cuda.is_available() is False); --tiny runs on a CPU")


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn, device, repeats: int, warmup: int = 2) -> dict:
    """Median / min wall time of ``fn()`` in ms (CUDA events on a GPU)."""
    import torch
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "repeats": repeats}


def _peak_bytes(fn, device) -> int | None:
    """Bytes allocated by ``fn()`` beyond what was allocated before it, at their peak (CUDA only)."""
    import torch
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - base


# --- step bodies (each runs in its own process, returns a JSON-able dict) -------------------------------

def step_env(args) -> dict:
    import torch
    info = {"versions": _versions(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "tools": {t: shutil.which(t) for t in ("nvcc", "cmake", "ninja", "g++", "nvidia-smi")}}
    if torch.cuda.is_available():
        info["gpus"] = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["gpus"].append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                                 "memory_GiB": round(p.total_memory / GiB, 1), "sms": p.multi_processor_count})
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = q.stdout.strip()
    if shutil.which("nvcc"):
        info["nvcc"] = subprocess.run(["nvcc", "--version"], capture_output=True, text=True,
                                      timeout=30).stdout.strip().splitlines()[-1]
    rows = [{"key": k, "value": v} for k, v in info["versions"].items()]
    rows += [{"key": f"tool {k}", "value": v or "absent"} for k, v in info["tools"].items()]
    rows += [{"key": f"gpu {g['index']}", "value": f"{g['name']} sm_{g['capability'].replace('.', '')} "
              f"{g['memory_GiB']} GiB {g['sms']} SMs"} for g in info.get("gpus", [])]
    return {"info": info, "rows": rows}


def cuda_archs() -> str:
    """LOMO_CUDA_ARCHS for the GPUs present ("90", "80;86"), or the environment's override."""
    if os.environ.get("LOMO_CUDA_ARCHS"):
        return os.environ["LOMO_CUDA_ARCHS"]
    import torch
    caps = sorted({f"{a}{b}" for a, b in (torch.cuda.get_device_capability(i)
                                          for i in range(torch.cuda.device_count()))})
    return ";".join(caps)


def build_commands(archs: str, jobs: int) -> tuple[str, list[str], dict]:
    """(way, command, extra environment) of the in-place build: CMake through setup.py when its tools are
    here, else torch.utils.cpp_extension with setuptools (no ninja, cmake or pybind11 package needed)."""
    env = {"LOMO_CUDA_ARCHS": archs, "LOMO_BUILD_JOBS": str(jobs), "LOMO_REQUIRE_EXTENSION": "1",
           "MAX_JOBS": str(jobs)}
    have_cmake = shutil.which("cmake") is not None and shutil.which("ninja") is not None
    try:
        import pybind11  # noqa: F401
    except ImportError:
        have_cmake = False
    if have_cmake:
        return "cmake", [_python(), "setup.py", "-q", "build_ext", "--inplace"], env
    return "cpp_extension", [_python(), str(Path(__file__).resolve()), "--build-fallback"], env


def build_fallback() -> None:
    """Builds lomo_kernels._C in place with torch.utils.cpp_extension (the same sources and defines as
    CMakeLists.txt; torch's bundled pybind11)."""
    from setuptools import setup
    import torch.utils.cpp_extension as ext

    archs = [a for a in os.environ.get("LOMO_CUDA_ARCHS", "").split(";") if a]
    cuda = bool(archs) and shutil.which("nvcc") is not None
    if cuda and ext.CUDA_HOME is None:  # torch finds the toolkit only when it is a CUDA build itself
        ext.CUDA_HOME = _cuda_home()
    sources = ["csrc/module.cpp", "csrc/ops_schema.cpp"] + sorted(f"csrc/cpu/{p.name}" for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
    cxx = ["-O3", "-ffp-contract=off", "-fopenmp", "-DLOMO_WITH_OPENMP"]  # torch picks the C++ standard
    kwargs = dict(include_dirs=[str(ROOT / "csrc")], extra_link_args=["-fopenmp"])
    if cuda:
        sources += ["csrc/ops_cuda.cpp"] + sorted(f"csrc/cuda/{p.name}" for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
        defines = ["-DLOMO_WITH_CUDA", f'-DLOMO_CUDA_ARCHS="{",".join(archs)}"']
        nvcc = ["-O3", "-Xcompiler=-ffp-contract=off", *defines]
        nvcc += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        lib = Path(ext.CUDA_HOME) / ("lib64" if (Path(ext.CUDA_HOME) / "lib64").is_dir() else "lib")
        kwargs["extra_link_args"].append(f"-Wl,-rpath,{lib}")
        extension = ext.CUDAExtension("lomo_kernels._C", sources, extra_compile_args={"cxx": cxx + defines,
                                                                                      "nvcc": nvcc}, **kwargs)
    else:
        extension = ext.CppExtension("lomo_kernels._C", sources, extra_compile_args={"cxx": cxx + [
            '-DLOMO_NO_CUDA_REASON="nvcc not found"']}, **kwargs)
    os.chdir(ROOT)
    setup(name="lomo_kernels_C", ext_modules=[extension], script_args=["build_ext", "--inplace"],
          cmdclass={"build_ext": ext.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)})


def _cuda_home() -> str | None:
    """The CUDA toolkit root: $CUDA_HOME / $CUDA_PATH, nvcc's folder's parent, or /usr/local/cuda."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  str(Path(nvcc).resolve().parents[1]) if nvcc else None, "/usr/local/cuda"]
    for cand in candidates:
        if cand and (Path(cand) / "include" / "cuda_runtime.h").exists():
            return cand
    return None


BACKENDS_JSON = ("import json, lomo_kernels as lk; print(json.dumps({n: [i.available, i.detail] "
                 "for n, i in lk.available_backends().items()}))")


def backend_report() -> dict | str:
    """{backend: [available, detail]} as a fresh process sees it (after a build), or its error output."""
    check = subprocess.run([_python(), "-c", BACKENDS_JSON], cwd=ROOT, env=_child_env(), capture_output=True,
                           text=True, timeout=120)
    if check.returncode != 0:
        return check.stderr[-2000:]
    return json.loads(check.stdout.strip().splitlines()[-1])


def step_build(args) -> dict:
    archs = "90" if args.tiny and not _cuda_present() else cuda_archs()
    jobs = max(1, min(16, os.cpu_count() or 1))
    if shutil.which("nvcc") is None and _cuda_home():  # a toolkit off PATH (e.g. /usr/local/cuda): put it on
        os.environ["PATH"] = str(Path(_cuda_home()) / "bin") + os.pathsep + os.environ["PATH"]
    way, cmd, extra = build_commands(archs, jobs)
    result = {"nvcc": shutil.which("nvcc"), "way": way, "command": " ".join(cmd), "LOMO_CUDA_ARCHS": archs, "jobs": jobs, "attempts": []}
    if args.dry_build:
        result["rows"] = [{"way": way, "archs": archs, "command": result["command"], "status": "not run (dry)"}]
        return result
    attempts = [(way, cmd)]
    if way == "cmake":  # if CMake cannot configure against this torch / toolkit, torch's own builder may
        attempts.append(("cpp_extension", [_python(), str(Path(__file__).resolve()), "--build-fallback"]))
    for way, cmd in attempts:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env={**_child_env(), **extra}, capture_output=True, text=True)
        seconds = round(time.perf_counter() - t0, 1)
        result["attempts"].append({"way": way, "command": " ".join(cmd), "returncode": proc.returncode,
                                   "compile_s": seconds, "output_tail": (proc.stdout + proc.stderr)[-4000:]})
        if proc.returncode == 0:
            break
    last = result["attempts"][-1]
    if last["returncode"] != 0:
        raise RuntimeError("build failed: " + "; ".join(f"{a['way']} rc {a['returncode']} after {a['compile_s']} s"
                                                        for a in result["attempts"])
                           + "\n" + last["output_tail"][-2000:])
    result.update(way=last["way"], compile_s=last["compile_s"], backends=backend_report())
    result["rows"] = [{"way": a["way"], "archs": archs, "compile_s": a["compile_s"], "returncode": a["returncode"]}
                      for a in result["attempts"]]
    if isinstance(result["backends"], dict):
        result["rows"] += [{"backend": n, "available": a, "detail": d} for n, (a, d) in result["backends"].items()]
    return result


def _cuda_present() -> bool:
    import torch
    return torch.cuda.is_available()


def step_pytest_gpu(args) -> dict:
    import xml.etree.ElementTree as ET
    logs = Path(args.out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    junit = logs / "pytest_gpu.xml"
    files = (["tests/test_cuda_linear_gpu.py", "tests/test_native_cpu.py", "tests/test_triton.py"] if args.quick
             else ["tests"])
    cmd = [_python(), "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "--continue-on-collection-errors",
           f"--junitxml={junit}", *files]
    proc = subprocess.run(cmd, cwd=ROOT, env=_child_env(), capture_output=True, text=True)
    result = {"command": " ".join(cmd), "returncode": proc.returncode, "output_tail": (proc.stdout + proc.stderr)[-6000:]}
    if not junit.exists():
        raise RuntimeError(f"pytest wrote no report (rc {proc.returncode}):\n{result['output_tail'][-2000:]}")
    root = ET.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    result.update(counts=counts, failed=failed,
                  rows=[{**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]}]
                  + [{"failed test": name} for name in failed[:50]])
    if proc.returncode not in (0, 5):  # 5: nothing collected
        result["status_note"] = f"pytest exit code {proc.returncode}"
    return result


LLAMA7B_SHAPES = {"attn 4096x4096": (4096, 4096), "mlp-up 11008x4096": (11008, 4096),
                  "lm-head 32000x4096": (32000, 4096)}


def bench_kernels(device, dtype, shapes: dict, tokens_list, repeats: int, lr: float = 1e-4) -> list[dict]:
    """Rows: one per (shape, tokens, variant); a variant that raises is a row with its error."""
    import torch

    import lomo_kernels as lk
    available = lk.available_backends()
    fused = [b for b in (("triton", "cuda") if device.type == "cuda" else ("cpu", "torch")) if available[b].available]
    rows = []
    for label, (out_f, in_f) in shapes.items():
        for tokens in tokens_list:
            g = torch.Generator(device=device).manual_seed(0)
            w = torch.randn(out_f, in_f, device=device, generator=g).to(dtype)
            x = torch.randn(tokens, in_f, device=device, generator=g).to(dtype)
            dy = (torch.randn(tokens, out_f, device=device, generator=g) * 1e-2).to(dtype)
            stats = torch.zeros(2, device=device)

            def matmul():
                torch.mm(dy.t(), x)

            def hook():  # lomo-optim's hook: the gradient, fp32 copies of it and of the weight, add, copy back
                g32 = torch.mm(dy.t(), x).to(torch.float32)
                w32 = w.to(torch.float32)
                w32.add_(g32, alpha=-lr)
                w.copy_(w32)

            variants = {"matmul (floor)": matmul, "hook (lomo-optim)": hook}
            rounding = "nearest" if dtype == torch.float32 else "stochastic"
            for b in fused:
                variants[f"fused update [{b}]"] = (lambda b=b: lk.linear_update_(w, x, dy, lr=lr, rounding=rounding,
                                                                                 backend=b))
                variants[f"fused norm pass [{b}]"] = (lambda b=b: lk.linear_grad_sqnorm_(stats, w, x, dy,
                                                                                         method="gemm", backend=b))
            flops = 2.0 * tokens * out_f * in_f
            for name, fn in variants.items():
                row = {"layer": label, "shape": f"{out_f}x{in_f}", "tokens": tokens,
                       "dtype": str(dtype).removeprefix("torch."), "variant": name}
                try:
                    t = _time_ms(fn, device, repeats)
                    peak = _peak_bytes(fn, device)
                    row.update(median_ms=round(t["median_ms"], 4), min_ms=round(t["min_ms"], 4),
                               TFLOPs=round(flops / (t["median_ms"] * 1e-3) / 1e12, 2),
                               peak_MiB=None if peak is None else round(peak / MiB, 2))
                except Exception as exc:  # noqa: BLE001 - record and go on
                    row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                rows.append(row)
            floor = next((r.get("median_ms") for r in rows[-len(variants):] if r["variant"] == "matmul (floor)"), None)
            for r in rows[-len(variants):]:
                if floor and r.get("median_ms"):
                    r["x_floor"] = round(r["median_ms"] / floor, 2)  # time relative to the bare gradient GEMM
            del w, x, dy
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def step_kernels(args) -> dict:
    import torch
    device = _device(args.tiny)
    if args.tiny:
        shapes, tokens, repeats = {"tiny 48x40": (48, 40), "tiny 33x70": (33, 70)}, (16, 40), 2
    elif args.quick:
        shapes, tokens, repeats = dict(list(LLAMA7B_SHAPES.items())[:2]), (2048,), 5
    else:
        shapes, tokens, repeats = LLAMA7B_SHAPES, (2048, 8192), 10
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    rows = bench_kernels(device, dtype, shapes, tokens, repeats)
    return {"rows": rows, "notes": [
        "TFLOPs: 2*tokens*out*in / median time (the weight-gradient GEMM's work; the update adds no GEMM); "
        "x_floor: median time over the bare weight-gradient matmul's (torch.mm, cuBLAS) at the same shape",
        "peak_MiB: torch.cuda.max_memory_allocated during one call minus what was allocated before it: the "
        "floor and the hook hold the weight-sized gradient (the hook also fp32 copies), fused kernels nothing",
        "fused updates of bf16 weights round stochastically (Lomo's default); norm pass = linear_grad_sqnorm_ "
        "(method gemm)"]}


def llama_config(tiny: bool, quick: bool):
    from transformers import LlamaConfig
    if tiny:
        return LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=300, tie_word_embeddings=False), 32
    layers = 4 if quick else 16  # 16 layers: 1.0 B parameters (LLaMA-style 1B: 2048 wide, 5632 MLP, 32000 vocab)
    return LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=16,
                       num_key_value_heads=16, vocab_size=32000, max_position_embeddings=2048,
                       tie_word_embeddings=False), 2048


def _optimizer_factories(quick: bool) -> dict:
    """name -> (make(model) -> optimizer, kind): 'torch' (backward + step), 'fused' (fused_backward) or
    'fused-clip' (grad_norm, then fused_backward: lomo-optim's protocol with global-norm clipping)."""
    import torch

    import lomo_kernels as lk
    lr = 1e-5
    out = {"torch AdamW": (lambda m: torch.optim.AdamW(m.parameters(), lr=lr, foreach=True), "torch"),
           "lomo_kernels Lomo": (lambda m: lk.Lomo(m, lr=lr), "fused"),
           "lomo_kernels Lomo, clip_grad_norm 1": (lambda m: lk.Lomo(m, lr=lr, clip_grad_norm=1.0), "fused-clip"),
           "lomo_kernels AdaLomo": (lambda m: lk.AdaLomo(m, lr=lr), "fused")}
    if quick:
        out.pop("lomo_kernels Lomo, clip_grad_norm 1")
    for name in ("AdamW", "Apollo", "ApolloMini"):  # fused optimizers, once the package has them
        if hasattr(lk, name):
            out[f"lomo_kernels {name}"] = (lambda m, cls=getattr(lk, name): cls(m, lr=lr), "fused")
    try:
        import lomo_optim
        out["lomo-optim Lomo"] = (lambda m: lomo_optim.Lomo(m, lr=lr), "fused")
        if not quick:
            out["lomo-optim AdaLomo"] = (lambda m: lomo_optim.AdaLomo(m, lr=lr), "fused")
    except ImportError:
        pass
    return out


def bench_train_step(device, config, seq_len: int, repeats: int, quick: bool, dtype=None) -> list[dict]:
    import copy

    import torch
    from transformers import LlamaForCausalLM
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    config._attn_implementation = "sdpa" if device.type == "cuda" else "eager"
    torch.manual_seed(0)
    with torch.device(device):
        base = LlamaForCausalLM(config).to(dtype).train()
    n_params = sum(p.numel() for p in base.parameters())
    ids = torch.randint(0, config.vocab_size, (1, seq_len), device=device)
    rows = []
    for name, (make, kind) in _optimizer_factories(quick).items():
        row = {"method": name, "params_M": round(n_params / 1e6, 1), "tokens": seq_len, "dtype": str(dtype)[6:]}
        model = opt = None
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            model = copy.deepcopy(base)
            opt = make(model)
            lr = 1e-5

            def step():
                loss = model(input_ids=ids, labels=ids).loss
                if kind == "torch":
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                else:
                    if kind == "fused-clip":
                        opt.grad_norm(loss)
                    opt.fused_backward(loss, lr)
                return loss

            loss0 = float(step().detach())
            t = _time_ms(step, device, repeats, warmup=1)
            row.update(step_ms=round(t["median_ms"], 2), tokens_per_s=round(seq_len / (t["median_ms"] * 1e-3), 1),
                       first_loss=round(loss0, 4))
            if device.type == "cuda":
                row["peak_GiB"] = round((torch.cuda.max_memory_allocated(device) - before) / GiB, 3)
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        finally:
            if opt is not None and hasattr(opt, "close"):
                try:
                    opt.close()
                except Exception:  # noqa: BLE001
                    pass
            del model, opt
        rows.append(row)
    return rows


def step_train_step(args) -> dict:
    device = _device(args.tiny)
    config, seq_len = llama_config(args.tiny, args.quick)
    rows = bench_train_step(device, config, seq_len, repeats=2 if args.tiny or args.quick else 3, quick=args.quick)
    return {"rows": rows, "notes": [
        "one step = forward + backward + update on 1 sequence; lr 1e-5 (the loss stays near its first value); "
        "peak_GiB: torch.cuda.max_memory_allocated during the method's steps, its own model copy included",
        "with clip_grad_norm: lomo-optim's protocol, grad_norm(loss) (the norm-only backward) then "
        "fused_backward(loss, lr)"]}


def step_finetune(args) -> dict:
    out = Path(args.out) / "finetune"
    steps = 3 if args.tiny else (30 if args.quick else 100)
    cmd = [_python(), "-m", "lomo_kernels", "train", "--steps", str(steps), "--output", str(out), "--overwrite",
           "--no-progress", "--eval-every", "0", "--save-every", "0"]
    if args.tiny:
        cmd += ["--device", "cpu", "--max-data-tokens", "20000", "--batch-size", "2", "--seq-len", "32"]
    else:
        cmd += ["--device", "cuda"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=_child_env(), capture_output=True, text=True)
    result = {"command": " ".join(cmd), "seconds": round(time.perf_counter() - t0, 1),
              "output_tail": (proc.stdout + proc.stderr)[-3000:]}
    if proc.returncode != 0:
        raise RuntimeError(f"lomo-kernels train failed (rc {proc.returncode}):\n{result['output_tail'][-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    result["summary"] = summary
    curve = out / "loss_curve.png"
    if curve.exists():
        shutil.copy(curve, Path(args.out) / "finetune_loss_curve.png")
        result["loss_curve"] = "finetune_loss_curve.png"
    result["rows"] = [{"key": k, "value": v} for k, v in summary.items() if not isinstance(v, (dict, list))]
    return result


STEP_BODIES = {"env": step_env, "build": step_build, "pytest_gpu": step_pytest_gpu, "kernels": step_kernels,
               "train_step": step_train_step, "finetune": step_finetune}


def write_step_files(out_dir: Path, name: str, record: dict) -> None:
    (out_dir / f"{name}.json").write_text(json.dumps(record, indent=1, default=str))
    lines = [f"# gpu_check step `{name}`: {record['status']} ({record.get('seconds', 0)} s)\n"]
    if record.get("error"):
        lines.append("```\n" + str(record["error"])[-3000:] + "\n```\n")
    for note in record.get("result", {}).get("notes", []):
        lines.append(f"- {note}")
    lines.append("")
    lines.append(_md_table(record.get("result", {}).get("rows", [])))
    (out_dir / f"{name}.md").write_text("\n".join(lines))


def run_child(args) -> int:
    """In the step's own process: run the body, write DIR/<step>.result.json (the parent merges it)."""
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "logs" / f"{args.run_step}.result.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        result = STEP_BODIES[args.run_step](args)
        target.write_text(json.dumps({"ok": True, "result": result}, default=str))
        return 0
    except Exception as exc:  # noqa: BLE001
        target.write_text(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}\n"
                                                            + traceback.format_exc()[-3000:]}, default=str))
        return 1


# --- the orchestrator ------------------------------------------------------------------------------

def plan(args) -> list[tuple[Step, list[str], int]]:
    """(step, command, time limit) of every step this run will try, in order."""
    chosen = [s for s in STEPS if (not args.only or s.name in args.only) and s.name not in (args.skip or [])]
    flags = ["--out", str(args.out)] + (["--quick"] if args.quick else []) + (["--tiny"] if args.tiny else [])
    if args.dry_build:
        flags.append("--dry-build")
    return [(s, [_python(), str(Path(__file__).resolve()), "--run-step", s.name, *flags],
             s.quick_timeout_s if args.quick else s.timeout_s) for s in chosen]


def _run_with_limit(cmd: list[str], log, limit: float) -> int | None:
    """Exit code of ``cmd`` (output to ``log``), or None when it ran past ``limit`` seconds: then its whole
    process group is killed (a step's own children, e.g. pytest's or a build's, do not outlive it)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_child_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        return proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        return None


def run_steps(steps: list[tuple[Step, list[str], int]], out_dir: Path, budget_s: float, header: dict) -> dict:
    """Runs each step's command with its limit (cut to what is left of the budget); records every outcome."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "logs").mkdir(exist_ok=True)
    started = time.perf_counter()
    summary = {**header, "steps": []}
    for step, cmd, limit in steps:
        left = budget_s - (time.perf_counter() - started)
        record = {"step": step.name, "what": step.what, "command": " ".join(cmd)}
        if left < 5:
            record.update(status="skipped", error=f"overall budget of {budget_s:.0f} s used up")
        else:
            limit = int(min(limit, left))
            log = out_dir / "logs" / f"{step.name}.log"
            result_file = out_dir / "logs" / f"{step.name}.result.json"
            result_file.unlink(missing_ok=True)
            print(f"[gpu_check] {step.name}: {step.what} (limit {limit} s)", flush=True)
            t0 = time.perf_counter()
            with open(log, "w") as f:
                rc = _run_with_limit(cmd, f, limit)
            record["seconds"] = round(time.perf_counter() - t0, 1)
            child = json.loads(result_file.read_text()) if result_file.exists() else None
            if rc is None:
                record.update(status="timeout", error=f"killed after its limit of {limit} s")
            elif child is None:
                record.update(status="failed", error=f"exit code {rc}, no result; see logs/{step.name}.log:\n"
                              + log.read_text()[-2000:])
            elif not child["ok"]:
                record.update(status="failed", error=child["error"])
            else:
                record.update(status="ok", result=child["result"])
                if child["result"].get("status_note"):
                    record["status"] = "failed"
                    record["error"] = child["result"]["status_note"]
            print(f"[gpu_check] {step.name}: {record['status']} in {record['seconds']} s", flush=True)
        write_step_files(out_dir, step.name, record)
        summary["steps"].append({k: v for k, v in record.items() if k != "result"}
                                | {"result_file": f"{step.name}.json"})
        summary["total_s"] = round(time.perf_counter() - started, 1)
        _write_summary(out_dir, summary)
    return summary


def _write_summary(out_dir: Path, summary: dict) -> None:
    (out_dir / "gpu_check.json").write_text(json.dumps(summary, indent=1, default=str))
    mode = ("quick" if summary.get("quick") else "full") + (", tiny shapes" if summary.get("tiny") else "")
    lines = [f"# gpu_check ({mode}), {summary.get('started')}, {summary.get('host')}\n",
             f"Total {summary.get('total_s')} s of a {summary.get('budget_s')} s budget.\n",
             _md_table([{"step": s["step"], "status": s["status"], "seconds": s.get("seconds", ""),
                         "what": s["what"]} for s in summary["steps"]])]
    for s in summary["steps"]:
        path = out_dir / f"{s['step']}.md"
        if path.exists():
            lines.append(path.read_text())
    (out_dir / "gpu_check.md").write_text("\n".join(lines))


def _bundle(out_dir: Path) -> Path:
    target = out_dir / "gpu_check_bundle.tar.gz"
    with tarfile.open(target, "w:gz") as tar:
        for p in sorted(out_dir.rglob("*")):
            if p.is_file() and p != target and "checkpoints" not in p.parts and p.suffix != ".safetensors":
                tar.add(p, arcname=str(p.relative_to(out_dir)))
    return target


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller benchmarks; whole run under 3 minutes")
    parser.add_argument("--out", default=str(ROOT / "runs" / "gpu_check"), help="results folder")
    parser.add_argument("--dry-run", action="store_true", help="list the steps and their commands, run nothing")
    parser.add_argument("--skip", type=lambda s: s.split(","), help="comma-separated steps to leave out")
    parser.add_argument("--only", type=lambda s: s.split(","), help="comma-separated steps to run (only these)")
    parser.add_argument("--budget", type=float, help="overall seconds (default 480, --quick 180)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, CPU allowed (tests the Python parts)")
    parser.add_argument("--dry-build", action="store_true", help=argparse.SUPPRESS)  # build step: command only
    parser.add_argument("--run-step", choices=tuple(STEP_BODIES), help=argparse.SUPPRESS)
    parser.add_argument("--build-fallback", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for names in (args.skip or []), (args.only or []):
        unknown = set(names) - set(STEP_BODIES)
        if unknown:
            parser.error(f"unknown step(s) {sorted(unknown)}; the steps are {', '.join(STEP_BODIES)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.build_fallback:
        build_fallback()
        return 0
    if args.run_step:
        return run_child(args)
    steps = plan(args)
    budget = args.budget or BUDGET_S[args.quick]
    if args.dry_run:
        print(f"gpu_check {'--quick ' if args.quick else ''}--out {args.out}: {len(steps)} steps, "
              f"budget {budget:.0f} s")
        for step, cmd, limit in steps:
            print(f"  {step.name:<11} limit {limit:>3} s  {step.what}\n  {'':<11} $ {' '.join(cmd)}")
        return 0
    out_dir = Path(args.out)
    header = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "quick": args.quick, "tiny": args.tiny,
              "budget_s": budget, "host": platform.node()}
    summary = run_steps(steps, out_dir, budget, header)
    bundle = _bundle(out_dir)
    failed = [s["step"] for s in summary["steps"] if s["status"] != "ok"]
    print(f"[gpu_check] done in {summary['total_s']} s; {len(summary['steps']) - len(failed)} ok"
          + (f", not ok: {', '.join(failed)}" if failed else "") + f"; results in {out_dir}/gpu_check.md, "
          f"everything in {bundle}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
