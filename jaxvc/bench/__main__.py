"""``python -m jaxvc.bench``: the side-by-side jaxvc / diffusers benchmark (see jaxvc/bench/cli.py)."""
import sys

from jaxvc.bench.cli import main

sys.exit(main())
