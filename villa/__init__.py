"""villa: ViLLA (Varma et al., ICCV 2023), faithful and fast.

Pipeline: ``docmnist`` (generate) -> ``preprocess`` (embed) -> ``villa.stage1`` (map regions to attributes)
-> ``villa.stage2`` (train region embeddings) -> ``villa.evaluate``.
"""

__version__ = "0.1.0"

__all__ = ["load", "VillaModel", "map_regions", "compose_config", "train_stage1", "train_stage2", "run_evaluation"]

from villa.core.moved import install as _install_moved

_install_moved()  # old module paths (python -m villa.detection, villa.datasets.*) keep working

_LAZY = {
    "load": ("villa.api", "load"),
    "VillaModel": ("villa.api", "VillaModel"),
    "map_regions": ("villa.api", "map_regions"),
    "compose_config": ("villa.core.config", "compose_config"),
    "train_stage1": ("villa.stage1.train", "train_stage1"),
    "train_stage2": ("villa.stage2.train", "train_stage2"),
    "run_evaluation": ("villa.evaluate.retrieval", "run_evaluation"),  # not "evaluate": that is the package
}


def __getattr__(name: str):
    """The public names, imported on first use so that ``import villa`` stays light (no torch, no Hydra)."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'villa' has no attribute {name!r}")
