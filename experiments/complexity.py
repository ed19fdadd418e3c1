"""The paper's complexity experiment, offline: one-to-one VLM vs ViLLA as the sample complexity of the data rises.

    python -m experiments.complexity --out docs/results/complexity          # 6 complexities x 3 seeds, ~90 min on 2 CPU cores
    python -m experiments.complexity --add_methods grain --out docs/results/complexity --work outputs/complexity
                                              # add a method to a finished sweep: the same settings, seeds, held-out set
    python -m experiments.complexity --targets 5 30 --seeds 1 --budget 2000 --out outputs/cx   # a quick look
    python -m experiments.complexity --model RN50 --pretrained openai --input_size 0 --budget 30000 \\
        --stage2_epochs 100 --stage2_batch 256 --stage2_lr 5e-5 --device cuda                  # the paper's scale

The protocol (the paper's, on the offline analogue; docs/results/README.md says where they differ):
- one fixed held-out evaluation set: the test split of one target-16 DocMNIST generated once (``--eval_seed``) from
  MNIST's test digits, which no training step of the sweep sees (checked against every pool that trains,
  including the starting encoder's pretraining data recorded in its checkpoint);
- for each target complexity and each seed: DocMNIST at a fixed attribute budget, preprocessing with the starting
  encoder, Stage 1, then Stage 2 from the same starting encoder four ways: ViLLA (Stage 1's mapping), the
  one-to-one baseline, the oracle ablation (ViLLA's Stage 2 on the ground-truth region-attribute pairs) and the
  GRAIN-style objective on Stage 1's mapping (evaluated with the ROI path, and with its matched region queries);
  Stage 2 stops early on its validation loss (``--stage2_epochs`` is the cap);
- text-to-region and region-to-text R-Precision, overall and per attribute group, for zero-shot (the starting
  encoder), baseline, ViLLA and oracle; Stage 1's mapping F1 next to the zero-shot mapping's.

Writes ``results.json`` (every run and the summary), ``table.md`` (computed from results.json by
:func:`format_tables`) and ``complexity.png`` (mean +- std over seeds) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from docmnist.generate_docmnist import generate
from experiments.demo import ASSET
from experiments.pipeline import PipelineSettings, run_pipeline
from experiments.plots import complexity_lines
from villa.core.errors import VillaError, exit_on_error
from villa.core.io import write_json_atomic, write_text_atomic
from villa.core.log import setup_logging
from villa.data.vocab import load_vocab

TRAINED = ("baseline", "villa", "oracle", "grain")  # Stage 2 methods (villa.pipeline.METHODS)
METHODS = ("zero-shot", "baseline", "villa", "oracle", "grain", "grain-queries")  # every reported model
NAMES = {
    "zero-shot": "zero-shot",
    "baseline": "baseline",
    "villa": "ViLLA",
    "oracle": "oracle",
    "grain": "GRAIN",
    "grain-queries": "GRAIN (queries)",
}


def reported(trained) -> list[str]:
    """The reported models of a sweep that trained ``trained``: zero-shot, those, and GRAIN's second readout."""
    return [m for m in METHODS if m == "zero-shot" or m in trained or (m == "grain-queries" and "grain" in trained)]


def methods_of(results: dict[str, Any]) -> list[str]:
    return results.get("methods", ["zero-shot", "baseline", "villa", "oracle"])  # a sweep from before GRAIN


DIRECTIONS = {"text_to_region": "text-to-region", "region_to_text": "region-to-text"}


def _ms(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}


def summarize(runs: list[dict[str, Any]], groups: list[str], methods: list[str]) -> list[dict[str, Any]]:
    """Per target: the mean and std over seeds of every reported number."""
    out = []
    for t in sorted({r["target"] for r in runs}):
        rs = [r for r in runs if r["target"] == t]
        row: dict[str, Any] = {
            "target": t,
            "seeds": [r["seed"] for r in rs],
            "complexity": _ms([r["complexity"] for r in rs]),
        }
        for d in DIRECTIONS:
            row[d] = {}
            for m in methods:
                row[d][m] = {"all": _ms([r["retrieval"][m][d]["all"] for r in rs])}
                for g in groups:
                    row[d][m][g] = _ms([r["retrieval"][m][d][g] for r in rs])
        row["mapping_f1"] = {k: _ms([r["mapping_f1"][k] for r in rs]) for k in ("stage1", "zero_shot")}
        row["epochs"] = {m: _ms([r["epochs"][m] for r in rs]) for m in methods if m in TRAINED}
        if "grain-queries" in methods:
            row["grain_boxes_iou"] = _ms([r["grain_boxes"]["mean_iou"] for r in rs])
        out.append(row)
    return out


FINDINGS = {  # what each lowest-vs-highest measure is, in the table
    "baseline_relative_fall": "baseline: relative fall (%)",
    "villa_relative_fall": "ViLLA: relative fall (%)",
    "villa_minus_baseline_t2r_at_highest": "ViLLA − baseline at the highest complexity",
    "villa_minus_baseline_r2t_at_highest": "ViLLA − baseline at the highest complexity, region-to-text",
    "mapping_f1_minus_zero_shot_at_highest": "Stage 1 − zero-shot mapping F1 (train) at the highest complexity",
}


def check_targets(summary: list[dict[str, Any]]) -> dict[str, Any]:
    """The lowest-vs-highest measures (with the goals the sweep was planned against, kept in results.json)."""
    lo, hi = summary[0], summary[-1]
    t2r, r2t = "text_to_region", "region_to_text"

    def fall(m: str) -> float:
        a, b = lo[t2r][m]["all"]["mean"], hi[t2r][m]["all"]["mean"]
        return (a - b) / a

    base_fall, villa_fall = fall("baseline"), fall("villa")
    gap_t2r = hi[t2r]["villa"]["all"]["mean"] - hi[t2r]["baseline"]["all"]["mean"]
    gap_r2t = hi[r2t]["villa"]["all"]["mean"] - hi[r2t]["baseline"]["all"]["mean"]
    std_t2r = max(hi[t2r]["villa"]["all"]["std"], hi[t2r]["baseline"]["all"]["std"])
    std_r2t = max(hi[r2t]["villa"]["all"]["std"], hi[r2t]["baseline"]["all"]["std"])
    map_gap = hi["mapping_f1"]["stage1"]["mean"] - hi["mapping_f1"]["zero_shot"]["mean"]
    return {
        "baseline_relative_fall": {"value": base_fall, "goal": ">= 0.25", "met": base_fall >= 0.25},
        "villa_relative_fall": {"value": villa_fall, "goal": "<= baseline's / 3", "met": villa_fall <= base_fall / 3},
        "villa_minus_baseline_t2r_at_highest": {
            "value": gap_t2r,
            "goal": ">= 0.10 and > std",
            "std": std_t2r,
            "met": gap_t2r >= 0.10 and gap_t2r > std_t2r,
        },
        "villa_minus_baseline_r2t_at_highest": {
            "value": gap_r2t,
            "goal": "> 0 and > std",
            "std": std_r2t,
            "met": gap_r2t > 0 and gap_r2t > std_r2t,
        },
        "mapping_f1_minus_zero_shot_at_highest": {"value": map_gap, "goal": ">= 0.20", "met": map_gap >= 0.20},
    }


def _pm(s: dict[str, float]) -> str:
    return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"


def format_tables(results: dict[str, Any]) -> str:
    """table.md, computed from results.json alone (a test checks that the file equals this)."""
    summary, groups = results["summary"], results["groups"]
    methods = methods_of(results)
    n = len(results["settings"]["seeds"])
    ev = results["eval"]
    lines = [
        f"Mean ± std over {n} seeds ({', '.join(map(str, results['settings']['seeds']))}); held-out evaluation set: "
        f"{ev['regions']} regions of {ev['images']} test images (MNIST test digits), the same for every run.",
        "",
    ]
    st = results["settings"]
    if st.get("partial"):
        pl = st["partial"]
        lines += [
            f"**Partial**: the sweep was stopped after {pl['runs_finished']} of "
            f"{len(pl['seeds_planned']) * len(summary)} runs; seeds {', '.join(map(str, st['seeds']))} of "
            f"{', '.join(map(str, pl['seeds_planned']))} finished every target and are summarised here.",
            "",
        ]
    if st.get("fixed_images"):
        imgs = sorted({r["train_images"] for r in results["runs"]})
        lines += [
            f"Fixed-images control: every training split has {st['fixed_images']} images ({imgs[0]}-{imgs[-1]} "
            f"drawn) and every val split {st['fixed_val_images']}, at every complexity; Stage 2 cap "
            f"{st['stage2_epochs']} epochs, patience {st['patience']}; trainings that reached the cap: "
            f"{cap_reached(results)}.",
            "",
        ]
    for d, title in DIRECTIONS.items():
        lines += [f"**{title} R-Precision (%)**", ""]
        head = "| target | complexity | " + " | ".join(NAMES[m] for m in methods) + " | ViLLA − baseline |"
        if d == "text_to_region":
            head += " mapping F1 Stage 1 (train) | mapping F1 zero-shot (train) |"
        lines += [head, "| " + " | ".join(["---:"] * (head.count("|") - 1)) + " |"]
        for row in summary:
            r = row[d]
            gap = r["villa"]["all"]["mean"] - r["baseline"]["all"]["mean"]
            cells = [str(row["target"]), f"{row['complexity']['mean']:.1f}"]
            cells += [_pm(r[m]["all"]) for m in methods] + [f"{100 * gap:+.1f}"]
            if d == "text_to_region":
                cells += [_pm(row["mapping_f1"]["stage1"]), _pm(row["mapping_f1"]["zero_shot"])]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["**text-to-region R-Precision (%) per attribute group (mean over seeds)**", ""]
    head = "| target | method | " + " | ".join(groups) + " |"
    lines += [head, "| ---: | --- | " + " | ".join(["---:"] * len(groups)) + " |"]
    for row in summary:
        for m in methods:
            vals = [f"{100 * row['text_to_region'][m][g]['mean']:.1f}" for g in groups]
            lines.append(f"| {row['target']} | {NAMES[m]} | " + " | ".join(vals) + " |")
    if "binding" in results:
        b = results["binding"]
        lines += [
            "",
            f"**DocMNIST binding (%)**: {b['foils']} foils and {b['pairs']} recoloured pairs from {b['images']} "
            "images of the evaluation set (`villa.finegrained`, benchmark=docmnist); pairwise accuracy on the binding foils (swapped colours "
            "or shapes: chance 50) with the global image embedding and with the changed region's embedding, and "
            "the Winoground-style group score of the pairs (global readout; chance 16.7)",
            "",
        ]
        bound = [m for m in methods if m in row_binding(summary)]
        head = (
            "| target | "
            + " | ".join(f"{NAMES[m]} global | {NAMES[m]} region | {NAMES[m]} pairs" for m in bound)
            + " |"
        )
        lines += [head, "| " + " | ".join(["---:"] * (head.count("|") - 1)) + " |"]
        for row in summary:
            cells = [str(row["target"])]
            for m in bound:
                bm = row["binding"][m]
                cells += [_pm(bm["global"]), _pm(bm["region"]), _pm(bm["pairs_global"])]
            lines.append("| " + " | ".join(cells) + " |")
    if "grain-queries" in methods:
        lines += [
            "",
            "**GRAIN's boxes**: mean IoU (%) of the region queries matched to the held-out regions' boxes, "
            "and the epochs its Stage 2 ran (cap " + str(results["settings"]["stage2_epochs"]) + ")",
            "",
        ]
        lines += ["| target | mean IoU | epochs |", "| ---: | ---: | ---: |"]
        for row in summary:
            e = row["epochs"]["grain"]
            lines.append(f"| {row['target']} | {_pm(row['grain_boxes_iou'])} | {e['mean']:.1f} |")
    findings = results["targets"] if len(summary) > 1 else {}  # lowest vs highest complexity: needs two
    if findings:
        lines += ["", "**Lowest vs highest complexity** (text-to-region unless named; points or relative %)", ""]
        lines += ["| measure | value |", "| --- | ---: |"]
    for k, v in findings.items():
        std = f" (std {100 * v['std']:.1f})" if "std" in v else ""
        lines.append(f"| {FINDINGS.get(k, k.replace('_', ' '))} | {100 * v['value']:.1f}{std} |")
    w = results["wall_seconds"]
    extra = (
        f" (the binding benchmark: {results['binding']['seconds'] / 60:.1f} min more)" if "binding" in results else ""
    )
    for m, info in results.get("added", {}).items():
        extra += f"; {NAMES.get(m, m)} added later by `{info['command']}` ({info['wall_seconds'] / 60:.1f} min)"
    if results["settings"].get("partial"):  # summarised from the runs: the sweep's own time was not recorded
        lines += [
            "",
            f"Wall time: not recorded (summarised from an interrupted sweep's runs on {results['machine']}).",
            "",
        ]
    else:
        lines += ["", f"Wall time: {w / 60:.1f} min on {results['machine']}{extra}.", ""]
    return "\n".join(lines)


def cap_reached(results: dict[str, Any]) -> str:
    """``k of n``: the Stage 2 trainings that ran to the epoch cap (not stopped by their validation loss)."""
    cap = results["settings"]["stage2_epochs"]
    epochs = [e for r in results["runs"] for e in r["epochs"].values()]
    return f"{sum(e >= cap for e in epochs)} of {len(epochs)}"


def row_binding(summary: list[dict[str, Any]]) -> dict[str, Any]:
    return summary[0].get("binding", {})


BINDING_KEYS = ("global", "region", "pairs_global", "pairs_region")


def binding_figures(res: dict[str, Any]) -> dict[str, float]:
    """The binding benchmark's headline numbers: pairwise accuracy on the binding foils (swap colour / shape) with
    the global and the region readout, and the Winoground-style group score of the recoloured pairs."""
    return {
        "global": res["global"]["binding"],
        "region": res["region"].get("binding", float("nan")),
        "pairs_global": res["pairs_global"]["group"],
        "pairs_region": res.get("pairs_region", {}).get("group", float("nan")),
    }


def add_binding(
    results: dict[str, Any], out: Path, device: str, max_images: Optional[int] = 200, only: Optional[list[str]] = None
) -> None:
    """Score the DocMNIST binding benchmark (villa.finegrained) on the evaluation set for every run's models (or
    ``only`` those methods), and add it per run and to the summary (mean +- std over seeds)."""
    from villa.core.runtime import get_runtime
    from villa.evaluate.finegrained.docmnist_binding import build_benchmark, score_benchmark
    from villa.evaluate.finegrained.scorer import Scorer
    from villa.models.clip import create_clip

    t0 = time.perf_counter()
    bench = build_benchmark(Path(results["eval"]["data"]), seed=0, max_images=max_images)
    runtime = get_runtime(device)
    settings = results["settings"]

    def score(pretrained: str) -> dict[str, float]:
        clip = create_clip(settings["model"], pretrained, device=runtime.device)
        return binding_figures(score_benchmark(bench, Scorer(clip, runtime, sentence_mean=True)))

    methods = [m for m in methods_of(results) if m != "grain-queries" and (only is None or m in only)]
    zero = score(settings["pretrained"]) if "zero-shot" in methods else None
    for run in results["runs"]:
        run_dir = out / f"seed_{run['seed']}" / f"target_{run['target']}"
        ckpts = json.loads((run_dir / "results.json").read_text())["checkpoints"]
        new = {m: (zero if m == "zero-shot" else score(ckpts[m])) for m in methods}
        run["binding"] = {**run.get("binding", {}), **new}
    bound = [m for m in methods_of(results) if m in results["runs"][0]["binding"]]
    for row in results["summary"]:
        rs = [r for r in results["runs"] if r["target"] == row["target"]]
        row["binding"] = {m: {k: _ms([r["binding"][m][k] for r in rs]) for k in BINDING_KEYS} for m in bound}
    if only is not None and "binding" in results:
        results["binding"]["seconds"] += round(time.perf_counter() - t0, 1)
        return
    results["binding"] = {
        "benchmark": "docmnist",
        "images": len({f["image"] for f in bench["foils"]}),
        "foils": len(bench["foils"]),
        "pairs": len(bench["pairs"]),
        "seed": bench["seed"],
        "test_pool": bench["test_pool"],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def run_row(
    res: dict[str, Any], target: int, seed: int, groups: list[str], zero_shot: Optional[dict], methods: list[str]
) -> dict[str, Any]:
    gen = json.loads((Path(res["data"]) / "generation.json").read_text())
    retrieval = {"zero-shot": zero_shot, **res["retrieval"]}
    row: dict[str, Any] = {
        "target": target,
        "seed": seed,
        "complexity": gen["splits"]["train"]["sample_complexity"],
        "train_images": gen["splits"]["train"]["images"],
        "retrieval": {},
    }
    for m in methods:
        row["retrieval"][m] = {}
        for d in DIRECTIONS:
            r = retrieval[m][d]
            row["retrieval"][m][d] = {"all": r["r_precision"], **{g: r["per_group"][g] for g in groups}}
    q = res["mapping"]
    row["mapping_f1"] = {k: q[k]["train"]["all"]["f1"] for k in ("stage1", "zero_shot")}
    row["epochs"] = {m: res[f"{m}_training"]["epochs"] for m in methods if m in TRAINED}
    if "grain-queries" in methods:
        row["grain_boxes"] = res["retrieval"]["grain-queries"]["boxes"]
    row["timings"], row["seconds"], row["held_out"] = res["timings"], res["seconds"], res["held_out"]
    return row


@exit_on_error
def main(argv=None) -> dict[str, Any]:
    setup_logging()
    p = argparse.ArgumentParser(
        prog="python -m experiments.complexity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--targets", type=int, nargs="+", default=[5, 10, 15, 20, 25, 30], help="target sample complexities")
    p.add_argument("--seeds", type=int, default=3, help="runs per target, seeds --seed, --seed+1, ...")
    p.add_argument("--seed", type=int, default=23, help="first seed")
    p.add_argument("--out", default="outputs/complexity", help="results.json, table.md and the plot")
    p.add_argument("--model", default="auto", help="auto: as recorded in the --pretrained checkpoint")
    p.add_argument("--pretrained", default=str(ASSET), help="starting encoder (default: the shipped one)")
    p.add_argument("--input_size", type=int, default=168, help="0: native image size")
    p.add_argument("--budget", type=int, default=6000, help="attribute budget of every training set (fixed)")
    p.add_argument(
        "--fixed_images",
        type=int,
        default=None,
        help="the fixed-images control: every training split has this many images (not --budget)",
    )
    p.add_argument(
        "--fixed_val_images",
        type=int,
        default=None,
        help="with --fixed_images: this many val images (default: half of --fixed_images)",
    )
    p.add_argument("--val_budget", type=int, default=3000, help="attribute budget of every val split")
    p.add_argument("--eval_test_budget", type=int, default=7000, help="pairs of the held-out evaluation set")
    p.add_argument("--eval_seed", type=int, default=1000, help="seed of the held-out evaluation set")
    p.add_argument(
        "--min_eval_regions", type=int, default=2000, help="the evaluation set must have at least this many regions"
    )
    p.add_argument("--stage1_epochs", type=int, default=30, help="Stage 1 epochs")
    p.add_argument("--stage2_epochs", type=int, default=8, help="cap; early stopping on the val loss")
    p.add_argument("--patience", type=int, default=2, help="Stage 2 early stopping patience (epochs)")
    p.add_argument("--stage2_batch", type=int, default=64, help="Stage 2 images per step")
    p.add_argument("--stage2_lr", type=float, default=2e-4, help="Stage 2 learning rate")
    p.add_argument("--grain_head_lr", type=float, default=None, help="GRAIN's head lr (None: --stage2_lr)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--no_binding", action="store_true", help="skip the DocMNIST binding benchmark")
    p.add_argument("--binding_images", type=int, default=200, help="evaluation images the binding benchmark uses")
    p.add_argument(
        "--binding_only",
        action="store_true",
        help="add the binding benchmark to an existing --out (its results.json and checkpoints)",
    )
    p.add_argument("--methods", nargs="+", default=list(TRAINED), choices=TRAINED, help="Stage 2 methods to train")
    p.add_argument(
        "--add_methods",
        nargs="+",
        choices=TRAINED,
        default=None,
        help="train these for every run of the finished sweep in --out (its settings) and add them",
    )
    p.add_argument("--work", default=None, help="where datasets and checkpoints go (default: --out)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--from_partial",
        action="store_true",
        help="an interrupted sweep: the same command plus this flag summarises the seeds whose every target "
        "finished (--out's runs.partial.json) into results.json and table.md, marked partial",
    )
    p.add_argument(
        "--render",
        metavar="RESULTS_JSON",
        default=None,
        help="print the table this script writes for an existing results.json, and run nothing",
    )
    a = p.parse_args(argv)
    if a.render:
        print(format_tables(json.loads(Path(a.render).read_text())), end="")
        return {}
    if a.binding_only:
        return binding_only(Path(a.out), a.device, a.binding_images)
    if a.add_methods:
        return add_methods(
            Path(a.out),
            Path(a.work or a.out),
            a.add_methods,
            a.device,
            a.quiet,
            argv,
            {"grain_head_lr": a.grain_head_lr},
        )
    if not {"baseline", "villa"} <= set(a.methods):
        raise VillaError("--methods must include baseline and villa (the comparison the targets measure)")
    if a.seeds < 1 or not a.targets:
        raise VillaError("--seeds must be >= 1 and --targets non-empty")
    if a.fixed_val_images is not None and a.fixed_images is None:
        raise VillaError("--fixed_val_images needs --fixed_images")
    if a.fixed_images is not None and a.fixed_val_images is None:
        a.fixed_val_images = max(1, a.fixed_images // 2)
    for target in a.targets:  # every setting in range before any work
        pipeline_settings(vars(a), target, a.seed, a.device, a.quiet).check()
    t_start = time.perf_counter()
    out = Path(a.out)
    work = Path(a.work or a.out)
    vocab = load_vocab("docmnist")
    groups = list(vocab.groups)
    eval_data, eval_gen = evaluation_set(work, a.eval_seed, a.eval_test_budget, a.quiet)
    if eval_gen["regions"] < a.min_eval_regions:
        raise VillaError(
            f"the evaluation set has {eval_gen['regions']} regions, fewer than --min_eval_regions="
            f"{a.min_eval_regions}; raise --eval_test_budget"
        )
    seeds = [a.seed + k for k in range(a.seeds)]
    settings = {**vars(a), "seeds": seeds}
    runs: list[dict[str, Any]] = []
    zero_shot = None
    methods = reported(a.methods)
    if a.from_partial:
        path = out / "runs.partial.json"
        if not path.is_file():
            raise VillaError(f"{path} not found: --from_partial needs the runs an interrupted sweep in --out wrote")
        partial, want = json.loads(path.read_text()), partial_key(settings)
        got = partial.get("settings") if isinstance(partial, dict) else None
        if got != want:
            why = (
                "it records no settings (written by an older villa)"
                if not isinstance(got, dict)
                else "settings differ: "
                + ", ".join(sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k)))
            )
            raise VillaError(
                f"{path} was not written by this sweep ({why}); pass the interrupted sweep's own "
                "command with --from_partial"
            )
        done = partial["runs"]
        finished = [s for s in seeds if {r["target"] for r in done if r["seed"] == s} == set(a.targets)]
        if not finished:
            raise VillaError(f"{path}: no seed finished every target of --targets; nothing to summarise")
        runs = [r for r in done if r["seed"] in finished]
        settings = {
            **settings,
            "seeds": finished,
            "no_binding": True,
            "partial": {"seeds_planned": seeds, "runs_finished": len(done)},
        }
        seeds = []  # nothing more to run; no binding benchmark
        a.no_binding = True
    for seed in seeds:
        for t in a.targets:
            # zero-shot is the starting encoder on the fixed evaluation set: the same for every run, evaluated once
            res = run_pipeline(
                pipeline_settings(settings, t, seed, a.device, a.quiet),
                work / f"seed_{seed}" / f"target_{t}",
                eval_data=eval_data,
                methods=tuple(a.methods),
                zero_shot=zero_shot is None,
            )
            zero_shot = zero_shot or res["retrieval"]["zero-shot"]
            runs.append(run_row(res, t, seed, groups, zero_shot, methods))
            write_partial(out, settings, runs)
    summary = summarize(runs, groups, methods)
    results = {
        "command": _command(argv),
        "methods": methods,
        "settings": settings,
        "groups": groups,
        "machine": f"{_cores()} CPU cores" if a.device != "cuda" else "CUDA",
        "eval": {
            "data": str(eval_data),
            "images": eval_gen["images"],
            "regions": eval_gen["regions"],
            "sample_complexity": eval_gen["sample_complexity"],
        },
        "runs": runs,
        "summary": summary,
        "targets": check_targets(summary),
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    if not a.no_binding:
        add_binding(results, work, a.device, a.binding_images)
    write_json_atomic(out / "results.json", results)
    if not a.from_partial:
        (out / "runs.partial.json").unlink(missing_ok=True)
    return write_outputs(results, out)


def partial_key(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that make a sweep's runs what they are (not how it reports), as JSON stores them."""
    return json.loads(
        json.dumps({k: v for k, v in settings.items() if k not in ("from_partial", "quiet")}, default=str)
    )


def write_partial(out: Path, settings: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    """The finished runs so far, with the settings that made them (``--from_partial`` checks they are its own)."""
    write_json_atomic(out / "runs.partial.json", {"settings": partial_key(settings), "runs": runs})


def _command(argv) -> str:
    return "python -m experiments.complexity " + " ".join(sys.argv[1:] if argv is None else argv)


def evaluation_set(work: Path, eval_seed: int, test_budget: int, quiet: bool) -> tuple[Path, dict[str, Any]]:
    """The fixed held-out set: the test split of one target-16 DocMNIST (MNIST's test digits)."""
    data = generate(
        200,
        16,
        seed=eval_seed,
        out_dir=str(work / "eval_data"),
        val_budget=100,
        test_budget=test_budget,
        overwrite=True,
        progress=not quiet,
    )
    return data, json.loads((data / "generation.json").read_text())["splits"]["test"]


def pipeline_settings(settings: dict[str, Any], target: int, seed: int, device: str, quiet: bool) -> PipelineSettings:
    a = settings
    return PipelineSettings(
        model=a["model"],
        pretrained=a["pretrained"],
        input_size=a["input_size"] or None,
        target=target,
        budget=a["budget"],
        val_budget=a["val_budget"],
        test_budget=200,
        seed=seed,
        stage1_epochs=a["stage1_epochs"],
        stage2_epochs=a["stage2_epochs"],
        stage2_batch=a["stage2_batch"],
        stage2_lr=a["stage2_lr"],
        early_stop_patience=a["patience"],
        device=device,
        progress=not quiet,
        grain_head_lr=a.get("grain_head_lr"),
        train_images=a.get("fixed_images"),
        val_images=a.get("fixed_val_images"),
    )


def add_methods(
    out: Path, work: Path, new: list[str], device: str, quiet: bool, argv, new_settings: dict[str, Any]
) -> dict[str, Any]:
    """Train ``new`` methods for every run of the finished sweep whose results.json is in ``out``, with its settings,
    seeds and held-out set (regenerated identically, checked), and merge them into results.json. Stage 1 is run
    again for them (its mapping F1 is recorded as ``mapping_f1_rerun``, next to the sweep's)."""
    path = out / "results.json"
    if not path.is_file():
        raise VillaError(f"{path} not found; run the sweep first (without --add_methods)")
    results = json.loads(path.read_text())
    t0 = time.perf_counter()
    st = results["settings"]
    for k, v in new_settings.items():  # settings the sweep did not have (they concern only the added methods)
        if v is None:
            continue
        if k in st and st[k] != v:
            raise VillaError(f"--{k}={v} differs from the sweep's {st[k]}; leave it out")
        st[k] = v
    eval_data, eval_gen = evaluation_set(work, st["eval_seed"], st["eval_test_budget"], quiet)
    if (eval_gen["images"], eval_gen["regions"]) != (results["eval"]["images"], results["eval"]["regions"]):
        raise VillaError(
            f"the regenerated evaluation set ({eval_gen['regions']} regions) is not the sweep's "
            f"({results['eval']['regions']}): the generator or MNIST changed; run the whole sweep"
        )
    methods = reported(sorted({m for m in methods_of(results) if m in TRAINED} | set(new), key=TRAINED.index))
    added = [m for m in methods if m not in methods_of(results)]
    groups = results["groups"]
    for run in results["runs"]:
        res = run_pipeline(
            pipeline_settings(st, run["target"], run["seed"], device, quiet),
            work / f"seed_{run['seed']}" / f"target_{run['target']}",
            eval_data=eval_data,
            methods=tuple(new),
            zero_shot=False,
        )
        row = run_row(res, run["target"], run["seed"], groups, None, added)
        run["retrieval"].update(row["retrieval"])
        run["epochs"].update(row["epochs"])
        run.setdefault("mapping_f1_rerun", {})[",".join(new)] = row["mapping_f1"]
        if "grain_boxes" in row:
            run["grain_boxes"] = row["grain_boxes"]
        write_partial(out, {**st, "add_methods": new}, results["runs"])
    results["methods"] = methods
    results["summary"] = summarize(results["runs"], groups, methods)
    if "binding" in results:
        add_binding(results, work, device, results["binding"].get("images"), only=new)
    results.setdefault("added", {})[",".join(new)] = {
        "command": _command(argv),
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    results["targets"] = check_targets(results["summary"])
    write_json_atomic(path, results)
    (out / "runs.partial.json").unlink(missing_ok=True)
    return write_outputs(results, out)


def write_outputs(results: dict[str, Any], out: Path) -> dict[str, Any]:
    table = format_tables(results)
    write_text_atomic(out / "table.md", table)
    complexity_lines(results["summary"], methods_of(results), out / "complexity.png")
    print(table)
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'complexity.png'}")
    return results


def binding_only(out: Path, device: str, max_images: Optional[int]) -> dict[str, Any]:
    path = out / "results.json"
    if not path.is_file():
        raise VillaError(f"{path} not found; run the experiment first (without --binding_only)")
    results = json.loads(path.read_text())
    add_binding(results, out, device, max_images)
    results["commands"] = [results["command"], f"python -m experiments.complexity --binding_only --out {out}"]
    write_json_atomic(path, results)
    return write_outputs(results, out)


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


if __name__ == "__main__":
    main()
