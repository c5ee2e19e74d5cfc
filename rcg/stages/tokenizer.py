"""`rcg tokenizer`: the VQGAN tokenizer MAGE generates in, in models/tokenizer/ (paper section 3.3).

With `tokenizer.checkpoint` set, the official MaskGIT VQGAN file is loaded strictly
(rcg.tokenizers.official); without one, the configured size is trained on the train shards
(rcg.tokenizers.train, resumable), since an ImageNet codebook is the wrong one for a new domain.
Either way the stage writes `tokenizer.safetensors` + `tokenizer.json` (architecture, codebook
size, token grid, input size, provenance) and metrics/tokenizer.json: reconstruction error,
Frechet distance of reconstructions under the evaluation network when models/evalnet exists, and
codebook usage, all on the val split (rcg.tokenizers.quality).

Training runs in one process even under torchrun: the codebook's initialisation and restarts are
per-process state that DDP would not keep in step across ranks.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch

from rcg.config import Config, TokenizerConfig
from rcg.data.loader import shards_id
from rcg.io import PipelineError, atomic_dir, file_digest, write_json
from rcg.tokenizers.official import load_official
from rcg.tokenizers.quality import tokenizer_report
from rcg.tokenizers.train import train_tokenizer
from rcg.tokenizers.vqgan import VQGAN, load_tokenizer, save_tokenizer
from rcg.tracking import flatten, stage_run
from rcg.training import DistInfo, fingerprint

log = logging.getLogger(__name__)

# Fields that do not change what training computes (kept out of the resume fingerprint and provenance).
_NOT_TRAINING = {"checkpoint", "steps", "threads", "eval_images", "eval_batch_size", "ckpt_every", "log_every",
                 "out_dir", "checkpoint_dir", "metrics_file"}


def training_block(tc: TokenizerConfig) -> dict[str, Any]:
    """The tokenizer settings that change what training computes."""
    return {k: v for k, v in dataclasses.asdict(tc).items() if k not in _NOT_TRAINING}


def _official(cfg: Config) -> tuple[VQGAN, dict[str, Any]]:
    """The configured official checkpoint, loaded strictly for images of data.image_size."""
    tc, data = cfg.tokenizer, cfg.data
    vq = load_official(tc.checkpoint, tc.arch, image_size=data.image_size, in_channels=3)
    if data.channels != vq.in_channels:
        raise PipelineError(f"tokenizer.checkpoint: {tc.checkpoint} tokenizes {vq.in_channels}-channel images, "
                            f"but data.channels is {data.channels}")
    return vq, {"source": "checkpoint", "file": tc.checkpoint, "sha256_12": file_digest(tc.checkpoint)}


def _trained(cfg: Config, tracker: Any) -> tuple[VQGAN, dict[str, Any], dict[str, Any]]:
    """Train the configured size on the train shards (one process; see the module docstring)."""
    tc, data = cfg.tokenizer, cfg.data
    resume_id = fingerprint(training_block(tc), data.image_size, data.channels, shards_id(data.shards_dir))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vq, summary = train_tokenizer(tc, data, resume_id, DistInfo(0, 1, 0, device), tracker)
    # Only what defines the weights, so a rerun that resumes at the end writes the same files.
    provenance = {"source": "trained", "training_config": training_block(tc), "steps": summary["steps"],
                  "shards": shards_id(data.shards_dir)}
    return vq, provenance, summary


def _verify(vq: VQGAN, model_dir: Path) -> None:
    """Reload what was written and check it tokenizes and decodes as the in-memory tokenizer."""
    back = load_tokenizer(model_dir)
    probe = torch.rand(2, vq.in_channels, vq.image_size, vq.image_size, generator=torch.Generator().manual_seed(0))
    a, b = vq.cpu().encode(probe), back.encode(probe)
    if not torch.equal(a, b) or not torch.equal(vq.decode(a), back.decode(b)):
        raise PipelineError(f"{model_dir}: the reloaded tokenizer does not reproduce the saved one")


def run(cfg: Config, **options: Any) -> None:
    """Load or train the tokenizer, save and verify it, and score it into metrics/tokenizer.json."""
    t0 = time.perf_counter()
    tc = cfg.tokenizer
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    with stage_run(cfg, "tokenizer") as tracker:
        summary: dict[str, Any] = {}
        if tc.checkpoint:
            vq, provenance = _official(cfg)
        else:
            vq, provenance, summary = _trained(cfg, tracker)
        evalnet = Path(cfg.evalnet.out_dir) / "evalnet.safetensors"
        # The folder and its metrics file are one set: swapped in together (rcg.io.atomic_dir).
        with atomic_dir(tc.out_dir, after=[tc.metrics_file]) as tmp:
            save_tokenizer(vq, tmp, tc.arch, provenance)
            _verify(vq, tmp)
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            quality = tokenizer_report(vq.to(device), cfg.data, evalnet, tc.eval_images, tc.eval_batch_size, tc.seed)
        metrics = {"arch": tc.arch, "source": provenance["source"], "codebook_size": vq.codebook_size,
                   "token_grid": list(vq.token_grid), "input_size": vq.image_size, **quality,
                   **({"train": summary} if summary else {}), "wall_time_s": round(time.perf_counter() - t0, 1)}
        write_json(tc.metrics_file, metrics)
        tracker.log_metrics({k: float(v) for k, v in flatten(metrics).items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool)})
        tracker.log_artifact(tc.metrics_file)
        tracker.log_artifact(Path(tc.out_dir) / "tokenizer.json", "tokenizer")
        log.info("tokenizer (%s, %s): val mse %.5f, psnr %.2f dB, perplexity %.1f of %d codes; wrote %s and %s",
                 tc.arch, provenance["source"], quality["mse"], quality["psnr"], quality["usage"]["perplexity"],
                 vq.codebook_size, tc.out_dir, tc.metrics_file)
