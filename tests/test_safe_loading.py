"""No file the project reads can run code.

A crafted pickle runs code while it is unpickled (its `__reduce__` names any callable). Each test
plants one, built to create a marker file when unpickled, at a path the project reads through a
loader that could unpickle: the resume checkpoint of every training stage, the official encoder
checkpoint of every format, the Inception weights (configured, and in torch's hub cache), a
torch-fidelity cache entry, a VAE folder with a pickle `.bin`. Each is refused with one line naming
the file (`rcg <stage>: error: <path>: ...`, exit 1) and the marker never appears. Valid files of
each kind still load, and Inception gives exactly torch-fidelity's numbers.
"""

from __future__ import annotations

import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rcg.io import PipelineError
from tests.fakes import official_checkpoint, random_inception_weights, tiny_vae
from tests.generator_workspace import build, chdir

pytestmark = pytest.mark.usefixtures("one_thread")

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


class Payload:
    """What a crafted pickle does: call a function when unpickled (here: create `marker`)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def plant(path: Path, marker: Path, layout: str = "torch") -> Path:
    """A malicious file at `path`: a torch.save zip (`torch`) or a bare pickle (`pickle`, what the
    legacy torch format starts with), shaped like a checkpoint so only the payload is wrong."""
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {"payload": Payload(marker), "state_dict": {"w": torch.zeros(2)}, "step": 3}
    if layout == "torch":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    return path


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """`rcg <argv>` in-process: exit code and the lines it printed to stderr."""
    from rcg.cli import main

    capsys.readouterr()
    rc = main(argv)
    return rc, capsys.readouterr().err.splitlines()


def assert_refused(rc: int, err: list[str], command: str, path: str | Path, marker: Path) -> None:
    """Exit 1, the last stderr line is the one-line error naming `path`, and nothing ran."""
    assert not marker.exists(), f"{marker} exists: the planted pickle ran"
    assert rc == 1, err
    assert err and err[-1].startswith(f"rcg {command}: error: {path}: "), err


@pytest.mark.parametrize("layout", ["torch", "pickle"])
def test_the_planted_file_runs_code_when_unpickled(tmp_path: Path, layout: str) -> None:
    """The check the other tests rely on: loading a planted file unsafely does create the marker."""
    marker = tmp_path / "ran"
    path = plant(tmp_path / "x.pt", marker, layout)
    try:
        torch.load(path, weights_only=False)
    except Exception:  # the bare pickle is no torch file, but its payload ran before torch noticed
        pass
    assert marker.exists()


# --------------------------------------------------------------------------------------------------
# Resume checkpoints of every training stage, through the CLI
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tiny_workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards, encoder and features of the tiny preset (what train-rdm and train-generator read)."""
    return build(tiny_workspace, tmp_path_factory.mktemp("trained"), rdm=False)


@pytest.fixture
def workspace(trained: Path, tmp_path: Path) -> Iterator[Path]:
    """A fresh copy of `trained` (shards symlinked), as the working directory."""
    root = tmp_path / "ws"
    shutil.copytree(trained, root, symlinks=True)
    shutil.rmtree(root / "checkpoints", ignore_errors=True)
    with chdir(root):
        yield root


@pytest.mark.parametrize(
    "command,checkpoint",
    [
        (["encoder"], "checkpoints/encoder/checkpoint-last.pt"),
        (["train-rdm"], "checkpoints/train_rdm/uncond/checkpoint-last.pt"),
        (["train-rdm"], "checkpoints/train_rdm/class/checkpoint-last.pt"),  # after uncond has trained
        (["train-generator", "--condition", "rep"], "checkpoints/train_generator/rep/checkpoint-last.pt"),
        (["train-generator", "--condition", "none"], "checkpoints/train_generator/none/checkpoint-last.pt"),
        (["train-generator", "--condition", "label"], "checkpoints/train_generator/label/checkpoint-last.pt"),
        (["evalnet"], "checkpoints/evalnet/checkpoint-last.pt"),
    ],
)
def test_a_planted_resume_checkpoint_is_refused(
    workspace: Path, capsys: pytest.CaptureFixture[str], command: list[str], checkpoint: str
) -> None:
    marker = workspace / "ran"
    plant(workspace / checkpoint, marker)
    rc, err = run_cli([*command, "--preset", "tiny"], capsys)
    assert_refused(rc, err, command[0], checkpoint, marker)
    if checkpoint.startswith("checkpoints/train_rdm/class"):  # reached after the unconditional RDM trained
        assert (workspace / "checkpoints/train_rdm/uncond/checkpoint-last.pt").exists()
    assert "not a checkpoint this project can read safely" in err[-1]


# --------------------------------------------------------------------------------------------------
# Official encoder checkpoints (encoder.checkpoint, every checkpoint_format)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["mocov3", "dino", "ibot", "deit"])
@pytest.mark.parametrize("layout", ["torch", "pickle"])
def test_a_planted_encoder_checkpoint_is_refused(
    in_workspace: Path, capsys: pytest.CaptureFixture[str], fmt: str, layout: str
) -> None:
    marker = in_workspace / "ran"
    path = plant(in_workspace / "official" / f"{fmt}.pth", marker, layout)
    rc, err = run_cli(["encoder", "--preset", "tiny", "--set", f"encoder.checkpoint={path}",
                       "--set", f"encoder.checkpoint_format={fmt}",
                       # official encoders take RGB: one value per channel
                       "--set", "encoder.mean=[0.485,0.456,0.406]", "--set", "encoder.std=[0.229,0.224,0.225]"],
                      capsys)
    assert_refused(rc, err, "encoder", path, marker)
    assert "weights-only" in err[-1] and "nothing in it was run" in err[-1]


@pytest.mark.parametrize("fmt", ["mocov3", "dino", "ibot", "deit"])
def test_valid_official_checkpoints_still_load(tmp_path: Path, fmt: str) -> None:
    from rcg.encoders.checkpoints import load_checkpoint
    from tests.test_encoders import images

    path, spec, src = official_checkpoint(fmt, tmp_path / f"{fmt}.pth")
    enc = load_checkpoint(path, fmt, spec)
    x = images(c=3, h=32)
    torch.testing.assert_close(enc(x), src(x))


# --------------------------------------------------------------------------------------------------
# Inception weights (evaluate.inception_weights, or torch's hub cache)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """torch-fidelity's Inception layout with random weights (tests/test_fidelity.py's recipe)."""
    return random_inception_weights(tmp_path_factory.mktemp("inception") / INCEPTION_FILE)


@pytest.mark.parametrize("layout", ["torch", "pickle"])
@pytest.mark.parametrize("where", ["configured", "hub cache"])
def test_planted_inception_weights_are_refused(
    in_workspace: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, where: str, layout: str
) -> None:
    marker = in_workspace / "ran"
    if where == "configured":
        path = plant(in_workspace / "inception.pth", marker, layout)
        configured = ["--set", f"evaluate.inception_weights={path}"]
    else:  # evaluate.inception_weights empty: the file torch-fidelity would have downloaded
        monkeypatch.setenv("TORCH_HOME", str(in_workspace / "torch"))
        path = plant(Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE, marker, layout)
        configured = []
    rc, err = run_cli(["evaluate", "--preset", "tiny", "--set", "evaluate.extractor=inception", *configured], capsys)
    assert_refused(rc, err, "evaluate", path, marker)
    assert "not an Inception weights file this project can read safely" in err[-1]


def test_torch_fidelity_itself_never_unpickles_the_weights(tmp_path: Path) -> None:
    """The metric call, not only the stage's set-up, goes through the safe Inception."""
    from rcg.metrics.fidelity import UInt8Images, fidelity_metrics

    marker = tmp_path / "ran"
    path = plant(tmp_path / "inception.pth", marker)
    images = UInt8Images(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(PipelineError, match=f"^{path}: not an Inception weights file"):
        fidelity_metrics(images, images, extractor="inception-v3-compat", weights=path,
                         cache_root=tmp_path / "cache", reference_cache="ref", isc=False)
    assert not marker.exists()


@pytest.mark.parametrize("zipfile", [True, False])
def test_valid_inception_weights_give_torch_fidelity_numbers(
    inception_weights: Path, tmp_path: Path, zipfile: bool
) -> None:
    """Both torch formats load, and the features are torch-fidelity's own to the bit."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    from rcg.metrics.extractors import INCEPTION, SafeInceptionV3, extractor_setup

    path = tmp_path / INCEPTION_FILE
    torch.save(torch.load(inception_weights, weights_only=True), path, _use_new_zipfile_serialization=zipfile)
    assert extractor_setup("inception", "unused", str(path)) == (INCEPTION, path)
    assert FEATURE_EXTRACTORS_REGISTRY[INCEPTION] is SafeInceptionV3
    layers = ["64", "2048", "logits_unbiased"]
    ours = SafeInceptionV3(INCEPTION, layers, feature_extractor_weights_path=str(path))
    theirs = FeatureExtractorInceptionV3(INCEPTION, layers, feature_extractor_weights_path=str(path))  # trusted
    x = torch.randint(0, 256, (2, 3, 40, 40), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    with torch.no_grad():
        for a, b in zip(ours(x), theirs(x), strict=True):
            assert torch.equal(a, b)


def test_inception_weights_of_another_layout_are_named(inception_weights: Path, tmp_path: Path) -> None:
    from rcg.metrics.extractors import extractor_setup

    state = torch.load(inception_weights, weights_only=True)
    del state["fc.bias"]
    state["fc.weight"] = torch.zeros(1000, 2048)  # torchvision's 1000 classes, not the TF graph's 1008
    state["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    path = tmp_path / "other.pth"
    torch.save(state, path)
    with pytest.raises(PipelineError) as e:
        extractor_setup("inception", "unused", str(path))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: does not match torch-fidelity's Inception-v3")
    assert "1 missing keys: fc.bias" in msg and "1 unexpected keys: AuxLogits.fc.weight" in msg
    assert "1 shape mismatches: fc.weight (1000, 2048) vs (1008, 2048)" in msg
    torch.save({"fc.weight": [1, 2]}, path)  # loads weights-only, but is no state dict of tensors
    with pytest.raises(PipelineError, match=f"^{path}: not an Inception state dict"):
        extractor_setup("inception", "unused", str(path))


# --------------------------------------------------------------------------------------------------
# torch-fidelity's feature cache (evaluate.cache_dir)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evalnet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rcg.metrics.evalnet import EvalNet, save_evalnet

    torch.manual_seed(0)
    net = EvalNet(in_channels=1, image_size=28, num_classes=10, width=8, feature_dim=16)
    return save_evalnet(net.eval(), tmp_path_factory.mktemp("evalnet"), extra={"classes": list("abcdefghij")})


@pytest.mark.parametrize("entry", ["real-evalnet", "other-evalnet"])
def test_a_planted_fidelity_cache_entry_is_refused(evalnet: Path, tmp_path: Path, entry: str) -> None:
    """The real images' feature cache (rcg.metrics.fidelity.cached_features) is read weights-only."""
    from rcg.metrics.fidelity import UInt8Images, fidelity_metrics

    g = torch.Generator().manual_seed(0)
    real, other = (UInt8Images(torch.randint(0, 256, (40, 1, 28, 28), generator=g, dtype=torch.uint8))
                   for _ in range(2))
    kw = dict(extractor="evalnet", weights=evalnet, cache_root=tmp_path, reference_cache="real",
              generated_cache="other", kid_subset_size=10)
    first = fidelity_metrics(other, real, **kw)
    assert {p.stem for p in tmp_path.glob("*.pt")} == {"real-evalnet", "other-evalnet"}
    assert fidelity_metrics(other, real, **kw) == first  # valid entries are read back, weights-only
    marker = tmp_path / "ran"
    path = plant(tmp_path / f"{entry}.pt", marker)
    with pytest.raises(PipelineError) as e:
        fidelity_metrics(other, real, **kw)
    assert not marker.exists()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: a feature cache entry this project cannot read safely")


# --------------------------------------------------------------------------------------------------
# The VAE folder (train_generator.vae)
# --------------------------------------------------------------------------------------------------


def test_a_vae_folder_with_only_a_pickle_bin_is_refused(
    in_workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tiny_vae(in_workspace / "vae")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    marker = in_workspace / "ran"
    plant(folder / "diffusion_pytorch_model.bin", marker)
    rc, err = run_cli(["train-generator", "--condition", "none", "--preset", "tiny",
                       "--set", f"train_generator.vae={folder}"], capsys)
    assert_refused(rc, err, "train-generator", folder, marker)
    assert "only diffusion_pytorch_model.bin, a pickle format" in err[-1]


def test_a_vae_index_naming_pickle_shards_is_refused_and_safetensors_load(tmp_path: Path) -> None:
    import json

    from rcg.generators.vae import VAECodec, codec_for

    folder = tiny_vae(tmp_path / "vae")
    codec = codec_for(str(folder))  # the safetensors folder loads
    assert isinstance(codec, VAECodec) and codec.latent_shape(3, 32) == (4, 16)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"encoder.conv_in.weight": "part-1.bin"}}))
    with pytest.raises(PipelineError, match=f"^{index}: shards must be safetensors files, found \\['part-1.bin'\\]"):
        codec_for(str(folder))


# --------------------------------------------------------------------------------------------------
# timm: the encoders are built, never loaded from pretrained weights
# --------------------------------------------------------------------------------------------------


def test_building_encoders_loads_no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    from timm.models import _builder

    from rcg.encoders.vit import build_vit, encoder_spec
    from tests.test_encoders import small_spec

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a loader was called while building an encoder")

    # Where timm's create_model(pretrained=True) would read weights (timm.models._builder), and torch's.
    for target, name in ((torch, "load"), (torch.hub, "load_state_dict_from_url"), (_builder, "load_pretrained"),
                         (_builder, "load_custom_pretrained"), (_builder, "load_state_dict_from_url"),
                         (_builder, "load_state_dict")):
        monkeypatch.setattr(target, name, refuse)

    for spec in (small_spec(), small_spec(stem="conv", in_chans=1, img_size=28, patch_size=7, mean=(0.3,),
                                          std=(0.4,)), encoder_spec("mocov3_vit_small")):
        assert build_vit(spec) is not None
