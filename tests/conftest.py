"""Shared fixtures: real MNIST digits (the shared test split here), small generated DocMNIST datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_MNIST = ROOT.parent / "shared" / "data" / "mnist"


def mnist_dir() -> str:
    d = os.environ.get("VILLA_MNIST_DIR") or (str(SHARED_MNIST) if SHARED_MNIST.is_dir() else "")
    if not d:
        pytest.skip("no MNIST: set VILLA_MNIST_DIR (see README)")
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
        30000,
        16,
        seed=23,
        out_dir=str(out),
        mnist_dir=mnist,
        val_budget=2000,
        test_budget=2000,
        progress=False,
    )


@pytest.fixture(scope="session")
def tiny_docmnist(tmp_path_factory, mnist) -> Path:
    """A tiny DocMNIST for pipeline tests."""
    from docmnist.generate_docmnist import generate

    out = tmp_path_factory.mktemp("dmtiny")
    return generate(
        1200, 16, seed=23, out_dir=str(out), mnist_dir=mnist, val_budget=300, test_budget=300, progress=False
    )
