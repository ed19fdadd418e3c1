"""Device, precision and seeding, chosen once and passed down (no hard-coded ``.cuda()``)."""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from villa.core.errors import VillaError


@dataclass(frozen=True)
class Runtime:
    """Where and how to compute: the device and the autocast dtype (None = full fp32)."""

    device: torch.device
    amp_dtype: Optional[torch.dtype] = None

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16/fp16 autocast on CUDA, a no-op elsewhere (nanoGPT's pattern)."""
        if self.amp_dtype is None or self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def get_runtime(device: Union[str, torch.device, None] = "auto", amp: Union[bool, str] = True) -> Runtime:
    """``device``: ``auto`` (CUDA if present, else CPU), ``cpu``, ``cuda``, ``cuda:1``...

    ``amp``: on CUDA, True picks bf16 where supported, else fp16; ``"bf16"``/``"fp16"`` force one; False = fp32.
    CPU always runs fp32.
    """
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise VillaError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VillaError(f"device={device} but CUDA is not available here; use device=cpu or device=auto")
    amp_dtype = None
    if dev.type == "cuda" and amp:
        if amp == "fp16":
            amp_dtype = torch.float16
        elif amp == "bf16" or torch.cuda.is_bf16_supported():
            amp_dtype = torch.bfloat16
        else:
            amp_dtype = torch.float16
    return Runtime(dev, amp_dtype)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch (for code we do not control, e.g. weight init); return a torch Generator
    for our own sampling, which is passed down explicitly."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - third-party code may still use the legacy global RNG
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g
