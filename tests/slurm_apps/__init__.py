"""Tiny programs that tests/test_slurm_cluster.py runs as SLURM jobs."""
