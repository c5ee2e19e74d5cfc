"""k-means cluster labels (rcg.clusters), the hypersphere prior and the contrastive posterior (rcg.priors)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rcg.clusters import default_k, fit_clusters, kmeans, label_summary, lloyd, read_cluster_meta, save_clusters
from rcg.encoders.vit import standardize
from rcg.features import to_table, write_features
from rcg.io import PipelineError
from rcg.metrics.rdm import score_prior
from rcg.priors import contrastive_posterior, hypersphere, information_bound, posterior_log_probs

pytestmark = pytest.mark.usefixtures("one_thread")


def _blobs(k: int = 4, per: int = 50, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`k` well separated Gaussian blobs (centres 20 apart, unit spread), shuffled; (points, blob)."""
    g = torch.Generator().manual_seed(seed)
    centres = 20 * torch.eye(k, dim)
    labels = torch.arange(k).repeat_interleave(per)
    x = centres[labels] + torch.randn(k * per, dim, generator=g)
    perm = torch.randperm(len(x), generator=g)
    return x[perm], labels[perm]


def test_kmeans_finds_separable_blobs_and_is_deterministic() -> None:
    x, blob = _blobs()
    centroids, assign, inertia = kmeans(x, 4, iters=20, seed=3)
    # Every blob is one cluster and every cluster one blob (a permutation of the ids).
    pairs = set(zip(blob.tolist(), assign.tolist()))
    assert len(pairs) == 4 and len({b for b, _ in pairs}) == 4 and len({a for _, a in pairs}) == 4
    for b, a in pairs:
        assert torch.allclose(centroids[a], x[blob == b].mean(0), atol=1e-5)
    assert inertia == pytest.approx(float(((x - centroids[assign]) ** 2).sum(1).mean()), rel=1e-5)
    again = kmeans(x, 4, iters=20, seed=3)
    assert torch.equal(again[0], centroids) and torch.equal(again[1], assign)
    # k-means++ seeding alone (no Lloyd iteration) already puts one centre in each blob here.
    _, assign0, _ = kmeans(x, 4, iters=0, seed=5)
    assert len(set(zip(blob.tolist(), assign0.tolist()))) == 4
    with pytest.raises(PipelineError, match="clusters"):
        kmeans(x, len(x) + 1, iters=1, seed=0)


def test_every_cluster_stays_in_use_and_k_is_chosen_from_the_data() -> None:
    # A centre no point is nearest to takes the point farthest from its centroid.
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0], [11.0]])
    centres, assign, _ = lloyd(x, torch.tensor([[1.5], [10.5], [1000.0]], dtype=torch.float64), iters=10)
    assert torch.bincount(assign, minlength=3).min() >= 1 and float(centres.max()) < 12
    assert default_k(10, 60000) == 10 and default_k(0, 60000) == 24 and default_k(0, 1_281_167) == 113
    assert default_k(0, 50) == 2 and default_k(1, 10000) == 10
    summary = label_summary(torch.tensor([0, 0, 0, 1, 1]), torch.tensor([2, 2, 1, 0, 0]), 3)
    assert summary["majority_class"] == [2, 0, None] and summary["purity"] == pytest.approx(0.8)


def test_fit_clusters_on_a_features_file_saves_what_evaluate_reads(tmp_path: Path) -> None:
    x, blob = _blobs(k=3, per=20, dim=256)
    keys = [f"k{i:03d}" for i in range(len(x))]
    reps = standardize(x).numpy()
    # Both views, as the encode stage writes them; the flip rows must not count.
    table = to_table(keys + keys, blob.tolist() * 2, ["orig"] * len(x) + ["flip"] * len(x),
                     np.concatenate([reps, -reps]).astype(np.float32))
    write_features(tmp_path / "train.parquet", [table])
    clusters = fit_clusters(tmp_path / "train.parquet", 0, iters=10, seed=0)
    assert clusters.k == 3 and clusters.meta["k_rule"] == "the number of classes"
    assert clusters.meta["purity"] == 1.0 and sorted(clusters.meta["counts"]) == [20, 20, 20]
    ids = clusters.ids([keys[0], keys[5]])
    assert ids.tolist() == [clusters.assignment[0], clusters.assignment[5]]
    assert clusters.meta["majority_class"][int(ids[0])] == int(blob[0])
    with pytest.raises(PipelineError, match="nope"):
        clusters.ids(["nope"])
    save_clusters(clusters, tmp_path / "cluster")
    meta = read_cluster_meta(tmp_path / "cluster")
    assert meta["counts"] == clusters.meta["counts"] and (tmp_path / "cluster" / "clusters.safetensors").exists()
    with pytest.raises(PipelineError, match="clusters.json"):
        read_cluster_meta(tmp_path)


def test_hypersphere_samples_are_standardised_and_uniform() -> None:
    x = hypersphere(2000, 64, seed=1)
    assert x.shape == (2000, 64) and x.dtype == torch.float32
    assert torch.allclose(x.mean(1), torch.zeros(2000), atol=1e-6)
    assert torch.allclose(x.std(1), torch.ones(2000), atol=1e-6)  # unbiased std, as rcg.encoders.vit.standardize
    assert torch.allclose(x.norm(dim=1), torch.full((2000,), math.sqrt(63)), atol=1e-4)
    assert torch.allclose(standardize(x), x, atol=1e-5)  # already on the set the encoder maps to
    # Uniform on the sphere: no preferred direction, isotropic second moment (d-1)/(d-1) per axis
    # inside the subspace: E[x x^T] = I - 11^T / d.
    cov = x.T @ x / len(x)
    assert (cov - (torch.eye(64) - 1 / 64)).abs().max() < 0.15 and x.mean(0).abs().max() < 0.1
    assert torch.equal(hypersphere(5, 64, seed=1), hypersphere(5, 64, seed=1))
    assert not torch.equal(hypersphere(5, 64, seed=1), hypersphere(5, 64, seed=2))


def test_contrastive_posterior_between_nearest_and_uniform() -> None:
    reps, bank = hypersphere(64, 32, seed=0), hypersphere(16, 32, seed=1)
    cos = torch.nn.functional.normalize(reps, dim=1) @ torch.nn.functional.normalize(bank, dim=1).T
    # Temperature -> 0: every image gets its nearest bank entry; the bound is log(bank).
    drawn, bound = contrastive_posterior(reps, bank, 1e-6, torch.Generator().manual_seed(0))
    assert torch.equal(drawn, bank[cos.argmax(1)])
    assert torch.allclose(bound, torch.full((64,), math.log(16)), atol=1e-4)
    # Temperature -> infinity: uniform over the bank, bound 0, every entry drawn about equally often.
    lp = posterior_log_probs(reps, bank, 1e6)
    assert torch.allclose(lp.exp(), torch.full((64, 16), 1 / 16), atol=1e-5)
    many = reps.repeat(200, 1)
    drawn, bound = contrastive_posterior(many, bank, 1e6, torch.Generator().manual_seed(0))
    assert bound.abs().max() < 1e-4
    hits = torch.bincount((drawn @ bank.T).argmax(1), minlength=16).float()
    assert hits.min() > 0.6 * len(many) / 16 and hits.max() < 1.4 * len(many) / 16
    # The bound is log(M) - H of the softmax, computed by hand.
    p = torch.softmax(cos / 0.1, dim=1)
    want = math.log(16) + (p * p.log()).sum(1)
    assert torch.allclose(information_bound(posterior_log_probs(reps, bank, 0.1)), want, atol=1e-5)
    assert torch.allclose(information_bound(torch.log(torch.tensor([[0.5, 0.5, 0.0, 0.0]]).clamp_min(1e-30))),
                          torch.tensor([math.log(4) - math.log(2)]), atol=1e-6)


def test_hypersphere_prior_is_scored_beside_the_floor() -> None:
    """score_prior: the same draws and floors as the RDM's scores; real reps score near their floor,
    hypersphere samples of anisotropic reps far above it."""
    g = torch.Generator().manual_seed(0)
    train = standardize(torch.randn(600, 16, generator=g) * torch.linspace(0.2, 3, 16))
    val = standardize(torch.randn(300, 16, generator=g) * torch.linspace(0.2, 3, 16))
    labels = torch.zeros(600, dtype=torch.long)
    out = score_prior(lambda n, s: hypersphere(n, 16, seed=s), (train, labels), (val, labels[:300]),
                      n_eval=300, repeats=2, seed=0)
    assert out["n_eval"] == 300 and out["eval_repeats"] == 2 and "fd_train_std" in out
    assert out["fd_train"] > 3 * out["fd_floor_train"] and out["fd_val"] > out["fd_floor_val"]
    real = score_prior(lambda n, s: train[torch.randperm(600, generator=torch.Generator().manual_seed(s))[:n]],
                       (train, labels), None, n_eval=300, repeats=2, seed=0)
    assert real["fd_train"] < 2 * real["fd_floor_train"] and "fd_val" not in real
