"""`make demo`: the main job on an embedded default, offline, on 2 CPU cores in about 4 minutes (2.5 of them the pipeline).

1. DocMNIST: target complexity 16 (the experiment).
2. The starting encoder: villa's small CLIP pretrained by villa's own ``pretrain`` mode on low-complexity
   DocMNIST (shipped as ``villa/assets/``, with the command that reproduces it in docs/pretrained.md), or
   ``--pretrain`` to run that pretraining here first.
3. Preprocess, Stage 1 (mapping F1 vs zero-shot), Stage 2 ViLLA and the one-to-one baseline, evaluation of
   zero-shot / baseline / ViLLA on the same held-out regions; a table and a PNG plot.

With a GPU and OpenAI's weights, the README's "Paper scale" commands run the paper-scale version.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

from experiments.pipeline import PipelineSettings, run_pipeline
from experiments.plots import retrieval_bars
from villa.core.env import SHIPPED_WEIGHTS
from villa.core.errors import VillaError, exit_on_error
from villa.core.io import write_text_atomic
from villa.core.log import setup_logging
from villa.data.vocab import load_vocab
from villa.evaluate.retrieval import format_markdown_table

log = logging.getLogger("villa.demo")
ASSET = SHIPPED_WEIGHTS["villa-small-rn-docmnist"]


def pretrain_small_clip(work: Path, epochs: Optional[int], progress: bool, device: str = "auto") -> Path:
    """The shipped checkpoint's recipe (docs/pretrained.md), run here."""
    from docmnist.generate_docmnist import generate
    from villa.core.config import compose_config
    from villa.stage2.train import train_stage2

    data = generate(
        30000,
        4,
        out_dir=str(work / "pretrain_data"),
        val_budget=2000,
        test_budget=2000,
        overwrite=True,
        progress=progress,
    )
    res = train_stage2(
        compose_config(
            "stage2",
            [
                "experiment=pretrain",
                f"data_dir={data}",
                f"checkpoint_dir={work / 'ckpt' / 'pretrain'}",
                "resume=false",
                f"progress={str(progress).lower()}",
                f"device={device}",
                *([f"epochs={epochs}"] if epochs else []),
            ],
        )
    )
    return Path(res["best_checkpoint"])


def demo_tables(res: dict) -> str:
    """The demo's two tables (Stage 1 mapping F1; retrieval), computed from its results.json alone."""
    vocab = load_vocab("docmnist")
    groups = list(vocab.groups)
    lines = [
        "| Stage 1 mapping, micro F1 % (all splits) | all | " + " | ".join(groups) + " |",
        "| --- | ---: | " + " | ".join(["---:"] * len(groups)) + " |",
    ]
    for name, label in (("stage1", "Stage 1"), ("zero_shot", "zero-shot mapping (same rule, no heads)")):
        q = res["mapping"][name]["all"]
        lines.append(
            f"| {label} | {100 * q['all']['f1']:.1f} | " + " | ".join(f"{100 * q[g]['f1']:.1f}" for g in groups) + " |"
        )
    n = {r["regions"] for r in res["retrieval"].values()}
    lines += [
        "",
        f"Retrieval on the {', '.join(map(str, sorted(n)))} held-out regions (test split), R-Precision %:",
        "",
    ]
    lines.append(format_markdown_table(res["retrieval"], vocab))
    return "\n".join(lines) + "\n"


@exit_on_error
def main(argv: Optional[Sequence[str]] = None) -> dict:
    setup_logging()
    p = argparse.ArgumentParser(prog="python -m experiments.demo", description="villa end-to-end demo (offline, CPU)")
    p.add_argument(
        "--out",
        default=os.environ.get("VILLA_DEMO_DIR", "outputs/demo"),
        help="where data, checkpoints, results.json, table.md and the plot go",
    )
    p.add_argument(
        "--pretrain", action="store_true", help="pretrain the starting encoder here instead of the shipped one"
    )
    p.add_argument("--pretrain_epochs", type=int, default=None, help="default: the recipe's (16)")
    p.add_argument("--pretrained", default=None, help="starting encoder checkpoint (default: the shipped one)")
    p.add_argument("--budget", type=int, default=15000, help="DocMNIST training budget (region-attribute pairs)")
    p.add_argument("--stage2_epochs", type=int, default=6, help="Stage 2 epoch cap (early stopping on val loss)")
    p.add_argument("--stage1_epochs", type=int, default=30, help="Stage 1 epochs")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--render",
        metavar="RESULTS_JSON",
        default=None,
        help="print the table this script writes for an existing results.json, and run nothing",
    )
    a = p.parse_args(argv)
    if a.render:
        print(demo_tables(json.loads(Path(a.render).read_text())), end="")
        return {}
    if a.pretrain_epochs is not None and a.pretrain_epochs < 1:
        raise VillaError(f"--pretrain_epochs={a.pretrain_epochs}: must be >= 1")
    PipelineSettings.demo(a.budget, a.stage1_epochs, a.stage2_epochs).check()  # before any work
    work = Path(a.out)
    if a.pretrain:
        start = pretrain_small_clip(work, a.pretrain_epochs, not a.quiet, a.device)
    else:
        start = Path(a.pretrained) if a.pretrained else ASSET
        if not start.is_file():
            raise VillaError(f"starting encoder {start} not found; run with --pretrain to make one")
    s = PipelineSettings.demo(
        a.budget, a.stage1_epochs, a.stage2_epochs, pretrained=str(start), device=a.device, progress=not a.quiet
    )
    res = run_pipeline(s, work)
    vocab = load_vocab("docmnist")
    plot = retrieval_bars(
        res["retrieval"], list(vocab.groups), work / "retrieval.png", "DocMNIST target 16: text-to-region retrieval"
    )
    table = demo_tables(res)
    write_text_atomic(work / "table.md", table)
    from villa.core.config import compose_config
    from villa.inspect import inspect_dataset

    report = inspect_dataset(
        compose_config("inspect", [f"data_dir={res['data']}", "split=val", "limit=20", f"out={work / 'inspect.html'}"])
    )
    print("\n" + table)
    print(f"\nartefacts under {work}/:")
    print(f"  data + embeddings + mapping.feather: {res['data']}")
    print(f"  checkpoints: {work / 'ckpt'} (stage1, villa, baseline)")
    print(f"  results: {work / 'results.json'}   tables: {work / 'table.md'}   plot: {plot}")
    print(f"  inspection report (20 val images: extraction and mapping): {report['out']}")
    print(f"  timings (s): {json.dumps(res['timings'])}  total {res['seconds']}s")
    return res


if __name__ == "__main__":
    main()
