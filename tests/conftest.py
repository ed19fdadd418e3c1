"""Shared fixtures: real MNIST digits ($VILLA_MNIST_DIR, or data/mnist), small generated DocMNIST datasets."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs ``-n auto``), the cores are shared between the workers: each worker's
    torch, and the CLI subprocesses it starts, get cores / workers threads instead of all of them (oversubscribed
    OpenMP threads spin-wait on each other and run several times slower)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch

        threads = max(1, (os.cpu_count() or 1) // int(workers))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def mnist_dir() -> str:
    d = os.environ.get("VILLA_MNIST_DIR") or (
        str(ROOT / "data" / "mnist") if (ROOT / "data" / "mnist").is_dir() else ""
    )
    if not d:
        pytest.skip("no MNIST: set VILLA_MNIST_DIR or run python -m docmnist.mnist --download (see README)")
    return d


@pytest.fixture(scope="session")
def mnist() -> str:
    return mnist_dir()


@pytest.fixture(scope="session")
def docmnist_16(tmp_path_factory, mnist) -> Path:
    """The paper-scale train budget (30000) at target 16, smaller val/test."""
    from docmnist.generate_docmnist import generate

    out = tmp_path_factory.mktemp("dm16")
    return generate(
        30000, 16, seed=23, out_dir=str(out), mnist_dir=mnist, val_budget=2000, test_budget=2000, progress=False
    )


@pytest.fixture(scope="session")
def tiny_docmnist(tmp_path_factory, mnist) -> Path:
    """A tiny DocMNIST for pipeline tests."""
    from docmnist.generate_docmnist import generate

    out = tmp_path_factory.mktemp("dmtiny")
    return generate(
        1200, 16, seed=23, out_dir=str(out), mnist_dir=mnist, val_budget=300, test_budget=300, progress=False
    )


@pytest.fixture(scope="session")
def synthetic_stage1(tmp_path_factory, mnist):
    """A small DocMNIST with encoder-free embeddings that carry each region's attributes (villa.synthetic)."""
    from docmnist.generate_docmnist import generate
    from villa.data.annotations import load_annotations
    from villa.data.synthetic import write_synthetic_embeddings
    from villa.data.vocab import load_vocab

    out = tmp_path_factory.mktemp("synth")
    data = generate(
        4000, 16, seed=23, out_dir=str(out), mnist_dir=mnist, val_budget=800, test_budget=400, progress=False
    )
    vocab = load_vocab("docmnist")
    ann = load_annotations(data, vocab, check_images=False)
    emb = write_synthetic_embeddings(ann, vocab, out / "embeddings", dim=32, seed=0)
    return data, emb


@pytest.fixture(scope="session")
def tiny_mapping(tiny_docmnist, tmp_path_factory):
    """Stage 1 on the tiny DocMNIST with synthetic embeddings: a real mapping.feather."""
    from villa.data.annotations import load_annotations
    from villa.data.synthetic import write_synthetic_embeddings
    from villa.data.vocab import load_vocab
    from villa.stage1.train import train_stage1

    tmp = tmp_path_factory.mktemp("map")
    vocab = load_vocab("docmnist")
    emb = write_synthetic_embeddings(
        load_annotations(tiny_docmnist, vocab, check_images=False), vocab, tmp / "emb", dim=32
    )
    cfg = compose_config(
        "stage1",
        [
            f"data_dir={tiny_docmnist}",
            f"embeddings_dir={emb}",
            f"mapping_path={tmp / 'mapping.feather'}",
            f"checkpoint_dir={tmp / 'ck'}",
            "epochs=4",
            "lr=1e-3",
            "batch_size=16",
            "device=cpu",
            "progress=false",
        ],
    )
    train_stage1(cfg)
    return tmp / "mapping.feather"


def mnist_test_files_only(mnist: str, dest: Path) -> Path:
    """A copy of MNIST holding only its test files (as offline machines had before the full set)."""
    dest.mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        src = Path(mnist) / name
        if not src.is_file():
            pytest.skip(f"{src} missing")
        shutil.copy(src, dest / name)
    return dest


def compose_config(name: str, overrides: list[str]):
    """The real Hydra config with test overrides (lightning-hydra-template style)."""
    from villa.core.config import compose_config as compose

    return compose(name, overrides)
