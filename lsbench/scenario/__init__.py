"""What is measured: jobs, datasets, accounting and quality, the per-example runner and the scan."""
