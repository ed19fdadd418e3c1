"""Stage 2: a CLIP-style trainer for region embeddings, one loop for every objective (villa/stage2/objectives/).

    python -m villa.stage2 experiment=docmnist_stage2      # ViLLA: Stage 1's region-attribute pairs + whole images
    python -m villa.stage2 experiment=docmnist_baseline    # one-to-one: whole image <-> whole caption only
    python -m villa.stage2 experiment=pretrain             # CLIP pretraining, both towers, learnable temperature
    python -m villa.stage2 experiment=docmnist_grain       # GRAIN: decoder queries, boxes, L_ic + L_rd + L_box
    torchrun --nproc_per_node=4 -m villa.stage2 experiment=docmnist_stage2    # multi-GPU (DDP)

The image tower is open_clip's ModifiedResNet through the region path (villa/models/region_encoder.py): backbone to
the third stage over the batch of images, one ROI-Align over all regions of the batch, last stage and attention
pool. The objective (``objective=``) decides the pairs, the targets, the loss and any head; this loop does the rest:
read top to bottom, :func:`train_stage2` sets a run up, then per epoch :func:`train_one_epoch`, :func:`validate`,
the plateau schedule, early stopping and one checkpoint commit (villa/core/engine.py).
"""

from villa.core.config import hydra_entry

main = hydra_entry(
    "stage2", "villa.stage2.train:train_stage2", __doc__
)  # the run's code is imported when the run starts

if __name__ == "__main__":
    main()
