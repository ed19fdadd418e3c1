"""One self-contained HTML page showing what villa read and decided for a dataset, image by image.

    python -m villa.inspect data_dir=data/my_photos dataset=my_vocab.yaml [split=train] [limit=50] [out=report.html]

Per image: the image with its regions drawn and numbered; the caption with every attribute mention highlighted in
place (counted, negated, uncertain: the matcher of villa/data/attributes.py); and, once Stage 1 has written
``mapping.feather``, each region's mapped attributes with their scores, and where the dataset has region labels
(``reg_to_attr``) which of them are right, wrong, or missed. At the top, a summary: images, regions, attributes
per caption and per region, the caption attributes that reached a region, and the regions that got none or every
one of their caption's attributes. Without a mapping the page shows the extraction only. Images are embedded
(downscaled to ``max_side``), so the page needs no server and can be mailed.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np
from omegaconf import DictConfig

from villa.core.errors import VillaError

log = logging.getLogger(__name__)

PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324", "#469990", "#808000"]

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; margin: 0 0 4px; }
.summary { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 6px 18px;
  background: #f5f5f7; padding: 12px 16px; border-radius: 8px; margin: 12px 0 20px; }
.summary div b { display: block; font-size: 18px; }
.image { display: grid; grid-template-columns: minmax(200px, 360px) 1fr; gap: 16px; border-top: 1px solid #ddd;
  padding: 14px 0; }
.frame { position: relative; }
.frame img { width: 100%; display: block; image-rendering: pixelated; }
.frame svg { position: absolute; left: 0; top: 0; width: 100%; height: 100%; }
.box { fill: none; stroke-width: 2; vector-effect: non-scaling-stroke; }
.boxlabel { font-weight: bold; paint-order: stroke; stroke: white; }
.name { color: #666; font-size: 12px; }
.caption { margin: 4px 0 10px; }
mark { border-radius: 3px; padding: 0 2px; }
mark.positive { background: #c8f0c8; }
mark.negated { background: #f7c6c6; text-decoration: line-through; }
mark.uncertain { background: #fde8a8; }
table { border-collapse: collapse; }
td { padding: 2px 8px 2px 0; vertical-align: top; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 4px; }
.chip { display: inline-block; border-radius: 10px; padding: 0 8px; margin: 1px 2px; font-size: 12px;
  background: #e4e8f5; }
.chip.right { background: #c8f0c8; } .chip.wrong { background: #f7c6c6; }
.chip.missed { background: none; border: 1px dashed #999; color: #666; }
.none { color: #999; font-size: 12px; }
.legend mark, .legend .chip { margin-right: 6px; }
"""


def _image_data_uri(path: Path, max_side: int) -> str:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((max_side, max_side))
            buf = io.BytesIO()
            im.save(buf, format="PNG" if max(im.size) <= 256 else "JPEG", quality=85)
    except Exception as e:
        raise VillaError(f"cannot read image {path} ({type(e).__name__}: {e}); replace the file") from e
    kind = "png" if buf.getvalue()[:4] == b"\x89PNG" else "jpeg"
    return f"data:image/{kind};base64," + base64.b64encode(buf.getvalue()).decode()


def _caption_html(text: str, matcher) -> tuple[str, dict[str, int]]:
    """The caption's sentences with each mention marked by its status; and counts per status."""
    from villa.data.vocab import split_sentences

    out, counts = [], {"positive": 0, "negated": 0, "uncertain": 0}
    for i, sentence in enumerate(split_sentences(text or "")):
        parts, at = [], 0
        for m in matcher.sentence_mentions(sentence, i):
            counts[m.status] += 1
            name = matcher.vocab.attributes[m.attribute]
            parts.append(html.escape(sentence[at : m.start]))
            parts.append(
                f'<mark class="{m.status}" data-attr="{html.escape(name)}" title="{html.escape(name)}: {m.status}">'
                f"{html.escape(sentence[m.start : m.end])}</mark>"
            )
            at = m.end
        parts.append(html.escape(sentence[at:]))
        out.append("".join(parts))
    return ". ".join(out) + ("." if out else ""), counts


def _chips(assigned: list[str], scores: Optional[list[float]], gold: Optional[set[str]]) -> str:
    chips = []
    for k, a in enumerate(assigned):
        kind = "" if gold is None else (" right" if a in gold else " wrong")
        score = f" {scores[k]:.2f}" if scores is not None and k < len(scores) else ""
        chips.append(f'<span class="chip{kind}" data-attr="{html.escape(a)}">{html.escape(a)}{score}</span>')
    if gold is not None:
        for a in sorted(gold - set(assigned)):
            chips.append(f'<span class="chip missed" data-attr="{html.escape(a)}">{html.escape(a)} missed</span>')
    return "".join(chips) or '<span class="none">nothing</span>'


def summarize(ann, vocab, rows: np.ndarray, assigned: Optional[np.ndarray]) -> dict[str, Any]:
    """The page's summary for the images ``rows`` (``assigned``: the mapping's (R, A) bool, or None)."""
    from villa.stage1.mapping import mapping_degeneracy

    image_attrs = ann.attribute_matrix(len(vocab))
    out: dict[str, Any] = {
        "images": int(len(rows)),
        "regions": int(ann.n_regions[rows].sum()),
        "attributes_per_caption": float(image_attrs[rows].sum(1).mean()) if len(rows) else 0.0,
        "captions_without_attribute": int((image_attrs[rows].sum(1) == 0).sum()),
    }
    if assigned is None:
        return out
    region_rows = np.concatenate([np.arange(ann.region_offsets[r], ann.region_offsets[r + 1]) for r in rows])
    sub = assigned[region_rows]
    offsets = np.concatenate([[0], np.cumsum(ann.n_regions[rows])])
    deg = mapping_degeneracy(sub, image_attrs[rows], offsets)
    region_image = np.repeat(np.arange(len(rows)), ann.n_regions[rows])
    reached = np.zeros((len(rows), len(vocab)), bool)
    np.logical_or.at(reached, region_image, sub)
    n_caption = int(image_attrs[rows].sum())
    out.update(
        attributes_per_region=deg["attributes_per_region"],
        caption_attributes_mapped=float((reached & image_attrs[rows]).sum() / n_caption) if n_caption else 0.0,
        regions_with_nothing=float((sub.sum(1) == 0).mean()) if len(sub) else 0.0,
        regions_with_everything=deg["all_attributes_share"],
    )
    return out


def render(
    ann, vocab, rows: np.ndarray, mapping: Optional[dict[str, Any]], title: str, max_side: int = 360
) -> tuple[str, dict[str, Any]]:
    """The report's HTML and its summary."""
    from villa.data.attributes import AttributeMatcher

    matcher = AttributeMatcher(vocab)
    gold = ann.region_attribute_matrix(len(vocab)) if mapping is not None else None
    assigned = mapping["assigned"] if mapping is not None else None
    summary = summarize(ann, vocab, rows, assigned)
    labels = {
        "images": "images shown",
        "regions": "regions",
        "attributes_per_caption": "attributes per caption",
        "captions_without_attribute": "captions without an attribute",
        "attributes_per_region": "attributes per region",
        "caption_attributes_mapped": "caption attributes that reached a region",
        "regions_with_nothing": "regions given nothing",
        "regions_with_everything": "regions given every caption attribute",
    }
    cells = []
    for k, v in summary.items():
        shown = (
            f"{100 * v:.0f}%"
            if k in ("caption_attributes_mapped", "regions_with_nothing", "regions_with_everything")
            else (f"{v:.2f}" if isinstance(v, float) else str(v))
        )
        cells.append(f'<div data-key="{k}"><b>{shown}</b>{labels[k]}</div>')
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        '<div class="legend name">caption: <mark class="positive">counted</mark><mark class="negated">negated</mark>'
        '<mark class="uncertain">uncertain</mark> regions: <span class="chip">mapped (score)</span>'
        + (
            '<span class="chip right">right</span><span class="chip wrong">wrong</span>'
            '<span class="chip missed">missed</span>'
            if gold is not None
            else ""
        )
        + ("" if mapping is not None else " (no mapping.feather yet: extraction only)")
        + "</div>",
        f'<div class="summary">{"".join(cells)}</div>',
    ]
    for r in rows:
        parts.append(_image_section(ann, int(r), matcher, mapping, gold, vocab.attributes, max_side))
    parts.append("</body></html>")
    return "\n".join(parts), summary


def _image_section(ann, r: int, matcher, mapping: Optional[dict[str, Any]], gold, names, max_side: int) -> str:
    """One image's section: the image with its numbered boxes, the caption marked, each region's chips."""
    assigned = mapping["assigned"] if mapping is not None else None
    a, b = int(ann.region_offsets[r]), int(ann.region_offsets[r + 1])
    w, h = (int(v) for v in ann.image_size[r])
    path = ann.root / ann.filepath[r]
    caption, _ = _caption_html(ann.text[r], matcher)
    boxes, region_rows = [], []
    fs = max(w, h) / 28  # about 12 px at the page's image width
    for k, (x0, y0, x1, y1) in enumerate(ann.boxes[a:b].tolist()):
        color = PALETTE[k % len(PALETTE)]
        boxes.append(
            f'<rect class="box" x="{x0:.1f}" y="{y0:.1f}" width="{x1 - x0:.1f}" height="{y1 - y0:.1f}" '
            f'stroke="{color}"/><text class="boxlabel" x="{x0 + fs / 4:.1f}" y="{y0 + fs:.1f}" '
            f'fill="{color}" font-size="{fs:.1f}" style="stroke-width:{fs / 5:.2f}px">{k + 1}</text>'
        )
        if mapping is not None:
            got = [names[j] for j in np.flatnonzero(assigned[a + k])]
            scores = mapping["scores"][a + k] if mapping.get("scores") is not None else None
            g = {names[j] for j in np.flatnonzero(gold[a + k])} if gold is not None and ann_labelled(ann, r) else None
            region_rows.append(
                f'<tr class="region"><td><span class="swatch" style="background:{color}"></span>{k + 1}</td>'
                f"<td>{_chips(got, scores, g)}</td></tr>"
            )
    table = f"<table>{''.join(region_rows)}</table>" if region_rows else ""
    return (
        f'<section class="image" data-image="{html.escape(str(ann.filepath[r]))}" data-regions="{b - a}">'
        f'<div class="frame"><img alt="{html.escape(str(ann.filepath[r]))}" src="{_image_data_uri(path, max_side)}">'
        f'<svg viewBox="0 0 {w} {h}" preserveAspectRatio="none">{"".join(boxes)}</svg></div>'
        f'<div><div class="name">{html.escape(str(ann.filepath[r]))} · {ann.split[r]} · {b - a} regions</div>'
        f'<div class="caption">{caption}</div>{table}</div></section>'
    )


def ann_labelled(ann, row: int) -> bool:
    return ann.labelled is None or bool(ann.labelled[row])


def read_mapping(path: Path, ann, vocab) -> Optional[dict[str, Any]]:
    """mapping.feather's assigned attributes (and scores) as (R, A) / per-region lists, checked to be this
    dataset's; None when the file does not exist."""
    import pyarrow.feather as feather

    from villa.stage1.mapping import read_assigned

    if not path.is_file():
        return None
    table = feather.read_table(str(path))
    if "assigned_attributes" not in table.column_names:
        raise VillaError(f"{path} has no assigned_attributes column: is it Stage 1's mapping.feather?")
    ids = table.column("image_id").to_numpy()
    if len(ids) != ann.n_images or not np.array_equal(ids, ann.image_id):
        raise VillaError(f"{path} was made for another dataset than {ann.root}; re-run Stage 1 or pass mapping_path")
    assigned = read_assigned(path, vocab)
    if len(assigned) != len(ann.boxes):
        raise VillaError(f"{path} has {len(assigned)} regions, the dataset {len(ann.boxes)}; re-run Stage 1")
    scores = None
    if "assigned_scores" in table.column_names:
        scores = table.column("assigned_scores").combine_chunks().flatten().to_pylist()
    return {"assigned": assigned, "scores": scores}


def inspect_dataset(cfg: DictConfig) -> dict[str, Any]:
    """Write the report of ``cfg`` (villa/core/schemas.py InspectConfig); return its path and summary."""
    from villa.core.io import atomic_file
    from villa.core.schemas import check_inputs, validate_config
    from villa.data.annotations import load_annotations
    from villa.data.vocab import vocab_from_config

    validate_config(cfg, "inspect")
    check_inputs(cfg, "inspect")
    vocab = vocab_from_config(cfg)
    data = Path(cfg.data_dir)
    ann = load_annotations(data, vocab, check_images=False)
    rows = np.arange(ann.n_images) if cfg.split is None else np.flatnonzero(ann.split == cfg.split)
    if len(rows) == 0:
        have = ", ".join(sorted(set(ann.split.tolist())))
        raise VillaError(f"{data} has no images in split {cfg.split!r} (it has: {have}); pass split= one of them")
    rows = rows[: cfg.limit]
    mapping = read_mapping(Path(cfg.mapping_path), ann, vocab)
    title = f"villa inspect: {data.name}" + (f" ({cfg.split})" if cfg.split else "")
    page, summary = render(ann, vocab, rows, mapping, title, cfg.max_side)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp:
        Path(tmp).write_text(page, encoding="utf-8")
    what = "extraction and mapping" if mapping is not None else "extraction only (no mapping.feather yet)"
    print(f"wrote {out} ({len(rows)} images, {what}); open it in a browser")
    return {"out": str(out), "summary": summary, "mapping": mapping is not None}


def main() -> None:
    from villa.core.config import hydra_entry

    hydra_entry("inspect", "villa.inspect:inspect_dataset", __doc__)()


if __name__ == "__main__":
    main()
