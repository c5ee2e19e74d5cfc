"""The RCG generator as an MLflow pyfunc: register, promote on fd, load from the registry, serve over HTTP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from rcg import config
from rcg.diffusion import diffusion_meta
from rcg.generators import build_generator, save_generator
from rcg.io import write_json
from rcg.rdm import build_rdm, make_meta, save_rdm
from tests.conftest import tiny_params

MODEL = "rcg-generator-test"
N_CLASSES = 3


def _perturb(model: torch.nn.Module) -> None:
    """Zero-initialised output layers would make every sample the same: give them weights."""
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn(p.shape, generator=g))


def _make_models(cfg: config.Config) -> None:
    """A tiny RDM, class-conditional RDM and rep-conditioned DiT in the standard model folders."""
    diff = diffusion_meta("sqrt_linear", 100, 0.0015, 0.0195, "x0")
    for name, classes in (("rdm", 0), ("rdm_class", N_CLASSES)):
        net = build_rdm("tiny", num_classes=classes)
        _perturb(net)
        save_rdm(net, make_meta(net, "tiny", diff, {"steps": 3, "eta": 1.0, "temperature": 1.0}),
                 cfg.train_rdm.out_dir, name)
    kwargs = dict(input_size=28, in_channels=1, condition="rep", rep_dim=256, num_classes=N_CLASSES,
                  rep_drop_prob=0.1)
    gen = build_generator("dit_tiny", **kwargs)
    _perturb(gen)
    meta = {"arch": "dit_tiny", "kwargs": kwargs, "codec": {"type": "pixel"},
            "diffusion": {"timesteps": 100, "beta_schedule": "linear", "parameterization": "eps"},
            "sampling": {"sampler": "ddim", "steps": 3, "eta": 0.0, "amp": False}}
    save_generator(Path(cfg.train_generator.out_dir) / "rep", gen, meta)


def _eval_table(cfg: config.Config, fd: float) -> None:
    write_json(cfg.evaluate.metrics_file, {
        "cfg": 1.0, "modes": {"rcg": {"fd": fd + 1.0, "is": 2.0}, "rcg_cfg": {"fd": fd, "is": 2.5}}})


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> config.Config:
    """A project folder with tracking on (SQLite store in the folder) and tiny trained models."""
    (tmp_path / "params.yaml").write_text(tiny_params(tracking={
        "enabled": True, "uri": f"sqlite:///{tmp_path}/mlflow.db", "registered_model": MODEL}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    cfg = config.load("params.yaml")
    _make_models(cfg)
    return cfg


def _promote(cfg: config.Config, fd: float | None, version: str | None = None) -> dict:
    from rcg.stages import promote

    if fd is not None:
        _eval_table(cfg, fd)
    promote.run(cfg, version=version)
    return json.loads(Path(promote.DECISION_FILE).read_text())


def test_registry_round_trip_and_champion_moves_only_on_better_fd(project: config.Config) -> None:
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    from rcg.serving import decode_images

    no_eval = _promote(project, fd=None)  # no metrics/eval.json yet: registered, never champion
    assert no_eval["version"] == "1" and not no_eval["promoted"] and "no fd" in no_eval["reason"]

    first = _promote(project, fd=10.0)
    assert first["version"] == "2" and first["promoted"] and first["fd"] == 10.0

    client = MlflowClient()
    mv = client.get_model_version_by_alias(MODEL, "champion")
    assert str(mv.version) == "2"
    run = client.get_run(mv.run_id)
    assert run.data.metrics["fd"] == 10.0 and run.data.metrics["rcg.fd"] == 11.0
    assert run.data.tags["stage"] == "promote" and run.data.tags["git_commit"]

    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    req = pd.DataFrame([{"n": 2, "seed": 0}, {"n": 1, "class": 2, "cfg": 1.0, "seed": 1}])
    out = model.predict(req)
    assert list(out["request"]) == [0, 0, 1] and list(out["class"]) == [-1, -1, 2]
    images = decode_images(out)
    assert images.shape == (3, 28, 28, 1) and images.dtype == np.uint8
    assert images.std() > 0
    # The pyfunc is RCGGenerator loaded from the logged folders, with the table's guidance (cfg 1.0).
    from rcg.generation import RCGGenerator
    from rcg.serving import RCGPyfunc

    assert isinstance(model.unwrap_python_model(), RCGPyfunc)
    local = RCGGenerator.load(project.train_rdm.out_dir, Path(project.train_generator.out_dir) / "rep")
    want = local.sample(2, cfg=1.0, cfg_schedule=project.evaluate.cfg_schedule, seed=0)
    assert np.array_equal(images[:2], (want.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    again = decode_images(model.predict(pd.DataFrame([{"n": 2, "seed": 0}])))
    other = decode_images(model.predict(pd.DataFrame([{"n": 2, "seed": 5}])))
    assert np.array_equal(again, images[:2]) and not np.array_equal(other, images[:2])
    with pytest.raises(Exception, match="class must be an integer"):
        model.predict(pd.DataFrame([{"n": 1, "class": 1.5}]))
    with pytest.raises(Exception, match="at most 1024"):
        model.predict(pd.DataFrame([{"n": 1000}, {"n": 100}]))

    worse = _promote(project, fd=12.0)
    assert worse["version"] == "3" and not worse["promoted"] and "12 >= 10" in worse["reason"]
    assert client.get_model_version_by_alias(MODEL, "champion").version == 2

    better = _promote(project, fd=8.0)
    assert better["version"] == "4" and better["promoted"] and better["previous_version"] == "2"
    assert client.get_model_version_by_alias(MODEL, "champion").version == 4

    again = _promote(project, fd=None, version="3")  # explicit version: compared, not registered
    assert not again["promoted"] and len(client.search_model_versions(f"name='{MODEL}'")) == 4
    assert client.get_model_version(MODEL, "3").tags["promotion"].startswith("kept: fd 12")


def test_promote_does_nothing_with_tracking_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rcg.stages import promote

    (tmp_path / "params.yaml").write_text(tiny_params())
    monkeypatch.chdir(tmp_path)
    promote.run(config.load("params.yaml"))
    assert json.loads(Path(promote.DECISION_FILE).read_text())["promoted"] is False
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_served_model_answers_http_with_images(project: config.Config, tmp_path: Path) -> None:
    """`mlflow models serve` on 127.0.0.1 answers a POST to /invocations with decodable images."""
    import mlflow
    import pandas as pd

    from rcg.serving import decode_images

    _promote(project, fd=10.0)
    port = _free_port()
    # `mlflow models serve` execs `uvicorn` by name: the venv's bin/ must be on PATH.
    path = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    env = dict(os.environ, MLFLOW_TRACKING_URI=project.tracking.uri, PATH=path)
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL}@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    body = json.dumps({"dataframe_records": [{"n": 3, "seed": 7}, {"n": 1, "class": 1, "seed": 2}]})
    try:
        deadline = time.monotonic() + 90
        answer = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body.encode(),
                                             {"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=60) as r:
                    answer = json.loads(r.read())
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        assert answer is not None, (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)  # the server and its uvicorn worker
            proc.wait(timeout=30)
        log.close()
    rows = answer["predictions"]
    assert [r["class"] for r in rows] == [-1, -1, -1, 1]
    served = decode_images(rows)
    assert served.shape == (4, 28, 28, 1)
    local = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion").predict(
        pd.DataFrame([{"n": 3, "seed": 7}]))
    assert np.array_equal(served[:3], decode_images(local))  # the server runs the same sampler
