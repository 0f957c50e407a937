"""Fit results, the files they are saved in, and checkpoints of running fits."""
