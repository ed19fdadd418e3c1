"""Embed any dataset that follows docs/data_format.md.

python -m preprocess --data_dir=path/to/dataset --dataset_config=path/to/vocab.yaml --model=RN50 --pretrained=openai
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from villa.core.errors import exit_on_error
from villa.core.log import setup_logging


def build_parser(default_config: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m preprocess",
        description="Frozen CLIP embeddings of every region and attribute of a dataset "
        "(torchrun --nproc_per_node=N -m preprocess ... shards the images over N processes).",
    )
    p.add_argument("--data_dir", required=True, help="dataset folder (a relative name resolves under data/)")
    p.add_argument(
        "--dataset_config",
        default=default_config,
        required=default_config is None,
        help="vocabulary + templates: a name under configs/dataset/ or a YAML path",
    )
    p.add_argument("--model", default="RN50", help="open_clip model name (RN50, villa-tiny-rn, ...)")
    p.add_argument("--pretrained", default="openai", help="open_clip tag, checkpoint path, or none")
    p.add_argument("--batch_size", type=int, default=64, help="images per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--num_workers", type=int, default=2, help="DataLoader workers reading images")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="stored region dtype")
    p.add_argument("--normalize", action="store_true", help="CLIP mean/std normalisation (the original: none)")
    p.add_argument("--input_size", type=int, default=None, help="resize images to this square size first")
    p.add_argument("--out_dir", default=None, help="embeddings folder (default: <data_dir>/embeddings)")
    p.add_argument("--splits", nargs="+", default=["train"], help="splits that must be non-empty")
    p.add_argument("--seed", type=int, default=0, help="seeds random init when --pretrained=none")
    p.add_argument("--quiet", action="store_true")
    return p


@exit_on_error
def main(argv: Optional[Sequence[str]] = None, default_config: Optional[str] = None):
    from villa.preprocess import embed_dataset

    setup_logging()
    a = build_parser(default_config).parse_args(argv)
    return embed_dataset(
        a.data_dir,
        dataset_config=a.dataset_config,
        model=a.model,
        pretrained=a.pretrained,
        batch_size=a.batch_size,
        device=a.device,
        num_workers=a.num_workers,
        dtype=a.dtype,
        normalize=a.normalize,
        input_size=a.input_size,
        out_dir=a.out_dir,
        required_splits=a.splits,
        progress=not a.quiet,
        seed=a.seed,
    )


if __name__ == "__main__":
    main()
