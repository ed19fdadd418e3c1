"""Stage 1's step time across a training run at paper scale, and what subnormal floats do to it (issue 23).

    python -m benchmarks.bench_stage1_run [--steps 120] [--json out.json]

Trains villa's Stage 1 model (D = 1024, 20 heads, batch 48, the fused AdamW at lr 1e-4, the original loss) on
DocMNIST at budget 30000 / target 16 with villa.synthetic embeddings (the same work per step as CLIP's), twice from
the same initialisation and batches: with the CPU's default float handling and with subnormals flushed to zero
(``torch.set_flush_denormal(True)``, what ``stage1.flush_denormal`` does). Per step: seconds, loss, and the share of
subnormal values (0 < |x| < 1.18e-38) in the heads' gradients, their Adam second moments and their weights. The two
runs are interleaved in blocks of ``--block`` steps (A, B, A, B, ...) so that both see the same machine load.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from docmnist.generate_docmnist import generate
from villa.core.io import write_json_atomic
from villa.data.annotations import load_annotations
from villa.data.batches import RegionBank, image_batches
from villa.data.embeddings import open_embeddings
from villa.data.synthetic import write_synthetic_embeddings
from villa.data.vocab import load_vocab
from villa.models.projection import MultiHeadProjection
from villa.stage1.loss import stage1_loss

TINY = torch.finfo(torch.float32).tiny


def subnormal_share(tensors) -> float:
    n = s = 0
    for t in tensors:
        if t is None:
            continue
        a = t.detach().abs()
        s += int(((a > 0) & (a < TINY)).sum())
        n += a.numel()
    return s / max(n, 1)


class Run:
    def __init__(self, dim: int, heads: int, seed: int, flush: bool):
        torch.manual_seed(seed)
        self.model = MultiHeadProjection(dim, heads)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
        self.flush = flush
        self.rows: list[dict] = []

    def step(self, x, ri, attrs, e) -> None:
        torch.set_flush_denormal(self.flush)
        t = time.perf_counter()
        loss = stage1_loss(self.model.scores(x, e), ri, attrs, 0.07)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        sec = time.perf_counter() - t
        torch.set_flush_denormal(False)
        params = list(self.model.parameters())
        self.rows.append(
            {
                "seconds": sec,
                "loss": float(loss),
                "subnormal_grad": subnormal_share(p.grad for p in params),
                "subnormal_exp_avg_sq": subnormal_share(self.opt.state[p]["exp_avg_sq"] for p in params),
                "subnormal_weight": subnormal_share(params),
            }
        )


def main() -> None:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_stage1_run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--block", type=int, default=10, help="steps per block; the two runs alternate blocks")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--batch_size", type=int, default=48)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    vocab = load_vocab("docmnist")
    with tempfile.TemporaryDirectory() as tmp:
        data = generate(30000, 16, seed=23, out_dir=tmp, val_budget=1000, test_budget=1000, progress=False)
        ann = load_annotations(data, vocab, check_images=False)
        emb = open_embeddings(write_synthetic_embeddings(ann, vocab, Path(tmp) / "emb", dim=a.dim, seed=0))
        bank = RegionBank(emb, torch.device("cpu"))
        attrs = torch.from_numpy(ann.attribute_matrix(len(vocab)))
        e = torch.from_numpy(emb.attributes)
        rows = np.flatnonzero(ann.split == "train")
        gen = torch.Generator().manual_seed(23)
        batches = []
        while len(batches) < a.steps:
            batches += list(image_batches(rows, a.batch_size, shuffle=True, generator=gen))
        batches = batches[: a.steps]
        runs = {"default": Run(a.dim, len(vocab), 23, False), "flush_denormal": Run(a.dim, len(vocab), 23, True)}
        for s in range(0, a.steps, a.block):
            for r in runs.values():
                for b in batches[s : s + a.block]:
                    x, ri = bank.gather(b)
                    r.step(x, ri, attrs[b], e)
    blocks = []
    for s in range(0, a.steps, a.block):
        row = {"steps": f"{s}-{min(s + a.block, a.steps) - 1}"}
        for name, r in runs.items():
            part = r.rows[s : s + a.block]
            row[name] = {
                "median_s": round(float(np.median([x["seconds"] for x in part])), 3),
                "loss": round(part[-1]["loss"], 6),
                **{k: part[-1][k] for k in ("subnormal_grad", "subnormal_exp_avg_sq", "subnormal_weight")},
            }
        row["ratio"] = round(row["default"]["median_s"] / row["flush_denormal"]["median_s"], 2)
        blocks.append(row)
        print(json.dumps(row))
    same = max(abs(x["loss"] - y["loss"]) for x, y in zip(runs["default"].rows, runs["flush_denormal"].rows))
    out = {
        "command": "python -m benchmarks.bench_stage1_run " + " ".join(sys.argv[1:]),
        "steps": a.steps,
        "dim": a.dim,
        "batch_size": a.batch_size,
        "blocks": blocks,
        "max_loss_difference": same,
        "total_s": {k: round(sum(x["seconds"] for x in r.rows), 1) for k, r in runs.items()},
    }
    print(json.dumps({k: v for k, v in out.items() if k != "blocks"}))
    if a.json:
        write_json_atomic(a.json, out)


if __name__ == "__main__":
    main()
