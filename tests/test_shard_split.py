"""The held-out split of a folder without val/: on by default, exact in count, stable, recorded."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from rcg import config
from rcg.data import sources
from rcg.data.shards import write_shards
from rcg.io import PipelineError, read_json
from rcg.stages import shard as shard_stage
from tests.conftest import tiny_params
from tests.test_shard import _photo, _samples, _save


@pytest.mark.parametrize(
    ("n", "fraction", "min_count", "expected"),
    [
        (160, 0.05, 50, 40),  # the minimum, capped at a quarter: 120 images stay for training
        (1000, 0.05, 50, 50),  # the minimum
        (100_000, 0.05, 50, 5000),  # the fraction
        (3, 0.05, 50, 0),  # a quarter of 3 is 0: too few to hold any out
        (20, 0.3, 0, 6),  # an explicit fraction is honoured beyond a quarter
        (160, 0.0, 50, 0),  # 0: no val split, whatever the minimum
    ],
)
def test_val_count(n: int, fraction: float, min_count: int, expected: int) -> None:
    assert sources.val_count(n, fraction, min_count) == expected


def _folder(root: Path, n: int) -> Path:
    photos = [_photo(k).resize((24, 24)) for k in ("astronaut", "chelsea", "coffee", "rocket")]
    for i in range(n):
        _save(photos[i % 4], root / f"sub{i % 3}" / f"img{i:03d}.png", "PNG")
    return root


def test_small_folder_gets_a_usable_val_split_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 160-image flat folder through the stage with the default settings: 40 val, 120 train."""
    root = _folder(tmp_path / "photos", 160)
    (root / "notes.txt").write_text("not an image")  # a known skip is no candidate
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(tiny_params(shard={"source": "folder", "folder": str(root)}))
    cfg = config.load("params.yaml")
    assert (cfg.shard.val_fraction, cfg.shard.val_min_count) == (0.05, 50)
    cfg.shard.max_per_split = 0
    shard_stage.run(cfg)
    m = read_json(tmp_path / "data/shards/manifest.json")
    assert m["splits"]["val"]["written"] == 40 and m["splits"]["train"]["written"] == 120
    assert m["val_split"] == {"method": "hash", "fraction": 0.05, "min_count": 50, "count": 40, "candidates": 160}
    # The 40 keys with the smallest sha256, exactly.
    keys = [f"sub{i % 3}/img{i:03d}" for i in range(160)]
    by_hash = sorted(keys, key=lambda k: hashlib.sha256(k.encode()).digest())
    val = _samples(tmp_path / "data/shards", "val")
    assert set(val) == set(by_hash[:40])
    assert not set(val) & set(_samples(tmp_path / "data/shards", "train"))


def test_hold_out_is_deterministic_and_stable(tmp_path: Path) -> None:
    keys = [f"k{i}" for i in range(1000)]
    chosen = sources.hold_out(keys, 50)
    assert len(chosen) == 50 and chosen == sources.hold_out(list(reversed(keys)), 50)
    # Adding files moves the cut-off only: whatever leaves val is replaced by new keys, none by old ones.
    more = sources.hold_out(keys + [f"new{i}" for i in range(100)], 50)
    assert more - chosen <= {f"new{i}" for i in range(100)}
    a = write_shards(sources.image_folder(_folder(tmp_path / "p", 40), 0.05, 0, 50), tmp_path / "a", 8, 8, 1)
    b = write_shards(sources.image_folder(tmp_path / "p", 0.05, 0, 50), tmp_path / "b", 8, 8, 2)
    assert a["splits"]["val"] == b["splits"]["val"] and a["splits"]["val"]["written"] == 10


def test_imagenet_layout_without_and_with_val(tmp_path: Path) -> None:
    root = tmp_path / "imagenet"
    for i in range(24):
        _save(_photo("chelsea").resize((20, 20)), root / "train" / f"class{i % 2}" / f"im{i}.png", "PNG")
    src = sources.image_folder(root, 0.05, 0, 50)
    assert src.val_split["method"] == "hash" and len(src.splits["val"]) == 6  # a quarter of 24
    assert {it.label for it in src.splits["val"] + src.splits["train"]} == {0, 1}
    _save(_photo("chelsea").resize((20, 20)), root / "val" / "class0" / "v.png", "PNG")
    src = sources.image_folder(root, 0.05, 0, 50)
    assert src.val_split == {"method": "folder"} and [it.key for it in src.splits["val"]] == ["class0/v"]
    assert len(src.splits["train"]) == 24
    src = sources.image_folder(_folder(tmp_path / "flat", 8), 0.0, 0, 50)
    assert src.val_split == {"method": "none"} and set(src.splits) == {"train"}
    with pytest.raises(PipelineError, match=r"shard.val_fraction must be in \[0, 0.5\]"):
        sources.image_folder(root, 0.6)
    with pytest.raises(PipelineError, match="shard.val_min_count must not be negative"):
        sources.image_folder(root, 0.05, 0, -1)
