"""Preprocessing: frozen CLIP embeddings of every region and every attribute of a dataset."""
