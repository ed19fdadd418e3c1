"""Export a training checkpoint as a compact, weights-only CLIP checkpoint (what villa ships in villa/assets/).

    python -m villa.export checkpoints/pretrain/best.pt villa/assets/villa-small-rn-docmnist.pt [--dtype float16]

Keeps what describes the model (format, model name and config, kind, epoch, history, resolved config); drops the
optimiser, scheduler and RNG states. ``create_clip(pretrained=<exported file>)`` loads it like the original.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from villa.encoders import is_villa_checkpoint
from villa.errors import VillaError, exit_on_error
from villa.training import load_checkpoint, save_checkpoint

KEEP = (
    "format", "kind", "model_name", "model_cfg", "epoch", "best_val", "history", "config", "started_from", "inputs",
    "data_pools",
)  # fmt: skip


def export_checkpoint(src: Path, dst: Path, dtype: str = "float16") -> Path:
    state = load_checkpoint(src)
    if not is_villa_checkpoint(state):
        raise VillaError(
            f"{src} is not a villa CLIP checkpoint (format villa-clip); export a Stage 2 / pretrain checkpoint"
        )
    dt = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    out = {k: state[k] for k in KEEP if k in state}
    out["state_dict"] = {k: (v.to(dt) if v.is_floating_point() else v) for k, v in state["state_dict"].items()}
    out["exported_from"] = {"file": Path(src).name, "dtype": dtype}
    save_checkpoint(dst, out)
    return dst


@exit_on_error
def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    a = p.parse_args(argv)
    dst = export_checkpoint(Path(a.src), Path(a.dst), a.dtype)
    print(f"exported {a.src} -> {dst} ({dst.stat().st_size / 2**20:.1f} MiB, {a.dtype})")
    return dst


if __name__ == "__main__":
    main()
