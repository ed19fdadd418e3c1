"""Stage 2 training throughput on the region path: steps/s, regions/s, achieved FLOP/s against the device peak.

    python -m benchmarks.bench_stage2 --model villa-tiny-rn --batch_size 256            # CPU
    python -m benchmarks.bench_stage2 --model RN50 --batch_size 256 --device cuda       # GPU: AMP on/off, channels_last

Each option is one row: ``sync`` reads the loss on the host every step (``loss.item()`` and a finite check, the
loop before the non-finite guard) against the trainer's loop, which checks it every ``log_every`` steps
(villa.core.engine.FiniteGuard); ``compile`` wraps the region path with torch.compile (the first steps, which compile, are warm-up).

A batch is B DocMNIST-sized 84x84 images with 5.6 region-text pairs each (4.6 regions + the whole image, as in
budget 30000 / target 16), through the full step: region path forward, InfoNCE against frozen text embeddings,
backward, Adam step. FLOPs of one step are counted with torch.utils.flop_counter.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from villa.core.engine import FiniteGuard
from villa.core.runtime import get_runtime
from villa.models.clip import create_clip
from villa.models.region_encoder import RegionEncoder
from villa.stage2.objectives.base import infonce

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def peak_for(name: str) -> float | None:
    for k, v in PEAK_BF16_TFLOPS.items():
        if k in name:
            return v
    return None


def make_batch(b: int, rt, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 3, 84, 84, generator=g)
    n = torch.randint(3, 7, (b,), generator=g)  # regions per image, mean ~4.6 incl. variation
    owner = torch.repeat_interleave(torch.arange(b), n)
    cells = torch.randint(0, 9, (len(owner),), generator=g)
    x0, y0 = (cells % 3) * 28.0, (cells // 3) * 28.0
    boxes = torch.stack([x0, y0, x0 + 28, y0 + 28], 1)
    boxes = torch.cat([boxes, torch.tensor([[0, 0, 83, 83.0]]).expand(b, 4)])
    owner = torch.cat([owner, torch.arange(b)])
    return images.to(rt.device), boxes.to(rt.device), owner.to(rt.device)


def run(model_name: str, b: int, rt, channels_last: bool, steps: int, warmup: int, sync: bool, compile: bool) -> dict:
    torch.manual_seed(0)
    clip = create_clip(model_name, None, device=rt.device)
    enc = RegionEncoder(clip.model.visual).to(rt.device).train()
    if channels_last:
        enc = enc.to(memory_format=torch.channels_last)
    images, boxes, owner = make_batch(b, rt)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    text = F.normalize(torch.randn(len(boxes), clip.embed_dim, device=rt.device), dim=-1)
    opt = torch.optim.Adam(enc.parameters(), lr=5e-5, weight_decay=0.2)
    guard = FiniteGuard(1 if sync else 50, 1, None)  # sync: a host read and finite check every step

    def step(i: int):
        with rt.autocast():
            z = enc(images, boxes, owner)
        loss = infonce(F.normalize(z.float(), dim=-1), text)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        guard.add(loss, i)

    with FlopCounterMode(display=False) as fc:
        step(0)
    flops = fc.get_total_flops()
    if compile:
        enc.compile(dynamic=True)
    for i in range(warmup):
        step(i)
    guard.flush()
    if rt.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    guard.flush()
    if rt.is_cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    mem = torch.cuda.max_memory_allocated() / 2**30 if rt.is_cuda else float("nan")
    return {
        "step_s": dt,
        "steps_per_s": 1 / dt,
        "regions_per_s": len(boxes) / dt,
        "tflops": flops / dt / 1e12,
        "gflop_step": flops / 1e9,
        "mem_gib": mem,
        "regions": len(boxes),
    }


def main() -> None:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_stage2",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", nargs="+", default=["villa-tiny-rn"])
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile_warmup", type=int, default=2, help="extra warm-up steps for the compiled row")
    p.add_argument("--no_compile", action="store_true", help="leave out the torch.compile row")
    a = p.parse_args()
    base = get_runtime(a.device, "fp32")
    name = torch.cuda.get_device_name() if base.is_cuda else "cpu"
    peak = peak_for(name) if base.is_cuda else None
    print(f"device: {name}  peak bf16 dense: {peak or 'n/a'} TFLOP/s  batch: {a.batch_size} images")
    print(
        f"{'model':<14} {'amp':<5} {'ch_last':<7} {'sync':<5} {'compile':<7} {'regions':>7} {'GFLOP/step':>10} {'steps/s':>8} {'regions/s':>10} {'TFLOP/s':>8} {'% peak':>7} {'mem GiB':>8}"
    )
    # (amp, channels_last, sync every step, compile)
    configs = [(False, False, True, False), (False, False, False, False)]
    if base.is_cuda:
        configs += [(True, False, True, False), (True, False, False, False), (True, True, False, False)]
    if not a.no_compile:
        configs.append((base.is_cuda, base.is_cuda, False, True))
    for m in a.model:
        for amp, cl, sync, comp in configs:
            rt = get_runtime(a.device, "auto" if amp else "fp32")
            r = run(m, a.batch_size, rt, cl, a.steps, a.warmup + (a.compile_warmup if comp else 0), sync, comp)
            pct = f"{100 * r['tflops'] / peak:.1f}" if peak else "n/a"
            dtype = str(rt.amp_dtype).replace("torch.", "") if amp else "fp32"
            print(
                f"{m:<14} {dtype:<5} {str(cl):<7} {str(sync):<5} {str(comp):<7} {r['regions']:>7} {r['gflop_step']:>10.1f} "
                f"{r['steps_per_s']:>8.3f} {r['regions_per_s']:>10.0f} {r['tflops']:>8.3f} {pct:>7} {r['mem_gib']:>8.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
