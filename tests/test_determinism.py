"""Determinism and placement of the torch reference and the Triton backend (issue 10, item 6).

- Device guard: every Triton launch runs inside ``device_guard(tensor.device)`` (``kernels/_triton_device``),
  so it goes to the tensors' device and its current stream. Checked under the interpreter with a spy on
  the guard and on every kernel's launch; on a GPU machine with two GPUs, on ``cuda:1`` for real.
- Fixed-order sums: duplicate embedding rows are summed in token order (sort + segment reduction), norm
  totals from per-tile partials reduced in a fixed order (no float atomics in any compiled kernel: see
  ``tests/test_triton_spills.py``). Checked by running twice on non-dyadic random data with duplicate
  tokens (bitwise equal), against a token-order loop (bitwise) and float64 (within tolerance).
- TF32 off: the reference's fp32 GEMMs run under ``ieee_fp32_matmul`` whatever the user set.

On CPU a float sum has no scheduling freedom, so the run-twice checks are only informative on a GPU
(``gpu``-marked variants, at sizes where atomics would reorder); the token-order and spy checks fail on
CPU too if the code changes.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

import lomo_kernels as lk  # noqa: E402
from lomo_kernels.kernels import _triton_device, reference, triton_adalomo, triton_update  # noqa: E402
from lomo_kernels.ops import adalomo_stats  # noqa: E402
from lomo_kernels.ops._common import UpdateRule, ieee_fp32_matmul  # noqa: E402

if not torch.cuda.is_available() and not triton_update.INTERPRETED:
    pytest.skip("triton_update was imported before TRITON_INTERPRET=1 was set; run pytest with it set",
                allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TENSOR_DEVICE = torch.empty(0, device=DEVICE).device  # cuda:0 rather than cuda
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
BACKENDS = ("torch", "triton")


def non_dyadic(*shape, dtype=torch.float32, device=DEVICE):
    """Random values whose sums round differently in different orders (not small multiples of 2**-k)."""
    return (torch.randn(*shape, device=device) * 3.1 + 0.3).to(dtype)


def duplicate_heavy_indices(tokens, vocab, distinct, device=DEVICE):
    """``tokens`` indices drawn from ``distinct`` of the ``vocab`` rows: every touched row repeats."""
    rows = torch.randperm(vocab, device=device)[:distinct]
    return rows[torch.randint(0, distinct, (tokens,), device=device)]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# --- device guard --------------------------------------------------------------------------------

class _DeviceSpy:
    """Stands in for ``torch.cuda.device``: records the device it is entered with."""
    entered: list = []

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        _DeviceSpy.entered.append(self.device)

    def __exit__(self, *exc):
        _DeviceSpy.entered.append("exit")


def test_device_guard_makes_the_tensors_cuda_device_current(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device", _DeviceSpy)
    _DeviceSpy.entered = []
    with _triton_device.device_guard(torch.device("cuda", 1)):
        assert _DeviceSpy.entered == [torch.device("cuda", 1)]
    assert _DeviceSpy.entered == [torch.device("cuda", 1), "exit"]
    _DeviceSpy.entered = []
    with _triton_device.device_guard(torch.device("cpu")):  # interpreter tensors: nothing to guard
        pass
    assert _DeviceSpy.entered == []


_KERNELS = {"triton_update": ("_linear_kernel", "_dense_kernel", "_embedding_rows_kernel", "_reduce_kernel"),
            "triton_adalomo": ("_sq_sums_kernel", "_scaled_sqnorm_kernel", "_update_kernel")}


def _backend_calls():
    """(name, device of its tensors, call) for every entry point of the two Triton modules."""
    out_f, in_f, tokens, vocab = 37, 29, 11, 40
    w = non_dyadic(out_f, in_f)
    x, dy = non_dyadic(tokens, in_f), non_dyadic(tokens, out_f)
    e, idx, edy = non_dyadic(vocab, in_f), duplicate_heavy_indices(tokens, vocab, 4), non_dyadic(tokens, in_f)
    r, c = torch.rand(out_f, device=DEVICE), torch.rand(in_f, device=DEVICE)
    rule = UpdateRule.make(lr=0.1, weight_decay=0.1, clip_value=2.0)
    stats = torch.zeros(2, device=DEVICE)
    count = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    tu, ta = triton_update, triton_adalomo
    return [
        ("linear_update", lambda: tu.linear_update(w, x, dy, rule, count)),
        ("linear_grad_sqnorm", lambda: tu.linear_grad_sqnorm(stats, x, dy, 0.5)),
        ("dense_update", lambda: tu.dense_update(w.view(-1), dy.new_ones(w.numel()), rule)),
        ("dense_grad_sqnorm", lambda: tu.dense_grad_sqnorm(stats, w.view(-1), 1.0)),
        ("embedding_update", lambda: tu.embedding_update(e, idx, edy, -1, rule, count)),
        ("embedding_grad_sqnorm", lambda: tu.embedding_grad_sqnorm(stats, idx, edy, -1, 1.0)),
        ("adalomo_sq_sums", lambda: ta.adalomo_sq_sums(torch.zeros_like(r), torch.zeros_like(c), stats, x, dy,
                                                       1.0, 2.0)),
        ("adalomo_scaled_sqnorm", lambda: ta.adalomo_scaled_sqnorm(stats, x, dy, r, c, 1.0, 2.0)),
        ("adalomo_linear_update", lambda: ta.adalomo_linear_update(w, x, dy, r, c, rule, count)),
    ]


def test_every_triton_launch_runs_inside_the_device_guard_of_its_tensors(monkeypatch):
    guards, launches, depth = [], [], [0]

    class GuardSpy:
        def __init__(self, device):
            guards.append(device)

        def __enter__(self):
            depth[0] += 1

        def __exit__(self, *exc):
            depth[0] -= 1

    for module in (triton_update, triton_adalomo):
        monkeypatch.setattr(module, "device_guard", GuardSpy)
    for module_name, names in _KERNELS.items():
        module = globals()[module_name]
        for name in names:
            kernel = getattr(module, name)

            def run(*args, _run=kernel.run, _name=name, **kwargs):
                launches.append((_name, depth[0]))
                return _run(*args, **kwargs)
            monkeypatch.setattr(kernel, "run", run)
    seen = set()
    for call_name, call in _backend_calls():
        guards.clear()
        launches.clear()
        call()
        assert launches, f"{call_name} launched no kernel"
        assert all(d >= 1 for _, d in launches), f"{call_name}: launches outside the device guard: {launches}"
        assert guards and all(g == TENSOR_DEVICE for g in guards), (call_name, guards)
        seen |= {n for n, _ in launches}
    assert seen == {n for names in _KERNELS.values() for n in names}  # every kernel was launched by some call


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_gpu_triton_on_cuda1_while_cuda0_is_current_matches_the_reference():
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    out_f, in_f, tokens, vocab = 300, 257, 129, 1000
    w = non_dyadic(out_f, in_f, dtype=torch.bfloat16, device=dev)
    x, dy = non_dyadic(tokens, in_f, device=dev), non_dyadic(tokens, out_f, device=dev)
    e = non_dyadic(vocab, in_f, dtype=torch.bfloat16, device=dev)
    idx = duplicate_heavy_indices(tokens, vocab, 30, device=dev)
    r, c = torch.rand(out_f, device=dev), torch.rand(in_f, device=dev)
    kw = dict(lr=0.05, weight_decay=0.1, clip_value=1.5, rounding="stochastic", seed=9)
    results = {}
    for backend in BACKENDS:
        wl, we, wa = w.clone(), e.clone(), w.clone()
        stats = torch.zeros(2, device=dev)
        lk.linear_update_(wl, x, dy, backend=backend, **kw)
        lk.linear_grad_sqnorm_(stats, w, x, dy, method="gemm", backend=backend)
        lk.embedding_update_(we, idx, x, backend=backend, **kw)
        adalomo_stats.adalomo_linear_update_(wa, x, dy, r, c, backend=backend, **kw)
        torch.cuda.synchronize(dev)
        results[backend] = (wl, stats, we, wa)
    assert torch.cuda.current_device() == 0  # the guard put the previous device back
    (tl_, ts, te, ta), (rl, rs, re, ra) = results["triton"], results["torch"]
    for got, ref in ((tl_, rl), (te, re), (ta, ra)):
        # bf16 weights: equal, or one ulp apart where the two GEMMs' fp32 sums round differently
        assert (got.float() - ref.float()).abs().max() <= 2 * ref.float().abs().max() * 2 ** -8
    torch.testing.assert_close(ts, rs, rtol=1e-5, atol=0)


# --- fixed-order embedding sums ------------------------------------------------------------------

def token_order_row_sums(idx, dy, padding_idx):
    """Each distinct row's dy rows added in token order, from 0, in fp32: one Python loop per row."""
    rows = sorted(set(idx.tolist()) - {padding_idx})
    g = torch.zeros(len(rows), dy.shape[1], device=dy.device)
    for k, row in enumerate(rows):
        for t in (idx == row).nonzero().view(-1).tolist():
            g[k] = g[k] + dy[t].float()
    return torch.tensor(rows, device=idx.device, dtype=torch.int64), g


def _segment_path(idx, dy, padding_idx):
    keep = idx != padding_idx
    return reference._sorted_segment_sums(idx[keep], dy[keep])


@pytest.mark.parametrize("path", ["_row_gradients", "sort + segment_reduce"])
@pytest.mark.parametrize("dy_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padding_idx", [-1, 3])
def test_duplicate_rows_are_summed_in_token_order(path, dy_dtype, padding_idx):
    """Both implementations (CPU tensors: index_add_; every other device: the sorted segment sums, also
    checked here on CPU) give the token-order sum bit for bit."""
    tokens, vocab, dim = 97, 50, 13
    idx = duplicate_heavy_indices(tokens, vocab, 6)
    idx[::7] = 3
    dy = non_dyadic(tokens, dim, dtype=dy_dtype)
    sums = reference._row_gradients if path == "_row_gradients" else _segment_path
    rows, g = sums(idx, dy, padding_idx)
    expected_rows, expected = token_order_row_sums(idx, dy, padding_idx)
    assert torch.equal(rows, expected_rows)
    assert same_bits(g, expected)
    exact = torch.zeros(vocab, dim, dtype=torch.float64, device=DEVICE)
    keep = idx != padding_idx
    exact.index_add_(0, idx[keep], dy[keep].double())
    torch.testing.assert_close(g.double(), exact[rows], rtol=1e-5, atol=1e-5 * float(exact.abs().max()))


@pytest.mark.parametrize("path", ["_row_gradients", "sort + segment_reduce"])
def test_row_gradients_without_tokens_or_columns(path):
    sums = reference._row_gradients if path == "_row_gradients" else _segment_path
    for tokens, dim in ((0, 5), (6, 0)):
        idx = torch.randint(0, 4, (tokens,), device=DEVICE)
        rows, g = sums(idx, non_dyadic(tokens, dim), -1)
        assert g.shape == (rows.numel(), dim) and rows.numel() == idx.unique().numel()


def _embedding_runs(backend, w, idx, dy, kw, repeats=2):
    out = []
    for _ in range(repeats):
        we, stats = w.clone(), torch.zeros(2, device=w.device)
        count = torch.zeros(1, dtype=torch.int64, device=w.device)
        lk.embedding_update_(we, idx, dy, backend=backend, nonfinite=count, **kw)
        lk.embedding_grad_sqnorm_(stats, w, idx, dy, padding_idx=kw.get("padding_idx"), backend=backend)
        out.append((we, stats, count))
    return out


def _embedding_case(tokens, vocab, dim, distinct, w_dtype, device=DEVICE):
    w = non_dyadic(vocab, dim, dtype=w_dtype, device=device)
    idx = duplicate_heavy_indices(tokens, vocab, distinct, device=device)
    return w, idx, non_dyadic(tokens, dim, dtype=w_dtype, device=device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_embedding_update_and_norm_run_twice_bitwise(backend, w_dtype):
    w, idx, dy = _embedding_case(83, 61, 21, 5, w_dtype)
    kw = dict(lr=0.07, weight_decay=0.05, clip_value=4.0, rounding="stochastic", seed=123, padding_idx=idx[0].item())
    (w1, s1, c1), (w2, s2, c2) = _embedding_runs(backend, w, idx, dy, kw)
    assert same_bits(w1, w2) and same_bits(s1, s2) and torch.equal(c1, c2)
    assert not torch.equal(w1, w)
    # and against float64: the token sums' rounding is the only difference (fp32 weights, nearest-even here)
    _, g = reference._row_gradients(idx, dy, kw["padding_idx"])
    exact = torch.zeros(61, 21, dtype=torch.float64, device=DEVICE)
    keep = idx != kw["padding_idx"]
    exact.index_add_(0, idx[keep], dy[keep].double())
    torch.testing.assert_close(s1[0].double(), exact.square().sum(), rtol=1e-5, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_embedding_update_and_norm_run_twice_bitwise(backend):
    # 16k tokens over 40 rows: ~400 duplicates per row, where atomics would land in a different order each run
    w, idx, dy = _embedding_case(16384, 32000, 1024, 40, torch.bfloat16, device="cuda")
    kw = dict(lr=0.05, weight_decay=0.1, rounding="stochastic", seed=5)
    runs = _embedding_runs(backend, w, idx, dy, kw, repeats=3)
    for we, stats, count in runs[1:]:
        assert same_bits(we, runs[0][0]) and same_bits(stats, runs[0][1]) and torch.equal(count, runs[0][2])


# --- norm totals from fixed-order partial sums -----------------------------------------------------

def _norm_totals(backend, x, dy, g, r, c):
    """Every norm-phase total of one backend: linear (gemm), dense, AdaLomo's sums and scaled norm."""
    out_f, in_f = dy.shape[1], x.shape[1]
    w = torch.empty(out_f, in_f, device=x.device)
    linear, dense, scaled = (torch.zeros(2, device=x.device) for _ in range(3))
    rows, cols = torch.zeros(out_f, device=x.device), torch.zeros(in_f, device=x.device)
    sums_stats = torch.zeros(2, device=x.device)
    lk.linear_grad_sqnorm_(linear, w, x, dy, loss_scale=3.0, method="gemm", backend=backend)
    lk.dense_grad_sqnorm_(dense, torch.empty_like(g), g, loss_scale=3.0, backend=backend)
    adalomo_stats.adalomo_sq_sums_(rows, cols, w, x, dy, loss_scale=3.0, clip_value=2.5, method="gemm",
                                   stats=sums_stats, backend=backend)
    adalomo_stats.adalomo_scaled_sqnorm_(scaled, w, x, dy, r, c, loss_scale=3.0, clip_value=2.5, backend=backend)
    return linear, dense, rows, cols, sums_stats, scaled


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_norm_totals_run_twice_bitwise_and_match_float64(backend, x_dtype):
    tokens, out_f, in_f = 45, 71, 67  # several partial tiles in both directions, several token blocks
    x, dy = non_dyadic(tokens, in_f, dtype=x_dtype), non_dyadic(tokens, out_f, dtype=x_dtype)
    g = non_dyadic(3001)  # three dense programs, the last partial
    r, c = torch.rand(out_f, device=DEVICE), torch.rand(in_f, device=DEVICE)
    first, second = _norm_totals(backend, x, dy, g, r, c), _norm_totals(backend, x, dy, g, r, c)
    for a, b in zip(first, second):
        assert same_bits(a, b)
    linear, dense, rows, cols, sums_stats, _ = first
    exact = dy.double().t() @ x.double() / 3.0
    torch.testing.assert_close(linear[0].double(), exact.square().sum(), rtol=1e-5, atol=0)
    torch.testing.assert_close(sums_stats[0].double(), exact.square().sum(), rtol=1e-5, atol=0)
    torch.testing.assert_close(dense[0].double(), (g.double() / 3.0).square().sum(), rtol=1e-5, atol=0)
    clipped = exact.clamp(-2.5, 2.5).square()
    torch.testing.assert_close(rows.double(), clipped.sum(1), rtol=1e-5, atol=1e-6 * float(clipped.sum(1).max()))
    torch.testing.assert_close(cols.double(), clipped.sum(0), rtol=1e-5, atol=1e-6 * float(clipped.sum(0).max()))
    assert linear[1] == dense[1] == sums_stats[1] == 0


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_norm_totals_run_twice_bitwise(backend):
    tokens, out_f, in_f = 1024, 4099, 2053  # ~2000 tiles: float atomics would reorder their partials
    x, dy = non_dyadic(tokens, in_f, dtype=torch.bfloat16), non_dyadic(tokens, out_f, dtype=torch.bfloat16)
    g = non_dyadic(3_000_017)
    r, c = torch.rand(out_f, device=DEVICE), torch.rand(in_f, device=DEVICE)
    first = _norm_totals(backend, x, dy, g, r, c)
    for _ in range(2):
        for a, b in zip(first, _norm_totals(backend, x, dy, g, r, c)):
            assert same_bits(a, b)


# --- TF32 off for the reference's fp32 GEMMs ----------------------------------------------------------

@pytest.fixture
def restore_precision():
    """The process-wide fp32 precision settings put back after the test, through the new API."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = torch.backends.fp32_precision, matmul.fp32_precision, cudnn.fp32_precision
    yield
    torch.backends.fp32_precision, matmul.fp32_precision, cudnn.fp32_precision = saved


def _precision_state():
    return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.fp32_precision


USER_SETTINGS = {
    "default": lambda: None,
    "legacy allow_tf32": lambda: (setattr(torch.backends.cuda.matmul, "allow_tf32", True),
                                  setattr(torch.backends.cudnn, "allow_tf32", True)),
    "set_float32_matmul_precision high": lambda: torch.set_float32_matmul_precision("high"),
    "fp32_precision tf32": lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32"),
}


@pytest.mark.parametrize("setting", USER_SETTINGS)
def test_ieee_fp32_matmul_turns_tf32_off_inside_and_restores_the_users_setting(setting, restore_precision):
    USER_SETTINGS[setting]()
    before = _precision_state()
    with ieee_fp32_matmul():
        assert _precision_state() == ("ieee", "ieee")
    assert _precision_state() == before
    with pytest.raises(KeyError), ieee_fp32_matmul():
        raise KeyError("restored on an exception too")
    assert _precision_state() == before
    if setting == "legacy allow_tf32":  # a legacy-API user still reads the legacy flags afterwards
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


def _reference_gemm_calls():
    out_f, in_f, tokens = 33, 21, 9
    x, dy = non_dyadic(tokens, in_f), non_dyadic(tokens, out_f)
    r, c = torch.rand(out_f, device=DEVICE), torch.rand(in_f, device=DEVICE)
    w = non_dyadic(out_f, in_f)
    stats, rows, cols = (torch.zeros(n, device=DEVICE) for n in (2, out_f, in_f))
    plain, clipped = UpdateRule.make(lr=0.1), UpdateRule.make(lr=0.1, clip_value=1.0)
    ref = reference
    return {
        "linear_update addmm_ shortcut": lambda: ref.linear_update(w, x, dy, plain),
        "linear_update blocks": lambda: ref.linear_update(w, x, dy, clipped),
        "linear_grad_sqnorm": lambda: ref.linear_grad_sqnorm(stats, x, dy, 1.0),
        "linear_grad_sqnorm_ghost": lambda: ref.linear_grad_sqnorm_ghost(stats, x, dy, 1.0),
        "adalomo_sq_sums": lambda: ref.adalomo_sq_sums(rows, cols, x, dy, 1.0, 1.0, stats),
        "adalomo_sq_sums_ghost": lambda: ref.adalomo_sq_sums_ghost(rows, cols, x, dy, 1.0),
        "adalomo_scaled_sqnorm": lambda: ref.adalomo_scaled_sqnorm(stats, x, dy, r, c, 1.0, 1.0),
        "adalomo_linear_update": lambda: ref.adalomo_linear_update(w, x, dy, r, c, clipped),
    }


def test_every_reference_gemm_runs_with_tf32_off(monkeypatch, restore_precision):
    torch.backends.cuda.matmul.fp32_precision = "tf32"  # the user's choice
    torch.backends.cudnn.fp32_precision = "tf32"
    seen = []
    for method in ("__matmul__", "addmm_"):
        original = getattr(torch.Tensor, method)

        def spy(*args, _original=original, **kwargs):
            seen.append(_precision_state())
            return _original(*args, **kwargs)
        monkeypatch.setattr(torch.Tensor, method, spy)
    for name, call in _reference_gemm_calls().items():
        seen.clear()
        call()
        assert seen, f"{name}: no GEMM seen (the spy no longer covers it)"
        assert set(seen) == {("ieee", "ieee")}, name
        assert _precision_state() == ("tf32", "tf32"), name


@pytest.mark.parametrize("user_precision", ["tf32", "ieee"])
def test_the_users_tf32_setting_does_not_change_reference_results(user_precision, restore_precision):
    """Bitwise equal to the results with TF32 off. On CPU TF32 does not exist, so this passes however the
    context is written; on a GPU run it is the real check (cuBLAS honouring the context at K = 300)."""
    def results():
        torch.manual_seed(0)
        out_f, in_f, tokens = 129, 257, 300
        x, dy = non_dyadic(tokens, in_f), non_dyadic(tokens, out_f)
        r, c = torch.rand(out_f, device=DEVICE), torch.rand(in_f, device=DEVICE)
        w_plain, w_clipped, w_ada = (non_dyadic(out_f, in_f) for _ in range(3))
        stats, rows, cols = (torch.zeros(n, device=DEVICE) for n in (4, out_f, in_f))
        reference.linear_update(w_plain, x, dy, UpdateRule.make(lr=0.1))
        reference.linear_update(w_clipped, x, dy, UpdateRule.make(lr=0.1, clip_value=50.0))
        reference.linear_grad_sqnorm_ghost(stats[:2], x, dy, 1.0)
        reference.adalomo_sq_sums(rows, cols, x, dy, 1.0, 50.0, stats[2:])
        reference.adalomo_linear_update(w_ada, x, dy, r, c, UpdateRule.make(lr=0.1, clip_value=50.0))
        return w_plain, w_clipped, w_ada, stats, rows, cols

    torch.backends.cuda.matmul.fp32_precision = "ieee"
    expected = results()
    torch.backends.cuda.matmul.fp32_precision = user_precision
    for got, want in zip(results(), expected):
        assert same_bits(got, want)
