"""Attributes from free text: aliases, whole words, negation, uncertainty, the coverage report, and Stage 1's
sentence matching through the same matcher."""

from __future__ import annotations

import numpy as np
import pytest

from villa.core.errors import VillaError
from villa.data.annotations import load_annotations
from villa.data.attributes import AttributeMatcher, extract_attributes, format_report
from villa.data.vocab import load_vocab, vocab_from_dict
from villa.stage1.mapping import assign_text

CXR = {
    "name": "cxr",
    "negation": "default",
    "uncertainty": "default",
    "groups": [
        {
            "name": "finding",
            "attributes": ["effusion", "pneumothorax", "cardiomegaly", "edema", "pneumonia", "atelectasis"],
            "aliases": {"effusion": ["pleural effusion", "effusions"], "cardiomegaly": ["enlarged heart"]},
            "templates": ["{}"],
        },
        {"name": "side", "attributes": ["left", "right"], "templates": ["{} side"]},
    ],
}

# (report, expected attributes with uncertain counted, expected statuses of the mentions in order)
REPORTS = [
    ("No pleural effusion or pneumothorax.", [], ["negated", "negated"]),
    ("Small left Pleural  Effusion. Enlarged heart.", ["effusion", "cardiomegaly", "left"], ["positive"] * 3),
    ("Pneumonia cannot be ruled out.", ["pneumonia"], ["uncertain"]),
    ("No pneumothorax, but there is mild edema.", ["edema"], ["negated", "positive"]),
    ("Possible right basilar atelectasis.", ["atelectasis", "right"], ["uncertain", "uncertain"]),
    ("Edema has resolved. Free of effusions.", [], ["negated", "negated"]),
    ("No evidence of focal consolidation, effusion, or pneumothorax.", [], ["negated", "negated"]),
    ("Negative for pneumonia; left effusion persists.", ["effusion", "left"], ["negated", "positive", "positive"]),
    ("Enlarged hearts are common.", [], []),  # "enlarged heart" is not a whole-word match inside "hearts"
    ("Effusion without pneumothorax.", ["effusion"], ["positive", "negated"]),
]


@pytest.mark.parametrize("report,expected,statuses", REPORTS)
def test_radiology_reports(report, expected, statuses):
    vocab = vocab_from_dict(CXR)
    m = AttributeMatcher(vocab)
    assert m.attributes(report) == expected
    assert [x.status for x in m.mentions(report)] == statuses


def test_uncertainty_policy_drop():
    vocab = vocab_from_dict({**CXR, "uncertain": "drop"})
    m = AttributeMatcher(vocab)
    assert m.attributes("Possible pneumonia. Left effusion.") == ["effusion", "left"]
    with pytest.raises(VillaError, match="uncertain='sometimes'"):
        AttributeMatcher(vocab_from_dict({**CXR, "uncertain": "sometimes"}))


CAPTIONS = {
    "name": "city",
    "plurals": True,
    "negation": "default",
    "groups": [
        {
            "name": "thing",
            "attributes": ["tower", "vessel", "traffic light", "bus"],
            "aliases": {"vessel": ["ship", "boat"], "traffic light": ["stoplight"]},
            "templates": ["a {}"],
        },
        {"name": "colour", "attributes": ["red", "blue"], "templates": ["{}"]},
    ],
}


@pytest.mark.parametrize(
    "caption,expected",
    [
        ("Two towers by the harbour, where vessels are moored.", ["tower", "vessel"]),
        ("A RED Traffic Light next to buses.", ["traffic light", "bus", "red"]),
        ("The boat was covered in dust.", ["vessel"]),  # "red" inside "covered" is not a word
        ("A street with no buses. A stoplight.", ["traffic light"]),
        ("No buses, just one very very long road then a stoplight.", ["traffic light"]),  # past NegEx's 5 words
        ("Stoplights", ["traffic light"]),
        ("A bluebird.", []),
    ],
)
def test_photo_captions_aliases_plurals_case(caption, expected):
    assert AttributeMatcher(vocab_from_dict(CAPTIONS)).attributes(caption) == expected


def test_without_cues_nothing_is_negated():
    v = vocab_from_dict({"name": "x", "groups": [{"name": "g", "attributes": ["dog"], "templates": ["{}"]}]})
    assert AttributeMatcher(v).attributes("no dog here") == ["dog"]


def test_an_alias_two_attributes_share_is_refused():
    bad = {
        "name": "x",
        "groups": [{"name": "g", "attributes": ["boat", "ship"], "aliases": {"boat": ["Ship"]}, "templates": ["{}"]}],
    }
    with pytest.raises(VillaError, match="'Ship' names both 'ship' and 'boat'|'ship' names both 'boat' and 'ship'"):
        vocab_from_dict(bad)
    with pytest.raises(VillaError, match="aliases for 'cat', not one of its attributes"):
        vocab_from_dict(
            {
                "name": "x",
                "groups": [{"name": "g", "attributes": ["dog"], "aliases": {"cat": ["kitten"]}, "templates": ["{}"]}],
            }
        )


def test_coverage_report():
    vocab = vocab_from_dict(CAPTIONS)
    ex = extract_attributes(["Two towers.", "A tall lighthouse by the sea.", "No boats. A red bus.", ""], vocab)
    assert ex.attributes == [["tower"], [], ["bus", "red"], []]
    r = ex.report
    assert r["texts"] == 4 and r["texts_without_attribute"] == 2 and r["examples_without_attribute"] == [1, 3]
    assert r["per_attribute"]["vessel"] == {"texts": 0, "positive": 0, "negated": 1, "uncertain": 0}
    assert r["per_attribute"]["tower"]["texts"] == 1
    assert r["never_seen"] == ["vessel", "traffic light", "blue"]
    words = dict(r["suggestions"])
    assert words["lighthouse"] == 1 and words["sea"] == 1 and "towers" not in words and "the" not in words
    text = format_report(r)
    assert "2 of 4 texts have at least one attribute" in text and "lighthouse 1" in text


def test_docmnist_captions_give_the_generators_attributes(tiny_docmnist):
    """The extractor on DocMNIST's captions finds exactly the attribute lists the generator wrote."""
    vocab = load_vocab("docmnist")
    ann = load_annotations(tiny_docmnist, vocab, check_images=False)
    got = extract_attributes(ann.text, vocab).attributes
    want = ann.table.column("attributes").to_pylist()
    assert got == want


def test_stage1_sentences_match_aliases_and_skip_negated():
    """A region assigned "vessel" gets the sentence that says "vessels" (the original's substring rule would
    leave it without one), and never the sentence that negates it."""
    vocab = vocab_from_dict(CAPTIONS)
    texts = ["there are no boats . two vessels are moored . a tall tower"]
    offsets = np.array([0, 2])
    assigned = np.zeros((2, len(vocab)), bool)
    assigned[0, vocab.index["vessel"]] = True
    assigned[1, vocab.index["tower"]] = True
    out = assign_text(texts, offsets, assigned, vocab, np.random.default_rng(0))
    assert out == ["two vessels are moored", "a tall tower"]


def test_extractor_refuses_bad_cue_config():
    with pytest.raises(VillaError, match="negation must be 'default' or a mapping"):
        AttributeMatcher(vocab_from_dict({**CXR, "negation": ["no"]}))
    v = vocab_from_dict({**CXR, "negation": {"pre": ["absent"]}})
    assert AttributeMatcher(v).attributes("no edema. absent pneumothorax") == ["edema"]
