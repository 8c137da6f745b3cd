"""The Slurm job template (job.sbatch) and slurm/local_cluster.sh, shipped as package data."""
