"""`rcg train-generator`: the five conditions end to end, the rep cache, resume (tiny preset)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rcg.generators import load_generator
from rcg.io import PipelineError
from rcg.stages import train_generator
from tests.generator_workspace import build, chdir, load_cfg

# Small tensors: one thread is fastest, and far faster than two on a busy 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gen_root(tiny_workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards + encoder + features (no RDM: training the generator does not need it)."""
    return build(tiny_workspace, tmp_path_factory.mktemp("gen"), rdm=False)


@pytest.fixture
def ws(gen_root: Path, tmp_path: Path) -> Path:
    """A fresh project folder sharing the module's inputs, as the working directory."""
    for name in ("data", "models"):
        (tmp_path / name).mkdir()
    (tmp_path / "data" / "shards").symlink_to(gen_root / "data" / "shards")
    (tmp_path / "data" / "features").symlink_to(gen_root / "data" / "features")
    (tmp_path / "models" / "encoder").symlink_to(gen_root / "models" / "encoder")
    (tmp_path / "params.yaml").write_text((gen_root / "params.yaml").read_text())
    with chdir(tmp_path):
        yield tmp_path


def _metrics(condition: str) -> dict:
    return json.loads(Path(f"metrics/details/generator_{condition}.json").read_text())


@pytest.mark.parametrize("condition", ["cluster", "contrastive", "rep", "none", "label"])
def test_each_condition_trains_and_saves(ws: Path, condition: str) -> None:
    cfg = load_cfg()
    train_generator.run(cfg, condition=condition)
    out = Path("models/generator") / condition
    model, diffusion, meta = load_generator(out)
    assert meta["condition"] == condition and meta["step"] == cfg.train_generator.steps
    assert meta["kwargs"]["input_size"] == 28 and meta["kwargs"]["in_channels"] == 1
    assert meta["classes"] and len(meta["classes"]) == 10
    assert (out / "samples.png").stat().st_size > 0
    m = _metrics(condition)
    assert m["steps"] == cfg.train_generator.steps and m["resumed_from"] is None
    assert m["final_loss"] > 0 and m["train_seconds_total"] > 0
    assert m["train_cpu_seconds_this_run"] > 0  # the budget measure on a shared machine
    assert meta["sampling"]["clip_x0"] == cfg.train_generator.sample_clip_x0 > 0  # pixel space: clamp x0
    assert Path(f"checkpoints/train_generator/{condition}/checkpoint-last.pt").exists()
    if condition == "label":
        assert model.cond.y_embedder.num_embeddings == 11
    if condition in ("rep", "contrastive"):
        assert model.cond.fake_latent.shape == (1, 256) and model.condition == "rep"
    if condition == "cluster":  # the label network over k = 10 clusters (the classes' count), saved beside it
        assert model.condition == "label" and model.cond.y_embedder.num_embeddings == 11
        clusters = json.loads((out / "clusters.json").read_text())
        assert clusters["k"] == 10 and sum(clusters["counts"]) == 256 and 0 < clusters["purity"] <= 1
        assert meta["clusters"]["k"] == m["clusters"]["k"] == 10 and (out / "clusters.safetensors").exists()
    if condition == "contrastive":  # the information bound of the posterior: per logged step, and its mean
        bound = m["posterior"]["info_bound"]
        assert 0 < bound < m["posterior"]["info_bound_max"] == pytest.approx(math.log(1024))
        curve = Path("metrics/curves/generator_contrastive.tsv").read_text().splitlines()
        assert "info_bound" in curve[0].split("\t") and len(curve) == 1 + len(range(2, 7, 2))
    else:
        assert "posterior" not in m


def test_interrupted_run_resumes_from_checkpoint(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import rcg.training as training
    from tests.interrupt import Interrupted, interrupt_after

    cfg = load_cfg()  # tiny: 6 steps, a checkpoint every 3
    with monkeypatch.context() as m:
        interrupt_after(m, 4)
        with pytest.raises(Interrupted):
            train_generator.run(cfg, condition="rep")
    state = torch.load("checkpoints/train_generator/rep/checkpoint-last.pt", weights_only=True)
    assert state["step"] == 3
    assert not Path("models/generator/rep/generator.safetensors").exists()

    real_step, counted = training._train_step, {"n": 0}

    def counting_step(*args, **kwargs):
        counted["n"] += 1
        return real_step(*args, **kwargs)

    monkeypatch.setattr(training, "_train_step", counting_step)
    train_generator.run(cfg, condition="rep")
    assert counted["n"] == 3  # only the steps after the checkpoint
    m = _metrics("rep")
    assert m["resumed_from"] == 3 and m["steps"] == 6
    _, _, meta = load_generator("models/generator/rep")
    assert meta["step"] == 6

    # Raising `steps` continues the finished run; changing what is learned starts over.
    train_generator.run(load_cfg(train_generator__steps=8), condition="rep")
    assert _metrics("rep")["resumed_from"] == 6 and counted["n"] == 5
    # Rerunning a finished run trains nothing but still writes the model and its (conditioned) grid,
    # and reports the finished training: its loss and total time, no speed of its own.
    finished = _metrics("rep")
    Path("models/generator/rep/samples.png").unlink()
    train_generator.run(load_cfg(train_generator__steps=8), condition="rep")
    assert counted["n"] == 5 and _metrics("rep")["resumed_from"] == 8
    again = _metrics("rep")
    assert again["final_loss"] == finished["final_loss"] and again["final_loss"] > 0
    assert again["train_seconds_total"] == finished["train_seconds_total"]
    assert again["train_seconds_this_run"] == 0.0 and again["images_per_s"] is None
    assert Path("models/generator/rep/samples.png").stat().st_size > 0
    train_generator.run(load_cfg(train_generator__lr=5e-4), condition="rep")
    assert _metrics("rep")["resumed_from"] is None


def test_checkpoints_resume_only_on_the_same_inputs(ws: Path) -> None:
    """A new encoder invalidates the `rep` and `contrastive` checkpoints (not the others), new
    features the `cluster` one; new shards invalidate all."""
    import shutil

    from rcg.encoders import load_encoder, save_encoder

    cfg = load_cfg()
    enc_dir = Path("models/encoder")
    target = enc_dir.resolve()
    enc_dir.unlink()  # the shared symlink: change a private copy
    shutil.copytree(target, enc_dir)
    before = {c: train_generator.resume_fingerprint(cfg, c) for c in train_generator.CONDITIONS}
    assert len(set(before.values())) == 5
    enc = load_encoder(enc_dir)
    with torch.no_grad():
        enc.vit.head[0].weight.mul_(1.01)  # a retrained encoder: other weights, same architecture
    save_encoder(enc, enc.spec, enc_dir)
    after = {c: train_generator.resume_fingerprint(cfg, c) for c in before}
    assert after["rep"] != before["rep"] and after["contrastive"] != before["contrastive"]
    assert [after[c] for c in ("none", "label", "cluster")] == [before[c] for c in ("none", "label", "cluster")]
    # The settings added with the cluster and posterior conditions, at their defaults, leave every
    # fingerprint as it was before they existed (older checkpoints resume); changed, they count.
    assert load_cfg().train_generator.rep_posterior == "none"
    assert train_generator.resume_fingerprint(load_cfg(train_generator__clusters=5), "cluster") != after["cluster"]

    shards = Path("data/shards")
    target = shards.resolve()
    shards.unlink()
    shutil.copytree(target, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["fingerprint"] = "re-sharded"
    (shards / "manifest.json").write_text(json.dumps(manifest))
    resharded = {c: train_generator.resume_fingerprint(cfg, c) for c in before}
    assert all(resharded[c] != after[c] for c in before)


def test_stale_cache_is_detected(ws: Path) -> None:
    import pyarrow.parquet as pq

    from rcg.features import read_features, to_table, write_features

    f = read_features("data/features/train.parquet")
    Path("data/features").unlink()  # the symlink; write a private, corrupted copy
    Path("data/features").mkdir()
    labels = [int(v) if v >= 0 else None for v in f.labels.tolist()]
    write_features("data/features/train.parquet", [to_table(f.keys, labels, f.views, (f.reps + 1.0).numpy())])
    assert pq.read_metadata("data/features/train.parquet").num_rows == len(f)
    with pytest.raises(PipelineError, match="differ from the encoder"):
        train_generator.run(load_cfg(), condition="rep")


def test_encoder_on_the_fly_matches_cache(ws: Path) -> None:
    """rep_source=encoder trains too, and the cache lookup returns the encoder's reps of the crop."""
    from rcg.data.loader import make_loader
    from rcg.encoders import load_encoder

    cfg = load_cfg(train_generator__rep_source="encoder")
    train_generator.run(cfg, condition="rep")
    assert _metrics("rep")["steps"] == cfg.train_generator.steps

    from rcg.features import RepCache

    cache = RepCache("data/features/train.parquet")
    enc = load_encoder("models/encoder")
    batch = next(iter(make_loader(cfg.data, "train", "once", 8)))
    flipped = torch.tensor([False, True] * 4)
    x = torch.where(flipped[:, None, None, None], batch["image"].flip(-1), batch["image"])
    with torch.no_grad():
        assert torch.allclose(cache.lookup(batch["key"], flipped), enc(x), atol=1e-4)


def test_label_baseline_without_labels_is_a_recorded_skip(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = train_generator.read_manifest("data/shards")
    monkeypatch.setattr(train_generator, "read_manifest", lambda d: {**manifest, "classes": []})
    train_generator.run(load_cfg(), condition="label")
    reason = json.loads(Path("models/generator/label/skipped.json").read_text())["reason"]
    assert "no classes" in reason and "label baseline" in reason
    assert _metrics("label") == {"condition": "label", "skipped": reason}
    assert not Path("models/generator/label/generator.safetensors").exists()
    with pytest.raises(PipelineError, match="rep, none, label, cluster or contrastive"):
        train_generator.run(load_cfg(), condition="labels")


def test_rep_posterior_option_conditions_rep_on_bank_samples(ws: Path) -> None:
    """`rep_posterior: contrastive` trains the rep generator on posterior draws: hypersphere samples
    (per-sample mean 0, std 1), near the image's own rep at a low temperature, never the rep itself."""
    from rcg.generators.training import Conditions, Inputs, uses_posterior

    cfg = load_cfg(train_generator__rep_posterior="contrastive", train_generator__posterior_temperature=1e-6,
                   train_generator__posterior_bank=64)
    gcfg = cfg.train_generator
    assert uses_posterior(gcfg, "rep") and uses_posterior(load_cfg().train_generator, "contrastive")
    assert not uses_posterior(load_cfg().train_generator, "rep")
    inputs = Inputs("data/features/train.parquet", "models/encoder", [], 256)
    cond = Conditions(gcfg, inputs, "rep", torch.device("cpu"), verify=False)
    from rcg.data.loader import make_loader

    batch = next(iter(make_loader(cfg.data, "train", "once", 8)))
    flipped = torch.zeros(8, dtype=torch.bool)
    own = cond.rep(batch, batch["image"], flipped)
    drawn = cond(batch, batch["image"], flipped)["rep"]
    assert drawn.shape == own.shape and not torch.allclose(drawn, own)
    assert torch.allclose(drawn.mean(1), torch.zeros(8), atol=1e-5) and torch.allclose(drawn.std(1), torch.ones(8), atol=1e-5)
    cos = torch.nn.functional.cosine_similarity(drawn, own)
    assert (cos > 0.1).all()  # the nearest of 64 random directions in 255 dims: clearly positive
    assert cond.posterior.take_mean()["info_bound"] == pytest.approx(math.log(64), abs=1e-3)
    train_generator.run(cfg, condition="rep")
    assert _metrics("rep")["posterior"]["bank"] == 64
