"""Stage 1's sparse backward against the full one (the original's), side by side: epoch time and the mapping.

    python -m benchmarks.bench_stage1_backward [--epochs 6] [--repeats 2] [--json docs/results/benchmarks/stage1_backward.json]

The bench_original settings: DocMNIST at train budget 15,000, target 16, val budget 10,000 (seed 23), region and
attribute embeddings of D = 1024 (villa.data.synthetic: each region's embedding carries its attributes), 20 heads,
batch 48, AdamW 1e-4, 6 epochs, validation and checkpoints every epoch as the original's cadence would have them
(``val_every=1 checkpoint_every=1``) and at villa's defaults (5). Runs alternate ``sparse_backward=false`` /
``true``, ``--repeats`` times each. Reported: each run's median epoch (2nd epoch on), the ratio of the medians,
and, between the two backward modes, the (region, attribute) decisions of the mapping that differ (with the same
seed, data and settings: what float rounding through training changes) out of all decisions the rule makes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.results import command_line, save


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_stage1_backward", description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    from docmnist.generate_docmnist import generate
    from villa.core.config import compose_config
    from villa.data.annotations import load_annotations
    from villa.data.synthetic import write_synthetic_embeddings
    from villa.data.vocab import load_vocab
    from villa.stage1.mapping import read_assigned
    from villa.stage1.train import train_stage1

    vocab = load_vocab("docmnist")
    runs: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = generate(15000, 16, seed=23, out_dir=str(work), val_budget=10000, test_budget=16, progress=False)
        ann = load_annotations(data, vocab, check_images=False)
        emb = write_synthetic_embeddings(ann, vocab, work / "emb", dim=1024, seed=0)
        decisions = int(ann.attribute_matrix(len(vocab))[np.repeat(np.arange(ann.n_images), ann.n_regions)].sum())
        maps = {}
        for cadence in ("1", "5"):
            for rep in range(a.repeats):
                for sparse in ("false", "true"):
                    name = f"sparse_backward={sparse} every={cadence}"
                    out = work / f"{sparse}_{cadence}_{rep}"
                    cfg = compose_config(
                        "stage1",
                        [
                            f"data_dir={data}",
                            f"embeddings_dir={emb}",
                            f"checkpoint_dir={out}",
                            f"mapping_path={out / 'mapping.feather'}",
                            f"epochs={a.epochs}",
                            "lr=1e-4",
                            "device=cpu",
                            "precision=fp32",
                            "progress=false",
                            "resume=false",
                            f"sparse_backward={sparse}",
                            f"val_every={cadence}",
                            f"checkpoint_every={cadence}",
                        ],
                    )
                    t0 = time.perf_counter()
                    train_stage1(cfg)
                    secs = time.perf_counter() - t0
                    epochs = [json.loads(x)["seconds"] for x in (out / "metrics.jsonl").read_text().splitlines()]
                    runs.setdefault(name, []).append({"seconds": round(secs, 2), "epoch_seconds": epochs})
                    maps[sparse] = read_assigned(out / "mapping.feather", vocab)
                    print(f"{name} repeat {rep + 1}: {secs:.1f} s, epochs {epochs}", flush=True)
    summary = {}
    for name, rs in runs.items():
        med = statistics.median(e for r in rs for e in r["epoch_seconds"][1:])
        summary[name] = {"median_epoch_seconds": round(med, 2), "runs": [r["seconds"] for r in rs]}
    for cadence in ("1", "5"):
        full = summary[f"sparse_backward=false every={cadence}"]["median_epoch_seconds"]
        sparse = summary[f"sparse_backward=true every={cadence}"]["median_epoch_seconds"]
        summary[f"ratio every={cadence}"] = round(full / sparse, 2)
    summary["ratio full every=1 / sparse every=5"] = round(
        summary["sparse_backward=false every=1"]["median_epoch_seconds"]
        / summary["sparse_backward=true every=5"]["median_epoch_seconds"],
        2,
    )
    res = {
        "command": command_line("benchmarks.bench_stage1_backward", argv),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "epochs": a.epochs,
        "repeats": a.repeats,
        "runs": runs,
        "summary": summary,
        "mapping": {"decisions": decisions, "differing": int((maps["false"] != maps["true"]).sum())},
    }
    print(json.dumps({"summary": summary, "mapping": res["mapping"]}, indent=1))
    save(res, a.json)
    return res


if __name__ == "__main__":
    main()
