"""torch-fidelity wiring: the evalnet extractor, cached reference statistics, offline Inception."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rcg.io import PipelineError, file_digest
from rcg.metrics import extractors
from rcg.metrics.evalnet import EvalNet, save_evalnet
from rcg.metrics.fidelity import (
    LazyImages,
    UInt8Images,
    cache_name,
    fidelity_metrics,
    to_uint8,
)
from rcg.metrics.frechet import frechet_distance
from tests.fakes import random_inception_weights


def _images(n: int, seed: int, size: int = 28) -> torch.Tensor:
    """Smooth random blobs in [0, 1] (more image-like than white noise), float [n, 1, size, size]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 1, 7, 7, generator=g)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear").clamp(0, 1)


@pytest.fixture(scope="module")
def evalnet_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    net = EvalNet(in_channels=1, image_size=28, num_classes=10, width=8, feature_dim=16)
    # Non-trivial BatchNorm statistics, as after training (fresh running stats are 0 / 1).
    net.train()
    with torch.no_grad():
        for _ in range(5):
            net(_images(64, 99))
    return save_evalnet(net.eval(), tmp_path_factory.mktemp("evalnet"), extra={"classes": list("abcdefghij")})


def test_to_uint8_is_exact_on_8bit_images_and_uint8images_serves_rgb() -> None:
    levels = torch.arange(256, dtype=torch.float32) / 255.0
    assert torch.equal(to_uint8(levels), torch.arange(256, dtype=torch.uint8))
    ds = UInt8Images(to_uint8(_images(3, 0)))
    assert len(ds) == 3 and ds[1].shape == (3, 28, 28) and ds[1].dtype == torch.uint8
    assert torch.equal(ds[1][0], ds[1][2])
    with pytest.raises(ValueError):
        UInt8Images(_images(2, 0))  # float, not uint8


def test_evalnet_fd_matches_frechet_on_its_features_and_reference_is_cached(
    evalnet_weights: Path, tmp_path: Path
) -> None:
    name, weights = extractors.extractor_setup("evalnet", evalnet_weights)
    assert name == "evalnet"
    real, fake = _images(120, 1), (_images(120, 2) * 0.8 + 0.1)
    loads: list[int] = []
    ref = LazyImages(len(real), lambda: (loads.append(1), to_uint8(real))[1])
    kw = dict(extractor=name, weights=weights, cache_root=tmp_path, reference_cache="val-test", kid_subset_size=50)
    m1 = fidelity_metrics(UInt8Images(to_uint8(fake)), ref, **kw)
    assert set(m1) >= {"fd", "is", "kid", "precision", "recall"}
    assert loads == [1] and (tmp_path / "val-test-evalnet.pt").exists()

    # Same number from the project's Frechet distance on the extractor's own features.
    fe = extractors.EvalNetExtractor("evalnet", ["penultimate"], feature_extractor_weights_path=str(weights))
    with torch.no_grad():
        f_fake = fe(torch.stack([UInt8Images(to_uint8(fake))[i] for i in range(120)]))[0]
        f_real = fe(torch.stack([UInt8Images(to_uint8(real))[i] for i in range(120)]))[0]
    assert m1["fd"] == pytest.approx(frechet_distance(f_fake.double(), f_real.double()), rel=1e-3)

    # Second call: reference features come from the cache, the real images are never read again.
    m2 = fidelity_metrics(UInt8Images(to_uint8(fake)), ref, **kw)
    assert loads == [1] and m2["fd"] == pytest.approx(m1["fd"])


def test_fd_orders_by_corruption_and_is_zero_for_identical_sets(evalnet_weights: Path, tmp_path: Path) -> None:
    name, weights = extractors.extractor_setup("evalnet", evalnet_weights)
    real = _images(150, 3)
    ref = UInt8Images(to_uint8(real))
    kw = dict(extractor=name, weights=weights, cache_root=tmp_path, reference_cache="ref", kid_subset_size=50)
    same = fidelity_metrics(UInt8Images(to_uint8(real)), ref, **kw)
    assert same["fd"] == pytest.approx(0.0, abs=1e-6)
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    g = torch.Generator().manual_seed(0)
    fds = []
    for sigma in (0.05, 0.2, 0.5):
        noisy = (real + sigma * torch.randn(real.shape, generator=g)).clamp(0, 1)
        fds.append(fidelity_metrics(UInt8Images(to_uint8(noisy)), ref, **kw)["fd"])
    assert 0 < fds[0] < fds[1] < fds[2]


def test_cache_name_changes_with_what_the_features_depend_on(evalnet_weights: Path, tmp_path: Path) -> None:
    d = file_digest(evalnet_weights)
    assert cache_name("val", 100, "evalnet", d) == cache_name("val", 100, "evalnet", d)
    assert cache_name("val", 100, "evalnet", d) != cache_name("val", 100, "evalnet", "other")
    assert cache_name("val", 100, "evalnet", d) != cache_name("val", 200, "evalnet", d)


def test_evalnet_extractor_needs_a_weights_file(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="rcg evalnet"):
        extractors.extractor_setup("evalnet", tmp_path / "missing.safetensors")


# ---------------------------------------------------------------- Inception (standard FID), offline


def test_inception_fid_offline_on_a_weights_file_of_the_same_format(tmp_path: Path) -> None:
    weights = random_inception_weights(tmp_path / "inception.pth")
    name, path = extractors.extractor_setup("inception", "unused", str(weights))
    assert name == "inception-v3-compat" and path == weights
    real = _images(4, 4)
    fake = (real + 0.3 * torch.randn(real.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    # The 64-d layer keeps the covariance small (the 2048-d one costs minutes of eigvals on 2 cores);
    # the forward pass, IS on the logits, and the weights loading are the real ones.
    layers = {"fid": "64", "kid": "64", "prc": "64"}
    kw = dict(extractor=name, weights=path, cache_root=tmp_path / "cache", reference_cache="ref",
              kid_subset_size=4, batch_size=4, feature_layers=layers)
    ref = UInt8Images(to_uint8(real))
    same = fidelity_metrics(UInt8Images(to_uint8(real)), ref, **kw)
    other = fidelity_metrics(UInt8Images(to_uint8(fake)), ref, **kw)
    assert same["fd"] == pytest.approx(0.0, abs=1e-3)
    assert other["fd"] > 1e-3 and torch.isfinite(torch.tensor(other["is"]))


def test_inception_weights_come_from_config_or_hub_cache_else_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(PipelineError, match="inception_weights") as e:
        extractors.inception_weights_path("")
    assert "weights-inception-2015-12-05-6726825d.pth" in str(e.value)
    with pytest.raises(PipelineError, match="does not exist"):
        extractors.inception_weights_path(str(tmp_path / "nope.pth"))
    cached = tmp_path / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert extractors.inception_weights_path("") == cached
