"""Stage 1's mapping model: one projection head per attribute, the heads' weights stacked in one tensor each."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from villa.stage1.loss import segment_max


class MultiHeadProjection(nn.Module):
    """H heads, each ``Linear(D, D) -> ReLU -> Linear(D, D)``, applied to every region (the paper's Stage 1).

    The H heads' weights are stacked, (H, D, D); ``one_proj`` shares one head across attributes; ``adapter``
    returns ``0.2 * head(x) + 0.8 * x``. Initialised as ``nn.Linear``.

    ``kernel`` picks how the heads run, for the device (the same parameters and the same function; tested equal to
    separate ``nn.Linear`` heads either way): ``bmm``, one batched matmul per layer (one kernel on a GPU instead of
    H small launches); ``loop``, one GEMM per head (``F.linear``, the original's structure), faster on CPU, where
    the batched form is 0.7x (benchmarks/bench_stage1.py); ``auto`` (default): ``bmm`` on CUDA, else ``loop``.
    """

    KERNELS = ("auto", "bmm", "loop")

    def __init__(self, dim: int, n_heads: int, one_proj: bool = False, adapter: bool = False, kernel: str = "auto"):
        super().__init__()
        if kernel not in self.KERNELS:
            raise ValueError(f"kernel={kernel!r}: use one of {', '.join(self.KERNELS)}")
        self.dim, self.n_attributes = dim, n_heads
        self.one_proj, self.adapter, self.kernel = one_proj, adapter, kernel
        h = 1 if one_proj else n_heads
        self.w1 = nn.Parameter(torch.empty(h, dim, dim))  # (H, out, in) as nn.Linear.weight
        self.b1 = nn.Parameter(torch.empty(h, 1, dim))
        self.w2 = nn.Parameter(torch.empty(h, dim, dim))
        self.b2 = nn.Parameter(torch.empty(h, 1, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1 / math.sqrt(self.dim)  # nn.Linear: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(in), 1/sqrt(in))
        for p in (self.w1, self.b1, self.w2, self.b2):
            nn.init.uniform_(p, -bound, bound)

    def uses_loop(self, x: torch.Tensor) -> bool:
        return not self.one_proj and (self.kernel == "loop" or (self.kernel == "auto" and x.device.type != "cuda"))

    def _loop(self, x, ids) -> list[torch.Tensor]:
        """Heads ``ids`` one GEMM each, as ``nn.Linear`` computes them; ``x`` is one (R, D) input for every head or a
        sequence of inputs, one per head. The stacked weights are split with ``unbind`` (its backward stacks the
        heads' gradients once; indexing ``w1[h]`` would add each head's gradient into a zero tensor of all heads, 2x
        slower on CPU)."""
        w1, b1, w2, b2 = self.w1.unbind(0), self.b1.unbind(0), self.w2.unbind(0), self.b2.unbind(0)
        outs = []
        for k, h in enumerate(ids):
            xh = x if isinstance(x, torch.Tensor) else x[k]
            out = F.linear(F.relu(F.linear(xh, w1[h], b1[h][0])), w2[h], b2[h][0])
            outs.append(0.2 * out + 0.8 * xh if self.adapter else out)
        return outs

    def forward(self, x: torch.Tensor, heads: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (R, D) -> (H, R, D): every head applied to every region (or only the heads listed in ``heads``)."""
        if self.uses_loop(x):
            ids = range(self.n_attributes) if heads is None else heads.tolist()
            return torch.stack(self._loop(x, ids))
        w1, b1, w2, b2 = self.w1, self.b1, self.w2, self.b2
        if heads is not None and not self.one_proj:
            w1, b1, w2, b2 = w1[heads], b1[heads], w2[heads], b2[heads]
        h = F.relu(torch.matmul(x, w1.transpose(1, 2)) + b1)  # (H, R, D)
        out = torch.matmul(h, w2.transpose(1, 2)) + b2
        n = self.n_attributes if heads is None else len(heads)
        if self.one_proj:
            out = out.expand(n, -1, -1)
        if self.adapter:
            out = 0.2 * out + 0.8 * x.unsqueeze(0)
        return out

    def scores(self, x: torch.Tensor, attr_emb: torch.Tensor, heads: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Cosine similarity of every region under every head with that head's attribute: (R, A), or (R, K) for
        the K heads listed in ``heads``."""
        ids = torch.arange(self.n_attributes, device=attr_emb.device) if heads is None else heads
        e = F.normalize(attr_emb[ids], dim=-1)
        if self.uses_loop(x):  # per head, without materialising (A, R, D)
            z = self._loop(x, ids.tolist())
            return torch.stack([F.normalize(z[k], dim=-1) @ e[k] for k in range(len(z))], 1)
        z = F.normalize(self(x, heads), dim=-1)  # (K, R, D)
        return torch.einsum("krd,kd->rk", z, e)

    def scores_at(
        self, x: torch.Tensor, attr_emb: torch.Tensor, rows: torch.Tensor, heads: torch.Tensor
    ) -> torch.Tensor:
        """``scores(x, attr_emb, heads)`` at one region per (image, head) only: (B, K), entry (i, k) the score of
        region ``rows[i, k]`` under head ``heads[k]``; B regions through each head instead of all R."""
        e = F.normalize(attr_emb[heads], dim=-1)
        xs = x[rows.t()]  # (K, B, D)
        if self.uses_loop(x):
            if _autocasting(x):  # lower precision: autograd through unbind handles the dtypes
                z = torch.stack(self._loop(list(xs), heads.tolist()))
            else:
                z = _Heads.apply(xs, self.w1, self.b1, self.w2, self.b2, heads.tolist())
                if self.adapter:
                    z = 0.2 * z + 0.8 * xs
            return (F.normalize(z, dim=-1) * e[:, None]).sum(-1).t()
        w1, b1, w2, b2 = self.w1, self.b1, self.w2, self.b2
        if not self.one_proj:
            w1, b1, w2, b2 = w1[heads], b1[heads], w2[heads], b2[heads]
        z = torch.matmul(F.relu(torch.matmul(xs, w1.transpose(1, 2)) + b1), w2.transpose(1, 2)) + b2
        if self.adapter:
            z = 0.2 * z + 0.8 * xs
        return (F.normalize(z, dim=-1) * e[:, None]).sum(-1).t()

    def image_scores(
        self, x: torch.Tensor, attr_emb: torch.Tensor, region_image: torch.Tensor, n_images: int, heads: torch.Tensor
    ) -> torch.Tensor:
        """Each image's best region score under each head of ``heads``: (B, K), the value and the gradient of
        ``segment_max(scores(x, attr_emb, heads), region_image, B)``, at a fraction of its cost.

        The max's gradient reaches only the region that attains it, so the best region of each (image, head) is
        found without autograd over all R regions, and only those B regions per head go through the heads with
        autograd (Stage 1's backward then costs B instead of R rows per head). Where an image's best is tied
        between regions, the gradient goes to the first of them rather than split among them: the same gradient
        when the tied regions are the same embedding (a blank cell twice), the one case where ties occur. An
        image without regions scores -inf, as ``segment_max``'s does.
        """
        with torch.no_grad():
            s = self.scores(x, attr_emb, heads)  # (R, K)
            best = segment_max(s, region_image, n_images)
            r = s.shape[0]
            idx = torch.arange(r, device=s.device)[:, None].expand_as(s)
            cand = torch.where(s == best[region_image], idx, r)
            rows = cand.new_full(best.shape, r).scatter_reduce(
                0, region_image[:, None].expand_as(s), cand, reduce="amin", include_self=True
            )
            empty = rows == r
        out = self.scores_at(x, attr_emb, rows.clamp(max=max(r - 1, 0)), heads)
        return out.masked_fill(empty, float("-inf")) if bool(empty.any()) else out

    @classmethod
    def from_heads(cls, heads: list[nn.Sequential], adapter: bool = False) -> MultiHeadProjection:
        """Stack separate ``Sequential(Linear, ReLU, Linear)`` heads (the original's modules) into one model."""
        dim = heads[0][0].in_features
        m = cls(dim, len(heads), adapter=adapter)
        with torch.no_grad():
            m.w1.copy_(torch.stack([h[0].weight for h in heads]))
            m.b1.copy_(torch.stack([h[0].bias for h in heads])[:, None])
            m.w2.copy_(torch.stack([h[2].weight for h in heads]))
            m.b2.copy_(torch.stack([h[2].bias for h in heads])[:, None])
        return m


def _autocasting(x: torch.Tensor) -> bool:
    try:
        return torch.is_autocast_enabled(x.device.type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_cpu_enabled() if x.device.type == "cpu" else torch.is_autocast_enabled()


class _Heads(torch.autograd.Function):
    """Heads ``heads`` (distinct) each on its own rows, xs (K, B, D) -> (K, B, D), one GEMM per head and layer, as
    ``nn.Linear``; the backward writes each head's gradient straight into its slice of the stacked (H, D, D)
    gradients (autograd through ``unbind`` would stack them afterwards: a copy of all the heads' weights per step,
    8% of a Stage 1 step on a CPU). Heads not listed get zero gradients, as autograd gives them."""

    @staticmethod
    def forward(ctx, xs, w1, b1, w2, b2, heads):
        hidden, out = [], []
        for k, h in enumerate(heads):
            a = torch.relu(torch.addmm(b1[h], xs[k], w1[h].t()))
            hidden.append(a)
            out.append(torch.addmm(b2[h], a, w2[h].t()))
        ctx.heads, ctx.n_heads = heads, w1.shape[0]
        ctx.save_for_backward(xs, torch.stack(hidden), w2)
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad):
        xs, hidden, w2 = ctx.saved_tensors
        n, d = ctx.n_heads, w2.shape[-1]
        new = torch.empty if len(ctx.heads) == n else torch.zeros
        g_w1, g_w2 = new(n, d, d, dtype=w2.dtype, device=w2.device), new(n, d, d, dtype=w2.dtype, device=w2.device)
        g_b1, g_b2 = new(n, 1, d, dtype=w2.dtype, device=w2.device), new(n, 1, d, dtype=w2.dtype, device=w2.device)
        for k, h in enumerate(ctx.heads):
            torch.mm(grad[k].t(), hidden[k], out=g_w2[h])
            torch.sum(grad[k], 0, keepdim=True, out=g_b2[h])
            g_hidden = torch.mm(grad[k], w2[h]).mul_(hidden[k] > 0)
            torch.mm(g_hidden.t(), xs[k], out=g_w1[h])
            torch.sum(g_hidden, 0, keepdim=True, out=g_b1[h])
        return None, g_w1, g_b1, g_w2, g_b2, None


def separate_heads(dim: int, n_heads: int) -> nn.ModuleList:
    """The original's layout, one module per attribute; used as the reference in tests and benchmarks."""
    return nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim)) for _ in range(n_heads))
