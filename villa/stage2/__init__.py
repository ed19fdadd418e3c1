"""Stage 2: a CLIP-style trainer on region-text pairs; the objective (objectives/: ViLLA, one-to-one, pretraining,
GRAIN) is chosen by ``objective=``. train.py: the loop; model.py: the model; pairs.py: the pairs and their loader;
optim.py: the tower's optimiser. ``python -m villa.stage2 experiment=...``."""

__all__ = ["train_stage2"]


def __getattr__(name: str):
    if name == "train_stage2":
        from villa.stage2.train import train_stage2

        return train_stage2
    raise AttributeError(f"module 'villa.stage2' has no attribute {name!r}")
