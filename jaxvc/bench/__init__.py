"""Benchmarks: `python -m jaxvc.bench` (train step, sampling and VAE decode, jaxvc vs diffusers; cli.py) and
`python -m jaxvc.bench.data_throughput` (the input pipeline)."""
