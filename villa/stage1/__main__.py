"""Stage 1: learn, without region labels, which region each caption attribute belongs to; write mapping.feather.

    python -m villa.stage1 experiment=docmnist_stage1 [epochs=10 batch_size=16 model.one_proj=true data_dir=...]

Trains :class:`villa.models.projection.MultiHeadProjection` on frozen region/attribute embeddings (from
preprocessing) with the original's loss (villa/stage1/loss.py), then assigns every attribute of every image to
regions (villa/stage1/mapping.py) and scores the mapping against ``reg_to_attr`` next to the zero-shot rule. The
optimisation step, the non-finite guard, resume and checkpoint commits are the engine's (villa/core/engine.py).
"""

from villa.core.config import hydra_entry

main = hydra_entry(
    "stage1", "villa.stage1.train:train_stage1", __doc__
)  # the run's code is imported when the run starts

if __name__ == "__main__":
    main()
