"""Attributes from free text: one matcher for the vocabulary's names and aliases, with negation and uncertainty.

The dataset config gives each attribute optional ``aliases`` (synonyms, multi-word phrases, plurals), and
optionally NegEx-style cue lists (docs/data_format.md)::

    groups:
      - name: finding
        attributes: [effusion, pneumothorax]
        aliases: {effusion: [pleural effusion, effusions]}
        templates: ["there is {}"]
    negation: default        # or {pre: [...], post: [...]}; absent: no negation handling
    uncertainty: default     # or {pre: [...], post: [...]}; absent: none
    uncertain: mention       # policy for uncertain mentions: mention (counted, CheXpert's "U-Ones") or drop
    plurals: false           # true: also match each name and alias with a plural ending (s / es)
    negation_window: 5       # words a cue reaches (NegEx's); null: to the end of the sentence or a terminator

Matching is case-insensitive on whole words (a phrase's internal spaces match any whitespace); at one position the
longest phrase wins ("pleural effusion" before "effusion"). Text is split into sentences on ``.`` (the sentences
Stage 1 gives to regions). Within a sentence a *pre* cue ("no", "without", "negative for", "free of", "no evidence
of") applies to the mentions after it, a *post* cue ("is ruled out", "not seen", "are not in") to the mentions before
it, a cue in both lists ("absent", "missing", "ruled out") both ways, over at most ``negation_window`` words (5, NegEx's scope) and never past a terminator ("but", "however", "although",
";", ...) or the sentence's end. As in NegEx, "and" does not end a scope: "no buses and a stoplight" negates both. Negation wins over uncertainty; an
uncertainty cue that contains a negation cue ("cannot be ruled out") is uncertainty.

The same :class:`AttributeMatcher` writes an imported dataset's ``attributes`` (:func:`extract_attributes`) and
picks, in Stage 1, the caption sentences that name each region's attributes (:meth:`AttributeMatcher.sentence_matrix`).
"""

from __future__ import annotations

import bisect
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from villa.core.errors import VillaError
from villa.data.vocab import Vocabulary, split_sentences

# NegEx-style cue lists (Chapman et al. 2001 and the radiology lists derived from it), shortened to the common ones.
DEFAULT_NEGATION = {
    "pre": [
        "no",
        "not",
        "without",
        "negative for",
        "free of",
        "no evidence of",
        "no signs of",
        "no sign of",
        "absence of",
        "absent",
        "denies",
        "rules out",
        "ruled out",
        "resolution of",
        "clear of",
        "neither",
        "nor",
        "no longer",
        "not any",
        "none of",
        "lack of",
        "lacks",
        "lacking",
        "devoid of",
        "never",
        "missing",
        "excluding",
        "rather than",
        "instead of",
        "isn't",
        "aren't",
        "wasn't",
        "weren't",
        "doesn't have",
        "don't see",
        "cannot see",
        "there is no",
        "there are no",
    ],
    "post": [
        "is ruled out",
        "are ruled out",
        "was ruled out",
        "not seen",
        "is absent",
        "are absent",
        "has resolved",
        "have resolved",
        "resolved",
        "is not present",
        "are not present",
        "is not seen",
        "are not seen",
        "not in",
        "is not in",
        "are not in",
        "not visible",
        "is not visible",
        "are not visible",
        "not present",
        "not shown",
        "not pictured",
        "not identified",
        "not detected",
        "is missing",
        "are missing",
        "missing",
        "absent",
        "ruled out",
        "has been ruled out",
        "excluded",
        "is excluded",
        "are excluded",
        "is gone",
        "are gone",
        "nowhere to be seen",
    ],
}
DEFAULT_UNCERTAINTY = {
    "pre": [
        "possible",
        "possibly",
        "probable",
        "probably",
        "may represent",
        "may be",
        "might be",
        "could be",
        "suggestive of",
        "suggests",
        "concerning for",
        "cannot exclude",
        "can not exclude",
        "questionable",
        "suspicious for",
        "likely",
        "versus",
        "vs",
        "differential includes",
        "equivocal",
    ],
    "post": [
        "cannot be excluded",
        "cannot be ruled out",
        "can not be ruled out",
        "not excluded",
        "is not excluded",
        "is possible",
        "is suspected",
        "may be present",
    ],
}
TERMINATORS = [
    "but",
    "however",
    "although",
    "though",
    "except",
    "aside from",
    "apart from",
    "yet",
    "which",
    "whereas",
    "while",
    "otherwise",
]
# Where a sentence splits into the phrases Stage 1 gives to regions (``region_text=phrase``): these punctuation marks
# and whole words (docs/stage1.md)
PHRASE_MARKS = ",;:"
PHRASE_WORDS = frozenset({"and", "but", "or", "while", "whereas", "with", "plus"})
UNCERTAIN_POLICIES = ("mention", "drop")
NEGEX_WINDOW = 5  # words a cue reaches (NegEx's scope); null in the config: to the sentence's end or a terminator

# Words never suggested as missing vocabulary (the coverage report's "most frequent unmatched words").
STOPWORDS = frozenset(
    """a an the and or of in on at to for with by from is are was were be been being this that these those it its
    there here as into onto over under than then so such some any all each both very can could may might will would
    shall should has have had do does did not no nor only also again more most less least other same own which who
    whom whose what when where why how i you he she we they his her their our your my me him them us image photo
    picture shows showing shown appears seen s""".split()
)


WORD = re.compile(r"\w+")


class PhraseIndex:
    """Whole-word phrase lookup on a sentence's word tokens: every phrase is indexed by its first word, and a
    sentence is scanned once, left to right, taking the longest phrase that starts at each word (non-overlapping,
    as a regex alternation would, but in time linear in the words rather than in words x phrases). Words are
    ``\\w+`` tokens, lower-cased; between a phrase's words the text may have any whitespace, and otherwise must
    have the phrase's own punctuation ("t-shirt" matches "T-Shirt", not "t, shirt")."""

    def __init__(self, phrases: dict[str, Any]):
        self.first: dict[str, list[tuple[list[str], list[str], Any]]] = {}
        for phrase, payload in phrases.items():
            low = phrase.lower()
            ms = list(WORD.finditer(low))
            if not ms:
                continue
            words = [m.group() for m in ms]
            seps = [low[ms[k].end() : ms[k + 1].start()].strip() for k in range(len(ms) - 1)]
            self.first.setdefault(words[0], []).append((words, seps, payload))
        for cands in self.first.values():
            cands.sort(key=lambda c: -len(c[0]))

    def __bool__(self) -> bool:
        return bool(self.first)

    def find(self, low: str, toks: list[str], spans: list[tuple[int, int]]) -> list[tuple[int, int, Any]]:
        """(first token, end token, payload) of each phrase found in a tokenised sentence."""
        out, i, n = [], 0, len(toks)
        first = self.first
        while i < n:
            cands = first.get(toks[i])
            hit = None
            if cands is not None:
                for words, seps, payload in cands:
                    j = i + len(words)
                    if (
                        j <= n
                        and toks[i:j] == words
                        and all(low[spans[i + k][1] : spans[i + k + 1][0]].strip() == sep for k, sep in enumerate(seps))
                    ):
                        hit = (i, j, payload)
                        break
            if hit is None:
                i += 1
            else:
                out.append(hit)
                i = hit[1]
        return out


def tokenize(sentence: str) -> tuple[str, list[str], list[tuple[int, int]]]:
    """The lower-cased sentence, its word tokens and their character spans."""
    low = sentence.lower()
    if len(low) != len(sentence):  # a character whose lower case is longer: keep the original's positions
        low = "".join(c.lower()[:1] for c in sentence)
    ms = list(WORD.finditer(low))
    return low, [m.group() for m in ms], [m.span() for m in ms]


def _plural(word: str) -> str:
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and len(word) > 1 and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _cues(spec: Any, default: dict[str, list[str]], what: str, source: str) -> dict[str, list[str]]:
    if spec is None or spec is False:
        return {"pre": [], "post": []}
    if spec == "default" or spec is True:
        return {k: list(v) for k, v in default.items()}
    if not isinstance(spec, dict) or not set(spec) <= {"pre", "post"}:
        raise VillaError(
            f"dataset config {source}: {what} must be 'default' or a mapping with 'pre' and/or 'post' lists"
        )
    return {k: [str(c) for c in spec.get(k) or []] for k in ("pre", "post")}


@dataclass
class Mention:
    """One attribute mention in a text: vocabulary index, sentence index, character span within the sentence, and
    ``status``: positive, negated or uncertain."""

    attribute: int
    sentence: int
    start: int
    end: int
    status: str


@dataclass
class AttributeMatcher:
    """Finds a vocabulary's attributes (by name or alias) in text, with negation and uncertainty (module docs)."""

    vocab: Vocabulary
    phrase_to_attr: dict[str, int] = field(init=False)
    uncertain_policy: str = field(init=False)

    def __post_init__(self) -> None:
        extra = self.vocab.extra or {}
        source = f"{self.vocab.name!r}"
        plurals = bool(extra.get("plurals", False))
        self.phrase_to_attr = {}
        for a, names in enumerate(self.vocab.aliases):
            forms = list(names) + ([_plural(n) for n in names] if plurals else [])
            for n in forms:
                key = " ".join(n.lower().split())
                other = self.phrase_to_attr.get(key)
                if other is not None and other != a:
                    if n in names:  # an explicit name/alias shared by two attributes (vocab_from_dict checks this too)
                        raise VillaError(
                            f"dataset config {source}: {n!r} names both {self.vocab.attributes[other]!r} and "
                            f"{self.vocab.attributes[a]!r}; keep it under one attribute"
                        )
                    continue  # an automatic plural that is another attribute's word: the explicit one wins
                self.phrase_to_attr.setdefault(key, a)
        self.attr_index = PhraseIndex(self.phrase_to_attr)
        neg = _cues(extra.get("negation"), DEFAULT_NEGATION, "negation", source)
        unc = _cues(extra.get("uncertainty"), DEFAULT_UNCERTAINTY, "uncertainty", source)
        self.uncertain_policy = str(extra.get("uncertain", "mention"))
        if self.uncertain_policy not in UNCERTAIN_POLICIES:
            raise VillaError(
                f"dataset config {source}: uncertain={self.uncertain_policy!r}; use mention (counted) or drop"
            )
        # one index of every cue: at a word the longest cue wins, so a negation word inside an uncertainty cue
        # ("cannot be ruled out", "not excluded") belongs to that cue; terminators end scopes
        cues: dict[str, tuple[str, str]] = {}
        for status, spec in (("negated", neg), ("uncertain", unc)):
            for kind in ("pre", "post"):
                for c in spec[kind]:
                    key = " ".join(c.lower().split())
                    had = cues.setdefault(key, (status, kind))
                    if had[0] == status and had[1] != kind:  # in both lists ("absent", "missing"): both ways
                        cues[key] = (status, "both")
        self.has_cues = bool(cues)
        for t in TERMINATORS:
            cues.setdefault(t, ("term", ""))
        self.cue_index = PhraseIndex(cues) if self.has_cues else None
        self.window = extra.get("negation_window", NEGEX_WINDOW)
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            raise VillaError(
                f"dataset config {source}: negation_window={self.window!r}; a number of words >= 1, or null"
            )
        self.cue_words = {w for lst in (*neg.values(), *unc.values()) for c in lst for w in c.lower().split()}

    # --- one sentence ---------------------------------------------------------------------------------------------

    def _scopes(self, low: str, toks: list[str], spans: list[tuple[int, int]]) -> list[tuple[int, int, str]]:
        """Token ranges under a cue: (start, end, 'negated' | 'uncertain')."""
        found = self.cue_index.find(low, toks, spans)
        starts = [sp[0] for sp in spans]
        pre_stops, post_stops = [], []  # where a pre cue's scope ends / a post cue's scope begins
        for i, j, (status, _) in found:
            if status == "term":
                pre_stops.append(i)
                post_stops.append(j)
        for k, ch in enumerate(low):
            if ch in ";:":
                b = bisect.bisect_left(starts, k)
                pre_stops.append(b)
                post_stops.append(b)
        n, w = len(toks), self.window
        out = []
        for i, j, (status, kind) in found:
            if status == "term":
                continue
            if kind in ("pre", "both"):
                end = min([b for b in pre_stops if b >= j], default=n)
                out.append((j, min(end, j + w) if w else end, status))
            if kind in ("post", "both"):
                start = max([b for b in post_stops if b <= i], default=0)
                out.append((max(start, i - w) if w else start, i, status))
        return out

    def _mentions(self, sentence: str, index: int = 0) -> tuple[list[Mention], list[str], list[tuple[int, int]]]:
        low, toks, spans = tokenize(sentence)
        found = self.attr_index.find(low, toks, spans) if self.attr_index else []
        if not found:
            return [], toks, []
        scopes = self._scopes(low, toks, spans) if self.has_cues else []
        out, ranges = [], []
        for i, j, a in found:
            hit = {st for c0, c1, st in scopes if c0 <= i and j <= c1}
            status = "negated" if "negated" in hit else "uncertain" if "uncertain" in hit else "positive"
            out.append(Mention(a, index, spans[i][0], spans[j - 1][1], status))
            ranges.append((i, j))
        return out, toks, ranges

    def sentence_mentions(self, sentence: str, index: int = 0) -> list[Mention]:
        """Every attribute mention of one sentence with its status."""
        return self._mentions(sentence, index)[0]

    def phrases(self, sentence: str) -> dict[int, str]:
        """For each attribute a sentence names in a way that counts, the phrase around its first such mention: the
        stretch between the nearest phrase boundaries (``PHRASE_MARKS`` and the words in ``PHRASE_WORDS``) on either
        side. "a red bus and a blue boat" gives red and bus "a red bus", blue and boat "a blue boat"."""
        ms = [m for m in self.sentence_mentions(sentence) if self.counts(m)]
        if not ms:
            return {}
        low, toks, spans = tokenize(sentence)
        cuts = [k for k, ch in enumerate(low) if ch in PHRASE_MARKS]
        bounds = sorted([(k, k + 1) for k in cuts] + [sp for t, sp in zip(toks, spans) if t in PHRASE_WORDS])
        out: dict[int, str] = {}
        for m in ms:
            if m.attribute in out:
                continue
            left = max([b for a, b in bounds if b <= m.start], default=0)
            right = min([a for a, b in bounds if a >= m.end], default=len(sentence))
            out[m.attribute] = sentence[left:right].strip(" \t\n" + PHRASE_MARKS)
        return out

    def counts(self, m: Mention) -> bool:
        """Whether a mention makes the attribute one of the text's (positive; uncertain under policy 'mention')."""
        return m.status == "positive" or (m.status == "uncertain" and self.uncertain_policy == "mention")

    def sentence_matrix(self, sentences: Sequence[str]) -> np.ndarray:
        """(S, A) bool: the attributes each sentence mentions (counted mentions only)."""
        out = np.zeros((len(sentences), len(self.vocab)), dtype=bool)
        for i, s in enumerate(sentences):
            for m in self.sentence_mentions(s, i):
                if self.counts(m):
                    out[i, m.attribute] = True
        return out

    def mentions(self, text: str) -> list[Mention]:
        return [m for i, s in enumerate(split_sentences(text)) for m in self.sentence_mentions(s, i)]

    def attributes(self, text: str) -> list[str]:
        """The text's attributes in vocabulary order: mentioned at least once in a way that counts. An attribute
        affirmed in one sentence and negated in another counts (it is described somewhere in the text)."""
        ids = sorted({m.attribute for m in self.mentions(text) if self.counts(m)})
        return [self.vocab.attributes[i] for i in ids]


@dataclass
class Extraction:
    """:func:`extract_attributes`' result: per text its attributes (vocabulary order), and the coverage report."""

    attributes: list[list[str]]
    report: dict[str, Any]


def extract_attributes(texts: Sequence[str], vocab: Vocabulary, suggestions: int = 20) -> Extraction:
    """Attributes of every text, and a coverage report: texts with no attribute, each attribute's positive /
    negated / uncertain counts, vocabulary entries never seen, and the most frequent words outside any mention
    (candidates for aliases)."""
    matcher = AttributeMatcher(vocab)
    n_attr = len(vocab)
    counts = {k: np.zeros(n_attr, np.int64) for k in ("positive", "negated", "uncertain", "texts")}
    skip = STOPWORDS | matcher.cue_words
    seen: dict[str, tuple[tuple[int, ...], list[Mention], list[str]]] = {}  # each unique sentence is read once
    occurrences: Counter = Counter()
    out: list[list[str]] = []
    empty: list[int] = []
    names = vocab.attributes
    for t_i, text in enumerate(texts):
        ids: set[int] = set()
        for s in split_sentences(text or ""):
            got = seen.get(s)
            if got is None:
                ms, toks, ranges = matcher._mentions(s)
                covered = {k for i, j in ranges for k in range(i, j)}
                rest = [
                    t for k, t in enumerate(toks) if k not in covered and len(t) > 1 and t.isalpha() and t not in skip
                ]
                got = seen[s] = (tuple(m.attribute for m in ms if matcher.counts(m)), ms, rest)
            occurrences[s] += 1
            ids.update(got[0])
        attrs = [names[i] for i in sorted(ids)]
        if ids:
            counts["texts"][list(ids)] += 1
        else:
            empty.append(t_i)
        out.append(attrs)
    unmatched: Counter = Counter()
    for s, n in occurrences.items():
        _, ms, rest = seen[s]
        for m in ms:
            counts[m.status][m.attribute] += n
        for w in rest:
            unmatched[w] += n
    report = {
        "texts": len(texts),
        "texts_without_attribute": len(empty),
        "examples_without_attribute": empty[:10],
        "per_attribute": {
            a: {k: int(counts[k][i]) for k in ("texts", "positive", "negated", "uncertain")}
            for i, a in enumerate(vocab.attributes)
        },
        "never_seen": [a for i, a in enumerate(vocab.attributes) if counts["texts"][i] == 0],
        "suggestions": [[w, int(c)] for w, c in unmatched.most_common(suggestions)],
        "uncertain_policy": matcher.uncertain_policy,
    }
    return Extraction(out, report)


def explain(texts: Sequence[str], vocab: Vocabulary, names: Optional[Sequence[str]] = None) -> str:
    """What the matcher reads in each text, for tuning a dataset config's aliases and cues without importing or
    training: per text, the attributes found (counted), negated, uncertain (with the policy that decides whether
    they count), and the ignored words (outside every mention and cue, not stop words: alias candidates). Each
    mention shows the words it matched."""
    matcher = AttributeMatcher(vocab)
    skip = STOPWORDS | matcher.cue_words
    lines = []
    for k, text in enumerate(texts):
        label = names[k] if names is not None else str(k)
        lines.append(f"[{k + 1}] {label}: {text!r}")
        groups: dict[str, list[str]] = {"found": [], "negated": [], "uncertain": []}
        ignored: list[str] = []
        for i, sentence in enumerate(split_sentences(text or "")):
            ms, toks, ranges = matcher._mentions(sentence, i)
            for m in ms:
                kind = "found" if m.status == "positive" else m.status
                groups[kind].append(f"{vocab.attributes[m.attribute]} ({sentence[m.start : m.end]!r})")
            covered = {j for a, b in ranges for j in range(a, b)}
            ignored += [
                t for j, t in enumerate(toks) if j not in covered and t.isalpha() and len(t) > 1 and t not in skip
            ]
        policy = "counted" if matcher.uncertain_policy == "mention" else "not counted"
        for kind, items in groups.items():
            note = f" [{policy}: uncertain={matcher.uncertain_policy}]" if kind == "uncertain" and items else ""
            lines.append(f"    {kind + ':':<12}{', '.join(items) or '-'}{note}")
        lines.append(f"    {'ignored:':<12}{', '.join(dict.fromkeys(ignored)) or '-'}")
        lines.append(f"    {'attributes:':<12}{', '.join(matcher.attributes(text or '')) or '(none)'}")
    return "\n".join(lines)


def format_report(report: dict[str, Any], top: int = 10) -> str:
    """The coverage report as a few printable lines."""
    n = report["texts"]
    lines = [
        f"attributes: {n - report['texts_without_attribute']} of {n} texts have at least one attribute "
        f"({report['texts_without_attribute']} have none)"
    ]
    per = sorted(report["per_attribute"].items(), key=lambda kv: -kv[1]["texts"])
    shown = ", ".join(f"{a} {c['texts']}" + (f" (-{c['negated']})" if c["negated"] else "") for a, c in per[:top])
    lines.append(f"  most frequent (texts; negated mentions): {shown}")
    if report["never_seen"]:
        lines.append(f"  never seen ({len(report['never_seen'])}): {', '.join(report['never_seen'][:top])}")
    if report["suggestions"]:
        sug = ", ".join(f"{w} {c}" for w, c in report["suggestions"][:top])
        lines.append(f"  frequent unmatched words (alias candidates): {sug}")
    return "\n".join(lines)
