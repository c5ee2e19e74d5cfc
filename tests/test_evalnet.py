"""The evaluation classifier: model, save/load, class accuracy, and the `rcg evalnet` stage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from rcg import config
from rcg.io import PipelineError, read_json, write_json
from rcg.metrics.evalnet import EvalNet, class_accuracy, classify, load_evalnet, prepare_input, save_evalnet
from rcg.stages import evalnet as evalnet_stage
from tests.conftest import tiny_params


def test_features_and_logits_shapes_and_exact_save_load_roundtrip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = EvalNet(in_channels=1, image_size=28, num_classes=10, width=8, feature_dim=16).eval()
    x = torch.rand(5, 1, 28, 28)
    assert net.features(x).shape == (5, 16) and net(x).shape == (5, 10)
    weights = save_evalnet(net, tmp_path / "evalnet", extra={"classes": list("abcdefghij")})
    assert weights.name == "evalnet.safetensors" and (tmp_path / "evalnet" / "evalnet.json").exists()
    back, meta = load_evalnet(weights)
    assert meta["classes"] == list("abcdefghij") and meta["kwargs"]["feature_dim"] == 16
    assert torch.equal(back(x), net(x))
    assert not any(p.requires_grad for p in back.parameters()) and not back.training


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="rcg evalnet"):
        load_evalnet(tmp_path / "evalnet.safetensors")
    weights = save_evalnet(EvalNet(width=8, feature_dim=16), tmp_path)
    meta = json.loads((tmp_path / "evalnet.json").read_text())
    meta["kwargs"]["feature_dim"] = 32  # the JSON no longer describes the weights
    (tmp_path / "evalnet.json").write_text(json.dumps(meta))
    with pytest.raises(PipelineError, match="do not match"):
        load_evalnet(weights)


def test_prepare_input_maps_rgb_and_sizes_to_the_trained_input() -> None:
    gray = torch.rand(2, 1, 28, 28)
    rgb = gray.expand(-1, 3, -1, -1)
    assert torch.allclose(prepare_input(rgb, 1, 28), gray)
    assert prepare_input(torch.rand(2, 3, 56, 56), 1, 28).shape == (2, 1, 28, 28)
    assert prepare_input(gray, 3, 28).shape == (2, 3, 28, 28)


def test_class_accuracy_overall_and_per_class() -> None:
    targets = torch.tensor([0, 0, 1, 1, 1, 2])
    preds = torch.tensor([0, 1, 1, 1, 0, 2])
    acc = class_accuracy(preds, targets, ["a", "b", "c", "d"])
    assert acc["overall"] == pytest.approx(4 / 6)
    assert acc["per_class"] == pytest.approx({"a": 0.5, "b": 2 / 3, "c": 1.0})  # d never asked for


def test_stage_learns_writes_artifacts_and_resumes(in_workspace: Path, caplog: pytest.LogCaptureFixture) -> None:
    (in_workspace / "params.yaml").write_text(tiny_params(evalnet={"epochs": 6.0}))
    cfg = config.load("params.yaml")
    evalnet_stage.run(cfg)
    m = read_json("metrics/details/evalnet.json")
    # 24 steps on 256 Fashion-MNIST images: far above chance (0.1) on the 256 val images.
    assert m["test_accuracy"] > 0.4, m
    assert m["steps"] == 24 and set(m["per_class_accuracy"]) <= set(read_json("data/shards/manifest.json")["classes"])
    net, meta = load_evalnet("models/evalnet/evalnet.safetensors")
    assert meta["test_accuracy"] == m["test_accuracy"] and meta["kwargs"]["in_channels"] == 1
    ckpt = torch.load("checkpoints/evalnet/checkpoint-last.pt", weights_only=False)
    assert ckpt["step"] == 24
    # A rerun with the same settings resumes at the end: no further training, same weights.
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with caplog.at_level("INFO"):
        evalnet_stage.run(cfg)
    assert any("resuming" in r.message for r in caplog.records)
    after, _ = load_evalnet("models/evalnet/evalnet.safetensors")
    assert all(torch.equal(before[k], v) for k, v in after.state_dict().items())
    preds = classify(after, torch.rand(3, 1, 28, 28))
    assert preds.shape == (3,) and preds.dtype == torch.long
    # Re-sharded data (another manifest) starts over instead of resuming the old checkpoint.
    target = Path("data/shards").resolve()
    Path("data/shards").unlink()
    shutil.copytree(target, "data/shards")
    manifest = read_json("data/shards/manifest.json")
    write_json("data/shards/manifest.json", {**manifest, "fingerprint": "other images"})
    caplog.clear()
    with caplog.at_level("INFO"):
        evalnet_stage.run(cfg)
    assert any("starting over" in r.message for r in caplog.records)
    assert not any("resuming" in r.message for r in caplog.records)


def test_unlabelled_shards_train_a_contrastive_network(in_workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without labels the same CNN trains by SimCLR; it has features, no logits, and no accuracy."""
    cfg = config.load("params.yaml")
    manifest = read_json("data/shards/manifest.json")
    monkeypatch.setattr(evalnet_stage, "read_manifest", lambda d: {**manifest, "classes": []})
    evalnet_stage.run(cfg)
    m = read_json("metrics/details/evalnet.json")
    assert m["kind"] == "contrastive" and m["test_accuracy"] is None and "no class labels" in m["skipped"]["test_accuracy"]
    net, meta = load_evalnet("models/evalnet/evalnet.safetensors")
    assert meta["kind"] == "contrastive" and net.head is None
    x = torch.rand(4, 1, 28, 28)
    assert net.features(x).shape == (4, cfg.evalnet.feature_dim)
    with pytest.raises(PipelineError, match="without labels"):
        net(x)
    from rcg.metrics.extractors import EVALNET_SSL, extractor_setup

    assert extractor_setup("evalnet", "models/evalnet/evalnet.safetensors")[0] == EVALNET_SSL


def test_nt_xent_is_low_for_matching_views_and_high_for_shuffled_ones() -> None:
    from rcg.metrics.evalnet import nt_xent

    z = torch.randn(16, 8)
    assert nt_xent(z, z + 0.01 * torch.randn(16, 8), 0.2) < nt_xent(z, z[torch.randperm(16)], 0.2)
