"""Data in: the annotation format every step reads (annotations.py), the attribute vocabulary and the extraction of
attributes from free text, where regions come from (regions.py), images as tensors, batches of variable-length
region sets, the embeddings preprocessing writes, and the importers of published layouts (importers/)."""
