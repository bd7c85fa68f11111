"""`python -m jaxvc.bench` with the cuDNN routing rule of sessions 9-11 (short or odd sequences to the einsum path, no
head-dim limit), to reproduce its failure for an A100 (compute capability 8.0) with --lower-for cuda:
    PYTHONPATH=. python bench_results/lowering-2026-12-05/rule_sessions9to11.py --size sd15 --lower-for cuda \
        --assume-compute-capability 8.0"""
import sys

import jaxvc.models.attention as attention

attention._cudnn_takes = lambda query_length, key_length, head_dim: (
    key_length >= attention.CUDNN_MIN_KEYS and query_length % 2 == 0 and key_length % 2 == 0)
from jaxvc.bench.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
