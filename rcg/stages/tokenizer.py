"""`rcg tokenizer`: the VQGAN tokenizer MAGE generates in, in models/tokenizer/ (paper section 3.3).

With `tokenizer.checkpoint` set, the official MaskGIT VQGAN file is loaded strictly
(rcg.tokenizers.official); without one, the configured size is trained on the train shards
(rcg.tokenizers.train, resumable), since an ImageNet codebook is the wrong one for a new domain.
Either way the stage writes `tokenizer.safetensors` + `tokenizer.json` (architecture, codebook
size, token grid, input size, provenance), and scores the tokenizer on the val split
(rcg.tokenizers.quality): reconstruction error, Frechet distance of reconstructions under the
evaluation network when models/evalnet exists, and codebook usage. The whole record goes to
metrics/details/tokenizer.json, its headline (`HEADLINE`) to metrics/tokenizer.json.

With `tokenizer.cache_ids` and training crops fixed per image, the stage also tokenizes the train
split once into models/tokenizer/ids.parquet (both views when train_generator.hflip), which
MAGE training reads instead of running the tokenizer on every batch (rcg.generators.tokens).

`--if-needed` (what dvc.yaml runs) makes the tokenizer only for a generator that needs one: when
`train_generator.arch` is a diffusion arch (the default and tiny presets), it writes in seconds
a marker (models/tokenizer/skipped.json, the metrics files with the reason) in place of the
tokenizer, so the DAG, in which train_generator always depends on the tokenizer folder, goes on.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from rcg.config import Config
from rcg.data.loader import make_loader, read_manifest
from rcg.generators import arch_kind
from rcg.generators.tokens import IDS_FILE, TokenCodec, fixed_crop_reason, write_token_ids
from rcg.io import atomic_dir, write_json
from rcg.metrics import headline
from rcg.tokenizers.official import official_tokenizer
from rcg.tokenizers.quality import tokenizer_report
from rcg.tokenizers.train import trained_tokenizer
from rcg.tokenizers.vqgan import save_tokenizer, verify_tokenizer
from rcg.tracking import flatten, stage_run

log = logging.getLogger(__name__)

# What `dvc metrics show` lists of the record (rcg.metrics.headline): how faithful the round trip is,
# how much of the codebook is used, the floor of MAGE's fd, what the stage cost.
HEADLINE = ("psnr", "usage.perplexity", "usage.used_share", "fidelity.fd", "wall_time_s", "skipped")


def skip(cfg: Config, reason: str) -> None:
    """Record that no tokenizer is made, and why, as the stage's outputs: the model folder holds only
    skipped.json (no stale tokenizer is left), the metrics file the reason."""
    tc = cfg.tokenizer
    with atomic_dir(tc.out_dir, after=[tc.metrics_file, tc.details_file]) as tmp:
        write_json(tmp / "skipped.json", {"reason": reason})
    Path(tc.checkpoint_dir).mkdir(parents=True, exist_ok=True)  # a DVC output
    headline.write_metrics({"skipped": reason}, tc.metrics_file, tc.details_file, HEADLINE)
    log.info("tokenizer skipped: %s", reason)


@torch.no_grad()
def encode_train_ids(codec: TokenCodec, data_cfg: Any, views: tuple[str, ...], batch_size: int,
                     device: torch.device | str = "cpu", progress: bool = True) -> tuple[list[str], list[str], Tensor]:
    """Ids of every train image (the resize and centre crop of the loader's `once` stream) in each
    of `views` ("orig", and "flip" for the mirror image): (keys, views, ids [N, T]) of every row."""
    total = read_manifest(data_cfg.shards_dir).get("splits", {}).get("train", {}).get("written")
    loader = make_loader(data_cfg, "train", "once", batch_size, num_workers=0)
    keys: list[str] = []
    names: list[str] = []
    chunks = []
    bar_total = math.ceil(total / batch_size) if isinstance(total, int) else None
    for batch in tqdm(loader, desc="tokenize train", unit="batch", total=bar_total, disable=not progress):
        x = batch["image"].to(device)
        both = torch.cat([x if v == "orig" else x.flip(-1) for v in views])  # every view in one pass
        chunks.append(codec.encode(both).cpu())
        keys += [k for _ in views for k in batch["key"]]
        names += [v for v in views for _ in batch["key"]]
    ids = torch.cat(chunks) if chunks else torch.zeros(0, codec.num_tokens, dtype=torch.long)
    return keys, names, ids


def cache_ids(cfg: Config, folder: Path, device: torch.device) -> dict[str, Any]:
    """Tokenize the train split once into `folder`/ids.parquet with the tokenizer saved in `folder`,
    when the training crops are fixed per image (module docstring); what the record says of it."""
    tc, gcfg = cfg.tokenizer, cfg.train_generator
    why = "tokenizer.cache_ids is off" if not tc.cache_ids else fixed_crop_reason(gcfg.rep_source)
    if why is not None:
        log.info("token ids not cached (training tokenizes every batch): %s", why)
        return {"skipped": why}
    t0 = time.perf_counter()
    codec = TokenCodec(folder).to(device)
    views = ("orig", "flip") if gcfg.hflip else ("orig",)
    keys, names, ids = encode_train_ids(codec, cfg.data, views, tc.eval_batch_size, device)
    write_token_ids(folder / IDS_FILE, keys, names, ids, codec.digest, codec.codebook_size)
    seconds = round(time.perf_counter() - t0, 1)
    log.info("token ids of %d train images (%s) -> %s in %.0fs", len(keys) // len(views), "+".join(views),
             Path(tc.out_dir) / IDS_FILE, seconds)
    return {"file": str(Path(tc.out_dir) / IDS_FILE), "images": len(keys) // len(views), "views": list(views),
            "seconds": seconds}


def run(cfg: Config, if_needed: bool = False, **options: Any) -> None:
    """Load or train the tokenizer, save and verify it, cache the train split's ids (`cache_ids`),
    and score it into metrics/details/tokenizer.json and its headline metrics/tokenizer.json; with
    `if_needed`, only when train_generator.arch generates tokens (else `skip`)."""
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
        # The folder and its metrics files are one set: swapped in together (rcg.io.atomic_dir).
        with atomic_dir(tc.out_dir, after=[tc.metrics_file, tc.details_file]) as tmp:
            save_tokenizer(vq, tmp, tc.arch, provenance)
            verify_tokenizer(vq, tmp)
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            ids = cache_ids(cfg, tmp, device)
            quality = tokenizer_report(vq.to(device), data, evalnet, tc.eval_images, tc.eval_batch_size, tc.seed)
        metrics = {"arch": tc.arch, "source": provenance["source"], "codebook_size": vq.codebook_size,
                   "token_grid": list(vq.token_grid), "input_size": vq.image_size, **quality, "ids": ids,
                   **({"train": summary} if summary else {}), "wall_time_s": round(time.perf_counter() - t0, 1)}
        headline.write_metrics(metrics, tc.metrics_file, tc.details_file, HEADLINE)
        tracker.log_metrics({k: float(v) for k, v in flatten(metrics).items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool)})
        tracker.log_artifact(tc.details_file)
        tracker.log_artifact(Path(tc.out_dir) / "tokenizer.json", "tokenizer")
        log.info("tokenizer (%s, %s): val mse %.5f, psnr %.2f dB, perplexity %.1f of %d codes; wrote %s and %s",
                 tc.arch, provenance["source"], quality["mse"], quality["psnr"], quality["usage"]["perplexity"],
                 vq.codebook_size, tc.out_dir, tc.metrics_file)
