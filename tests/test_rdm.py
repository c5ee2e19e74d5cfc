"""The RDM: network, artifacts, sampling, the train-rdm / sample-reps stages, DDP, and the FD metric."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from rcg import config
from rcg.diffusion import diffusion_meta
from rcg.features import read_features, to_table, write_features
from rcg.io import PipelineError
from rcg.metrics.frechet import feature_statistics, frechet_distance
from rcg.rdm import (
    RDMNet,
    build_rdm,
    bundle_from,
    load_rdm,
    make_meta,
    sample_reps,
    save_rdm,
)
from tests.conftest import tiny_params

# --------------------------------------------------------------------------------------------------
# Synthetic features: a labelled Gaussian mixture in 256-d, standardised per sample like real reps.
# --------------------------------------------------------------------------------------------------


def synthetic_reps(n: int, k: int = 4, dim: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(k, dim)) * 1.5
    basis = rng.normal(size=(k, 8, dim))  # each class varies mostly along 8 directions
    labels = rng.integers(0, k, size=n)
    z = rng.normal(size=(n, 8))
    x = means[labels] + np.einsum("nr,nrd->nd", z, basis[labels]) + 0.3 * rng.normal(size=(n, dim))
    x = (x - x.mean(1, keepdims=True)) / x.std(1, ddof=1, keepdims=True)  # per-sample standardisation
    return x.astype(np.float32), labels


def write_synthetic_features(root: Path, n_train: int = 400, n_val: int = 100, labelled: bool = True) -> None:
    """data/features/{train,val}.parquet with both views (the flip view is a slightly perturbed copy)."""
    for split, n, seed in (("train", n_train, 0), ("val", n_val, 1)):
        x, y = synthetic_reps(n, seed=seed)
        flip = x + 0.05 * np.random.default_rng(seed + 10).normal(size=x.shape).astype(np.float32)
        keys = [f"{split}-{i:06d}" for i in range(n)]
        labels = [int(v) for v in y] if labelled else [None] * n
        tables = [to_table(keys, labels, ["orig"] * n, x), to_table(keys, labels, ["flip"] * n, flip)]
        write_features(root / "data" / "features" / f"{split}.parquet", tables)


# Small tensors: one thread is fastest, and far faster than two on a busy 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def rdm_workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    write_synthetic_features(tmp_path)
    (tmp_path / "params.yaml").write_text(tiny_params())
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --------------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------------


def test_network_matches_reference_shape_and_init() -> None:
    paper = build_rdm("paper")
    n_params = sum(p.numel() for p in paper.parameters())
    assert 62.5e6 < n_params < 63.0e6  # docs/paper.md#rdm-network: ~62.7M
    del paper
    net = build_rdm("tiny", num_classes=3)
    x = torch.randn(1, 256)  # batch 1 works (the reference's squeeze() does not)
    out = net(x, torch.tensor([10]), torch.tensor([2]))
    assert out.shape == (1, 256)
    assert torch.all(out == 0)  # zero-initialised head: the untrained RDM predicts x0 = 0
    with pytest.raises(ValueError):
        net(x, torch.tensor([10]))
    # each block starts as the identity (zero-initialised output Linear)
    h = torch.randn(4, 64)
    emb = torch.randn(4, net.blocks[0].emb_layers[1].in_features)
    ctx = torch.randn(4, 32)
    assert torch.equal(net.blocks[0](h, emb, ctx), h)


def test_unknown_size_names_the_config_key_and_the_known_sizes() -> None:
    known = r"\(known: tiny, small, base, paper\)$"
    with pytest.raises(PipelineError, match=r"^train_rdm.arch: unknown RDM size 'huge' " + known):
        build_rdm("huge")


def test_class_conditioning_changes_output_after_training_step() -> None:
    net = build_rdm("tiny", num_classes=2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, t = torch.randn(8, 256), torch.randint(0, 1000, (8,))
    y = torch.tensor([0, 1] * 4)
    for _ in range(3):  # zero-initialised layers pass gradient to the class path from the 2nd step
        opt.zero_grad()
        (net(x, t, y) - y[:, None].float()).pow(2).mean().backward()
        opt.step()
    a = net(x, t, torch.zeros(8, dtype=torch.long))
    b = net(x, t, torch.ones(8, dtype=torch.long))
    assert not torch.allclose(a, b)


# --------------------------------------------------------------------------------------------------
# Artifacts and sampling
# --------------------------------------------------------------------------------------------------


def _meta(net: RDMNet) -> dict:
    diff = diffusion_meta("sqrt_linear", 100, 0.0015, 0.0195, "x0")
    return make_meta(net, "tiny", diff, {"steps": 5, "eta": 1.0, "temperature": 1.0})


def test_rdm_json_of_the_old_format_still_loads(tmp_path: Path) -> None:
    """RDM JSON written before the shared diffusion format spells the schedule key "schedule"."""
    net = build_rdm("tiny")
    meta = _meta(net)
    meta["diffusion"] = {"schedule": "sqrt_linear", "timesteps": 100, "linear_start": 0.0015,
                         "linear_end": 0.0195, "parameterization": "x0"}  # as train-rdm wrote it
    save_rdm(net, meta, tmp_path, "rdm")
    old = load_rdm(tmp_path).diffusion
    new = bundle_from(net, _meta(net)).diffusion
    assert old.parameterization == new.parameterization == "x0"
    assert torch.equal(old.betas, new.betas) and old.num_timesteps == 100
    del meta["diffusion"]["timesteps"]
    save_rdm(net, meta, tmp_path, "rdm")
    with pytest.raises(PipelineError, match=r"rdm.json: missing key 'timesteps'"):
        load_rdm(tmp_path)


def test_save_load_round_trip_and_sample_reps(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = build_rdm("tiny", num_classes=3)
    for p in net.parameters():  # make the zero-initialised layers non-trivial
        p.data.add_(0.05 * torch.randn_like(p))
    save_rdm(net, _meta(net), tmp_path, "rdm_class")
    meta = json.loads((tmp_path / "rdm_class.json").read_text())
    assert meta["model"]["num_classes"] == 3 and meta["model"]["width"] == 64
    bundle = load_rdm(tmp_path, class_cond=True)
    x, t, y = torch.randn(5, 256), torch.randint(0, 100, (5,)), torch.tensor([0, 1, 2, 0, 1])
    torch.testing.assert_close(bundle.model(x, t, y), net(x, t, y))

    a = sample_reps(bundle, 7, class_ids=torch.tensor([0, 1, 2, 0, 1, 2, 0]), seed=3, batch_size=3)
    b = sample_reps(bundle, 7, class_ids=torch.tensor([0, 1, 2, 0, 1, 2, 0]), seed=3, batch_size=3)
    c = sample_reps(bundle, 7, class_ids=torch.tensor([0, 1, 2, 0, 1, 2, 0]), seed=4, batch_size=3)
    assert a.shape == (7, 256) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    same_class = sample_reps(bundle, 4, class_ids=1, seed=3)
    assert same_class.shape == (4, 256)
    with pytest.raises(PipelineError):
        sample_reps(bundle, 2, class_ids=5)
    with pytest.raises(PipelineError):
        load_rdm(tmp_path, class_cond=False)  # only the class-conditional one exists here

    uncond = bundle_from(build_rdm("tiny"), _meta(build_rdm("tiny")))
    with pytest.raises(PipelineError):
        sample_reps(uncond, 2, class_ids=0)


# --------------------------------------------------------------------------------------------------
# Frechet distance through torch-fidelity
# --------------------------------------------------------------------------------------------------


def test_frechet_distance_matches_closed_form_for_gaussians() -> None:
    g = torch.Generator().manual_seed(0)
    n, d = 200_000, 4
    std_a, std_b = torch.tensor([1.0, 2.0, 0.5, 1.0]), torch.tensor([1.0, 1.0, 1.0, 3.0])
    mean_b = torch.tensor([1.0, 0.0, -2.0, 0.0])
    a = torch.randn(n, d, generator=g) * std_a
    b = torch.randn(n, d, generator=g) * std_b + mean_b
    expected = float((mean_b**2).sum() + ((std_a - std_b) ** 2).sum())  # diagonal covariances
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.02)
    assert frechet_distance(a.numpy(), feature_statistics(a)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        feature_statistics(torch.zeros(1, 3))


# --------------------------------------------------------------------------------------------------
# The stages
# --------------------------------------------------------------------------------------------------


def test_train_rdm_stage_end_to_end_and_resume(rdm_workspace: Path) -> None:
    from rcg.stages import train_rdm

    cfg = config.load("params.yaml")
    train_rdm.run(cfg)
    for name in ("rdm", "rdm_class"):
        assert (rdm_workspace / "models" / "rdm" / f"{name}.safetensors").exists()
        assert (rdm_workspace / "models" / "rdm" / f"{name}.json").exists()
    m = json.loads((rdm_workspace / "metrics" / "details" / "rdm.json").read_text())
    for key in ("fd_train", "fd_val", "fd_floor_train", "fd_floor_val"):
        assert np.isfinite(m[key]) and m[key] > 0, key
    assert m["n_eval"] == cfg.train_rdm.n_eval
    assert m["eval_repeats"] == cfg.train_rdm.eval_repeats == 2 and np.isfinite(m["fd_train_std"])
    cc = m["class_cond"]
    assert set(cc["per_class"]) == {"0", "1", "2", "3"}
    for key in ("fd_per_class_train", "fd_per_class_floor_train", "fd_per_class_val", "fd_train"):
        assert np.isfinite(cc[key]), key
    ckpt = torch.load(rdm_workspace / "checkpoints/train_rdm/uncond/checkpoint-last.pt", weights_only=False)
    assert ckpt["step"] == cfg.train_rdm.steps

    # raising the step budget resumes from the checkpoint instead of starting over
    cfg2 = config.load("params.yaml", {"train_rdm": {"steps": cfg.train_rdm.steps + 10, "class_cond": False}})
    train_rdm.run(cfg2)
    m2 = json.loads((rdm_workspace / "metrics" / "details" / "rdm.json").read_text())
    assert m2["train_steps"] == cfg.train_rdm.steps + 10
    ckpt = torch.load(rdm_workspace / "checkpoints/train_rdm/uncond/checkpoint-last.pt", weights_only=False)
    assert ckpt["step"] == cfg.train_rdm.steps + 10
    assert "class_cond" not in m2
    # a rerun resumed at its end trains nothing but still reports the training behind the weights
    train_rdm.run(cfg2)
    m3 = json.loads((rdm_workspace / "metrics" / "details" / "rdm.json").read_text())
    # the clock stops at the last step, so the checkpoint holds the same total the metrics reported
    assert m3["train_seconds"] == pytest.approx(m2["train_seconds"], abs=0.02) and m2["train_seconds"] > 0
    assert m3["train_final_loss"] == m2["train_final_loss"] and np.isfinite(m3["train_final_loss"])
    assert not (rdm_workspace / "models" / "rdm" / "rdm_class.safetensors").exists()  # no stale model

    # sample-reps through the CLI
    from rcg.cli import main

    out = rdm_workspace / "samples.parquet"
    assert main(["sample-reps", "--n", "6", "--out", str(out)]) == 0
    f = read_features(out)
    assert f.keys == [f"sample-{i:06d}" for i in range(6)] and f.views == ["orig"] * 6
    assert f.reps.shape == (6, 256) and bool((f.labels == -1).all())
    assert main(["sample-reps", "--n", "3", "--class", "1", "--out", str(out)]) == 1  # rdm_class gone


def test_class_conditional_sample_reps_cli(rdm_workspace: Path) -> None:
    from rcg.cli import main

    assert main(["train-rdm", "--set", "train_rdm.steps=5", "--set", "train_rdm.n_eval=40"]) == 0
    out = rdm_workspace / "class2.parquet"
    assert main(["sample-reps", "--n", "3", "--class", "2", "--seed", "1", "--out", str(out)]) == 0
    f = read_features(out)
    assert f.labels.tolist() == [2, 2, 2] and f.reps.shape == (3, 256)


def test_unlabelled_features_train_only_the_unconditional_rdm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_synthetic_features(tmp_path, n_train=100, n_val=40, labelled=False)
    (tmp_path / "params.yaml").write_text(tiny_params(train_rdm={"steps": 4, "n_eval": 50}))
    monkeypatch.chdir(tmp_path)
    from rcg.stages import train_rdm

    train_rdm.run(config.load("params.yaml"))
    assert (tmp_path / "models/rdm/rdm.safetensors").exists()
    assert not (tmp_path / "models/rdm/rdm_class.safetensors").exists()
    skipped = json.loads((tmp_path / "metrics/rdm.json").read_text())["class_cond"]["skipped"]
    assert "no class labels" in skipped


def test_missing_features_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "params.yaml").write_text(tiny_params())
    monkeypatch.chdir(tmp_path)
    from rcg.stages import train_rdm

    with pytest.raises(PipelineError, match="train.parquet"):
        train_rdm.run(config.load("params.yaml"))


def test_training_learns_the_distribution(rdm_workspace: Path) -> None:
    """A tiny RDM trained briefly must beat its untrained self by a wide margin in FD to the data."""
    from rcg.rdm import schedule, train_rdm
    from rcg.training import DistInfo

    cfg = config.load("params.yaml", {"train_rdm": {"steps": 300, "ema_decay": 0.99, "lr": 2e-3}})
    rc = cfg.train_rdm
    f = read_features("data/features/train.parquet")
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    torch.manual_seed(0)
    untrained = build_rdm("tiny")
    ema_net, summary = train_rdm(rc, f.reps.clone(), None, 0, info)
    meta = _meta(ema_net)
    meta["diffusion"] = schedule(rc)  # the schedule and parameterisation it was trained with
    stats = feature_statistics(f.reps)
    fd_trained = frechet_distance(sample_reps(bundle_from(ema_net, meta), 300, steps=20), stats)
    fd_untrained = frechet_distance(sample_reps(bundle_from(untrained, meta), 300, steps=20), stats)
    assert summary["steps"] == 300
    assert fd_trained < 0.5 * fd_untrained, (fd_trained, fd_untrained)


@pytest.mark.parametrize("num_classes", [0, 3])
def test_rdm_fds_are_means_over_independent_draws(num_classes: int) -> None:
    """eval_repeats=3 reports the mean and spread of three single draws, each with fresh samples."""
    import statistics

    from rcg.metrics.rdm import score_rdm

    torch.manual_seed(0)
    net = build_rdm("tiny", num_classes=num_classes)
    for p in net.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    bundle = bundle_from(net.eval(), _meta(net))
    x, y = synthetic_reps(300)
    train = (torch.from_numpy(x), torch.from_numpy(y % 3))
    val = (train[0][:120], train[1][:120])
    bundle.meta["sampling"] = {"steps": 5, "eta": 0.0, "temperature": 1.0, "amp": False}

    def score(repeats: int, seed: int) -> dict:
        return score_rdm(bundle, train, val, n_eval=60, repeats=repeats, seed=seed, batch_size=60)

    singles = [score(1, r * 1000) for r in range(3)]
    merged = score(3, 0)
    key = "fd_train" if num_classes == 0 else "fd_per_class_train"
    vals = [d[key] for d in singles]
    assert len(set(vals)) == 3  # fresh samples and fresh real reps in every draw
    assert merged[key] == pytest.approx(statistics.mean(vals))
    assert merged["fd_train"] == pytest.approx(statistics.mean(d["fd_train"] for d in singles))
    assert merged["fd_train_std"] == pytest.approx(statistics.stdev(d["fd_train"] for d in singles))
    assert merged["eval_repeats"] == 3 and "fd_train_std" not in singles[0]
    if num_classes == 0:
        floor = statistics.mean(d["fd_floor_train"] for d in singles)
        assert merged["fd_train_over_floor"] == pytest.approx(merged["fd_train"] / floor)
    else:
        assert set(merged["per_class"]) == {"0", "1", "2"}


def test_checkpointer_carries_the_training_clock_across_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each save records the wall time of all runs so far; a resumed run adds its own to it."""
    import rcg.training as training

    now = [100.0]
    monkeypatch.setattr(training.time, "perf_counter", lambda: now[0])
    first = training.Checkpointer(tmp_path, "fp")
    first.start_clock()
    now[0] += 30.0
    first.save({"step": 3})
    assert first.train_seconds == 30.0

    second = training.Checkpointer(tmp_path, "fp")
    now[0] += 500.0  # time between the runs is not training
    assert second.load()["train_seconds"] == 30.0
    second.start_clock()
    now[0] += 12.0
    assert (second.seconds_this_run, second.train_seconds) == (12.0, 42.0)
    assert second.stop_clock() == 12.0
    now[0] += 7.0  # shutting down and writing outputs after the last step is not training
    assert second.stop_clock() == 12.0 and second.train_seconds == 42.0
    second.save({"step": 5})
    assert torch.load(second.path, weights_only=False)["train_seconds"] == 42.0
    other = training.Checkpointer(tmp_path, "other settings")
    assert other.load() is None and other.seconds_before == 0.0

    third = training.Checkpointer(tmp_path, "fp")  # a rerun of the finished training
    assert third.load()["train_seconds"] == 42.0
    third.start_clock(training=False)
    now[0] += 9.0  # loading data, drawing a grid batch, writing the model: not training
    assert third.stop_clock() == 0.0 and third.train_seconds == 42.0


def test_lr_warms_up_holds_then_decays_to_zero() -> None:
    from rcg.training import lr_at

    assert [lr_at(s, 10, 1.0, decay="linear", decay_frac=0.3) for s in range(10)] == pytest.approx([1] * 8 + [2 / 3, 1 / 3])
    assert [lr_at(s, 10, 1.0) for s in range(10)] == [1.0] * 10  # the reference's constant lr
    assert [lr_at(s, 10, 1.0, warmup=4) for s in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1, 1])
    cosine = [lr_at(s, 12, 1.0, warmup=2, decay="cosine") for s in range(12)]
    assert cosine[:3] == pytest.approx([0.5, 1.0, 1.0]) and cosine[7] == pytest.approx(0.5)  # MoCo v3


def test_lr_decay_is_applied_and_survives_an_interrupted_run(rdm_workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lr is a function of the step alone: a run cut at step 7 of 12 resumes onto the same schedule."""
    from rcg.rdm import train_rdm
    from rcg.training import DistInfo
    from tests.interrupt import Interrupted, interrupt_after

    info = DistInfo(0, 1, 0, torch.device("cpu"))
    reps = read_features("data/features/train.parquet").reps.clone()
    over = {"steps": 12, "lr_decay_frac": 0.5, "batch_size": 32, "ckpt_every": 3}

    def last_lr(ck_dir: str) -> float:
        return torch.load(f"{ck_dir}/uncond/checkpoint-last.pt", weights_only=True)["optimizer"]["param_groups"][0]["lr"]

    whole = config.load("params.yaml", {"train_rdm": {**over, "checkpoint_dir": "ck_whole"}}).train_rdm
    train_rdm(whole, reps, None, 0, info)
    assert last_lr("ck_whole") == pytest.approx(whole.lr / 6)  # step 12 of 12: 1/6 of the way down the decay

    split = config.load("params.yaml", {"train_rdm": {**over, "checkpoint_dir": "ck_split"}}).train_rdm
    with monkeypatch.context() as m:
        interrupt_after(m, 7)
        with pytest.raises(Interrupted):
            train_rdm(split, reps, None, 0, info)
    assert last_lr("ck_split") == pytest.approx(split.lr)  # saved at step 6: still the constant phase
    train_rdm(split, reps, None, 0, info)
    ck = torch.load("ck_split/uncond/checkpoint-last.pt", weights_only=True)
    assert ck["step"] == 12 and last_lr("ck_split") == pytest.approx(whole.lr / 6)


def test_bad_schedule_values_are_config_errors_naming_the_key(rdm_workspace: Path) -> None:
    from rcg.stages import train_rdm

    with pytest.raises(config.ConfigError, match="train_rdm.lr_decay_frac"):
        train_rdm.run(config.load("params.yaml", {"train_rdm": {"lr_decay_frac": 1.5}}))
    with pytest.raises(config.ConfigError, match="train_rdm.timestep_power"):
        train_rdm.run(config.load("params.yaml", {"train_rdm": {"timestep_power": 0}}))


# --------------------------------------------------------------------------------------------------
# torchrun compatibility: two gloo ranks on CPU end with identical weights
# --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, workdir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    os.chdir(workdir)
    from rcg.rdm import train_rdm
    from rcg.training import cleanup_distributed, setup_distributed

    info = setup_distributed()
    cfg = config.load("params.yaml", {"train_rdm": {"steps": 12, "batch_size": 32}})
    f = read_features("data/features/train.parquet")
    ema_net, _ = train_rdm(cfg.train_rdm, f.reps.clone(), f.labels.clone(), 4, info)
    net_state = torch.load(Path(cfg.train_rdm.checkpoint_dir) / "class" / "checkpoint-last.pt",
                           weights_only=False) if rank == 0 else None
    torch.save({"ema": ema_net.state_dict(), "ckpt_step": None if net_state is None else net_state["step"]},
               f"rank{rank}.pt")
    cleanup_distributed()


def test_ddp_two_gloo_ranks_end_with_identical_weights(rdm_workspace: Path) -> None:
    import torch.multiprocessing as mp

    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(rdm_workspace)), nprocs=2, join=True,
                       start_method="spawn")
    r0 = torch.load(rdm_workspace / "rank0.pt", weights_only=False)
    r1 = torch.load(rdm_workspace / "rank1.pt", weights_only=False)
    assert r0["ckpt_step"] == 12
    init = build_rdm("tiny", num_classes=4).state_dict()
    changed = False
    for k, v in r0["ema"].items():
        assert torch.equal(v, r1["ema"][k]), k
        changed |= not torch.equal(v, init[k])
    assert changed  # they trained, and trained in lockstep


@pytest.mark.slow
def test_cli_under_torchrun_two_processes(rdm_workspace: Path) -> None:
    """`rcg train-rdm` with dist.nproc_per_node=2 re-executes itself under torchrun (gloo on CPU)."""
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, "-m", "rcg.cli", "train-rdm", "--set", "dist.nproc_per_node=2",
         "--set", "train_rdm.steps=10", "--set", "train_rdm.threads=1"],
        cwd=rdm_workspace, env=env, capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (rdm_workspace / "models/rdm/rdm.safetensors").exists()
    assert (rdm_workspace / "models/rdm/rdm_class.safetensors").exists()
    m = json.loads((rdm_workspace / "metrics/details/rdm.json").read_text())
    assert m["train_steps"] == 10 and np.isfinite(m["fd_train"])
