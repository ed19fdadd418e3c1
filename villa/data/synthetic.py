"""Encoder-free embeddings for checking Stage 1: each region = sum of fixed random vectors of its attributes + noise.

Attribute embeddings are independent random unit vectors, so the zero-shot rule (raw region vs attribute
embedding) is near chance while a correct Stage 1 can learn the mapping. Used by tests and benchmarks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from villa.core.io import PathLike, atomic_dir
from villa.data.annotations import Annotations
from villa.data.embeddings import FORMAT, write_index, write_meta
from villa.data.vocab import Vocabulary


def write_synthetic_embeddings(
    ann: Annotations,
    vocab: Vocabulary,
    out: PathLike,
    dim: int = 64,
    noise: float = 0.3,
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    rng = np.random.default_rng(seed)
    a = len(vocab)
    gold = ann.region_attribute_matrix(a)
    if gold is None:
        raise ValueError("synthetic embeddings need reg_to_attr")
    basis = rng.standard_normal((a, dim)).astype(np.float32) / np.sqrt(dim)
    regions = gold.astype(np.float32) @ basis + noise * rng.standard_normal((len(gold), dim)).astype(
        np.float32
    ) / np.sqrt(dim)
    attrs = rng.standard_normal((a, dim)).astype(np.float32)
    attrs /= np.linalg.norm(attrs, axis=1, keepdims=True)
    enc = {"model": "synthetic", "pretrained": "none", "weights_id": f"synthetic-{seed}", "embed_dim": dim}
    with atomic_dir(out, overwrite=True) as tmp:
        np.save(tmp / "regions.npy", regions.astype(dtype))
        np.save(tmp / "attributes.npy", attrs)
        write_index(tmp / "index.feather", ann.image_id, ann.split, ann.n_regions)
        write_meta(
            tmp / "meta.json",
            {
                "format": FORMAT,
                "vocab": vocab.name,
                "attribute_names": list(vocab.attributes),
                "vocab_digest": vocab.digest,
                "encoder": enc,
                "attribute_encoder": enc,
                "dtype": dtype,
                "images": int(ann.n_images),
                "regions": int(len(regions)),
                "dim": dim,
            },
        )
    return Path(out)
