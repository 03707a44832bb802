"""``DynamicLossScaler``: lomo-optim's fp16 loss scaler, with the same arguments and update rule.

Differences from ``lomo_optim.lomo.DynamicLossScaler``, all deliberate:

* ``update_scale(overflow=False)`` is actually called after every clean step (lomo-optim never calls
  it, so its scale only ever goes down); after ``scale_window`` clean steps the scale is multiplied
  by ``scale_factor`` again, exactly by lomo-optim's own rule.
* The initial scale is ``2**16`` (``torch.amp.GradScaler``'s), not lomo-optim's ``2**32``: from
  ``2**32`` a tiny LLaMA overflows (and skips) its first dozen steps while the scale comes down.
* Overflow messages ("OVERFLOW! Skipping step ...") go to the ``lomo_kernels`` logger (level
  WARNING), never to stdout, instead of ``print`` on ``torch.distributed.get_rank() == 0``; so nothing
  calls ``torch.distributed`` when it is not initialized, and a program's stdout stays its own
  (``logging.getLogger("lomo_kernels").setLevel(logging.ERROR)`` silences them).
* Detection of non-finite gradients is not done here (lomo-optim syncs the host once per tensor):
  the optimizer's norm phase counts non-finite entries on the device and syncs once per step.
"""
from __future__ import annotations

import logging

import torch

logger = logging.getLogger("lomo_kernels")

DEFAULT_INIT_SCALE = 2.0**16  # torch.amp.GradScaler's


class DynamicLossScaler:
    def __init__(self, init_scale: float = DEFAULT_INIT_SCALE, scale_factor: float = 2.0, scale_window: int = 1000,
                 min_scale: float = 1, delayed_shift: int = 1, consecutive_hysteresis: bool = False,
                 raise_error_at_min_scale: bool = True, dtype: torch.dtype = torch.half):
        if not init_scale > 0 or not min_scale > 0:
            raise ValueError(f"init_scale and min_scale must be > 0, got {init_scale} and {min_scale}")
        if not scale_factor > 1:
            raise ValueError(f"scale_factor must be > 1, got {scale_factor}")
        if not (isinstance(scale_window, int) and scale_window >= 1):
            raise ValueError(f"scale_window must be an int >= 1, got {scale_window!r}")
        if not (isinstance(delayed_shift, int) and delayed_shift >= 1):
            raise ValueError(f"delayed_shift must be an int >= 1, got {delayed_shift!r}")
        self.cur_scale = init_scale
        self.cur_iter = 0
        self.last_overflow_iter = -1
        self.scale_factor = scale_factor
        self.scale_window = scale_window
        self.min_scale = min_scale
        self.delayed_shift = delayed_shift
        self.cur_hysteresis = delayed_shift
        self.consecutive_hysteresis = consecutive_hysteresis
        self.raise_error_at_min_scale = raise_error_at_min_scale
        self.dtype = dtype

    @property
    def loss_scale(self) -> float:
        return self.cur_scale

    def update_scale(self, overflow: bool) -> None:
        """lomo-optim's rule: on overflow lower the scale (after ``delayed_shift`` overflows); after
        ``scale_window`` iterations since the last overflow raise it."""
        if overflow:
            if self.delayed_shift == 1 or self.cur_hysteresis == 1:
                if self.cur_scale == self.min_scale and self.raise_error_at_min_scale:
                    raise RuntimeError("Current loss scale already at minimum - cannot decrease scale anymore. "
                                       "Exiting run.")
                next_scale = max(self.cur_scale / self.scale_factor, self.min_scale)
                logger.warning("[lomo_kernels] OVERFLOW! Skipping step. Attempted loss scale: %s, reducing to %s",
                               self.cur_scale, next_scale)
                self.cur_scale = next_scale
            else:
                logger.warning("[lomo_kernels] OVERFLOW! Skipping step. Attempted loss scale: %s, but hysteresis "
                               "is %d. Reducing hysteresis to %d", self.cur_scale, self.cur_hysteresis,
                               self.cur_hysteresis - 1)
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
        else:
            if self.consecutive_hysteresis:
                self.cur_hysteresis = self.delayed_shift
            if (self.cur_iter - self.last_overflow_iter) % self.scale_window == 0:
                if not self.consecutive_hysteresis:
                    self.cur_hysteresis = self.delayed_shift
                self.cur_scale *= self.scale_factor
        self.cur_iter += 1

    _STATE = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")

    def state_dict(self) -> dict:
        return {key: getattr(self, key) for key in self._STATE}

    def load_state_dict(self, state: dict) -> None:
        missing = [key for key in self._STATE if key not in state]
        if missing:
            raise KeyError(f"loss scaler state is missing {missing}")
        for key in self._STATE:
            setattr(self, key, state[key])


class LossScaledMixin:
    """fp16 dynamic loss scaling for a fused optimizer (``Lomo``, ``AdamW``): the subclass sets
    ``loss_scaler`` to a ``DynamicLossScaler`` when a parameter is fp16, else leaves it None."""

    loss_scaler: DynamicLossScaler | None = None

    @property
    def loss_scale(self) -> float:
        return self.loss_scaler.loss_scale if self.loss_scaler is not None else 1.0

    def _on_overflow(self) -> None:
        if self.loss_scaler is not None:
            self.loss_scaler.update_scale(overflow=True)

    def _on_step_applied(self) -> None:
        if self.loss_scaler is not None:
            self.loss_scaler.update_scale(overflow=False)

    def _scaler_state(self):
        return self.loss_scaler.state_dict() if self.loss_scaler is not None else None

    def _load_scaler_state(self, state) -> None:
        if (state is None) != (self.loss_scaler is None):
            raise ValueError("checkpoint and optimizer disagree on fp16 loss scaling (one has a loss scaler, "
                             "the other not): were the weights saved in another dtype?")
        if state is not None:
            self.loss_scaler.load_state_dict(state)
