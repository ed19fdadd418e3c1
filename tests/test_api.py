"""docs/api.md: every Python block runs, in order, in one namespace, in an empty folder; and the API's values."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def test_every_example_in_docs_api_runs(tmp_path, monkeypatch, mnist, capsys):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "api.md").read_text(), re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), namespace)  # noqa: S102 - the page's own examples
    out = capsys.readouterr().out
    assert "torch.Size([2, 128]) torch.Size([2, 128]) torch.Size([1, 128])" in out
    assert (tmp_path / "api_example" / "ckpt" / "last.pt").is_file()


def test_import_villa_is_light():
    code = "import sys, villa; print('torch' in sys.modules, 'hydra' in sys.modules, len(villa.__all__))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.stdout.split() == ["False", "False", "7"]


def test_encode_regions_matches_the_region_path_and_checks_boxes():
    import villa
    from villa.encoders import RegionEncoder
    from villa.errors import VillaError

    torch.manual_seed(0)
    model = villa.load("none", model="villa-tiny-rn")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    b = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    z = model.encode_regions([a, b], [[[0, 0, 32, 24], [10, 10, 60, 40]], [[0, 0, 32, 32]]], normalize=False)
    enc = RegionEncoder(model.clip.model.visual).eval()
    with torch.no_grad():
        ref_a = enc(torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255,
                    torch.tensor([[0, 0, 32, 24], [10, 10, 60, 40]], dtype=torch.float32), torch.zeros(2, dtype=torch.long))  # fmt: skip
        ref_b = enc(torch.from_numpy(b).permute(2, 0, 1)[None].float() / 255,
                    torch.tensor([[0, 0, 32, 32]], dtype=torch.float32), torch.zeros(1, dtype=torch.long))  # fmt: skip
    torch.testing.assert_close(z, torch.cat([ref_a, ref_b]), rtol=1e-4, atol=1e-5)
    with pytest.raises(VillaError, match="outside its 64x48 image"):
        model.encode_regions([a], [[[0, 0, 65, 10]]])
    t = model.encode_text(["red", "blue"], templates=["the color is {}", "{}"])
    torch.testing.assert_close(t.norm(dim=1), torch.ones(2))
