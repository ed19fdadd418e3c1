"""Models: CLIP through open_clip's factory (clip.py), the region path of its image tower (region_encoder.py), the
text side (text.py), Stage 1's multi-head projection (projection.py), GRAIN's decoder head (grain_head.py) and the
torchvision detectors that propose regions (detector.py)."""

__all__ = ["MultiHeadProjection"]


def __getattr__(name: str):
    """``villa.models.MultiHeadProjection``: the name Stage 1's config instantiates (``model._target_``)."""
    if name == "MultiHeadProjection":
        from villa.models.projection import MultiHeadProjection

        return MultiHeadProjection
    raise AttributeError(f"module 'villa.models' has no attribute {name!r}")
