"""Benchmarks of docs/benchmarks.md; each runs with `python -m benchmarks.<name>`."""
