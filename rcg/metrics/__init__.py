"""Metrics on representations and images; each file computes one family through torch-fidelity."""
