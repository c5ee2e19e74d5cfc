"""rcg: Representation-Conditioned Generation (Li, Katabi & He, NeurIPS 2024) as a pipeline."""

__version__ = "0.1.0"
