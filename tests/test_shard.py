"""The shard stage: every source, every kind of bad input, determinism and interrupted writes."""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image, PngImagePlugin
from skimage import data as skdata

from rcg import config
from rcg.data import images, shards, sources
from rcg.data.shards import write_shards
from rcg.io import PipelineError, read_json
from rcg.stages import shard as shard_stage
from tests.conftest import tiny_params


def _photo(name: str) -> Image.Image:
    """A real photograph bundled with scikit-image (astronaut, chelsea, coffee, rocket...)."""
    return Image.fromarray(getattr(skdata, name)())


def _save(img: Image.Image, path: Path, fmt: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **kw)
    return path


@pytest.fixture
def messy_imagenet(tmp_path: Path) -> Path:
    """ImageNet layout with good photos and every kind of bad input the stage must survive."""
    root = tmp_path / "imagenet"
    tr, va = root / "train", root / "val"
    astro, cat, coffee, rocket = (_photo(n) for n in ("astronaut", "chelsea", "coffee", "rocket"))
    # Good files: kept byte for byte.
    _save(astro, tr / "people" / "astronaut.jpg", "JPEG", quality=90)
    _save(cat, tr / "animals" / "chelsea.png", "PNG")
    _save(coffee.convert("L"), tr / "animals" / "coffee_gray.jpg", "JPEG")
    _save(rocket, va / "people" / "rocket.jpg", "JPEG")
    _save(cat, va / "animals" / "cat.JPEG", "JPEG")
    # Convertible files: usable, re-encoded once to 8-bit PNG.
    _save(astro.convert("CMYK"), tr / "people" / "cmyk.jpg", "JPEG")
    _save(cat.convert("P"), tr / "animals" / "palette.png", "PNG")
    pal = cat.convert("P")
    pal.info["transparency"] = 0
    _save(pal, tr / "animals" / "palette_transparent.png", "PNG", transparency=0)
    rgba = astro.convert("RGBA")
    rgba.putalpha(128)
    _save(rgba, tr / "people" / "alpha.png", "PNG")
    sixteen = Image.fromarray(np.asarray(coffee.convert("L"), dtype=np.uint16) * 257)
    _save(sixteen, tr / "animals" / "sixteen_bit.png", "PNG")
    _save(rocket, tr / "people" / "rocket.bmp", "BMP")
    _save(rocket, tr / "people" / "rocket_tiff.tif", "TIFF")
    # Unusable files: each becomes a recorded skip.
    (tr / "people" / "empty.jpg").write_bytes(b"")
    good = (tr / "people" / "astronaut.jpg").read_bytes()
    (tr / "people" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (tr / "animals" / "garbage.png").write_bytes(np.random.default_rng(0).bytes(5000))
    (tr / "animals" / "notes.txt").write_text("not an image")
    _save(astro.resize((4, 4)), tr / "people" / "tiny.png", "PNG")
    (tr / "people" / "dangling.jpg").symlink_to(tmp_path / "does-not-exist.jpg")
    (tr / "stray.jpg").write_bytes(good)  # outside any class folder
    return root


EXPECTED_SKIPS = {
    "empty.jpg": "empty file",
    "truncated.jpg": "corrupt or truncated",
    "garbage.png": "corrupt image",
    "notes.txt": "not an image",
    "tiny.png": "too small",
    "dangling.jpg": "unreadable",
    "stray.jpg": "not inside a class folder",
}


def _run_folder(root: Path, out: Path, **kw) -> dict:
    src = sources.image_folder(root, kw.pop("val_fraction", 0.0))
    return write_shards(src, out, shard_size=kw.pop("shard_size", 4), min_size=8, workers=kw.pop("workers", 1))


def _samples(out: Path, split: str) -> dict[str, dict]:
    got = {}
    for tar in sorted((out / split).glob("*.tar")):
        for s in wds.WebDataset(str(tar), shardshuffle=False):
            got[s["__key__"]] = s
    return got


def test_imagenet_layout_with_bad_inputs(messy_imagenet: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    m = _run_folder(messy_imagenet, out)
    assert m["classes"] == ["animals", "people"]
    skipped = {Path(s["path"]).name: s["reason"] for s in m["skipped"]}
    assert set(skipped) == set(EXPECTED_SKIPS)
    for name, reason in EXPECTED_SKIPS.items():
        assert reason in skipped[name], (name, skipped[name])
    assert m["splits"]["train"]["written"] == 10 and m["splits"]["val"]["written"] == 2
    assert m["splits"]["train"]["skipped"] == len(EXPECTED_SKIPS)
    train = _samples(out, "train")
    # Original bytes kept for plain PNG/JPEG; labels follow the class folders.
    assert train["people/astronaut"]["jpg"] == (messy_imagenet / "train/people/astronaut.jpg").read_bytes()
    assert train["animals/chelsea"]["png"] == (messy_imagenet / "train/animals/chelsea.png").read_bytes()
    assert int(train["people/astronaut"]["cls"]) == 1 and int(train["animals/chelsea"]["cls"]) == 0
    converted = {c["key"]: c["reason"] for c in m["converted"]}
    for key in ("people/cmyk", "animals/palette", "animals/palette_transparent", "people/alpha",
                "animals/sixteen_bit", "people/rocket", "people/rocket_tiff"):
        assert key in converted and "png" in train[key]
        img = Image.open(io.BytesIO(train[key]["png"]))
        assert img.mode in ("L", "RGB") and img.size[0] >= 8
    # 16-bit scaled, not clipped: the 8-bit values come back.
    sixteen = np.asarray(Image.open(io.BytesIO(train["animals/sixteen_bit"]["png"])))
    assert abs(int(sixteen.max()) - int(np.asarray(_photo("coffee").convert("L")).max())) <= 1
    # Semi-transparent pixels composited over white: brighter than the source.
    alpha = np.asarray(Image.open(io.BytesIO(train["people/alpha"]["png"])), dtype=float)
    assert alpha.mean() > np.asarray(_photo("astronaut"), dtype=float).mean()
    assert (out / "manifest.json").exists()


def test_flat_folder_is_unlabelled_with_held_out_split(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    for i, name in enumerate(["astronaut", "chelsea", "coffee", "rocket"] * 5):
        _save(_photo(name).resize((32, 32)), root / f"sub{i % 2}" / f"img{i:02d}.v1.png", "PNG")
    m = _run_folder(root, tmp_path / "shards", val_fraction=0.3)
    assert m["classes"] == [] and not m["labelled"]
    assert m["splits"]["train"]["written"] + m["splits"]["val"]["written"] == 20
    assert m["splits"]["val"]["written"] > 0
    train = _samples(tmp_path / "shards", "train")
    assert all("cls" not in s for s in train.values())
    assert all("." not in k for k in train)  # dots in names never leak into keys


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))


def test_fashion_mnist_idx_source(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    d = tmp_path / "fmnist"
    d.mkdir()
    for split, (img_name, lbl_name) in sources.FASHION_MNIST_FILES.items():
        n = 30 if split == "train" else 12
        _write_idx(d / img_name, rng.integers(0, 256, (n, 28, 28)))
        _write_idx(d / lbl_name, rng.integers(0, 10, (n,)))
    m = write_shards(sources.fashion_mnist(d), tmp_path / "out", shard_size=8, min_size=8, workers=1)
    assert m["splits"]["train"]["written"] == 30 and m["splits"]["val"]["written"] == 12
    assert m["splits"]["train"]["shards"] == [f"train-{i:06d}.tar" for i in range(4)]  # 8+8+8+6
    assert len(m["classes"]) == 10
    s = _samples(tmp_path / "out", "train")["train_000003"]
    got = np.asarray(Image.open(io.BytesIO(s["png"])))
    images = gzip.decompress((d / "train-images-idx3-ubyte.gz").read_bytes())[16:]
    assert np.array_equal(got, np.frombuffer(images, np.uint8).reshape(30, 28, 28)[3])
    # A truncated idx file is a clear error naming the file.
    raw = gzip.decompress((d / "train-images-idx3-ubyte.gz").read_bytes())
    (d / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(PipelineError, match="train-images-idx3-ubyte.gz: truncated"):
        sources.fashion_mnist(d)


def test_real_fashion_mnist_through_the_stage(tiny_workspace: Path) -> None:
    m = read_json(tiny_workspace / "data/shards/manifest.json")
    assert m["splits"]["train"]["written"] == 256 and m["splits"]["val"]["written"] == 256
    assert m["classes"][0] == "T-shirt/top" and m["skipped"] == []
    assert len(m["fingerprint"]) == 16


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_deterministic_and_parallel_equals_serial(messy_imagenet: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _run_folder(messy_imagenet, a, workers=1)
    _run_folder(messy_imagenet, b, workers=2)
    assert _digest(a) == _digest(b)
    _run_folder(messy_imagenet, a, workers=2)  # a rerun over existing output
    assert _digest(a) == _digest(b)


@pytest.mark.parametrize("workers", [1, 2])
def test_interrupted_and_failing_writes_leave_no_complete_looking_output(
    messy_imagenet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    out = tmp_path / "out"
    _run_folder(messy_imagenet, tmp_path / "clean")
    # The disk is full from the 7th train sample on. Keyed by sample, not by a count of writes: the
    # processes share the shards by timing, and with a per-process count a busy machine could let
    # each write <= 6 samples and never fail.
    full_from = sorted(_samples(tmp_path / "clean", "train"))[6]
    real_write = shards.TarShard.write_sample

    def failing_write(self, key, members):
        if key >= full_from:
            raise OSError(28, "No space left on device")
        return real_write(self, key, members)

    monkeypatch.setattr(shards.TarShard, "write_sample", failing_write)
    # With 2 workers whichever process reaches a later shard fails, the forked worker included.
    with pytest.raises(PipelineError, match="writing shards failed: .*No space left"):
        _run_folder(messy_imagenet, out, workers=workers)
    assert not (out / "manifest.json").exists()
    assert not list(out.rglob("*.tmp"))
    clean = _digest(tmp_path / "clean")
    for tar in out.rglob("*.tar"):  # whatever is left is a complete shard, never a partial one
        assert clean[str(tar.relative_to(out))] == hashlib.sha256(tar.read_bytes()).hexdigest()
    monkeypatch.setattr(shards.TarShard, "write_sample", real_write)
    _run_folder(messy_imagenet, out)  # the rerun gives the same result as a clean run
    assert _digest(out) == _digest(tmp_path / "clean")


def test_empty_and_missing_sources(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="no files found"):
        sources.image_folder(tmp_path / "empty")
    with pytest.raises(PipelineError, match="image folder not found"):
        sources.image_folder(tmp_path / "nope")
    with pytest.raises(PipelineError, match="Fashion-MNIST not found"):
        sources.fashion_mnist(tmp_path / "nope")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("x")
    with pytest.raises(PipelineError, match="no usable images"):
        write_shards(sources.image_folder(tmp_path / "junk"), tmp_path / "o", 4, 8, 1)


def test_stage_from_params(messy_imagenet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(
        tiny_params(shard={"source": "folder", "folder": str(messy_imagenet), "shard_size": 3})
    )
    shard_stage.run(config.load("params.yaml"))
    m = read_json(tmp_path / "data/shards/manifest.json")
    names = m["splits"]["train"]["shards"]
    assert names == sorted(names) and m["splits"]["train"]["written"] == 10
    for name in names:  # shard k holds the usable files among input items 3k .. 3k+2
        with tarfile.open(tmp_path / "data/shards/train" / name) as t:
            assert 1 <= len(t.getmembers()) // 2 <= 3


def test_tar_writer_writes_what_webdataset_tarwriter_writes(tmp_path: Path) -> None:
    """The hand-built tar headers are tarfile's bytes, for plain, long and non-ASCII names."""
    rng = np.random.default_rng(1)
    samples = [
        ("people/astronaut", {"jpg": rng.bytes(1000), "cls": b"1"}),
        ("x" * 96, {"png": rng.bytes(512)}),  # "x...x.png" is exactly 100 bytes: still ustar
        ("z" * 97, {"png": rng.bytes(5)}),  # 101 bytes: one too many for ustar
        ("y" * 120, {"png": b""}),  # far too long for ustar: tarfile's PAX header
        ("ünïcode/çødé", {"jpg": rng.bytes(513), "cls": b"12"}),  # non-ASCII: PAX header too
    ]
    buf = io.BytesIO()
    ref = wds.TarWriter(buf, user="rcg", group="rcg", mtime=0, encoder=False)
    for key, members in samples:
        ref.write({"__key__": key, **members})
    ref.close()
    tar = shards.TarShard(tmp_path / "t.tar")
    for key, members in samples:
        tar.write_sample(key, members)
    tar.finish()
    tar.close()
    assert (tmp_path / "t.tar").read_bytes() == buf.getvalue()
    got = {s["__key__"]: s for s in wds.WebDataset(str(tmp_path / "t.tar"), shardshuffle=False)}
    assert got["ünïcode/çødé"]["jpg"] == samples[4][1]["jpg"] and got["y" * 120]["png"] == b""
    listed = subprocess.run(["tar", "tf", str(tmp_path / "t.tar")], capture_output=True, text=True, check=True)
    assert listed.stdout.split("\n")[:3] == ["people/astronaut.cls", "people/astronaut.jpg", "x" * 96 + ".png"]


def _plain_and_tricky_files(root: Path) -> dict[str, Path]:
    """Files the byte-level checks accept, and look-alikes they must leave to PIL or reject."""
    astro, cat = _photo("astronaut").resize((96, 72)), _photo("chelsea").resize((80, 60))
    exif = Image.Exif()
    exif[0x010F] = "rcg camera"  # Make
    files = {
        "baseline.jpg": _save(astro, root / "baseline.jpg", "JPEG", quality=85),
        "progressive.jpg": _save(astro, root / "progressive.jpg", "JPEG", progressive=True),
        "gray.jpg": _save(cat.convert("L"), root / "gray.jpg", "JPEG"),
        "exif.jpg": _save(cat, root / "exif.jpg", "JPEG", exif=exif.tobytes()),  # an APP1 segment
        "cmyk.jpg": _save(astro.convert("CMYK"), root / "cmyk.jpg", "JPEG"),
        "rgb.png": _save(astro, root / "rgb.png", "PNG"),
        "gray_interlaced.png": _save(cat.convert("L"), root / "gray_interlaced.png", "PNG", interlace=1),
        "palette.png": _save(cat.convert("P"), root / "palette.png", "PNG"),
        "rgba.png": _save(astro.convert("RGBA"), root / "rgba.png", "PNG"),
        "sixteen.png": _save(Image.fromarray(np.full((20, 20), 40000, np.uint16)), root / "sixteen.png", "PNG"),
        "small.jpg": _save(astro.resize((6, 5)), root / "small.jpg", "JPEG"),
    }
    turned, upright = Image.Exif(), Image.Exif()
    turned[0x0112], upright[0x0112] = 6, 1  # Orientation
    files["exif_turned.jpg"] = _save(astro, root / "exif_turned.jpg", "JPEG", exif=turned)
    files["exif_upright.jpg"] = _save(astro, root / "exif_upright.jpg", "JPEG", exif=upright)
    files["exif_turned.png"] = _save(cat, root / "exif_turned.png", "PNG", exif=turned)
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description tiff:Orientation="8"/></x:xmpmeta>'
    files["xmp_turned.jpg"] = _save(astro, root / "xmp_turned.jpg", "JPEG", xmp=xmp)
    info = PngImagePlugin.PngInfo()
    info.add_text("XML:com.adobe.xmp", xmp.decode())
    files["xmp_turned.png"] = _save(cat, root / "xmp_turned.png", "PNG", pnginfo=info)
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "hello")
    files["text.png"] = _save(cat, root / "text.png", "PNG", pnginfo=info, dpi=(72, 72))
    files["trns.png"] = _save(cat.convert("L"), root / "trns.png", "PNG", transparency=7)
    jpg, png = files["baseline.jpg"].read_bytes(), files["rgb.png"].read_bytes()
    for name, data in {
        "cut.jpg": jpg[: len(jpg) * 2 // 3],  # header intact, end-of-image marker gone
        "padded.jpg": jpg + b"\x00" * 7,  # NUL padding after EOI is fine
        "cut_header.jpg": jpg[:40],
        "cut.png": png[: len(png) // 2],
        "no_iend.png": png[:-12],
        "bitflip.png": png[:60] + bytes([png[60] ^ 1]) + png[61:],  # inside IDAT: CRC mismatch
        # Segments PIL parses and rejects when short: a cut quantization table, a 5-byte Adobe APP14.
        "short_dqt.jpg": jpg[:2] + b"\xff\xdb\x00\x05\x00\x01\x02" + jpg[2:],
        "short_adobe.jpg": jpg[:2] + b"\xff\xee\x00\x07Adobe" + jpg[2:],
        "photoshop.jpg": jpg[:2] + b"\xff\xed\x00\x10Photoshop 3.0\x00" + jpg[2:],  # left to PIL
    }.items():
        (root / name).write_bytes(data)
        files[name] = root / name
    return files


def test_byte_level_checks_decide_as_pil_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`prepare` with the byte-level checks gives the same result as the PIL-only path, file by file,
    and really skips PIL for the plain JPEG/PNG files."""
    files = _plain_and_tricky_files(tmp_path)
    items = {n: sources.Item(key=n.replace(".", "_"), label=3, path=str(p)) for n, p in files.items()}
    opened: list[str] = []
    real_open = Image.open

    def counting_open(fp, *a, **kw):
        opened.append(current)
        return real_open(fp, *a, **kw)

    monkeypatch.setattr(Image, "open", counting_open)
    fast = {}
    for current, item in items.items():
        fast[current] = images.prepare(item, min_size=8)
    monkeypatch.setattr(Image, "open", real_open)
    monkeypatch.setattr(images, "_fast_prepare", lambda *a: None)
    pil = {n: images.prepare(item, min_size=8) for n, item in items.items()}
    for name in files:
        a, b = fast[name], pil[name]
        assert type(a) is type(b), (name, a, b)
        if isinstance(a, images.Prepared):
            assert a == b, name
        else:
            assert a.reason.split(":")[0] == b.reason.split(":")[0], (name, a.reason, b.reason)
    assert isinstance(fast["cut.jpg"], images.Skip) and "end-of-image" in fast["cut.jpg"].reason
    assert isinstance(fast["bitflip.png"], images.Skip) and "checksum" in fast["bitflip.png"].reason
    assert "too small" in fast["small.jpg"].reason
    plain = {"baseline.jpg", "progressive.jpg", "gray.jpg", "exif.jpg", "padded.jpg", "rgb.png",
             "gray_interlaced.png", "text.png", "trns.png", "cut.jpg", "bitflip.png", "small.jpg",
             "exif_upright.jpg"}
    assert not plain & set(opened), sorted(plain & set(opened))  # decided without PIL
    left_to_pil = {"cmyk.jpg", "palette.png", "rgba.png", "sixteen.png", "short_dqt.jpg",
                   "short_adobe.jpg", "photoshop.jpg", "exif_turned.jpg", "exif_turned.png",
                   "xmp_turned.jpg", "xmp_turned.png"}
    assert left_to_pil <= set(opened), sorted(left_to_pil - set(opened))
    assert isinstance(fast["short_dqt.jpg"], images.Skip) and isinstance(fast["photoshop.jpg"], images.Prepared)
    for name, turn in (("exif_turned.jpg", 6), ("exif_turned.png", 6), ("xmp_turned.jpg", 8), ("xmp_turned.png", 8)):
        assert fast[name].converted == f"EXIF orientation {turn} applied, re-encoded as PNG", name
    assert fast["exif_upright.jpg"].data == files["exif_upright.jpg"].read_bytes()


def test_shard_stage_does_not_import_torch() -> None:
    """torch makes every forked shard worker ~40 ms slower to start and stop, and the CLI 2 s slower."""
    code = "import sys, rcg.stages.shard; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1]).returncode == 0


def test_read_file_with_a_stale_listed_size(tmp_path: Path) -> None:
    """The size seen when listing only saves an fstat: a file changed since is still read whole."""
    f = tmp_path / "f.jpg"
    f.write_bytes(b"a" * 1000)
    (item,) = sources.image_folder(tmp_path).splits["train"]
    assert item.size == 1000 and images.read_file(item.path, item.size) == b"a" * 1000
    for now in (b"b" * 3000, b"c" * 10, b""):  # grown, shrunk, emptied after listing
        f.write_bytes(now)
        assert images.read_file(item.path, item.size) == now
        assert images.read_file(item.path) == now
