"""difuse benchmarks: `python -m bench.kernels`, ... (run from the repository root)."""
