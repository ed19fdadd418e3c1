"""Device, precision and seeding, chosen once and passed down (no hard-coded ``.cuda()``)."""

from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from villa.core.errors import VillaError

log = logging.getLogger(__name__)


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Runtime:
    """Where and how to compute: the device and the autocast dtype (None = full fp32)."""

    device: torch.device
    amp_dtype: Optional[torch.dtype] = None

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to ``amp_dtype`` on the device (CUDA, or bf16 on a CPU); a no-op in fp32 (nanoGPT's pattern)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16 or AMX); elsewhere a bf16 matmul is emulated, two
    orders of magnitude slower (measured: 150x on an AVX2-only EPYC, docs/speed.md)."""
    capability = str(torch.backends.cpu.get_cpu_capability()).upper()
    if "AMX" in capability or "BF16" in capability:
        return True
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def machine_info() -> dict:
    """The hardware a run's numbers came from: the CPU's model name, logical cores, torch's CPU capability, whether
    it computes bf16 natively, torch's threads, and the GPU when there is one. Float kernels differ by instruction
    set, so results differ in their last digits from one machine to another (docs/results/README.md)."""
    import os
    import platform

    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    out = {
        "model": model,
        "logical_cores": os.cpu_count(),
        "native_bf16": cpu_has_native_bf16(),
        "torch_cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def get_runtime(device: Union[str, torch.device, None] = "auto", precision: Union[bool, str] = "auto") -> Runtime:
    """``device``: ``auto`` (CUDA if present, else CPU), ``cpu``, ``cuda``, ``cuda:1``...

    ``precision``: ``auto`` is bf16 autocast on CUDA (fp16 where the GPU has no bf16) and fp32 on a CPU; ``bf16``
    autocasts on either device (on a CPU, opt-in: fast only where it has native bf16, and not yet validated
    against fp32 there); ``fp16`` on CUDA; ``fp32`` never autocasts. (True / False: ``auto`` / ``fp32``.)
    """
    if precision is True:
        precision = "auto"
    elif precision is False:
        precision = "fp32"
    if precision not in PRECISIONS:
        raise VillaError(f"precision={precision!r}: use one of {', '.join(PRECISIONS)}")
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise VillaError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VillaError(f"device={device} but CUDA is not available here; use device=cpu or device=auto")
    if precision == "fp16" and dev.type != "cuda":
        raise VillaError("precision=fp16 needs CUDA; on a CPU use fp32 or bf16")
    amp_dtype = None
    if precision == "bf16" or (precision == "auto" and dev.type == "cuda" and torch.cuda.is_bf16_supported()):
        amp_dtype = torch.bfloat16
    elif precision == "fp16" or (precision == "auto" and dev.type == "cuda"):
        amp_dtype = torch.float16
    if amp_dtype == torch.bfloat16 and dev.type == "cpu" and not cpu_has_native_bf16():
        log.warning("precision=bf16 on a CPU without native bf16: expect it to be far slower than fp32")
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
