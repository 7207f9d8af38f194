"""lsbench: honest benchmarks for early-exit self-speculative decoding (LayerSkip)."""

__version__ = "0.1.0"
