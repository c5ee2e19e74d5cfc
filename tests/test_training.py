"""The shared training loop (rcg.training.fit): exact resume, non-finite losses, DDP loss averaging,
safe checkpoints, and, for every training stage, an interrupted run that ends bit-identical to an
uninterrupted one."""

from __future__ import annotations

import json
import os
import pickle
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from rcg import config
from rcg.io import PipelineError
from rcg.training import DistInfo, LoopSpec, fit
from tests.generator_workspace import build, chdir
from tests.interrupt import Interrupted, interrupt_after

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


def _toy(ckpt_dir: Path, steps: int = 10, **spec: object) -> tuple[LoopSpec, nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.3), nn.Linear(16, 1))  # dropout: global RNG
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    base = dict(name="toy", steps=steps, lr=1e-2, checkpoint_dir=ckpt_dir, fingerprint="toy", warmup_steps=2,
                decay="cosine", ema_decay=0.9, log_every=2, ckpt_every=3, amp=False, grad_clip=1.0)
    return LoopSpec(**{**base, **spec}), model, opt


def _toy_data(g: torch.Generator) -> object:
    def data(start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            while True:  # a stream of the stage's own: restored from the checkpoint on resume
                x = torch.randn(8, 4, generator=g)
                yield x, x.sum(1, keepdim=True)
        return batches()
    return data


def _mse(model: nn.Module, b: tuple[torch.Tensor, torch.Tensor], step: int) -> torch.Tensor:
    return ((model(b[0]) - b[1]) ** 2).mean()


def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec, model, opt = _toy(tmp_path / "whole")
    g = torch.Generator().manual_seed(1)
    whole = fit(spec, model, opt, _mse, _toy_data(g), CPU, generators={"data": g})

    for attempt in range(2):  # killed after step 5 (checkpoint at 3), then resumed to the end
        spec, model, opt = _toy(tmp_path / "split")
        g = torch.Generator().manual_seed(1)
        with monkeypatch.context() as m:
            if attempt == 0:
                interrupt_after(m, 5)
                with pytest.raises(Interrupted):
                    fit(spec, model, opt, _mse, _toy_data(g), CPU, generators={"data": g})
                continue
            split = fit(spec, model, opt, _mse, _toy_data(g), CPU, generators={"data": g})
    assert split.summary["resumed_from"] == 3 and split.summary["steps"] == 10
    for (k, a), b in zip(whole.model.state_dict().items(), split.model.state_dict().values()):
        assert torch.equal(a, b), k
    for (k, a), b in zip(whole.ema.state_dict().items(), split.ema.state_dict().values()):
        assert torch.equal(a, b), k
    assert split.summary["final_loss"] == whole.summary["final_loss"]


def test_non_finite_loss_stops_with_a_clear_error_and_saves_nothing(tmp_path: Path) -> None:
    spec, model, opt = _toy(tmp_path, config_key="train_toy", ckpt_every=2, log_every=2)
    g = torch.Generator().manual_seed(1)

    def loss(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor], step: int) -> torch.Tensor:
        return _mse(m, b, step) * (float("nan") if step >= 4 else 1.0)

    with pytest.raises(PipelineError, match=r"toy: the loss became nan before step 6.*train_toy.lr"):
        fit(spec, model, opt, loss, _toy_data(g), CPU, generators={"data": g})
    saved = torch.load(tmp_path / "checkpoint-last.pt", weights_only=True)
    assert saved["step"] == 4  # the last finite checkpoint stays; nothing after the NaN was written
    assert all(torch.isfinite(v).all() for v in saved["model"].values())


def test_lowering_the_steps_below_a_checkpoint_starts_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spec, model, opt = _toy(tmp_path, steps=6)
    fit(spec, model, opt, _mse, _toy_data(torch.Generator().manual_seed(1)), CPU)
    spec, model, opt = _toy(tmp_path, steps=4)
    with caplog.at_level("WARNING"):
        out = fit(spec, model, opt, _mse, _toy_data(torch.Generator().manual_seed(1)), CPU)
    assert out.summary["resumed_from"] is None and out.summary["steps_this_run"] == 4
    assert any("starting over" in r.message for r in caplog.records)


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):  # noqa: ANN204 - what a crafted pickle does
            return (os.system, (f"touch {marker}",))

    (tmp_path / "checkpoint-last.pt").write_bytes(pickle.dumps({"step": 1, "x": Payload()}))
    spec, model, opt = _toy(tmp_path)
    with pytest.raises(PipelineError, match=r"checkpoint-last.pt: not a checkpoint this project can read safely"):
        fit(spec, model, opt, _mse, _toy_data(torch.Generator().manual_seed(1)), CPU)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# Two gloo ranks: the logged loss is the mean over both ranks, not rank 0's own
# --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from rcg.training import cleanup_distributed, setup_distributed

    info = setup_distributed()
    logged: list[dict[str, float]] = []

    class Tracker:
        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            logged.append(metrics)

    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    spec = LoopSpec(name="ranks", steps=4, lr=0.0, checkpoint_dir=Path(out) / "ck", fingerprint="r",
                    log_every=2, ckpt_every=100, amp=False)

    def loss(m: nn.Module, b: torch.Tensor, step: int) -> torch.Tensor:
        return m(b).sum() * 0 + float(rank + 1) * (step + 1)  # rank 0: 1, 2, 3, 4; rank 1: 2, 4, 6, 8

    fit(spec, model, opt, loss, lambda start: iter(lambda: torch.ones(1, 2), None), info, Tracker())
    Path(out, f"rank{rank}.json").write_text(json.dumps([m["loss"] for m in logged]))
    cleanup_distributed()


def test_logged_loss_is_all_reduced_over_ranks(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.start_processes(_rank_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    # Steps 1-2: rank 0 mean 1.5, rank 1 mean 3 -> 2.25; steps 3-4: 3.5 and 7 -> 5.25, on both ranks.
    assert r0 == r1 == pytest.approx([2.25, 5.25])


# --------------------------------------------------------------------------------------------------
# Every training stage: interrupted and resumed == uninterrupted, bit for bit (CPU)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tiny_workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards, an encoder and its features, built once by the real stages."""
    return build(tiny_workspace, tmp_path_factory.mktemp("resume"), rdm=False)


def _project(inputs: Path, root: Path) -> Path:
    root.mkdir()
    (root / "data").mkdir()
    for rel in ("data/shards", "data/features"):
        (root / rel).symlink_to(inputs / rel)
    (root / "params.yaml").write_text((inputs / "params.yaml").read_text())
    return root


def _run(stage: str, condition: str | None, overrides: dict[str, object]) -> None:
    import importlib

    cfg = config.load("params.yaml", config.parse_set([f"{k}={v}" for k, v in overrides.items()]))
    mod = importlib.import_module(f"rcg.stages.{stage}")
    if condition is None:
        mod.run(cfg)
    else:
        mod.run(cfg, condition=condition)


# (stage, condition, steps to run before the "kill", model files to compare, overrides)
STAGES = [
    ("encoder", None, 3, ["models/encoder/encoder.safetensors"], {"data.num_workers": 2}),
    ("train_rdm", None, 30, ["models/rdm/rdm.safetensors"], {"train_rdm.class_cond": "false"}),
    ("train_generator", "rep", 5, ["models/generator/rep/generator.safetensors"], {"data.num_workers": 2}),
    ("train_generator", "label", 4, ["models/generator/label/generator.safetensors"], {}),
    ("evalnet", None, 6, ["models/evalnet/evalnet.safetensors"], {}),
]


@pytest.mark.parametrize("stage,condition,kill_at,files,overrides", STAGES,
                         ids=[f"{s}-{c}" if c else s for s, c, *_ in STAGES])
def test_stage_resumes_bit_identical(inputs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str,
                                     condition: str | None, kill_at: int, files: list[str],
                                     overrides: dict[str, object]) -> None:
    models = {}
    for name in ("whole", "split"):
        root = _project(inputs, tmp_path / name)
        if stage != "encoder":
            (root / "models").mkdir()
            (root / "models" / "encoder").symlink_to(inputs / "models" / "encoder")
        with chdir(root):
            if name == "split":
                with monkeypatch.context() as m:
                    interrupt_after(m, kill_at)
                    with pytest.raises(Interrupted):
                        _run(stage, condition, overrides)
                assert not Path(files[0]).exists()
            _run(stage, condition, overrides)
            models[name] = [Path(f).read_bytes() for f in files]
    assert models["split"] == models["whole"]


# --------------------------------------------------------------------------------------------------
# Precision chosen by measurement (rcg.precision)
# --------------------------------------------------------------------------------------------------


def test_precision_probe_leaves_no_trace_and_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import rcg.precision as precision

    monkeypatch.setenv("RCG_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 1))
    batch = torch.randn(16, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()

    def loss(m: nn.Module, b: torch.Tensor, step: int) -> torch.Tensor:
        return m(b).pow(2).mean()

    times = {True: 0.010, False: 0.0095}  # fp32 a little faster: within the margin, bf16 stays
    monkeypatch.setattr(precision, "_pass", lambda m, lf, b, s, bf16, d: (lf(m, b, s).backward(), times[bf16])[1])
    assert precision.choose_bf16("toy", model, loss, batch, 0, torch.device("cpu")) is True
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN statistics restored
    assert all(p.grad is None for p in model.parameters()) and torch.equal(rng, torch.get_rng_state())
    cache = json.loads((tmp_path / "precision.json").read_text())
    assert len(cache) == 1 and next(iter(cache.values()))["bf16"] is True

    times[False] = 0.005  # now fp32 would win clearly, but the cached decision for this model stands
    assert precision.choose_bf16("toy", model, loss, batch, 0, torch.device("cpu")) is True
    (tmp_path / "precision.json").unlink()
    assert precision.choose_bf16("toy", model, loss, batch, 0, torch.device("cpu")) is False


def test_amp_runs_record_their_precision_and_resume_with_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RCG_CACHE_DIR", str(tmp_path / "cache"))
    spec, model, opt = _toy(tmp_path / "ck", amp=True)
    g = torch.Generator().manual_seed(1)
    with monkeypatch.context() as m:
        interrupt_after(m, 4)
        with pytest.raises(Interrupted):
            fit(spec, model, opt, _mse, _toy_data(g), CPU, generators={"data": g})
    saved = torch.load(tmp_path / "ck" / "checkpoint-last.pt", weights_only=True)["bf16"]
    assert isinstance(saved, bool)
    spec, model, opt = _toy(tmp_path / "ck", amp=True)
    out = fit(spec, model, opt, _mse, _toy_data(g), CPU, generators={"data": g})
    assert out.summary["precision"] == ("bf16" if saved else "fp32")


def test_rcg_precision_overrides_the_measurement(monkeypatch: pytest.MonkeyPatch) -> None:
    import rcg.precision as precision

    def never(*args: object) -> float:
        raise AssertionError("measured although RCG_PRECISION was set")

    monkeypatch.setattr(precision, "_pass", never)
    model = nn.Linear(2, 1)
    for value, bf16 in (("bf16", True), ("fp32", False)):
        monkeypatch.setenv("RCG_PRECISION", value)
        assert precision.choose_bf16("x", model, _mse, torch.ones(1, 2), 0, torch.device("cpu")) is bf16
    monkeypatch.setenv("RCG_PRECISION", "fp16")
    with pytest.raises(ValueError, match="bf16 or fp32"):
        precision.choose_bf16("x", model, _mse, torch.ones(1, 2), 0, torch.device("cpu"))
