"""GPU readiness of the shared loop and the input path, checked on CPU where it can be.

Gradient accumulation (one process and two gloo ranks), torch.compile, the AdamW constructor, the
TF32 switch and the GPU JPEG decoder's crop and resize logic run here; what needs a CUDA device is
marked `gpu` (deselected by default; `pytest -m gpu` on a GPU machine).
"""

from __future__ import annotations

import itertools
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from rcg.config import DataConfig
from rcg.io import PipelineError
from rcg.training import DistInfo, LoopSpec, adamw, fit, read_checkpoint, setup_distributed, use_tf32

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = DistInfo(0, 1, 0, torch.device("cpu"))
ROWS = 8  # samples per optimiser step in the toy loop


# --------------------------------------------------------------------------------------------------
# A deterministic toy loop: step k always trains on rows [8k, 8k + 8) of a fixed table
# --------------------------------------------------------------------------------------------------


def _table(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(steps * ROWS, 4, generator=torch.Generator().manual_seed(1))
    return x, torch.sin(x).sum(1, keepdim=True)


def _toy(ckpt: Path, accum: int = 1, steps: int = 6,
         **spec: object) -> tuple[LoopSpec, nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = adamw(model.parameters(), 1e-2, device=torch.device("cpu"))
    base = dict(name="toy", steps=steps, lr=1e-2, checkpoint_dir=ckpt, fingerprint="toy", warmup_steps=2,
                decay="cosine", ema_decay=0.9, log_every=2, ckpt_every=3, amp=False, grad_clip=0.05,
                accum_steps=accum)
    return LoopSpec(**{**base, **spec}), model, opt


def _rows(steps: int, per_batch: int, rank: int = 0, world: int = 1) -> object:
    """data(start): batch m of this rank = its slice of rows [m * per_batch * world, ...)."""
    x, y = _table(steps)

    def data(start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for m in itertools.count(start):
            lo = (m * world + rank) * per_batch
            yield x[lo : lo + per_batch], y[lo : lo + per_batch]

    return data


def _mse(model: nn.Module, b: tuple[torch.Tensor, torch.Tensor], step: int) -> torch.Tensor:
    return ((model(b[0]) - b[1]) ** 2).mean()


def _close(a: nn.Module, b: nn.Module, atol: float = 1e-6) -> None:
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=atol, msg=k)


def test_accumulated_half_batches_train_as_one_whole_batch(tmp_path: Path) -> None:
    whole = fit(*_toy(tmp_path / "a1"), _mse, _rows(6, ROWS), CPU)
    spec, model, opt = _toy(tmp_path / "a2", accum=2)
    halves = fit(spec, model, opt, _mse, _rows(6, ROWS // 2), CPU)
    _close(whole.model, halves.model)  # clipping (0.05) acts on the accumulated gradient, as on the whole
    _close(whole.ema, halves.ema)
    assert halves.summary["steps"] == 6 and halves.summary["final_loss"] == pytest.approx(whole.summary["final_loss"])
    assert not torch.equal(whole.model[0].weight, _toy(tmp_path / "x")[1][0].weight)  # it did train


def test_accumulating_run_resumes_bit_identical_and_only_with_its_own_accum(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from tests.interrupt import Interrupted, interrupt_after

    whole = fit(*_toy(tmp_path / "whole", accum=2), _mse, _rows(6, ROWS // 2), CPU)
    with monkeypatch.context() as m:  # killed after step 4 (checkpoint at 3): resumed at batch 3 x 2
        interrupt_after(m, 4)
        with pytest.raises(Interrupted):
            fit(*_toy(tmp_path / "split", accum=2), _mse, _rows(6, ROWS // 2), CPU)
    split = fit(*_toy(tmp_path / "split", accum=2), _mse, _rows(6, ROWS // 2), CPU)
    assert split.summary["resumed_from"] == 3
    for (k, a), b in zip(whole.model.state_dict().items(), split.model.state_dict().values()):
        assert torch.equal(a, b), k
    with caplog.at_level("WARNING"):  # a checkpoint of accum 2 is not resumed with accum 1
        other = fit(*_toy(tmp_path / "split", accum=1), _mse, _rows(6, ROWS), CPU)
    assert other.summary["resumed_from"] is None and any("other settings" in r.message for r in caplog.records)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accum_rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from rcg.training import cleanup_distributed

    info = setup_distributed()
    ddp_cls = nn.parallel.DistributedDataParallel
    real, skipped = ddp_cls.no_sync, [0]

    def no_sync(self: nn.Module):  # noqa: ANN202 - counts the micro-steps that skip the all-reduce
        skipped[0] += 1
        return real(self)

    ddp_cls.no_sync = no_sync  # type: ignore[method-assign]
    spec, model, opt = _toy(Path(out) / "ck", accum=2)
    trained = fit(spec, model, opt, _mse, _rows(6, ROWS // 4, rank, world), info)
    torch.save(trained.model.state_dict(), Path(out) / f"rank{rank}.pt")
    Path(out, f"rank{rank}.json").write_text(json.dumps({"no_sync": skipped[0]}))
    cleanup_distributed()


def test_two_gloo_ranks_accumulating_match_one_process_with_the_global_batch(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.start_processes(_accum_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    reference = fit(*_toy(tmp_path / "one"), _mse, _rows(6, ROWS), CPU).model
    for rank in (0, 1):
        model = _toy(tmp_path / "x")[1]
        model.load_state_dict(torch.load(tmp_path / f"rank{rank}.pt", weights_only=True))
        _close(reference, model)
        # 6 steps of 2 micro-batches: the first of each skips DDP's gradient all-reduce
        assert json.loads((tmp_path / f"rank{rank}.json").read_text())["no_sync"] == 6


# --------------------------------------------------------------------------------------------------
# torch.compile, AdamW, TF32
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow  # inductor compiles the step: ~20 s on 2 quiet cores, minutes on a busy machine
def test_compiled_loop_trains_like_eager_and_saves_plain_weights(tmp_path: Path) -> None:
    eager = fit(*_toy(tmp_path / "eager"), _mse, _rows(6, ROWS), CPU)
    spec, model, opt = _toy(tmp_path / "compiled")
    out = fit(spec, model, opt, _mse, _rows(6, ROWS), DistInfo(0, 1, 0, torch.device("cpu"), compile=True))
    _close(eager.model, out.model, atol=1e-5)
    saved = read_checkpoint(tmp_path / "compiled" / "checkpoint-last.pt")
    assert list(saved["model"]) == list(eager.model.state_dict())  # no torch.compile prefixes
    fresh = _toy(tmp_path / "x")[1]
    fresh.load_state_dict(saved["model"], strict=True)
    assert type(out.model) is nn.Sequential  # the bare module comes back, not the compiled wrapper


def test_adamw_keeps_each_recipes_cpu_optimiser_and_fuses_on_cuda() -> None:
    params = [nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(2))]
    cpu = torch.device("cpu")
    pairs = [  # what each recipe called before, and its call now
        (torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1), adamw(params, 1e-3, weight_decay=0.1, device=cpu)),
        (torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0),
         adamw(params, 1e-4, betas=(0.9, 0.95), weight_decay=0.0, device=cpu)),
        (torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01, fused=True),
         adamw(params, 3e-3, weight_decay=0.01, device=cpu, cpu_fused=True)),
    ]
    for old, new in pairs:
        assert new.defaults == old.defaults and new.state_dict() == old.state_dict()
    assert adamw(params, 1e-3, device=torch.device("cuda")).defaults["fused"] is True


def test_tf32_is_a_cuda_setting_and_compile_reaches_the_loop() -> None:
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    info = setup_distributed(tf32=not before[0], compile=True)
    assert info.device.type == "cpu" and info.compile  # no GPU here: the flags are left alone
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    try:
        use_tf32(True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        use_tf32(False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# --------------------------------------------------------------------------------------------------
# JPEG decoding on the GPU (rcg.data.gpu_decode): its logic on CPU tensors here, on CUDA under `gpu`
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jpeg_shards(tmp_path_factory: pytest.TempPathFactory) -> DataConfig:
    """Train shards of smooth photographs-like JPEGs of several shapes, and two PNGs among them."""
    from rcg.data import sources
    from rcg.data.shards import write_shards

    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for i in range(40):
        w, h = [(48, 36), (36, 48), (40, 40), (64, 30), (24, 24)][i % 5]
        yy, xx = np.mgrid[0:h, 0:w]
        phase = rng.uniform(0, 6, 3)
        arr = np.stack([127 + 100 * np.sin(xx / (5 + c) + yy / 7 + phase[c]) for c in range(3)], -1)
        folder = root / "src" / "train" / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
        img.save(folder / f"img{i:03d}.{'png' if i in (7, 21) else 'jpg'}", quality=95)
    write_shards(sources.image_folder(root / "src"), root / "shards", 100, 8, 1)
    return DataConfig(shards_dir=str(root / "shards"), image_size=24, channels=3, num_workers=0, shuffle_buffer=16)


def test_crop_geometry_is_the_cpu_loaders() -> None:
    from rcg.data.gpu_decode import crop_geometry
    from rcg.data.images import resize_crop

    for w, h in [(48, 36), (36, 48), (24, 24), (30, 24), (500, 375), (23, 40)]:
        for rng_seed in (None, 3, 4):
            img = Image.new("L", (w, h))
            for x in range(w):
                img.putpixel((x, 0), x % 256)
            for y in range(h):
                img.putpixel((0, y), y % 256)
            rngs = [None if rng_seed is None else np.random.default_rng(rng_seed) for _ in range(2)]
            nw, nh, left, top = crop_geometry(w, h, 24, rngs[0])
            resized = img.resize((nw, nh), Image.Resampling.BICUBIC) if (nw, nh) != (w, h) else img
            expected = resized.crop((left, top, left + 24, top + 24))
            assert np.array_equal(np.asarray(expected), np.asarray(resize_crop(img, 24, rngs[1]))), (w, h, rng_seed)


def _deferred(cfg: DataConfig, batch: int, device: torch.device) -> object:
    from rcg.data import gpu_decode
    from rcg.data.loader import image_dataset

    ds = image_dataset(cfg, "train", "train", seed=5, batch_size=batch, defer_jpeg=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=0, collate_fn=gpu_decode.collate_deferred)
    return gpu_decode.DecodedOn(loader, cfg.image_size, cfg.channels, 5, True, device)


def _compare_with_cpu_loader(cfg: DataConfig, batches: object) -> None:
    from rcg.data.loader import make_loader

    cpu = make_loader(cfg, "train", "train", 10, seed=5, num_workers=0)
    for a, b in itertools.islice(zip(cpu, batches), 6):  # 60 samples: every image, some twice
        assert a["key"] == b["key"] and torch.equal(a["label"], b["label"])
        diff = (a["image"] - b["image"].cpu()).abs() * 255  # in 8-bit levels
        assert b["image"].dtype == torch.float32 and b["image"].shape == a["image"].shape == (10, 3, 24, 24)
        assert float(diff.mean()) < 1.0 and float(diff.max()) <= 12, (float(diff.mean()), float(diff.max()))


def test_deferred_jpegs_decode_resize_and_crop_as_the_cpu_loader(jpeg_shards: DataConfig) -> None:
    """The GPU path's logic with torchvision's CPU decoder: the same samples, crops and labels, the
    pixels within rounding of PIL's bicubic resize."""
    _compare_with_cpu_loader(jpeg_shards, _deferred(jpeg_shards, 10, torch.device("cpu")))


def test_gpu_decoding_without_a_gpu_stops_with_a_clear_error(jpeg_shards: DataConfig) -> None:
    from dataclasses import replace

    from rcg.data.loader import make_loader

    with pytest.raises(PipelineError, match=r"data.decode_device: cuda needs a CUDA GPU"):
        make_loader(replace(jpeg_shards, decode_device="cuda"), "train", "train", 4)
    once = make_loader(replace(jpeg_shards, decode_device="cuda"), "train", "once", 4)  # `once` streams: CPU
    assert next(iter(once))["image"].device.type == "cpu"


@pytest.mark.gpu
def test_gpu_decoding_feeds_cuda_batches_like_the_cpu_loader(jpeg_shards: DataConfig) -> None:
    from dataclasses import replace

    from rcg.data.loader import make_loader

    batches = make_loader(replace(jpeg_shards, decode_device="cuda"), "train", "train", 10, seed=5, num_workers=0)
    first = next(iter(batches))
    assert first["image"].device.type == "cuda"
    _compare_with_cpu_loader(jpeg_shards, batches)


@pytest.mark.gpu
def test_fused_adamw_tf32_and_compile_train_on_cuda(tmp_path: Path) -> None:
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        info = setup_distributed(tf32=True, compile=True)
        assert info.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
        spec, model, _ = _toy(tmp_path / "gpu", accum=2)
        opt = adamw(model.to(info.device).parameters(), 1e-2, device=info.device)
        assert opt.defaults["fused"] is True
        x, y = (t.to(info.device) for t in _table(6))

        def data(start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            return ((x[m * 4 : m * 4 + 4], y[m * 4 : m * 4 + 4]) for m in itertools.count(start))

        out = fit(spec, model, opt, _mse, data, info)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    reference = fit(*_toy(tmp_path / "cpu"), _mse, _rows(6, ROWS), CPU)
    # TF32 and compiled kernels round differently, and Adam turns tiny gradients into full steps:
    # close, not equal
    _close(reference.model, out.model.cpu(), atol=0.05)
    assert out.summary["final_loss"] == pytest.approx(reference.summary["final_loss"], rel=0.1)
    saved = read_checkpoint(tmp_path / "gpu" / "checkpoint-last.pt")
    assert list(saved["model"]) == list(reference.model.state_dict())
