"""Evaluation: text-to-region and region-to-text retrieval on held-out regions (retrieval.py,
``python -m villa.evaluate``), zero-shot detection scored by pycocotools (detection.py), zero-shot classification
(classification.py) and fine-grained benchmarks (finegrained/)."""

__all__ = ["run_evaluation"]


def __getattr__(name: str):
    if name == "run_evaluation":
        from villa.evaluate.retrieval import run_evaluation

        return run_evaluation
    raise AttributeError(f"module 'villa.evaluate' has no attribute {name!r}")
