"""Where a run executes: the Executor protocol, the local and Slurm executors, logs, sweeps."""
