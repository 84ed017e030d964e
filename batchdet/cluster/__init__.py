"""Running on a Ray cluster: ``batchdet submit`` on this machine, the job's entrypoint on the cluster."""
