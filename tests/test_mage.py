"""MAGE (rcg.generators.mage): shapes, sizes, masking, the loss, position-0 conditioning, decoding."""

from __future__ import annotations

import math

import pytest
import torch

from rcg.generators.mage import MAGE, MAGE_ARCHS, build_mage, token_masks
from rcg.io import PipelineError

# Small tensors: one thread is fastest, and far faster than two on a busy 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")

T, K = MAGE_ARCHS["mage_tiny"]["num_tokens"], MAGE_ARCHS["mage_tiny"]["codebook_size"]


def _tiny(condition: str = "rep", **kw) -> MAGE:
    torch.manual_seed(0)
    return build_mage("mage_tiny", condition=condition, num_classes=10, **kw)


def _cond(condition: str, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if condition == "rep":
        return {"rep": torch.randn(n, 256, generator=g)}
    if condition == "label":
        return {"label": torch.randint(0, 10, (n,), generator=g)}
    return {}


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, K, (n, T), generator=torch.Generator().manual_seed(seed))


def _spy(model: MAGE, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Record every forward's arguments and output (the logits keep their gradient)."""
    calls: list[dict] = []
    original = model.forward

    def forward(ids, rep=None, label=None, drop=None, keep=None):
        out = original(ids, rep, label, drop=drop, keep=keep)
        if out.requires_grad:
            out.retain_grad()
        calls.append(dict(ids=ids, rep=rep, label=label, drop=drop, keep=keep, out=out))
        return out

    monkeypatch.setattr(model, "forward", forward)
    return calls


# --------------------------------------------------------------------------------------------------
# Shapes and sizes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("condition", ["rep", "none", "label"])
def test_shapes_of_every_step(condition: str) -> None:
    model = _tiny(condition).eval()
    ids, cond = _ids(3), _cond(condition, 3)
    assert model(ids, **cond).shape == (3, T, K)
    keep = torch.zeros(3, T, dtype=torch.bool)
    keep[:, ::2] = True
    assert model(ids, **cond, keep=keep).shape == (3, T, K)
    slot = model.condition_embedding(cond.get("rep"), cond.get("label"), None)
    assert (slot is None) == (condition == "none") and (slot is None or slot.shape == (3, 32))
    loss = model.train().loss(ids, **cond, generator=torch.Generator().manual_seed(0))
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    model.eval()
    sampled, nxt = model.decode_step(torch.full((3, T), model.mask_id), 0, 4, **cond)
    assert sampled.shape == nxt.shape == (3, T)
    out = model.generate(3, **cond, num_iter=4, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, T) and out.dtype == torch.long


def _block(d: int) -> int:
    """Pre-LN ViT block with mlp ratio 4: two LayerNorms, qkv and proj, the two MLP Linears."""
    return 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)


def _expected_params(arch: dict[str, int], rep_dim: int = 256, condition: str = "rep", classes: int = 1000) -> int:
    t, k, d, dd = arch["num_tokens"], arch["codebook_size"], arch["embed_dim"], arch["decoder_embed_dim"]
    embed = (k + 2) * d + (t + 1) * d + 2 * d  # words (codes, fake class, mask), positions, LayerNorm
    cond = {"rep": rep_dim * d + d + rep_dim, "label": (classes + 1) * d, "none": 0}[condition]
    encoder = arch["depth"] * _block(d) + 2 * d
    decoder = (d * dd + dd) + (t + 1) * dd + arch["decoder_depth"] * _block(dd) + 2 * dd
    mlm = (dd * d + d) + 2 * d + k
    return embed + cond + encoder + decoder + mlm


@pytest.mark.parametrize("name", ["MAGE-B", "MAGE-L"])
def test_paper_sizes_on_meta_device(name: str) -> None:
    with torch.device("meta"):
        model = build_mage(name)
    n = sum(p.numel() for p in model.parameters())
    assert n == _expected_params(MAGE_ARCHS[name])
    assert n == {"MAGE-B": 144_326_144, "MAGE-L": 407_027_968}[name]
    assert model.blocks[0].attn.heads == {"MAGE-B": 12, "MAGE-L": 16}[name]
    assert model.decoder_blocks[0].attn.heads == 16 and len(model.decoder_blocks) == 8


@pytest.mark.parametrize("condition", ["rep", "none", "label"])
def test_small_sizes(condition: str) -> None:
    for name, low, high in (("mage_tiny", 5_000, 100_000), ("mage_fmnist", 1_000_000, 3_000_000)):
        model = build_mage(name, condition=condition, num_classes=10)
        n = sum(p.numel() for p in model.parameters())
        assert n == _expected_params(MAGE_ARCHS[name], condition=condition, classes=10)
        assert low <= n <= high, (name, n)


def test_unknown_size_and_condition_are_clear_errors() -> None:
    with pytest.raises(PipelineError, match="unknown MAGE size 'mage_huge'"):
        build_mage("mage_huge")
    with pytest.raises(ValueError, match="condition"):
        build_mage("mage_tiny", condition="text")
    with pytest.raises(ValueError, match="pass rep="):
        _tiny("rep")(_ids(2))
    with pytest.raises(ValueError, match="pass label="):
        _tiny("label")(_ids(2))
    ragged = torch.ones(2, T, dtype=torch.bool)
    ragged[0, 0] = False
    with pytest.raises(ValueError, match="same number of tokens"):
        _tiny()(_ids(2), **_cond("rep", 2), keep=ragged)


def test_initialization() -> None:
    torch.manual_seed(0)
    model = build_mage("mage_fmnist")
    for p in (model.token_emb.word.weight, model.token_emb.pos, model.decoder_pos, model.fake_latent):
        assert abs(p.std().item() - 0.02) < 0.004
    lin = model.blocks[0].mlp[0]
    bound = math.sqrt(6 / (lin.in_features + lin.out_features))  # xavier-uniform
    assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.9 * bound
    assert all(torch.count_nonzero(m.bias) == 0 for m in model.modules() if isinstance(m, torch.nn.Linear))
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    assert torch.count_nonzero(model.mlm.bias) == 0


# --------------------------------------------------------------------------------------------------
# Masking and the loss
# --------------------------------------------------------------------------------------------------


def _truncnorm_moments(lo: float, hi: float, mu: float, sd: float) -> tuple[float, float]:
    """Mean and standard deviation of normal(mu, sd) truncated to [lo, hi]."""
    phi = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    cdf = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    a, b = (lo - mu) / sd, (hi - mu) / sd
    z = cdf(b) - cdf(a)
    mean = mu + sd * (phi(a) - phi(b)) / z
    var = sd * sd * (1 + (a * phi(a) - b * phi(b)) / z - ((phi(a) - phi(b)) / z) ** 2)
    return mean, math.sqrt(var)


@pytest.mark.parametrize("mu", [0.75, 0.55])
def test_mask_ratio_is_truncated_normal(mu: float) -> None:
    model = build_mage("mage_tiny", mask_ratio_mu=mu)
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([model.sample_mask_ratio(g) for _ in range(4000)])
    assert draws.min() >= 0.5 and draws.max() <= 1.0
    mean, sd = _truncnorm_moments(0.5, 1.0, mu, 0.25)
    assert abs(draws.mean().item() - mean) < 0.01  # 5 standard errors
    assert abs(draws.std().item() - sd) < 0.01
    # Drawn from the generator, or from torch's global RNG (which the training loop restores).
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert model.sample_mask_ratio(g1) == model.sample_mask_ratio(g2)
    torch.manual_seed(3)
    r = model.sample_mask_ratio()
    torch.manual_seed(3)
    assert model.sample_mask_ratio() == r


def test_token_masks_drop_is_a_subset_of_mask() -> None:
    drop, mask = token_masks(64, 256, 128, 200, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert drop.shape == mask.shape == (64, 256)
    assert torch.all(drop.sum(1) == 128) and torch.all(mask.sum(1) == 200)
    assert not torch.any(drop & ~mask)
    assert len({tuple(row.tolist()) for row in mask}) == 64  # every row has its own mask


def test_loss_masks_one_ratio_per_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _tiny().eval()
    calls = _spy(model, monkeypatch)
    ids, cond = _ids(8), _cond("rep", 8)
    model.loss(ids, **cond, generator=torch.Generator().manual_seed(1))
    ratio = model.sample_mask_ratio(torch.Generator().manual_seed(1))
    (call,) = calls
    masked = call["ids"] == model.mask_id
    assert torch.all(masked.sum(1) == math.ceil(T * ratio))  # one ratio for the whole batch
    assert torch.all(call["keep"].sum(1) == T - math.ceil(T * 0.5))
    assert not torch.any(~call["keep"] & ~masked)  # every dropped token is masked
    assert torch.equal(call["ids"][~masked], ids[~masked])  # the others are the data


def test_loss_counts_only_masked_positions(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _tiny().eval()
    calls = _spy(model, monkeypatch)
    ids = _ids(6)
    # A seed whose mask ratio leaves some tokens unmasked (above 15/16 all 16 are masked).
    seed = next(s for s in range(100) if model.sample_mask_ratio(torch.Generator().manual_seed(s)) < 0.8)
    loss = model.loss(ids, **_cond("rep", 6), generator=torch.Generator().manual_seed(seed))
    loss.backward()
    (call,) = calls
    masked, logits = call["ids"] == model.mask_id, call["out"]
    assert 0 < masked.sum() < masked.numel()
    grad = logits.grad.abs().sum(-1)  # (N, T)
    assert torch.all(grad[~masked] == 0) and torch.all(grad[masked] > 0)
    # Label-smoothed cross-entropy (0.1), averaged over the masked tokens.
    logp = logits.detach()[masked].log_softmax(-1)
    target = ids[masked]
    manual = (0.9 * -logp.gather(1, target[:, None])[:, 0] + 0.1 * -logp.mean(-1)).mean()
    torch.testing.assert_close(loss.detach(), manual)


def test_loss_is_reproducible_from_a_generator() -> None:
    model = _tiny(dropout=0.0)
    ids, cond = _ids(4), _cond("rep", 4)
    a = model.loss(ids, **cond, generator=torch.Generator().manual_seed(9))
    b = model.loss(ids, **cond, generator=torch.Generator().manual_seed(9))
    c = model.loss(ids, **cond, generator=torch.Generator().manual_seed(10))
    assert a.item() == b.item() and a.item() != c.item()


# --------------------------------------------------------------------------------------------------
# Position-0 conditioning
# --------------------------------------------------------------------------------------------------


def test_rep_overwrites_the_whole_position_0_embedding() -> None:
    model = _tiny().eval()
    seen: list[torch.Tensor] = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    ids, rep = _ids(2), _cond("rep", 2)["rep"]
    model(ids, rep=rep)
    # Exactly the projection: no position embedding, LayerNorm or dropout on top.
    torch.testing.assert_close(seen[0][:, 0], model.latent_prior_proj(rep))
    torch.testing.assert_close(seen[0][:, 1:], model.token_emb(torch.cat([ids[:, :1], ids], 1))[:, 1:])


def test_encoder_sees_kept_tokens_and_decoder_fills_masked_ones_with_position_0() -> None:
    model = _tiny().eval()
    enc_in: list[torch.Tensor] = []
    dec_in: list[torch.Tensor] = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: enc_in.append(args[0]))
    model.decoder_blocks[0].register_forward_pre_hook(lambda m, args: dec_in.append(args[0]))
    drop, mask = token_masks(3, T, 8, 11, torch.Generator().manual_seed(0), torch.device("cpu"))
    ids = _ids(3).masked_fill(mask, model.mask_id)
    model(ids, **_cond("rep", 3), keep=~drop)
    assert enc_in[0].shape == (3, 1 + T - 8, 32)  # position 0 and the kept tokens
    x = dec_in[0] - model.decoder_pos  # (N, T+1, Dd) before the decoder positions
    full_mask = torch.cat([torch.zeros(3, 1, dtype=torch.bool), mask], 1)
    fill = x[:, :1].expand_as(x)
    torch.testing.assert_close(x[full_mask], fill[full_mask])  # masked and dropped: the position-0 fill
    own = ~full_mask
    own[:, 0] = False
    assert not torch.isclose(x[own], fill[own]).all(-1).any()  # the kept unmasked: their own output


def test_head_scores_against_detached_word_embeddings() -> None:
    model = _tiny().eval()
    ids = torch.randint(0, K // 2, (4, T), generator=torch.Generator().manual_seed(0))
    seed = next(s for s in range(100) if model.sample_mask_ratio(torch.Generator().manual_seed(s)) < 0.8)
    model.loss(ids, **_cond("rep", 4), generator=torch.Generator().manual_seed(seed)).backward()
    grad = model.token_emb.word.weight.grad.abs().sum(-1)  # (K+2,)
    assert torch.all(grad[K // 2 : K] == 0)  # codes never in the input get no gradient through the head
    assert grad[: K // 2].sum() > 0 and grad[model.mask_id] > 0


def test_rep_changes_the_output_and_drop_uses_fake_latent() -> None:
    model = _tiny().eval()
    ids = _ids(3)
    r1, r2 = _cond("rep", 3, 1)["rep"], _cond("rep", 3, 2)["rep"]
    assert not torch.allclose(model(ids, rep=r1), model(ids, rep=r2))
    drop = torch.ones(3, dtype=torch.bool)
    fake = model.fake_latent.expand(3, -1)
    torch.testing.assert_close(model(ids, rep=r1, drop=drop), model(ids, rep=r2, drop=drop))
    torch.testing.assert_close(model(ids, rep=r1, drop=drop), model(ids, rep=fake))
    part = torch.tensor([True, False, True])
    out = model(ids, rep=r1, drop=part)
    torch.testing.assert_close(out[1], model(ids, rep=r1)[1])
    torch.testing.assert_close(out[0], model(ids, rep=fake)[0])


@pytest.mark.parametrize("condition", ["rep", "label"])
def test_training_drops_the_condition_at_rep_drop_prob(condition: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ids, g = _ids(4), torch.Generator
    a, b = _cond(condition, 4, 1), _cond(condition, 4, 2)
    always = _tiny(condition, rep_drop_prob=1.0, dropout=0.0).train()
    assert always.loss(ids, **a, generator=g().manual_seed(0)) == always.loss(ids, **b, generator=g().manual_seed(0))
    never = _tiny(condition, rep_drop_prob=0.0, dropout=0.0).train()
    assert never.loss(ids, **a, generator=g().manual_seed(0)) != never.loss(ids, **b, generator=g().manual_seed(0))
    half = _tiny(condition, rep_drop_prob=0.5).train()
    calls = _spy(half, monkeypatch)
    half.loss(_ids(2000), **_cond(condition, 2000), generator=g().manual_seed(0))
    assert abs(calls[0]["drop"].float().mean().item() - 0.5) < 0.05
    half.eval().loss(ids, **a, generator=g().manual_seed(0))
    assert calls[1]["drop"] is None  # no random drop outside training


def test_label_null_class_and_none_condition() -> None:
    model = _tiny("label").eval()
    ids, labels = _ids(2), torch.tensor([1, 2])
    assert not torch.allclose(model(ids, label=labels), model(ids, label=torch.tensor([3, 4])))
    null = torch.full((2,), 10)
    torch.testing.assert_close(model(ids, label=labels, drop=torch.ones(2, dtype=torch.bool)), model(ids, label=null))
    none = _tiny("none").eval()
    torch.testing.assert_close(none(ids), none(ids, drop=torch.ones(2, dtype=torch.bool)))
    assert not hasattr(none, "fake_latent") and not hasattr(none, "class_emb")


# --------------------------------------------------------------------------------------------------
# Iterative decoding
# --------------------------------------------------------------------------------------------------


def test_decoding_keeps_known_tokens_and_follows_the_cosine_schedule() -> None:
    model = _tiny().eval()
    cond, g, num_iter = _cond("rep", 5), torch.Generator().manual_seed(0), 6
    ids = torch.full((5, T), model.mask_id)
    with torch.no_grad():
        for step in range(num_iter):
            known = ids != model.mask_id
            sampled, nxt = model.decode_step(ids, step, num_iter, **cond, choice_temperature=4.0, generator=g)
            assert torch.equal(sampled[known], ids[known]) and torch.equal(nxt[known], ids[known])
            assert torch.all(sampled < K)  # every token filled, from the codebook
            unknown = int((~known[0]).sum())
            want = max(1, min(unknown - 1, math.floor(T * math.cos(math.pi / 2 * (step + 1) / num_iter))))
            assert torch.all((nxt == model.mask_id).sum(1) == want)
            assert torch.equal(nxt[nxt != model.mask_id], sampled[nxt != model.mask_id])
            ids = nxt


@pytest.mark.parametrize(("step", "temperature"), [(1, 0.0), (3, 100.0)])
def test_remasking_picks_the_least_confident_when_the_noise_is_off(step: int, temperature: float) -> None:
    """No Gumbel noise with temperature 0, nor at the last step: its weight anneals as (1 - r)."""
    model = _tiny().eval()
    ids, rep = torch.full((4, T), model.mask_id), _cond("rep", 4)["rep"]
    with torch.no_grad():
        logits = model.guided_logits(ids, rep, None, 0.0)
        sampled, nxt = model.decode_step(ids, step, 4, rep=rep, choice_temperature=temperature,
                                         generator=torch.Generator().manual_seed(0))
    logp = logits.log_softmax(-1).gather(-1, sampled[..., None])[..., 0]
    remasked = nxt == model.mask_id
    assert torch.all(logp[remasked].view(4, -1).max(1).values <= logp[~remasked].view(4, -1).min(1).values)


def test_remasking_is_noisy_at_a_high_temperature() -> None:
    model = _tiny().eval()
    ids, rep = torch.full((4, T), model.mask_id), _cond("rep", 4)["rep"]
    with torch.no_grad():
        picks = [model.decode_step(ids, 1, 4, rep=rep, choice_temperature=100.0,
                                   generator=torch.Generator().manual_seed(s))[1] == model.mask_id for s in range(2)]
    assert not torch.equal(picks[0], picks[1])


@pytest.mark.parametrize("condition", ["rep", "none", "label"])
def test_generate_is_deterministic_and_complete(condition: str) -> None:
    model = _tiny(condition).eval()
    cond = _cond(condition, 4)

    def gen(seed: int, cfg: float = 0.0) -> torch.Tensor:
        return model.generate(4, **cond, num_iter=5, cfg=cfg, generator=torch.Generator().manual_seed(seed))

    out = gen(0)
    assert torch.all((out >= 0) & (out < K)) and not torch.any(out == model.mask_id)
    assert torch.equal(out, gen(0)) and not torch.equal(out, gen(1))
    if condition == "none":
        assert torch.equal(gen(0, cfg=3.0), out)  # nothing to guide against
    else:
        assert not torch.equal(gen(0, cfg=3.0), out)


def test_guidance_weight_grows_linearly_over_the_iterations(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _tiny().eval()
    weights: list[float] = []
    original = model.guided_logits

    def guided_logits(ids, rep, label, w):
        weights.append(w)
        return original(ids, rep, label, w)

    monkeypatch.setattr(model, "guided_logits", guided_logits)
    model.generate(2, **_cond("rep", 2), num_iter=4, cfg=2.0)
    assert weights == [0.5, 1.0, 1.5, 2.0]


def test_guidance_mixes_cond_and_null_logits() -> None:
    model = _tiny().eval()
    ids, rep = torch.full((2, T), model.mask_id), _cond("rep", 2)["rep"]
    with torch.no_grad():
        cond = model(ids, rep=rep)
        uncond = model(ids, rep=rep, drop=torch.ones(2, dtype=torch.bool))
        torch.testing.assert_close(model.guided_logits(ids, rep, None, 1.5), cond + 1.5 * (cond - uncond))


# --------------------------------------------------------------------------------------------------
# It can learn, and it runs in bf16
# --------------------------------------------------------------------------------------------------


def test_a_few_adamw_steps_lower_the_loss() -> None:
    torch.manual_seed(0)
    model = build_mage("mage_tiny").train()
    data = _ids(8, seed=3).repeat(4, 1)  # 8 token grids, each with its own representation
    reps = _cond("rep", 8, 4)["rep"].repeat(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05)

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            out = sum(model.loss(data, rep=reps, generator=torch.Generator().manual_seed(s)).item() for s in range(4))
        model.train()
        return out / 4

    before = eval_loss()
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        loss = model.loss(data, rep=reps, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert before > 0.9 * math.log(K) and after < 0.5 * before, (before, after)


def test_bf16_autocast_runs() -> None:
    model = _tiny()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(_ids(2), **_cond("rep", 2), generator=torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.eval().generate(2, **_cond("rep", 2), num_iter=3, cfg=1.0)
    assert out.shape == (2, T) and not torch.any(out == model.mask_id)

