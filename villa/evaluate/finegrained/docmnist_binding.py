"""A DocMNIST binding benchmark: does a model know that *this* digit is blue, not only that the image has blue?

DocMNIST's own captions list attributes sentence by sentence ("the color is blue . the image shows a six"), so they
carry no binding. The benchmark describes each region with one bound sentence, "a blue six in a large circle"
("a red two" where the region has no shape), and builds, deterministically from a DocMNIST test split:

- **foils** (VALSE-style) per test image, each changing one thing of the bound caption (all region sentences):
  ``swap_color`` (two regions exchange colours: same words, bindings swapped), ``swap_shape`` (two regions exchange
  shape and size), ``change_digit`` (one region's digit becomes one absent from the image), ``drop_attribute``
  (one region's shape phrase, or colour, is left out: the complete caption should score higher). Global readout: the
  image against caption vs foil; region readout: the changed region (its ground-truth box) against its sentence vs
  its foiled sentence (``drop_attribute`` has no region readout for the regions it does not change).
- **pairs** (Winoground-style): image A and image B = A with two regions' colours exchanged (pixels recoloured
  exactly: DocMNIST colours are exact RGB values), with captions A and B that use the same words. Text, image and
  group scores as Winoground's, with global embeddings and with the swapped region's embeddings.

The benchmark records the dataset's generator seed and test-pool fingerprint (``generation.json``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from villa.core.errors import VillaError
from villa.data.annotations import Annotations, load_annotations
from villa.data.vocab import Vocabulary, load_vocab
from villa.evaluate.finegrained.benchmarks import pairwise_accuracy, winoground_metrics

KINDS = ("swap_color", "swap_shape", "change_digit", "drop_attribute")


def region_words(ann: Annotations, vocab: Vocabulary) -> list[dict[str, str]]:
    """Each region's attributes by group name (digit, color, shape, size), from ``reg_to_attr``."""
    if ann.reg_attr_offsets is None:
        raise VillaError("the binding benchmark needs ground-truth regions (a reg_to_attr column)")
    groups = [vocab.groups[g] for g in vocab.attribute_group]
    ids, off = ann.reg_attr_ids, ann.reg_attr_offsets
    return [{groups[a]: vocab.attributes[a] for a in ids[off[r] : off[r + 1]]} for r in range(len(ann.boxes))]


def bound_sentence(w: dict[str, str], drop: Optional[str] = None) -> str:
    colour = "" if drop == "color" else f"{w['color']} "
    s = f"a {colour}{w['digit']}"
    if "shape" in w and drop != "shape":
        s += f" in a {w.get('size', '')} {w['shape']}".replace("  ", " ")
    return s


def caption(words: list[dict[str, str]]) -> str:
    return " . ".join(bound_sentence(w) for w in words)


def _swap(words: list[dict[str, str]], a: int, b: int, keys: tuple[str, ...]) -> list[dict[str, str]]:
    out = [dict(w) for w in words]
    for k in keys:
        va, vb = words[a].get(k), words[b].get(k)
        for i, v in ((a, vb), (b, va)):
            if v is None:
                out[i].pop(k, None)
            else:
                out[i][k] = v
    return out


def _changed(words, new) -> bool:
    return sorted(map(bound_sentence, words)) != sorted(map(bound_sentence, new))


def build_benchmark(
    data_dir: Path, vocab: Optional[Vocabulary] = None, seed: int = 0, max_images: Optional[int] = None
) -> dict[str, Any]:
    """Foils and pairs for every test image of ``data_dir`` (the first ``max_images`` when given; deterministic for
    a dataset, ``seed`` and ``max_images``)."""
    vocab = vocab or load_vocab("docmnist")
    ann = load_annotations(data_dir, vocab, required_splits=("test",))
    words = region_words(ann, vocab)
    rng = np.random.default_rng(seed)
    digits = vocab.group_attributes("digit")
    foils, pairs = [], []
    for i in np.flatnonzero(ann.split == "test")[:max_images]:
        r0, r1 = int(ann.region_offsets[i]), int(ann.region_offsets[i + 1])
        w = words[r0:r1]
        base = {"image": int(i), "path": str(ann.root / ann.filepath[i]), "caption": caption(w)}
        image_foils, image_pairs = _image_foils(w, r0, base, digits, rng)
        foils += image_foils
        pairs += image_pairs
    gen_path = Path(data_dir) / "generation.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    return {
        "data": str(data_dir),
        "seed": seed,
        "max_images": max_images,
        "generator_seed": gen.get("args", {}).get("seed"),
        "test_pool": gen.get("digit_pools", {}).get("test", {}).get("fingerprint"),
        "foils": foils,
        "pairs": pairs,
        "ann": ann,
        "vocab": vocab,
    }


def _foil(base: dict, kind: str, foil: str, region: int, text: str, region_foil: str) -> dict[str, Any]:
    return {**base, "kind": kind, "foil": foil, "region": region, "region_text": text, "region_foil": region_foil}


def _image_foils(
    w: list[dict[str, str]], r0: int, base: dict, digits: list[str], rng: np.random.Generator
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One image's foils (a colour swap, a shape swap, a changed digit, a dropped attribute, each where the image
    allows it) and its colour-swap pair, drawn from ``rng`` in that order."""
    foils, pairs, n = [], [], len(w)
    cands = {
        "swap_color": [(a, b) for a in range(n) for b in range(a + 1, n) if _changed(w, _swap(w, a, b, ("color",)))],
        "swap_shape": [
            (a, b)
            for a in range(n)
            for b in range(a + 1, n)
            if "shape" in w[a] and _changed(w, _swap(w, a, b, ("shape", "size")))
        ],
    }
    for kind in ("swap_color", "swap_shape"):
        if cands[kind]:
            a, b = cands[kind][rng.integers(len(cands[kind]))]
            new = _swap(w, a, b, ("color",) if kind == "swap_color" else ("shape", "size"))
            foils.append(_foil(base, kind, caption(new), r0 + a, bound_sentence(w[a]), bound_sentence(new[a])))
            if kind == "swap_color":
                pairs.append(
                    {
                        **base,
                        "caption_b": caption(new),
                        "regions": (r0 + a, r0 + b),
                        "colors": (w[a]["color"], w[b]["color"]),
                        "region_text": bound_sentence(w[a]),
                        "region_text_b": bound_sentence(new[a]),
                    }
                )
    absent = [d for d in digits if d not in {x["digit"] for x in w}]
    a = int(rng.integers(n))
    new = [dict(x) for x in w]
    new[a]["digit"] = absent[int(rng.integers(len(absent)))]
    foils.append(_foil(base, "change_digit", caption(new), r0 + a, bound_sentence(w[a]), bound_sentence(new[a])))
    a = int(rng.integers(n))
    drop = "shape" if "shape" in w[a] else "color"
    dropped = " . ".join(bound_sentence(x, drop if k == a else None) for k, x in enumerate(w))
    foils.append(_foil(base, "drop_attribute", dropped, r0 + a, bound_sentence(w[a]), bound_sentence(w[a], drop)))
    return foils, pairs


def recolor(image: np.ndarray, boxes: tuple[np.ndarray, np.ndarray], rgb: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Exchange two regions' colours: inside each box, the pixels of exactly one colour take the other."""
    out = image.copy()
    for box, src, dst in ((boxes[0], rgb[0], rgb[1]), (boxes[1], rgb[1], rgb[0])):
        x0, y0, x1, y1 = (int(v) for v in box)
        cell = out[y0:y1, x0:x1]
        cell[(image[y0:y1, x0:x1] == src).all(-1)] = dst
    return out


def _regions(scorer, ann: Annotations, paths: list[str], regions: list[int]):
    """Region embeddings of ``regions[k]`` in image ``paths[k]``: each distinct image goes through the network once,
    with all its requested boxes."""
    want: dict[str, list[int]] = {}
    for path, r in zip(paths, regions):
        want.setdefault(path, [])
        if r not in want[path]:
            want[path].append(r)
    keys = list(want)
    emb = scorer.region_embeddings(keys, [ann.boxes[want[k]] for k in keys], keys=keys)
    row, start = {}, 0
    for k in keys:
        for j, r in enumerate(want[k]):
            row[(k, r)] = start + j
        start += len(want[k])
    return emb[[row[(p, r)] for p, r in zip(paths, regions)]]


def score_benchmark(bench: dict[str, Any], scorer, region_level: bool = True) -> dict[str, Any]:
    """Pairwise accuracies per foil kind (global and region readouts) and Winoground-style scores."""
    ann, vocab = bench["ann"], bench["vocab"]
    foils, pairs = bench["foils"], bench["pairs"]
    rgb = vocab.extra["docmnist"]["color_rgb"]
    swapped_keys, swapped = [], []
    for p in pairs:
        arr = np.asarray(Image.open(p["path"]).convert("RGB"))
        boxes = (ann.boxes[p["regions"][0]], ann.boxes[p["regions"][1]])
        swapped_keys.append(p["path"] + "#swap")
        swapped.append(
            Image.fromarray(recolor(arr, boxes, (np.array(rgb[p["colors"][0]]), np.array(rgb[p["colors"][1]]))))
        )
    fp = [f["path"] for f in foils]
    use_regions = region_level and scorer.region_encoder is not None
    if use_regions:  # each image's regions and its global embedding in one pass
        reg_emb = _regions(
            scorer,
            ann,
            fp + [p["path"] for p in pairs],
            [f["region"] for f in foils] + [p["regions"][0] for p in pairs],
        )
        swap_emb = scorer.region_embeddings(swapped, [ann.boxes[[p["regions"][0]]] for p in pairs], keys=swapped_keys)
    paths = fp + [p["path"] for p in pairs]
    scorer.embed_images(paths, paths)
    scorer.embed_images(swapped_keys, swapped)
    texts = [f["caption"] for f in foils] + [f["foil"] for f in foils] + [p["caption_b"] for p in pairs]
    texts += [f["region_text"] for f in foils] + [f["region_foil"] for f in foils]
    texts += [p["region_text"] for p in pairs] + [p["region_text_b"] for p in pairs]
    scorer.embed_texts(texts)
    out: dict[str, Any] = {"global": {}, "region": {}, "examples": {}}
    kinds = np.array([f["kind"] for f in foils])
    cap = scorer.pair_scores(fp, [f["caption"] for f in foils])
    foil = scorer.pair_scores(fp, [f["foil"] for f in foils])
    reg_cap = reg_foil = None
    if use_regions:
        emb = reg_emb[: len(foils)]
        reg_cap = (emb * scorer.texts([f["region_text"] for f in foils])).sum(-1).numpy()
        reg_foil = (emb * scorer.texts([f["region_foil"] for f in foils])).sum(-1).numpy()
    for k in KINDS:
        m = kinds == k
        out["examples"][k] = int(m.sum())
        out["global"][k] = pairwise_accuracy(cap[m], foil[m])
        if reg_cap is not None:
            out["region"][k] = pairwise_accuracy(reg_cap[m], reg_foil[m])
    binding = np.isin(kinds, ("swap_color", "swap_shape"))
    out["global"]["binding"] = pairwise_accuracy(cap[binding], foil[binding])
    if reg_cap is not None:
        out["region"]["binding"] = pairwise_accuracy(reg_cap[binding], reg_foil[binding])
    if pairs:
        ka, kb = [p["path"] for p in pairs], swapped_keys
        ca, cb = [p["caption"] for p in pairs], [p["caption_b"] for p in pairs]
        s = np.zeros((len(pairs), 2, 2))
        for c, texts_c in enumerate((ca, cb)):
            for i, keys in enumerate((ka, kb)):
                s[:, c, i] = scorer.pair_scores(keys, texts_c)
        out["pairs_global"] = winoground_metrics(s)
        if use_regions:
            ra, rb = reg_emb[len(foils) :], swap_emb
            ta, tb = scorer.texts([p["region_text"] for p in pairs]), scorer.texts([p["region_text_b"] for p in pairs])
            r = np.zeros((len(pairs), 2, 2))
            for c, t in enumerate((ta, tb)):
                for i, e in enumerate((ra, rb)):
                    r[:, c, i] = (e * t).sum(-1).numpy()
            out["pairs_region"] = winoground_metrics(r)
    out["embedded"] = scorer.n_embedded
    return out
