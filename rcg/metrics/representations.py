"""What the encoder's representations look like: uniformity and the Frechet noise floor.

Wang & Isola (2020)'s uniformity loss, which the paper reports per encoder (MoCo v3 -3.94, DINO
-3.60, iBOT -3.55; lower tracked better generation), and the Frechet distance between two random
halves of the train representations, computed with torch-fidelity's own formulas: the smallest FD
any representation generator can reach at that sample size. Written to data/features/summary.json.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import torch


def uniformity(reps: torch.Tensor, t: float = 2.0) -> float:
    """Wang & Isola (2020) uniformity loss log E[exp(-t ||x - y||^2)] over distinct pairs of L2-normalised reps."""
    z = torch.nn.functional.normalize(reps.double(), dim=1)
    n = len(z)
    if n < 2:
        return float("nan")
    total = torch.zeros((), dtype=torch.float64)
    step = max(1, min(2048, 2**22 // n))  # blocks of at most 4M pairs (32 MB of float64) whatever n is
    for i in range(0, n, step):
        sq = torch.cdist(z[i : i + step], z).pow(2)  # (chunk, n)
        e = torch.exp(-t * sq)
        rows = torch.arange(i, min(i + step, n))
        e[rows - i, rows] = 0.0  # exclude self-pairs
        total += e.sum()
    return float(torch.log(total / (n * (n - 1))))


def frechet_noise_floor(reps: torch.Tensor, seed: int = 0) -> float:
    """Frechet distance between two random halves of `reps` (torch-fidelity's own formulas)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(reps), generator=g)
    half = len(reps) // 2
    a = fid_features_to_statistics(reps[perm[:half]].double())
    b = fid_features_to_statistics(reps[perm[half : 2 * half]].double())
    return float(fid_statistics_to_metric(a, b, verbose=False)[KEY_METRIC_FID])


def summarize(train: pa.Table, counts: dict[str, dict[str, int]], uniformity_samples: int) -> dict[str, Any]:
    """summary.json: counts, uniformity and the Frechet noise floor of the train `orig` reps."""
    orig = train.filter(pa.compute.equal(train["view"], "orig"))
    col = orig["rep"].combine_chunks()
    reps = torch.from_numpy(col.values.to_numpy(zero_copy_only=False).reshape(len(orig), col.type.list_size).copy())
    g = torch.Generator().manual_seed(0)
    sub = reps[torch.randperm(len(reps), generator=g)[:uniformity_samples]] if len(reps) else reps
    return {
        "count": sum(c["rows"] for c in counts.values()),
        "splits": counts,
        "rep_dim": int(col.type.list_size),
        "uniformity": uniformity(sub) if len(sub) > 1 else None,
        "uniformity_samples": len(sub),
        "fd_noise_floor": frechet_noise_floor(reps) if len(reps) >= 4 else None,
        "rep_mean_norm": float(reps.norm(dim=1).mean()) if len(reps) else None,
    }
