"""The program's version, in a module of its own so that reading it loads nothing else."""

VERSION = "0.1.0"
