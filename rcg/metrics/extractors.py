"""Feature extractors for torch-fidelity that work offline.

- `evalnet`: the domain classifier of `rcg.metrics.evalnet`, registered into torch-fidelity's
  registry as a `FeatureExtractorBase` subclass. Its penultimate features give `fd` (the Frechet
  distance under this extractor; not FID), KID and precision/recall; its logits give IS.
- `inception-v3-compat`: torch-fidelity's own Inception (standard FID, docs/paper.md#evaluation), with
  its weights from a configured local file or torch's hub cache; never downloaded, since nothing
  here may wait on the network.

torch-fidelity hands every extractor a batch of uint8 [B, 3, H, W] images and one
`feature_extractor_weights_path` per call; the evalnet extractor reads its architecture from the
JSON beside that weights file.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
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


def register_extractors() -> None:
    """Register `evalnet` in torch-fidelity's registry (idempotent: safe to call per stage)."""
    for name in (EVALNET, EVALNET_SSL):
        if name not in FEATURE_EXTRACTORS_REGISTRY:
            torch_fidelity.register_feature_extractor(name, EvalNetExtractor)


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
        return INCEPTION, inception_weights_path(inception_weights)
    raise PipelineError(f"evaluate.extractor: unknown extractor {extractor!r} (evalnet | inception)")
