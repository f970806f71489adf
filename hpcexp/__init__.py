"""hpcexp: run Dockerfile-based experiments rootless with Apptainer, locally or through Slurm.

The package is a library first: every command of the ``hpcexp`` CLI is a thin wrapper
around a function here, which tests and scripts may call directly. Heavy dependencies
(spython) are imported lazily by the modules that need them.
"""

__version__ = "0.1.0"
