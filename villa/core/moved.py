"""Module paths that moved when villa's package grew folders, and the import hook that keeps the old ones working.

``python -m villa.detection ...`` runs ``villa.evaluate.detection`` (after one line on stderr naming the new path),
and ``import villa.datasets.generic`` is ``villa.data.importers.generic`` itself (the same module object), so
commands, scripts and notebooks written against the old paths keep working. Installed by ``import villa``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys

MOVED = {
    "villa.datasets": "villa.data.importers",
    "villa.detection": "villa.evaluate.detection",
    "villa.classification": "villa.evaluate.classification",
    "villa.finegrained": "villa.evaluate.finegrained",
    "villa.detector": "villa.models.detector",
}


def new_name(name: str) -> str | None:
    """The current path of an old module path (``villa.datasets.coco`` -> ``villa.data.importers.coco``), else None."""
    for old, new in MOVED.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old) :]
    return None


class _Alias(importlib.machinery.SourceFileLoader):
    """Imports give the module under its new name; ``python -m`` (runpy asks for the code) runs the new file."""

    def __init__(self, old: str, new: str, path: str):
        super().__init__(old, path)
        self.new = new

    def create_module(self, spec):
        return importlib.import_module(self.new)

    def exec_module(self, module) -> None:
        sys.modules[self.name] = module

    def get_code(self, fullname):
        if fullname == self.name:
            old, new = (n.removesuffix(".__main__") for n in (self.name, self.new))
            print(f"note: {old} is now {new}; python -m {new} ...", file=sys.stderr)
        return super().get_code(fullname)


class MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = new_name(fullname)
        if new is None:
            return None
        spec = importlib.util.find_spec(new)
        if spec is None or spec.origin is None:
            return None
        is_pkg = spec.submodule_search_locations is not None
        return importlib.util.spec_from_file_location(
            fullname,
            spec.origin,
            loader=_Alias(fullname, new, spec.origin),
            submodule_search_locations=list(spec.submodule_search_locations) if is_pkg else None,
        )


def install() -> None:
    if not any(isinstance(f, MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedFinder())
