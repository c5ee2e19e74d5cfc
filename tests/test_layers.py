"""The building blocks the networks share (rcg.layers): embeddings, zero init, the size registries."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rcg.io import PipelineError
from rcg.layers import lookup_arch, sincos_pos_embed_2d, timestep_embedding, zero_module


def test_timestep_embedding_is_cos_then_sin() -> None:
    e = timestep_embedding(torch.tensor([0, 3]), 8)
    assert e.shape == (2, 8) and e.dtype == torch.float32
    assert torch.equal(e[0], torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0]))
    freqs = torch.exp(-math.log(10000.0) * torch.arange(4) / 4)  # 1, 0.1, 0.01, 0.001
    torch.testing.assert_close(e[1], torch.cat([torch.cos(3 * freqs), torch.sin(3 * freqs)]))


def test_timestep_embedding_odd_width_and_fractional_steps() -> None:
    e = timestep_embedding(torch.tensor([0.5, 2.0]), 7)
    assert e.shape == (2, 7) and torch.equal(e[:, -1], torch.zeros(2))  # odd width: a zero channel
    torch.testing.assert_close(e[:, :6], timestep_embedding(torch.tensor([0.5, 2.0]), 6))
    assert e[0, 0].item() == pytest.approx(math.cos(0.5))  # fractional t is not rounded
    # A low-frequency channel changes little between neighbouring steps, the first one a lot.
    a, b = timestep_embedding(torch.tensor([100, 101]), 64)
    assert abs(a[31] - b[31]) < 1e-3 < abs(a[0] - b[0])


def test_sincos_pos_embed_layout() -> None:
    pe = sincos_pos_embed_2d(4, 16)
    assert pe.shape == (16, 16) and pe.dtype == torch.float32
    # Row-major patches; channels: sin(w), cos(w), sin(h), cos(h), 4 frequencies each (omega_0 = 1).
    assert torch.equal(pe[0], torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 4 + [1.0] * 4))
    assert pe[1, 0].item() == pytest.approx(math.sin(1.0))  # patch (row 0, col 1): w = 1
    assert pe[1, 8].item() == 0.0 and pe[1, 12].item() == 1.0  # h = 0
    assert pe[4, 0].item() == 0.0 and pe[4, 8].item() == pytest.approx(math.sin(1.0))  # (row 1, col 0)
    assert pe[1, 1].item() == pytest.approx(math.sin(10000 ** -0.25))
    # Every position is distinct.
    assert torch.cdist(pe, pe).add(torch.eye(16)).min() > 0.1


def test_sincos_pos_embed_precision_is_the_callers() -> None:
    """float64 (DiT) and float32 (MoCo v3) sinusoids agree to rounding, not bit for bit."""
    hi, lo = sincos_pos_embed_2d(14, 768), sincos_pos_embed_2d(14, 768, dtype=torch.float32)
    assert hi.dtype == lo.dtype == torch.float32
    torch.testing.assert_close(hi, lo, atol=1e-5, rtol=0)
    assert not torch.equal(hi, lo)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(4, 18)


def test_zero_module_zeroes_every_parameter_without_random_draws() -> None:
    conv = nn.Conv2d(3, 4, 3)
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    assert zero_module(conv) is conv
    assert all(torch.count_nonzero(p) == 0 for p in conv.parameters())
    assert torch.equal(torch.random.get_rng_state(), state)  # other layers' inits are untouched


def test_lookup_arch_names_the_unknown_size_and_the_known_ones() -> None:
    table = {"small": {"width": 8}, "big": {"width": 64}}
    assert lookup_arch(table, "big", "toy size") == {"width": 64}
    with pytest.raises(PipelineError, match=r"^unknown toy size 'huge' \(known: small, big\)$"):
        lookup_arch(table, "huge", "toy size")
    with pytest.raises(PipelineError, match=r"^toy.arch: unknown toy size 'huge' "):
        lookup_arch(table, "huge", "toy size", key="toy.arch")
