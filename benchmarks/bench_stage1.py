"""Stage 1 speed at paper scale (budget 30000, target 16, D = 1024, 20 heads), against the original's ways.

    python -m benchmarks.bench_stage1 [--device cuda] [--data_dir data/docmnist_30000_15.2]

- training epoch: villa's MultiHeadProjection with each kernel (``bmm``: all heads in one batched matmul; ``loop``:
  one GEMM per head; ``auto`` picks bmm on CUDA, loop elsewhere) vs a Python loop over 20 head modules (original);
- mapping: all images of all splits in region chunks with vectorised assignment and text (villa) vs image by
  image, batch size 1, a head call per attribute and row-by-row text (original), timed on --per_image_images images.

Embeddings are villa.synthetic (D = 1024), so no encoder is needed; the work per step is the same as with CLIP's.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from docmnist.generate_docmnist import generate
from villa.core.runtime import get_runtime
from villa.data.annotations import load_annotations
from villa.data.batches import RegionBank, image_batches
from villa.data.embeddings import open_embeddings
from villa.data.synthetic import write_synthetic_embeddings
from villa.data.vocab import load_vocab
from villa.models.projection import MultiHeadProjection, separate_heads
from villa.stage1.loss import stage1_loss
from villa.stage1.mapping import assign, assign_text, score_regions


def sync(rt):
    if rt.is_cuda:
        torch.cuda.synchronize()


class LoopHeads(torch.nn.Module):
    """The original's layout: one module per attribute, called in a Python loop."""

    def __init__(self, dim, n):
        super().__init__()
        self.heads = separate_heads(dim, n)

    def scores(self, x, e):
        e = F.normalize(e, dim=-1)
        return torch.stack([F.normalize(h(x), dim=-1) @ e[a] for a, h in enumerate(self.heads)], 1)


def epoch(model, bank, attrs, e, rows, rt, bs, gen, cpu_bf16=False):
    # as each trainer: villa's Stage 1 uses the fused AdamW; the original, the default one
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=isinstance(model, MultiHeadProjection))
    steps = 0
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if cpu_bf16 else rt.autocast
    for batch in image_batches(rows, bs, shuffle=True, generator=gen):
        x, ri = bank.gather(batch)
        with ctx():
            loss = stage1_loss(model.scores(x, e), ri, attrs[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    sync(rt)
    return steps


def per_image_mapping(heads, emb, ann, vocab, rt, n_images, epsilon=0.2):
    """Image by image, batch size 1, one head call per attribute of the image, then row-by-row text."""
    e = F.normalize(torch.from_numpy(emb.attributes).to(rt.device), dim=-1)
    rng = np.random.default_rng(0)
    out = []
    for i in range(n_images):
        s, c = int(emb.start[i]), int(emb.count[i])
        x = torch.from_numpy(np.array(emb.regions[s : s + c], np.float32)).to(rt.device)
        names = [vocab.attributes[k] for k in ann.attr_ids[ann.attr_offsets[i] : ann.attr_offsets[i + 1]]]
        region_attrs = [[] for _ in range(c)]
        for a in names:
            k = vocab.index[a]
            with torch.no_grad():
                sc = (F.normalize(heads[k](x), dim=-1) @ e[k]).cpu().numpy()
            for r in np.flatnonzero(sc > sc.max() - epsilon):
                region_attrs[r].append(a)
        sentences = [t.strip() for t in ann.text[i].split(".")]
        texts = []
        for attrs in region_attrs:
            picked = []
            for a in attrs:
                cands = [t for t in sentences if re.search(rf"\b{a}\b", t)]
                if cands:
                    picked.append(cands[rng.integers(len(cands))])
            texts.append(" . ".join(picked))
        out.append(texts)
    sync(rt)
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_stage1",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--batch_size", type=int, default=48)
    p.add_argument("--per_image_images", type=int, default=300)
    a = p.parse_args()
    rt = get_runtime(a.device)
    vocab = load_vocab("docmnist")
    data = a.data_dir or generate(30000, 16, out_dir=tempfile.mkdtemp(), progress=False)
    ann = load_annotations(data, vocab, check_images=False)
    emb_dir = write_synthetic_embeddings(ann, vocab, tempfile.mkdtemp() + "/emb", dim=a.dim)
    emb = open_embeddings(emb_dir, vocab)
    bank = RegionBank(emb, rt.device)
    attrs = torch.from_numpy(ann.attribute_matrix(len(vocab))).to(rt.device)
    e = torch.from_numpy(emb.attributes).to(rt.device)
    rows = np.flatnonzero(ann.split == "train")
    print(
        f"device={rt.device} amp={rt.amp_dtype} D={a.dim} heads={len(vocab)} train images={len(rows)} regions={len(emb.regions)}"
    )
    res = {}
    auto = MultiHeadProjection(a.dim, len(vocab)).to(rt.device)
    auto_kernel = "loop" if auto.uses_loop(e) else "bmm"
    variants = [
        ("kernel=bmm", MultiHeadProjection(a.dim, len(vocab), kernel="bmm"), False),
        ("kernel=loop", MultiHeadProjection(a.dim, len(vocab), kernel="loop"), False),
        ("original heads", LoopHeads(a.dim, len(vocab)), False),
    ]
    if not rt.is_cuda:  # what lower precision would give on CPU (it changes the numbers: not villa's default)
        variants.append(("loop, bf16", MultiHeadProjection(a.dim, len(vocab), kernel="loop"), True))
    for name, model, bf16 in variants:
        model = model.to(rt.device)
        gen = torch.Generator().manual_seed(0)
        epoch(model, bank, attrs, e, rows[: a.batch_size * 3], rt, a.batch_size, gen, bf16)  # warm-up
        t0 = time.perf_counter()
        steps = epoch(model, bank, attrs, e, rows, rt, a.batch_size, gen, bf16)
        secs = time.perf_counter() - t0
        res[name] = secs
        print(f"train epoch, {name:<14}: {secs:7.2f}s  {steps / secs:7.2f} steps/s")
    ratio = res["original heads"] / res[f"kernel={auto_kernel}"]
    print(f"epoch speed-up, villa's default (kernel=auto -> {auto_kernel} here) vs the original's heads: {ratio:.2f}x")
    model = MultiHeadProjection(a.dim, len(vocab)).to(rt.device).eval()
    heads = [
        torch.nn.Sequential(torch.nn.Linear(a.dim, a.dim), torch.nn.ReLU(), torch.nn.Linear(a.dim, a.dim)).to(rt.device)
        for _ in range(len(vocab))
    ]
    image_attrs = ann.attribute_matrix(len(vocab))
    caption_pairs = image_attrs[np.repeat(np.arange(ann.n_images), ann.n_regions)]
    times = {}
    for label, pairs in (("every head, every region", None), ("caption pairs only", caption_pairs)):
        t0 = time.perf_counter()
        scores = score_regions(bank, e, rt, model, pairs=pairs)
        assigned = assign(scores, ann.region_offsets, image_attrs)
        assign_text(ann.text, ann.region_offsets, assigned, vocab, np.random.default_rng(0))
        sync(rt)
        times[label] = time.perf_counter() - t0
        print(f"mapping, {label:<25}: {ann.n_images / times[label]:9.0f} images/s")
    print(
        f"mapping, caption pairs only vs every head: {times['every head, every region'] / times['caption pairs only']:.2f}x "
        f"({caption_pairs.mean():.0%} of the (region, attribute) pairs)"
    )
    t_vec = times["caption pairs only"]
    n = min(a.per_image_images, ann.n_images)
    t0 = time.perf_counter()
    per_image_mapping(heads, emb, ann, vocab, rt, n)
    t_img = time.perf_counter() - t0
    v, o = ann.n_images / t_vec, n / t_img
    print(f"mapping, vectorised  : {ann.n_images} images (all splits) in {t_vec:.2f}s = {v:9.0f} images/s")
    print(f"mapping, per image   : {n} images in {t_img:.2f}s = {o:9.0f} images/s")
    print(f"mapping speed-up: {v / o:.0f}x")


if __name__ == "__main__":
    main()
