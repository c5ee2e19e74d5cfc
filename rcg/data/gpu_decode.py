"""JPEG decoding on the GPU for the training streams (`data.decode_device: cuda`).

At 256 px the loader's CPU work per photograph (a PIL JPEG decode, then the resize and crop of
the reference's Resize -> RandomCrop, docs/paper.md#data) bounds how fast a few cores can feed a GPU
(benchmarks/bench_input.py). With `decode_device: cuda` the DataLoader workers only read the tar
members: a JPEG sample leaves its worker as its compressed bytes and its place in the stream, and the
training process decodes each batch's JPEGs at once with nvjpeg (`torchvision.io.decode_jpeg`,
device="cuda"), resizes each (bicubic, antialiased, rounded to 8-bit as PIL does) and crops it on the
GPU. PNG samples are decoded by the workers as before.

The crop is the CPU path's: the same target size, and the offsets drawn from the same per-sample
generator (seed and place in the stream) in the same order, so a resumed run crops as an
uninterrupted one. The pixels differ slightly from the CPU path (nvjpeg's IDCT and torch's bicubic
filter are not libjpeg's and PIL's): switching decoders changes the data at the level of rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rcg.data.images import to_unit
from rcg.io import PipelineError

Transform = Callable[[torch.Tensor], torch.Tensor]


def cuda_device(key: str = "data.decode_device") -> torch.device:
    """The current CUDA device, or a clear error naming `key` on a machine without one."""
    if not torch.cuda.is_available():
        raise PipelineError(f"{key}: cuda needs a CUDA GPU and none is visible here; set {key}: cpu")
    return torch.device("cuda", torch.cuda.current_device())


def crop_geometry(w: int, h: int, size: int, rng: np.random.Generator | None) -> tuple[int, int, int, int]:
    """(resized width, resized height, left, top) of rcg.data.images.resize_crop for a w x h image:
    the shorter side scaled to `size`, then a `size` square, centred or at offsets drawn from `rng`
    (width first, then height; nothing is drawn when there is nothing to choose)."""
    if (w, h) != (size, size):
        s = size / min(w, h)
        w, h = max(size, round(w * s)), max(size, round(h * s))
    if (w, h) == (size, size):
        return w, h, 0, 0
    if rng is None:
        return w, h, (w - size) // 2, (h - size) // 2
    return w, h, int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))


def resize_crop_tensor(img: torch.Tensor, size: int, rng: np.random.Generator | None) -> torch.Tensor:
    """uint8 [C, H, W] -> uint8 [C, size, size] on the image's device: `crop_geometry`'s resize
    (bicubic with antialiasing, as PIL's downscaling filter) and crop."""
    _, h, w = img.shape
    nw, nh, left, top = crop_geometry(w, h, size, rng)
    if (nw, nh) != (w, h):
        x = F.interpolate(img[None].float(), size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
        img = x[0].clamp_(0, 255).round_().to(torch.uint8)
    return img[:, top : top + size, left : left + size]


def collate_deferred(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch whose JPEGs are still compressed: the workers' `_Decode(defer_jpeg=True)` samples."""
    return {
        "key": [s["key"] for s in samples],
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "pixels": [s.get("image") for s in samples],  # uint8 [C, H, W] of the PNGs, None for JPEGs
        "jpeg": [s.get("jpeg") for s in samples],  # the JPEG bytes as uint8 [N], None for PNGs
        "place": [s.get("place") for s in samples],  # (rank, stream, index): seeds the random crop
    }


def finish_batch(batch: dict[str, Any], size: int, channels: int, seed: int, random_crop: bool,
                 device: torch.device, transform: Transform | None = None) -> dict[str, Any]:
    """A `collate_deferred` batch as the loader's usual {"key", "image", "label"}, its images float
    [B, C, size, size] in [0, 1] on `device`: the JPEGs decoded there in one call, resized and cropped."""
    from torchvision.io import ImageReadMode, decode_jpeg

    images: list[torch.Tensor | None] = [None] * len(batch["key"])
    todo = [i for i, data in enumerate(batch["jpeg"]) if data is not None]
    if todo:
        mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
        decoded = decode_jpeg([batch["jpeg"][i] for i in todo], mode=mode, device=device)
        for i, img in zip(todo, decoded):
            rng = np.random.default_rng([seed, *batch["place"][i]]) if random_crop else None
            images[i] = resize_crop_tensor(img, size, rng)
    for i, pixels in enumerate(batch["pixels"]):
        if pixels is not None:
            images[i] = pixels.to(device, non_blocking=True)
    x = to_unit(torch.stack(images))  # type: ignore[arg-type]
    if transform is not None:
        x = torch.stack([transform(im) for im in x])
    return {"key": batch["key"], "image": x, "label": batch["label"]}


class DecodedOn:
    """A DataLoader of `collate_deferred` batches, yielding them finished on `device` (`finish_batch`).

    `iter()` starts the DataLoader's iterator at once (not at the first batch), so its base seed is
    drawn when the caller asks for the iterator, as with a plain DataLoader (see rcg.training.fit).
    """

    def __init__(self, loader: Iterable[dict[str, Any]], size: int, channels: int, seed: int, random_crop: bool,
                 device: torch.device, transform: Transform | None = None) -> None:
        self.loader, self.device, self.transform = loader, device, transform
        self.size, self.channels, self.seed, self.random_crop = size, channels, seed, random_crop

    def _finish(self, batch: dict[str, Any]) -> dict[str, Any]:
        return finish_batch(batch, self.size, self.channels, self.seed, self.random_crop, self.device, self.transform)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return map(self._finish, iter(self.loader))
