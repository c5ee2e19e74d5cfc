"""MAGE as the pipeline's image generator (paper section 3.3, Table 9a) on the tiny workspace.

The real stages: `rcg tokenizer --if-needed` trains the tiny VQ tokenizer when train_generator.arch
is a MAGE size and writes a skip marker otherwise; `rcg train-generator` trains `mage_tiny` on its
ids through the shared loop for each condition, with the MAGE recipe (cosine lr, weight decay off
biases and norms, no EMA); `ImageGenerator` / `RCGGenerator` reload it from its folder alone and
sample by iterative decoding, with and without guidance. Also: exact resume, the tokenizer as a
checked input, and the two MAGE presets.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rcg import config
from rcg.generation import ImageGenerator, RCGGenerator
from rcg.generators import build_generator
from rcg.generators.tokens import TokenCodec, tokenizer_digest, weight_decay_groups
from rcg.generators.vae import make_codec
from rcg.io import PipelineError
from rcg.stages import tokenizer, train_generator
from rcg.training import lr_at
from tests.generator_workspace import build, chdir, load_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

# The MAGE recipe on the tiny preset's budget (6 steps, a checkpoint every 3, 3 decoding iterations).
MAGE = dict(train_generator__arch="mage_tiny", train_generator__lr_schedule="cosine", train_generator__lr=2e-3,
            train_generator__weight_decay=0.05, train_generator__ema_decay=0, train_generator__grad_clip=3.0)


def _cfg(**overrides: object) -> config.Config:
    return load_cfg(**{**MAGE, **overrides})


@pytest.fixture(scope="module")
def mage_root(tiny_workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards, encoder, features, RDMs, and the tokenizer the tokenizer stage trains for a MAGE arch."""
    root = build(tiny_workspace, tmp_path_factory.mktemp("mage"))
    with chdir(root):
        tokenizer.run(_cfg(), if_needed=True)
    return root


@pytest.fixture
def ws(mage_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh project folder sharing the module's inputs, as the working directory."""
    monkeypatch.setenv("RCG_PRECISION", "fp32")  # no precision probe: the tests time nothing
    for name in ("data", "models"):
        (tmp_path / name).mkdir()
    for name in ("data/shards", "data/features", "models/encoder", "models/rdm", "models/tokenizer"):
        (tmp_path / name).symlink_to(mage_root / name)
    (tmp_path / "params.yaml").write_text((mage_root / "params.yaml").read_text())
    with chdir(tmp_path):
        yield tmp_path


def _cond(condition: str, n: int) -> dict[str, torch.Tensor]:
    if condition == "rep":
        return {"rep": torch.randn(n, 256, generator=torch.Generator().manual_seed(0))}
    return {"label": torch.arange(n) % 10} if condition == "label" else {}


def test_the_tokenizer_stage_trains_for_a_mage_arch(mage_root: Path) -> None:
    meta = json.loads((mage_root / "models/tokenizer/tokenizer.json").read_text())
    assert meta["arch"] == "vq_tiny" and meta["token_grid"] == [7, 7] and meta["codebook_size"] == 32
    assert not (mage_root / "models/tokenizer/skipped.json").exists()
    record = json.loads((mage_root / "metrics/details/tokenizer.json").read_text())
    assert "mse" in record and record["ids"]["views"] == ["orig", "flip"]  # the train ids, cached
    assert json.loads((mage_root / "metrics/tokenizer.json").read_text())["psnr"] == record["psnr"]


def test_the_tokenizer_stage_skips_for_a_diffusion_arch(ws: Path) -> None:
    """What dvc.yaml runs for the DiT/U-Net presets: a marker in seconds, which a MAGE refuses."""
    blocks = dict(tokenizer__out_dir="models/tok_skip", tokenizer__checkpoint_dir="checkpoints/tok_skip",
                  tokenizer__metrics_file="metrics/tok_skip.json",
                  tokenizer__details_file="metrics/details/tok_skip.json")
    tokenizer.run(load_cfg(**blocks), if_needed=True)  # the tiny preset: dit_tiny
    reason = json.loads(Path("models/tok_skip/skipped.json").read_text())["reason"]
    assert "'dit_tiny' is not a MAGE arch" in reason
    assert sorted(p.name for p in Path("models/tok_skip").iterdir()) == ["skipped.json"]
    assert json.loads(Path("metrics/tok_skip.json").read_text()) == {"skipped": reason}
    assert json.loads(Path("metrics/details/tok_skip.json").read_text()) == {"skipped": reason}
    assert Path("checkpoints/tok_skip").is_dir()  # a DVC output, even when nothing trained
    with pytest.raises(PipelineError, match="tok_skip: the tokenizer stage skipped it"):
        train_generator.run(_cfg(train_generator__tokenizer="models/tok_skip"), condition="none")


@pytest.mark.parametrize("condition", ["rep", "none", "label"])
def test_each_condition_trains_reloads_and_samples(ws: Path, condition: str) -> None:
    cfg = _cfg()
    train_generator.run(cfg, condition=condition)
    out = Path("models/generator") / condition
    gen = ImageGenerator.load(out, "cpu")
    assert gen.meta["codec"] == {"type": "tokens", "path": "models/tokenizer",
                                 "digest": tokenizer_digest("models/tokenizer")}
    assert gen.diffusion is None and "diffusion" not in gen.meta and gen.condition == condition
    kw = gen.meta["kwargs"]
    assert (kw["num_tokens"], kw["codebook_size"], kw["num_classes"]) == (49, 32, 10)  # from the tokenizer
    assert gen.meta["sampling"] == {"sampler": "mage", "steps": 3, "choice_temperature": 6.0, "amp": True}
    assert gen.max_steps == 49 and gen.start_noise(2) is None and (out / "samples.png").stat().st_size > 0
    details = json.loads(Path(f"metrics/details/generator_{condition}.json").read_text())
    assert details["token_ids"] == "cache"  # the tokenizer stage's ids.parquet, not the tokenizer per step

    # No EMA: the written weights are the trained ones; AdamW decays only the >= 2-D weights.
    state = torch.load(f"checkpoints/train_generator/{condition}/checkpoint-last.pt", weights_only=True)
    assert "ema" not in state and state["step"] == 6
    written = load_file(str(out / "generator.safetensors"))
    assert all(torch.equal(written[k], v.float()) for k, v in state["model"].items())
    assert [g["weight_decay"] for g in state["optimizer"]["param_groups"]] == [0.05, 0.0]
    curve = Path(f"metrics/curves/generator_{condition}.tsv").read_text().splitlines()
    assert float(curve[-1].split("\t")[2]) == pytest.approx(lr_at(5, 6, 2e-3, 2, "cosine"))  # cosine after warm-up

    cond = _cond(condition, 4)
    plain = gen.sample(4, **cond, seed=1)
    assert plain.shape == (4, 1, 28, 28) and 0 <= float(plain.min()) and float(plain.max()) <= 1
    assert torch.equal(plain, gen.sample(4, **cond, seed=1))  # a seed fixes the decoding
    guided = gen.sample(4, **cond, cfg=2.0, seed=1)
    assert guided.shape == plain.shape
    assert torch.equal(guided, plain) == (condition == "none")  # nothing to guide without a condition
    with pytest.raises(PipelineError, match="no starting noise"):
        gen.sample(2, **_cond(condition, 2), x_T=torch.zeros(2, 49))


@pytest.mark.parametrize("condition, network", [("cluster", "label"), ("contrastive", "rep")])
def test_cluster_and_contrastive_conditions_train_a_mage(ws: Path, condition: str, network: str) -> None:
    """A MAGE takes the cluster ids in the label slot (k = the 10 classes) and the posterior's draws in
    the rep slot, through the same recipe."""
    train_generator.run(_cfg(), condition=condition)
    out = Path("models/generator") / condition
    gen = ImageGenerator.load(out, "cpu")
    assert gen.condition == network and gen.meta["condition"] == condition and gen.meta["kwargs"]["num_classes"] == 10
    assert (out / "clusters.json").exists() == (condition == "cluster")
    assert gen.sample(4, **_cond(network, 4), seed=1).shape == (4, 1, 28, 28)


def test_rcg_samples_through_the_rdm_and_interpolates(ws: Path) -> None:
    train_generator.run(_cfg(), condition="rep")
    rcg = RCGGenerator.load("models/rdm", "models/generator/rep", device="cpu")
    for cfg in (0.0, 1.0):
        assert rcg.sample(3, cfg=cfg, seed=2).shape == (3, 1, 28, 28)
    assert rcg.sample(2, class_ids=3, cfg=1.0).shape == (2, 1, 28, 28)  # the class-conditional RDM
    a, b = rcg.sample_reps(2, seed=5)
    row = rcg.interpolate(a, b, points=3, seed=4)
    assert row.shape == (3, 1, 28, 28)
    assert torch.equal(row[0], rcg.from_reps(a[None], seed=4)[0])  # its ends are from_reps of its end points
    assert torch.equal(row[-1], rcg.from_reps(b[None], seed=4)[0])
    from rcg.stages import generate  # `rcg generate` needs nothing but the loaded object

    generate.run(_cfg(), n=4, cfg_scale=1.0, out="outputs/generate")
    assert len(list(Path("outputs/generate").glob("0000*.png"))) == 4


def test_interrupted_run_resumes_bit_identical(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.interrupt import Interrupted, interrupt_after

    cfg = _cfg()  # 6 steps, a checkpoint every 3; rep dropout, masks and dropout all draw random numbers
    train_generator.run(cfg, condition="rep")
    straight = load_file("models/generator/rep/generator.safetensors")
    shutil.rmtree("checkpoints")
    shutil.rmtree("models/generator")
    with monkeypatch.context() as m:
        interrupt_after(m, 4)
        with pytest.raises(Interrupted):
            train_generator.run(cfg, condition="rep")
    assert torch.load("checkpoints/train_generator/rep/checkpoint-last.pt", weights_only=True)["step"] == 3
    train_generator.run(cfg, condition="rep")
    resumed = load_file("models/generator/rep/generator.safetensors")
    assert json.loads(Path("metrics/details/generator_rep.json").read_text())["resumed_from"] == 3
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_the_tokenizer_is_a_checked_input(ws: Path) -> None:
    """Its weights' digest is in the resume fingerprint of a MAGE (not of a diffusion arch), and a
    generator refuses a tokenizer folder whose weights are not the ones it was trained on."""
    from rcg.tokenizers import load_tokenizer, save_tokenizer

    vq = load_tokenizer("models/tokenizer")
    with torch.no_grad():
        vq.quantize.embedding.weight.mul_(1.01)
    save_tokenizer(vq, "models/tok2", vq.meta["arch"], vq.meta["provenance"])
    assert (train_generator.resume_fingerprint(_cfg(train_generator__tokenizer="models/tok2"), "none")
            != train_generator.resume_fingerprint(_cfg(), "none"))
    assert (train_generator.resume_fingerprint(load_cfg(train_generator__tokenizer="models/tok2"), "none")
            == train_generator.resume_fingerprint(load_cfg(), "none"))
    with pytest.raises(PipelineError, match="tok2: not the tokenizer this generator was trained with"):
        make_codec({"type": "tokens", "path": "models/tok2", "digest": tokenizer_digest("models/tokenizer")})
    with pytest.raises(PipelineError, match="3-channel at 28 px"):
        TokenCodec("models/tokenizer").latent_shape(3, 28)
    with pytest.raises(PipelineError, match="train_generator.vae: mage_tiny generates the ids"):
        train_generator.run(_cfg(train_generator__vae="models/vae"), condition="none")


def test_weight_decay_skips_biases_and_one_dimensional_parameters() -> None:
    model = build_generator("mage_tiny", num_tokens=49, codebook_size=32, condition="rep")
    decay, no_decay = weight_decay_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, p in model.named_parameters()
                                                           if p.ndim == 1}
    assert {"token_emb.word.weight", "token_emb.pos", "decoder_pos", "fake_latent",
            "blocks.0.attn.qkv.weight"} <= decayed
    assert not any(n.endswith(".bias") or ".norm" in n for n in decayed)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)


@pytest.mark.parametrize("name, size, temp, cfg", [("imagenet256_mage_b", "B", 6.0, 1.0),
                                                   ("imagenet256_mage_l", "L", 11.0, 6.0)])
def test_mage_presets_are_imagenet256_with_the_reference_mage_recipe(name: str, size: str, temp: float,
                                                                     cfg: float) -> None:
    from rcg.generators.mage import MAGE_ARCHS
    from rcg.tokenizers import VQ_ARCHS

    base, mage = (config.params_values(config.preset_config(n)) for n in ("imagenet256", name))
    changed = {f"{b}.{k}" for b in base for k in base[b] if base[b][k] != mage[b][k]}
    expected_generator = {"arch", "vae", "vae_scale", "parameterization", "hflip", "steps", "batch_size", "lr",
                          "warmup_steps", "lr_schedule", "weight_decay", "grad_clip", "ema_decay", "ckpt_every",
                          "sample_every", "sampler", "sample_steps"}
    expected = {f"train_generator.{k}" for k in expected_generator} | {"evaluate.sample_steps"}
    if size == "L":  # the ViT-L encoder, MAGE-L's temperature and guidance (B's are the defaults)
        expected |= {"encoder.checkpoint", "encoder.arch", "train_generator.choice_temperature", "evaluate.cfg"}
    assert changed == expected
    g = mage["train_generator"]
    assert g["arch"] == f"MAGE-{size}" and (g["choice_temperature"], mage["evaluate"]["cfg"]) == (temp, cfg)
    assert (g["ema_decay"], g["lr_schedule"], g["grad_clip"], g["weight_decay"]) == (0.0, "cosine", 3.0, 0.05)
    assert g["lr"] == pytest.approx(1.5e-4 * 4096 / 256) and g["steps"] == 200 * g["warmup_steps"] // 10
    assert (g["sample_steps"], mage["evaluate"]["sample_steps"]) == (20, 20)
    vq, arch = VQ_ARCHS[mage["tokenizer"]["arch"]], MAGE_ARCHS[g["arch"]]
    side = mage["data"]["image_size"] // 2 ** (len(vq["ch_mult"]) - 1)
    assert (arch["num_tokens"], arch["codebook_size"]) == (side * side, vq["codebook_size"]) == (256, 1024)


def test_dvc_makes_the_tokenizer_only_for_a_mage_arch(tiny_workspace: Path, tmp_path: Path) -> None:
    """dvc.yaml's design: train_generator always depends on the tokenizer stage's folder, and the
    stage (which reads train_generator.arch) trains only for a MAGE arch. The tokenizer and the
    unconditional generator run through `dvc repro --single-item` on copied tiny shards, with empty
    stand-ins for the outputs they do not read (the whole DAG runs in tests/test_pipeline.py)."""
    import os
    import subprocess
    import sys

    from flows.dag import read_stages

    root = Path(__file__).resolve().parents[1]
    repo = tmp_path / "project"
    repo.mkdir()
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(root / name, repo / name)
    shutil.copytree(root / "rcg", repo / "rcg", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(tiny_workspace / "data" / "shards", repo / "data" / "shards")
    for stand_in in ("models/evalnet", "models/encoder", "data/features"):  # deps that are not read here
        (repo / stand_in).mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(repo), "RCG_PRECISION": "fp32",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def run(*cmd: str) -> str:
        r = subprocess.run(list(cmd), cwd=repo, env=env, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(cmd)}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r.stdout

    dvc = [sys.executable, "-m", "dvc"]
    run(*dvc, "init", "--no-scm", "-q")
    run("rcg", "params", "--preset", "tiny", "--set", "tracking.enabled=false")
    stages = {s.name: s for s in read_stages(repo)}
    assert set(stages["tokenizer"].upstream) == {"code", "shard", "evalnet"}
    assert all("tokenizer" in stages[f"train_generator@{c}"].upstream for c in ("rep", "none", "label"))
    run(*dvc, "repro", "--single-item", "code")

    run(*dvc, "repro", "--single-item", "tokenizer")  # tiny: dit_tiny
    assert (repo / "models/tokenizer/skipped.json").exists()
    assert not (repo / "models/tokenizer/tokenizer.safetensors").exists()
    run("rcg", "params", "--set", "train_generator.arch=mage_tiny")
    assert "tokenizer" in json.loads(run(*dvc, "status", "--json", "tokenizer"))  # the arch is its param
    run(*dvc, "repro", "--single-item", "tokenizer")
    assert (repo / "models/tokenizer/tokenizer.safetensors").exists()
    assert not (repo / "models/tokenizer/skipped.json").exists()
    assert json.loads(run(*dvc, "status", "--json", "tokenizer")) == {}
    run(*dvc, "repro", "--single-item", "train_generator@none")
    meta = json.loads((repo / "models/generator/none/generator.json").read_text())
    assert meta["arch"] == "mage_tiny" and meta["codec"]["type"] == "tokens"
    run("rcg", "params", "--set", "train_generator.arch=dit_tiny")  # back: both are stale again
    assert {"tokenizer", "train_generator@none"} <= set(json.loads(run(*dvc, "status", "--json")))
