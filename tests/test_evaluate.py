"""Evaluation metrics against hand-computed values, the evaluate entry point, and the demo pipeline (tiny)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config

from villa.core.errors import VillaError
from villa.evaluate.metrics import precision_at_k, r_precision

ROOT = Path(__file__).resolve().parent.parent


def test_r_precision_perfect_reversed_and_ties():
    rel = np.array([[True, True, False, False, False]])
    perfect = np.array([[0.9, 0.8, 0.1, 0.0, -0.5]])
    assert r_precision(perfect, rel)[0] == 1.0
    reversed_ = -perfect
    assert r_precision(reversed_, rel)[0] == 0.0
    # one relevant in the top 2
    assert r_precision(np.array([[0.9, 0.1, 0.8, 0.0, -0.5]]), rel)[0] == 0.5
    # all tied: stable order, lower gallery index first -> items 0 and 1 are the top 2
    assert r_precision(np.zeros((1, 5)), rel)[0] == 1.0
    assert r_precision(np.zeros((1, 5)), rel[:, ::-1].copy())[0] == 0.0
    assert np.isnan(r_precision(perfect, np.zeros((1, 5), bool))[0])
    np.testing.assert_allclose(precision_at_k(perfect, rel, 1), [1.0])
    np.testing.assert_allclose(precision_at_k(reversed_, rel, 4), [0.25])
    np.testing.assert_allclose(precision_at_k(perfect, rel, 100), [0.4])  # k capped at the gallery size


def test_retrieval_metrics_on_toy_gallery():
    from villa.data.vocab import vocab_from_dict
    from villa.evaluate.retrieval import retrieval_metrics

    vocab = vocab_from_dict(
        {
            "name": "toy",
            "groups": [
                {"name": "g1", "attributes": ["a", "b"], "templates": ["{}"]},
                {"name": "g2", "attributes": ["c"], "templates": ["{}"]},
            ],
        }
    )
    attrs = torch.eye(3)
    regions = torch.tensor([[1.0, 0, 0.5], [0, 1.0, 0], [1.0, 0, 0]])
    gold = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 0]], bool)
    m = retrieval_metrics(regions, attrs, gold, vocab, ks=(1,))
    t = m["text_to_region"]
    assert t["per_attribute"] == {"a": 1.0, "b": 1.0, "c": 1.0} and t["r_precision"] == 1.0
    assert t["chance_per_group"]["g1"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert m["region_to_text"]["r_precision"] == 1.0 and m["region_to_text"]["per_group"]["g2"] == 1.0


@pytest.fixture(scope="module")
def tiny_pretrained(tiny_docmnist, tmp_path_factory):
    from villa.stage2.train import train_stage2

    tmp = tmp_path_factory.mktemp("pre")
    cfg = compose_config(
        "stage2",
        [
            "experiment=pretrain",
            f"data_dir={tiny_docmnist}",
            f"checkpoint_dir={tmp}",
            "model.name=villa-tiny-rn",
            "epochs=1",
            "batch_size=32",
            "device=cpu",
            "num_workers=0",
            "progress=false",
        ],
    )
    return Path(train_stage2(cfg)["best_checkpoint"])


def test_evaluate_entry_writes_json(tiny_docmnist, tiny_pretrained, tmp_path):
    from villa.evaluate.retrieval import run_evaluation

    out = tmp_path / "eval.json"
    res = run_evaluation(
        compose_config(
            "evaluate",
            [
                f"data_dir={tiny_docmnist}",
                f"model.pretrained={tiny_pretrained}",
                "label=tiny",
                f"output={out}",
                "device=cpu",
                "num_workers=0",
                "precision_at=[10,50]",  # K at most the split's regions
            ],
        )
    )
    saved = json.loads(out.read_text())
    assert saved["label"] == "tiny" and saved["split"] == "test" and saved["model"]["model"] == "villa-tiny-rn"
    t = saved["text_to_region"]
    assert set(t["per_group"]) == {"digit", "color", "shape", "size"} and 0 <= t["r_precision"] <= 1
    assert saved["regions"] == int(res["regions"]) > 0 and set(t["precision_at"]) == {"10", "50"}
    assert saved["region_path"]["input_size"] == 168  # as the checkpoint was trained (experiment=pretrain)
    assert t["chance_precision_at"]["10"] == pytest.approx(t["chance"])  # a random ranking's precision: R / N
    assert 0 < saved["region_to_text"]["chance"] < 1
    over = [
        f"data_dir={tiny_docmnist}",
        f"model.pretrained={tiny_pretrained}",
        f"output={out}",
        "device=cpu",
        "num_workers=0",
        f"precision_at=[1,{saved['regions'] + 1}]",
    ]
    with pytest.raises(
        VillaError,
        match=rf"K={saved['regions'] + 1} is above the {saved['regions']} candidate "
        "regions of split 'test'; give every K at most",
    ):
        run_evaluation(compose_config("evaluate", over))


def script(module: str, *args: str, code: int = 0) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` from the project's root, as its users run it; its exit status checked."""
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=root, timeout=900)
    assert r.returncode == code, r.stderr[-2000:]
    return r


DEMO_ARGS = ["--budget", "1300", "--stage1_epochs", "2", "--stage2_epochs", "1", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def demo_run(tiny_pretrained, tmp_path_factory):
    """The tiny demo, run once as ``make demo`` runs it: (output folder, its results.json, what it printed)."""
    out = tmp_path_factory.mktemp("demo")
    r = script("experiments.demo", "--out", str(out / "demo"), "--pretrained", str(tiny_pretrained), *DEMO_ARGS)
    return out, json.loads((out / "demo" / "results.json").read_text()), r.stdout


def test_demo_pipeline_tiny(demo_run, tiny_pretrained):
    """The demo's printed table is its results.json; the methods were evaluated on the same held-out regions; the
    mapping figures are Stage 1's own file; ViLLA trained on that mapping and the baseline did not."""
    import pyarrow.feather as feather

    from villa.data.vocab import load_vocab
    from villa.evaluate.retrieval import format_markdown_table

    tmp_path, res, printed = demo_run
    assert set(res["retrieval"]) == {"zero-shot", "baseline", "villa"}
    assert (tmp_path / "demo" / "retrieval.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    data = Path(saved["data"])
    ann = feather.read_table(data / "annotations.feather").to_pandas()
    test_regions = int(ann[ann.split == "test"].num_regions.sum())
    assert {r["regions"] for r in saved["retrieval"].values()} == {test_regions}
    quality = json.loads((data / "mapping_quality.json").read_text())["quality"]
    assert saved["mapping"] == quality and 0 < quality["stage1"]["all"]["all"]["f1"] <= 1
    assert format_markdown_table(saved["retrieval"], load_vocab("docmnist")) in printed
    table = (tmp_path / "demo" / "table.md").read_text()
    assert table == script("experiments.demo", "--render", str(tmp_path / "demo" / "results.json")).stdout
    assert table in printed
    assert f"| Stage 1 | {100 * quality['stage1']['all']['all']['f1']:.1f} |" in table
    assert f"Retrieval on the {test_regions} held-out regions" in table
    kinds = {m: torch.load(p, map_location="cpu", weights_only=True) for m, p in saved["checkpoints"].items()}
    assert kinds["villa"]["config"]["objective"] == "villa" and kinds["baseline"]["config"]["objective"] == "one_to_one"
    assert kinds["villa"]["config"]["mapping_path"] == str(data / "mapping.feather")
    start = torch.load(tiny_pretrained, map_location="cpu", weights_only=True)["state_dict"]
    for m in ("villa", "baseline"):
        w = kinds[m]["state_dict"]["visual.conv1.weight"]
        assert not torch.equal(w, start["visual.conv1.weight"])  # trained from the starting encoder


def test_demo_twice_gives_the_same_numbers(demo_run, tiny_pretrained, tmp_path):
    """The same demo command again, in a separate process (worker processes for the data): the same mapping,
    training losses and retrieval, to the last bit (issue 19: a re-run must repeat its numbers)."""

    script("experiments.demo", "--out", str(tmp_path / "again"), "--pretrained", str(tiny_pretrained), *DEMO_ARGS)
    out = []
    for folder in (demo_run[0] / "demo", tmp_path / "again"):
        res = json.loads((folder / "results.json").read_text())
        for v in res["retrieval"].values():
            v.pop("model")  # the checkpoint's path differs between the two output folders
        out.append({k: res[k] for k in ("mapping", "retrieval", "villa_training", "baseline_training")})
    assert out[0] == out[1]
    assert (demo_run[0] / "demo" / "table.md").read_text() == (tmp_path / "again" / "table.md").read_text()


def test_complexity_experiment_tiny(tiny_pretrained, tmp_path):
    """Seeds x targets x the methods on one fixed held-out set; the summary is the mean/std of the runs; the table
    written equals the one computed from results.json; the targets are computed from the summary. GRAIN is added to
    the finished sweep afterwards (--add_methods), as the committed sweep's was."""
    methods = ["zero-shot", "baseline", "villa", "oracle", "grain", "grain-queries"]

    def main(args: list) -> dict:
        script("experiments.complexity", *args)
        return json.loads((tmp_path / "results.json").read_text())

    def format_tables(results: dict) -> str:
        (tmp_path / "render.json").write_text(json.dumps(results))
        return script("experiments.complexity", "--render", str(tmp_path / "render.json")).stdout

    def write_partial(settings: dict, runs: list) -> None:  # the file an interrupted sweep leaves
        kept = {k: v for k, v in settings.items() if k not in ("from_partial", "quiet")}
        (tmp_path / "runs.partial.json").write_text(json.dumps({"settings": kept, "runs": runs}))

    sweep = [
        "--targets",
        "4",
        "8",
        "--seeds",
        "2",
        "--out",
        str(tmp_path),
        "--pretrained",
        str(tiny_pretrained),
        "--budget",
        "600",
        "--val_budget",
        "300",
        "--eval_test_budget",
        "300",
        "--min_eval_regions",
        "50",
        "--input_size",
        "0",
        "--stage1_epochs",
        "1",
        "--stage2_epochs",
        "1",
        "--device",
        "cpu",
        "--quiet",
    ]
    first = main([*sweep, "--methods", "baseline", "villa", "oracle"])
    assert first["methods"] == ["zero-shot", "baseline", "villa", "oracle"] and "GRAIN" not in format_tables(first)
    res = main(["--add_methods", "grain", "--out", str(tmp_path), "--device", "cpu", "--quiet"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == res
    assert saved["methods"] == methods and set(saved["added"]) == {"grain"}
    for before, after in zip(first["runs"], saved["runs"]):  # the sweep's own numbers are untouched
        assert after["retrieval"]["villa"] == before["retrieval"]["villa"]
        assert 0 <= after["grain_boxes"]["mean_iou"] <= 1 and after["epochs"]["grain"] == 1
        assert "grain" in after["mapping_f1_rerun"]
    assert "| target | mean IoU | epochs |" in format_tables(saved) and "GRAIN (queries)" in format_tables(saved)
    runs, summary = saved["runs"], saved["summary"]
    assert sorted((r["target"], r["seed"]) for r in runs) == [(4, 23), (4, 24), (8, 23), (8, 24)]
    assert [s["target"] for s in summary] == [4, 8]
    assert summary[0]["complexity"]["mean"] < summary[1]["complexity"]["mean"]
    for r in runs:
        assert set(r["retrieval"]) == set(methods) and r["epochs"]["oracle"] == 1
        assert r["retrieval"]["zero-shot"] == runs[0]["retrieval"]["zero-shot"]  # same encoder, same regions
    for row in summary:
        vals = [r["retrieval"]["villa"]["region_to_text"]["color"] for r in runs if r["target"] == row["target"]]
        got = row["region_to_text"]["villa"]["color"]
        assert got["mean"] == pytest.approx(np.mean(vals)) and got["std"] == pytest.approx(np.std(vals, ddof=1))
    lo, hi = summary[0]["text_to_region"], summary[-1]["text_to_region"]
    fall = (lo["baseline"]["all"]["mean"] - hi["baseline"]["all"]["mean"]) / lo["baseline"]["all"]["mean"]
    assert saved["targets"]["baseline_relative_fall"]["value"] == pytest.approx(fall)
    assert saved["eval"]["regions"] >= 50
    for row in summary:  # the binding benchmark, per run and summarised
        vals = [r["binding"]["villa"]["global"] for r in runs if r["target"] == row["target"]]
        assert row["binding"]["villa"]["global"]["mean"] == pytest.approx(np.mean(vals)) and 0 <= vals[0] <= 1
    assert runs[0]["binding"]["zero-shot"] == runs[-1]["binding"]["zero-shot"] and saved["binding"]["foils"] > 0
    assert (tmp_path / "table.md").read_text() == format_tables(saved)
    assert "**DocMNIST binding (%)**" in format_tables(saved)
    assert (tmp_path / "complexity.png").stat().st_size > 1000
    # every run refused overlapping digits before training: the held-out check ran and found none
    one = json.loads((tmp_path / "seed_23" / "target_4" / "results.json").read_text())
    assert set(one["held_out"]["overlap"].values()) == {0} and one["held_out"]["test_pool"]["split"] == "test"
    # an interrupted sweep (seed 24 stopped after its first target): --from_partial summarises seed 23 alone
    done = [r for r in first["runs"] if r["seed"] == 23] + [first["runs"][2]]
    write_partial({**first["settings"], "stage2_epochs": 2}, done)  # another sweep's runs are refused
    r = script("experiments.complexity", *sweep, "--methods", "baseline", "villa", "oracle", "--from_partial", code=2)
    assert "not written by this sweep (settings differ: stage2_epochs)" in r.stderr.strip().splitlines()[-1]
    write_partial(first["settings"], done)
    part = main([*sweep, "--methods", "baseline", "villa", "oracle", "--from_partial"])
    assert part["settings"]["seeds"] == [23] and part["settings"]["partial"]["runs_finished"] == 3
    assert [r["seed"] for r in part["runs"]] == [23, 23] and "binding" not in part["summary"][0]
    assert "**Partial**: the sweep was stopped after 3 of 4 runs" in (tmp_path / "table.md").read_text()
    assert "Wall time: not recorded" in (tmp_path / "table.md").read_text()


def test_shipped_checkpoint_and_its_command(tiny_docmnist, tmp_path):
    """The shipped starting encoder loads, records the digits it was pretrained on, and none of them is a DocMNIST
    test digit (MNIST's test file); the command that produced it (docs/pretrained.md) still runs."""
    from docmnist.mnist import load_digit_pools, pools_overlap
    from villa.core.env import SHIPPED_WEIGHTS
    from villa.models.clip import create_clip

    ASSET = SHIPPED_WEIGHTS["villa-small-rn-docmnist"]

    assert ASSET.is_file()
    clip = create_clip("auto", str(ASSET))
    assert clip.model_name.startswith("villa-small-rn")
    state = torch.load(ASSET, map_location="cpu", weights_only=True)
    assert (
        state["kind"] == "villa-stage2-pretrain" and state["config"]["mode"] == "pretrain"
    )  # written before objective=
    pools = state["data_pools"]
    assert {p["split"] for p in pools} == {"train", "val"} and {p["scheme"] for p in pools} == {"full-v1"}
    test_pool = load_digit_pools().info["test"].to_dict()
    assert test_pool["scheme"] == "full-v1"  # the shared folder holds the full MNIST
    assert sum(pools_overlap(test_pool, p) for p in pools) == 0
    assert sum(p["digits"] for p in pools) == 60000  # train 48,000 + val 12,000: MNIST's training file
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "villa.stage2",
            "experiment=pretrain",
            f"data_dir={tiny_docmnist}",
            f"checkpoint_dir={tmp_path}",
            "epochs=1",
            "device=cpu",
            "num_workers=0",
            "progress=false",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "best.pt").is_file()


def test_evaluate_default_config_resolves_its_model(tiny_docmnist, tmp_path, monkeypatch):
    """The default (model.name=auto, pretrained=openai) means RN50 with OpenAI's weights, not 'unknown model auto';
    offline, it fails at once with the way out."""
    from villa.core.errors import VillaError
    from villa.evaluate.retrieval import run_evaluation
    from villa.models.clip import resolve_model_name

    cfg = compose_config("evaluate", [f"data_dir={tiny_docmnist}", f"output={tmp_path / 'e.json'}", "device=cpu"])
    assert cfg.model.name == "auto" and cfg.model.pretrained == "openai" and resolve_model_name("auto") == "RN50"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(VillaError, match=r"pretrained='openai' for RN50 is not downloaded .*pretrained=none"):
        run_evaluation(cfg)
    assert not (tmp_path / "e.json").exists()
