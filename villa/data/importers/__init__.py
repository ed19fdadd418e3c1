"""Importers: published dataset layouts into villa's schema (docs/data_format.md), one module each.

    python -m villa.data.importers.generic --root my_photos --captions my_photos/captions.jsonl --dataset_config vocab.yaml
    python -m villa.data.importers.coco --coco_dir coco2017 --out_dir data/coco
    python -m villa.data.importers.deepfashion --root DeepFashion-MultiModal --out_dir data/deepfashion
    python -m villa.data.importers.mimic_cxr --reports mimic-cxr-reports --images mimic-cxr-jpg --out_dir data/mimic
    python -m villa.data.importers.docmnist_plain --data_dir data/docmnist_6000_15.2 --out_dir data/mine   # an example

Each reads its layout into flat columns and finishes with :func:`villa.data.importers.common.write_dataset` (sizes,
splits, attributes from the text, regions from the chosen source, one atomic annotations.feather).
"""
