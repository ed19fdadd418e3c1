"""The paper's complexity experiment, offline: one-to-one VLM vs ViLLA as the sample complexity of the data rises.

    python experiments/complexity.py --targets 4 8 12 16 --out outputs/complexity
    python experiments/complexity.py --targets 4 8 12 16 --model RN50 --pretrained openai --input_size 0 \\
        --budget 30000 --stage2_epochs 100 --stage2_batch 256 --stage2_lr 5e-5 --device cuda      # the paper's scale

For each target complexity: generate DocMNIST, then (villa.pipeline) preprocess with the starting encoder,
Stage 1, Stage 2 ViLLA and the one-to-one baseline from the same starting encoder, and evaluate zero-shot /
baseline / ViLLA on the same held-out regions: the test split of one target-16 DocMNIST generated once.
Writes results.json, table.md and complexity.png under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from docmnist.generate_docmnist import generate  # noqa: E402
from villa.demo import ASSET  # noqa: E402
from villa.errors import exit_on_error  # noqa: E402
from villa.log import setup_logging  # noqa: E402
from villa.paths import write_json_atomic, write_text_atomic  # noqa: E402
from villa.pipeline import PipelineSettings, run_pipeline  # noqa: E402
from villa.plots import complexity_lines  # noqa: E402

METHODS = ("zero-shot", "baseline", "villa")


@exit_on_error
def main(argv=None) -> list[dict]:
    setup_logging()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", type=int, nargs="+", default=[4, 8, 12, 16])
    p.add_argument("--out", default="outputs/complexity")
    p.add_argument("--model", default="auto", help="auto: as recorded in the --pretrained checkpoint")
    p.add_argument("--pretrained", default=str(ASSET))
    p.add_argument("--input_size", type=int, default=168, help="0: native image size")
    p.add_argument("--budget", type=int, default=15000)
    p.add_argument("--stage1_epochs", type=int, default=30)
    p.add_argument("--stage2_epochs", type=int, default=6)
    p.add_argument("--stage2_batch", type=int, default=64)
    p.add_argument("--stage2_lr", type=float, default=2e-4)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=23)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    out = Path(a.out)
    eval_data = generate(a.budget, 16, seed=a.seed + 1000, out_dir=str(out / "eval_data"), val_budget=100, test_budget=a.budget // 5,
                         overwrite=True, progress=not a.quiet)  # fmt: skip
    rows, full = [], {}
    for t in a.targets:
        s = PipelineSettings(
            model=a.model, pretrained=a.pretrained, input_size=a.input_size or None, target=t, budget=a.budget,
            val_budget=a.budget // 5, test_budget=a.budget // 10, seed=a.seed, stage1_epochs=a.stage1_epochs,
            stage2_epochs=a.stage2_epochs, stage2_batch=a.stage2_batch, stage2_lr=a.stage2_lr, device=a.device,
            progress=not a.quiet,
        )  # fmt: skip
        res = run_pipeline(s, out / f"target_{t}", eval_data=eval_data)
        gen = json.loads((Path(res["data"]) / "generation.json").read_text())
        row = {"target": t, "complexity": gen["splits"]["train"]["sample_complexity"]}
        row.update({m: res["retrieval"][m]["text_to_region"]["r_precision"] for m in METHODS})
        rows.append(row)
        full[str(t)] = res
        write_json_atomic(out / "results.json", {"rows": rows, "runs": full})
    lines = [
        "| target | complexity | zero-shot | baseline | ViLLA | mapping F1 Stage 1 | mapping F1 zero-shot |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        m = full[str(r["target"])]["mapping"]
        lines.append(
            f"| {r['target']} | {r['complexity']:.1f} | {100 * r['zero-shot']:.1f} | {100 * r['baseline']:.1f} | {100 * r['villa']:.1f} "
            f"| {100 * m['stage1']['all']['all']['f1']:.1f} | {100 * m['zero_shot']['all']['all']['f1']:.1f} |"
        )  # fmt: skip
    write_text_atomic(out / "table.md", "\n".join(lines) + "\n")
    complexity_lines(rows, out / "complexity.png")
    print("\n".join(lines))
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'complexity.png'}")
    return rows


if __name__ == "__main__":
    main()
