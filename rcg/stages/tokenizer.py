"""`rcg tokenizer`: the VQGAN tokenizer MAGE generates in, in models/tokenizer/ (paper section 3.3).

With `tokenizer.checkpoint` set, the official MaskGIT VQGAN file is loaded strictly
(rcg.tokenizers.official); without one, the configured size is trained on the train shards
(rcg.tokenizers.train, resumable), since an ImageNet codebook is the wrong one for a new domain.
Either way the stage writes `tokenizer.safetensors` + `tokenizer.json` (architecture, codebook
size, token grid, input size, provenance) and metrics/tokenizer.json: reconstruction error,
Frechet distance of reconstructions under the evaluation network when models/evalnet exists, and
codebook usage, all on the val split (rcg.tokenizers.quality).

`--if-needed` (what dvc.yaml runs) makes the tokenizer only for a generator that needs one: when
`train_generator.arch` is a diffusion arch (the default and tiny presets), it writes in seconds
a marker (models/tokenizer/skipped.json, metrics/tokenizer.json with the reason) in place of the
tokenizer, so the DAG, in which train_generator always depends on the tokenizer folder, goes on.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from rcg.config import Config
from rcg.generators import arch_kind
from rcg.io import atomic_dir, write_json
from rcg.tokenizers.official import official_tokenizer
from rcg.tokenizers.quality import tokenizer_report
from rcg.tokenizers.train import trained_tokenizer
from rcg.tokenizers.vqgan import save_tokenizer, verify_tokenizer
from rcg.tracking import flatten, stage_run

log = logging.getLogger(__name__)


def skip(cfg: Config, reason: str) -> None:
    """Record that no tokenizer is made, and why, as the stage's outputs: the model folder holds only
    skipped.json (no stale tokenizer is left), the metrics file the reason."""
    tc = cfg.tokenizer
    with atomic_dir(tc.out_dir, after=[tc.metrics_file]) as tmp:
        write_json(tmp / "skipped.json", {"reason": reason})
    Path(tc.checkpoint_dir).mkdir(parents=True, exist_ok=True)  # a DVC output
    write_json(tc.metrics_file, {"skipped": reason})
    log.info("tokenizer skipped: %s", reason)


def run(cfg: Config, if_needed: bool = False, **options: Any) -> None:
    """Load or train the tokenizer, save and verify it, and score it into metrics/tokenizer.json;
    with `if_needed`, only when train_generator.arch generates tokens (else `skip`)."""
    if if_needed and arch_kind(cfg.train_generator.arch) != "tokens":
        skip(cfg, f"train_generator.arch {cfg.train_generator.arch!r} is not a MAGE arch: no generator reads "
                  "a tokenizer")
        return
    t0 = time.perf_counter()
    tc, data = cfg.tokenizer, cfg.data
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    with stage_run(cfg, "tokenizer") as tracker:
        summary: dict[str, Any] = {}
        if tc.checkpoint:
            vq, provenance = official_tokenizer(tc.checkpoint, tc.arch, data.image_size, data.channels)
        else:
            vq, provenance, summary = trained_tokenizer(tc, data, tracker)
        evalnet = Path(cfg.evalnet.out_dir) / "evalnet.safetensors"
        # The folder and its metrics file are one set: swapped in together (rcg.io.atomic_dir).
        with atomic_dir(tc.out_dir, after=[tc.metrics_file]) as tmp:
            save_tokenizer(vq, tmp, tc.arch, provenance)
            verify_tokenizer(vq, tmp)
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            quality = tokenizer_report(vq.to(device), data, evalnet, tc.eval_images, tc.eval_batch_size, tc.seed)
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
