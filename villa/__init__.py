"""villa: ViLLA (Varma et al., ICCV 2023), faithful and fast.

Pipeline: ``docmnist`` (generate) -> ``preprocess`` (embed) -> ``villa.stage1`` (map regions to attributes)
-> ``villa.stage2`` (train region embeddings) -> ``villa.evaluate``.
"""

__version__ = "0.1.0"
