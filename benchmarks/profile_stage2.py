"""Where a Stage 2 training step's time goes: data (waiting for the loader), forward, backward, optimiser.

    python -m benchmarks.profile_stage2 experiment=docmnist_stage2 data_dir=D model.pretrained=CKPT [--steps 30]

Any Stage 2 override works (``num_workers=0``, ``precision=bf16``, ``objective=one_to_one``...). The run is set up
by the trainer itself (``villa.stage2.train.setup``: the same loader, model, objective and optimiser), then
``--steps`` training steps run after ``--warmup`` ones, each part timed apart (the device synchronised between
parts on CUDA). Printed: the median and the quartiles of each part in ms, its share of the step, and the
parts' sum against the step measured whole. ``--json`` writes them. Nothing is written to the checkpoint folder.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import torch

from benchmarks.results import command_line, save
from villa.core.errors import exit_on_error

PARTS = ("data", "forward", "backward", "optimizer")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile(overrides: list[str], steps: int, warmup: int) -> dict:
    from villa.core.config import compose_config
    from villa.core.distributed import init_distributed
    from villa.core.schemas import validate_config
    from villa.stage2.train import setup

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config("stage2", [*overrides, f"checkpoint_dir={tmp}", "resume=false", "progress=false"])
        validate_config(cfg, "stage2")
        run = setup(cfg, init_distributed(cfg.device))
        dev = run.ctx.runtime.device
        run.ddp.train()
        opts = list(run.stepper.optimizers.values())
        times: dict[str, list[float]] = {p: [] for p in (*PARTS, "step")}
        it, done = iter(run.train_loader), 0
        while done < warmup + steps:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                it = iter(run.train_loader)
                continue
            t1 = time.perf_counter()
            loss = run.objective.loss(run.ddp, batch, run.ctx, train=True)
            _sync(dev)
            t2 = time.perf_counter()
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            _sync(dev)
            t3 = time.perf_counter()
            for opt in opts:
                opt.step()
            _sync(dev)
            t4 = time.perf_counter()
            if done >= warmup:
                for name, dt in zip((*PARTS, "step"), (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                    times[name].append(dt * 1000)
            done += 1
        n_images = len(batch.rows)
        n_pairs = len(batch.pair_idx)
    total = statistics.median(times["step"])
    rows = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        rows[name] = {"median_ms": round(q[1], 2), "q1_ms": round(q[0], 2), "q3_ms": round(q[2], 2)}
        rows[name]["share"] = round(q[1] / total, 3)
    return {
        "overrides": overrides,
        "steps": steps,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
        "num_workers": int(cfg.num_workers),
        "precision": str(run.ctx.runtime.amp_dtype or "fp32").replace("torch.", ""),
        "device": str(dev),
        "batch_images": n_images,
        "batch_pairs": n_pairs,
        "parts": rows,
    }


def format_rows(res: dict) -> str:
    out = [f"{'part':<10} {'median ms':>10} {'q1':>8} {'q3':>8} {'share':>6}"]
    for name, r in res["parts"].items():
        out.append(f"{name:<10} {r['median_ms']:>10.1f} {r['q1_ms']:>8.1f} {r['q3_ms']:>8.1f} {r['share']:>6.0%}")
    return "\n".join(out) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.profile_stage2",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("overrides", nargs="*", help="Stage 2 overrides, as for python -m villa.stage2")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    res = profile(a.overrides, a.steps, a.warmup)
    res["command"] = command_line("benchmarks.profile_stage2", argv)
    res["machine"] = {"cpu_count": os.cpu_count(), "platform": platform.platform()}
    print(format_rows(res), end="")
    save(res, a.json)
    return res


if __name__ == "__main__":
    exit_on_error(main)()
