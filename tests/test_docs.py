"""The result tables of the README and of docs/results/README.md are the committed results files, and each table
is what its results.json gives; the README stays a front door."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
README = (ROOT / "README.md").read_text()
RESULTS_PAGE = (RESULTS / "README.md").read_text()


def render(script: str, results: Path) -> str:
    """What ``python -m <script> --render <results.json>`` prints: the table the script writes for those results
    (the scripts are run as their users run them, never imported)."""
    r = subprocess.run(
        [sys.executable, "-m", script, "--render", str(results)], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def cap_reached(results: dict) -> str:
    """``k of n`` Stage 2 trainings that ran to the epoch cap, counted from the runs."""
    cap = results["settings"]["stage2_epochs"]
    epochs = [e for r in results["runs"] for e in r["epochs"].values()]
    return f"{sum(e >= cap for e in epochs)} of {len(epochs)}"


def first_table(markdown: str) -> str:
    """The first Markdown table of a text (its header row to the blank line after it)."""
    i = markdown.index("\n|") + 1
    j = markdown.find("\n\n", i)
    return markdown[i : j if j >= 0 else len(markdown)]


def test_docs_speak_to_users():
    """Findings with their spread, never the project's bookkeeping (issue numbers, targets met or missed), and no
    path that exists only on the project's CI machines."""
    import re

    pages = [ROOT / "README.md", ROOT / "Makefile", *sorted((ROOT / "docs").rglob("*.md"))]
    for page in pages:
        text = page.read_text()
        for pattern in (
            r"\b[Ii]ssue \d+",
            r"issue's",
            r":\s*\**(met|missed)\b",
            r"\btargets? (met|missed)\b",
            r"shared/data",
        ):
            hit = re.search(pattern, text)
            assert hit is None, f"{page.relative_to(ROOT)}: {text[max(0, hit.start() - 60) : hit.end() + 20]!r}"


def test_readme_is_a_front_door():
    lines = README.splitlines()
    assert len(lines) <= 250
    first_block = README.index("```bash")
    assert README[first_block:].split("```")[1].split()[:4] == ["bash", "make", "demo", "#"]
    for link in (
        "docs/results/README.md",
        "docs/api.md",
        "docs/data_format.md",
        "docs/speed.md",
        "docs/architecture.md",
    ):
        assert f"]({link}" in README


def test_demo_table_is_its_results_file_and_on_the_results_page():
    table = (RESULTS / "demo" / "table.md").read_text()
    assert table == render("experiments.demo", RESULTS / "demo" / "results.json")
    assert table.strip() in RESULTS_PAGE


def test_grain_long_table_is_its_results_file_and_on_the_results_page():
    results = json.loads((RESULTS / "grain_long" / "results.json").read_text())
    table = (RESULTS / "grain_long" / "table.md").read_text()
    assert table == render("experiments.complexity", RESULTS / "grain_long" / "results.json")
    assert table.strip() in RESULTS_PAGE
    assert results["settings"]["stage2_epochs"] == 30 and "grain" in results["methods"]
    assert results["command"] in (RESULTS / "README.md").read_text()


def test_complexity_table_is_its_results_file_and_in_the_readme():
    results = json.loads((RESULTS / "complexity" / "results.json").read_text())
    table = (RESULTS / "complexity" / "table.md").read_text()
    assert table == render("experiments.complexity", RESULTS / "complexity" / "results.json")
    assert table.strip() in RESULTS_PAGE
    table_t2r = table[table.index("**text-to-region R-Precision (%)**") :]
    assert first_table(table_t2r) in README  # the README's one results table
    assert results["command"] in RESULTS_PAGE and results["command"] in README.replace("\n", " ")
    assert all(info["command"] in RESULTS_PAGE for info in results.get("added", {}).values())
    assert results["methods"][-2:] == ["grain", "grain-queries"]  # issue 12: GRAIN in the sweep
    assert len(results["summary"]) >= 6 and len(results["settings"]["seeds"]) >= 3
    assert results["eval"]["regions"] >= 2000


@pytest.mark.parametrize("folder", ["demo", "complexity", "grain_long"])
def test_results_record_a_held_out_evaluation(folder):
    """The committed runs evaluated on digits that trained nothing (the starting encoder's included)."""
    path = RESULTS / folder / "results.json"
    results = json.loads(path.read_text())
    held = [results["held_out"]] if folder == "demo" else [r["held_out"] for r in results["runs"]]
    for h in held:
        assert h["test_pool"]["scheme"] == "full-v1" and h["test_pool"]["file"] == "test"
        assert set(h["overlap"].values()) == {0}


def test_own_data_table_is_its_results_file_and_on_the_results_page():
    results = json.loads((RESULTS / "own_data" / "results.json").read_text())
    table = (RESULTS / "own_data" / "table.md").read_text()
    assert table == render("experiments.own_data", RESULTS / "own_data" / "results.json")
    assert table.strip() in RESULTS_PAGE
    assert list(results["variants"]) == ["given", "grid 3x3", "grid 1+2+3", "proposals (RPN top 20)"]
    assert results["command"] in RESULTS_PAGE


def test_detection_table_is_its_results_file_and_in_the_readme():
    results = json.loads((RESULTS / "detection" / "results.json").read_text())
    table = (RESULTS / "detection" / "table.md").read_text()
    assert table == render("experiments.detection", RESULTS / "detection" / "results.json")  # from the runs
    assert table.strip() in RESULTS_PAGE
    assert results["command"] in RESULTS_PAGE
    assert len(results["settings"]["seeds"]) == 3 and [r["target"] for r in results["summary"]] == [5, 30]
    assert results["split"]["novel"] == ["seven", "eight", "nine"] and not set(results["split"]["base"]) & {
        "seven",
        "eight",
        "nine",
    }
    for run in results["runs"]:  # evaluated on digits that trained nothing
        assert set(run["held_out"]["overlap"].values()) == {0}


@pytest.mark.parametrize("folder", ["complexity_fixed", "complexity_cap24"])
def test_complexity_controls_are_their_results_files_and_on_the_results_page(folder):
    """The fixed-images control and the 3x-cap check at the budget sweep's extremes."""
    results = json.loads((RESULTS / folder / "results.json").read_text())
    table = (RESULTS / folder / "table.md").read_text()
    assert table == render("experiments.complexity", RESULTS / folder / "results.json")
    assert table.strip() in RESULTS_PAGE
    assert results["command"] in RESULTS_PAGE
    for run in results["runs"]:
        assert set(run["held_out"]["overlap"].values()) == {0}
    if folder == "complexity_fixed":
        assert len(results["settings"]["seeds"]) == 3 and len(results["summary"]) == 6
        assert {r["train_images"] for r in results["runs"]} == {results["settings"]["fixed_images"]}
    else:
        assert results["settings"]["stage2_epochs"] == 24 and [r["target"] for r in results["summary"]] == [30]


def test_speed_against_the_original_is_the_harness_output():
    """docs/speed.md's villa-vs-original table is what benchmarks/bench_original.py printed from its JSON
    (one run, both sides interleaved), with its command and date; the README's ratios are that file's."""
    res = json.loads((RESULTS / "benchmarks" / "original.json").read_text())
    speed = (ROOT / "docs" / "speed.md").read_text()
    assert render("benchmarks.bench_original", RESULTS / "benchmarks" / "original.json").strip() in speed
    assert res["command"] in speed and res["date"] in speed
    assert res["settings"]["repeats"] >= 3
    for side in ("original", "villa"):
        assert len(res["runs"][side]) == res["settings"]["repeats"]
    for name in ("generate", "stage2_epoch", "end_to_end"):
        assert f"{res['summary'][name]['ratio']:.2f}x" in README


def test_grain_converged_comparison_is_its_results_file_and_on_the_results_page():
    """Baseline, ViLLA and GRAIN (its code's losses and optimiser) at the lowest and highest complexity,
    a 20-epoch cap, GRAIN's head learning rate chosen on validation data; 3 seeds, with the binding benchmark."""
    results = json.loads((RESULTS / "grain_converged" / "results.json").read_text())
    chosen = json.loads((RESULTS / "grain_converged" / "head_lr" / "results.json").read_text())
    table = (RESULTS / "grain_converged" / "table.md").read_text()
    assert table == render("experiments.complexity", RESULTS / "grain_converged" / "results.json")
    assert table.strip() in RESULTS_PAGE
    assert results["command"] in RESULTS_PAGE and chosen["command"] in RESULTS_PAGE
    assert results["settings"]["grain_head_lr"] == chosen["chosen_head_lr"] == 1e-3
    assert [r["target"] for r in results["summary"]] == [5, 30]
    assert results["settings"]["seeds"] == [23, 24, 25] and "partial" not in results["settings"]
    assert all(m in results["summary"][0]["binding"] for m in ("baseline", "villa", "grain"))
    assert results["settings"]["stage2_epochs"] == chosen["setting"]["epochs_cap"] == 20
    assert f"**Convergence: {cap_reached(results)} trainings reached the 20-epoch cap**" in RESULTS_PAGE
    for run in results["runs"]:
        assert set(run["held_out"]["overlap"].values()) == {0}


def test_aro_order_fidelity_is_its_results_file():
    """COCO-Order against ARO's own COCO_Order: the figures docs/finegrained.md quotes are the results file's."""
    res = json.loads((RESULTS / "aro_fidelity" / "results.json").read_text())
    page = (ROOT / "docs" / "finegrained.md").read_text()
    assert res["options_differing"] == 0 and res["same_number_of_items"] and res["control_options_differing"] > 0
    assert res["command"] in page and res["aro_repo_head"].startswith("81fdd20")
    assert f"**{res['options_differing']} of {res['options']} options differ**" in page
    assert f"{res['perturbations_that_changed_the_caption']} of {res['perturbations']}" in page
    assert f"makes {res['control_options_differing']} of {res['options']} differ" in page


def test_speed_page_figures_are_their_results_files():
    """docs/speed.md's cost-growth table is the script's rendering of its file; the start-up, region-operation,
    Stage 1 backward and Stage 2 profile figures, and differences.md's float16 row, are their files' numbers."""
    speed = (ROOT / "docs" / "speed.md").read_text()
    bench = RESULTS / "benchmarks"
    growth = json.loads((bench / "cost_growth.json").read_text())
    assert render("benchmarks.cost_growth", bench / "cost_growth.json").strip() in speed
    assert growth["command"] in speed and [r["scale"] for r in growth["rows"]] == [1, 4, 16]
    start = json.loads((bench / "startup.json").read_text())
    assert start["command"] in speed
    for name, v in start["commands"].items():
        assert f"| `{name}` | {v['exit'][0]} | {v['median_s']:.2f} s ({v['min_s']:.2f}-{v['max_s']:.2f}) |" in speed
        assert v["median_s"] < 1.5  # the start-up a user waits for
    ops = json.loads((bench / "region_ops.json").read_text())
    for row in ops["cases"].values():
        assert f"| {row['old']['median_ms']:.1f} | {row['new']['median_ms']:.1f} | {row['ratio']:.2f}x |" in speed
        assert row["max_abs_output_difference"] < 1e-5
    profile = json.loads((bench / "stage2_profile.json").read_text())
    for part in ("data", "forward", "backward", "optimizer"):
        assert f"| {profile['parts'][part]['median_ms']:.1f} |" in speed
    s1 = json.loads((bench / "stage1_backward.json").read_text())
    assert s1["mapping"]["differing"] == 0 and f"0 of the {s1['mapping']['decisions']:,}" in speed
    for key in ("ratio every=1", "ratio every=5", "ratio full every=1 / sparse every=5"):
        assert f"{s1['summary'][key]:.2f}x" in speed
    flips = json.loads((bench / "dtype_flips.json").read_text())
    differences = (ROOT / "docs" / "differences.md").read_text()
    for row in flips["epsilon"].values():
        assert f"{row['differing_decisions']} of {flips['decisions']:,}" in differences or (
            f"{row['differing_decisions']} at epsilon" in differences
        )
        assert f"{row['f1_float16']:.2f}" in differences and f"{row['f1_float32']:.2f}" in differences
