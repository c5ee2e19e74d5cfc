"""Config: presets, overrides, and errors that name the bad key before any work starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rcg import config
from rcg.config import ConfigError
from tests.conftest import tiny_params


def _params(**blocks: dict) -> dict:
    return yaml.safe_load(tiny_params(**blocks))


def test_defaults_are_the_embedded_preset() -> None:
    cfg = config.resolve({**_params(), "preset": "default"})
    assert cfg.shard.source == "fashion_mnist"
    assert cfg.data.image_size == 28 and cfg.data.channels == 1


def test_preset_then_params_then_set() -> None:
    p = _params(shard={"shard_size": 7})
    cfg = config.resolve(p)
    assert cfg.preset == "tiny"
    assert cfg.shard.max_per_split == 256  # from rcg/presets/tiny.yaml
    assert cfg.shard.shard_size == 7  # params.yaml beats the preset
    cfg = config.resolve(p, config.parse_set(["shard.shard_size=9", "train_rdm.lr=1e-4"]))
    assert cfg.shard.shard_size == 9 and cfg.train_rdm.lr == pytest.approx(1e-4)


def test_imagenet_preset_uses_folder_source() -> None:
    cfg = config.resolve({**_params(), "preset": "imagenet256"})
    assert cfg.shard.source == "folder" and cfg.data.image_size == 256 and cfg.data.channels == 3


@pytest.mark.parametrize(
    "blocks, message",
    [
        ({"shard": {"shard_sise": 5}}, "shard.shard_sise: unknown key"),
        ({"shard": {"shard_size": "big"}}, "shard.shard_size: expected int"),
        ({"shard": {"shard_size": 1.5}}, "shard.shard_size: expected int"),
        ({"shard": {"source": "s3"}}, "shard.source: expected 'fashion_mnist' | 'folder'"),
        ({"train_rdm": {"class_cond": "yes"}}, "train_rdm.class_cond: expected bool"),
        ({"train_rdm": {"lr": "fast"}}, "train_rdm.lr: expected float"),
        ({"shard": [1, 2]}, "shard: expected a mapping"),
    ],
)
def test_bad_values_name_the_key(blocks: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("|", r"\|")):
        config.resolve(_params(**blocks))


def test_missing_block_and_preset() -> None:
    p = _params()
    del p["train_rdm"]
    with pytest.raises(ConfigError, match="train_rdm: missing key"):
        config.resolve(p)
    p = _params()
    del p["preset"]
    with pytest.raises(ConfigError, match="preset: missing key"):
        config.resolve(p)
    with pytest.raises(ConfigError, match="preset: expected one of"):
        config.resolve({**_params(), "preset": "huge"})
    with pytest.raises(ConfigError, match="unknown key"):
        config.resolve({**_params(), "trian_rdm": {}})


def test_float_accepts_yaml_exponent_strings() -> None:
    # PyYAML reads `1e-4` (no dot) as a string; floats accept it, ints do not.
    cfg = config.resolve(yaml.safe_load(tiny_params(train_rdm={"lr": "1e-4"})))
    assert cfg.train_rdm.lr == pytest.approx(1e-4)


def test_repo_params_yaml_is_valid() -> None:
    cfg = config.load(Path(__file__).resolve().parents[1] / "params.yaml")
    assert cfg.preset == "default"


def test_cli_reports_config_error_before_work(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(tiny_params(shard={"shard_size": "x"}))
    r = subprocess.run(
        [sys.executable, "-m", "rcg.cli", "shard"], cwd=tmp_path, capture_output=True, text=True
    )
    assert r.returncode == 2
    assert "shard.shard_size: expected int" in r.stderr
    assert not (tmp_path / "data").exists()


def test_cli_help_lists_every_stage() -> None:
    r = subprocess.run([sys.executable, "-m", "rcg.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for name in ("shard", "encoder", "encode", "train-rdm", "train-generator", "evaluate"):
        assert name in r.stdout
    r = subprocess.run([sys.executable, "-m", "rcg.cli", "shard", "--help"], capture_output=True, text=True)
    assert "--set KEY=VALUE" in r.stdout and "manifest" in r.stdout
