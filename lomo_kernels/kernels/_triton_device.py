"""The device guard of every Triton launch: ``with device_guard(t.device): kernel[grid](...)``.

A Triton launch runs on torch's *current* CUDA device and that device's current stream (Triton reads
both from the driver when it launches), not on the device of the tensors it is given. A kernel on
``cuda:1`` tensors launched while ``cuda:0`` is current would be compiled for and queued on device 0,
ordered against device 0's stream rather than the stream that produced its inputs. Entering
``torch.cuda.device(t.device)`` first makes the tensors' device current, so the launch goes to that
device's current stream (the one torch queued the inputs' producers on, or the user's
``torch.cuda.stream(...)`` on it), and puts the previous device back afterwards.

Every launch in ``triton_update``, ``triton_adalomo`` (and ``triton_adamw``) goes through this helper.
CPU tensors (Triton's interpreter, ``TRITON_INTERPRET=1``) have no device to guard: a null context.
"""
from __future__ import annotations

import contextlib

import torch


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """A context in which ``device`` (a CUDA device) is torch's current device, so Triton launches made
    inside it run there, on its current stream; for any other device type, a context that does nothing."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
