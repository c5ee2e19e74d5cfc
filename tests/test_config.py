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

ROOT = Path(__file__).resolve().parents[1]


def _params(**blocks: dict) -> dict:
    return yaml.safe_load(tiny_params(**blocks))


def test_defaults_are_the_embedded_preset() -> None:
    cfg = config.preset_config("default")
    assert cfg.shard.source == "fashion_mnist"
    assert cfg.data.image_size == 28 and cfg.data.channels == 1
    # The default preset is the dataclass defaults, except the encoder's fixed FMNIST normalisation
    # (the dataclass leaves it empty: measured on the shards).
    defaults = config.Config()
    assert defaults.encoder.mean == [] and cfg.encoder.mean == [0.2860] and cfg.encoder.std == [0.3530]
    defaults.encoder.mean, defaults.encoder.std = cfg.encoder.mean, cfg.encoder.std
    assert cfg == defaults


def test_preset_then_params_then_set() -> None:
    text = tiny_params(shard={"shard_size": 7})
    cfg = config.load_text(text)
    assert cfg.preset == "tiny"  # recorded in the header
    assert cfg.shard.max_per_split == 256  # the tiny preset's value, written out in full
    assert cfg.shard.shard_size == 7  # params.yaml beats the preset
    cfg = config.load_text(text, config.parse_set(["shard.shard_size=9", "train_rdm.lr=1e-4"]))
    assert cfg.shard.shard_size == 9 and cfg.train_rdm.lr == pytest.approx(1e-4)


def test_imagenet_preset_uses_folder_source() -> None:
    cfg = config.preset_config("imagenet256")
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
        config.load_text(tiny_params(**blocks))


def test_missing_keys_take_the_recorded_preset_and_rcg_params_fills_them_in(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An older params.yaml (written before a key existed) still loads; `rcg params` completes it."""
    p = _params()
    del p["train_rdm"]["steps"], p["evalnet"]
    text = tiny_params().split("\n\n")[0] + "\n\n" + yaml.safe_dump(p, sort_keys=False)
    with caplog.at_level("WARNING", logger="rcg.config"):
        cfg = config.load_text(text)
    assert cfg == config.preset_config("tiny")  # missing keys: the header's preset, tiny
    assert "train_rdm.steps" in caplog.text and "rcg params" in caplog.text
    assert config.missing_keys(p)[0] == "train_rdm.steps"

    path = tmp_path / "params.yaml"
    path.write_text(text)
    assert config.write_params(path, sets=["evalnet.width=4"]).evalnet.width == 4
    filled = yaml.safe_load(path.read_text())
    assert config.missing_keys(filled) == [] and filled["train_rdm"]["steps"] == cfg.train_rdm.steps
    assert config.recorded_preset(path.read_text()) == "tiny"


def test_legacy_preset_key_and_unknown_keys() -> None:
    legacy = {"preset": "tiny", **{b: {} for b in config.params_values(config.Config())}}
    assert config.resolve(legacy) == config.preset_config("tiny")  # an older params.yaml
    with pytest.raises(ConfigError, match="would change nothing"):  # e.g. `-S ++preset=tiny`
        config.load_text(tiny_params() + "preset: tiny\n")
    cfg = config.preset_config("imagenet256", {"train_rdm": {"lr": 1e-5}})
    assert config.resolve(cfg.to_dict()) == cfg  # Config.to_dict() round trip (the served config)
    with pytest.raises(ConfigError, match="header says 'default'"):
        config.resolve({**legacy, "preset": "tiny"}, preset="default")
    with pytest.raises(ConfigError, match="rcg params --preset NAME"):
        config.load_text(tiny_params(), config.parse_set(["preset=default"]))
    with pytest.raises(ConfigError, match="preset: expected one of"):
        config.load_text(tiny_params().replace("# preset: tiny", "# preset: huge"))
    with pytest.raises(ConfigError, match="trian_rdm: unknown key"):
        config.resolve({**_params(), "trian_rdm": {}})
    with pytest.raises(ConfigError, match="train_rdm.depth: unknown key"):
        config.load_text(tiny_params(train_rdm={"depth": 4}))


def test_rcg_params_writes_every_value_of_a_preset(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("shard:\n  shard_size: 3\n")  # replaced: --preset starts from the preset
    r = subprocess.run(
        [sys.executable, "-m", "rcg.cli", "params", "--preset", "tiny", "--set", "train_rdm.lr=1e-4"],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    text = params.read_text()
    assert "# made by: rcg params --preset tiny --set train_rdm.lr=1e-4" in text
    assert config.missing_keys(yaml.safe_load(text)) == []
    assert config.load(params) == config.preset_config("tiny", {"train_rdm": {"lr": 1e-4}})
    assert list(tmp_path.iterdir()) == [params]  # written atomically: no temporary left over
    r = subprocess.run([sys.executable, "-m", "rcg.cli", "params", "--set", "train_rdm.lrr=1"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 2 and "train_rdm.lrr: unknown key" in r.stderr
    assert params.read_text() == text


def test_stage_preset_is_a_one_off_run_without_params_yaml(tmp_path: Path) -> None:
    from rcg import cli

    (tmp_path / "params.yaml").write_text(tiny_params(shard={"shard_size": 5}))
    args = cli.build_parser().parse_args(
        ["shard", "--params", str(tmp_path / "params.yaml"), "--preset", "default",
         "--set", "shard.workers=1"])
    cfg = cli.load_config(args)
    assert cfg.preset == "default" and cfg.shard.shard_size == 10000 and cfg.shard.workers == 1
    args = cli.build_parser().parse_args(["shard", "--params", str(tmp_path / "params.yaml")])
    assert cli.load_config(args).shard.shard_size == 5


def test_float_accepts_yaml_exponent_strings() -> None:
    # PyYAML reads `1e-4` (no dot) as a string; floats accept it, ints do not.
    cfg = config.load_text(tiny_params(train_rdm={"lr": "1e-4"}))
    assert cfg.train_rdm.lr == pytest.approx(1e-4)


def test_repo_params_yaml_holds_every_value_of_the_default_preset() -> None:
    """The committed params.yaml is `rcg params --preset default`: a changed default in
    rcg/config.py or rcg/presets/default.yaml reaches the pipeline only once it is rewritten."""
    text = (ROOT / "params.yaml").read_text()
    assert config.missing_keys(yaml.safe_load(text)) == [], "run `rcg params --preset default`"
    assert config.load_text(text) == config.preset_config("default"), "run `rcg params --preset default`"


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
    for name in ("shard", "encoder", "encode", "train-rdm", "train-generator", "evaluate", "params", "code"):
        assert name in r.stdout
    r = subprocess.run([sys.executable, "-m", "rcg.cli", "shard", "--help"], capture_output=True, text=True)
    assert "--set KEY=VALUE" in r.stdout and "manifest" in r.stdout
