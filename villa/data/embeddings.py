"""Region and attribute embeddings on disk: one contiguous (N, D) array plus an index, and what made them.

Layout of an embeddings folder (default ``<dataset>/embeddings``):

- ``regions.npy``: (R, D) float16/float32, memory-mappable; rows in annotation order (image by image).
- ``index.feather``: image_id, split, start, count: image i's regions are rows ``start:start+count``.
- ``attributes.npy``: (A, D) float32, L2-normalised, in vocabulary order; names in ``meta.json``.
- ``meta.json``: the encoder (model, pretrained source, weights hash, dims), the region-path options, counts.

The folder is written under a temporary name and renamed when complete. :func:`open_embeddings` refuses
region and attribute embeddings that come from different encoders, or another vocabulary than expected.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather

from villa.core.env import resolve_weights
from villa.core.errors import VillaError
from villa.core.io import PathLike
from villa.data.vocab import Vocabulary

FORMAT = "villa-embeddings-v1"


def weights_id(pretrained: Optional[str]) -> str:
    """Identify a weights source: the tag itself, or a hash of a checkpoint file's bytes."""
    if pretrained is None:
        return "none"
    p = Path(resolve_weights(pretrained))
    if p.is_file():
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return f"sha256:{h.hexdigest()[:16]}"
    return pretrained


def encoder_meta(source: dict[str, Any]) -> dict[str, Any]:
    return {
        **source,
        "weights_id": weights_id(source.get("pretrained") if source.get("pretrained") != "none" else None),
    }


def same_encoder(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("model", "weights_id", "embed_dim")
    return all(a.get(k) == b.get(k) for k in keys)


def describe(enc: dict[str, Any]) -> str:
    return f"{enc.get('model')} (pretrained={enc.get('pretrained')}, {enc.get('weights_id')}, D={enc.get('embed_dim')})"


@dataclass
class EmbeddingSet:
    """Opened embeddings: regions memory-mapped, attributes in memory."""

    root: Path
    meta: dict[str, Any]
    regions: np.ndarray  # (R, D) memmap
    image_id: np.ndarray  # (I,)
    split: np.ndarray  # (I,)
    start: np.ndarray  # (I,)
    count: np.ndarray  # (I,)
    attributes: np.ndarray  # (A, D) float32
    attribute_names: list[str]

    @property
    def encoder(self) -> dict[str, Any]:
        return self.meta["encoder"]

    @property
    def dim(self) -> int:
        return int(self.regions.shape[1])

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.count)])


def write_index(path: Path, image_id: np.ndarray, split: np.ndarray, counts: np.ndarray) -> None:
    start = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    table = pa.table(
        {
            "image_id": pa.array(image_id),
            "split": pa.array(split.astype(str), pa.string()),
            "start": pa.array(start),
            "count": pa.array(counts.astype(np.int64)),
        }
    )
    feather.write_feather(table, str(path), compression="zstd")


def write_meta(path: Path, meta: dict[str, Any]) -> None:
    path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def open_embeddings(path: PathLike, vocab: Optional[Vocabulary] = None) -> EmbeddingSet:
    """Open an embeddings folder; check it is complete, from one encoder, and (optionally) of ``vocab``."""
    root = Path(path)
    if not root.is_dir():
        raise VillaError(f"embeddings folder not found: {root}; run preprocessing first (python -m preprocess ...)")
    for name in ("meta.json", "regions.npy", "index.feather", "attributes.npy"):
        if not (root / name).is_file():
            raise VillaError(f"{root} has no {name}: incomplete embeddings; run preprocessing again")
    fix = "delete it and run preprocessing again"
    try:
        meta = json.loads((root / "meta.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VillaError(f"{root}/meta.json is corrupt ({type(e).__name__}); {fix}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise VillaError(f"{root}/meta.json is not {FORMAT}; re-run preprocessing with this villa")
    reg_enc, att_enc = meta["encoder"], meta["attribute_encoder"]
    if not same_encoder(reg_enc, att_enc):
        raise VillaError(
            f"{root}: region embeddings come from {describe(reg_enc)} but attribute embeddings from "
            f"{describe(att_enc)}; embed both with the same encoder"
        )
    loaded = {}
    for name, kw in (("regions.npy", {"mmap_mode": "r"}), ("attributes.npy", {})):
        try:  # a truncated .npy fails in np.load (its header promises more bytes than the file has)
            loaded[name] = np.load(root / name, allow_pickle=False, **kw)
        except (ValueError, OSError, EOFError) as e:
            raise VillaError(f"{root / name} is truncated or corrupt ({type(e).__name__}); {fix}") from e
        if loaded[name].ndim != 2:
            raise VillaError(f"{root / name} is not an (N, D) array (shape {loaded[name].shape}); {fix}")
    regions, attributes = loaded["regions.npy"], loaded["attributes.npy"]
    try:
        idx = feather.read_table(str(root / "index.feather"))
    except Exception as e:  # Arrow's errors for a truncated or foreign file
        raise VillaError(f"{root / 'index.feather'} is truncated or corrupt ({type(e).__name__}); {fix}") from e
    missing = [c for c in ("image_id", "split", "start", "count") if c not in idx.column_names]
    if missing:
        raise VillaError(
            f"{root / 'index.feather'} lacks the column(s) {', '.join(missing)} (it needs image_id, split, "
            f"start, count); {fix}"
        )
    names = list(meta["attribute_names"])
    if vocab is not None and names != list(vocab.attributes) and sorted(names) == sorted(vocab.attributes):
        k = next(i for i, (a, b) in enumerate(zip(names, vocab.attributes)) if a != b)
        raise VillaError(
            f"{root}: attribute embeddings hold the {len(names)} attributes of {vocab.name!r} in another order "
            f"(#{k}: {names[k]!r} there, {vocab.attributes[k]!r} in the dataset config); re-run preprocessing with "
            "this dataset config"
        )
    if vocab is not None and names != list(vocab.attributes):
        raise VillaError(
            f"{root}: attribute embeddings are for {len(names)} attributes of vocabulary {meta.get('vocab')!r}, "
            f"not the {len(vocab)} of {vocab.name!r}; re-run preprocessing with this dataset config"
        )
    if vocab is not None and meta.get("vocab_digest") not in (None, vocab.digest):
        raise VillaError(
            f"{root}: attribute embeddings were made from other prompt templates (or groups) than the dataset "
            f"config {vocab.name!r} now has; re-run preprocessing with this dataset config"
        )
    if regions.shape[1] != attributes.shape[1]:
        raise VillaError(f"{root}: region dim {regions.shape[1]} != attribute dim {attributes.shape[1]}")
    count = idx.column("count").to_numpy()
    if count.sum() != len(regions):
        raise VillaError(f"{root}: index covers {count.sum()} regions but regions.npy has {len(regions)}; re-run")
    return EmbeddingSet(
        root=root,
        meta=meta,
        regions=regions,
        image_id=idx.column("image_id").to_numpy(),
        split=np.asarray(idx.column("split").to_numpy(zero_copy_only=False)).astype(str),
        start=idx.column("start").to_numpy(),
        count=count,
        attributes=attributes.astype(np.float32),
        attribute_names=names,
    )
