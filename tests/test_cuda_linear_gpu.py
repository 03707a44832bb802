"""The ``cuda`` backend's linear kernels (tensor cores for bf16/fp16 operands, csrc/cuda/linear.cu) against
the torch reference on CUDA tensors. Every test here needs a GPU (``gpu`` marker; they skip elsewhere).

Bitwise: with small integer-valued activations every partial sum of ``dyᵀx`` is an exact fp32 integer,
so the gradient does not depend on the GEMM's summation order (nor on the tensor cores' internal
accumulation) and the epilogue, the shared per-element header, must give the reference's bits, stochastic
rounding included. On random data the weights agree within the GEMM's rounding (fp32: 1e-5 of the
update's scale; 16-bit: one ulp). Shapes cover partial tiles in every direction, token counts that are not
a multiple of the 32-token stage, rows that are not 16-byte aligned (the kernels' non-cp.async path), an
empty token set, several 128x128 tiles, and the LLaMA-7B attention shape.
"""
from __future__ import annotations

import pytest
import torch

import lomo_kernels as lk
from lomo_kernels.backends import available_backends

pytestmark = pytest.mark.gpu

ACT_DTYPES = [pytest.param(torch.bfloat16, id="act-bf16"), pytest.param(torch.float16, id="act-fp16")]
WEIGHTS = [pytest.param(torch.float32, "nearest", id="w-fp32"),
           pytest.param(torch.bfloat16, "nearest", id="w-bf16-nearest"),
           pytest.param(torch.bfloat16, "stochastic", id="w-bf16-stochastic"),
           pytest.param(torch.float16, "nearest", id="w-fp16-nearest"),
           pytest.param(torch.float16, "stochastic", id="w-fp16-stochastic")]
# (out, in, tokens): vector path (out, in multiples of 8) and scalar path (odd), partial tiles, T % 32 != 0
SHAPES = [(136, 200, 70), (256, 128, 32), (37, 29, 45), (130, 131, 1), (264, 392, 257), (64, 96, 0)]
OPTIONS = [pytest.param(dict(lr=0.05), id="plain"),
           pytest.param(dict(lr=0.05, weight_decay=0.1, coef=0.7, loss_scale=64.0, clip_value=8.0, seed=12345),
                        id="wd-coef-scale-clip")]


@pytest.fixture(autouse=True)
def _need_cuda_backend():
    info = available_backends()["cuda"]
    if not info.available:
        pytest.skip(f"cuda backend: {info}")


def assert_bitwise(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    int_type = {4: torch.int32, 2: torch.int16}[actual.element_size()]
    same = (actual.view(int_type) == expected.view(int_type)) | (actual.isnan() & expected.isnan())
    assert bool(same.all()), f"{int((~same).sum())} of {same.numel()} elements differ in their bits"


def integer_inputs(out_f: int, in_f: int, tokens: int, act_dtype, w_dtype):
    w = (torch.randn(out_f, in_f) * 0.5).to(w_dtype)
    x = torch.randint(-4, 5, (tokens, in_f)).to(act_dtype)
    dy = torch.randint(-3, 4, (tokens, out_f)).to(act_dtype)
    return w, x, dy


def run_both(w, x, dy, **kw):
    """(cuda result, reference result), both on the CPU; the reference runs on CPU copies."""
    native = w.cuda()
    lk.linear_update_(native, x.cuda(), dy.cuda(), backend="cuda", **kw)
    reference = w.clone()
    lk.linear_update_(reference, x, dy, backend="torch", **kw)
    return native.cpu(), reference


@pytest.mark.parametrize("act_dtype", ACT_DTYPES)
@pytest.mark.parametrize("w_dtype, rounding", WEIGHTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("options", OPTIONS)
def test_update_bitwise_on_exact_gradients(act_dtype, w_dtype, rounding, shape, options):
    w, x, dy = integer_inputs(*shape, act_dtype, w_dtype)
    got, ref = run_both(w, x, dy, rounding=rounding, **options)
    assert_bitwise(got, ref)


@pytest.mark.parametrize("act_dtype", ACT_DTYPES)
def test_rows_not_16_byte_aligned_take_the_scalar_path(act_dtype):
    """Contiguous x / dy starting one element into their storage: cp.async cannot be used; same bits."""
    w, x, dy = integer_inputs(136, 200, 70, act_dtype, torch.bfloat16)
    x_buf = torch.empty(x.numel() + 1, dtype=act_dtype, device="cuda")
    dy_buf = torch.empty(dy.numel() + 1, dtype=act_dtype, device="cuda")
    x_odd, dy_odd = x_buf[1:].view_as(x), dy_buf[1:].view_as(dy)
    x_odd.copy_(x)
    dy_odd.copy_(dy)
    assert x_odd.data_ptr() % 16 and dy_odd.data_ptr() % 16
    native = w.cuda()
    lk.linear_update_(native, x_odd, dy_odd, lr=0.05, rounding="stochastic", seed=3, backend="cuda")
    reference = w.clone()
    lk.linear_update_(reference, x, dy, lr=0.05, rounding="stochastic", seed=3, backend="torch")
    assert_bitwise(native.cpu(), reference)


@pytest.mark.parametrize("act_dtype", ACT_DTYPES)
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4096, 4096, 512), (300, 1000, 333)], ids=["4096x4096", "300x1000"])
def test_update_random_data_within_gemm_rounding(act_dtype, w_dtype, shape):
    out_f, in_f, tokens = shape
    w = torch.randn(out_f, in_f, device="cuda").to(w_dtype)
    x = torch.randn(tokens, in_f, device="cuda").to(act_dtype)
    dy = (torch.randn(tokens, out_f, device="cuda") * 0.1).to(act_dtype)
    lr = 1e-2
    got = w.clone()
    lk.linear_update_(got, x, dy, lr=lr, backend="cuda")
    exact = w.double() - lr * (dy.double().t() @ x.double())
    if w_dtype == torch.float32:
        scale = lr * (dy.double().abs().t() @ x.double().abs())
        assert bool(((got.double() - exact).abs() <= 1e-5 * scale + 1e-6 * exact.abs()).all())
    else:  # within one ulp of the exact update: between the rounded-down and rounded-up neighbours
        lo = exact.to(w_dtype).double()
        ulp = (lo.abs() * torch.finfo(w_dtype).eps).clamp_min(torch.finfo(w_dtype).tiny)
        assert bool(((got.double() - exact).abs() <= 2 * ulp).all())


def test_run_twice_is_deterministic_on_random_data():
    w = torch.randn(520, 264, device="cuda").to(torch.bfloat16)
    x = torch.randn(1000, 264, device="cuda").to(torch.bfloat16)
    dy = torch.randn(1000, 520, device="cuda").to(torch.bfloat16)
    first, second = w.clone(), w.clone()
    for target in (first, second):
        lk.linear_update_(target, x, dy, lr=1e-3, rounding="stochastic", seed=9, backend="cuda")
    assert_bitwise(first, second)


@pytest.mark.parametrize("act_dtype", ACT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES[:5], ids=lambda s: "x".join(map(str, s[:3])))
def test_grad_sqnorm_matches_reference(act_dtype, shape):
    out_f, in_f, tokens = shape
    w = torch.empty(out_f, in_f, device="cuda", dtype=act_dtype)
    x = torch.randn(tokens, in_f).to(act_dtype)
    dy = torch.randn(tokens, out_f).to(act_dtype)
    got = torch.zeros(2, device="cuda")
    lk.linear_grad_sqnorm_(got, w, x.cuda(), dy.cuda(), loss_scale=4.0, method="gemm", backend="cuda")
    exact = ((dy.double().t() @ x.double()) / 4.0).square().sum()
    torch.testing.assert_close(got[0].cpu().double(), exact, rtol=1e-4, atol=1e-6)
    assert got[1].item() == 0


def test_grad_sqnorm_counts_non_finite_entries():
    x = torch.ones(40, 24, device="cuda", dtype=torch.float16)
    dy = torch.ones(40, 16, device="cuda", dtype=torch.float16)
    x[3, 5] = float("inf")
    stats = torch.zeros(2, device="cuda")
    w = torch.empty(16, 24, device="cuda", dtype=torch.float16)
    lk.linear_grad_sqnorm_(stats, w, x, dy, method="gemm", backend="cuda")
    assert stats[1].item() == 16  # column 5 of every row of G


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_the_second_gpu():
    w, x, dy = integer_inputs(136, 200, 70, torch.bfloat16, torch.bfloat16)
    with torch.cuda.device(0):
        native = w.to("cuda:1")
        lk.linear_update_(native, x.to("cuda:1"), dy.to("cuda:1"), lr=0.05, rounding="stochastic", backend="cuda")
        assert torch.cuda.current_device() == 0
    reference = w.clone()
    lk.linear_update_(reference, x, dy, lr=0.05, rounding="stochastic", backend="torch")
    assert_bitwise(native.cpu(), reference)
