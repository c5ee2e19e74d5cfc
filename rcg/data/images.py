"""Checking and normalising one image for a shard, and decoding it again for the models.

The shard stage keeps a file's original bytes when it is an ordinary 8-bit PNG or JPEG (no quality
loss, no work); anything else that is still a usable image (CMYK, palette, alpha, 16-bit, other
formats) is converted once, here, to an 8-bit PNG, so every later stage decodes only plain
L/RGB PNG or JPEG. So is a photo whose EXIF orientation says it must be turned to be upright: the
stored pixels are upright, and no later stage needs to know about EXIF. Unusable files become a
`Skip` with the reason, never an exception; files over the size or pixel caps are skipped before
their pixels are decoded.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from rcg.data.sources import IMAGE_SUFFIXES, Item, not_regular

if TYPE_CHECKING:
    import torch

# Modes whose bytes go into the shard untouched when the format is PNG or JPEG.
PLAIN_MODES = {"L", "RGB"}
KEEP_FORMATS = {"PNG": "png", "JPEG": "jpg"}
# Refuse decompression bombs rather than exhausting memory on a hostile or broken file.
Image.MAX_IMAGE_PIXELS = 200_000_000
# Defaults of shard.max_file_bytes and shard.max_pixels (rcg.config.ShardConfig says why).
MAX_FILE_BYTES = 64 << 20
MAX_PIXELS = 40_000_000
ORIENTATION = 0x0112  # the EXIF (TIFF) tag that says how to turn the stored pixels upright
# TIFF byte order mark -> (header: magic + IFD offset, entry count, entry: type + count + SHORT
# value, the orientation tag's bytes), for the EXIF block's byte order.
_TIFF = {
    mark: (struct.Struct(e + "HI"), struct.Struct(e + "H"), struct.Struct(e + "HIH"),
           struct.pack(e + "H", ORIENTATION))
    for mark, e in ((b"II", "<"), (b"MM", ">"))
}
# Where a PNG can carry EXIF orientation for PIL: an eXIf chunk, ImageMagick's raw-profile text
# chunk, or XMP's tiff:Orientation in an iTXt/tEXt/zTXt chunk. Their names appear in the file
# uncompressed, so a PNG without any of them has no orientation and needs no decode to tell.
_PNG_EXIF_MARKS = (b"eXIf", b"Raw profile type exif", b"XML:com.adobe.xmp")


class Refused(Exception):
    """A file the reader will not read (not a regular file, too large); the message is the reason."""


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
        if not _jpeg_ends(data):
            return "truncated JPEG (no end-of-image marker)"
        return None
    try:
        img.verify()
    except Exception as e:  # PIL raises SyntaxError, OSError, struct.error... for broken chunks
        return f"corrupt PNG: {e}"
    return None


# --- Structure checks read from the bytes already in memory (no PIL) -------------------------------
# The common case, an ordinary 8-bit L/RGB JPEG or PNG, is checked here at a fraction of PIL's cost
# (Image.open builds a parser object, a file wrapper and per-segment handlers for every file). These
# checks only ever *accept*: anything they do not fully understand returns None and goes through the
# PIL path below, which decides exactly as before, so they can never skip a file PIL would keep.

# JPEG markers whose segments PIL's JPEG parser reads before the scan, and which we may pass over.
_JPEG_SKIPPABLE = {0xC4, 0xCC, 0xDB, 0xDD, 0xFE} | set(range(0xE0, 0xF0))
_JPEG_SOF_PLAIN = {0xC0, 0xC1, 0xC2}  # baseline, extended, progressive Huffman: what PIL decodes
_JPEG_MODES = {1: "L", 3: "RGB"}  # components -> PIL mode (PIL: 1 -> L, 3 -> RGB, 4 -> CMYK)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_MODES = {0: "L", 2: "RGB"}  # colour type -> PIL mode, at bit depth 8
# Ancillary chunks allowed before IDAT, with the least length PIL's handler needs (None: no handler,
# PIL ignores the chunk). Any other chunk (palette, iCCP, zTXt, APNG...) goes the PIL way.
_PNG_BEFORE_IDAT = {b"gAMA": 4, b"cHRM": 32, b"sRGB": 1, b"pHYs": 9, b"tEXt": 0, b"tIME": None,
                    b"bKGD": None, b"sBIT": None}
_PNG_AFTER_IDAT = {b"tEXt", b"tIME"}
_EXIF_TEXT_KEYS = (b"Raw profile type exif\0", b"XML:com.adobe.xmp\0")  # text chunks PIL's getexif reads


def _jpeg_header(data: bytes) -> tuple[str, int, int] | None:
    """Mode, width and height of a plain 8-bit L/RGB JPEG, walking its marker segments up to the scan.

    Every segment before the start-of-scan must be a complete segment of a kind PIL's parser reads
    (APPn, COM, DQT with whole tables, DHT, DRI, DAC); the frame header must be an 8-bit Huffman SOF
    with 1 or 3 components and a non-zero size. Anything else (fill bytes, other markers, APPn
    payloads PIL may reject, MPF) is left to PIL.
    """
    if data[:3] != b"\xff\xd8\xff":
        return None
    n, i, frame = len(data), 2, None
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        length = (data[i + 2] << 8) | data[i + 3]
        if length < 2 or i + 2 + length > n:
            return None
        if marker == 0xDA:  # start of scan: the header is complete
            return frame
        if marker in _JPEG_SOF_PLAIN:
            if length < 8 or frame is not None:
                return None
            precision, comps = data[i + 4], data[i + 9]
            h, w = (data[i + 5] << 8) | data[i + 6], (data[i + 7] << 8) | data[i + 8]
            if precision != 8 or comps not in _JPEG_MODES or not w or not h or length != 8 + 3 * comps:
                return None
            frame = (_JPEG_MODES[comps], w, h)
        elif marker == 0xDB:  # DQT: PIL rejects a table cut short, so must we
            j, end = i + 4, i + 2 + length
            while j < end:
                j += 65 if data[j] < 16 else 129  # table id byte + 64 entries of 1 or 2 bytes
            if j != end:
                return None
        elif marker not in _JPEG_SKIPPABLE or _app_left_to_pil(data, marker, i + 4, length - 2):
            return None
        i += 2 + length
    return None


def _app_left_to_pil(data: bytes, marker: int, at: int, size: int) -> bool:
    """Whether an APPn segment (payload of `size` bytes at `at`) is one PIL parses and may reject.

    PIL reads fields of JFIF (APP0), ICC (APP2) and Adobe (APP14) payloads without a length check,
    so short ones make Image.open fail; MPF (APP2) turns the file into an MPO; Photoshop (APP13)
    blocks are walked by a parser that can fail too. Those go through PIL, which decides.
    """
    if marker == 0xE0:
        return size < 7 and data.startswith(b"JFIF", at)
    if marker == 0xE2:
        return data.startswith(b"MPF\0", at) or (size < 14 and data.startswith(b"ICC_PROFILE\0", at))
    if marker == 0xED:
        return data.startswith(b"Photoshop 3.0\0", at)
    if marker == 0xEE:
        return size < 7 and data.startswith(b"Adobe", at)
    if marker == 0xE1:  # EXIF, or XMP (PIL reads its tiff:Orientation when EXIF has none)
        if data.startswith(b"Exif\0\0", at):
            return _exif_orientation(data, at + 6, at + size) != 1
        return data.find(b"tiff:Orientation", at, at + size) >= 0
    return False


def _exif_orientation(data: bytes, start: int, end: int) -> int | None:
    """The orientation in IFD0 of the TIFF structure at data[start:end] (an EXIF block): 1 when
    there is none, None when the block is not one this reader follows to the end (PIL decides)."""
    layout = _TIFF.get(data[start : start + 2])
    if layout is None or end - start < 8:
        return None
    head, short, entry, tag = layout
    magic, ifd = head.unpack_from(data, start + 2)
    first = start + ifd + 2  # the first 12-byte entry, after the entry count
    if magic != 42 or ifd < 8 or first > end:
        return None
    stop = first + 12 * short.unpack_from(data, first - 2)[0]
    if stop > end:
        return None
    found, j = None, first
    while (j := data.find(tag, j, stop)) >= 0:  # C-speed search; only entry starts count
        if (j - first) % 12 == 0:
            if found is not None:
                return None  # two orientation entries: leave it to PIL
            found = j
        j += 1
    if found is None:
        return 1
    typ, n, value = entry.unpack_from(data, found + 2)
    return value if typ == 3 and n == 1 else None  # one SHORT, as EXIF says


def _jpeg_ends(data: bytes) -> bool:
    """Whether a JPEG ends with its end-of-image marker (trailing NUL padding allowed)."""
    end = len(data)
    while end and data[end - 1] == 0:  # a scan over the padding only, no copy of the file
        end -= 1
    return data[end - 2 : end] == b"\xff\xd9"


def _png_header(data: bytes) -> tuple[int, int, str, bool] | None:
    """Width, height, mode and interlacing from the IHDR of an 8-bit L/RGB PNG with the standard
    compression and filter method; None for any other file."""
    if len(data) < 33 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
        return None
    w, h, depth, ctype, comp, filt, interlace = struct.unpack_from(">IIBBBBB", data, 16)
    if struct.unpack_from(">I", data, 8)[0] != 13 or depth != 8 or ctype not in _PNG_MODES or comp or filt:
        return None
    return w, h, _PNG_MODES[ctype], bool(interlace)


def _png_checked(data: bytes) -> tuple[str, int, int, str | None] | None:
    """Mode, size and problem of a plain 8-bit L/RGB PNG after checking every chunk's CRC up to IEND.

    The problem is None for a sound file, or what is broken (bad CRC, cut short, no IEND: what
    PIL's verify() reports); None for the whole result when the file is anything else (left to PIL).
    """
    header = _png_header(data)
    if header is None or not header[0] or not header[1]:
        return None
    w, h, mode = header[:3]
    n, i, seen_idat = len(data), 8, False
    while True:
        if i + 8 > n:
            return mode, w, h, "truncated PNG file"
        length, cid = struct.unpack_from(">I4s", data, i)
        if cid == b"tEXt" and data.startswith(_EXIF_TEXT_KEYS, i + 8):
            return None  # may carry an orientation: PIL decides
        if cid == b"IEND":  # as PIL's verify(): the chunk walk ends at IEND
            return (mode, w, h, None) if seen_idat else None
        if i + 12 + length > n:
            return mode, w, h, "truncated PNG file"
        if cid == b"IDAT":
            seen_idat = True
        elif cid == b"IHDR":
            if i != 8:
                return None
        elif seen_idat:
            if cid not in _PNG_AFTER_IDAT:
                return None
        elif cid == b"tRNS":
            if length < (6 if mode == "RGB" else 2):
                return None
        elif cid not in _PNG_BEFORE_IDAT or length < (_PNG_BEFORE_IDAT[cid] or 0):
            return None
        if zlib.crc32(memoryview(data)[i + 4 : i + 8 + length]) != struct.unpack_from(">I", data, i + 8 + length)[0]:
            return mode, w, h, f"broken PNG file (bad header checksum in {cid!r})"
        i += 12 + length


def read_file(path: str, size: int = -1, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """All bytes of a regular file of at most `max_bytes`, normally with one open and one read.

    `size` is the size the listing saw for a regular file (-1: unknown; then fstat asks, and
    anything but a regular file is refused). Reading size + 1 bytes and getting exactly `size` means
    the whole file was read (a regular file's read is short only at its end); otherwise, e.g. when
    the file changed since it was listed, reading goes on to the end of file, never past
    `max_bytes` + 1 bytes. The open is non-blocking, so a file swapped for a FIFO after listing
    cannot hang the reader either. Raises Refused (with the reason) or OSError.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if size < 0:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise Refused(not_regular(st.st_mode))
            size = st.st_size
        if size > max_bytes:
            raise Refused(f"file too large: {size} bytes (shard.max_file_bytes is {max_bytes})")
        data = os.read(fd, size + 1)
        if len(data) == size:
            return data
        chunks, total = [data], len(data)
        while chunks[-1] and total <= max_bytes:
            chunks.append(os.read(fd, min(1 << 20, max_bytes + 1 - total)))
            total += len(chunks[-1])
        if total > max_bytes:
            raise Refused(f"file too large: over {max_bytes} bytes (shard.max_file_bytes)")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _too_many_pixels(item: Item, w: int, h: int, max_pixels: int) -> Skip:
    assert item.path is not None
    return Skip(item.path, f"too many pixels: {w}x{h} = {w * h} (shard.max_pixels is {max_pixels})")


def _fast_prepare(item: Item, data: bytes, min_size: int, max_pixels: int) -> Prepared | Skip | None:
    """`prepare` for a plain 8-bit L/RGB JPEG or PNG checked from its bytes; None: ask PIL.

    Checks come in PIL's order: the decompression-bomb limit (left to PIL), the pixel cap, the
    structure, the minimum size, so both paths give the same reason for the same file.
    """
    assert item.path is not None
    if data[:2] == b"\xff\xd8":
        head = _jpeg_header(data)
        if head is None:
            return None
        problem = None if _jpeg_ends(data) else "truncated JPEG (no end-of-image marker)"
        ext = "jpg"
    else:
        checked = _png_checked(data)
        if checked is None:
            return None
        *head, problem = checked
        problem = problem and f"corrupt PNG: {problem}"
        ext = "png"
    w, h = head[1], head[2]
    if w * h > Image.MAX_IMAGE_PIXELS:
        return None  # PIL's decompression-bomb rule decides (a recorded skip)
    if w * h > max_pixels:
        return _too_many_pixels(item, w, h, max_pixels)
    if problem:
        return Skip(item.path, f"corrupt or truncated image: {problem}")
    if min(w, h) < min_size:
        return Skip(item.path, f"too small: {w}x{h} (shard.min_size is {min_size})")
    return Prepared(item.key, item.label, ext, data)


def _orientation(img: Image.Image, data: bytes, decoded: bool) -> int:
    """The EXIF orientation (2-8) PIL's ImageOps.exif_transpose would apply to `img`; 1 for none.

    A PNG's EXIF may follow its pixels, where PIL reads it only when decoding: a PNG that may have
    one (found by the chunk names in _PNG_EXIF_MARKS) and is not `decoded` yet is decoded in a
    separate image, so `img` itself is still fresh for verify(). A broken EXIF block only means the
    orientation is unknown (1).
    """
    if img.format == "PNG" and not decoded:
        if not any(m in data for m in _PNG_EXIF_MARKS):
            return 1
        img = Image.open(io.BytesIO(data))
        img.load()  # a decoding error is the file's: prepare skips it as corrupt
    try:
        value = img.getexif().get(ORIENTATION, 1)
    except Exception:  # PIL's EXIF parser raises many kinds of errors on a malformed block
        return 1
    return value if isinstance(value, int) and 2 <= value <= 8 else 1


def prepare(
    item: Item, min_size: int, verify: str = "structure", max_bytes: int = MAX_FILE_BYTES,
    max_pixels: int = MAX_PIXELS,
) -> Prepared | Skip:
    """Check one item and return its shard bytes, or the reason it is skipped.

    What `verify="structure"` validates for a file kept byte for byte (no pixel decode):
    - JPEG: SOI, then every marker segment up to the start of scan complete and of a kind PIL reads,
      one 8-bit Huffman frame header (SOF0/1/2) with 1 or 3 components and a non-zero size, and the
      end-of-image marker at the end of the file (a cut-off file has none). The entropy-coded scan
      data itself is not decoded, so a bit flip inside it is not caught.
    - PNG: signature, IHDR (8-bit grey or RGB, standard compression and filter method), then every
      chunk complete with a correct CRC up to IEND, and at least one IDAT; zlib data not inflated.
    - both: width and height from the header against `min_size`, `max_pixels` and PIL's
      decompression-bomb limit; no EXIF orientation other than "upright".
    Files these byte-level checks do not cover (other formats and modes, unusual segments or chunks,
    EXIF orientation) go through PIL: Image.open (which reads the header only) and the pixel cap,
    then PIL's verify() for PNG / the end marker for JPEG, and a full decode and re-encode for
    files that need conversion or turning upright. `verify="decode"` decodes every file's pixels
    with PIL instead (catches damage inside the compressed data too). Files over `max_bytes` are
    not read at all.
    """
    if item.pixels is not None:
        img = Image.fromarray(np.ascontiguousarray(item.pixels, dtype=np.uint8))
        return Prepared(item.key, item.label, "png", encode_png(img))
    assert item.path is not None
    if item.skip:
        return Skip(item.path, item.skip)
    try:
        data = read_file(item.path, item.size, max_bytes)
    except Refused as e:
        return Skip(item.path, str(e))
    except OSError as e:
        return Skip(item.path, f"unreadable: {e.strerror or e}")
    if not data:
        return Skip(item.path, "empty file (0 bytes)")
    if verify == "structure":
        fast = _fast_prepare(item, data, min_size, max_pixels)
        if fast is not None:
            return fast
    return _pil_prepare(item, data, min_size, verify, max_pixels)


def _pil_prepare(item: Item, data: bytes, min_size: int, verify: str, max_pixels: int) -> Prepared | Skip:
    """`prepare` through PIL: any format PIL reads; converted to 8-bit PNG unless kept as it is."""
    assert item.path is not None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # header only: the pixels are decoded by load()
            fmt = img.format
            if img.width * img.height > max_pixels:
                return _too_many_pixels(item, img.width, img.height, max_pixels)
            plain = fmt in KEEP_FORMATS and img.mode in PLAIN_MODES
            turn = _orientation(img, data, decoded=False) if plain and verify == "structure" else 0
            if turn == 1:  # kept as it is: its structure is checked without a decode
                problem = _structure_ok(fmt, img, data)
                if problem:
                    return Skip(item.path, f"corrupt or truncated image: {problem}")
            else:
                img.load()  # full decode: catches truncated and corrupt data, not just a bad header
                turn = turn or _orientation(img, data, decoded=True)
            keep = plain and turn == 1
    except UnidentifiedImageError:
        why = "not an image" if Path(item.path).suffix.lower() not in IMAGE_SUFFIXES else "corrupt image"
        return Skip(item.path, f"{why}: cannot identify image data")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return Skip(item.path, f"decompression bomb refused: {e}")
    except (OSError, SyntaxError, ValueError) as e:
        return Skip(item.path, f"corrupt or truncated image: {e}")
    w, h = img.size
    if min(w, h) < min_size:
        return Skip(item.path, f"too small: {w}x{h} (shard.min_size is {min_size})")
    if keep:
        return Prepared(item.key, item.label, KEEP_FORMATS[fmt], data)
    return _convert(item, img, fmt, turn)


def _convert(item: Item, img: Image.Image, fmt: str, turn: int) -> Prepared | Skip:
    """Re-encode a decoded image as an 8-bit L/RGB PNG, turned upright by its EXIF orientation."""
    assert item.path is not None
    try:
        if turn != 1:
            img = ImageOps.exif_transpose(img)
        if fmt in KEEP_FORMATS and img.mode in PLAIN_MODES:  # a plain PNG/JPEG, only turned upright
            img8, why = img, "re-encoded as PNG"
        else:
            img8, why = _to_8bit(img)
            if fmt not in KEEP_FORMATS:
                why = f"{fmt} re-encoded as PNG" + (f" ({why})" if img.mode not in PLAIN_MODES else "")
        if turn != 1:
            why = f"EXIF orientation {turn} applied, {why}"
        return Prepared(item.key, item.label, "png", encode_png(img8), converted=why)
    except (OSError, ValueError) as e:
        return Skip(item.path, f"cannot convert {img.mode} image: {e}")


def decode(data: bytes, channels: int) -> Image.Image:
    """Decode shard bytes to a PIL image with 1 (L) or 3 (RGB) channels."""
    img = Image.open(io.BytesIO(data))
    return img.convert("L" if channels == 1 else "RGB")


def decode_plain_png(data: bytes, channels: int, size: int) -> torch.Tensor | None:
    """uint8 pixels [C, size, size] of a PNG the models can take as it is; None for anything else.

    "As it is" means 8-bit, `channels` channels (L or RGB), already `size` x `size`, not interlaced,
    and no ancillary chunk between IHDR and IDAT (gAMA, tRNS, iCCP...: where PIL and libpng could
    differ). PNG is lossless, so libpng (torchvision.io) and PIL decode such a file to the same
    pixels (tests/test_loader.py; all 70,000 Fashion-MNIST images checked), and libpng does it in
    about half PIL's time (docs/measurements.md#png-decode). That matters on 2
    cores, where decoding takes its CPU from the encoder's forward (benchmarks/bench_encode.py).
    Everything else, every resize included, takes the PIL path (`decode`, `resize_crop`,
    `to_pixels`) as before.
    """
    if data[37:41] != b"IDAT" or _png_header(data) != (size, size, "L" if channels == 1 else "RGB", False):
        return None
    import torch
    from torchvision.io import ImageReadMode, decode_png

    return decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.UNCHANGED)


def to_pixels(img: Image.Image) -> torch.Tensor:
    """PIL L/RGB -> uint8 tensor [C, H, W]."""
    # Imported here, not at the top: the shard stage uses this module without torch, which saves
    # ~2 s of start-up and makes each forked shard worker ~40 ms cheaper to start and stop.
    import torch
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float in [0, 1], the models' image format. The loader converts whole
    batches: one conversion per batch instead of one per 28 px image halves the decode cost."""
    return pixels.float().div_(255.0)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL L/RGB -> float tensor [C, H, W] in [0, 1]."""
    return to_unit(to_pixels(img))


def resize_crop(img: Image.Image, size: int, rng: np.random.Generator | None = None) -> Image.Image:
    """Resize the shorter side to `size` (bicubic), then crop a `size` square.

    Centre crop when `rng` is None (evaluation, encoding); a random crop along the longer side when
    given (training), as the reference's Resize -> RandomCrop (docs/paper.md#data).
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
