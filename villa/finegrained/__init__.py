"""Fine-grained evaluation: public benchmarks (Winoground, VALSE, VSR, SVO-Probes) from local copies, and a
DocMNIST binding benchmark; one entry point, ``python -m villa.finegrained benchmark=<name> ...``."""
