"""Image sources the shard stage reads: Fashion-MNIST idx files, and image folders.

A source yields `Item`s in a fixed order (so shards are byte-identical across runs). Reading and
checking the bytes happens later, in parallel workers (`rcg.data.images.prepare`).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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


@dataclass(frozen=True)
class Item:
    """One sample to shard: a file on disk (`path`) or raw 8-bit pixels (`pixels`)."""

    key: str  # stable WebDataset key, unique within its split
    label: int | None
    path: str | None = None
    pixels: np.ndarray | None = None  # uint8 [H, W] (grayscale), for idx sources
    skip: str | None = None  # reason the source already knows this file cannot be used
    size: int = -1  # file size seen when listing (-1: unknown); saves the reader an fstat


@dataclass
class Source:
    """What a source found: items per split, class names, and a fingerprint of the input."""

    splits: dict[str, list[Item]]
    classes: list[str]
    fingerprint: str
    description: str


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
    return Source(splits, list(FASHION_MNIST_CLASSES), h.hexdigest()[:16], f"fashion-mnist:{directory}")


def _key_for(rel: tuple[str, ...]) -> str:
    """WebDataset key of a file at relative path `rel` (its parts): the path without the last suffix.

    WebDataset splits a file name at its first dot into key and extension, so keys carry no dots.
    """
    name = rel[-1]
    dot = name.rfind(".")
    if 0 < dot < len(name) - 1:  # the suffix rule of pathlib (".x" and "x." have no suffix)
        name = name[:dot]
    return "/".join((*rel[:-1], name)).replace(".", "_")


# A listed file: its path relative to the listed folder (as parts), its path, and its (size,
# mtime_ns), None when it cannot be stat'ed.
Listed = tuple[tuple[str, ...], str, tuple[int, int] | None]


def _list_images(root: Path) -> list[Listed]:
    """Every file under `root`, sorted by relative path parts, with its size and mtime.

    Non-image suffixes are kept so they get a recorded skip; names starting with a dot are left out.
    Symlinks are kept even when dangling (a broken link is a recorded skip, not a silent miss) and
    are not followed into directories. os.scandir gives each entry's type without a stat call; the
    one stat per file (for the fingerprint) happens here, in the same pass.
    """
    found: list[Listed] = []
    stack: list[tuple[tuple[str, ...], str]] = [((), str(root))]
    while stack:
        parts, folder = stack.pop()
        with os.scandir(folder) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    stack.append(((*parts, e.name), e.path))
                elif not e.name.startswith(".") and (e.is_symlink() or e.is_file(follow_symlinks=False)):
                    try:
                        st = e.stat()  # follows a symlink to what it points at, as reading does
                        sig: tuple[int, int] | None = (st.st_size, st.st_mtime_ns)
                    except OSError:
                        sig = None
                    found.append(((*parts, e.name), e.path, sig))
    found.sort()
    return found


def _fingerprint_files(files: list[Listed]) -> str:
    """Relative names, sizes and mtimes: cheap, and changes whenever the collection changes."""
    h = hashlib.sha256()
    for rel, _, sig in files:
        stat = f"{sig[0]}\0{sig[1]}" if sig is not None else "unreadable"
        h.update(f"{'/'.join(rel)}\0{stat}\n".encode())
    return h.hexdigest()[:16]


def _split_of(key: str, val_fraction: float) -> str:
    """Deterministic held-out assignment by key hash (stable when files are added or removed)."""
    if val_fraction <= 0:
        return "train"
    u = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if u < val_fraction else "train"


def image_folder(root: str | Path, val_fraction: float = 0.0, max_per_split: int = 0) -> Source:
    """An image folder: ImageNet layout (`train/<class>/*`, optional `val/<class>/*`) or flat.

    A folder with a `train/` subfolder is read as ImageNet layout with class labels taken from the
    folder names of `train/`; anything else is a flat, unlabelled collection (all files, recursively).
    """
    root = Path(root)
    if not str(root) or not root.exists():
        raise PipelineError(f"{root}: image folder not found (set shard.folder)")
    if not root.is_dir():
        raise PipelineError(f"{root}: not a folder")
    splits: dict[str, list[Item]] = {"train": [], "val": []}
    all_files: list[Listed] = []
    if (root / "train").is_dir():
        classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
        if not classes:
            raise PipelineError(f"{root / 'train'}: no class folders (expected train/<class>/*)")
        index = {c: i for i, c in enumerate(classes)}
        has_val = (root / "val").is_dir()
        seen: set[tuple[str, str]] = set()
        for split_dir in ("train", "val"):
            if not (root / split_dir).is_dir():
                continue
            for rel, path, sig in _list_images(root / split_dir):
                all_files.append(((split_dir, *rel), path, sig))
                cls = rel[0] if len(rel) > 1 else None
                key = _key_for(rel)
                split = split_dir if has_val else _split_of(key, val_fraction)
                label = index.get(cls) if cls is not None else None
                skip = None
                if label is None:
                    skip = "not inside a class folder of train/ (expected <split>/<class>/<image>)"
                elif (split, key) in seen:
                    skip = "duplicate key (same name, other extension)"
                seen.add((split, key))
                splits[split].append(Item(key, label, path, None, skip, sig[0] if sig else -1))
    else:
        classes = []
        keys: set[str] = set()
        for rel, path, sig in _list_images(root):
            all_files.append((rel, path, sig))
            key = _key_for(rel)
            skip = "duplicate key (same name, other extension)" if key in keys else None
            keys.add(key)
            splits[_split_of(key, val_fraction)].append(Item(key, None, path, None, skip, sig[0] if sig else -1))
    if not all_files:
        raise PipelineError(f"{root}: no files found (empty folder)")
    if max_per_split > 0:
        splits = {s: items[:max_per_split] for s, items in splits.items()}
    splits = {s: items for s, items in splits.items() if items}
    return Source(splits, classes, _fingerprint_files(all_files), f"folder:{root}")
