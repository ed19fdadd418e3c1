"""Region embedding throughput: per image with batch size 1 (the original's way) vs batched (villa's).

    python -m benchmarks.bench_preprocess --model villa-tiny-rn --images 256
    python -m benchmarks.bench_preprocess --model RN50 --images 32 --batch_size 32        # CPU: RN50 is slow
    python -m benchmarks.bench_preprocess --model RN50 --images 2048 --batch_size 256 --device cuda

Both ways read the same images from disk and embed the same regions with the same weights (random init unless
--pretrained is given); the batched way also uses DataLoader workers and, on CUDA, autocast.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from docmnist.generate_docmnist import generate
from villa.core.runtime import get_runtime
from villa.data.annotations import load_annotations
from villa.data.images import boxes_of, read_image
from villa.data.vocab import load_vocab
from villa.models.clip import create_clip
from villa.models.region_encoder import RegionEncoder
from villa.preprocess import embed_regions


def sync(rt):
    if rt.is_cuda:
        torch.cuda.synchronize()


@torch.no_grad()
def per_image(encoder, ann, rt, n_images):
    """The original's loop: one image, its boxes, one forward pass, fp32."""
    out = []
    for i in range(n_images):
        img = read_image(ann.root / ann.filepath[i])[None].to(rt.device).float() / 255
        boxes, owner = boxes_of(ann, torch.tensor([i]))
        out.append(encoder(img, boxes.to(rt.device), owner.to(rt.device)).cpu())
    return torch.cat(out)


def main() -> None:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_preprocess",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="villa-tiny-rn")
    p.add_argument("--pretrained", default="none")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--data_dir", default=None, help="an existing DocMNIST folder (default: generate one)")
    a = p.parse_args()
    rt = get_runtime(a.device)
    data = a.data_dir or generate(
        a.images * 16, 16, out_dir=tempfile.mkdtemp(), val_budget=64, test_budget=64, progress=False
    )
    ann = load_annotations(data, load_vocab("docmnist"))
    n = min(a.images, ann.n_images)
    keep = np.arange(n)
    ann.image_id, ann.split, ann.filepath = ann.image_id[keep], ann.split[keep], ann.filepath[:n]
    ann.region_offsets = ann.region_offsets[: n + 1]
    n_regions = int(ann.region_offsets[-1])
    torch.manual_seed(0)
    clip = create_clip(a.model, a.pretrained, device=rt.device)
    encoder = RegionEncoder(clip.model.visual).to(rt.device).eval()
    if rt.is_cuda:
        encoder = encoder.to(memory_format=torch.channels_last)
    print(f"device={rt.device} amp={rt.amp_dtype} model={a.model} images={n} regions={n_regions}")
    # warm-up
    per_image(encoder, ann, rt, min(4, n))
    sync(rt)
    t0 = time.perf_counter()
    ref = per_image(encoder, ann, rt, n)
    sync(rt)
    t_single = time.perf_counter() - t0
    out = np.zeros((n_regions, clip.embed_dim), np.float32)
    embed_regions(encoder, ann, rt, out, a.batch_size, a.num_workers, progress=False)  # warm-up
    sync(rt)
    t0 = time.perf_counter()
    embed_regions(encoder, ann, rt, out, a.batch_size, a.num_workers, progress=False)
    sync(rt)
    t_batch = time.perf_counter() - t0
    cos = torch.nn.functional.cosine_similarity(ref.float(), torch.from_numpy(out)).min().item()
    print(f"per-image (batch 1): {n_regions / t_single:9.1f} regions/s  ({t_single:.2f}s)")
    print(f"batched ({a.batch_size:>4}):      {n_regions / t_batch:9.1f} regions/s  ({t_batch:.2f}s)")
    print(f"ratio: {t_single / t_batch:.1f}x   min cosine(batched, per-image) = {cos:.5f}")


if __name__ == "__main__":
    main()
