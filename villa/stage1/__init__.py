"""Stage 1: learn, without region labels, which region each attribute of a caption belongs to (train.py: the loop,
loss.py: the original's contrastive loss, mapping.py: attributes assigned to regions and scored);
``python -m villa.stage1 experiment=...``."""

__all__ = ["train_stage1"]


def __getattr__(name: str):
    if name == "train_stage1":
        from villa.stage1.train import train_stage1

        return train_stage1
    raise AttributeError(f"module 'villa.stage1' has no attribute {name!r}")
