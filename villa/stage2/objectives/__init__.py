"""Stage 2 objectives, one class each, chosen by ``objective=<name>``:

- ``villa``: Stage 1's region-attribute pairs plus whole images (villa.py, the paper's);
- ``one_to_one``: whole image <-> whole caption only, the paper's baseline (one_to_one.py);
- ``pretrain``: CLIP pretraining, both towers (pretrain.py);
- ``grain``: GRAIN's decoder head, L_ic + L_rd + L_box (grain.py).

``objective=my_package.my_module.MyObjective`` trains with your own subclass of :class:`Objective` (base.py;
docs/stage2.md shows one).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from villa.core.errors import VillaError

if TYPE_CHECKING:
    from villa.stage2.objectives.base import Objective

BUILTIN = {
    "villa": "villa.stage2.objectives.villa.ViLLA",
    "one_to_one": "villa.stage2.objectives.one_to_one.OneToOne",
    "pretrain": "villa.stage2.objectives.pretrain.Pretrain",
    "grain": "villa.stage2.objectives.grain.Grain",
}


def build_objective(cfg: DictConfig) -> Objective:
    """The objective ``cfg.objective`` names, with ``cfg`` and the dataset's vocabulary."""
    from villa.data.vocab import vocab_from_config

    return objective_class(cfg.objective)(cfg, vocab_from_config(cfg))


def objective_class(name: str) -> type[Objective]:
    """A built-in objective's class by name, or a subclass of :class:`Objective` by its dotted path."""
    from villa.stage2.objectives.base import Objective

    path = BUILTIN.get(name, name)
    module, _, attr = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr) if module else None
    except (ImportError, AttributeError) as e:
        raise VillaError(
            f"objective={name!r} is neither one of {', '.join(BUILTIN)} nor an importable class ({type(e).__name__}: "
            f"{e}); give a built-in name or module.Class"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, Objective)):
        raise VillaError(
            f"objective={name!r}: use one of {', '.join(BUILTIN)}, or module.Class naming a subclass of "
            "villa.stage2.objectives.base.Objective"
        )
    return cls
