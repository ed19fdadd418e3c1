"""The inspection report (python -m villa.inspect): rendered by headless Chromium, its DOM and a screenshot checked."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from villa.data.annotations import load_annotations
from villa.data.attributes import AttributeMatcher
from villa.data.vocab import load_vocab, split_sentences

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium (.ci/run installs Debian's chromium)")


def inspect(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "villa.inspect", *args], capture_output=True, text=True, cwd=cwd, env=env
    )


def browser(*args: str, page: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,1400"]
    r = subprocess.run([CHROMIUM, *flags, *args, page.as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


class Dom(HTMLParser):
    """Elements of the page Chromium rendered (--dump-dom): sections, boxes, marks, chips, region rows, summary."""

    def __init__(self):
        super().__init__()
        self.sections: list[dict] = []
        self.summary: dict[str, str] = {}
        self._key = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = a.get("class", "")
        if tag == "section" and "image" in cls.split():
            self.sections.append(
                {
                    "regions": int(a["data-regions"]),
                    "image": a["data-image"],
                    "boxes": 0,
                    "marks": [],
                    "chips": [],
                    "rows": 0,
                    "img": 0,
                }
            )
        elif self.sections and tag == "rect" and cls == "box":
            self.sections[-1]["boxes"] += 1
        elif self.sections and tag == "mark":
            self.sections[-1]["marks"].append((a["data-attr"], cls))
        elif self.sections and tag == "span" and cls.startswith("chip"):
            self.sections[-1]["chips"].append((a["data-attr"], cls))
        elif self.sections and tag == "tr" and cls == "region":
            self.sections[-1]["rows"] += 1
        elif self.sections and tag == "img":
            self.sections[-1]["img"] += 1
        elif tag == "div" and "data-key" in a:
            self._key = a["data-key"]

    def handle_data(self, data):
        if self._key and data.strip():
            self.summary[self._key] = data.strip()
            self._key = None


def rendered(page: Path) -> Dom:
    dom = Dom()
    dom.feed(browser("--dump-dom", page=page).stdout)
    return dom


@needs_browser
def test_report_in_a_browser_shows_extraction_and_mapping(tiny_docmnist, tiny_mapping, tmp_path):
    """Per image: every region drawn (one box each), every mention marked with its status, each region's mapped
    attributes as chips marked right or wrong against reg_to_attr, with what was missed; the summary's counts are
    the dataset's; a screenshot is not blank."""
    page = tmp_path / "report.html"
    r = inspect(
        f"data_dir={tiny_docmnist}", f"mapping_path={tiny_mapping}", "split=val", "limit=6", f"out={page}", cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"wrote {page} (6 images, extraction and mapping)" in r.stdout
    vocab = load_vocab("docmnist")
    ann = load_annotations(tiny_docmnist, vocab, check_images=False)
    rows = np.flatnonzero(ann.split == "val")[:6]
    import pyarrow.feather as feather

    mapped = feather.read_table(tiny_mapping).column("assigned_attributes").to_pylist()
    gold = ann.region_attribute_matrix(len(vocab))
    matcher = AttributeMatcher(vocab)
    dom = rendered(page)
    assert len(dom.sections) == 6
    for sec, row in zip(dom.sections, rows):
        n = int(ann.n_regions[row])
        assert (
            sec["image"] == ann.filepath[row] and sec["regions"] == sec["boxes"] == sec["rows"] == n and sec["img"] == 1
        )
        mentions = [m for s in split_sentences(ann.text[row]) for m in matcher.sentence_mentions(s)]
        assert [a for a, _ in sec["marks"]] == [vocab.attributes[m.attribute] for m in mentions]
        assert {c for _, c in sec["marks"]} == {"positive"}  # DocMNIST captions have no negation
        a = int(ann.region_offsets[row])
        want = []
        for k in range(n):
            got = mapped[row][k]
            truth = {vocab.attributes[j] for j in np.flatnonzero(gold[a + k])}
            want += [(x, "chip right" if x in truth else "chip wrong") for x in got]
            want += [(x, "chip missed") for x in sorted(truth - set(got))]
        assert sec["chips"] == want
    assert dom.summary["images"] == "6" and dom.summary["regions"] == str(int(ann.n_regions[rows].sum()))
    shot = tmp_path / "shot.png"
    browser(f"--screenshot={shot}", page=page)
    from PIL import Image

    px = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert px.shape[:2] == (1400, 1200) and px.std() > 20 and len(np.unique(px.reshape(-1, 3), axis=0)) > 500


@needs_browser
def test_report_without_a_mapping_shows_extraction_only(tiny_docmnist, tmp_path):
    page = tmp_path / "r.html"
    r = inspect(
        f"data_dir={tiny_docmnist}", f"mapping_path={tmp_path / 'none.feather'}", "limit=3", f"out={page}", cwd=tmp_path
    )
    assert r.returncode == 0 and "extraction only (no mapping.feather yet)" in r.stdout
    dom = rendered(page)
    assert len(dom.sections) == 3 and all(s["rows"] == 0 and s["chips"] == [] and s["marks"] for s in dom.sections)
    assert "attributes_per_region" not in dom.summary and dom.summary["images"] == "3"


def test_report_refuses_bad_input_in_one_line(tiny_docmnist, tiny_mapping, tmp_path):
    r = inspect(
        f"data_dir={tiny_docmnist}",
        f"mapping_path={tiny_mapping}",
        "split=holdout",
        f"out={tmp_path / 'x.html'}",
        cwd=tmp_path,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert re.search(r"error: .* has no images in split 'holdout' \(it has: test, train, val\)", r.stderr)
    r = inspect(f"data_dir={tmp_path / 'missing'}", cwd=tmp_path)
    assert r.returncode == 2 and "error: dataset folder not found" in r.stderr
    assert not (tmp_path / "x.html").exists()


def test_report_marks_negated_and_uncertain_mentions():
    """The caption's marks carry each mention's status (the extraction's matcher), escaped as HTML."""
    from villa.data.vocab import vocab_from_dict
    from villa.inspect import _caption_html

    vocab = vocab_from_dict(
        {
            "name": "v",
            "negation": "default",
            "uncertainty": "default",
            "groups": [{"name": "g", "attributes": ["bus", "tower"], "templates": ["{}"]}],
        }
    )
    page, counts = _caption_html("A bus <b>, no tower. Possibly a bus", AttributeMatcher(vocab))
    assert counts == {"positive": 1, "negated": 1, "uncertain": 1}
    assert page == (
        'A <mark class="positive" data-attr="bus" title="bus: positive">bus</mark> &lt;b&gt;, no '
        '<mark class="negated" data-attr="tower" title="tower: negated">tower</mark>. Possibly a '
        '<mark class="uncertain" data-attr="bus" title="bus: uncertain">bus</mark>.'
    )
