"""villa: ViLLA (Varma et al., ICCV 2023), faithful and fast.

Pipeline: ``docmnist`` (generate) -> ``preprocess`` (embed) -> ``villa.stage1`` (map regions to attributes)
-> ``villa.stage2`` (train region embeddings) -> ``villa.evaluate``.
"""

__version__ = "0.1.0"

__all__ = ["load", "VillaModel", "map_regions", "compose_config", "train_stage1", "train_stage2", "run_evaluation"]

_LAZY = {
    "load": ("villa.api", "load"),
    "VillaModel": ("villa.api", "VillaModel"),
    "map_regions": ("villa.api", "map_regions"),
    "compose_config": ("villa.config", "compose_config"),
    "train_stage1": ("villa.stage1", "train_stage1"),
    "train_stage2": ("villa.stage2", "train_stage2"),
    "run_evaluation": ("villa.evaluate", "run_evaluation"),  # not "evaluate": that name is the submodule
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
