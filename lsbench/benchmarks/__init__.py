"""The `make bench-*` commands: ratios measured side by side in one run."""
