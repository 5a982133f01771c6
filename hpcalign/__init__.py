"""hpcalign: Slurm-native batch pipeline for LLM alignment training.

The same roles (trainers, generators) run as one MPI world on a laptop (`mpiexec`) and
inside one heterogeneous Slurm job (`srun --mpi=pmix A : B`); only the launcher differs.
"""

__version__ = "0.1.0"
