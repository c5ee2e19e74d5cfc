"""k-nearest-neighbour accuracy of representations: the check that they carry the semantics.

The standard SSL protocol (Wu et al. 2018, used by DINO): cosine similarity on L2-normalised
features, the k most similar training samples vote for their class with weight exp(sim / T).
Labels are used only here, never for training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_top1(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    query: torch.Tensor,
    query_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> float:
    """Top-1 accuracy of weighted cosine kNN of `query` against `train` (features [N, D])."""
    if len(train) == 0 or len(query) == 0:
        raise ValueError("kNN needs at least one training and one query sample")
    train = F.normalize(train.float().flatten(1), dim=1)
    query = F.normalize(query.float().flatten(1), dim=1)
    n_classes = int(max(train_labels.max(), query_labels.max())) + 1
    k = min(k, len(train))
    correct = 0
    for i in range(0, len(query), chunk):
        sim = query[i : i + chunk] @ train.t()  # (q, N)
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(top_sim), n_classes)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
        correct += int((votes.argmax(1) == query_labels[i : i + chunk]).sum())
    return correct / len(query)


__all__ = ["knn_top1"]
