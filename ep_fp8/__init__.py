"""ep_fp8: Mixture-of-Experts training with expert parallelism and float8 expert matmuls."""

__version__ = "0.1.0"
