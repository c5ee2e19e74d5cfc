"""Config: presets, overrides, and errors that name the bad key before any work starts."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing
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


# --------------------------------------------------------------------------------------------------
# Ranges: every value checked when the config is resolved, before any work
# --------------------------------------------------------------------------------------------------


def _fields() -> list[tuple[str, dataclasses.Field, type, object]]:
    """(dotted key, field, block class, type) of every params.yaml value."""
    out = []
    for block in config.params_values(config.Config()):
        cls = type(getattr(config.Config(), block))
        hints = typing.get_type_hints(cls)
        out += [(f"{block}.{f.name}", f, cls, hints[f.name]) for f in dataclasses.fields(cls)]
    return out


def test_every_field_has_a_range_or_is_listed_as_free() -> None:
    """A new field must say what it allows: a Range, or FREE in its block's RANGES table."""
    for key, f, cls, tp in _fields():
        assert f.name in cls.RANGES, f"{key}: add it to {cls.__name__}.RANGES (a Range, or FREE)"
        if tp in (int, float) or typing.get_origin(tp) is list:
            assert cls.RANGES[f.name] is not config.FREE, f"{key}: a number or list needs a Range"
    for block in config.params_values(config.Config()):
        cls = type(getattr(config.Config(), block))
        stale = set(cls.RANGES) - {f.name for f in dataclasses.fields(cls)}
        assert not stale, f"{cls.__name__}.RANGES names no field: {stale}"


def test_committed_params_and_every_preset_pass_their_ranges() -> None:
    for name in config.PRESET_NAMES:
        config.check_ranges(config.preset_config(name))
    config.check_ranges(config.load(ROOT / "params.yaml"))
    config.check_ranges(config.load_text(tiny_params()))


def test_evaluation_modes_are_the_evaluation_modules() -> None:
    from rcg.metrics.evaluation import MODES

    assert config.EVAL_MODES == MODES


def _below(r: config.Range) -> float | None:
    """A value just outside `r` from below, or None when it has no lower bound."""
    if r.ge is not None:
        return r.ge - 1 if not r.zero_ok else -1
    if r.gt is not None:
        return r.gt
    return None


def test_every_float_refuses_nan_and_inf_and_every_bound_holds() -> None:
    """Generated from the tables themselves: each float refuses NaN and inf, each lower bound its
    neighbour below, always naming the key and the value."""
    cases, params = 0, _params()
    for key, f, cls, tp in _fields():
        r = cls.RANGES[f.name]
        block, name = key.split(".")
        bad = []
        if tp is float:
            bad += [float("nan"), float("inf"), float("-inf")]
        if r is not None and tp in (int, float) and _below(r) is not None:
            bad.append(tp(_below(r)))
        for value in bad:
            expected = rf"^{re.escape(key)}: {re.escape(repr(value))} is out of range \(must"
            with pytest.raises(ConfigError, match=expected):
                config.resolve(params, {block: {name: value}}, preset="tiny")
            cases += 1
    assert cases > 100


@pytest.mark.parametrize(
    "sets, message",
    [
        (["train_rdm.lr=0"], "train_rdm.lr: 0.0 is out of range (must be > 0 and finite)"),
        (["train_rdm.lr=.nan"], "train_rdm.lr: nan is out of range (must be > 0 and finite)"),
        (["train_rdm.steps=-5"], "train_rdm.steps: -5 is out of range (must be >= 1)"),
        (["train_rdm.batch_size=0"], "train_rdm.batch_size: 0 is out of range (must be >= 1)"),
        (["data.image_size=3"], "data.image_size: 3 is out of range (must be >= 8: the models downsample"),
        (["evaluate.n_samples=-10"], "evaluate.n_samples: -10 is out of range (must be >= 2"),
        (["evaluate.n_reference=1"], "evaluate.n_reference: 1 is out of range (must be 0 or >= 2"),
        (["shard.val_fraction=0.7"], "shard.val_fraction: 0.7 is out of range (must be in [0, 0.5]"),
        (["encoder.blur_prob=1.5"], "encoder.blur_prob: 1.5 is out of range (must be in [0, 1])"),
        (["train_rdm.ema_decay=1"], "train_rdm.ema_decay: 1.0 is out of range (must be in (0, 1)"),
        (["data.channels=2"], "data.channels: 2 is out of range (must be one of 1, 3"),
        (["encoder.embed_dim=30"], "encoder.embed_dim: 30 is out of range (must be >= 4 and a multiple of 4"),
        (["encoder.blur_sigma=[0.5]"], "encoder.blur_sigma: [0.5] is not allowed (must have 2 items"),
        (["encoder.blur_sigma=[0, 1]"], "encoder.blur_sigma[0]: 0.0 is out of range (must be > 0 and finite)"),
        (["encoder.mean=[.inf]"], "encoder.mean[0]: inf is out of range (must be finite)"),
        (["evaluate.modes=[rcg, rgc]"], "evaluate.modes[1]: 'rgc' is not allowed (must be one of 'uncond'"),
        (["evaluate.modes=[]"], "evaluate.modes: [] is not allowed (must not be empty)"),
        (["evaluate.modes=[rcg, rcg]"], "evaluate.modes: ['rcg', 'rcg'] is not allowed (must name each item once)"),
        (["train_rdm.out_dir=''"], "train_rdm.out_dir: '' is not allowed (must not be empty"),
        (["tracking.uri=''"], "tracking.uri: '' is not allowed (must not be empty"),
        # what two fields decide together
        (["train_rdm.sample_steps=2000"],
         "train_rdm.sample_steps: 2000 is out of range (must be <= train_rdm.timesteps"),
        (["evaluate.sample_steps=1001"],
         "evaluate.sample_steps: 1001 is out of range (must be <= train_generator.timesteps"),
        (["encoder.blur_sigma=[2, 1]"],
         "encoder.blur_sigma: [2.0, 1.0] is out of range (must be [min, max] with min <= max)"),
        (["encoder.num_heads=5"], "encoder.num_heads: 5 is out of range (must be a divisor of encoder.embed_dim"),
        (["encoder.patch_size=5"], "encoder.patch_size: 5 is out of range (must be a divisor of encoder.img_size"),
        (["encoder.std=[0.3, 0.3]"],
         "encoder.std: [0.3, 0.3] is out of range (must be empty (measured on the shards) or one"),
        (["encoder.std=[]"], "encoder.std: [] is out of range (must be set together with encoder.mean"),
    ],
)
def test_bad_ranges_name_the_key_value_and_range(sets: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        config.load_text(tiny_params(), config.parse_set(sets))
    assert str(e.value).startswith(message)
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.preset_config("default", config.parse_set(sets))  # `--preset` runs are checked too


def test_a_named_encoder_arch_skips_the_size_checks() -> None:
    """mocov3_vit_base brings its own size and normalisation: the size fields are not used."""
    cfg = config.preset_config("imagenet256", config.parse_set(["encoder.num_heads=5", "encoder.mean=[0.5]"]))
    assert cfg.encoder.num_heads == 5


def test_cli_refuses_out_of_range_values_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from rcg import cli

    params = tmp_path / "params.yaml"
    params.write_text(tiny_params(train_rdm={"lr": 0.0}))
    out = tmp_path / "rdm"
    assert cli.main(["train-rdm", "--params", str(params), "--set", f"train_rdm.out_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert err == "rcg train-rdm: config error: train_rdm.lr: 0.0 is out of range (must be > 0 and finite)\n"
    assert not out.exists()
    # `rcg params` refuses to write such a value, and leaves the file as it was
    text = params.read_text()
    assert cli.main(["params", "--params", str(params), "--set", "train_rdm.steps=-1"]) == 2
    assert "train_rdm.steps: -1 is out of range (must be >= 1)" in capsys.readouterr().err
    assert params.read_text() == text
    # options of single commands are checked by argparse, in one usage line
    with pytest.raises(SystemExit) as exit_:
        cli.main(["generate", "--n", "-3"])
    assert exit_.value.code == 2 and "argument --n: expected an integer >= 1, got '-3'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Params files that cannot be read: one line naming the file (or the --set item), exit 2
# --------------------------------------------------------------------------------------------------


def _one_line_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    from rcg import cli

    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_params_file_errors_are_one_line_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("train_rdm:\n  arch: caf\u00e9\n".encode("latin-1"))
    err = _one_line_error(capsys, ["shard", "--params", str(latin1)])
    assert f"{latin1}: not a params file: not UTF-8 text (byte " in err

    folder = tmp_path / "somedir"
    folder.mkdir()
    for cmd in ("shard", "params"):
        err = _one_line_error(capsys, [cmd, "--params", str(folder)])
        assert f"{folder}: is a folder, not a params file" in err
    assert _one_line_error(capsys, ["params", "--preset", "tiny", "--params", str(folder)])
    assert list(folder.iterdir()) == []

    listing = tmp_path / "list.yaml"
    listing.write_text("- shard\n- data\n")
    err = _one_line_error(capsys, ["train-rdm", "--params", str(listing)])
    assert f"{listing}: not a params file: expected a mapping of stage blocks at the top, got list" in err

    broken = tmp_path / "broken.yaml"
    broken.write_text("shard:\n  workers: [1,\n")
    err = _one_line_error(capsys, ["shard", "--params", str(broken)])
    assert f"{broken}: not valid YAML (" in err and "line 3" in err

    good = tmp_path / "params.yaml"
    good.write_text(tiny_params())
    err = _one_line_error(capsys, ["shard", "--params", str(good), "--set", "train_rdm.lr=[1,"])
    assert "--set 'train_rdm.lr=[1,': the value is not valid YAML (" in err
    err = _one_line_error(capsys, ["params", "--params", str(good), "--set", "train_rdm=1", "--set", "train_rdm.lr=2"])
    assert "--set 'train_rdm.lr=2': train_rdm is set to a value by another --set" in err
