"""Fine-grained evaluation: public benchmarks (Winoground, VALSE, VSR, SVO-Probes, SugarCrepe, ARO with its
COCO-Order and Flickr30k-Order) from local copies, and a DocMNIST binding benchmark (the names: ``villa.schemas``'
FinegrainedConfig.benchmark); one entry point, ``python -m villa.evaluate.finegrained benchmark=<name> ...``."""
