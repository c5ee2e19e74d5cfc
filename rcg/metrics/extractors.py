"""Feature extractors for torch-fidelity that work offline.

- `evalnet`: the domain classifier of `rcg.metrics.evalnet`, registered into torch-fidelity's
  registry as a `FeatureExtractorBase` subclass. Its penultimate features give `fd` (the Frechet
  distance under this extractor; not FID), KID and precision/recall; its logits give IS.
- `inception-v3-compat`: torch-fidelity's own Inception (standard FID, docs/paper.md#evaluation), with
  its weights from a configured local file or torch's hub cache; never downloaded, since nothing
  here may wait on the network. torch-fidelity 0.4.0 reads that file with
  `torch.load(path, weights_only=False)`, which runs whatever code a crafted pickle holds, so the
  registry entry of that name is replaced by `SafeInceptionV3`: the same network, its weights read
  weights-only and checked key by key here, and handed over as an in-memory copy of plain tensors.
  The name, and with it eval.json's `extractor` and the cache file names, stays torch-fidelity's.

torch-fidelity hands every extractor a batch of uint8 [B, 3, H, W] images and one
`feature_extractor_weights_path` per call; the evalnet extractor reads its architecture from the
JSON beside that weights file.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from rcg.io import PipelineError, read_json
from rcg.metrics.evalnet import load_evalnet, prepare_input

EVALNET = "evalnet"
EVALNET_SSL = "evalnet-ssl"  # the same CNN trained without labels (rcg.metrics.evalnet)
INCEPTION = "inception-v3-compat"

# What each extractor's Frechet distance is, in the words eval.json and `rcg report` use.
DESCRIPTIONS = {
    INCEPTION: "FID: Frechet distance on Inception-v3 pool features (torch-fidelity's TF-compatible port)",
    EVALNET: "Frechet distance on the features of a small CNN classifier trained on the labelled train "
             "split (models/evalnet); not FID, and only comparable within this dataset",
    EVALNET_SSL: "Frechet distance on the features of a small CNN trained without labels (SimCLR) on the "
                 "train split, independent of the conditioning encoder (models/evalnet); not FID, and only "
                 "comparable within this dataset",
}


class EvalNetExtractor(FeatureExtractorBase):
    """torch-fidelity view of the evaluation classifier: features `penultimate` and `logits`."""

    def __init__(
        self,
        name: str,
        features_list: list[str],
        feature_extractor_weights_path: str | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise PipelineError(
                "evalnet extractor: feature_extractor_weights_path must name models/evalnet/evalnet.safetensors"
            )
        self.net, self.meta = load_evalnet(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("penultimate", "logits")  # a contrastive network has no logits: IS is not asked of it

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        # IS needs class probabilities; the distance metrics use the feature layer, like
        # Inception's 2048-d pool features for FID/KID.
        return {"isc": "logits", "fid": "penultimate", "kid": "penultimate", "prc": "penultimate"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, 28, 28, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"evalnet extractor expects uint8 [B, 3, H, W], got {x.dtype} {tuple(x.shape)}")
        k = self.net.kwargs
        h = prepare_input(x.float() / 255.0, k["in_channels"], k["image_size"])
        feats = self.net.features(h)  # (B, feature_dim)
        out = {"penultimate": lambda: feats, "logits": lambda: self.net.head(feats)}
        return tuple(out[name]().float() for name in self.features_list)


def read_inception_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in an Inception weights file, unpickling only tensors and plain data.

    A file that needs anything else (code, or any class beyond torch's weights-only set) is refused
    with one line naming it; nothing in it runs.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for code, EOFError/RuntimeError for damage
        from rcg.io import weights_only_reason

        raise PipelineError(f"{path}: not an Inception weights file this project can read safely "
                            f"({weights_only_reason(e)}); nothing in it was run") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise PipelineError(f"{path}: not an Inception state dict (expected a dict of tensors, as in {URL_INCEPTION_V3})")
    return dict(state)


def layout_mismatch(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], show: int = 3) -> str:
    """What keeps `state` from loading strictly into a module whose state dict is `expected`, in one
    line ("" when it fits): missing and unexpected keys and shape mismatches, the first `show` of each."""

    def listed(what: str, items: list[str]) -> str:
        more = f", ... ({len(items) - show} more)" if len(items) > show else ""
        return f"{len(items)} {what}: {', '.join(items[:show])}{more}"

    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(state)) if state[k].shape != expected[k].shape]
    parts = [listed(what, items) for what, items in
             (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if items]
    return "; ".join(parts)


class _LayoutError(ValueError):
    """A state dict that does not fit torch-fidelity's Inception (message: `layout_mismatch`)."""


class SafeInceptionV3(FeatureExtractorInceptionV3):
    """torch-fidelity's `inception-v3-compat` network with its weights file read weights-only.

    The parent builds the network and then `torch.load`s `feature_extractor_weights_path` with
    `weights_only=False`; here it is given an in-memory file written from the tensors read safely
    (so there is nothing for it to run), and the state dict is checked against the network's own
    keys and shapes before loading. Forward pass, features and numbers are the parent's.
    """

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: Any = None,
                 **kwargs: Any) -> None:
        if feature_extractor_weights_path is None:
            raise PipelineError(f"{name}: no Inception weights file given, and this project never downloads them")
        path = Path(feature_extractor_weights_path)
        buffer = io.BytesIO()
        torch.save(read_inception_weights(path), buffer)
        buffer.seek(0)
        try:
            super().__init__(name, features_list, feature_extractor_weights_path=buffer, **kwargs)
        except _LayoutError as e:
            raise PipelineError(
                f"{path}: does not match torch-fidelity's Inception-v3 ({e}); expected the weights of {URL_INCEPTION_V3}"
            ) from None

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        if strict and (problems := layout_mismatch(self.state_dict(), state_dict)):
            raise _LayoutError(problems)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def register_extractors() -> None:
    """Register `evalnet` in torch-fidelity's registry and make its `inception-v3-compat` read its
    weights safely (`SafeInceptionV3`). Idempotent: safe to call per stage."""
    for name in (EVALNET, EVALNET_SSL):
        if name not in FEATURE_EXTRACTORS_REGISTRY:
            torch_fidelity.register_feature_extractor(name, EvalNetExtractor)
    # Replaced in place, not registered under a new name: the name is what eval.json reports and
    # what torch-fidelity's cache files are named by, and it must be the metric's (standard FID).
    FEATURE_EXTRACTORS_REGISTRY[INCEPTION] = SafeInceptionV3


def check_inception_weights(path: str | Path) -> None:
    """Build the Inception extractor from `path` once (weights read safely, keys and shapes checked),
    so a bad file stops the stage at set-up rather than after the first images were read."""
    SafeInceptionV3(INCEPTION, ["2048"], feature_extractor_weights_path=str(path))


def inception_weights_path(configured: str = "") -> Path:
    """The Inception weights file to use: `configured`, else torch's hub cache, else a clear error.

    torch-fidelity would otherwise download the file at run time, which fails (or hangs) offline.
    """
    if configured:
        path = Path(configured)
        if not path.is_file():
            raise PipelineError(f"evaluate.inception_weights: {path} does not exist")
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[-1]
    if cached.is_file():
        return cached
    raise PipelineError(
        "evaluate.extractor=inception needs Inception weights, and none were found: "
        f"evaluate.inception_weights is empty and {cached} does not exist. Download "
        f"{URL_INCEPTION_V3} on a machine with network access and set evaluate.inception_weights "
        "to its path (or put it in torch's hub cache), or use evaluate.extractor=evalnet"
    )


def extractor_setup(extractor: str, evalnet_weights: str | Path, inception_weights: str = "") -> tuple[str, Path]:
    """(torch-fidelity extractor name, weights path) for the configured `evaluate.extractor`."""
    if extractor == "evalnet":
        register_extractors()
        path = Path(evalnet_weights)
        if not path.is_file():
            raise PipelineError(f"{path}: no evaluation network (run `rcg evalnet` first)")
        kind = read_json(path.with_suffix(".json")).get("kind", "classifier")
        return (EVALNET if kind == "classifier" else EVALNET_SSL), path
    if extractor == "inception":
        register_extractors()
        path = inception_weights_path(inception_weights)
        check_inception_weights(path)
        return INCEPTION, path
    raise PipelineError(f"evaluate.extractor: unknown extractor {extractor!r} (evalnet | inception)")
