"""Training on a Slurm cluster: one submitit job per architecture, the host-side requeue,
and following the jobs through the launch manifest."""
