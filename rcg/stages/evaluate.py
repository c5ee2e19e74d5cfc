"""`rcg evaluate`: every generation mode scored with torch-fidelity (DESIGN.md's headline table).

For each mode in `evaluate.modes` it generates `evaluate.n_samples` images with
`rcg.sampling.generate_images` and computes, against the cached statistics of the real val images,
the Frechet distance under the configured extractor (`fd`), IS, KID, precision and recall
(REFERENCE.md sections 4 and 10). Modes:

- `uncond`: the generator trained with no condition (the baseline the paper beats);
- `label`: the generator trained on class labels, given labels with the train split's frequencies
  (paper Table 9a's baseline);
- `rcg` / `rcg_cfg`: the representation-conditioned generator on RDM samples, without / with
  guidance (`evaluate.cfg`);
- `rcg_class`: the same generator on class-conditional RDM samples (same labels as `label`);
- `oracle`: the same generator on representations of real val images (paper Table 9a's oracle).

`floor` scores N real train images the same way: the best any mode can do at this N. The
classifier's accuracy on `label` and `rcg_class` samples against the asked-for class measures
class-conditional quality. Writes metrics/eval.json, plots/ and logs both to MLflow.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rcg.config import Config
from rcg.data.loader import read_manifest
from rcg.features import read_features
from rcg.io import PipelineError, file_digest, get_logger, write_json
from rcg.metrics.evalnet import class_accuracy, classify, load_evalnet
from rcg.metrics.extractors import extractor_setup
from rcg.metrics.fidelity import (
    LazyImages,
    UInt8Images,
    cache_name,
    fidelity_metrics,
    read_real_images,
    to_uint8,
)
from rcg.metrics.plots import mlflow_curves
from rcg.tracking import Tracker, stage_run

log = get_logger(__name__)

MODES = ("uncond", "label", "rcg", "rcg_cfg", "rcg_class", "oracle")
CLASS_MODES = ("label", "rcg_class")  # modes that are asked for a class
INTERP_STEPS = 8  # images per interpolation strip
# generate_images(cfg, mode, n, *, class_ids, reps, cfg_scale, cfg_schedule, steps, seed,
#                 batch_size, progress) -> float [n, C, H, W] in [0, 1] (rcg.sampling)
GenerateFn = Callable[..., torch.Tensor]


def class_frequencies(cfg: Config, manifest: dict[str, Any]) -> torch.Tensor:
    """Train-split class counts [K]: from the manifest if it has them, else the train features."""
    k = len(manifest["classes"])
    counts = manifest["splits"]["train"].get("class_counts")
    if counts:
        return torch.as_tensor([float(counts[c]) if isinstance(counts, dict) else float(counts[i])
                                for i, c in enumerate(manifest["classes"])])
    path = Path(cfg.encode.out_dir) / "train.parquet"
    if path.exists():
        labels = read_features(path, view="orig").labels
        return torch.bincount(labels[labels >= 0], minlength=k).double()[:k]
    log.warning("no class counts in the manifest and no %s: asking for every class equally often", path)
    return torch.ones(k, dtype=torch.float64)


def class_ids_for(freq: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """`n` labels with exactly the frequencies `freq` (largest remainder), in seeded random order."""
    share = freq.double() / freq.sum() * n
    counts = share.floor().long()
    rest = n - int(counts.sum())
    counts[torch.argsort(share - counts, descending=True)[:rest]] += 1
    ids = torch.repeat_interleave(torch.arange(len(freq)), counts)
    return ids[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]


def oracle_reps(cfg: Config, n: int, seed: int) -> torch.Tensor:
    """Representations of `n` real val images (original view), drawn without replacement if possible."""
    feats = read_features(Path(cfg.encode.out_dir) / "val.parquet", view="orig")
    if len(feats) == 0:
        raise PipelineError(f"{cfg.encode.out_dir}/val.parquet: no val representations for mode oracle")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(feats), generator=g)[:n] if n <= len(feats) else torch.randint(len(feats), (n,), generator=g)
    return feats.reps[idx].clone()


def generate_mode(
    generate: GenerateFn,
    cfg: Config,
    mode: str,
    n: int,
    *,
    class_ids: torch.Tensor | None = None,
    reps: torch.Tensor | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """`n` images of `mode` as uint8 [n, C, H, W], generated in chunks so memory stays bounded."""
    ev = cfg.evaluate
    base = "rcg" if mode == "rcg_cfg" else mode  # rcg_cfg is the rcg mode with guidance
    scale = ev.cfg if mode == "rcg_cfg" else 0.0
    chunk = 10 * ev.batch_size  # float images of one chunk live in memory at once
    out = []
    for i, start in enumerate(range(0, n, chunk)):
        m = min(chunk, n - start)
        x = generate(
            cfg,
            base,
            m,
            class_ids=None if class_ids is None else class_ids[start : start + m],
            reps=None if reps is None else reps[start : start + m],
            cfg_scale=scale,
            cfg_schedule=ev.cfg_schedule,
            steps=ev.sample_steps,
            seed=seed + 1000 * i,  # generate_images uses seed and seed + 1 inside a call
            batch_size=ev.batch_size,
            progress=True,
        )
        want = (m, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
        if tuple(x.shape) != want:
            raise PipelineError(f"mode {mode}: generator returned shape {tuple(x.shape)}, expected {want}")
        out.append(to_uint8(x))
    return torch.cat(out)


def interpolation_strips(
    generate: GenerateFn, cfg: Config, reps: torch.Tensor, pairs: int = 4, steps: int = 8
) -> torch.Tensor:
    """Images from (1 - t) r_a + t r_b for t in [0, 1] (paper Fig. 7; linear, issue #20).

    Row j interpolates between reps[2j] and reps[2j + 1]; every column reuses the same seed, so a
    row differs only in its representation. Returns float [pairs * steps, C, H, W], row-major.
    """
    a, b = reps[0 : 2 * pairs : 2], reps[1 : 2 * pairs : 2]
    pairs = len(b)
    cols = []
    for t in torch.linspace(0, 1, steps).tolist():
        r = (1 - t) * a[:pairs] + t * b
        cols.append(generate(cfg, "oracle", pairs, reps=r, steps=cfg.evaluate.sample_steps,
                             seed=cfg.evaluate.seed, batch_size=cfg.evaluate.batch_size, progress=False))
    return torch.stack(cols, dim=1).flatten(0, 1).float().clamp(0, 1)  # (pairs*steps, C, H, W)


def evaluate(cfg: Config, generate: GenerateFn, tracker: Tracker | None = None) -> dict[str, Any]:
    """Score every configured mode; write metrics/eval.json and plots/; return the results."""
    from rcg.sampling import save_grid  # upscales small images so the grids are readable

    ev = cfg.evaluate
    tracker = tracker or Tracker(False)
    t_stage = time.perf_counter()
    unknown = [m for m in ev.modes if m not in MODES]
    if unknown:
        raise PipelineError(f"evaluate.modes: unknown mode(s) {unknown} (known: {', '.join(MODES)})")
    manifest = read_manifest(cfg.data.shards_dir)
    classes = list(manifest.get("classes") or [])
    splits = manifest["splits"]
    n_val = int(splits.get("val", {}).get("written", 0))
    n_train = int(splits["train"]["written"])
    n = ev.n_samples
    n_ref = ev.n_reference or n_val
    if n_val == 0 or n_ref > n_val:
        raise PipelineError(f"{cfg.data.shards_dir}: {n_val} val images; the reference needs {n_ref} (evaluate.n_reference)")
    if n > n_train:
        raise PipelineError(f"evaluate.n_samples={n} exceeds the {n_train} train images the floor is measured on")
    plots = Path(ev.plots_dir)

    evalnet_weights = Path(cfg.evalnet.out_dir) / "evalnet.safetensors"
    fe_name, fe_weights = extractor_setup(ev.extractor, evalnet_weights, ev.inception_weights)
    # Everything the real images' features depend on: a changed input never reads a stale cache.
    key = (fe_name, file_digest(fe_weights), manifest.get("fingerprint"), n_train, n_val,
           cfg.data.image_size, cfg.data.channels)
    reference = LazyImages(n_ref, lambda: read_real_images(cfg.data, "val", n_ref)[0])
    common: dict[str, Any] = dict(
        extractor=fe_name, weights=fe_weights, cache_root=ev.cache_dir,
        reference_cache=cache_name("val", n_ref, *key), kid_subset_size=ev.kid_subset_size,
        prc_neighborhood=ev.prc_neighborhood, batch_size=ev.feature_batch_size, seed=ev.seed,
    )
    log.info("evaluate: extractor %s (%s), %d samples per mode against %d val images",
             fe_name, fe_weights, n, n_ref)
    tracker.set_tags({"extractor": fe_name, "fd_is_fid": str(fe_name == "inception-v3-compat")})

    t0 = time.perf_counter()
    train_real = LazyImages(n, lambda: read_real_images(cfg.data, "train", n)[0])
    floor = fidelity_metrics(train_real, reference, generated_cache=cache_name("train", n, *key), **common)
    floor["seconds"] = round(time.perf_counter() - t0, 1)
    log.info("floor (real train vs val): %s", _fmt(floor))
    tracker.log_metrics({f"floor.{k}": v for k, v in floor.items()})

    wants_classes = bool(classes) and any(m in CLASS_MODES for m in ev.modes)
    class_ids = class_ids_for(class_frequencies(cfg, manifest), n, ev.seed) if wants_classes else None
    classifier = None
    if wants_classes:
        if evalnet_weights.exists():
            classifier, meta = load_evalnet(evalnet_weights)
            if meta.get("classes", classes) != classes:
                raise PipelineError(f"{evalnet_weights}: trained on classes {meta.get('classes')}, shards have {classes}")
        else:
            log.warning("%s missing: class accuracy of %s not measured", evalnet_weights, CLASS_MODES)

    results: dict[str, Any] = {
        "extractor": fe_name,
        "fd_is": "FID" if fe_name == "inception-v3-compat" else f"Frechet distance on {fe_name} features (not FID)",
        "n_samples": n,
        "n_reference": n_ref,
        "sample_steps": ev.sample_steps,
        "cfg": ev.cfg,
        "floor": floor,
        "modes": {},
        "class_accuracy": {},
    }
    reps_val = oracle_reps(cfg, n, ev.seed) if "oracle" in ev.modes else None
    for mode in ev.modes:
        if mode in CLASS_MODES and not classes:
            log.warning("mode %s skipped: the shards carry no class labels", mode)
            continue
        t0 = time.perf_counter()
        images = generate_mode(
            generate, cfg, mode, n,
            class_ids=class_ids if mode in CLASS_MODES else None,
            reps=reps_val if mode == "oracle" else None,
            seed=ev.seed,
        )
        t_sample = time.perf_counter() - t0
        row = fidelity_metrics(UInt8Images(images), reference, **common)
        if classifier is not None and mode in CLASS_MODES:
            acc = class_accuracy(classify(classifier, images.float() / 255.0), class_ids, classes)
            results["class_accuracy"][mode] = acc
            row["class_accuracy"] = acc["overall"]
        row["sample_seconds"] = round(t_sample, 1)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        results["modes"][mode] = row
        grid = save_grid(images[: ev.grid_size].float() / 255.0, plots / f"samples_{mode}.png")
        tracker.log_metrics({f"{mode}.{k}": v for k, v in row.items()})
        tracker.log_artifact(grid, "plots")
        log.info("mode %s: %s", mode, _fmt(row))

    if "oracle" in ev.modes and reps_val is not None and len(reps_val) >= 2:
        strips = interpolation_strips(generate, cfg, reps_val, steps=INTERP_STEPS)
        path = save_grid(strips, plots / "interpolation.png", nrow=INTERP_STEPS)
        tracker.log_artifact(path, "plots")
    for path in mlflow_curves(cfg.tracking, plots):
        tracker.log_artifact(path, "plots")
    results["seconds"] = round(time.perf_counter() - t_stage, 1)
    write_json(ev.metrics_file, results)
    tracker.log_metrics({"seconds": results["seconds"]})
    tracker.log_artifact(ev.metrics_file)
    log.info("evaluate: wrote %s and %s/ in %.0f s", ev.metrics_file, plots, results["seconds"])
    return results


def _fmt(row: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in row.items())


def run(cfg: Config, **options: object) -> None:
    """The stage: the real generator (rcg.sampling.generate_images) through `evaluate`."""
    from rcg.sampling import generate_images

    with stage_run(cfg, "evaluate") as tracker:
        evaluate(cfg, generate_images, tracker)
