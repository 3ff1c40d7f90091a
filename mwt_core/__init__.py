"""MwT engine: modular training, modularization and reuse of CNN classifiers."""

__version__ = "0.1.0"
