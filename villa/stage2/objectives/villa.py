"""ViLLA's Stage 2: every region Stage 1 assigned an attribute to, paired with its assigned sentences, plus each
whole image with its caption; the symmetric InfoNCE over all pairs of the batch (the paper's objective)."""

from __future__ import annotations

from typing import Optional

from villa.data.annotations import Annotations
from villa.stage2.objectives.base import Objective


class ViLLA(Objective):
    name = "villa"
    reads_mapping = True

    def region_text(self, ann: Annotations) -> Optional[list[str]]:
        """Stage 1's ``assigned_text`` (mapping.feather): the sentences of the attributes mapped to each region."""
        return ann.table.column("assigned_text").combine_chunks().flatten().to_pylist()
