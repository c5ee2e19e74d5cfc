"""Frechet distance between two sets of feature vectors, through torch-fidelity (not a copy of it).

Used for the paper's representation-space check (docs/paper.md#representation-quality: FD of RDM
samples against train reps, and the noise floor of real reps against real reps) and for any other
feature space.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch_fidelity.metric_fid import (
    KEY_METRIC_FID,
    fid_features_to_statistics,
    fid_statistics_to_metric,
)

Stats = dict[str, np.ndarray]


@contextlib.contextmanager
def _single_blas_thread() -> Iterator[None]:
    """Run NumPy's BLAS/LAPACK on one thread: a D x D eigendecomposition (D = 256) is too small to
    gain from threads, and on a busy machine OpenBLAS threads spin
    (docs/measurements.md#frechet-distance-threads)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: without it NumPy keeps its default thread count
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def feature_statistics(features: torch.Tensor | np.ndarray) -> Stats:
    """Mean and covariance ({"mu", "sigma"}) of features [N, D], computed in float64."""
    feats = torch.as_tensor(np.asarray(features) if not torch.is_tensor(features) else features)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, D], got shape {tuple(feats.shape)}")
    with _single_blas_thread():
        return fid_features_to_statistics(feats.detach().cpu().double())


def frechet_distance_from_stats(stats_1: Stats, stats_2: Stats) -> float:
    """||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)) (Heusel et al. 2017)."""
    with _single_blas_thread():
        return float(fid_statistics_to_metric(stats_1, stats_2, verbose=False)[KEY_METRIC_FID])


def frechet_distance(
    features_1: torch.Tensor | np.ndarray | Stats, features_2: torch.Tensor | np.ndarray | Stats
) -> float:
    """Frechet distance between two feature sets (either may be precomputed statistics)."""
    s1 = features_1 if isinstance(features_1, dict) else feature_statistics(features_1)
    s2 = features_2 if isinstance(features_2, dict) else feature_statistics(features_2)
    return frechet_distance_from_stats(s1, s2)
