"""A per-image cache with the two views of training's one fixed-per-image augmentation, the flip.

When the training crop of an image is the same at every step (a resize and a centre crop, paper
section 3.3's MAGE recipe and the square Fashion-MNIST images here), whatever a frozen network makes
of it can be computed once per image and view (`orig`, and `flip`: the horizontally flipped image)
and looked up by the batch's keys and flip flags. Two caches are built on this: the encode stage's
representations (rcg.features.RepCache) and the tokenizer stage's token ids
(rcg.generators.tokens.TokenCache).
"""

from __future__ import annotations

from pathlib import Path

import torch

from rcg.io import PipelineError

VIEWS = ("orig", "flip")  # view names as the cache files store them; index 1 is the flipped image


class ViewCache:
    """Rows `values[i]` of a table read from `path`, indexed by (key, view): `lookup(keys, flipped)`
    gathers a batch's rows, view 1 where `flipped` is set. `what` names a row and `remedy` the stage
    that writes the file, for the error about a missing key."""

    def __init__(self, keys: list[str], views: list[str], values: torch.Tensor, path: str | Path, what: str,
                 remedy: str) -> None:
        unknown = set(views) - set(VIEWS)
        if unknown:
            raise PipelineError(f"{path}: unknown views {sorted(unknown)} (expected {', '.join(VIEWS)})")
        self.index = {(k, VIEWS.index(v)): i for i, (k, v) in enumerate(zip(keys, views))}
        self.values, self.path, self.what, self.remedy = values, Path(path), what, remedy
        self.views = tuple(v for v in VIEWS if v in set(views))

    def __len__(self) -> int:
        return len(self.index)

    def rows(self, keys: list[str], flipped: torch.Tensor) -> torch.Tensor:
        """Row numbers of the batch's (key, view) pairs; a PipelineError names the first one missing."""
        try:
            return torch.as_tensor([self.index[(k, int(f))] for k, f in zip(keys, flipped.tolist())],
                                   dtype=torch.long)
        except KeyError as e:
            key, view = e.args[0]
            raise PipelineError(f"{self.path}: no cached {self.what} for sample {key!r} (view {VIEWS[view]}; "
                                f"{self.remedy})") from None

    def lookup(self, keys: list[str], flipped: torch.Tensor) -> torch.Tensor:
        """The batch's rows, in batch order."""
        return self.values[self.rows(keys, flipped)]


__all__ = ["VIEWS", "ViewCache"]
