"""The GPU benchmark suite's parts; ``benchmarks/gpu_suite.py`` runs them."""
