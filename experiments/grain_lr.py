"""Choose GRAIN's head learning rate on validation data, for the complexity sweep.

    python -m experiments.grain_lr --out docs/results/grain_lr

GRAIN's head (decoder, queries, box MLP, projections) starts from scratch while the image tower starts from the
pretrained encoder. On one sweep setting (target 15, seed 23, the sweep's budget and Stage 2 schedule), Stage 2
``objective=grain`` is trained with each candidate head learning rate and scored by its best validation loss (the val
split of that training set: no evaluation data is touched). Writes ``results.json`` with the choice.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from experiments.demo import ASSET
from experiments.pipeline import PipelineSettings, run_pipeline, stage2_overrides
from villa.core.config import compose_config
from villa.core.errors import exit_on_error
from villa.core.io import write_json_atomic
from villa.core.log import setup_logging
from villa.stage2.train import train_stage2


@exit_on_error
def main(argv=None) -> dict:
    setup_logging()
    p = argparse.ArgumentParser(
        prog="python -m experiments.grain_lr", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="outputs/grain_lr")
    p.add_argument("--work", default=None, help="datasets and checkpoints (default: --out)")
    p.add_argument("--target", type=int, default=15)
    p.add_argument("--seed", type=int, default=23)
    p.add_argument("--head_lrs", type=float, nargs="+", default=[2e-4, 1e-3, 3e-3])
    p.add_argument("--epochs", type=int, default=8, help="Stage 2's epoch cap (the sweep's)")
    p.add_argument("--patience", type=int, default=2, help="early stopping on the validation loss (the sweep's)")
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    out, work = Path(a.out), Path(a.work or a.out)
    # the complexity sweep's settings (experiments/complexity.py defaults)
    s = PipelineSettings(
        pretrained=str(ASSET),
        target=a.target,
        budget=6000,
        val_budget=3000,
        test_budget=200,
        seed=a.seed,
        stage2_epochs=a.epochs,
        stage2_batch=64,
        stage2_lr=2e-4,
        early_stop_patience=a.patience,
        device=a.device,
        progress=False,
    )
    base = run_pipeline(s, work / "pipeline", methods=(), zero_shot=False)  # data, embeddings, Stage 1's mapping
    data = Path(base["data"])
    runs = []
    for lr in a.head_lrs:
        over = stage2_overrides(s, data, work / "ckpt" / f"head_lr_{lr:g}", "grain", data / "mapping.feather")
        r = train_stage2(compose_config("stage2", over + [f"grain.queries={s.grain_queries}", f"grain.head_lr={lr}"]))
        runs.append(
            {
                "head_lr": lr,
                "best_val": r["best_val"],
                "epochs": r["epochs_run"],
                "val_loss": [h["val_loss"] for h in r["history"]],
            }
        )
        print(f"head_lr={lr:g}: best val loss {r['best_val']:.4f} ({r['epochs_run']} epochs)", flush=True)
    best = min(runs, key=lambda r: r["best_val"])
    res = {
        "command": "python -m experiments.grain_lr " + " ".join(sys.argv[1:] if argv is None else argv),
        "setting": {
            "target": a.target,
            "seed": a.seed,
            "budget": s.budget,
            "epochs_cap": s.stage2_epochs,
            "patience": s.early_stop_patience,
            "lr": s.stage2_lr,
            "batch": s.stage2_batch,
        },
        "criterion": "best validation loss of the GRAIN objective (the training set's val split)",
        "runs": runs,
        "chosen_head_lr": best["head_lr"],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json_atomic(out / "results.json", res)
    print(f"chosen: head_lr={best['head_lr']:g}; wrote {out / 'results.json'}")
    return res


if __name__ == "__main__":
    main()
