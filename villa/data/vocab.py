"""The attribute vocabulary of a dataset: attribute names, their groups and prompt templates, from YAML.

The dataset config (``configs/dataset/<name>.yaml``, or any YAML path) is the only copy of the vocabulary:
the DocMNIST generator, preprocessing and both stages read it through :func:`load_vocab`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from villa.core.env import config_dir
from villa.core.errors import VillaError
from villa.core.io import PathLike, read_text

SENTENCE_SEP = " . "  # how captions and a region's assigned sentences are joined (the original's)


def split_sentences(text: str) -> list[str]:
    """Sentences of a caption or region text: split on ".", stripped, empties dropped."""
    return [s.strip() for s in text.split(".") if s.strip()]


@dataclass(frozen=True)
class Vocabulary:
    """Attributes in a fixed order; each belongs to one group with its prompt templates (``{}`` = the word)."""

    name: str
    attributes: tuple[str, ...]
    groups: tuple[str, ...]
    attribute_group: tuple[int, ...]  # group index of each attribute
    templates: tuple[tuple[str, ...], ...]  # per group
    extra: Mapping[str, Any] = field(default_factory=dict)  # other top-level keys (negation, uncertainty, ...)
    aliases: tuple[tuple[str, ...], ...] = ()  # per attribute: its name, then its aliases (villa/attributes.py)

    def __post_init__(self) -> None:
        if not self.aliases:
            object.__setattr__(self, "aliases", tuple((a,) for a in self.attributes))

    @property
    def index(self) -> dict[str, int]:
        return {a: i for i, a in enumerate(self.attributes)}

    def __len__(self) -> int:
        return len(self.attributes)

    @property
    def digest(self) -> str:
        """Identifies what attribute embeddings depend on: the attributes in order, their groups and templates."""
        blob = json.dumps([self.attributes, self.groups, self.attribute_group, self.templates])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def group_attributes(self, group: str) -> list[str]:
        g = self.groups.index(group)
        return [a for a, gi in zip(self.attributes, self.attribute_group) if gi == g]

    def prompts(self, attribute: str) -> list[str]:
        """The prompt sentences of one attribute (its group's templates filled in)."""
        g = self.attribute_group[self.index[attribute]]
        return [t.format(attribute) for t in self.templates[g]]


def vocab_from_dict(cfg: Mapping[str, Any], source: str = "<dict>") -> Vocabulary:
    """Build a :class:`Vocabulary` from a mapping with ``name`` and ``groups`` (name, attributes, templates)."""
    if "groups" not in cfg or not cfg["groups"]:
        raise VillaError(f"dataset config {source} has no 'groups': list each group's attributes and templates")
    attrs: list[str] = []
    groups: list[str] = []
    attr_group: list[int] = []
    templates: list[tuple[str, ...]] = []
    aliases: list[tuple[str, ...]] = []
    owner: dict[str, str] = {}  # lower-cased name or alias -> its attribute
    for gi, g in enumerate(cfg["groups"]):
        for key in ("name", "attributes", "templates"):
            if key not in g or not g[key]:
                raise VillaError(f"dataset config {source}: group #{gi} has no {key!r}")
        for t in g["templates"]:
            if t.count("{}") != 1:
                raise VillaError(f"dataset config {source}: template {t!r} must contain '{{}}' exactly once")
        groups.append(str(g["name"]))
        templates.append(tuple(str(t) for t in g["templates"]))
        group_aliases = g.get("aliases") or {}
        if not isinstance(group_aliases, Mapping):
            raise VillaError(f"dataset config {source}: group {g['name']!r}: aliases must map an attribute to a list")
        unknown = [k for k in group_aliases if k not in g["attributes"]]
        if unknown:
            raise VillaError(
                f"dataset config {source}: group {g['name']!r} gives aliases for {unknown[0]!r}, not one of its "
                "attributes; list the attribute first or fix the name"
            )
        for a in g["attributes"]:
            if a in attrs:
                raise VillaError(f"dataset config {source}: attribute {a!r} appears twice")
            extra_names = group_aliases.get(a) or []
            if isinstance(extra_names, str):
                extra_names = [extra_names]
            names = (str(a), *(str(x) for x in extra_names))
            for n in names:
                key = " ".join(n.lower().split())
                if not key:
                    raise VillaError(f"dataset config {source}: attribute {a!r} has an empty alias")
                if owner.get(key, a) != a:
                    raise VillaError(
                        f"dataset config {source}: {n!r} names both {owner[key]!r} and {a!r}; keep it under one "
                        "attribute"
                    )
                owner[key] = str(a)
            attrs.append(str(a))
            attr_group.append(gi)
            aliases.append(names)
    extra = {k: v for k, v in cfg.items() if k not in ("name", "groups")}
    return Vocabulary(
        name=str(cfg.get("name", Path(source).stem)),
        attributes=tuple(attrs),
        groups=tuple(groups),
        attribute_group=tuple(attr_group),
        templates=tuple(templates),
        extra=extra,
        aliases=tuple(aliases),
    )


def load_vocab(name_or_path: PathLike | Mapping[str, Any] = "docmnist") -> Vocabulary:
    """Load a dataset vocabulary: a config name (``docmnist``), a YAML path, or an already loaded mapping."""
    if isinstance(name_or_path, Mapping):
        return vocab_from_dict(name_or_path)
    p = Path(name_or_path)
    if p.suffix not in (".yaml", ".yml"):
        p = config_dir() / "dataset" / f"{name_or_path}.yaml"
    if not p.is_file():
        raise VillaError(f"dataset config not found: {p}; pass a YAML path or a name under configs/dataset/")
    text = read_text(p)
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise VillaError(f"dataset config {p} is not valid YAML{at}; fix the file") from e
    if not isinstance(cfg, Mapping):
        raise VillaError(f"dataset config {p} is empty or not a mapping; give it 'name' and 'groups'")
    return vocab_from_dict(cfg, source=str(p))


def vocab_from_config(cfg: Any) -> Vocabulary:
    """The vocabulary of a composed config's ``dataset`` group (configs/dataset/<name>.yaml, or a YAML given by
    path)."""
    from omegaconf import OmegaConf

    if "path" in cfg.dataset:
        return load_vocab(cfg.dataset.path)
    return vocab_from_dict(OmegaConf.to_container(cfg.dataset, resolve=True), source=f"dataset={cfg.dataset.name}")
