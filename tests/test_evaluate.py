"""The evaluate stage end to end on tiny shards, with a stand-in generator, and the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from rcg import cli, config
from rcg.features import to_table, write_features
from rcg.io import PipelineError, read_json
from rcg.metrics import evaluation
from rcg.metrics.fidelity import read_real_images
from rcg.metrics.report import format_report
from rcg.stages import evalnet as evalnet_stage
from rcg.stages import evaluate as evaluate_stage
from tests.conftest import tiny_params
from tests.fakes import adm_reference_npz

MODE_NOISE = {"uncond": 0.45, "label": 0.1, "rcg": 0.15, "rcg_class": 0.1, "oracle": 0.03, "oracle_val": 0.05,
              "cluster": 0.1, "hypersphere": 0.3, "contrastive": 0.35}
# The stand-in's clustering: 5 clusters, uneven, each showing one class (its majority class).
CLUSTERS = {"k": 5, "counts": [50, 5, 10, 20, 15], "majority_class": [1, 3, 5, 7, 9]}


class StandIn:
    """Plays rcg.metrics.evaluation.ModeGenerators: real train images plus mode-dependent noise.

    `label` returns images of the asked-for class, `rcg_class` of the *next* class (so its class
    accuracy must come out low), `cluster` of its cluster's majority class, `rcg` with guidance is
    cleaner than without.
    """

    def __init__(self, cfg: config.Config) -> None:
        self.images, self.labels = read_real_images(cfg.data, "train")
        self.calls: list[dict[str, Any]] = []
        self.strips: list[dict[str, Any]] = []

    def sample(self, mode, n, *, class_ids=None, reps=None, cfg=0.0, cfg_schedule="linear", steps=None,
               seed=0, batch_size=250, progress=False) -> torch.Tensor:
        self.calls.append(dict(mode=mode, n=n, class_ids=class_ids, reps=reps, cfg_scale=cfg,
                               cfg_schedule=cfg_schedule, steps=steps, seed=seed))
        g = torch.Generator().manual_seed(seed)
        if class_ids is not None:
            k = int(self.labels.max()) + 1
            if mode == "cluster":
                want = torch.tensor(CLUSTERS["majority_class"])[class_ids]
            else:
                want = class_ids if mode == "label" else (class_ids + 1) % k
            idx = torch.stack([torch.nonzero(self.labels == c)[int(torch.randint(100, (), generator=g))
                               % int((self.labels == c).sum())][0] for c in want])
        else:
            idx = torch.randint(len(self.images), (n,), generator=g)
        x = self.images[idx].float() / 255.0
        sigma = MODE_NOISE[mode] * (0.5 if cfg > 0 else 1.0)
        return (x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1)

    def cluster_meta(self) -> dict:
        return CLUSTERS

    def interpolate(self, rep_a, rep_b, points=8, *, seed=0, steps=None, batch_size=250) -> torch.Tensor:
        self.strips.append(dict(rep_a=rep_a, rep_b=rep_b, points=points, seed=seed, steps=steps))
        return torch.rand(len(rep_a) * points, *self.images.shape[1:], generator=torch.Generator().manual_seed(seed))


def _write_features(split: str, labels: list[int], seed: int) -> torch.Tensor:
    reps = np.random.default_rng(seed).standard_normal((len(labels), 256)).astype(np.float32)
    keys = [f"{split}{i:05d}" for i in range(len(labels))]
    write_features(f"data/features/{split}.parquet", [to_table(keys, labels, ["orig"] * len(labels), reps)])
    return torch.from_numpy(reps)


@pytest.fixture
def workspace(in_workspace: Path) -> Path:
    """Tiny shards + a trained tiny evalnet + features files (train labels skewed towards class 3)."""
    (in_workspace / "params.yaml").write_text(tiny_params(evalnet={"epochs": 6.0}))
    evalnet_stage.run(config.load("params.yaml"))
    _write_features("train", [3] * 50 + list(range(10)) * 5, seed=0)
    _write_features("val", list(range(10)) * 4, seed=1)
    return in_workspace


def test_evaluate_writes_every_mode_floor_class_accuracy_and_plots(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config.load("params.yaml")
    ev = cfg.evaluate
    gen = StandIn(cfg)
    reads: list[str] = []
    real_read = evaluation._real_batches
    monkeypatch.setattr(evaluation, "_real_batches",
                        lambda data_cfg, split, n, *a: (reads.append(split), real_read(data_cfg, split, n, *a))[1])
    res = evaluate_stage.evaluate(cfg, gen)

    assert read_json(ev.details_file) == json.loads(json.dumps(res))
    assert res["extractor"] == "evalnet" and "not FID" in res["fd_is"]
    assert res["n_samples"] == ev.n_samples == 32 and res["n_reference"] == 256
    assert set(res["modes"]) == set(ev.modes)
    for row in [res["floor"], *res["modes"].values()]:
        assert {"fd", "is", "kid", "precision", "recall", "seconds"} <= set(row)
        assert all(np.isfinite(v) for v in row.values())
    fd = {m: r["fd"] for m, r in res["modes"].items()}
    assert fd["oracle"] < fd["uncond"] and res["floor"]["fd"] < fd["uncond"]
    assert fd["rcg_cfg"] < fd["rcg"]  # the stand-in's guidance halves the noise

    # Class-conditional quality: `label` samples show the asked-for class, `rcg_class` the next one,
    # `cluster` its cluster's majority class (what its accuracy is measured against).
    acc = res["class_accuracy"]
    assert set(acc) == {"label", "rcg_class", "cluster"} and len(acc["label"]["per_class"]) == 10
    assert acc["label"]["overall"] > acc["rcg_class"]["overall"] + 0.2
    assert acc["cluster"]["overall"] > acc["rcg_class"]["overall"] + 0.2
    assert len(acc["cluster"]["per_class"]) == 5  # the five majority classes, each asked for
    assert res["modes"]["label"]["class_accuracy"] == acc["label"]["overall"]
    # CAS: a classifier trained on each class mode's images, tested on the real val split; the
    # mislabelled rcg_class images teach the wrong classes.
    cas = res["cas"]
    assert set(cas["modes"]) == {"label", "rcg_class", "cluster"} and cas["images"] == ev.n_samples
    assert cas["real_evalnet"] == read_json(cfg.evalnet.metrics_file)["test_accuracy"]
    assert res["modes"]["label"]["cas"] == cas["modes"]["label"] > cas["modes"]["rcg_class"] + 0.1
    assert "cas" not in res["modes"]["rcg"] and "fd_mean" not in res["modes"]["rcg"] and res["seeds"] == [0]

    # What the generator was asked for.
    calls = {c["mode"] if c["cfg_scale"] == 0 else "rcg_cfg": c for c in gen.calls if c["n"] == ev.n_samples}
    assert calls["rcg_cfg"]["mode"] == "rcg" and calls["rcg_cfg"]["cfg_scale"] == ev.cfg
    assert calls["rcg"]["cfg_scale"] == 0.0 and calls["uncond"]["class_ids"] is None
    assert all(c["steps"] == ev.sample_steps for c in gen.calls)
    assert torch.equal(calls["label"]["class_ids"], calls["rcg_class"]["class_ids"])
    # Real train frequencies: 55 of 100 train labels are class 3 -> round(0.55 * 32) = 18 asks;
    # clusters with their train frequencies (largest remainder): 32 x [0.5, 0.05, 0.1, 0.2, 0.15].
    assert int((calls["label"]["class_ids"] == 3).sum()) == 18
    assert torch.bincount(calls["cluster"]["class_ids"], minlength=5).tolist() == [16, 2, 3, 6, 5]
    assert calls["hypersphere"]["class_ids"] is None and calls["contrastive"]["reps"] is None
    # oracle: real train reps (Table 9a's); oracle_val: real val reps.
    val_reps, train_reps = _read_reps("val"), _read_reps("train")
    assert all(any(torch.equal(r, v) for v in train_reps) for r in calls["oracle"]["reps"])
    assert all(any(torch.equal(r, v) for v in val_reps) for r in calls["oracle_val"]["reps"])

    # Fig. 7's strips: 4 rows between consecutive pairs of the oracle's val reps, 8 images each.
    (strip,) = gen.strips
    oracle = calls["oracle_val"]["reps"]
    assert strip["points"] == evaluation.INTERP_POINTS and strip["seed"] == ev.seed
    assert torch.equal(strip["rep_a"], oracle[0:8:2]) and torch.equal(strip["rep_b"], oracle[1:8:2])

    plots = Path(ev.plots_dir)
    for mode in ev.modes:
        assert (plots / f"samples_{mode}.png").stat().st_size > 0
    assert (plots / "interpolation.png").exists()
    assert sorted(reads) == ["train", "val"]  # the floor's train images and the reference, once each

    # A second run reuses the cached real-image features: no real image is read again.
    reads.clear()
    again = evaluate_stage.evaluate(cfg, StandIn(cfg))
    assert reads == [] and again["floor"]["fd"] == pytest.approx(res["floor"]["fd"])

    # The report: a Markdown table with every mode, the floor and the paper's numbers.
    text = format_report(res, read_json(cfg.evalnet.metrics_file))
    assert "| mode | fd (evalnet) |" in text and "5.07 / 142.5" in text and "floor" in text
    for mode in ev.modes:
        assert f"| {mode} (" in text
    assert "FID |" not in text.split("\n\n")[2]  # the column is fd under evalnet, never FID
    assert "| cluster (k-means cluster labels) |" in text and "6.60 / 121.9" in text
    assert "Paper Table 9a (MAGE-B, ImageNet 256x256, FID): oracle 4.37, rcg 5.07, label 5.83, cluster 6.60" in text
    assert "different measure on different data" in text and "CAS (Ravuri & Vinyals 2019)" in text
    # ... and the MLflow table: one row per mode, CAS among the columns.
    from rcg.metrics.report import table_rows

    rows = {r["mode"]: r for r in table_rows(res)}
    assert set(rows) == {*ev.modes, "floor"} and rows["label"]["cas"] == cas["modes"]["label"]


def _read_reps(split: str) -> torch.Tensor:
    from rcg.features import read_features

    return read_features(f"data/features/{split}.parquet", view="orig").reps


def test_unknown_mode_is_a_clear_error_and_too_many_samples_are_capped(
    in_workspace: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config.load("params.yaml")
    cfg.evaluate.modes = ["rcg", "dream"]
    with pytest.raises(PipelineError, match="dream"):
        evaluate_stage.evaluate(cfg, StandIn(cfg))
    # More samples than train images (the floor's real side): as many as there are, with a warning.
    cfg = config.load("params.yaml")
    cfg.evaluate.n_samples = 10**6
    with caplog.at_level("WARNING"), pytest.raises(PipelineError, match="run `rcg evalnet` first"):
        evaluate_stage.evaluate(cfg, StandIn(cfg))  # (this workspace has no evaluation network)
    assert any("n_samples=1000000, but the train split has 256 images" in r.message for r in caplog.records)


def test_class_ids_follow_the_given_frequencies_exactly() -> None:
    ids = evaluation.class_ids_for(torch.tensor([1.0, 1.0, 2.0]), 10, seed=0)
    counts = torch.bincount(ids, minlength=3).tolist()
    assert sum(counts) == 10 and counts[2] == 5 and sorted(counts[:2]) == [2, 3]
    assert torch.equal(ids, evaluation.class_ids_for(torch.tensor([1.0, 1.0, 2.0]), 10, seed=0))


def test_generate_mode_draws_in_chunks_with_their_own_seeds() -> None:
    ev = config.EvaluateConfig(batch_size=2, cfg=1.5, sample_steps=3)  # chunks of 10 batches: 20 images
    calls: list[tuple] = []

    class Fixed:
        def sample(self, mode, n, **kw):
            calls.append((mode, n, kw["seed"], kw["cfg"], kw["steps"], kw["batch_size"]))
            return torch.full((n, 1, 4, 4), 0.5)

    class Features:  # what the protocol hands images to (rcg.metrics.fidelity.Featurizer): kept here
        def __init__(self) -> None:
            self.seen: list[torch.Tensor] = []

        def add(self, images: torch.Tensor) -> None:
            self.seen.append(images)

        def finish(self) -> dict:
            return {"all": torch.cat(self.seen)}

    out = evaluation.generate_mode(Fixed(), "rcg_cfg", 45, ev, (1, 4, 4), Features(), seed=3)
    seen = out.features["all"]
    assert seen.dtype == torch.uint8 and seen.shape == (45, 1, 4, 4) and int(seen[0, 0, 0, 0]) == 128
    assert out.grid.shape == (min(45, ev.grid_size), 1, 4, 4) and out.predictions is None
    # rcg_cfg is rcg with guidance; chunk i uses seed + 1000 i (a call uses seed and seed + 1)
    assert calls == [("rcg", 20, 3, 1.5, 3, 2), ("rcg", 20, 1003, 1.5, 3, 2), ("rcg", 5, 2003, 1.5, 3, 2)]
    with pytest.raises(PipelineError, match="expected"):
        evaluation.generate_mode(Fixed(), "uncond", 4, ev, (3, 4, 4), Features())


def test_report_claims_and_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    results = {
        "extractor": "evalnet", "fd_is": "Frechet distance on evalnet features (not FID)", "n_samples": 100,
        "n_reference": 200, "sample_steps": 5, "floor": {"fd": 0.5},
        "modes": {"uncond": {"fd": 10.0}, "label": {"fd": 5.0}, "rcg": {"fd": 6.0}, "oracle": {"fd": 4.0},
                  "rcg_class": {"fd": 6.5, "class_accuracy": 0.85}},
    }
    text = format_report(results)
    assert "- [NO] rcg fd <= 0.5 x uncond fd" in text
    assert "- [NO] rcg fd <= label fd" in text
    assert "- [yes] oracle fd <= rcg fd" in text
    assert "- [NO] rcg fd <= 10 x the floor's (6.000 vs 10 x 0.500)" in text
    assert "- [yes] rcg_class samples classified" in text
    assert "noise" not in text  # one draw: no spread to judge by

    # Three seeds: an ordering is beyond the noise when the means differ by more than 2 standard errors.
    seeded = json.loads(json.dumps(results))
    seeded["seeds"] = [0, 1, 2]
    seeded["modes"]["rcg"].update(fd_mean=6.0, fd_std=0.3)
    seeded["modes"]["label"].update(fd_mean=6.1, fd_std=0.3)  # 0.1 apart, 2 s.e. = 0.49
    seeded["modes"]["oracle"].update(fd_mean=4.0, fd_std=0.1)  # 2.0 apart, 2 s.e. = 0.37
    text = format_report(seeded)
    assert "- [yes] rcg fd <= label fd (6.000 vs 6.100; paper 5.07 vs 5.83), within the noise (2 x s.e. 0.490)" in text
    assert "- [yes] oracle fd <= rcg fd (4.000 vs 6.000; paper 4.37 vs 5.07), beyond the noise (2 x s.e. 0.365)" in text

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(tiny_params())
    (tmp_path / "metrics" / "details").mkdir(parents=True)
    (tmp_path / "metrics" / "details" / "eval.json").write_text(json.dumps(results))
    assert cli.main(["report"]) == 0
    assert "| uncond (no condition) | 10.000 |" in capsys.readouterr().out


def yaml_params() -> dict:
    import yaml

    return yaml.safe_load(tiny_params())


def _val_reference_npz(cfg: config.Config, path: Path, with_images: bool) -> None:
    """An ADM-format reference file made of this workspace's val split: mu/sigma of its evalnet
    features (what ADM's file holds for Inception) and, optionally, the images as arr_0 (NHWC)."""
    from rcg.metrics.fidelity import Featurizer

    fz = Featurizer("evalnet", Path(cfg.evalnet.out_dir) / "evalnet.safetensors", cfg.evaluate.feature_batch_size)
    adm_reference_npz(path, read_real_images(cfg.data, "val")[0], fz, with_images)


def test_adm_reference_statistics_give_the_val_reference_numbers(workspace: Path) -> None:
    """FID against a reference file's mu/sigma (ADM's protocol) equals FID against the images it was
    made of; KID and precision/recall use its arr_0; without arr_0 they are skipped with a reason."""
    cfg = config.load("params.yaml")
    cfg.evaluate.modes = ["uncond", "rcg"]
    base = evaluate_stage.evaluate(cfg, StandIn(cfg))
    _val_reference_npz(cfg, Path("adm.npz"), with_images=True)
    cfg.evaluate.reference_stats = "adm.npz"
    adm = evaluate_stage.evaluate(cfg, StandIn(cfg))
    assert adm["reference"] == "reference statistics adm.npz" and adm["n_reference"] == 256
    for mode in ("uncond", "rcg"):
        assert adm["modes"][mode]["fd"] == pytest.approx(base["modes"][mode]["fd"], rel=1e-6)  # float64 statistics against float32 ones
        assert adm["modes"][mode]["precision"] == base["modes"][mode]["precision"]
    _val_reference_npz(cfg, Path("stats_only.npz"), with_images=False)
    cfg.evaluate.reference_stats = "stats_only.npz"
    only = evaluate_stage.evaluate(cfg, StandIn(cfg))
    assert only["modes"]["rcg"]["fd"] == pytest.approx(base["modes"]["rcg"]["fd"], rel=1e-6)  # float64 statistics against float32 ones
    assert "precision" not in only["modes"]["rcg"] and "arr_0" in only["skipped"]["precision"]
    np.savez("broken.npz", mu=np.zeros(3))
    cfg.evaluate.reference_stats = "broken.npz"
    with pytest.raises(PipelineError, match=r"broken.npz: not a reference statistics file: missing sigma"):
        evaluate_stage.evaluate(cfg, StandIn(cfg))
    np.savez("wrong_dim.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    cfg.evaluate.reference_stats = "wrong_dim.npz"
    with pytest.raises(PipelineError, match=r"2048-d features, but .* has 16 dimensions"):
        evaluate_stage.evaluate(cfg, StandIn(cfg))


def test_uniform_classes_and_samples_written_for_other_evaluators(workspace: Path) -> None:
    """class_balance uniform asks for exactly n / K of each class (ADM's 50 per class); samples are
    written as PNGs and as ADM's npz (arr_0, NHWC uint8) while they are scored."""
    from PIL import Image

    cfg = config.load("params.yaml")
    cfg.evaluate.modes, cfg.evaluate.n_samples, cfg.evaluate.class_balance = ["label"], 30, "uniform"
    cfg.evaluate.save_samples = "both"
    gen = StandIn(cfg)
    evaluate_stage.evaluate(cfg, gen)
    asked = torch.cat([c["class_ids"] for c in gen.calls if c["class_ids"] is not None])
    assert torch.bincount(asked, minlength=10).tolist() == [3] * 10
    arr = np.load(Path(cfg.evaluate.samples_dir) / "label" / "samples.npz", allow_pickle=False)["arr_0"]
    pngs = sorted((Path(cfg.evaluate.samples_dir) / "label").glob("*.png"))
    assert arr.shape == (30, 28, 28, 1) and arr.dtype == np.uint8 and len(pngs) == 30
    assert np.array_equal(np.asarray(Image.open(pngs[7])), arr[7, :, :, 0])
    cfg.evaluate.n_samples = 31
    with pytest.raises(PipelineError, match="not a multiple of the 10 classes"):
        evaluate_stage.evaluate(cfg, StandIn(cfg))


def test_seeds_give_each_mode_a_mean_and_spread_of_fd(workspace: Path) -> None:
    """evaluate.seeds: one draw per seed (its images, class ids) of the modes in evaluate.seed_modes,
    the others drawn once; the seeded rows keep the first draw's numbers and add fd_seed_<s>, fd_mean
    and fd_std; the report shows mean +- std for them and the one fd for the others."""
    cfg = config.load("params.yaml")
    ev = cfg.evaluate
    ev.modes, ev.seeds, ev.seed_modes, ev.cas_samples = ["uncond", "label"], [0, 2], ["label", "rcg"], 0
    gen = StandIn(cfg)
    res = evaluate_stage.evaluate(cfg, gen)
    assert res["seeds"] == [0, 2] and "cas" not in res and "cas" not in res["skipped"]
    row = res["modes"]["label"]
    assert row["fd_seed_0"] == row["fd"] and row["fd_seed_2"] != row["fd"]
    assert row["fd_mean"] == pytest.approx((row["fd_seed_0"] + row["fd_seed_2"]) / 2)
    assert row["fd_std"] == pytest.approx(abs(row["fd_seed_0"] - row["fd_seed_2"]) / 2 ** 0.5)
    assert not any(k.startswith("fd_") for k in res["modes"]["uncond"])  # not a seed mode: one draw
    first = {c["mode"]: c for c in gen.calls if c["seed"] == 0}
    second = {c["mode"]: c for c in gen.calls if c["seed"] == 2}
    assert set(first) == {"uncond", "label"} and set(second) == {"label"}
    assert torch.equal(torch.bincount(first["label"]["class_ids"]), torch.bincount(second["label"]["class_ids"]))
    assert not torch.equal(first["label"]["class_ids"], second["label"]["class_ids"])  # the draw's own order
    assert read_json(ev.metrics_file)["modes"]["label"] == {"fd": row["fd"]}
    text = format_report(res)
    assert "mean ± std, over 2 seeds" in text
    assert f"| label (real class labels) | {row['fd_mean']:.3f} ± {row['fd_std']:.3f} |" in text
    assert f"| uncond (no condition) | {res['modes']['uncond']['fd']:.3f} |" in text

    # seed_modes []: every mode is drawn once per seed.
    ev.seed_modes = []
    gen = StandIn(cfg)
    res = evaluate_stage.evaluate(cfg, gen)
    assert all("fd_std" in r for r in res["modes"].values())
    assert sorted(c["mode"] for c in gen.calls if c["seed"] == 2) == ["label", "uncond"]


def test_cas_is_high_for_real_images_of_their_class_and_chance_for_noise(in_workspace: Path) -> None:
    """CAS (rcg.metrics.cas): a classifier of the evaluation network's architecture trained on images
    that are real train images of their class scores well on the val split (exactly as its real-data
    baseline, the same images); trained on noise, it scores near chance (10 classes)."""
    import dataclasses

    from rcg.data.loader import read_manifest
    from rcg.metrics.cas import cas_table, real_train_set
    from rcg.metrics.evalnet import EvalNet, save_evalnet

    cfg = config.load("params.yaml")
    classes = read_manifest(cfg.data.shards_dir)["classes"]
    save_evalnet(EvalNet(1, 28, len(classes), width=8, feature_dim=16), cfg.evalnet.out_dir,
                 extra={"classes": classes, "test_accuracy": 0.9})
    images, labels = real_train_set(cfg.data, 256)
    assert images.dtype == torch.uint8 and images.shape == (256, 1, 28, 28) and len(labels) == 256
    noise = torch.randint(0, 256, images.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    ev = dataclasses.replace(cfg.evaluate, cas_steps=150, cas_batch_size=32)
    table = cas_table({"label": (images, labels), "noise": (noise, labels)}, ev, cfg.data,
                      Path(cfg.evalnet.out_dir) / "evalnet.safetensors", classes)
    assert table["modes"]["label"] > 0.5 and table["modes"]["noise"] < 0.25
    assert table["real_same_budget"] == table["modes"]["label"] and table["real_evalnet"] == 0.9
    assert table["images"] == 256 and table["steps"] == 150
