"""How time and memory grow with data: preprocessing, Stage 1 and Stage 2 at 1x, 4x and 16x the demo's budget.

    python -m benchmarks.cost_growth [--scales 1 4 16] [--json docs/results/benchmarks/cost_growth.json]

The demo's settings (DocMNIST at target complexity 16, train budget 15,000 region-attribute pairs per 1x, val and
test a fifth of it; the shipped small CLIP at 168 pixels; Stage 1 lr 1e-3; Stage 2 batch 64, lr 2e-4), each step
run as its own process (``python -m preprocess``, ``villa.stage1``, ``villa.stage2``), as a user runs them. Per
step and size: wall seconds of the process, seconds per epoch (Stage 1: ``--stage1_epochs`` epochs; Stage 2: one
epoch, train and val), and peak resident memory of the process and of its process tree (sampled every 0.1 s, as
benchmarks/bench_original.py does). The table adds, per step, the growth from the smallest to the largest size
against the growth of the data (1.0: linear).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.bench_original import cpu_info, run_timed
from benchmarks.results import command_line, save

DEMO_BUDGET = 15000
STEPS = ("preprocess", "stage1", "stage2")


def _epochs(lines: list, pattern: str) -> list[float]:
    ends = [t for t, ln in lines if re.search(pattern, ln)]
    return [b - a for a, b in zip(ends, ends[1:])] or ([ends[0]] if ends else [])


def measure(scale: int, work: Path, stage1_epochs: int, env: dict) -> dict:
    from docmnist.generate_docmnist import generate
    from villa.core.env import SHIPPED_WEIGHTS

    budget = DEMO_BUDGET * scale
    data = generate(
        budget,
        16,
        seed=23,
        out_dir=str(work / f"x{scale}"),
        val_budget=budget // 5,
        test_budget=budget // 5,
        progress=False,
        overwrite=True,
    )
    import pandas as pd

    ann = pd.read_feather(data / "annotations.feather", columns=["split", "num_regions"])
    out = {
        "scale": scale,
        "budget": budget,
        "images": {s: int((ann.split == s).sum()) for s in ("train", "val", "test")},
        "regions": int(ann.num_regions.sum()),
    }
    weights = str(SHIPPED_WEIGHTS["villa-small-rn-docmnist"])
    py = sys.executable
    cmds = {
        "preprocess": [
            py,
            "-m",
            "preprocess",
            f"data_dir={data}",
            "model.name=auto",
            f"model.pretrained={weights}",
            "model.input_size=168",
            "progress=false",
            f"hydra.run.dir={work / 'h'}",
        ],
        "stage1": [
            py,
            "-m",
            "villa.stage1",
            f"data_dir={data}",
            f"epochs={stage1_epochs}",
            "lr=1e-3",
            "progress=false",
            f"checkpoint_dir={work / f'x{scale}' / 'ck1'}",
            "resume=false",
            f"hydra.run.dir={work / 'h'}",
        ],
        "stage2": [
            py,
            "-m",
            "villa.stage2",
            f"data_dir={data}",
            "epochs=2",
            "batch_size=64",
            "lr=2e-4",
            "model.name=auto",
            f"model.pretrained={weights}",
            "model.input_size=168",
            "progress=false",
            "resume=false",
            f"checkpoint_dir={work / f'x{scale}' / 'ck2'}",
            f"hydra.run.dir={work / 'h'}",
        ],
    }
    patterns = {"stage1": r"epoch \d+/\d+ ", "stage2": r"epoch \d+/\d+ .*val_loss="}
    for step in STEPS:
        secs, lines, mem = run_timed(cmds[step], work, env, work / f"{step}_x{scale}.log")
        out[step] = {"seconds": round(secs, 1), **mem}
        if step in patterns:
            ep = _epochs(lines, patterns[step])
            out[step]["epoch_seconds"] = round(statistics.median(ep), 2) if ep else None
        print(f"x{scale} {step}: {secs:.1f} s, peak {mem['peak_rss_mb']:.0f} MB", flush=True)
    return out


def growth(rows: list, step: str, key: str) -> float | None:
    a, b = rows[0], rows[-1]
    if not a[step].get(key) or not b[step].get(key):
        return None
    return round((b[step][key] / a[step][key]) / (b["budget"] / a["budget"]), 2)


def format_table(res: dict) -> str:
    rows = res["rows"]
    lines = [
        "| size | train images | regions | preprocess s | peak MB | Stage 1 s/epoch | peak MB | Stage 2 s/epoch | peak MB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['scale']}x ({r['budget']:,} pairs) | {r['images']['train']:,} | {r['regions']:,} | "
            f"{r['preprocess']['seconds']:.0f} | {r['preprocess']['peak_tree_rss_mb']:.0f} | "
            f"{r['stage1']['epoch_seconds']:.1f} | {r['stage1']['peak_tree_rss_mb']:.0f} | "
            f"{r['stage2']['epoch_seconds']:.1f} | {r['stage2']['peak_tree_rss_mb']:.0f} |"
        )
    cells = []
    for step, key in (("preprocess", "seconds"), ("stage1", "epoch_seconds"), ("stage2", "epoch_seconds")):
        g, m = growth(rows, step, key), growth(rows, step, "peak_tree_rss_mb")
        cells.append(f"{step}: time x{g}, memory x{m}")
    lines += [
        "",
        f"Growth from {rows[0]['scale']}x to {rows[-1]['scale']}x over the data's growth (1.0: linear): "
        + "; ".join(cells),
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cost_growth", description=__doc__.split("\n")[0])
    p.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--stage1_epochs", type=int, default=3)
    p.add_argument("--work", default="outputs/cost_growth")
    p.add_argument("--json", default=None)
    p.add_argument("--render", default=None, metavar="RESULTS_JSON", help="print the table of a results file")
    a = p.parse_args(argv)
    if a.render:
        import json

        print(format_table(json.loads(Path(a.render).read_text())), end="")
        return {}
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    rows = [measure(s, work, a.stage1_epochs, env) for s in sorted(a.scales)]
    res = {
        "command": command_line("benchmarks.cost_growth", argv),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpu": cpu_info(), "platform": platform.platform()},
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(format_table(res), end="")
    save(res, a.json)
    return res


if __name__ == "__main__":
    main()
