"""The `encode` stage: shards -> data/features/{train,val}.parquet + summary.json, exactly once per
sample and view, and the summary statistics (uniformity, Frechet noise floor via torch-fidelity)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rcg import config as config_mod
from rcg import features
from rcg.data.loader import read_manifest
from rcg.encoders import EncoderSpec, RepEncoder, load_encoder, save_encoder
from rcg.encoders.vit import build_vit
from rcg.features import read_features, to_table
from rcg.io import PipelineError
from rcg.metrics import representations
from rcg.stages import encode as stage

BLOCKS = [f.name for f in dataclasses.fields(config_mod.Config) if f.name != "preset"]


def tiny_config(shards: Path) -> config_mod.Config:
    cfg = config_mod.resolve({"preset": "tiny", **{b: {} for b in BLOCKS}})
    cfg.data.shards_dir = str(shards)
    return cfg


@pytest.fixture(scope="module")
def shards(tiny_workspace: Path) -> Path:
    """The session's tiny-preset Fashion-MNIST shards (tests/conftest.py), read-only here."""
    return tiny_workspace / "data" / "shards"


def write_random_encoder(model_dir: Path) -> RepEncoder:
    spec = EncoderSpec(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=1, num_heads=2,
                       head_hidden_dim=64, mean=(0.286,), std=(0.353,))
    torch.manual_seed(0)
    enc = RepEncoder(spec, build_vit(spec))
    save_encoder(enc, spec, model_dir)
    return enc


def test_encode_stage_writes_every_sample_once_per_view(shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(shards)
    write_random_encoder(Path(cfg.encoder.out_dir))
    stage.run(cfg)
    manifest = read_manifest(shards)
    enc = load_encoder(cfg.encoder.out_dir)
    for split in ("train", "val"):
        path = Path(cfg.encode.out_dir) / f"{split}.parquet"
        n = manifest["splits"][split]["written"]
        meta = pq.ParquetFile(path)
        assert meta.schema_arrow.field("rep").type == pa.list_(pa.float32(), 256)
        assert meta.metadata.num_rows == 2 * n
        col = meta.metadata.row_group(0).column(3)
        assert col.compression == "ZSTD" and "BYTE_STREAM_SPLIT" in col.encodings
        feats = read_features(path)
        assert len(feats) == 2 * n
        assert feats.labelled and feats.labels.max() < 10
        orig, flip = feats.select_view("orig"), feats.select_view("flip")
        assert sorted(orig.keys) == sorted(flip.keys) and len(set(orig.keys)) == n
        # Standardised reps, and the flip view is the encoder's output on the mirrored image.
        assert torch.allclose(orig.reps.mean(1), torch.zeros(n), atol=1e-4)
        assert torch.allclose(orig.reps.std(1), torch.ones(n), atol=1e-4)
        assert not torch.allclose(orig.reps, flip.reps[[flip.keys.index(k) for k in orig.keys]])
    # One sample recomputed from the shard image gives the stored row.
    from rcg.data.loader import make_loader

    batch = next(iter(make_loader(cfg.data, "val", "once", batch_size=4)))
    feats = read_features(Path(cfg.encode.out_dir) / "val.parquet", view="flip")
    i = feats.keys.index(batch["key"][0])
    with torch.no_grad():
        want = enc(batch["image"][:1].flip(-1))[0]
    torch.testing.assert_close(feats.reps[i], want, atol=1e-5, rtol=1e-5)

    summary = json.loads((Path(cfg.encode.out_dir) / "summary.json").read_text())
    total = sum(2 * manifest["splits"][s]["written"] for s in ("train", "val"))
    assert summary["count"] == total
    assert -4.0 * 1.01 <= summary["uniformity"] <= 0.0  # log E exp(-2|x-y|^2) lies in [-4, 0]
    assert summary["fd_noise_floor"] > 0


def test_rows_do_not_depend_on_the_loader_workers(shards, tmp_path):
    """In-process or in 2 workers, the stage writes the same file: rows by key, orig before flip."""
    cfg = tiny_config(shards)
    cfg.encode.batch_size = 64  # batches that straddle the 100-sample shards
    enc = write_random_encoder(tmp_path / "encoder")
    n = read_manifest(shards)["splits"]["train"]["written"]
    read_order, written = {}, {}
    for workers in (0, 2):
        cfg.encode.num_workers = workers
        table = features.encode_split(enc, cfg.data, "train", torch.device("cpu"), cfg.encode.batch_size, cfg.encode.num_workers, progress=False)
        read_order[workers] = table["key"].to_pylist()
        written[workers] = tmp_path / f"train_{workers}.parquet"
        features.write_split(table, n, "train", written[workers])
    # The two loaders really do interleave the 3 shards differently ...
    assert read_order[0] != read_order[2] and sorted(read_order[0]) == sorted(read_order[2])
    # ... and the files are byte for byte the same, in the canonical order.
    assert written[0].read_bytes() == written[2].read_bytes()
    feats = read_features(written[0])
    assert feats.keys[0::2] == feats.keys[1::2] == sorted(set(feats.keys))
    assert feats.views == ["orig", "flip"] * n


def test_exactly_once_check_names_duplicates_and_missing():
    reps = np.zeros((4, 256), np.float32)
    ok = to_table(["a", "b", "a", "b"], [0, 1, 0, 1], ["orig", "orig", "flip", "flip"], reps)
    features.check_exactly_once(ok, 2, "train")
    dup = to_table(["a", "a", "a", "b"], [0, 0, 0, 1], ["orig", "orig", "flip", "flip"], reps)
    with pytest.raises(PipelineError, match="duplicate keys in view 'orig' \\(e.g. a\\)"):
        features.check_exactly_once(dup, 2, "train")
    with pytest.raises(PipelineError, match="manifest says 3"):
        features.check_exactly_once(ok, 3, "val")


def test_uniformity_and_noise_floor():
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(2000, 16, generator=g)
    clumped = torch.randn(2000, 16, generator=g) * 0.05 + 1.0
    # Uniformly spread reps are more uniform (lower loss) than a tight cluster; identical points give 0.
    assert representations.uniformity(spread) < representations.uniformity(clumped) < -0.0
    assert representations.uniformity(torch.ones(10, 4)) == pytest.approx(0.0)
    # Two halves of one Gaussian: small FD; a shifted second half: FD about the squared shift.
    fd = representations.frechet_noise_floor(spread)
    assert 0 < fd < 0.5
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    a = fid_features_to_statistics(spread.double())
    b = fid_features_to_statistics((spread + 2.0).double())
    assert fid_statistics_to_metric(a, b, False)["frechet_inception_distance"] == pytest.approx(64.0)


def test_encode_needs_an_encoder(shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError, match="encoder.json"):
        stage.run(tiny_config(shards))
