"""Benchmarks of the ScaleBiO step: cost against SFT, memory, number of sources, model size, and a
second-order hypergradient baseline. Entry point: ``python -m benchmarks.run --out results/bench``."""
