"""The shard stage reads only what it should: special files, hidden folders, oversized files and
images, undecodable names, EXIF orientation, empty settings, leftovers and foreign files."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from rcg import config
from rcg.data import images, sources
from rcg.data.shards import write_shards
from rcg.io import PipelineError, read_json
from rcg.stages import shard as shard_stage
from tests.conftest import tiny_params
from tests.test_shard import _photo, _samples, _save

pytestmark = pytest.mark.timeout(120)  # a FIFO read would block forever: fail instead of hanging


def _shard(root: Path, out: Path, workers: int = 1, **kw) -> dict:
    src = sources.image_folder(root, kw.pop("val_fraction", 0.0), val_min_count=kw.pop("val_min_count", 0))
    return write_shards(src, out, shard_size=kw.pop("shard_size", 4), min_size=8, workers=workers, **kw)


def _skips(m: dict) -> dict[str, str]:
    return {Path(s["path"]).name: s["reason"] for s in m["skipped"]}


def _good(root: Path, n: int = 3) -> None:
    for i in range(n):
        _save(_photo("chelsea").resize((40, 30)), root / f"good{i}.png", "PNG")


def _block_device() -> str | None:
    with os.scandir("/dev") as it:
        for e in it:
            try:
                if stat.S_ISBLK(e.stat(follow_symlinks=False).st_mode):
                    return e.path
            except OSError:
                continue
    return None


@pytest.mark.parametrize("workers", [1, 2])
def test_only_regular_files_are_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int) -> None:
    root = tmp_path / "flat"
    _good(root)
    os.mkfifo(root / "fifo.png")
    os.mkfifo(tmp_path / "elsewhere.fifo")
    (root / "to_fifo.jpg").symlink_to(tmp_path / "elsewhere.fifo")
    (root / "zero.jpg").symlink_to("/dev/zero")  # read to the end, it grows memory without bound
    (root / "to_folder.png").symlink_to(tmp_path)
    monkeypatch.chdir(root)  # a socket's path must be short: bind it by its relative name
    sock = socket.socket(socket.AF_UNIX)
    sock.bind("sock.png")
    expected = {"fifo.png": "a FIFO", "to_fifo.jpg": "a symlink to a FIFO", "sock.png": "a socket",
                "zero.jpg": "a symlink to a character device", "to_folder.png": "a symlink to a folder"}
    if (dev := _block_device()) is not None:
        (root / "disk.png").symlink_to(dev)
        expected["disk.png"] = "a symlink to a block device"
    opened: list[str] = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: opened.append(str(p)) or real_open(p, *a, **k))
    try:
        m = _shard(root, tmp_path / "out", workers=workers)
    finally:
        sock.close()
    skipped = _skips(m)
    assert set(skipped) == set(expected)
    for name, kind in expected.items():
        assert skipped[name].startswith(f"not a regular file: {kind}"), (name, skipped[name])
    assert m["splits"]["train"]["written"] == 3
    if workers == 1:  # the forked worker's opens are not seen here
        assert not {Path(p).name for p in opened} & set(expected), opened


def test_reader_refuses_special_files_swapped_in_after_listing(tmp_path: Path) -> None:
    """The listing saw a regular file; by the time it is read it is a FIFO or a device."""
    os.mkfifo(tmp_path / "fifo")
    for path in (str(tmp_path / "fifo"), "/dev/zero"):
        with pytest.raises(images.Refused, match="not a regular file"):
            images.read_file(path)  # size unknown: fstat checks the type
    # With a listed size the type is not checked again, but nothing blocks or grows unbounded:
    # the open is non-blocking, and reading stops past max_bytes.
    assert images.read_file(str(tmp_path / "fifo"), size=100) == b""  # no writer: end of file
    with pytest.raises(images.Refused, match="too large"):
        images.read_file("/dev/zero", size=100, max_bytes=5000)
    item = sources.Item("k", None, "/dev/zero", size=100)
    res = images.prepare(item, 8, max_bytes=5000)
    assert isinstance(res, images.Skip) and "too large" in res.reason


def test_hidden_folders_are_not_walked(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    _good(flat)
    for hidden in (".git/objects/ab/cd.png", ".dvc/cache/x.jpg", "sub/.thumbs/y.png", ".hidden.png"):
        _save(_photo("coffee").resize((40, 30)), flat / hidden, "PNG")
    m = _shard(flat, tmp_path / "out")
    assert m["splits"]["train"]["written"] == 3 and m["skipped"] == []
    # ImageNet layout: a hidden folder in train/ is neither a class nor walked.
    imnet = tmp_path / "imagenet"
    _good(imnet / "train" / "cats")
    _save(_photo("coffee").resize((40, 30)), imnet / "train" / ".git" / "z.png", "PNG")
    m = _shard(imnet, tmp_path / "out2")
    assert m["classes"] == ["cats"] and m["splits"]["train"]["written"] == 3 and m["skipped"] == []


def _png_bytes(w: int, h: int, ctype: int = 2, idat: bytes = b"") -> bytes:
    """A PNG file with the given header and IDAT payload (checksums right, pixels not)."""
    def chunk(cid: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + cid + body + struct.pack(">I", zlib.crc32(cid + body))

    head = chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, ctype, 0, 0, 0))
    palette = chunk(b"PLTE", bytes(range(48))) if ctype == 3 else b""
    pixels = chunk(b"IDAT", idat or zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + head + palette + pixels + chunk(b"IEND", b"")


def test_file_size_and_pixel_caps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "flat"
    _good(root)
    (root / "big_rgb.png").write_bytes(_png_bytes(8000, 6000))  # 48 MP: over the 40 MP default
    (root / "big_palette.png").write_bytes(_png_bytes(8000, 6000, ctype=3))  # PIL's path
    _save(_photo("astronaut"), root / "large_file.jpg", "JPEG", quality=95)
    big = (root / "large_file.jpg").stat().st_size
    # Over the pixel cap means skipped from the header: a decode would fail on these pixel-less files.
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded an image over the cap"))
    monkeypatch.setattr(Image.Image, "verify", lambda self: None)
    m = _shard(root, tmp_path / "out", max_file_bytes=big - 1)
    skipped = _skips(m)
    assert skipped["big_rgb.png"] == "too many pixels: 8000x6000 = 48000000 (shard.max_pixels is 40000000)"
    assert skipped["big_palette.png"].startswith("too many pixels: 8000x6000")
    assert skipped["large_file.jpg"] == f"file too large: {big} bytes (shard.max_file_bytes is {big - 1})"
    assert m["limits"] == {"min_size": 8, "max_file_bytes": big - 1, "max_pixels": 40_000_000}
    monkeypatch.undo()
    m = _shard(root, tmp_path / "out", max_pixels=5000)  # a real photo over a small cap, fast path
    assert _skips(m)["large_file.jpg"] == "too many pixels: 512x512 = 262144 (shard.max_pixels is 5000)"
    with pytest.raises(PipelineError, match="shard.max_pixels must be positive"):
        _shard(root, tmp_path / "out", max_pixels=0)


@pytest.mark.parametrize("max_pixels", [40_000_000, 10**10])
def test_decompression_bombs_are_refused(tmp_path: Path, max_pixels: int) -> None:
    """Above PIL's bomb limit the bomb rule decides, whatever shard.max_pixels says."""
    root = tmp_path / "flat"
    _good(root)
    (root / "bomb.png").write_bytes(_png_bytes(20000, 20000))  # 400 MP: 2x PIL's limit
    (root / "bomb_warn.png").write_bytes(_png_bytes(15000, 15000, ctype=3))  # 225 MP: 1.1x
    skipped = _skips(_shard(root, tmp_path / "out", max_pixels=max_pixels))
    assert set(skipped) == {"bomb.png", "bomb_warn.png"}
    assert all(r.startswith("decompression bomb refused") for r in skipped.values()), skipped


def test_growing_file_is_read_to_the_cap_only(tmp_path: Path) -> None:
    f = tmp_path / "f.jpg"
    f.write_bytes(b"a" * 10_000)
    item = sources.Item("f", None, str(f), size=100)  # listed when it was small
    with pytest.raises(images.Refused, match="over 5000 bytes"):
        images.read_file(item.path, item.size, max_bytes=5000)
    assert images.read_file(item.path, item.size, max_bytes=10_000) == b"a" * 10_000


def test_names_that_are_not_utf8_are_recorded(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    _good(root)
    broot = os.fsencode(root)
    good = (root / "good0.png").read_bytes()
    with open(os.path.join(broot, b"bad\xff.png"), "wb") as f:
        f.write(good)
    os.mkdir(os.path.join(broot, b"dir\xfe"))
    with open(os.path.join(broot, b"dir\xfe", b"inside.png"), "wb") as f:
        f.write(good)
    m = _shard(root, tmp_path / "out")
    skipped = _skips(m)
    assert skipped == {"bad\\xff.png": "file name is not valid UTF-8",
                       "dir\\xfe": "folder name is not valid UTF-8 (not read)"}
    assert m["splits"]["train"]["written"] == 3
    text = (tmp_path / "out" / "manifest.json").read_bytes().decode("utf-8")  # strict UTF-8
    assert "\\udc" not in text and json.loads(text)["skipped"] == m["skipped"]


def _oriented(path: Path, img: Image.Image, orientation: int, fmt: str) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(img, path, fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    astro = _photo("astronaut")
    wide = astro.crop((0, 0, 512, 384))  # not square, so a missed turn changes the size
    _oriented(root / "turned.jpg", wide, 6, "JPEG")
    _oriented(root / "upright.jpg", wide, 1, "JPEG")
    _oriented(root / "flipped.png", wide, 3, "PNG")  # a PNG's eXIf chunk
    m = _shard(root, tmp_path / "out")
    got = _samples(tmp_path / "out", "train")
    converted = {c["key"]: c["reason"] for c in m["converted"]}
    assert converted == {"turned": "EXIF orientation 6 applied, re-encoded as PNG",
                         "flipped": "EXIF orientation 3 applied, re-encoded as PNG"}
    assert got["upright"]["jpg"] == (root / "upright.jpg").read_bytes()  # kept byte for byte
    # Orientation 6: the camera was turned; the upright picture is the stored one turned clockwise.
    turned = np.asarray(Image.open(io.BytesIO(got["turned"]["png"])), dtype=float)
    want = np.rot90(np.asarray(Image.open(root / "turned.jpg"), dtype=float), k=-1)
    assert turned.shape == (512, 384, 3) and np.abs(turned - want).mean() < 0.5
    assert np.abs(turned - np.rot90(np.asarray(wide, dtype=float), k=-1)).mean() < 4  # JPEG tolerance
    flipped = np.asarray(Image.open(io.BytesIO(got["flipped"]["png"])))
    assert np.array_equal(flipped, np.asarray(wide)[::-1, ::-1])  # lossless: exact
    # The loader's decode (no EXIF handling) sees the upright pixels.
    assert images.decode(got["turned"]["png"], 3).size == (384, 512)
    assert np.array_equal(np.asarray(ImageOps.exif_transpose(Image.open(root / "turned.jpg"))), turned)


def test_empty_folder_setting_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _good(tmp_path)  # the working folder has images: an empty setting must not shard them
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(tiny_params(shard={"source": "folder", "folder": ""}))
    with pytest.raises(PipelineError, match="shard.folder is empty"):
        shard_stage.run(config.load("params.yaml"))
    with pytest.raises(PipelineError, match="shard.folder is empty"):
        sources.image_folder("")
    assert not (tmp_path / "data").exists()


_KILLED_RUN = """
import os, signal, sys
from rcg.data import shards, sources
shards.TarShard.finish = lambda self: os.kill(os.getpid(), signal.SIGKILL)  # killed mid-shard
shards.write_shards(sources.image_folder(sys.argv[1]), sys.argv[2], 4, 8, 1)
"""


def test_killed_run_leaves_temp_files_that_the_next_run_removes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root, out = tmp_path / "flat", tmp_path / "out"
    _good(root, 6)
    proc = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(root), str(out)],
                          cwd=Path(__file__).parents[1], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (left,) = (out / "train").iterdir()
    assert left.name == f".train-000000.tar.{left.name.split('.')[3]}.rcg-shard.tmp"
    legacy = out / "train" / ".train-000001.tar.k3j_x9a2.tmp"  # rcg.io.atomic_path's, earlier versions
    legacy.write_bytes(b"partial")
    manifest_tmp = out / ".manifest.json.ab12cd34.tmp"
    manifest_tmp.write_text("{")
    foreign = [out / "train" / ".train-000000.tar.mine.tmp", out / "train" / "notes.tmp"]
    for f in foreign:
        f.write_text("not the stage's")
    with caplog.at_level(logging.INFO):
        m = _shard(root, out)
    assert m["splits"]["train"]["shards"] == ["train-000000.tar", "train-000001.tar"]
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(
        [".train-000000.tar.mine.tmp", "notes.tmp", "train-000000.tar", "train-000001.tar"])
    assert not manifest_tmp.exists() and not left.exists() and not legacy.exists()
    removed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("removed")]
    assert len(removed) == 3 and all("interrupted run" in r for r in removed)
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert all(f"{f}: not written by the shard stage; left alone" in warned for f in foreign)


def test_foreign_files_in_the_output_folder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root, out = tmp_path / "flat", tmp_path / "out"
    _good(root, 6)
    _shard(root, out, val_fraction=0.5, val_min_count=0)  # an earlier run with a val split
    assert (out / "val" / "val-000000.tar").exists()
    stale = out / "train" / "train-000042.tar"
    stale.write_bytes(b"an earlier run's shard")
    (out / "train" / "README.md").write_text("mine")
    (out / "notes.txt").write_text("mine")
    (out / "other").mkdir()
    with caplog.at_level(logging.INFO):
        m = _shard(root, out)  # no val split this time
    assert "val" not in m["splits"] and not list((out / "val").glob("*.tar"))
    assert not stale.exists()
    assert (out / "train" / "README.md").read_text() == "mine" and (out / "notes.txt").exists()
    messages = [r.getMessage() for r in caplog.records]
    assert f"removed {stale}: a shard of an earlier run" in messages
    assert f"removed {out / 'val' / 'val-000000.tar'}: a shard of an earlier run" in messages
    for f in (out / "train" / "README.md", out / "notes.txt", out / "other"):
        assert f"{f}: not written by the shard stage; left alone" in messages
    # A foreign file the loader would read as a shard: refused before anything is touched.
    (out / "train" / "train-backup.tar").write_bytes(b"x")
    before = sorted(p.name for p in (out / "train").iterdir())
    with pytest.raises(PipelineError, match=r"train-backup.tar: not a shard this stage wrote"):
        _shard(root, out)
    assert sorted(p.name for p in (out / "train").iterdir()) == before
    assert read_json(out / "manifest.json")["splits"]["train"]["written"] == 6
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(PipelineError, match="a_file: data.shards_dir is not a folder"):
        _shard(root, tmp_path / "a_file")


def test_unreadable_folder_is_a_recorded_skip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A subfolder that cannot be listed (permissions; root reads anything, so it is simulated)."""
    root = tmp_path / "flat"
    _good(root)
    _good(root / "locked")
    real_scandir = os.scandir

    def scandir(path):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    m = _shard(root, tmp_path / "out")
    assert _skips(m) == {"locked": "unreadable folder: Permission denied"}
    assert m["splits"]["train"]["written"] == 3
    with pytest.raises(PipelineError, match="locked: cannot read folder"):
        sources.image_folder(root / "locked")
