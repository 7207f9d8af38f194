"""What is measured: jobs, datasets, metrics, the per-example runner and the scan."""
