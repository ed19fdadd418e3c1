"""The region path's two rewritten operations against what they replace, forward and backward, interleaved.

    python -m benchmarks.bench_region_ops [--repeats 15] [--json docs/results/benchmarks/region_ops.json]

- ROI-Align: ``torchvision.ops.roi_align`` (sampling ratio 0, aligned) against villa's separable form
  (``villa.models.region_encoder.roi_align_separable``), on a Stage 2 step's shapes: 64 DocMNIST images' layer-3
  maps (256 x 6 x 6, the bench_original model) and 360 boxes at 14 x 14; and on RN50's (16 images, 1024 x 14 x 14,
  200 boxes).
- The attention pool: open_clip's ``AttentionPool2d`` (a query at every position) against villa's
  ``ClassTokenAttentionPool2d`` (the class token's query, key and value projections folded into it), on 360
  regions of 512 x 7 x 7 (bench_original's model) and 200 of RN50's 2048 x 7 x 7.

Each case times forward + backward (a fixed upstream gradient) of both sides alternately, ``--repeats`` times after
a warm-up; reported: medians, quartiles, and the ratio of the medians (old / new), with the largest difference of
the outputs.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time

import torch

from benchmarks.results import command_line, save


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def roi_case(b: int, c: int, size: int, image: int, k: int):
    from torchvision.ops import roi_align

    from villa.models.region_encoder import roi_align_separable

    g = torch.Generator().manual_seed(0)
    feat = torch.randn(b, c, size, size, generator=g, requires_grad=True)
    owner = torch.randint(0, b, (k,), generator=g)
    xy = torch.rand(k, 2, generator=g) * image * 0.7
    boxes = torch.cat([xy, xy + torch.rand(k, 2, generator=g) * image * 0.3 + 4], 1)
    rois = torch.cat([owner[:, None].float(), boxes], 1)
    scale = size / image
    up = torch.randn(k, c, 14, 14, generator=g)
    old = lambda: roi_align(feat, rois, 14, scale, 0, True)  # noqa: E731
    new = lambda: roi_align_separable(feat, boxes, owner, 14, scale)  # noqa: E731
    diff = float((old() - new()).detach().abs().max())
    return (lambda: (old() * up).sum().backward()), (lambda: (new() * up).sum().backward()), diff


def pool_case(n: int, c: int, heads: int, out: int):
    from open_clip.modified_resnet import AttentionPool2d

    from villa.models.region_encoder import ClassTokenAttentionPool2d

    torch.manual_seed(0)
    ref = AttentionPool2d(7, c, heads, out)
    ours = copy.deepcopy(ref)
    ours.__class__ = ClassTokenAttentionPool2d
    x = torch.randn(n, c, 7, 7, requires_grad=True)
    up = torch.randn(n, out)
    diff = float((ref(x) - ours(x)).detach().abs().max())
    return (lambda: (ref(x) * up).sum().backward()), (lambda: (ours(x) * up).sum().backward()), diff


CASES = {
    "roi_align, bench model (64 images, 256x6x6, 360 boxes)": lambda: roi_case(64, 256, 6, 84, 360),
    "roi_align, RN50 (16 images, 1024x14x14, 200 boxes)": lambda: roi_case(16, 1024, 14, 224, 200),
    "attention pool, bench model (360 regions, 512x7x7)": lambda: pool_case(360, 512, 8, 1024),
    "attention pool, RN50 (200 regions, 2048x7x7)": lambda: pool_case(200, 2048, 32, 1024),
}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_region_ops", description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    rows = {}
    for name, make in CASES.items():
        old, new, diff = make()
        old(), new()  # warm-up
        ts = {"old": [], "new": []}
        for _ in range(a.repeats):
            ts["old"].append(_time(old))
            ts["new"].append(_time(new))
        row = {"max_abs_output_difference": diff}
        for side, v in ts.items():
            q = statistics.quantiles(v, n=4)
            row[side] = {
                "median_ms": round(1000 * q[1], 2),
                "q1_ms": round(1000 * q[0], 2),
                "q3_ms": round(1000 * q[2], 2),
            }
        row["ratio"] = round(row["old"]["median_ms"] / row["new"]["median_ms"], 2)
        rows[name] = row
        print(
            f"{name}: old {row['old']['median_ms']:.1f} ms, villa {row['new']['median_ms']:.1f} ms, "
            f"{row['ratio']:.2f}x (max output difference {diff:.1e})",
            flush=True,
        )
    res = {
        "command": command_line("benchmarks.bench_region_ops", argv),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "threads": torch.get_num_threads()},
        "repeats": a.repeats,
        "cases": rows,
    }
    save(res, a.json)
    return res


if __name__ == "__main__":
    main()
