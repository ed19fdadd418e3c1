"""How much storing region embeddings as float16 (villa's default) instead of float32 (the original's) changes Stage 1.

    python -m benchmarks.dtype_flips [--budget 6000] [--epochs 10] [--json docs/results/benchmarks/dtype_flips.json]

One DocMNIST (target complexity 16, seed 23) is preprocessed twice with the shipped small CLIP, ``dtype=float16``
and ``dtype=float32``; Stage 1 trains on each with the same seed and settings; both are mapped at the default
epsilon (0.2) and at 2e-4, where a region's score must be within 0.0002 of its image's best to get the attribute.
Reported: the embeddings' largest difference, and per epsilon the (region, attribute) decisions that differ
between the two runs out of all decisions the rule makes (every region against every attribute its caption
names), with both runs' mapping F1 against the true pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.results import command_line, save


def run(budget: int, epochs: int, work: Path) -> dict:
    from docmnist.generate_docmnist import generate
    from villa.core.config import compose_config
    from villa.core.env import SHIPPED_WEIGHTS
    from villa.data.annotations import load_annotations
    from villa.data.embeddings import open_embeddings
    from villa.data.vocab import load_vocab
    from villa.preprocess import embed_dataset
    from villa.stage1.mapping import read_assigned
    from villa.stage1.train import train_stage1

    vocab = load_vocab("docmnist")
    data = generate(
        budget, 16, seed=23, out_dir=str(work), val_budget=budget // 5, test_budget=budget // 5, progress=False
    )
    ann = load_annotations(data, vocab, check_images=False)
    caption_pairs = int(ann.attribute_matrix(len(vocab))[np.repeat(np.arange(ann.n_images), ann.n_regions)].sum())
    out: dict = {"images": ann.n_images, "regions": int(len(ann.boxes)), "decisions": caption_pairs, "epsilon": {}}
    emb, maps = {}, {}
    for dtype in ("float16", "float32"):
        e = embed_dataset(
            data,
            model="auto",
            pretrained=str(SHIPPED_WEIGHTS["villa-small-rn-docmnist"]),
            dtype=dtype,
            input_size=168,
            out_dir=work / f"emb_{dtype}",
            required_splits=("train", "val"),
            progress=False,
            num_workers=0,
            device="cpu",
        )
        emb[dtype] = np.asarray(open_embeddings(e, vocab).regions, dtype=np.float32)
        for eps in (0.2, 2e-4):
            over = [
                f"data_dir={data}",
                f"embeddings_dir={e}",
                f"checkpoint_dir={work / f'ck_{dtype}'}",
                f"mapping_path={work / f'map_{dtype}_{eps}.feather'}",
                f"epochs={epochs}",
                f"epsilon={eps}",
                "device=cpu",
                "progress=false",
            ]
            res = train_stage1(compose_config("stage1", over))  # the second epsilon re-maps the trained heads
            maps[(dtype, eps)] = (read_assigned(work / f"map_{dtype}_{eps}.feather", vocab), res["quality"])
    out["max_abs_embedding_difference"] = float(np.abs(emb["float16"] - emb["float32"]).max())
    for eps in (0.2, 2e-4):
        (a, qa), (b, qb) = maps[("float16", eps)], maps[("float32", eps)]
        out["epsilon"][str(eps)] = {
            "differing_decisions": int((a != b).sum()),
            "f1_float16": round(100 * qa["stage1"]["all"]["all"]["f1"], 2),
            "f1_float32": round(100 * qb["stage1"]["all"]["all"]["f1"], 2),
        }
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dtype_flips", description=__doc__.split("\n")[0])
    p.add_argument("--budget", type=int, default=6000)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        res = run(a.budget, a.epochs, Path(tmp))
    res["command"] = command_line("benchmarks.dtype_flips", argv)
    res["machine"] = {"cpu_count": os.cpu_count()}
    print(json.dumps(res, indent=1))
    save(res, a.json)
    return res


if __name__ == "__main__":
    main()
