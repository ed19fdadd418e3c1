"""The one-to-one baseline (the paper's "CLIP-FT-Img"): each whole image against its whole caption, the frozen text
tower's embeddings as targets, only the image tower training, at the original's fixed temperature."""

from __future__ import annotations

from villa.stage2.objectives.base import Objective


class OneToOne(Objective):
    name = "one_to_one"
