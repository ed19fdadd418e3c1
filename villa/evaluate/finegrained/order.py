"""ARO's word-order tasks, COCO-Order and Flickr30k-Order (Yuksekgonul et al., ICLR 2023), as ARO's code builds them.

Each caption of the Karpathy split is one item with five options: the caption and four perturbations of it, made
by ARO's ``TextShuffler`` (github.com/mertyg/vision-language-models-are-bows, dataset_zoo/perturbations.py):

1. ``shuffle_nouns_and_adj``: the nouns (Penn tags NN, NNS, NNP, NNPS) permuted among themselves, and the
   adjectives (JJ, JJR, JJS) among themselves; tokens and tags from spaCy's ``en_core_web_sm``;
2. ``shuffle_allbut_nouns_and_adj``: every other token permuted, nouns and adjectives in place (same tagger);
3. ``shuffle_within_trigrams``: NLTK's ``word_tokenize``, then each consecutive trigram shuffled in place;
4. ``shuffle_trigrams``: the trigrams shuffled as units.

Every option (the caption too) then goes through BLIP's ``pre_caption`` (lower case, ``.!"()*#:;~`` to spaces,
at most ``max_words`` words), as ARO's loaders do. The score is Precision@1: the share of items whose caption scores
highest of the five (``np.argmax`` as ARO: a tie goes to the caption, which is option 0).

Difference from ARO's code (docs/finegrained.md): ARO draws its permutations from the unseeded global NumPy and
``random`` generators, so its negatives change from run to run; here one ``numpy`` generator seeded by ``seed``
draws them all, in file order, so a run can be repeated. The draws follow the same distributions (uniform
permutations). ARO tags each caption twice (once per tag-based perturbation); tagging is deterministic, so it is
done once here.

Layouts (``data_dir``), the files ARO's loaders download (BLIP's Karpathy splits):
- COCO-Order: ``coco_karpathy_{test,val}.json`` (``[{image: "val2014/COCO_val2014_....jpg", caption: [...]}]``)
  and the COCO 2014 images under ``val2014/`` (the ``image`` path, relative to ``data_dir``);
- Flickr30k-Order: ``flickr30k_{test,val}.json`` (``image: "flickr30k-images/....jpg"``) and ``flickr30k-images/``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from villa.core.errors import VillaError

NOUN_TAGS = ("NN", "NNS", "NNP", "NNPS")
ADJ_TAGS = ("JJ", "JJR", "JJS")
PERTURBATIONS = ("shuffle_nouns_and_adj", "shuffle_allbut_nouns_and_adj", "shuffle_within_trigrams", "shuffle_trigrams")
ORDER_DATASETS = {
    "coco_order": (
        "coco_karpathy_{split}.json",
        "get coco_karpathy_{split}.json from storage.googleapis.com/"
        "sfr-vision-language-research/datasets/ (BLIP's Karpathy split, as ARO) and COCO's val2014/ images",
    ),
    "flickr30k_order": (
        "flickr30k_{split}.json",
        "get flickr30k_{split}.json from storage.googleapis.com/"
        "sfr-vision-language-research/datasets/ (as ARO) and the flickr30k-images/ folder",
    ),
}
SPACY_FIX = "pip install 'villa[aro]' && python -m spacy download en_core_web_sm"
PUNKT_FIX = "pip install 'villa[aro]' && python -m nltk.downloader punkt_tab"


def pre_caption(caption: str, max_words: int = 30) -> str:
    """BLIP's caption normalisation, which ARO applies to every option."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


def shuffle_nouns_and_adj(tokens: Sequence[str], tags: Sequence[str], rng: np.random.Generator) -> str:
    text = np.array(tokens, dtype=object)
    for group in (NOUN_TAGS, ADJ_TAGS):
        idx = [i for i, t in enumerate(tags) if t in group]
        text[idx] = rng.permutation(text[idx])
    return " ".join(text)


def shuffle_allbut_nouns_and_adj(tokens: Sequence[str], tags: Sequence[str], rng: np.random.Generator) -> str:
    text = np.array(tokens, dtype=object)
    other = np.array([t not in NOUN_TAGS + ADJ_TAGS for t in tags], dtype=bool)
    text[other] = rng.permutation(text[other])
    return " ".join(text)


def trigrams(tokens: Sequence[str]) -> list[list[str]]:
    """Consecutive groups of three tokens, the last one shorter (ARO's ``get_trigrams``)."""
    return [list(tokens[i : i + 3]) for i in range(0, len(tokens), 3)]


def shuffle_within_trigrams(tokens: Sequence[str], rng: np.random.Generator) -> str:
    return " ".join(" ".join(tri[j] for j in rng.permutation(len(tri))) for tri in trigrams(tokens))


def shuffle_trigrams(tokens: Sequence[str], rng: np.random.Generator) -> str:
    tris = trigrams(tokens)
    return " ".join(" ".join(tris[j]) for j in rng.permutation(len(tris)))


def load_spacy(model: str):
    """spaCy's pipeline by package name or path; only its tags are used (parser, NER and lemmatizer switched off,
    which do not change ``tag_``)."""
    try:
        import spacy
    except ImportError as e:
        raise VillaError(
            f"ARO's order tasks tag parts of speech with spaCy, which is not installed: {SPACY_FIX}"
        ) from e
    try:
        nlp = spacy.load(model)
    except OSError as e:
        raise VillaError(
            f"spaCy pipeline {model!r} not found (ARO uses en_core_web_sm): {SPACY_FIX}, or pass "
            "spacy_model=<path of a saved pipeline>"
        ) from e
    nlp.select_pipes(disable=[n for n in ("parser", "ner", "lemmatizer") if n in nlp.pipe_names])
    return nlp


def load_word_tokenize() -> Callable[[str], list[str]]:
    try:
        import nltk
    except ImportError as e:
        raise VillaError(f"ARO's trigram perturbations tokenise with NLTK, which is not installed: {PUNKT_FIX}") from e
    try:
        nltk.word_tokenize("a check.")
    except LookupError as e:
        raise VillaError(f"NLTK's punkt_tab data not found (nltk.word_tokenize needs it): {PUNKT_FIX}") from e
    return nltk.word_tokenize


def perturb_captions(
    captions: Sequence[str], nlp, word_tokenize: Callable[[str], list[str]], seed: int, max_words: int = 30
) -> list[list[str]]:
    """The five options of each caption: the caption first, then ARO's four perturbations, each through
    ``pre_caption``. ``nlp``: a spaCy pipeline (anything whose ``pipe`` yields token sequences with ``text`` and
    ``tag_``)."""
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    out = []
    docs = tqdm(
        nlp.pipe(captions, batch_size=256),
        total=len(captions),
        desc="ARO perturbations",
        unit="caption",
        disable=len(captions) < 1000,
    )
    for caption, doc in zip(captions, docs):
        toks, tags = [t.text for t in doc], [t.tag_ for t in doc]
        words = word_tokenize(caption)
        options = [
            caption,
            shuffle_nouns_and_adj(toks, tags, rng),
            shuffle_allbut_nouns_and_adj(toks, tags, rng),
            shuffle_within_trigrams(words, rng),
            shuffle_trigrams(words, rng),
        ]
        out.append([pre_caption(o, max_words) for o in options])
    return out


def load_order(
    data_dir: Path,
    dataset: str,
    split: str = "test",
    seed: int = 0,
    spacy_model: str = "en_core_web_sm",
    max_words: int = 30,
    nlp=None,
    word_tokenize=None,
) -> list[dict[str, Any]]:
    """Items ``{image_path, caption, options}`` of COCO-Order or Flickr30k-Order, one per caption."""
    from villa.evaluate.finegrained.benchmarks import read_json

    name = "COCO-Order" if dataset == "coco_order" else "Flickr30k-Order"
    if split not in ("test", "val"):
        raise VillaError(f"{name}: split={split} is not one of test, val (the Karpathy splits ARO reads)")
    fname, where = (s.format(split=split) for s in ORDER_DATASETS[dataset])
    path = data_dir / fname
    if not path.is_file():
        raise VillaError(f"{name}: {path} not found; {where}")
    raw = read_json(path, name)
    if not isinstance(raw, list) or not raw:
        raise VillaError(f"{name}: {path} is not a non-empty list of {{image, caption}}; re-download it")
    root = data_dir.resolve()
    rows: list[tuple[Path, str]] = []
    for i, ann in enumerate(raw):
        if not isinstance(ann, dict) or not isinstance(ann.get("image"), str) or "caption" not in ann:
            raise VillaError(f"{name}: {path} item {i} lacks an image path or a caption; re-download it")
        img = (data_dir / ann["image"]).resolve()
        if root not in img.parents:
            raise VillaError(f"{name}: {path} item {i} names {ann['image']!r}, outside {data_dir}; re-download it")
        if not img.is_file():
            raise VillaError(f"{name}: image {ann['image']} (item {i}) not found under {data_dir}; {where}")
        caps = ann["caption"] if isinstance(ann["caption"], list) else [ann["caption"]]
        rows.extend((img, str(c)) for c in caps)
    if not rows:
        raise VillaError(f"{name}: {path} holds no captions; re-download it")
    nlp = nlp if nlp is not None else load_spacy(spacy_model)
    word_tokenize = word_tokenize if word_tokenize is not None else load_word_tokenize()
    options = perturb_captions([c for _, c in rows], nlp, word_tokenize, seed, max_words)
    return [{"image_path": img, "caption": cap, "options": opt} for (img, cap), opt in zip(rows, options)]


def order_metrics(scores: np.ndarray) -> dict[str, Any]:
    """``scores[n, k]``: item n's score for option k (0 = the caption). Precision@1 as ARO (argmax, ties to the
    caption), and per perturbation the share of items whose caption scores at least as high as it."""
    scores = np.asarray(scores, dtype=np.float64)
    out: dict[str, Any] = {"precision_at_1": float((np.argmax(scores, axis=1) == 0).mean())}
    out["per_perturbation"] = {p: float((scores[:, 0] >= scores[:, k + 1]).mean()) for k, p in enumerate(PERTURBATIONS)}
    out["examples"] = int(scores.shape[0])
    return out


def order_scores(items: list[dict[str, Any]], scorer) -> np.ndarray:
    """(N, 5): each item's image against its five options (the caption first), as the command scores them."""
    keys = [str(it["image_path"]) for it in items]
    scorer.embed_images(keys, keys)
    scorer.embed_texts([o for it in items for o in it["options"]])
    return np.stack([scorer.pair_scores(keys, [it["options"][k] for it in items]) for k in range(5)], axis=1)


def score_order(items: list[dict[str, Any]], scorer) -> dict[str, Any]:
    return order_metrics(order_scores(items, scorer))
