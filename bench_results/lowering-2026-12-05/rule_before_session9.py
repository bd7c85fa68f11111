"""`python -m jaxvc.bench` with the cuDNN routing rule the H200 run of 2026-12-04 had (every attention with >= 64
keys to cuDNN), to reproduce that run's failure with --lower-for cuda. Run from the repository root:
    PYTHONPATH=. python bench_results/lowering-2026-12-05/rule_before_session9.py --size sd15 --lower-for cuda"""
import sys

import jaxvc.models.attention as attention

attention._cudnn_takes = lambda query_length, key_length, head_dim: key_length >= attention.CUDNN_MIN_KEYS
from jaxvc.bench.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
