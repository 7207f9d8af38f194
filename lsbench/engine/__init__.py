"""The decoding loops: lsbench's speculators and transformers' reference harness."""
