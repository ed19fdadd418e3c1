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


# NegEx-style cues before and after the mention, both ways for "absent", "missing", "ruled out"; terminators (";",
# "but", "although") end a scope, commas do not. (vocabulary, text, the status of each attribute's first mention);
# 24 of these failed on the cue lists before "not in" and its kin were added.
NEGATION_TABLE = [
    ("photo", "The boats are not in the harbour.", {"vessel": "negated"}),
    ("photo", "A bus is not in the picture.", {"bus": "negated"}),
    ("photo", "There is no bus.", {"bus": "negated"}),
    ("photo", "There are no towers here.", {"tower": "negated"}),
    ("photo", "No red buses.", {"red": "negated", "bus": "negated"}),
    ("photo", "A street without any stoplight.", {"traffic light": "negated"}),
    ("photo", "The tower is absent.", {"tower": "negated"}),
    ("photo", "Absent tower; red bus.", {"tower": "negated", "red": "positive", "bus": "positive"}),
    ("photo", "The stoplight is missing.", {"traffic light": "negated"}),
    ("photo", "Missing stoplight at the corner.", {"traffic light": "negated"}),
    ("photo", "The harbour is free of boats.", {"vessel": "negated"}),
    ("photo", "A square devoid of buses.", {"bus": "negated"}),
    ("photo", "The road lacks a stoplight.", {"traffic light": "negated"}),
    ("photo", "The scene has a lack of towers.", {"tower": "negated"}),
    ("photo", "None of the buses are red.", {"bus": "negated", "red": "negated"}),
    ("photo", "The bus is no longer red.", {"bus": "positive", "red": "negated"}),
    ("photo", "A boat, but no tower.", {"vessel": "positive", "tower": "negated"}),
    ("photo", "No tower; a red boat.", {"tower": "negated", "red": "positive", "vessel": "positive"}),
    ("photo", "A blue bus rather than a red one.", {"blue": "positive", "bus": "positive", "red": "negated"}),
    ("photo", "A ship instead of a bus.", {"vessel": "positive", "bus": "negated"}),
    ("photo", "The tower isn't red.", {"tower": "positive", "red": "negated"}),
    ("photo", "The buses aren't blue.", {"bus": "positive", "blue": "negated"}),
    ("photo", "I don't see a stoplight.", {"traffic light": "negated"}),
    ("photo", "You cannot see the tower.", {"tower": "negated"}),
    ("photo", "The stoplight is not visible.", {"traffic light": "negated"}),
    ("photo", "Boats are nowhere to be seen.", {"vessel": "negated"}),
    ("photo", "The tower is gone.", {"tower": "negated"}),
    ("photo", "Never a bus on this road.", {"bus": "negated"}),
    ("photo", "Everything is blue excluding the tower.", {"blue": "positive", "tower": "negated"}),
    ("photo", "A red bus next to a tower.", {"red": "positive", "bus": "positive", "tower": "positive"}),
    ("photo", "Nothing but a bus.", {"bus": "positive"}),  # "but" ends "nothing"'s scope
    (
        "photo",
        "No towers, just one very very long road then a stoplight.",
        {"tower": "negated", "traffic light": "positive"},
    ),
    (
        "photo",
        "A boat is not red although the bus is red.",
        {"vessel": "positive", "red": "negated", "bus": "positive"},
    ),
    ("cxr", "No pleural effusion.", {"effusion": "negated"}),
    ("cxr", "Pneumothorax is ruled out.", {"pneumothorax": "negated"}),
    ("cxr", "Ruled out pneumonia.", {"pneumonia": "negated"}),
    ("cxr", "Pneumonia ruled out.", {"pneumonia": "negated"}),
    ("cxr", "Pneumothorax has been ruled out.", {"pneumothorax": "negated"}),
    ("cxr", "Edema is excluded.", {"edema": "negated"}),
    ("cxr", "Effusion not identified.", {"effusion": "negated"}),
    ("cxr", "Pneumothorax not detected.", {"pneumothorax": "negated"}),
    ("cxr", "Negative for pneumonia.", {"pneumonia": "negated"}),
    ("cxr", "No evidence of edema.", {"edema": "negated"}),
    ("cxr", "The effusion has resolved.", {"effusion": "negated"}),
    ("cxr", "Atelectasis is absent.", {"atelectasis": "negated"}),
    ("cxr", "Edema is not present.", {"edema": "negated"}),
    ("cxr", "Pneumonia cannot be ruled out.", {"pneumonia": "uncertain"}),
    ("cxr", "Pneumothorax cannot be excluded.", {"pneumothorax": "uncertain"}),
    ("cxr", "Possible left effusion.", {"effusion": "uncertain", "left": "uncertain"}),
    ("cxr", "Mild edema, no pneumothorax.", {"edema": "positive", "pneumothorax": "negated"}),
    ("cxr", "Enlarged heart without effusion.", {"cardiomegaly": "positive", "effusion": "negated"}),
    ("cxr", "Right atelectasis.", {"atelectasis": "positive", "right": "positive"}),
]


@pytest.mark.parametrize("vocab_name,text,expected", NEGATION_TABLE)
def test_negation_phrasings(vocab_name, text, expected):
    m = AttributeMatcher(vocab_from_dict(CAPTIONS if vocab_name == "photo" else CXR))
    got = {}
    for x in m.mentions(text):
        got.setdefault(m.vocab.attributes[x.attribute], x.status)
    assert got == expected


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


def test_each_attribute_gets_the_phrase_around_it():
    """region_text=phrase: a sentence naming several attributes gives each the phrase around it (split at , ; and but
    or while whereas with plus), a region's identical phrases once; sentence keeps the original's whole sentences."""
    vocab = vocab_from_dict(CAPTIONS)
    m = AttributeMatcher(vocab)
    name = {vocab.attributes[k]: v for k, v in m.phrases("A red bus and a blue boat, next to a tower").items()}
    assert name == {
        "red": "A red bus",
        "bus": "A red bus",
        "blue": "a blue boat",
        "vessel": "a blue boat",
        "tower": "next to a tower",
    }
    assert {vocab.attributes[k]: v for k, v in m.phrases("a bus with red doors").items()} == {
        "bus": "a bus",
        "red": "red doors",
    }
    assert m.phrases("no buses; a red tower") == {
        vocab.index["red"]: "a red tower",
        vocab.index["tower"]: "a red tower",
    }
    texts = ["A red bus and a blue boat. A tall tower"]
    offsets = np.array([0, 2])
    assigned = np.zeros((2, len(vocab)), bool)
    assigned[0, [vocab.index["bus"], vocab.index["red"]]] = True
    assigned[1, [vocab.index["vessel"], vocab.index["blue"], vocab.index["tower"]]] = True
    rng = np.random.default_rng
    assert assign_text(texts, offsets, assigned, vocab, rng(0)) == ["A red bus", "A tall tower . a blue boat"]
    whole = "A red bus and a blue boat"
    assert assign_text(texts, offsets, assigned, vocab, rng(0), unit="sentence") == [
        f"{whole} . {whole}",
        f"A tall tower . {whole} . {whole}",
    ]
    with pytest.raises(VillaError, match="region_text='word': use phrase or sentence"):
        assign_text(texts, offsets, assigned, vocab, rng(0), unit="word")


def test_docmnist_phrases_are_its_sentences(tiny_docmnist):
    """DocMNIST's sentences each name one attribute, so phrase and sentence give every region the same text."""
    vocab = load_vocab("docmnist")
    ann = load_annotations(tiny_docmnist, vocab, check_images=False)
    gold = ann.region_attribute_matrix(len(vocab))
    a = assign_text(ann.text, ann.region_offsets, gold, vocab, np.random.default_rng(0), unit="phrase")
    b = assign_text(ann.text, ann.region_offsets, gold, vocab, np.random.default_rng(0), unit="sentence")
    assert a == b and sum(t.count(" . ") for t in a) > 100


def test_extractor_refuses_bad_cue_config():
    with pytest.raises(VillaError, match="negation must be 'default' or a mapping"):
        AttributeMatcher(vocab_from_dict({**CXR, "negation": ["no"]}))
    v = vocab_from_dict({**CXR, "negation": {"pre": ["absent"]}})
    assert AttributeMatcher(v).attributes("no edema. absent pneumothorax") == ["edema"]


def test_explain_prints_what_the_config_finds_and_writes_nothing(tmp_path, capsys):
    """--explain N: per caption the attributes found, negated, uncertain and the ignored words, with the words each
    mention matched; no dataset is written."""
    import json

    import yaml

    from villa.data.importers.generic import main

    (tmp_path / "vocab.yaml").write_text(yaml.safe_dump({**CAPTIONS, "uncertainty": "default"}))
    rows = [
        {"image": "a.png", "caption": "Two red buses, no tower. Possibly a boat near the pier."},
        {"image": "b.png", "caption": "A stoplight."},
        {"image": "c.png", "caption": "never read"},
    ]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    args = [
        "--root",
        str(tmp_path),
        "--captions",
        str(tmp_path / "c.jsonl"),
        "--dataset_config",
        str(tmp_path / "vocab.yaml"),
    ]
    assert main([*args, "--explain", "2"]) is None
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"[1] {tmp_path / 'c.jsonl'}:1 a.png: 'Two red buses, no tower. Possibly a boat near the pier.'"
    assert out[1] == "    found:      red ('red'), bus ('buses')"
    assert out[2] == "    negated:    tower ('tower')"
    assert out[3] == "    uncertain:  vessel ('boat') [counted: uncertain=mention]"
    assert out[4] == "    ignored:    two, near, pier"
    assert out[5] == "    attributes: vessel, bus, red"  # vocabulary order
    assert out[7] == "    found:      traffic light ('stoplight')" and len(out) == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "vocab.yaml"]
