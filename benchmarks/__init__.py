"""Benchmarks of hf_memsinks, run from the repository root: speed (bench.py), GPU checks, memorization/."""
