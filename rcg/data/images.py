"""Checking and normalising one image for a shard, and decoding it again for the models.

The shard stage keeps a file's original bytes when it is an ordinary 8-bit PNG or JPEG (no quality
loss, no work); anything else that is still a usable image (CMYK, palette, alpha, 16-bit, other
formats) is converted once, here, to an 8-bit PNG, so every later stage decodes only plain
L/RGB PNG or JPEG. Unusable files become a `Skip` with the reason, never an exception.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from rcg.data.sources import IMAGE_SUFFIXES, Item

# Modes whose bytes go into the shard untouched when the format is PNG or JPEG.
PLAIN_MODES = {"L", "RGB"}
KEEP_FORMATS = {"PNG": "png", "JPEG": "jpg"}
# Refuse decompression bombs rather than exhausting memory on a hostile or broken file.
Image.MAX_IMAGE_PIXELS = 200_000_000


@dataclass(frozen=True)
class Prepared:
    """A sample ready for the tar: key, label, extension (`png`/`jpg`) and encoded bytes."""

    key: str
    label: int | None
    ext: str
    data: bytes
    converted: str | None = None  # why the bytes were re-encoded, if they were


@dataclass(frozen=True)
class Skip:
    """A file that could not be used, and why (recorded in the manifest)."""

    path: str
    reason: str


def encode_png(img: Image.Image) -> bytes:
    """PNG bytes of `img`; fixed settings so the same pixels always give the same bytes."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()


def _to_8bit(img: Image.Image) -> tuple[Image.Image, str]:
    """Convert any PIL mode to L or RGB, compositing alpha over white and scaling 16-bit to 8-bit."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr), f"{mode} scaled to 8-bit"
    if mode == "F":
        arr = np.asarray(img)
        lo, hi = float(arr.min()), float(arr.max())
        arr = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo)
        return Image.fromarray((arr * 255).round().astype(np.uint8)), "float image scaled"
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        if img.mode == "RGB":
            return img, "palette expanded to RGB"
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        out = Image.alpha_composite(white, rgba)
        return (out.convert("L") if mode in ("LA", "La") else out.convert("RGB")), "alpha composited over white"
    if mode == "1":
        return img.convert("L"), "1-bit expanded to 8-bit"
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return img.convert("RGB"), f"{mode} converted to RGB"
    return img.convert("RGB"), f"{mode} converted to RGB"


def _structure_ok(fmt: str, img: Image.Image, data: bytes) -> str | None:
    """Check a PNG/JPEG's structure without decoding pixels; the problem found, or None.

    JPEG: the file must end with the EOI marker (a cut-off download does not). PNG: PIL's verify()
    walks every chunk and checks its CRC, up to IEND. This catches truncation and corruption of the
    container at a small fraction of a full decode's cost (shard.verify: decode does both).
    """
    if fmt == "JPEG":
        if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
            return "truncated JPEG (no end-of-image marker)"
        return None
    try:
        img.verify()
    except Exception as e:  # PIL raises SyntaxError, OSError, struct.error... for broken chunks
        return f"corrupt PNG: {e}"
    return None


def prepare(item: Item, min_size: int, verify: str = "structure") -> Prepared | Skip:
    """Check one item and return its shard bytes, or the reason it is skipped.

    `verify="structure"` checks plain PNG/JPEG files structurally (header, end marker, chunk
    CRCs); `"decode"` decodes every pixel as well. Files that need conversion are always decoded.
    """
    if item.pixels is not None:
        img = Image.fromarray(np.ascontiguousarray(item.pixels, dtype=np.uint8))
        return Prepared(item.key, item.label, "png", encode_png(img))
    assert item.path is not None
    path = Path(item.path)
    if item.skip:
        return Skip(item.path, item.skip)
    try:
        data = path.read_bytes()
    except OSError as e:
        return Skip(item.path, f"unreadable: {e.strerror or e}")
    if not data:
        return Skip(item.path, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format
            keep = fmt in KEEP_FORMATS and img.mode in PLAIN_MODES
            if keep and verify == "structure":
                problem = _structure_ok(fmt, img, data)
                if problem:
                    return Skip(item.path, f"corrupt or truncated image: {problem}")
            else:
                img.load()  # full decode: catches truncated and corrupt data, not just a bad header
    except UnidentifiedImageError:
        why = "not an image" if path.suffix.lower() not in IMAGE_SUFFIXES else "corrupt image"
        return Skip(item.path, f"{why}: cannot identify image data")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return Skip(item.path, f"corrupt or truncated image: {e}")
    w, h = img.size
    if min(w, h) < min_size:
        return Skip(item.path, f"too small: {w}x{h} (shard.min_size is {min_size})")
    label = item.label
    if keep:
        return Prepared(item.key, label, KEEP_FORMATS[fmt], data)
    try:
        img8, why = _to_8bit(img)
        if fmt not in KEEP_FORMATS:
            why = f"{fmt} re-encoded as PNG" + (f" ({why})" if img.mode not in PLAIN_MODES else "")
        return Prepared(item.key, label, "png", encode_png(img8), converted=why)
    except (OSError, ValueError) as e:
        return Skip(item.path, f"cannot convert {img.mode} image: {e}")


def decode(data: bytes, channels: int) -> Image.Image:
    """Decode shard bytes to a PIL image with 1 (L) or 3 (RGB) channels."""
    img = Image.open(io.BytesIO(data))
    return img.convert("L" if channels == 1 else "RGB")


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL L/RGB -> float tensor [C, H, W] in [0, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def resize_crop(img: Image.Image, size: int, rng: np.random.Generator | None = None) -> Image.Image:
    """Resize the shorter side to `size` (bicubic), then crop a `size` square.

    Centre crop when `rng` is None (evaluation, encoding); a random crop along the longer side when
    given (training), as the reference's Resize -> RandomCrop (REFERENCE.md section 5).
    """
    w, h = img.size
    if (w, h) != (size, size):
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        w, h = nw, nh
    if (w, h) == (size, size):
        return img
    if rng is None:
        left, top = (w - size) // 2, (h - size) // 2
    else:
        left, top = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
    return img.crop((left, top, left + size, top + size))
