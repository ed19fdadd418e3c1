"""What region sources cost on a user's own data: DocMNIST exported as plain images plus free-text captions (no
boxes, no attribute lists), imported back with each region source, then the demo's pipeline.

    python -m experiments.own_data --out docs/results/own_data --work outputs/own_data

For each region source (``given``: the exported boxes; ``grid`` 3x3; ``grid`` 1x1 + 2x2 + 3x3; ``proposals``:
the RPN of a villa-tiny-frcnn trained on the training split's boxes, top 20): import with
``python -m villa.data.importers.generic`` (attributes found in the captions by the extractor), preprocess, Stage 1,
Stage 2 (ViLLA) from the demo's starting encoder and settings. Scored against DocMNIST's ground truth, which
nothing trains on: Stage 1's mapping F1 on the training split (each region labelled by the ground-truth box it
overlaps at IoU >= 0.5; regions without one count their assignments as false), text-to-region and region-to-text
R-Precision on the ground-truth regions of the held-out test split, and image-text Recall@1 there.
One seed (23); the one-to-one baseline (regions play no part in it) trained once for reference.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from experiments.demo import ASSET
from experiments.pipeline import PipelineSettings, stage2_overrides
from villa.core.config import compose_config
from villa.core.errors import exit_on_error
from villa.core.io import write_json_atomic, write_text_atomic
from villa.core.log import setup_logging
from villa.core.runtime import get_runtime
from villa.data.annotations import load_annotations
from villa.data.importers.docmnist_plain import export_plain
from villa.data.importers.generic import import_generic
from villa.data.regions import RegionSpec, attach_reference_labels
from villa.data.vocab import load_vocab
from villa.evaluate.retrieval import evaluate_model, region_options
from villa.models.clip import create_clip
from villa.models.detector import train_detector
from villa.preprocess import embed_dataset
from villa.stage1.train import train_stage1
from villa.stage2.train import train_stage2

VARIANTS = {
    "given": RegionSpec("given"),
    "grid 3x3": RegionSpec("grid", grid=[3]),
    "grid 1+2+3": RegionSpec("grid", grid=[1, 2, 3]),
    "proposals (RPN top 20)": RegionSpec("proposals", proposal_kind="rpn", top_k=20, nms=0.7),
}


def table_md(res: dict) -> str:
    lines = [
        "| regions | per image | recall@0.5 | mapping F1 Stage 1 (train) | mapping F1 zero-shot (train) | "
        "T2R R-Prec | R2T R-Prec | I2T R@1 | T2I R@1 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in res["variants"].items():
        q, ev = r["mapping"], r["retrieval"]
        lines.append(
            f"| {name} | {r['regions_per_image']:.1f} | {100 * r['recall_at_0.5']:.1f} | "
            f"{100 * q['stage1']['train']['all']['f1']:.1f} | {100 * q['zero_shot']['train']['all']['f1']:.1f} | "
            f"{100 * ev['text_to_region']['r_precision']:.1f} | {100 * ev['region_to_text']['r_precision']:.1f} | "
            f"{100 * ev['image_text']['image_to_text']['R@1']:.1f} | {100 * ev['image_text']['text_to_image']['R@1']:.1f} |"
        )
    for name, ev in res["reference"].items():
        lines.append(
            f"| ({name}) | | | | | {100 * ev['text_to_region']['r_precision']:.1f} | "
            f"{100 * ev['region_to_text']['r_precision']:.1f} | {100 * ev['image_text']['image_to_text']['R@1']:.1f} | "
            f"{100 * ev['image_text']['text_to_image']['R@1']:.1f} |"
        )
    return "\n".join(lines) + "\n"


@exit_on_error
def main(argv=None) -> dict:
    setup_logging()
    p = argparse.ArgumentParser(
        prog="python -m experiments.own_data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="outputs/own_data", help="results.json and table.md")
    p.add_argument("--work", default=None, help="datasets and checkpoints (default: --out)")
    p.add_argument("--budget", type=int, default=15000, help="DocMNIST training budget (the demo's)")
    p.add_argument("--detector_epochs", type=int, default=8, help="epochs of the proposal model")
    p.add_argument("--stage1_epochs", type=int, default=30, help="Stage 1 epochs (the demo's)")
    p.add_argument("--stage2_epochs", type=int, default=6, help="Stage 2 epoch cap (the demo's)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--render",
        metavar="RESULTS_JSON",
        default=None,
        help="print the table this script writes for an existing results.json, and run nothing",
    )
    a = p.parse_args(argv)
    if a.render:
        print(table_md(json.loads(Path(a.render).read_text())), end="")
        return {}
    t0 = time.perf_counter()
    out, work = Path(a.out), Path(a.work or a.out)
    s = PipelineSettings.demo(
        a.budget, a.stage1_epochs, a.stage2_epochs, pretrained=str(ASSET), device=a.device, progress=not a.quiet
    )
    vocab = load_vocab("docmnist")
    gt = s.generate(work / "docmnist")
    plain = export_plain(gt, work / "plain", overwrite=True, with_boxes=True)
    t = time.perf_counter()
    det = train_detector(
        gt, work / "detector.pt", epochs=a.detector_epochs, lr=0.02, seed=s.seed, progress=s.progress, optimizer="sgd"
    )
    detector_seconds = round(time.perf_counter() - t, 1)
    runtime = get_runtime(s.device)
    test = load_annotations(gt, vocab, required_splits=("test",))
    res = {
        "command": "python -m experiments.own_data " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": vars(a) | {"seed": s.seed, "target": s.target, "starting_encoder": ASSET.name},
        "detector_seconds": detector_seconds,
        "variants": {},
        "reference": {},
    }

    def evaluate(ckpt: str) -> dict:
        clip = create_clip(s.model, ckpt, device=runtime.device)
        return evaluate_model(
            clip,
            test,
            vocab,
            "test",
            runtime,
            region_options(clip.pretrained, None, s.input_size),
            num_workers=s.num_workers,
            image_text=True,
        )

    for name, spec in VARIANTS.items():
        t = time.perf_counter()
        slug = name.split(" ")[0] + ("" if name == "given" else "_" + "".join(c for c in name if c.isdigit()))
        if spec.source == "proposals":
            spec.detector_weights = str(det)
        data = import_generic(
            plain,
            plain / "captions.jsonl",
            vocab,
            spec,
            work / "imported" / slug,
            no_attribute="error",
            progress=s.progress,
        )
        labels = attach_reference_labels(data, gt, vocab)
        emb = embed_dataset(
            data,
            "docmnist",
            model=s.model,
            pretrained=s.pretrained,
            device=s.device,
            num_workers=s.num_workers,
            input_size=s.input_size,
            progress=s.progress,
        )
        s1 = train_stage1(
            compose_config(
                "stage1",
                [
                    f"data_dir={data}",
                    f"embeddings_dir={emb}",
                    f"mapping_path={data / 'mapping.feather'}",
                    f"checkpoint_dir={work / 'ckpt' / slug / 'stage1'}",
                    "resume=false",
                    f"epochs={s.stage1_epochs}",
                    f"lr={s.stage1_lr}",
                    f"device={s.device}",
                    f"seed={s.seed}",
                    f"progress={str(s.progress).lower()}",
                ],
            )
        )
        r2 = train_stage2(
            compose_config(
                "stage2", stage2_overrides(s, data, work / "ckpt" / slug / "villa", "villa", data / "mapping.feather")
            )
        )
        res["variants"][name] = {
            **labels,
            "mapping": s1["quality"],
            "degeneracy": s1["degeneracy"],
            "stage2": {"best_val": r2["best_val"], "epochs": r2["epochs_run"]},
            "retrieval": evaluate(r2["best_checkpoint"]),
            "seconds": round(time.perf_counter() - t, 1),
        }
        print(f"[{name}] done in {time.perf_counter() - t:.0f}s", flush=True)
    base = train_stage2(
        compose_config("stage2", stage2_overrides(s, gt, work / "ckpt" / "baseline", "one_to_one", None))
    )
    res["reference"]["one-to-one baseline"] = evaluate(base["best_checkpoint"])
    res["reference"]["zero-shot"] = evaluate(s.pretrained)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    write_json_atomic(out / "results.json", res)
    write_text_atomic(out / "table.md", table_md(res))
    print(table_md(res))
    return res


if __name__ == "__main__":
    main()
