"""Export a training checkpoint: a compact villa checkpoint, or a folder in open_clip's own format.

    python -m villa.export checkpoints/pretrain/best.pt villa/assets/villa-small-rn-docmnist.pt [--dtype float16]
    python -m villa.export --format open_clip checkpoints/stage2/docmnist_villa/best.pt exported/villa-docmnist

``--format villa`` (default): keeps what describes the model (format, model name and config, kind, epoch, history,
resolved config); drops the optimiser, scheduler and RNG states. ``create_clip(pretrained=<exported file>)`` loads
it like the original.

``--format open_clip``: a folder with ``open_clip_config.json`` (``model_cfg`` and the ``preprocess_cfg`` of the
model's global input: no mean/std when it was trained without, the tower's image size, bilinear squash resize) and
``open_clip_model.safetensors``, which ``open_clip.create_model_and_transforms("local-dir:DIR")`` loads without
villa. It carries the two towers, not the region path's options (ROI-Align on layer 3, the input size the regions
were embedded at, the normalisation): those are kept under ``villa`` in the config JSON, and
``villa.load("DIR")`` reads them back (docs/api.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from villa.core.checkpoint import load_checkpoint, save_checkpoint
from villa.core.errors import VillaError, exit_on_error
from villa.core.io import atomic_dir
from villa.models.clip import is_villa_checkpoint
from villa.models.region_encoder import CLIP_MEAN, CLIP_STD

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"

KEEP = (
    "format",
    "kind",
    "model_name",
    "model_cfg",
    "epoch",
    "best_val",
    "history",
    "config",
    "started_from",
    "inputs",
    "data_pools",
)


def _villa_state(src: Path) -> dict:
    state = load_checkpoint(src, "checkpoint", "export a Stage 2 or pretraining checkpoint (<checkpoint_dir>/best.pt)")
    if not is_villa_checkpoint(state):
        raise VillaError(
            f"{src} is not a villa CLIP checkpoint (format villa-clip); export a Stage 2 / pretrain checkpoint"
        )
    return state


def export_checkpoint(src: Path, dst: Path, dtype: str = "float16") -> Path:
    state = _villa_state(src)
    dt = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    out = {k: state[k] for k in KEEP if k in state}
    out["state_dict"] = {k: (v.to(dt) if v.is_floating_point() else v) for k, v in state["state_dict"].items()}
    out["exported_from"] = {"file": Path(src).name, "dtype": dtype}
    save_checkpoint(dst, out)
    return dst


def export_open_clip(src: Path, dst: Path, dtype: str = "float32", overwrite: bool = False) -> Path:
    """``dst``: a folder that ``open_clip.create_model_and_transforms("local-dir:<dst>")`` loads (module docs)."""
    import json

    from safetensors.torch import save_file

    from villa.evaluate.retrieval import region_options

    if Path(dst).exists() and not overwrite:
        raise VillaError(f"{dst} already exists; pass --overwrite to replace it or choose another folder")
    state = _villa_state(src)
    dt = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    opts = region_options(str(src), None, None)
    cfg = dict(state["model_cfg"])
    size = cfg.get("vision_cfg", {}).get("image_size", 224)  # the global path's input (attention pool's grid)
    mean, std = (CLIP_MEAN, CLIP_STD) if opts["normalize"] else ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    config = {
        "model_cfg": cfg,
        "preprocess_cfg": {
            "size": size,
            "mode": "RGB",
            "mean": list(mean),
            "std": list(std),
            "interpolation": "bilinear",
            "resize_mode": "squash",
        },
        "villa": {
            "model_name": state["model_name"],
            "kind": state.get("kind"),
            "epoch": state.get("epoch"),
            "region_options": opts,
            "exported_from": Path(src).name,
        },
    }
    weights = {k: (v.to(dt) if v.is_floating_point() else v).contiguous() for k, v in state["state_dict"].items()}
    with atomic_dir(dst, overwrite=overwrite) as tmp:
        (tmp / OPEN_CLIP_CONFIG).write_text(json.dumps(config, indent=2))
        save_file(weights, str(tmp / OPEN_CLIP_WEIGHTS), metadata={"format": "pt"})
    return Path(dst)


@exit_on_error
def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="a villa CLIP checkpoint (Stage 2 or pretraining best.pt / last.pt)")
    p.add_argument("dst", help="the file (--format villa) or folder (--format open_clip) to write")
    p.add_argument(
        "--format", default="villa", choices=["villa", "open_clip"], help="villa checkpoint or open_clip folder"
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float16", "bfloat16", "float32"],
        help="weights' dtype (default: float16 for villa, float32 for open_clip)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing open_clip folder")
    a = p.parse_args(argv)
    if a.format == "open_clip":
        dst = export_open_clip(Path(a.src), Path(a.dst), a.dtype or "float32", a.overwrite)
        print(f"exported {a.src} -> {dst}/ (open_clip: create_model_and_transforms('local-dir:{dst}'))")
        return dst
    dst = export_checkpoint(Path(a.src), Path(a.dst), a.dtype or "float16")
    print(f"exported {a.src} -> {dst} ({dst.stat().st_size / 2**20:.1f} MiB, {a.dtype or 'float16'})")
    return dst


if __name__ == "__main__":
    main()
