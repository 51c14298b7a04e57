"""Hang-safe building blocks for training code: the step runner today; the safe DataLoader,
distributed init and barriers with deadlines, and guarded tracker init join it.

Runs in every rank. Imports torch, mpi4py and wandb only where they are used."""
