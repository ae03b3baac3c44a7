"""Benchmarks of BENCHMARKS.md; each runs with `python -m benchmarks.<name>`."""
