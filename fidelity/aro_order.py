"""villa's COCO-Order, as ``python -m villa.evaluate.finegrained benchmark=coco_order`` builds and scores it, against
ARO's own ``COCO_Order`` on identical inputs (docs/finegrained.md, "COCO-Order and Flickr30k-Order").

    git clone https://github.com/mertyg/vision-language-models-are-bows /tmp/aro   # any checkout of ARO's code
    pip install --target /tmp/aro_deps easydict                                    # ARO's one extra import
    PYTHONPATH=/tmp/aro_deps python -m fidelity.aro_order --aro_repo /tmp/aro --stand_in_tagger \
        --record docs/results/aro_fidelity/reference.json --json docs/results/aro_fidelity/results.json
    python -m fidelity.aro_order --reference docs/results/aro_fidelity/reference.json --stand_in_tagger  # no ARO code

Both sides read the same ``coco_karpathy_test.json`` (the captions below, written in BLIP's layout, with an image
each), tag with the same spaCy pipeline and tokenise with the same ``nltk.word_tokenize``. ARO's ``COCO_Order`` is
constructed as its loader does (``dataset_zoo/aro_datasets.py``; torchvision's ``download_url`` finds the file present
and downloads nothing), with two stubs:

- ``spacy.load`` returns ``--spacy_model``'s pipeline (ARO hard-codes ``en_core_web_sm``);
- ARO's unseeded draws (``np.random.permutation`` and ``random.shuffle``) take their permutations from one
  ``numpy`` generator seeded by ``--seed``, as villa's do. ARO makes its draws in the same order as villa (per
  caption: nouns, adjectives, the other tokens, each trigram, the trigrams' order).

Compared: every option of every caption (identical strings with identical draws; a control with other draws must
differ), and the scoring: ARO's ``evaluate_scores`` against villa's ``order_metrics`` on the same score matrices,
one from the command's own scorer (villa's shipped small CLIP on the images) and one full of ties (Precision@1
breaks ties to the caption). ``--record`` keeps ARO's side with its inputs; ``--reference`` replays villa against
it without ARO's code, and exits 1 when anything differs (a changed ``--seed``, say).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from villa.core.io import write_json_atomic
from villa.evaluate.finegrained.order import load_order, load_spacy, order_metrics

# COCO-style captions written for this check: capitals, punctuation, apostrophes, numbers, two sentences, a caption
# over ARO's 30-word limit, captions with no adjective or a single noun.
CAPTIONS = [
    "A man with a red helmet on a small moped on a dirt road.",
    "Man riding a motor bike on a dirt road on the countryside.",
    "A woman's hand holding a white cup of hot coffee.",
    "Two giraffes standing next to each other in a grassy field.",
    "A plate of food with broccoli, carrots and a piece of grilled chicken.",
    "The large brown dog is sleeping on the old blue couch.",
    "Three people ride skis down a snowy, steep mountain slope!",
    "A kitchen with stainless steel appliances and wooden cabinets.",
    "An elephant walks near a river. Its baby follows it closely.",
    "A bathroom with a toilet, a sink and a small mirror on the wall.",
    "Cat.",
    "A tennis player swings his racket at a yellow ball during a match (on a clay court).",
    "Several colorful kites fly high over the sandy beach on a windy day;",
    "A young boy in a striped shirt eats a slice of pepperoni pizza at a crowded table in a busy restaurant "
    "while his older sister reads a thick book and their tired parents talk quietly about the long drive home.",
    "a street sign at the corner of 5th avenue and main street",
    "A red double-decker bus drives past a tall clock tower in London.",
    "Someone is cutting a birthday cake with a knife: it has 7 candles.",
    "The airplane is parked on the runway at the airport",
    "A herd of sheep grazing on a green hillside under a cloudy sky.",
    "A computer monitor, keyboard and mouse on a messy desk.",
    "A black and white photo of a train crossing a bridge.",
    "A surfer rides a big wave in the ocean.",
    "Two men play frisbee in a park near tall trees.",
    "A bowl of fresh fruit: apples, bananas, oranges and grapes.",
]


# Penn tags by hand, for --stand_in_tagger (en_core_web_sm is not on PyPI): a spaCy tagger trained on these tags
# the captions above as it may; both sides then see the same tags, which is what this check needs.
HAND_TAGGED = [
    ("A man with a red helmet on a small moped on a dirt road.", "DT NN IN DT JJ NN IN DT JJ NN IN DT NN NN ."),
    ("A woman's hand holding a white cup of hot coffee.", "DT NN POS NN VBG DT JJ NN IN JJ NN ."),
    ("Three people ride skis down a snowy, steep mountain slope!", "CD NNS VBP NNS RP DT JJ , JJ NN NN ."),
    ("A bowl of fresh fruit: apples, bananas, oranges and grapes.", "DT NN IN JJ NN : NNS , NNS , NNS CC NNS ."),
    ("The large brown dog is sleeping on the old blue couch.", "DT JJ JJ NN VBZ VBG IN DT JJ JJ NN ."),
    ("Two giraffes standing next to each other in a grassy field.", "CD NNS VBG JJ IN DT JJ IN DT JJ NN ."),
]


def stand_in_tagger(seed: int = 0):
    """A real spaCy pipeline (tokenizer + tagger) trained on HAND_TAGGED."""
    import spacy
    from spacy.tokens import Doc
    from spacy.training import Example

    spacy.util.fix_random_seed(seed)  # Python's, NumPy's (thinc's initialisation) and torch's generators
    nlp = spacy.blank("en")
    nlp.add_pipe("tagger")
    examples = [
        Example(nlp.make_doc(c), Doc(nlp.vocab, words=[t.text for t in nlp.make_doc(c)], tags=g.split()))
        for c, g in HAND_TAGGED
    ]
    optimizer = nlp.initialize(lambda: examples)
    for _ in range(80):
        nlp.update(examples, sgd=optimizer)
    return nlp


def load_aro(repo: Path, nlp, seed: int):
    """ARO's dataset_zoo with the two stubs above; returns ``build(root, draw_seed)``: the options of ARO's
    COCO_Order on ``root`` with its draws from a generator seeded by ``draw_seed``."""
    if not (repo / "dataset_zoo" / "perturbations.py").is_file():
        sys.exit(f"error: {repo} is not a checkout of ARO's code (no dataset_zoo/perturbations.py); pass --aro_repo")
    import spacy

    spacy.load = lambda *a, **k: nlp  # stub: ARO loads en_core_web_sm by name
    sys.path.insert(0, str(repo))
    import dataset_zoo.perturbations as P
    from dataset_zoo.aro_datasets import COCO_Order

    g = [np.random.default_rng(seed)]

    def permutation(x):
        x = np.asarray(x)
        return x[g[0].permutation(len(x))]

    def shuffle(lst):
        lst[:] = [lst[j] for j in g[0].permutation(len(lst))]

    def build(root: Path, draw_seed: int):
        g[0] = np.random.default_rng(draw_seed)
        dataset = COCO_Order(image_preprocess=None, root_dir=str(root), split="test")
        return [tc["caption_options"] for tc in dataset.test_cases], dataset

    P.np.random.permutation = permutation  # stub: ARO's unseeded draws from villa's generator
    P.random.shuffle = shuffle
    return build


def write_fixture(root: Path, seed: int = 0) -> None:
    """The Karpathy-layout file of CAPTIONS (five per image, as COCO's) and a small PNG per image."""
    from PIL import Image

    (root / "val2014").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    anns = []
    for i in range(0, len(CAPTIONS), 5):
        name = f"val2014/COCO_val2014_{i:012d}.jpg"
        Image.fromarray(rng.integers(0, 256, (84, 84, 3), dtype=np.uint8)).save(root / name, format="JPEG")
        anns.append({"image": name, "caption": CAPTIONS[i : i + 5], "image_id": i})
    (root / "coco_karpathy_test.json").write_text(json.dumps(anns))


def villa_scores(items: list[dict]) -> np.ndarray:
    """The command's scores: villa's Scorer with the shipped small CLIP (order_scores, as score_order computes them)."""
    from villa.core.runtime import get_runtime
    from villa.evaluate.finegrained.order import order_scores
    from villa.evaluate.finegrained.scorer import Scorer
    from villa.models.clip import create_clip

    runtime = get_runtime("cpu")
    return order_scores(items, Scorer(create_clip("auto", "villa-small-rn-docmnist"), runtime))


def record(a, nlp, root: Path) -> dict:
    """ARO's side: its options for ``--seed`` (and ``--seed`` + 1, the control) and its Precision@1 on two score
    matrices, kept with the matrices."""
    build = load_aro(a.aro_repo.resolve(), nlp, a.seed)
    theirs, dataset = build(root, a.seed)
    control, _ = build(root, a.seed + 1)
    items = load_order(root, "coco_order", seed=a.seed, nlp=nlp)
    tied = np.random.default_rng(a.seed).integers(0, 3, (len(items), 5)).astype(np.float64)  # many ties
    matrices = {"shipped_clip": villa_scores(items), "ties": tied}
    aro_p1 = {k: float(dataset.evaluate_scores(m[:, None, :])[0]["Precision@1"]) for k, m in matrices.items()}
    return {
        "aro_repo_head": _head(a.aro_repo),
        "seed": a.seed,
        "options": theirs,
        "control_options": control,
        "scores": {k: m.tolist() for k, m in matrices.items()},
        "precision_at_1": aro_p1,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m fidelity.aro_order", description=__doc__.split("\n\n")[0])
    p.add_argument("--aro_repo", type=Path, default=None, help="a checkout of mertyg/vision-language-models-are-bows")
    p.add_argument("--record", type=Path, default=None, help="with --aro_repo: keep ARO's side here")
    p.add_argument("--reference", type=Path, default=None, help="replay villa against a recorded ARO side")
    p.add_argument("--spacy_model", default="en_core_web_sm", help="the spaCy pipeline both sides tag with")
    p.add_argument(
        "--stand_in_tagger",
        action="store_true",
        help="tag with a spaCy tagger trained here on HAND_TAGGED instead of --spacy_model",
    )
    p.add_argument("--seed", type=int, default=0, help="villa's draws (and, recording, ARO's)")
    p.add_argument("--json", type=Path, default=None, help="write the comparison here")
    a = p.parse_args(argv)
    if not (a.aro_repo or a.reference):
        p.error("pass --aro_repo (run ARO's code) or --reference (a recorded run)")
    t0 = time.perf_counter()
    nlp = stand_in_tagger() if a.stand_in_tagger else load_spacy(a.spacy_model)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_fixture(root)
        ref = record(a, nlp, root) if a.aro_repo else json.loads(a.reference.read_text())
        if a.record:
            write_json_atomic(a.record, ref)
        ours = [it["options"] for it in load_order(root, "coco_order", seed=a.seed, nlp=nlp)]
    theirs, control = ref["options"], ref["control_options"]
    differ = [(i, k) for i in range(len(ours)) for k in range(5) if ours[i][k] != theirs[i][k]]
    control_differ = sum(ours[i][k] != control[i][k] for i in range(len(ours)) for k in range(5))
    villa_p1 = {k: order_metrics(np.asarray(m))["precision_at_1"] for k, m in ref["scores"].items()}
    res = {
        "command": "python -m fidelity.aro_order " + " ".join(sys.argv[1:] if argv is None else argv),
        "aro_repo_head": ref["aro_repo_head"],
        "spacy_model": "stand-in tagger trained on HAND_TAGGED" if a.stand_in_tagger else a.spacy_model,
        "seed": a.seed,
        "nltk_version": _version("nltk"),
        "spacy_version": _version("spacy"),
        "captions": len(ours),
        "options": 5 * len(ours),
        "same_number_of_items": len(ours) == len(theirs),
        "options_differing": len(differ),
        "first_differences": [
            {"caption": i, "option": k, "villa": ours[i][k], "aro": theirs[i][k]} for i, k in differ[:5]
        ],
        "perturbations_that_changed_the_caption": sum(o != opts[0] for opts in ours for o in opts[1:]),
        "perturbations": 4 * len(ours),
        "control_options_differing": control_differ,
        "control": "ARO's side drawing from seed + 1",
        "precision_at_1": {k: {"villa": villa_p1[k], "aro": ref["precision_at_1"][k]} for k in villa_p1},
        "scoring_differs": [k for k in villa_p1 if villa_p1[k] != ref["precision_at_1"][k]],
        "example": {"villa": ours[0], "aro": theirs[0]},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps({k: v for k, v in res.items() if k != "example"}, indent=1))
    if a.json:
        write_json_atomic(a.json, res)
    if differ or res["scoring_differs"] or len(ours) != len(theirs):
        print(
            f"error: villa's COCO-Order differs from ARO's: {len(differ)} options, scoring "
            f"{res['scoring_differs'] or 'the same'}",
            file=sys.stderr,
        )
        sys.exit(1)
    return res


def _version(pkg: str) -> str:
    from importlib.metadata import version

    return version(pkg)


def _head(repo: Path) -> str:
    import subprocess

    r = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


if __name__ == "__main__":
    main()
