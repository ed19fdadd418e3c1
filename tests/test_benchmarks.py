"""The benchmark tooling that cannot run in full here: the GPU check's dry run, and the pieces of the
villa-vs-original harness (its CPU shim for the original's code, its summary)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run(tmp_path):
    """DRY_RUN=1: nothing is installed and no step runs; every step's program starts and lists the flags it gets."""
    env = {
        **os.environ,
        "DRY_RUN": "1",
        "OUT": str(tmp_path / "out"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert rep["dry_run"] is True
    assert [s["name"] for s in rep["steps"]] == [
        "cuda_tests",
        "preprocess_rn50",
        "stage1",
        "stage2",
        "detection",
        "demo",
    ]
    assert all(s["returncode"] == 0 for s in rep["steps"]), [(s["name"], s["output"][-300:]) for s in rep["steps"]]


def test_original_shim_runs_cuda_code_on_cpu_with_the_harness_model(tmp_path):
    """benchmarks/original_shim, as the original's processes see it: .cuda() and .to("cuda") stay on the CPU,
    matplotlib.cm.get_cmap exists, and clip.load / clip.tokenize give the harness's weights and 77 tokens."""
    import open_clip

    from benchmarks.bench_original import MODEL_CFG

    cfg = {**MODEL_CFG, "embed_dim": 32, "vision_cfg": {**MODEL_CFG["vision_cfg"], "image_size": 64}}
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**cfg)
    torch.save({"model_cfg": cfg, "state_dict": model.state_dict()}, tmp_path / "m.pt")
    with torch.no_grad():
        want = model.encode_text(open_clip.tokenize(["the digit appears to be red"]))
    torch.save(want, tmp_path / "want.pt")
    code = """
import torch, matplotlib.cm as cm, clip
assert torch.zeros(2).cuda().device.type == "cpu" and torch.zeros(2).to("cuda").device.type == "cpu"
assert torch.nn.Linear(2, 2).to("cuda").weight.device.type == "cpu"
assert cm.get_cmap("hsv")(0.5)[3] == 1.0
m, _ = clip.load("RN50", "cuda")
tok = clip.tokenize(["the digit appears to be red"], truncate=True).to("cuda")
assert tok.shape == (1, 77)
with torch.no_grad():
    got = m.encode_text(tok)
torch.testing.assert_close(got, torch.load(WANT))
print("ok")
""".replace("WANT", repr(str(tmp_path / "want.pt")))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "benchmarks" / "original_shim"),
        "VILLA_ORIGINAL_SHIM": "1",
        "VILLA_ORIGINAL_ON_CPU": "1",
        "VILLA_BENCH_CLIP": str(tmp_path / "m.pt"),
    }
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_original_harness_measures_peak_memory(tmp_path):
    """run_timed reports a command's peak resident memory: a child that holds 300 MB for a moment reads >= 290 MB,
    its own and its process tree's (not the harness's: a forked child's pre-exec pages); output lines come back."""
    from benchmarks.bench_original import run_timed

    code = "import time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); print('held'); time.sleep(0.6)"
    secs, lines, mem = run_timed([sys.executable, "-c", code], tmp_path, dict(os.environ), tmp_path / "log")
    assert [ln for _, ln in lines] == ["held"] and secs >= 0.6
    assert 290 <= mem["peak_rss_mb"] < 600 and 290 <= mem["peak_tree_rss_mb"] < 600


def test_original_harness_summary():
    """Medians, min/max and the ratio of the medians per measure; end to end is the sum of the four processes of a
    repeat; regions/s is inverted (higher is faster); the Stage 1 late/early epoch ratio per side."""
    from benchmarks.bench_original import STEPS, format_table, summarize

    def rep(gen, pre, s1, s2):
        mem = {"peak_rss_mb": 10.0 * s1, "peak_tree_rss_mb": 20.0 * s1}
        return {
            "generate": {"seconds": gen, **mem},
            "preprocess": {"seconds": pre, "regions_per_s": 1000 / pre, **mem},
            "stage1": {"seconds": s1, "train_seconds": s1 - 1, "mapping_seconds": 1.0, "late_over_early": 1.1, **mem},
            "stage2": {"seconds": s2, "epoch_seconds": s2 / 4, **mem},
        }

    reps = {
        "original": [rep(10, 20, 30, 40), rep(12, 22, 34, 44), rep(11, 21, 32, 42)],
        "villa": [rep(1, 10, 15, 20), rep(2, 11, 16, 21), rep(1.5, 12, 17, 22)],
    }
    s = summarize(reps, STEPS)
    assert s["generate"]["original"] == {"runs": [10, 12, 11], "median": 11, "min": 10, "max": 12}
    assert s["generate"]["ratio"] == pytest.approx(11 / 1.5, abs=0.01)
    assert s["end_to_end"]["original"]["runs"] == [100, 112, 106] and s["end_to_end"]["ratio"] == pytest.approx(
        106 / 50, abs=0.01
    )
    assert s["preprocess_regions_per_s"]["ratio"] == pytest.approx(21 / 11, abs=0.01)  # villa's rate / the original's
    assert s["stage1_late_over_early"]["villa"]["median"] == pytest.approx(1.1)
    assert s["memory"]["stage1"] == {
        "original": {"peak_rss_mb": 320.0, "peak_tree_rss_mb": 640.0},
        "villa": {"peak_rss_mb": 160.0, "peak_tree_rss_mb": 320.0},
    }
    table = format_table({"summary": s, "machine": {"cpu": {"model": "X", "logical_cores": 2, "native_bf16": False}}})
    assert "| generate | 11.00 s (10.00-12.00) | 1.50 s (1.00-2.00) | 7.33x |" in table
    assert (
        "| stage1 | 320 / 640 MB | 160 / 320 MB |" in table and "CPU: X, 2 logical cores, native bf16: False" in table
    )
    partial = summarize({k: [{"generate": r["generate"]} for r in v] for k, v in reps.items()}, ("generate",))
    assert set(partial) == {"generate", "memory"}


def test_stage2_step_profile_splits_a_real_step(tiny_docmnist, tiny_mapping, tmp_path):
    """benchmarks/profile_stage2 sets a run up through the trainer and times its parts: every part measured, the
    parts adding up to the whole step, the batch as configured."""
    from benchmarks.profile_stage2 import PARTS, format_rows, profile

    res = profile(
        [
            f"data_dir={tiny_docmnist}",
            f"mapping_path={tiny_mapping}",
            "model.name=villa-tiny-rn",
            "model.pretrained=none",
            "batch_size=8",
            "device=cpu",
            "num_workers=0",
        ],
        steps=3,
        warmup=1,
    )
    parts = res["parts"]
    assert res["batch_images"] == 8 and res["batch_pairs"] > 8 and res["precision"] == "fp32"
    assert all(parts[p]["median_ms"] > 0 for p in PARTS)
    total = sum(parts[p]["median_ms"] for p in PARTS)
    assert 0.6 * parts["step"]["median_ms"] <= total <= 1.4 * parts["step"]["median_ms"]
    assert format_rows(res).splitlines()[0].split() == ["part", "median", "ms", "q1", "q3", "share"]


def test_cost_growth_table_states_the_growth():
    """The growth column: time and memory ratio from the smallest to the largest size over the data's ratio."""
    from benchmarks.cost_growth import format_table, growth

    def row(scale, pre, s1, s2, mem):
        step = lambda s: {"seconds": s, "epoch_seconds": s, "peak_rss_mb": mem, "peak_tree_rss_mb": mem}  # noqa: E731
        return {
            "scale": scale,
            "budget": 15000 * scale,
            "images": {"train": 1000 * scale},
            "regions": 9000 * scale,
            "preprocess": step(pre),
            "stage1": step(s1),
            "stage2": step(s2),
        }

    rows = [row(1, 10, 2, 30, 1000), row(4, 40, 8, 150, 2000)]
    assert growth(rows, "preprocess", "seconds") == 1.0 and growth(rows, "stage2", "epoch_seconds") == 1.25
    assert growth(rows, "stage1", "peak_tree_rss_mb") == 0.5
    table = format_table({"rows": rows})
    assert "| 4x (60,000 pairs) | 4,000 | 36,000 | 40 | 2000 | 8.0 | 2000 | 150.0 | 2000 |" in table
    assert (
        "preprocess: time x1.0, memory x0.5; stage1: time x1.0, memory x0.5; stage2: time x1.25, memory x0.5" in table
    )


def test_dtype_flips_counts_the_decisions_float16_storage_changes(tmp_path):
    """benchmarks/dtype_flips.py end to end at a tiny budget: both storage dtypes embedded and trained, the
    decisions counted against all the rule makes, and float16's rounding visible in the embeddings."""
    from benchmarks.dtype_flips import run

    res = run(1000, 1, tmp_path)
    assert res["decisions"] > 0 and res["images"] <= res["regions"] <= 9 * res["images"]
    assert 0 < res["max_abs_embedding_difference"] < 1e-2
    assert set(res["epsilon"]) == {"0.2", "0.0002"}
    for row in res["epsilon"].values():
        assert 0 <= row["differing_decisions"] <= res["decisions"]
        assert 0 < row["f1_float16"] <= 100 and 0 < row["f1_float32"] <= 100
