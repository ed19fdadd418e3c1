"""Evaluation: text-to-region and region-to-text retrieval on held-out regions, image-text retrieval on held-out
images, and Stage 1's mapping quality.

    python -m villa.evaluate model.pretrained=checkpoints/docmnist_stage2/best.pt label=villa
    python -m villa.evaluate model.name=RN50 model.pretrained=openai label=zero_shot

Definitions (docs/evaluation.md). Queries are the vocabulary's attributes, each embedded as the L2-normalised mean
of its prompt templates by the model's text tower; the gallery is every ground-truth region of the split,
embedded by the model's region path. A region is relevant to an attribute when its ``reg_to_attr`` contains it.
Image-text retrieval needs no region labels, so any imported dataset can be evaluated: each held-out image (the
whole image as one box through the same region path, as the one-to-one pairs train it) against every held-out
text (its sentences' mean embedding, as training embeds captions), Recall@1/5/10 both ways.
"""

from villa.core.config import hydra_entry

main = hydra_entry(
    "evaluate", "villa.evaluate.retrieval:run_evaluation", __doc__
)  # the run's code is imported when the run starts

if __name__ == "__main__":
    main()
