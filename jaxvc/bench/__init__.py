"""Benchmarks runnable with `python -m jaxvc.bench.<name>`."""
