"""torch.distributed for Stage 2 / pretraining: set-up from torchrun's environment, and feature gathering.

Launch with ``torchrun --nproc_per_node=N -m villa.stage2 ...``. NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local)
    return Dist(rank, world, local)


def rank_sizes(n: int, d: Dist, device: torch.device) -> list[int]:
    """Every rank's ``n``, in rank order (one all_gather)."""
    if not d.enabled:
        return [n]
    t = torch.tensor([n], device=device)
    sizes = [torch.zeros_like(t) for _ in range(d.world_size)]
    dist.all_gather(sizes, t)
    return [int(s.item()) for s in sizes]


def gather_rows(x: torch.Tensor, d: Dist, sizes: Optional[list[int]] = None) -> torch.Tensor:
    """Concatenate every rank's (n_r, ...) rows in rank order; the local rows keep their autograd graph.

    Ranks may hold different numbers of rows (images have different region counts): sizes are exchanged, rows
    padded to the largest, gathered, and trimmed (``sizes``: the ranks' row counts, when the caller already has
    them from :func:`rank_sizes`). As open_clip (gather_with_grad=False), other ranks' rows are
    constants here; the caller scales the loss by the world size so that, after DDP averages the gradients, they
    equal a single process's on the global batch.
    """
    if not d.enabled:
        return x
    sizes = rank_sizes(x.shape[0], d, x.device) if sizes is None else sizes
    m = max(sizes)
    padded = torch.cat([x.detach(), x.new_zeros((m - x.shape[0],) + tuple(x.shape[1:]))])
    parts = [torch.zeros_like(padded) for _ in range(d.world_size)]
    dist.all_gather(parts, padded.contiguous())
    parts = [p[:s] for p, s in zip(parts, sizes)]
    parts[d.rank] = x
    return torch.cat(parts)


def sum_over_ranks(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """The sum of a (detached) tensor over ranks; ``x`` itself without distribution."""
    if not d.enabled:
        return x
    y = x.detach().clone()
    dist.all_reduce(y)
    return y


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` unchanged in value, its gradient multiplied by ``factor``."""
    return x * factor + (x * (1.0 - factor)).detach()


def cleanup(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
