"""The VQGAN tokenizer MAGE generates in (rcg.tokenizers, `rcg tokenizer`).

The official checkpoint's layout is written out independently of rcg.tokenizers (key names and
shapes from the MaskGIT VQGAN's description, in tests/fakes.py, which the ImageNet path test
shares), and so is, here, a functional forward pass over such a state dict (convolutions, group
norms, nearest-code lookup). A checkpoint of that layout with random weights, saved with
torch.save as the official file is, must load strictly and tokenize and decode exactly as the
independent forward does: a wrong block order, a shortcut taken from the wrong tensor or a
missing bias would show. Then: loading errors name every bad key and the file, a
crafted pickle is refused unrun, training lowers the reconstruction error with the codebook in use,
an interrupted training resumes bit-identical, and the stage writes its files and metrics.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from rcg import config
from rcg.io import PipelineError
from rcg.tokenizers import build_vqgan, load_tokenizer
from rcg.tokenizers.official import load_official
from tests.fakes import MASKGIT_VQGAN as MASKGIT
from tests.fakes import random_vqgan_state as random_state
from tests.fakes import vqgan_layout as official_layout
from tests.interrupt import Interrupted, interrupt_after

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(in_ch=1, ch=16, mult=(1, 1, 2), blocks=1, z=16, codes=32)  # vq_tiny's layout


# --------------------------------------------------------------------------------------------------
# The official layout and forward pass, written independently of rcg.tokenizers
# --------------------------------------------------------------------------------------------------


def _block(s: dict[str, Tensor], p: str, x: Tensor, groups: int) -> Tensor:
    def gn(name: str, t: Tensor) -> Tensor:
        c = t.shape[1]
        return F.group_norm(t, min(groups, c), s[f"{p}.{name}.weight"], s[f"{p}.{name}.bias"], eps=1e-6)

    h = F.conv2d(F.silu(gn("norm1", x)), s[f"{p}.conv1.weight"], padding=1)
    h = F.conv2d(F.silu(gn("norm2", h)), s[f"{p}.conv2.weight"], padding=1)
    short = s.get(f"{p}.nin_shortcut.weight")
    return (x if short is None else F.conv2d(h, short)) + h


def _count(s: dict[str, Tensor], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in s if k.startswith(prefix)})


def reference_tokenize(s: dict[str, Tensor], x: Tensor, groups: int = 32) -> tuple[Tensor, Tensor]:
    """(ids [B, h, w], decoded images in [0, 1]) of images `x` through the state dict `s`."""
    levels, blocks = _count(s, "encoder.down."), _count(s, "encoder.down.0.block.")
    h = F.conv2d(x, s["encoder.conv_in.weight"], padding=1)
    for i in range(levels):
        for j in range(blocks):
            h = _block(s, f"encoder.down.{i}.block.{j}", h, groups)
        if i < levels - 1:
            h = F.avg_pool2d(h, 2)
    h = _block(s, "encoder.mid.block_2", _block(s, "encoder.mid.block_1", h, groups), groups)
    h = F.group_norm(h, min(groups, h.shape[1]), s["encoder.norm_out.weight"], s["encoder.norm_out.bias"], eps=1e-6)
    z = F.conv2d(F.silu(h), s["encoder.conv_out.weight"], s["encoder.conv_out.bias"])
    b, d, hh, ww = z.shape
    codebook = s["quantize.embedding.weight"]
    ids = torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, d).double(), codebook.double()).argmin(1).view(b, hh, ww)
    h = F.conv2d(codebook[ids].permute(0, 3, 1, 2), s["decoder.conv_in.weight"], s["decoder.conv_in.bias"], padding=1)
    h = _block(s, "decoder.mid.block_2", _block(s, "decoder.mid.block_1", h, groups), groups)
    for i in reversed(range(levels)):
        for j in range(blocks):
            h = _block(s, f"decoder.up.{i}.block.{j}", h, groups)
        if i > 0:
            h = F.conv2d(F.interpolate(h, scale_factor=2, mode="nearest"), s[f"decoder.up.{i}.upsample.conv.weight"],
                         s[f"decoder.up.{i}.upsample.conv.bias"], padding=1)
    h = F.group_norm(h, min(groups, h.shape[1]), s["decoder.norm_out.weight"], s["decoder.norm_out.bias"], eps=1e-6)
    out = F.conv2d(F.silu(h), s["decoder.conv_out.weight"], s["decoder.conv_out.bias"], padding=1)
    return ids, out.clamp(0, 1)


# --------------------------------------------------------------------------------------------------
# Strict loading of the official layout
# --------------------------------------------------------------------------------------------------


def test_maskgit_f16_is_the_official_layout() -> None:
    own = {k: tuple(v.shape) for k, v in build_vqgan("maskgit_f16").state_dict().items()}
    assert own == official_layout(**MASKGIT)
    assert len(own) == 168 and sum(math.prod(s) for s in own.values()) == 54_515_587
    assert build_vqgan("maskgit_f16").token_grid == (16, 16)


@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "state_dict"])
def test_official_checkpoint_loads_strictly_and_matches_an_independent_forward(tmp_path: Path, wrapped: bool) -> None:
    state = random_state(official_layout(**MASKGIT))
    path = tmp_path / "vqgan_jax_strongaug.ckpt"
    torch.save({"state_dict": state} if wrapped else state, path)
    vq = load_official(path, image_size=32)
    assert not vq.training and not any(p.requires_grad for p in vq.parameters())
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids = vq.encode(x)
    ref_ids, ref_images = reference_tokenize(state, x)
    assert ids.shape == (2, 2, 2) and ids.dtype == torch.long
    assert torch.equal(ids, ref_ids)
    assert torch.allclose(vq.decode(ids), ref_images, atol=1e-4)  # summation order only
    assert len(ids.unique()) > 1  # the probe exercises more than one code


def test_a_wrong_layout_names_every_bad_key_and_the_file(tmp_path: Path) -> None:
    state = random_state(official_layout(**TINY))
    del state["encoder.down.2.block.0.nin_shortcut.weight"]
    state["encoder.down.0.attn.0.q.weight"] = torch.zeros(16, 16, 1, 1)
    state["decoder.conv_in.bias"] = torch.zeros(7)
    path = tmp_path / "bad.ckpt"
    torch.save(state, path)
    with pytest.raises(PipelineError) as e:
        load_official(path, arch="vq_tiny", image_size=28, in_channels=1)
    msg = str(e.value)
    assert msg.startswith(f"{path}: does not match the vq_tiny tokenizer")
    assert "missing keys (1): encoder.down.2.block.0.nin_shortcut.weight" in msg
    assert "unexpected keys (1): encoder.down.0.attn.0.q.weight" in msg
    assert "decoder.conv_in.bias: checkpoint (7,) vs model (32,)" in msg
    # The official size against the tiny file: every key is named, not just the first.
    with pytest.raises(PipelineError, match=r"shape mismatches \(\d{2,}\)"):
        load_official(path, image_size=32)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_a_crafted_pickle_is_refused_without_running(tmp_path: Path) -> None:
    marker, path = tmp_path / "ran", tmp_path / "vqgan_jax_strongaug.ckpt"
    torch.save({"state_dict": random_state(official_layout(**TINY)), "payload": _Payload(marker)}, path)
    with pytest.raises(PipelineError, match=rf"^{path}: cannot read as a weights-only .*nothing in it was run"):
        load_official(path, arch="vq_tiny", image_size=28, in_channels=1)
    assert not marker.exists()
    with pytest.raises(PipelineError, match="tokenizer checkpoint not found"):
        load_official(tmp_path / "absent.ckpt")


# --------------------------------------------------------------------------------------------------
# The interface MAGE uses
# --------------------------------------------------------------------------------------------------


def test_encode_decode_shapes_range_and_frozen_reload(tmp_path: Path) -> None:
    from rcg.tokenizers import save_tokenizer

    torch.manual_seed(0)
    vq = build_vqgan("vq_tiny", in_channels=1, image_size=28)
    x = torch.rand(3, 1, 28, 28)
    ids = vq.encode(x)
    assert ids.shape == (3, 7, 7) and ids.dtype == torch.long and 0 <= int(ids.min()) <= int(ids.max()) < 32
    y = vq.decode(ids)
    assert y.shape == x.shape and float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    save_tokenizer(vq, tmp_path, "vq_tiny", {"source": "test"})
    back = load_tokenizer(tmp_path)
    assert not back.training and not any(p.requires_grad for p in back.parameters())
    assert torch.equal(back.encode(x), ids) and torch.equal(back.decode(ids), y)
    meta = json.loads((tmp_path / "tokenizer.json").read_text())
    assert meta["token_grid"] == [7, 7] and meta["codebook_size"] == 32 and meta["input_size"] == 28
    with pytest.raises(PipelineError, match="not a multiple of its downsampling factor 4"):
        build_vqgan("vq_tiny", image_size=30)
    with pytest.raises(PipelineError, match=r"tokenizer.arch: unknown tokenizer size 'vq_huge'"):
        build_vqgan("vq_huge")


# --------------------------------------------------------------------------------------------------
# Training on the train shards
# --------------------------------------------------------------------------------------------------

def _train(cfg: config.Config, resume_id: str = "test") -> tuple[object, dict]:
    from rcg.tokenizers.train import train_tokenizer
    from rcg.training import DistInfo

    return train_tokenizer(cfg.tokenizer, cfg.data, resume_id, DistInfo(0, 1, 0, torch.device("cpu")))


def test_training_lowers_the_reconstruction_error_and_keeps_the_codebook_used(in_workspace: Path) -> None:
    from rcg.tokenizers.quality import round_trip

    cfg = config.load("params.yaml")
    torch.manual_seed(cfg.tokenizer.seed)
    before = round_trip(build_vqgan("vq_tiny", in_channels=1, image_size=28).freeze(), cfg.data)
    vq, summary = _train(cfg)
    after = round_trip(vq, cfg.data)
    mse_before, mse_after = (r["sq_error"] / r["pixels"] for r in (before, after))
    assert summary["steps"] == cfg.tokenizer.steps
    assert mse_after < 0.5 * mse_before, (mse_before, mse_after)
    used = (after["counts"] > 0).float().mean()
    assert used >= 0.5, f"only {float(used):.2f} of the codes used on val"


def test_interrupted_training_resumes_bit_identical(in_workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Restarts every 2 steps, so codebook restarts happen on both sides of the interruption.
    sets = ["tokenizer.restart_every=2", "tokenizer.restart_below=0.5", "tokenizer.steps=8", "tokenizer.ckpt_every=3"]
    states = {}
    for name in ("whole", "split"):
        cfg = config.load("params.yaml", config.parse_set([*sets, f"tokenizer.checkpoint_dir=ckpt-{name}"]))
        if name == "split":
            with monkeypatch.context() as m:
                interrupt_after(m, 5)
                with pytest.raises(Interrupted):
                    _train(cfg)
        vq, summary = _train(cfg)
        states[name] = (vq.state_dict(), summary)
    (whole, s_whole), (split, s_split) = states["whole"], states["split"]
    assert s_split["resumed_from"] == 3 and s_whole["resumed_from"] is None
    assert s_whole["codes_restarted"] > 0 and s_split["codes_restarted"] == s_whole["codes_restarted"]
    for k, v in whole.items():
        assert torch.equal(v, split[k]), k


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------


def test_stage_trains_writes_the_model_and_metrics(in_workspace: Path) -> None:
    from rcg.stages import evalnet, tokenizer

    cfg = config.load("params.yaml")
    tokenizer.run(cfg)
    vq = load_tokenizer("models/tokenizer")
    assert vq.meta["arch"] == "vq_tiny" and vq.meta["provenance"]["source"] == "trained"
    m = json.loads(Path("metrics/details/tokenizer.json").read_text())  # the whole record
    assert m["token_grid"] == [7, 7] and m["codebook_size"] == 32 and m["val_images"] == 256
    assert 0 < m["mse"] < 0.15 and m["psnr"] == pytest.approx(10 * math.log10(1 / m["mse"]))
    assert 1 < m["usage"]["perplexity"] <= 32 and 0 < m["usage"]["used_share"] <= 1
    assert "models/evalnet" in m["skipped"]["fd"] and "fidelity" not in m
    assert m["train"]["steps"] == cfg.tokenizer.steps
    # The headline `dvc metrics show` lists: the same values, a few of them.
    top = json.loads(Path("metrics/tokenizer.json").read_text())
    assert top == {"psnr": m["psnr"], "usage": {k: m["usage"][k] for k in ("perplexity", "used_share")},
                   "wall_time_s": m["wall_time_s"], "skipped": m["skipped"]}
    # The train split's ids, both views (the tiny preset flips), cached beside the weights.
    assert m["ids"] == {"file": "models/tokenizer/ids.parquet", "images": 256, "views": ["orig", "flip"],
                        "seconds": m["ids"]["seconds"]}
    from rcg.generators.tokens import TokenCache, tokenizer_digest

    assert len(TokenCache("models/tokenizer/ids.parquet", tokenizer_digest("models/tokenizer"))) == 512
    # With the evaluation network there, the Frechet distance of reconstructions is reported.
    evalnet.run(cfg)
    tokenizer.run(cfg)  # resumes at the end: the same weights, now scored under evalnet too
    m2 = json.loads(Path("metrics/details/tokenizer.json").read_text())
    assert m2["fidelity"]["extractor"] == "evalnet" and math.isfinite(m2["fidelity"]["fd"]) and "skipped" not in m2
    assert m2["mse"] == m["mse"]
    top2 = json.loads(Path("metrics/tokenizer.json").read_text())
    assert top2["fidelity"] == {"fd": m2["fidelity"]["fd"]} and "skipped" not in top2


def test_stage_converts_an_official_checkpoint(in_workspace: Path) -> None:
    from rcg.stages import tokenizer

    state = random_state(official_layout(**{**TINY, "in_ch": 3}))
    torch.save(state, "official.ckpt")
    sets = ["tokenizer.checkpoint=official.ckpt", "tokenizer.arch=vq_tiny"]
    rgb = ["data.channels=3", "encoder.mean=[]", "encoder.std=[]"]  # the grayscale shards read as RGB
    tokenizer.run(config.load("params.yaml", config.parse_set(sets + rgb)))
    vq = load_tokenizer("models/tokenizer")
    assert vq.meta["provenance"]["source"] == "checkpoint" and vq.meta["channels"] == 3
    for k, v in vq.state_dict().items():
        assert torch.equal(v, state[k]), k
    m = json.loads(Path("metrics/details/tokenizer.json").read_text())
    assert m["source"] == "checkpoint" and "train" not in m and m["val_images"] == 256
    with pytest.raises(PipelineError, match="tokenizes 3-channel images, but data.channels is 1"):
        tokenizer.run(config.load("params.yaml", config.parse_set(sets)))
