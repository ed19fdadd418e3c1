"""The offline analogue of the paper's zero-shot detection (COCO AP50, base / novel), measured on DocMNIST.

    python -m experiments.detection --out docs/results/detection --work outputs/detection --quiet   # ~45 min, 2 cores
    python -m experiments.detection --targets 5 --seeds 1 --budget 2000 --out outputs/det_quick      # a quick look

The protocol (docs/evaluation.md, "The offline analogue"):
- categories: the ten digits (each DocMNIST region holds one digit, the analogue of a COCO object; colour, shape and
  size are its attributes); split 7 base / 3 novel by a rule fixed before any number was seen
  (configs/splits/docmnist_digits_7_3.yaml: the last three digits are novel);
- ground truth: the complexity experiment's held-out evaluation set (the test split of one target-16 DocMNIST from
  MNIST's test digits, ``--eval_seed``), exported to COCO format (villa.data.importers.docmnist_coco);
- models, per seed and per complexity (the lowest and the highest of the complexity experiment by default): the
  starting encoder (zero-shot), the one-to-one baseline and ViLLA, trained exactly as experiments/complexity.py
  trains them (its settings and its pipeline);
- regions: the ground-truth boxes (the "GT boxes" setting) and proposals (the "RPN" setting) from a
  ``villa-tiny-frcnn`` trained per seed on the base digits' boxes of that seed's lowest-complexity training split
  only (novel digits and shapes are background to it: the open-vocabulary protocol), top ``--top_k`` per image with
  their objectness;
- scoring: villa.evaluate.detection (class prompts: the digit group's templates of the dataset config; softmax at
  temperature 0.01; objectness multiplied in the RPN setting; per-class NMS 0.5; 100 per image) and pycocotools'
  COCOeval: AP50 on all, base and novel digits. Nothing is tuned: every setting above is the module's default or
  was fixed before the first run.

Writes ``results.json``, ``table.md`` (computed from results.json by :func:`format_table`) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from experiments.complexity import _cores, _ms, evaluation_set, pipeline_settings
from experiments.demo import ASSET
from experiments.pipeline import run_pipeline
from villa.core.env import config_dir
from villa.core.errors import VillaError, exit_on_error
from villa.core.io import write_json_atomic, write_text_atomic
from villa.core.log import setup_logging

MODELS = ("zero-shot", "baseline", "villa")
NAMES = {"zero-shot": "zero-shot", "baseline": "baseline", "villa": "ViLLA"}
SETTINGS = {"gt": "GT boxes", "proposals": "RPN proposals"}
GROUPS = ("novel", "base", "all")
SPLIT = "docmnist_digits_7_3"


def split_groups() -> dict[str, list[str]]:
    import yaml

    return yaml.safe_load((config_dir() / "splits" / f"{SPLIT}.yaml").read_text())["groups"]


def digit_templates() -> list[str]:
    from villa.data.vocab import load_vocab

    vocab = load_vocab("docmnist")
    return list(vocab.templates[vocab.groups.index("digit")])


def proposals_for(detector: Path, gt_path: Path, images: Path, top_k: int, out: Path) -> dict[str, Any]:
    """The detector's top-K RPN proposals for every ground-truth image, as a COCO results file, and their recall
    at IoU 0.5 of the base and the novel digits' boxes."""
    from villa.data.regions import RegionSpec, detector_proposals, recall_at_iou
    from villa.evaluate.detection import load_gt

    gt = load_gt(gt_path)
    ids = sorted(gt.getImgIds())
    imgs = gt.loadImgs(ids)
    sizes = np.array([[im["width"], im["height"]] for im in imgs], np.int64)
    spec = RegionSpec(source="proposals", detector_weights=str(detector), top_k=top_k)
    off, boxes, scores, _ = detector_proposals(images, [im["file_name"] for im in imgs], sizes, spec, progress=False)
    rows = []
    for i, img in enumerate(ids):
        for b, s in zip(boxes[off[i] : off[i + 1]], scores[off[i] : off[i + 1]]):
            rows.append(
                {
                    "image_id": int(img),
                    "category_id": 1,
                    "score": float(s),
                    "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                }
            )
    write_json_atomic(out, rows)
    by_name = {c["name"]: c["id"] for c in gt.loadCats(gt.getCatIds())}
    recall = {}
    for g, names in split_groups().items():
        cat = {by_name[n] for n in names}
        ref = [[a["bbox"] for a in gt.imgToAnns.get(i, []) if a["category_id"] in cat] for i in ids]
        ref_off = np.concatenate([[0], np.cumsum([len(r) for r in ref])])
        xywh = np.array([b for r in ref for b in r], np.float32).reshape(-1, 4)
        ref_boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
        recall[g] = recall_at_iou(off, boxes, ref_off, ref_boxes, 0.5)
    return {"file": str(out), "per_image": float(np.diff(off).mean()), "recall_at_0.5": recall}


def detect_all(pretrained: str, gt_path: Path, images: Path, proposals: str, device: str) -> dict[str, Any]:
    from villa.core.runtime import get_runtime
    from villa.evaluate.detection import zero_shot_detection
    from villa.evaluate.retrieval import region_options
    from villa.models.clip import create_clip

    runtime = get_runtime(device)
    clip = create_clip("auto", pretrained, device=runtime.device)
    opts = region_options(clip.pretrained, None, None)
    out = {}
    for setting in SETTINGS:
        res = zero_shot_detection(
            clip,
            opts,
            runtime,
            gt_path,
            images,
            regions=setting,
            proposals_file=proposals if setting == "proposals" else None,
            split=SPLIT,
            templates=digit_templates(),
            num_workers=0,
        )
        out[setting] = {g: res[g]["AP50"] for g in GROUPS} | {
            "AP": res["all"]["AP"],
            "boxes": res["boxes"],
            "per_category_AP50": res["per_category_AP50"],
        }
    return out


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for t in sorted({r["target"] for r in runs}):
        rs = [r for r in runs if r["target"] == t]
        row: dict[str, Any] = {
            "target": t,
            "seeds": [r["seed"] for r in rs],
            "complexity": _ms([r["complexity"] for r in rs]),
        }
        for s in SETTINGS:
            row[s] = {m: {g: _ms([r["detection"][m][s][g] for r in rs]) for g in GROUPS} for m in MODELS}
        row["proposal_recall"] = {g: _ms([r["proposals"]["recall_at_0.5"][g] for r in rs]) for g in ("base", "novel")}
        out.append(row)
    return out


def check_targets(summary: list[dict[str, Any]]) -> dict[str, Any]:
    """At the highest complexity, GT boxes: ViLLA's lead over the baseline on all digits (with the seeds' std), and
    its lead on novel minus its lead on base (the goals the run was planned against stay in results.json)."""
    hi = summary[-1]["gt"]
    lead = {g: hi["villa"][g]["mean"] - hi["baseline"][g]["mean"] for g in GROUPS}
    std = max(hi["villa"]["all"]["std"], hi["baseline"]["all"]["std"])
    return {
        "villa_minus_baseline_AP50_all_gt_at_highest": {
            "value": lead["all"],
            "std": std,
            "goal": "> std",
            "met": lead["all"] > std,
        },
        "lead_on_novel_minus_lead_on_base_gt_at_highest": {
            "value": lead["novel"] - lead["base"],
            "goal": ">= 0",
            "met": lead["novel"] >= lead["base"],
        },
    }


def format_table(results: dict[str, Any]) -> str:
    """table.md, computed from results.json alone (tests/test_docs.py checks the file and the README against it)."""
    s = results["summary"]
    n = len(results["settings"]["seeds"])
    ev = results["eval"]
    lines = [
        f"Zero-shot detection AP50 (%, pycocotools), mean ± std over {n} seeds; {ev['boxes']} digit boxes of "
        f"{ev['images']} held-out images (MNIST test digits); novel = seven, eight, nine (the proposal model never "
        "saw their boxes).",
        "",
        "| complexity | regions | "
        + " | ".join(f"{NAMES[m]} {g}" for m in MODELS for g in GROUPS)
        + " | ViLLA − baseline (novel / base) |",
        "| " + " | ".join(["---:", "---"] + ["---:"] * (len(MODELS) * len(GROUPS) + 1)) + " |",
    ]
    for row in s:
        for setting, title in SETTINGS.items():
            r = row[setting]
            cells = [f"{row['complexity']['mean']:.1f}", title]
            cells += [f"{r[m][g]['mean']:.1f} ± {r[m][g]['std']:.1f}" for m in MODELS for g in GROUPS]
            lead = [r["villa"][g]["mean"] - r["baseline"][g]["mean"] for g in ("novel", "base")]
            cells.append(f"{lead[0]:+.1f} / {lead[1]:+.1f}")
            lines.append("| " + " | ".join(cells) + " |")
    rec = s[0]["proposal_recall"]  # one proposal model per seed, the same at every complexity
    lines += [
        "",
        f"Proposal recall at IoU 0.5 ({results['settings']['top_k']} per image, mean ± std over seeds): base "
        f"{100 * rec['base']['mean']:.1f} ± {100 * rec['base']['std']:.1f}%, novel {100 * rec['novel']['mean']:.1f} "
        f"± {100 * rec['novel']['std']:.1f}%.",
        "",
    ]
    lines += ["| at the highest complexity, ground-truth boxes | AP50 points |", "| --- | ---: |"]
    names = {
        "villa_minus_baseline_AP50_all_gt_at_highest": "ViLLA − baseline, all digits",
        "lead_on_novel_minus_lead_on_base_gt_at_highest": "ViLLA's lead on novel digits − its lead on base digits",
    }
    for k, v in results["targets"].items():
        std = f" (std {v['std']:.1f})" if "std" in v else ""
        lines.append(f"| {names.get(k, k.replace('_', ' '))} | {v['value']:+.1f}{std} |")
    lines += ["", f"Wall time: {results['wall_seconds'] / 60:.1f} min on {results['machine']}.", ""]
    return "\n".join(lines)


@exit_on_error
def main(argv=None) -> dict[str, Any]:
    setup_logging()
    p = argparse.ArgumentParser(
        prog="python -m experiments.detection",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--targets", type=int, nargs="+", default=[5, 30], help="target sample complexities")
    p.add_argument("--seeds", type=int, default=3, help="runs per target, seeds --seed, --seed+1, ...")
    p.add_argument("--seed", type=int, default=23, help="first seed (the complexity experiment's)")
    p.add_argument("--out", default="outputs/detection", help="results.json and table.md")
    p.add_argument("--work", default=None, help="datasets, checkpoints, proposals (default: --out)")
    p.add_argument("--pretrained", default=str(ASSET), help="starting encoder (default: the shipped one)")
    p.add_argument("--budget", type=int, default=6000, help="attribute budget of every training set")
    p.add_argument("--stage2_epochs", type=int, default=8, help="Stage 2 cap (the complexity experiment's)")
    p.add_argument("--top_k", type=int, default=100, help="proposals per image")
    p.add_argument("--detector_epochs", type=int, default=3, help="epochs of the proposal model")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--render",
        metavar="RESULTS_JSON",
        default=None,
        help="print the table this script writes for an existing results.json, and run nothing",
    )
    a = p.parse_args(argv)
    if a.render:  # the table from the runs themselves: a summary that does not follow from them shows as a change
        results = json.loads(Path(a.render).read_text())
        summary = summarize(results["runs"])
        print(format_table({**results, "summary": summary, "targets": check_targets(summary)}), end="")
        return {}
    if a.seeds < 1 or not a.targets:
        raise VillaError("--seeds must be >= 1 and --targets non-empty")
    from villa.data.importers.docmnist_coco import export_coco
    from villa.models.detector import train_detector

    t0 = time.perf_counter()
    out, work = Path(a.out), Path(a.work or a.out)
    settings = {
        "model": "auto",
        "pretrained": a.pretrained,
        "input_size": 168,
        "budget": a.budget,
        "val_budget": 3000,
        "stage1_epochs": 30,
        "stage2_epochs": a.stage2_epochs,
        "stage2_batch": 64,
        "stage2_lr": 2e-4,
        "patience": 2,
    }
    targets = sorted(a.targets)
    for t in targets:
        pipeline_settings(settings, t, a.seed, a.device, a.quiet).check()
    eval_data, eval_gen = evaluation_set(work, 1000, 7000, a.quiet)
    gt_path = export_coco(eval_data, work / "instances_test.json", split="test", group="digit")
    gt = json.loads(gt_path.read_text())
    seeds = [a.seed + k for k in range(a.seeds)]
    runs: list[dict[str, Any]] = []
    zero: dict[str, Any] = {}
    for seed in seeds:
        detector = None
        for t in targets:
            run_dir = work / f"seed_{seed}" / f"target_{t}"
            res = run_pipeline(
                pipeline_settings(settings, t, seed, a.device, a.quiet),
                run_dir,
                eval_data=eval_data,
                methods=("baseline", "villa"),
                zero_shot=False,
            )
            if detector is None:  # the seed's lowest-complexity training split, base digits' boxes only
                detector = train_detector(
                    res["data"],
                    work / f"seed_{seed}" / "detector.pt",
                    epochs=a.detector_epochs,
                    seed=seed,
                    keep_attributes=split_groups()["base"],
                    progress=not a.quiet,
                )
                props = proposals_for(detector, gt_path, eval_data, a.top_k, work / f"seed_{seed}" / "proposals.json")
                zero[seed] = detect_all(a.pretrained, gt_path, eval_data, props["file"], a.device)
            gen = json.loads((Path(res["data"]) / "generation.json").read_text())
            det = {"zero-shot": zero[seed]}
            for m in ("baseline", "villa"):
                det[m] = detect_all(res["checkpoints"][m], gt_path, eval_data, props["file"], a.device)
            runs.append(
                {
                    "target": t,
                    "seed": seed,
                    "complexity": gen["splits"]["train"]["sample_complexity"],
                    "train_images": gen["splits"]["train"]["images"],
                    "proposals": props,
                    "detection": det,
                    "epochs": {m: res[f"{m}_training"]["epochs"] for m in ("baseline", "villa")},
                    "held_out": res["held_out"],
                    "seconds": res["seconds"],
                }
            )
            write_json_atomic(out / "runs.partial.json", runs)
    summary = summarize(runs)
    results = {
        "command": "python -m experiments.detection " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {**vars(a), "seeds": seeds},
        "split": split_groups(),
        "machine": f"{_cores()} CPU cores" if a.device != "cuda" else "CUDA",
        "eval": {
            "data": str(eval_data),
            "images": len(gt["images"]),
            "boxes": len(gt["annotations"]),
            "regions": eval_gen["regions"],
        },
        "runs": runs,
        "summary": summary,
        "targets": check_targets(summary),
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    write_json_atomic(out / "results.json", results)
    (out / "runs.partial.json").unlink(missing_ok=True)
    table = format_table(results)
    write_text_atomic(out / "table.md", table)
    print(table)
    return results


if __name__ == "__main__":
    main()
