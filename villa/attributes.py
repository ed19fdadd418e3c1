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
of") applies to the mentions after it, a *post* cue ("is ruled out", "not seen") to the mentions before it, over at
most ``negation_window`` words (5, NegEx's scope) and never past a terminator ("but", "however", "although",
";", ...) or the sentence's end. As in NegEx, "and" does not end a scope: "no buses and a stoplight" negates both. Negation wins over uncertainty; an
uncertainty cue that contains a negation cue ("cannot be ruled out") is uncertainty.

The same :class:`AttributeMatcher` writes an imported dataset's ``attributes`` (:func:`extract_attributes`) and
picks, in Stage 1, the caption sentences that name each region's attributes (:meth:`AttributeMatcher.sentence_matrix`).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from villa.errors import VillaError
from villa.vocab import Vocabulary, split_sentences

# NegEx-style cue lists (Chapman et al. 2001 and the radiology lists derived from it), shortened to the common ones.
DEFAULT_NEGATION = {
    "pre": [
        "no", "not", "without", "negative for", "free of", "no evidence of", "no signs of", "no sign of",
        "absence of", "absent", "denies", "rules out", "ruled out", "resolution of", "clear of", "neither", "nor",
    ],
    "post": ["is ruled out", "are ruled out", "was ruled out", "not seen", "is absent", "are absent", "has resolved",
             "have resolved", "resolved", "is not present", "are not present", "is not seen", "are not seen"],
}  # fmt: skip
DEFAULT_UNCERTAINTY = {
    "pre": [
        "possible", "possibly", "probable", "probably", "may represent", "may be", "might be", "could be",
        "suggestive of", "suggests", "concerning for", "cannot exclude", "can not exclude", "questionable",
        "suspicious for", "likely", "versus", "vs", "differential includes", "equivocal",
    ],
    "post": ["cannot be excluded", "cannot be ruled out", "can not be ruled out", "not excluded",
             "is not excluded", "is possible", "is suspected", "may be present"],
}  # fmt: skip
TERMINATORS = ["but", "however", "although", "though", "except", "aside from", "apart from", "yet", "which",
               "whereas", "while", "otherwise"]  # fmt: skip
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


def _phrase_pattern(phrase: str) -> str:
    """A phrase as a regex: literal words, any whitespace between them."""
    return r"\s+".join(re.escape(w) for w in phrase.split())


def _alternation(phrases: Iterable[str]) -> Optional[re.Pattern]:
    """One case-insensitive whole-word regex matching any of ``phrases``, longest first."""
    uniq = sorted({" ".join(p.lower().split()) for p in phrases if p.strip()}, key=lambda p: (-len(p), p))
    if not uniq:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(_phrase_pattern(p) for p in uniq) + r")(?!\w)", re.IGNORECASE)


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
        self.attr_re = _alternation(self.phrase_to_attr)
        neg = _cues(extra.get("negation"), DEFAULT_NEGATION, "negation", source)
        unc = _cues(extra.get("uncertainty"), DEFAULT_UNCERTAINTY, "uncertainty", source)
        self.uncertain_policy = str(extra.get("uncertain", "mention"))
        if self.uncertain_policy not in UNCERTAIN_POLICIES:
            raise VillaError(
                f"dataset config {source}: uncertain={self.uncertain_policy!r}; use mention (counted) or drop"
            )
        self.neg_pre, self.neg_post = _alternation(neg["pre"]), _alternation(neg["post"])
        self.unc_pre, self.unc_post = _alternation(unc["pre"]), _alternation(unc["post"])
        self.has_cues = any(r is not None for r in (self.neg_pre, self.neg_post, self.unc_pre, self.unc_post))
        words = _alternation(TERMINATORS)
        self.term_re = re.compile(f"{words.pattern}|[;:]", re.IGNORECASE) if self.has_cues else None
        self.window = extra.get("negation_window", NEGEX_WINDOW)
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            raise VillaError(
                f"dataset config {source}: negation_window={self.window!r}; a number of words >= 1, or null"
            )
        self.cue_words = {w for lst in (*neg.values(), *unc.values()) for c in lst for w in c.lower().split()}

    # --- one sentence ---------------------------------------------------------------------------------------------

    def _scopes(self, s: str) -> list[tuple[int, int, str]]:
        """Spans of ``s`` under a cue: (start, end, 'negated' | 'uncertain')."""
        unc = [(m.start(), m.end(), kind) for r, kind in ((self.unc_pre, "pre"), (self.unc_post, "post")) if r
               for m in r.finditer(s)]  # fmt: skip
        neg = [(m.start(), m.end(), kind) for r, kind in ((self.neg_pre, "pre"), (self.neg_post, "post")) if r
               for m in r.finditer(s)]  # fmt: skip
        # a negation word inside an uncertainty cue ("cannot be ruled out", "not excluded") belongs to that cue
        neg = [c for c in neg if not any(u0 <= c[0] and c[1] <= u1 for u0, u1, _ in unc)]
        terms = [m.start() for m in self.term_re.finditer(s)] if self.term_re else []
        word_starts = [m.start() for m in re.finditer(r"\w+", s)]
        word_ends = [m.end() for m in re.finditer(r"\w+", s)]
        out = []
        for cues, status in ((neg, "negated"), (unc, "uncertain")):
            for c0, c1, kind in cues:
                if kind == "pre":
                    end = min([t for t in terms if t >= c1], default=len(s))
                    if self.window:  # at most ``window`` words after the cue
                        after = [e for e in word_ends if e > c1]
                        if len(after) > self.window:
                            end = min(end, after[self.window - 1])
                    out.append((c1, end, status))
                else:
                    start = max([t for t in terms if t < c0], default=0)
                    if self.window:
                        before = [b for b in word_starts if b < c0]
                        if len(before) > self.window:
                            start = max(start, before[-self.window])
                    out.append((start, c0, status))
        return out

    def sentence_mentions(self, sentence: str, index: int = 0) -> list[Mention]:
        """Every attribute mention of one sentence with its status."""
        if self.attr_re is None:
            return []
        found = [(m.start(), m.end(), self.phrase_to_attr[" ".join(m.group(0).lower().split())])
                 for m in self.attr_re.finditer(sentence)]  # fmt: skip
        if not found:
            return []
        scopes = self._scopes(sentence) if self.has_cues else []
        out = []
        for s0, s1, a in found:
            status = "positive"
            hit = {st for c0, c1, st in scopes if c0 <= s0 and s1 <= c1}
            if "negated" in hit:
                status = "negated"
            elif "uncertain" in hit:
                status = "uncertain"
            out.append(Mention(a, index, s0, s1, status))
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
    unmatched: Counter = Counter()
    out: list[list[str]] = []
    empty: list[int] = []
    word_re = re.compile(r"[a-z][a-z\-]+")
    skip = STOPWORDS | matcher.cue_words
    for t_i, text in enumerate(texts):
        text = text or ""
        ids = set()
        for si, s in enumerate(split_sentences(text)):
            ms = matcher.sentence_mentions(s, si)
            rest = s
            for m in sorted(ms, key=lambda m: -m.start):
                counts[m.status][m.attribute] += 1
                if matcher.counts(m):
                    ids.add(m.attribute)
                rest = rest[: m.start] + " " + rest[m.end :]
            unmatched.update(w for w in word_re.findall(rest.lower()) if w not in skip)
        attrs = [vocab.attributes[i] for i in sorted(ids)]
        for i in ids:
            counts["texts"][i] += 1
        if not attrs:
            empty.append(t_i)
        out.append(attrs)
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


def format_report(report: dict[str, Any], top: int = 10) -> str:
    """The coverage report as a few printable lines."""
    n = report["texts"]
    lines = [f"attributes: {n - report['texts_without_attribute']} of {n} texts have at least one attribute "
             f"({report['texts_without_attribute']} have none)"]  # fmt: skip
    per = sorted(report["per_attribute"].items(), key=lambda kv: -kv[1]["texts"])
    shown = ", ".join(f"{a} {c['texts']}" + (f" (-{c['negated']})" if c["negated"] else "") for a, c in per[:top])
    lines.append(f"  most frequent (texts; negated mentions): {shown}")
    if report["never_seen"]:
        lines.append(f"  never seen ({len(report['never_seen'])}): {', '.join(report['never_seen'][:top])}")
    if report["suggestions"]:
        sug = ", ".join(f"{w} {c}" for w, c in report["suggestions"][:top])
        lines.append(f"  frequent unmatched words (alias candidates): {sug}")
    return "\n".join(lines)
