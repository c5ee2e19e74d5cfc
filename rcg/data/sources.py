"""Image sources the shard stage reads: Fashion-MNIST idx files, and image folders.

A source yields `Item`s in a fixed order (so shards are byte-identical across runs). Reading and
checking the bytes happens later, in parallel workers (`rcg.data.images.prepare`).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rcg.io import PipelineError

# Fashion-MNIST's class names, in label order (Xiao, Rasul & Vollgraf 2017).
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
SPLITS = ("train", "val")  # the splits a source may have: the shard stage writes no other folder
# Hash hold-out: at most this share of a folder's images goes to val, however large val_min_count
# is, so a small folder keeps most of its images for training.
MAX_VAL_SHARE = 0.25


@dataclass(frozen=True)
class Item:
    """One sample to shard: a file on disk (`path`) or raw 8-bit pixels (`pixels`)."""

    key: str  # stable WebDataset key, unique within its split
    label: int | None
    path: str | None = None
    pixels: np.ndarray | None = None  # uint8 [H, W] (grayscale), for idx sources
    skip: str | None = None  # reason the source already knows this file cannot be used
    # Size seen when listing a regular file (-1: unknown, the reader fstats and checks the file
    # type itself). Saves the reader an fstat per file.
    size: int = -1


@dataclass
class Source:
    """What a source found: items per split, class names, and a fingerprint of the input."""

    splits: dict[str, list[Item]]
    classes: list[str]
    fingerprint: str
    description: str
    val_split: dict[str, Any] = field(default_factory=lambda: {"method": "none"})  # how val was made


def _read_idx(path: Path) -> np.ndarray:
    """Read an idx file (LeCun's MNIST format: big-endian header, then uint8 data)."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as e:
        raise PipelineError(f"{path}: cannot read idx file ({e})") from None
    if len(raw) < 4:
        raise PipelineError(f"{path}: not an idx file (too short)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise PipelineError(f"{path}: not a uint8 idx file (magic {raw[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise PipelineError(f"{path}: truncated idx file ({data.size} of {int(np.prod(dims))} bytes)")
    return data.reshape(dims)


def fashion_mnist(directory: str | Path, max_per_split: int = 0) -> Source:
    """Fashion-MNIST from the Debian `dataset-fashion-mnist` idx files: train -> train, test -> val."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PipelineError(
            f"{directory}: Fashion-MNIST not found (install Debian's dataset-fashion-mnist, "
            "or set shard.fashion_mnist_dir)"
        )
    splits: dict[str, list[Item]] = {}
    h = hashlib.sha256()
    for split, (img_name, lbl_name) in FASHION_MNIST_FILES.items():
        img_path, lbl_path = directory / img_name, directory / lbl_name
        for p in (img_path, lbl_path):
            if not p.exists():
                raise PipelineError(f"{p}: missing Fashion-MNIST file")
            h.update(p.name.encode() + p.read_bytes())
        images, labels = _read_idx(img_path), _read_idx(lbl_path)
        if len(images) != len(labels):
            raise PipelineError(f"{img_path}: {len(images)} images but {len(labels)} labels")
        n = len(images) if max_per_split <= 0 else min(max_per_split, len(images))
        splits[split] = [
            Item(key=f"{split}_{i:06d}", label=int(labels[i]), pixels=images[i]) for i in range(n)
        ]
    return Source(splits, list(FASHION_MNIST_CLASSES), h.hexdigest()[:16], f"fashion-mnist:{directory}",
                  {"method": "source", "detail": "the Fashion-MNIST test set"})


def _key_for(rel: tuple[str, ...]) -> str:
    """WebDataset key of a file at relative path `rel` (its parts): the path without the last suffix.

    WebDataset splits a file name at its first dot into key and extension, so keys carry no dots.
    """
    name = rel[-1]
    dot = name.rfind(".")
    if 0 < dot < len(name) - 1:  # the suffix rule of pathlib (".x" and "x." have no suffix)
        name = name[:dot]
    return "/".join((*rel[:-1], name)).replace(".", "_")


# A listed file: its path relative to the listed folder (as parts), its path, its (size, mtime_ns)
# (None when it cannot be stat'ed), and the reason it cannot be used when listing already knows.
Listed = tuple[tuple[str, ...], str, tuple[int, int] | None, str | None]

_KINDS = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
          stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}


def not_regular(mode: int, via_symlink: bool = False) -> str:
    """The skip reason of a file of `mode` (from stat) that is not a regular file."""
    kind = _KINDS.get(stat.S_IFMT(mode), "an unknown kind of file")
    return f"not a regular file: {'a symlink to ' if via_symlink else ''}{kind} (only regular files are read)"


def shown(name: str) -> str:
    """`name` as valid UTF-8 text: bytes that are not UTF-8 (surrogate-escaped by os) as \\xNN."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _is_utf8(name: str) -> bool:
    if name.isascii():  # almost every name: no encoding needed to tell
        return True
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # os.scandir hands undecodable bytes over as lone surrogates
        return False
    return True


def _entry(parts: tuple[str, ...], e: os.DirEntry[str]) -> Listed:
    """One non-folder entry: stat'ed through a symlink, as reading would, and checked to be a
    regular file (a FIFO blocks a reader forever, /dev/zero never ends)."""
    if not _is_utf8(e.name):
        return (*parts, shown(e.name)), shown(e.path), None, "file name is not valid UTF-8"
    try:
        st = e.stat()  # follows a symlink to what it points at
    except OSError as err:
        return (*parts, e.name), e.path, None, f"unreadable: {err.strerror or err}"
    sig = (st.st_size, st.st_mtime_ns)
    if stat.S_ISREG(st.st_mode):
        return (*parts, e.name), e.path, sig, None
    return (*parts, e.name), e.path, sig, not_regular(st.st_mode, e.is_symlink())


def _list_images(root: Path) -> list[Listed]:
    """Every file under `root`, sorted by relative path parts, with its size and mtime.

    Non-image suffixes are kept so they get a recorded skip; files and folders whose names start
    with a dot (.git, .dvc, .DS_Store) are left out. Symlinks are kept even when dangling (a broken
    link is a recorded skip, not a silent miss) and are not followed into folders. Anything that is
    not a regular file (FIFO, socket, device, also behind a symlink) and any name that is not UTF-8
    is listed with its reason, never opened. os.scandir gives each entry's type without a stat
    call; the one stat per file (for the fingerprint and the file type) happens here.
    """
    found: list[Listed] = []
    stack: list[tuple[tuple[str, ...], str]] = [((), str(root))]
    while stack:
        parts, folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as err:
            if not parts:
                raise PipelineError(f"{folder}: cannot read folder ({err.strerror or err})") from None
            found.append((parts, folder, None, f"unreadable folder: {err.strerror or err}"))
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            if not e.is_dir(follow_symlinks=False):
                found.append(_entry(parts, e))
            elif _is_utf8(e.name):
                stack.append(((*parts, e.name), e.path))
            else:
                rel = (*parts, shown(e.name))
                found.append((rel, shown(e.path), None, "folder name is not valid UTF-8 (not read)"))
    found.sort()
    return found


def _fingerprint_files(files: list[Listed]) -> str:
    """Relative names, sizes and mtimes: cheap, and changes whenever the collection changes."""
    h = hashlib.sha256()
    for rel, _, sig, _ in files:
        stat_ = f"{sig[0]}\0{sig[1]}" if sig is not None else "unreadable"
        h.update(f"{'/'.join(rel)}\0{stat_}\n".encode())
    return h.hexdigest()[:16]


def val_count(n: int, fraction: float, min_count: int) -> int:
    """How many of `n` candidates a hash hold-out puts in val: `fraction` of them, raised to
    `min_count` while that stays within MAX_VAL_SHARE of `n`; none when `fraction` is 0."""
    if fraction <= 0 or n <= 0:
        return 0
    return max(int(fraction * n + 0.5), min(min_count, int(n * MAX_VAL_SHARE)))


def hold_out(keys: list[str], count: int) -> set[str]:
    """The `count` keys with the smallest sha256: deterministic, exact in number, and stable when
    files are added or removed (a key's hash never changes; only the cut-off moves)."""
    ranked = sorted((hashlib.sha256(k.encode()).digest(), k) for k in keys)
    return {k for _, k in ranked[:count]}


def _candidate(item: Item) -> bool:
    assert item.path is not None
    return item.skip is None and os.path.splitext(item.path)[1].lower() in IMAGE_SUFFIXES


def _hold_out_val(
    splits: dict[str, list[Item]], fraction: float, min_count: int
) -> tuple[dict[str, list[Item]], dict[str, Any]]:
    """Move `val_count` of train's items to val by key hash, when there is no val/ folder yet.

    Only usable-looking items (an image suffix, no skip known yet) are candidates, so that the
    count is about what val will hold; the others stay in train. Returns the splits and how val
    was made (for the manifest).
    """
    if splits["val"]:
        return splits, {"method": "folder"}
    if fraction <= 0:
        return splits, {"method": "none"}
    candidates = [it.key for it in splits["train"] if _candidate(it)]
    k = val_count(len(candidates), fraction, min_count)
    held = hold_out(candidates, k)
    split_of = {True: splits["val"], False: []}
    for it in splits["train"]:
        split_of[it.key in held and _candidate(it)].append(it)
    how = {"method": "hash", "fraction": fraction, "min_count": min_count, "count": k,
           "candidates": len(candidates)}
    return {"train": split_of[False], "val": split_of[True]}, how


def _imagenet_items(root: Path) -> tuple[dict[str, list[Item]], list[str], list[Listed]]:
    """ImageNet layout: `train/<class>/*` and optional `val/<class>/*`; labels from train's folder
    names."""
    classes = sorted(d.name for d in (root / "train").iterdir()
                     if d.is_dir() and not d.name.startswith(".") and _is_utf8(d.name))
    if not classes:
        raise PipelineError(f"{root / 'train'}: no class folders (expected train/<class>/*)")
    index = {c: i for i, c in enumerate(classes)}
    splits: dict[str, list[Item]] = {s: [] for s in SPLITS}
    files: list[Listed] = []
    for split in SPLITS:
        if not (root / split).is_dir():
            continue
        seen: set[str] = set()
        for rel, path, sig, skip in _list_images(root / split):
            files.append(((split, *rel), path, sig, skip))
            key = _key_for(rel)
            label = index.get(rel[0]) if len(rel) > 1 else None
            if skip is None and label is None:
                skip = "not inside a class folder of train/ (expected <split>/<class>/<image>)"
            elif skip is None and key in seen:
                skip = "duplicate key (same name, other extension)"
            seen.add(key)
            splits[split].append(Item(key, label, path, None, skip, sig[0] if sig and not skip else -1))
    return splits, classes, files


def _flat_items(root: Path) -> tuple[dict[str, list[Item]], list[Listed]]:
    """A flat collection: every file under `root`, recursively, unlabelled, all in train so far."""
    items: list[Item] = []
    files = _list_images(root)
    keys: set[str] = set()
    for rel, path, sig, skip in files:
        key = _key_for(rel)
        if skip is None and key in keys:
            skip = "duplicate key (same name, other extension)"
        keys.add(key)
        items.append(Item(key, None, path, None, skip, sig[0] if sig and not skip else -1))
    return {"train": items, "val": []}, files


def image_folder(
    root: str | Path, val_fraction: float = 0.0, max_per_split: int = 0, val_min_count: int = 0
) -> Source:
    """An image folder: ImageNet layout (`train/<class>/*`, optional `val/<class>/*`) or flat.

    A folder with a `train/` subfolder is read as ImageNet layout with class labels taken from the
    folder names of `train/`; anything else is a flat, unlabelled collection (all files, recursively).
    Without a `val/` folder, `val_count(...)` of the usable-looking files are held out for val by
    key hash (`hold_out`); `val_fraction` 0 means no val split.
    """
    if not str(root).strip():  # Path("") is ".": an empty setting would shard the working folder
        raise PipelineError("shard.folder is empty: set it to the image folder to shard")
    if not 0 <= val_fraction <= 0.5:
        raise PipelineError(
            f"shard.val_fraction must be in [0, 0.5] (train keeps most images), got {val_fraction}"
        )
    if val_min_count < 0:
        raise PipelineError(f"shard.val_min_count must not be negative, got {val_min_count}")
    root = Path(root)
    if not root.exists():
        raise PipelineError(f"{root}: image folder not found (set shard.folder)")
    if not root.is_dir():
        raise PipelineError(f"{root}: not a folder")
    if (root / "train").is_dir():
        splits, classes, files = _imagenet_items(root)
    else:
        (splits, files), classes = _flat_items(root), []
    if not files:
        raise PipelineError(f"{root}: no files found (empty folder)")
    splits, how = _hold_out_val(splits, val_fraction, val_min_count)
    if max_per_split > 0:
        splits = {s: its[:max_per_split] for s, its in splits.items()}
    splits = {s: its for s, its in splits.items() if its}
    return Source(splits, classes, _fingerprint_files(files), f"folder:{root}", how)
