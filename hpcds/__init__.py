"""hpcds: launch and babysit DeepSpeed training on Slurm."""

__version__ = "0.1.0"
