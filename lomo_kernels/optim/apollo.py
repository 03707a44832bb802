"""``Apollo`` / ``ApolloMini``: APOLLO (Zhu et al. 2024, arXiv 2412.05270) without a gradient tensor.

The rule is apollo-torch 1.0.3's ``APOLLOAdamW`` (``apollo_torch/apollo.py``). For a projected weight
``W`` [m, n] with gradient ``G = c · dyᵀx / loss_scale`` (``c`` the global-norm clip coefficient):

* a random projection ``P = stable_randn(shape, seed) / √rank`` (torch ``Generator`` seeded with the
  projector seed, on the weight's device), ``[rank, n]`` when ``m >= n`` (right: ``R = G·Pᵀ`` [m, rank])
  else ``[m, rank]`` (left: ``R = Pᵀ·G`` [rank, n]); refreshed when the 0-based step is a multiple of
  ``update_proj_gap``, each refresh advancing the seed with apollo-torch's ``next_seed``. The i-th
  parameter of ``model.parameters()`` (counting from 1) starts from seed ``seed + i``.
* ``R`` from two thin GEMMs, never ``G``: ``R = dyᵀ(x·Pᵀ)`` or ``R = (dy·P)ᵀx``.
* Adam moments on ``R`` (rank-sized), ``N = m / (√v + eps)``; the scale ``s = ‖N‖/(‖R‖ + 1e-8)`` per row
  (right) / per column (left) for ``scale_type="channel"``, one number for ``"tensor"``.
* the norm-growth limiter on ``‖G ⊙ s‖`` (from a row/column sum-of-squares pass over ``G``'s blocks,
  ``lomo_kernels.ops.adalomo_stats.adalomo_sq_sums_``): ``/= max(‖·‖ / ‖·‖_prev, γ) / γ``, γ =
  ``norm_growth_limit`` (apollo-torch: 1.01; ``None`` disables it, apollo-torch's ``disable_nl``).
* one fused linear update with the scale in the epilogue (per-row / per-column vector):
  ``W <- (1 - lr·wd) · (W - lr·√(1-β2^t)/(1-β1^t) · √scale / limiter · s ⊙ G)``
  (apollo-torch's order: bias correction in the step size, weight decay applied to the updated weight).

All other parameters (by default: everything that is not the weight of an ``nn.Linear``/``Conv1D``, and
the output embedding) run apollo-torch's own AdamW arithmetic with the fused AdamW kernels
(``lomo_kernels.ops.adamw_update``, ``AdamRule.apollo_adamw``). ``projected=[names]`` chooses the
projected weights instead.

Value clipping (``clip_grad_value``) is refused: ``clamp(G)·Pᵀ`` has no thin-GEMM form.

Non-finite gradients (``on_nonfinite="partial"``, the default for fp32/bf16): every weight element whose
update is not finite keeps its value and is counted (``last_nonfinite_updates``), as in ``AdamW``; in rank
space, moments whose new value is not finite keep their old one, and a step whose limiter norm is not
finite applies no limit and leaves the limiter's previous norm alone, so one bad batch cannot poison the
layer's later steps.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops
from ..ops import adalomo_stats
from . import _checks
from .adamw import AdamW

SCALE_TYPES = ("channel", "tensor")
PROJ_TYPES = ("std",)
_ADV_DEFAULT = 0xF


def stable_randn(shape, seed: int, device, dtype=torch.float32) -> torch.Tensor:
    """apollo-torch's ``stable_randn``: ``torch.randn`` from a generator seeded with ``seed`` on ``device``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def next_seed(seed: int, adv: int = _ADV_DEFAULT) -> int:
    """apollo-torch's ``next_seed``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, torch.iinfo(torch.int64).max, (adv,), generator=generator).tolist()[-1]


def _default_projected(model: nn.Module) -> list[str]:
    try:
        from transformers.pytorch_utils import Conv1D
        kinds = (nn.Linear, Conv1D)
    except ImportError:
        kinds = (nn.Linear,)
    out_emb = None
    if hasattr(model, "get_output_embeddings"):
        head = model.get_output_embeddings()
        out_emb = getattr(head, "weight", None)
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    chosen = set()
    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(module, kinds) and isinstance(w, torch.Tensor) and w.dim() == 2 and w.requires_grad \
                and w is not out_emb and id(w) not in embedding_weights:
            chosen.add(id(w))
    return [n for n, p in model.named_parameters() if id(p) in chosen]


class _Projected:
    """apollo-torch's per-parameter state of a projected weight."""

    def __init__(self, shape, rank: int, seed: int, device):
        m, n = shape
        self.right = m >= n
        self.proj_shape = (rank, n) if self.right else (m, rank)
        r_shape = (m, rank) if self.right else (rank, n)
        self.exp_avg = torch.zeros(r_shape, dtype=torch.float32, device=device)
        self.exp_avg_sq = torch.zeros(r_shape, dtype=torch.float32, device=device)
        self.seed = seed
        self.projector: torch.Tensor | None = None
        self.prev_norm: float | None = None


class Apollo(AdamW):
    """APOLLO with apollo-torch ``APOLLOAdamW``'s rule and random projections (see the module docstring).
    ``Apollo(model, lr, rank=256, scale_type="channel", scale=1.0, update_proj_gap=200, proj_type="std",
    seed=0, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, norm_growth_limit=1.01, scale_front=False,
    projected=None, clip_grad_norm=None, ...)``; other keywords as ``lomo_kernels.AdamW``."""

    rule_kind = "apollo"

    def __init__(self, model: nn.Module, lr: float = 1e-3, rank: int = 256, scale_type: str = "channel",
                 scale: float = 1.0, update_proj_gap: int = 200, proj_type: str = "std", seed: int = 0,
                 betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 norm_growth_limit: float | None = 1.01, scale_front: bool = False, projected=None,
                 clip_grad_norm: float | None = None, clip_grad_value: float | None = None,
                 state_dtype: torch.dtype = torch.float32, **kwargs):
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        _checks.choice("scale_type", scale_type, SCALE_TYPES)
        _checks.choice("proj_type", proj_type, PROJ_TYPES)
        self.scale = _checks.positive("scale", scale)
        if isinstance(update_proj_gap, bool) or not isinstance(update_proj_gap, int) or update_proj_gap <= 0:
            raise ValueError(f"update_proj_gap must be a positive int, got {update_proj_gap!r}")
        self.norm_growth_limit = None if norm_growth_limit is None else \
            _checks.number("norm_growth_limit", norm_growth_limit, low=1.0)
        if clip_grad_value is not None:
            raise ValueError("Apollo does not support clip_grad_value: the projection of clamp(G) has no "
                             "thin-GEMM form (it would need the gradient); use clip_grad_norm")
        if not isinstance(model, nn.Module):
            raise TypeError(f"Apollo takes the model (an nn.Module), got {type(model).__name__}")
        names = _default_projected(model) if projected is None else sorted(
            _checks.parameter_names("projected", projected, model))
        params = dict(model.named_parameters())
        for name in names:
            p = params[name]
            if p.dim() != 2:
                raise ValueError(f"projected parameter {name!r} must be 2-D, got shape {tuple(p.shape)}")
            if rank > min(p.shape):
                raise ValueError(f"rank must be <= min(m, n) of every projected weight; {name!r} has shape "
                                 f"{tuple(p.shape)}, rank is {rank} (pass projected=[names] or a smaller rank)")
        self.rank, self.scale_type, self.update_proj_gap, self.proj_type = rank, scale_type, update_proj_gap, proj_type
        self.scale_front = bool(scale_front)
        self.projected_names = frozenset(names)
        super().__init__(model, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         clip_grad_norm=clip_grad_norm, clip_grad_value=None, state_dtype=state_dtype, seed=seed,
                         **kwargs)
        index = {n: i for i, (n, _) in enumerate(model.named_parameters())}
        # apollo-torch: the projector seed of a parameter is its 1-based index across the param groups
        self.projectors = {n: _Projected(params[n].shape, rank, seed + index[n] + 1, params[n].device)
                           for n in names}
        embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        bad = [n for n in names if id(params[n]) in embedded]
        if bad:
            raise ValueError(f"projected parameters must be linear weights, not embeddings: {bad[:3]}")

    def adam_parameters(self):
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad and n not in self.projected_names]

    # --- APOLLO's pieces -----------------------------------------------------------------------------

    def _projection(self, st: _Projected, param: torch.Tensor) -> torch.Tensor:
        if st.projector is None or self.step_count % self.update_proj_gap == 0:
            proj = stable_randn(st.proj_shape, st.seed, param.device) / math.sqrt(self.rank)
            if param.dtype != torch.float32:  # apollo-torch keeps P in the weight's dtype
                proj = proj.to(param.dtype)
            st.projector = proj
            st.seed = next_seed(st.seed)
        return st.projector.to(torch.float32)

    def _scale_and_multiplier(self, st: _Projected, R: torch.Tensor, sq_sums):
        """``(row_scale, col_scale, k)``: ``W <- decay·(W - k · row_i · G_ij · col_j)``."""
        b1, b2 = self.betas
        t = self.step_count + 1
        m = st.exp_avg.mul(b1).add_(R, alpha=1.0 - b1)
        v = st.exp_avg_sq.mul(b2).addcmul_(R, R, value=1.0 - b2)
        # the non-finite guard in rank space: an entry of R that is not finite leaves its moments alone
        # (the weight elements it would reach get a non-finite update, which the weight's guard keeps)
        ok = torch.isfinite(m) & torch.isfinite(v)
        st.exp_avg.copy_(torch.where(ok, m, st.exp_avg))
        st.exp_avg_sq.copy_(torch.where(ok, v, st.exp_avg_sq))
        norm_grad = st.exp_avg / st.exp_avg_sq.sqrt().add_(self.eps)
        step_size = self.lr * math.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t)
        if self.scale_type == "channel":
            dim = 1 if st.right else 0
            s = torch.linalg.vector_norm(norm_grad, dim=dim) / (torch.linalg.vector_norm(R, dim=dim) + 1e-8)
        else:
            s = torch.linalg.vector_norm(norm_grad) / (torch.linalg.vector_norm(R) + 1e-8)
        limiter = 1.0
        if self.norm_growth_limit is not None:
            row_sq, col_sq = sq_sums()
            front = self.scale if self.scale_front else 1.0
            if s.dim() == 0:
                sq = s.square() * row_sq.sum()
            elif st.right:
                sq = (s.square() * row_sq).sum()
            else:
                sq = (s.square() * col_sq).sum()
            norm = math.sqrt(float(sq) * front)
            if not math.isfinite(norm):
                pass  # a non-finite gradient: no limit this step, and the limiter's state is kept
            elif st.prev_norm is not None:
                gamma = self.norm_growth_limit
                limiter = max(norm / (st.prev_norm + 1e-8), gamma) / gamma
                st.prev_norm = norm / limiter
            else:
                st.prev_norm = norm
        k = step_size * math.sqrt(self.scale) / limiter
        return s, k

    def _vectors(self, st, s, shape):
        m, n = shape
        ones_m = torch.ones(m, dtype=torch.float32, device=s.device)
        ones_n = torch.ones(n, dtype=torch.float32, device=s.device)
        if s.dim() == 0:
            return ones_m, ones_n, float(s)
        return (s.contiguous(), ones_n, 1.0) if st.right else (ones_m, s.contiguous(), 1.0)

    def _update_args(self, param, k_total: float) -> dict:
        decay_lr = self.lr
        wd = self.weight_decay_for(param)
        decay = 1.0 - self.lr * wd
        coef = decay * k_total / decay_lr if decay_lr > 0 else 0.0
        return dict(lr=decay_lr, weight_decay=wd, coef=coef, loss_scale=self.loss_scale,
                    rounding=self._rounding_for(param), seed=self._seed_for(param), backend=self.backend,
                    name=self._name(param))

    @torch.no_grad()
    def linear_apply(self, param, x, dy):
        name = self._name(param)
        st = self.projectors.get(name)
        if st is None:
            return super().linear_apply(param, x, dy)
        P = self._projection(st, param)
        x32 = x.reshape(-1, x.shape[-1]).to(torch.float32)
        dy32 = dy.reshape(-1, dy.shape[-1]).to(torch.float32)
        R = dy32.t() @ (x32 @ P.t()) if st.right else (dy32 @ P).t() @ x32
        g_scale = self.clip_coef / self.loss_scale
        R.mul_(g_scale)

        def sq_sums():
            rows = torch.zeros(param.shape[0], dtype=torch.float32, device=param.device)
            cols = torch.zeros(param.shape[1], dtype=torch.float32, device=param.device)
            adalomo_stats.adalomo_sq_sums_(rows, cols, param, x, dy, loss_scale=self.loss_scale,
                                           backend=self.backend, name=name)
            return rows * self.clip_coef ** 2, cols * self.clip_coef ** 2

        s, k = self._scale_and_multiplier(st, R, sq_sums)
        row, col, scalar = self._vectors(st, s, param.shape)
        adalomo_stats.adalomo_linear_update_(param, x, dy, row, col,
                                             **self._update_args(param, k * scalar * self.clip_coef),
                                             nonfinite=self.nonfinite_counter(param))

    @torch.no_grad()
    def dense_apply(self, param, grad):
        name = self._name(param)
        st = self.projectors.get(name)
        if st is None:
            return super().dense_apply(param, grad)
        # the unfused route: the weight's own gradient exists already
        P = self._projection(st, param)
        g = grad.to(torch.float32) * (self.clip_coef / self.loss_scale)
        R = g @ P.t() if st.right else P.t() @ g
        s, k = self._scale_and_multiplier(st, R, lambda: (g.square().sum(1), g.square().sum(0)))
        row, col, scalar = self._vectors(st, s, param.shape)
        args = self._update_args(param, k * scalar)
        args["loss_scale"] = 1.0
        ops.dense_update_(param, g.mul_(row[:, None]).mul_(col), **args, nonfinite=self.nonfinite_counter(param))

    def embedding_apply(self, param, indices, dy, padding_idx):
        return super().embedding_apply(param, indices, dy, padding_idx)

    # --- checkpoints ---------------------------------------------------------------------------------

    def _named_state(self):
        state = super()._named_state()
        for name, st in self.projectors.items():
            dev = st.exp_avg.device
            state[name] = {
                "exp_avg": st.exp_avg, "exp_avg_sq": st.exp_avg_sq,
                "projector": st.projector if st.projector is not None else torch.zeros(0, device=dev),
                "proj_seed": torch.tensor(st.seed, dtype=torch.int64),
                "prev_norm": torch.tensor(math.nan if st.prev_norm is None else st.prev_norm, dtype=torch.float64),
            }
        return state

    def _load_named_state(self, state):
        adam = {n: e for n, e in state.items() if n not in self.projectors}
        missing = sorted(set(self.projectors) - set(state))
        if missing:
            raise ValueError(f"checkpoint's {type(self).__name__} state does not match this model: missing {missing[:3]}")
        for name, st in self.projectors.items():
            entry = state[name]
            if entry["exp_avg"].shape != st.exp_avg.shape or entry["exp_avg_sq"].shape != st.exp_avg_sq.shape:
                raise ValueError(f"checkpoint's APOLLO moments for {name!r} have the wrong shape (another rank?)")
            if entry["projector"].numel() and tuple(entry["projector"].shape) != st.proj_shape:
                raise ValueError(f"checkpoint's projector for {name!r} has the wrong shape")
        super()._load_named_state(adam)
        for name, st in self.projectors.items():
            entry = state[name]
            st.exp_avg.copy_(entry["exp_avg"])
            st.exp_avg_sq.copy_(entry["exp_avg_sq"])
            st.projector = entry["projector"].clone() if entry["projector"].numel() else None
            st.seed = int(entry["proj_seed"])
            prev = float(entry["prev_norm"])
            st.prev_norm = None if math.isnan(prev) else prev


class ApolloMini(Apollo):
    """APOLLO-Mini: rank 1, one tensor-wide scale, ``scale=128`` (apollo-torch's recommended settings)."""

    def __init__(self, model: nn.Module, lr: float = 1e-3, rank: int = 1, scale_type: str = "tensor",
                 scale: float = 128.0, **kwargs):
        if rank != 1 or scale_type != "tensor":  # anything else is APOLLO, not APOLLO-Mini
            raise ValueError(f"ApolloMini is rank 1 with a tensor scale, got rank={rank!r}, scale_type={scale_type!r}; "
                             "use lomo_kernels.Apollo(model, rank=..., scale_type=...) for other settings")
        super().__init__(model, lr=lr, rank=rank, scale_type=scale_type, scale=scale, **kwargs)
