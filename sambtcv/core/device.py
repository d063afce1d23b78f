"""Where and how models run: device choice, seeds, precision (autocast), allocator tuning."""
from __future__ import annotations

import contextlib
import random
import sys

import numpy as np
import torch

from sambtcv.core.config import PRECISIONS
from sambtcv.core.errors import PipelineError


def tune_allocator() -> None:
    """Keep freed tensor memory in the process instead of returning it to the OS after every op.

    With glibc's default (mmap/munmap for every large tensor) page faults dominate the encoder's time
    on small CPUs; `bench.py` measures the encoder with this setting. No effect on results.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(name)
    if hasattr(libc, "mallopt"):
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, 1 << 33)
        libc.mallopt(m_top_pad, 1 << 28)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str | None) -> torch.device:
    """'cuda' when present unless told otherwise; asking for cuda without a GPU is an error."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError("{subject} cuda was asked for but no CUDA GPU is visible; use {subject} cpu",
                            subject="device")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise PipelineError(f"unknown {{subject}} {name!r}; use cpu or cuda", subject="device")
    return torch.device(name)


def check_precision(dtype: str) -> str:
    if dtype not in PRECISIONS:
        raise PipelineError(f"unknown {{subject}} {dtype!r}; use {' or '.join(PRECISIONS)}", subject="precision")
    return dtype


def autocast(device, dtype: str):
    """Context for the model's forward passes: bf16 autocast when dtype == 'bf16', else nothing."""
    check_precision(dtype)
    if dtype == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU. For timing."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
