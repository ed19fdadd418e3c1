"""One config source: every default is written once (villa/core/schemas.py), the YAMLs under configs/ name groups
and what differs, every key they set is one the schema knows, and renamed keys say their new name."""

from __future__ import annotations

from dataclasses import MISSING
from pathlib import Path

import pytest
import yaml
from conftest import compose_config
from omegaconf import OmegaConf
from pycocotools.coco import COCO

from villa.core.errors import VillaError
from villa.core.schemas import SCHEMAS, schema_keys, validate_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


def leaves(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def schema_defaults(name: str) -> dict:
    out = {}
    for key, f in schema_keys(SCHEMAS[name]):
        out[key] = f.default_factory() if f.default_factory is not MISSING else f.default
    return out


def test_every_yaml_under_configs_is_known_and_loads():
    seen = set()
    for name in SCHEMAS:  # a command's YAML: its defaults list only, no value written a second time
        spec = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
        assert set(spec) == {"defaults"}, f"{name}.yaml writes values the schema holds: {set(spec) - {'defaults'}}"
        assert spec["defaults"][0] == f"{name}_schema"
        required = {"detection": ["gt=g.json", "images=i"], "classification": ["csv=c.csv", "images=i"]}
        validate_config(compose_config(name, required.get(name, [])), name)
        seen.add(CONFIGS / f"{name}.yaml")
    for f in sorted((CONFIGS / "experiment").glob("*.yaml")):  # what differs from the defaults, and nothing else
        name = "stage1" if "stage1" in f.stem else "stage2"
        defaults, known = schema_defaults(name), {k for k, _ in schema_keys(SCHEMAS[name])}
        set_here = list(leaves({k: v for k, v in yaml.safe_load(f.read_text()).items() if k != "defaults"}))
        assert set_here, f
        raw = OmegaConf.to_container(compose_config(name, [f"experiment={f.stem}"]), resolve=False)
        for key, value in set_here:
            assert key in known, f"{f.name}: {key} is not a {name} setting"
            assert value != defaults[key], f"{f.name}: {key}={value!r} is the default already"
            got = raw
            for part in key.split("."):
                got = got[part]
            assert got == value, (f.name, key, got, value)  # not shadowed, not lost to a wrong @package
        seen.add(f)
    from villa.data.vocab import load_vocab

    for f in sorted((CONFIGS / "dataset").glob("*.yaml")):
        if f.stem != "file":
            assert load_vocab(str(f)).name == f.stem
        seen.add(f)
    from villa.evaluate.detection import category_groups

    for f in sorted((CONFIGS / "splits").glob("*.yaml")):
        spec = yaml.safe_load(f.read_text())
        names = [n for g in spec["groups"].values() for n in g]
        gt = COCO()  # a real ground truth holding exactly the split's categories
        gt.dataset = {
            "images": [],
            "annotations": [],
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)],
        }
        gt.createIndex()
        groups = category_groups(gt, str(f))
        assert all(len(groups[g]) == len(spec["groups"][g]) for g in spec["groups"]), f
        seen.add(f)
    seen |= {CONFIGS / "hydra" / "villa.yaml", CONFIGS / "dataset" / "file.yaml"}
    assert set(CONFIGS.rglob("*.yaml")) == seen  # no YAML escapes these checks


def test_experiment_settings_reach_the_run():
    assert compose_config("stage2", ["experiment=pretrain"]).weight_decay_all is False
    assert compose_config("stage2", ["experiment=docmnist_stage2"]).weight_decay_all is True  # the original's
    grain = compose_config("stage2", ["experiment=docmnist_grain"])
    assert grain.objective == "grain" and grain.grain.boxes == "mapping" and grain.grain.queries == 9
    assert grain.model.pretrained == "openai" and grain.batch_size == 256  # the paper-scale settings, as ViLLA's
    assert compose_config("stage2", ["experiment=docmnist_baseline"]).objective == "one_to_one"


@pytest.mark.parametrize(
    "override,message",
    [
        ("mode=baseline", r"mode= is now objective= \(use objective=one_to_one\)"),
        ("grain_boxes=gold", r"grain_boxes= is now grain.boxes="),
        ("crop=content", r"crop= is now pretrain.crop="),
        ("amp=false", r"amp= is now precision= \(use precision=fp32\)"),
        ("amp=true", r"amp= is now precision= \(use precision=auto\)"),
    ],
)
def test_renamed_keys_name_their_new_spelling(override, message):
    with pytest.raises(VillaError, match=message):
        compose_config("stage2", [override])


def test_precision_picks_the_autocast_dtype(caplog):
    """auto is fp32 on a CPU (bf16 there is opt-in), fp16 needs CUDA, and an unknown spelling names the choices."""
    import torch

    from villa.core.runtime import cpu_has_native_bf16, get_runtime

    assert get_runtime("cpu", "auto").amp_dtype is None
    assert get_runtime("cpu", "fp32").amp_dtype is None
    assert get_runtime("cpu", False).amp_dtype is None
    with caplog.at_level("WARNING"):
        bf16 = get_runtime("cpu", "bf16")
    assert bf16.amp_dtype == torch.bfloat16
    assert ("far slower than fp32" in caplog.text) == (not cpu_has_native_bf16())
    with bf16.autocast():
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.bfloat16
    with pytest.raises(VillaError, match="precision=fp16 needs CUDA"):
        get_runtime("cpu", "fp16")
    with pytest.raises(VillaError, match="use one of auto, fp32, bf16, fp16"):
        get_runtime("cpu", "half")
    for name in ("stage1", "stage2"):
        assert compose_config(name, []).precision == "auto"


def test_paths_come_from_the_environment_in_one_place(monkeypatch, tmp_path):
    monkeypatch.setenv("VILLA_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("VILLA_CHECKPOINT_DIR", str(tmp_path / "c"))
    cfg = compose_config("stage1", [])
    assert cfg.data_dir == f"{tmp_path}/d/docmnist_30000_15.2"
    assert cfg.checkpoint_dir == f"{tmp_path}/c/stage1/docmnist_30000_15.2"
    monkeypatch.delenv("VILLA_DATA_DIR")
    assert compose_config("stage2", []).data_dir == "data/docmnist_30000_15.2"
