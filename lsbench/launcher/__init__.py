"""Where a job runs beyond this process: Ray actors and Slurm-style shards."""
