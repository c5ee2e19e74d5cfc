"""The RCG generator as an MLflow pyfunc: register, promote on fd, load from the registry, serve over
HTTP, and refuse hostile requests (HTTP 400) before any image is generated."""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from rcg import config
from rcg.diffusion import diffusion_meta
from rcg.generators import build_generator, save_generator
from rcg.io import PipelineError, write_json
from rcg.rdm import build_rdm, make_meta, save_rdm
from rcg.serving import MAX_IMAGES_PER_REQUEST, MAX_SEED, Limits, RCGPyfunc, RequestError, validate_request
from tests.conftest import tiny_params

MODEL = "rcg-generator-test"
N_CLASSES = 3


def _perturb(model: torch.nn.Module) -> None:
    """Zero-initialised output layers would make every sample the same: give them weights."""
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn(p.shape, generator=g))


def _make_models(cfg: config.Config, class_rdm: bool = True) -> None:
    """A tiny RDM, the class-conditional RDM (if `class_rdm`) and a rep-conditioned DiT in the
    standard model folders."""
    diff = diffusion_meta("sqrt_linear", 100, 0.0015, 0.0195, "x0")
    for name, classes in (("rdm", 0), ("rdm_class", N_CLASSES))[: 2 if class_rdm else 1]:
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
    write_json(cfg.evaluate.details_file, {
        "cfg": 1.0, "modes": {"rcg": {"fd": fd + 1.0, "is": 2.0}, "rcg_cfg": {"fd": fd, "is": 2.5}}})


def _new_project(folder: Path, mp: pytest.MonkeyPatch, class_rdm: bool = True) -> config.Config:
    """A project folder with tracking on (SQLite store in the folder) and tiny trained models; `mp`
    moves into it and points MLflow at its store."""
    (folder / "params.yaml").write_text(tiny_params(tracking={
        "enabled": True, "uri": f"sqlite:///{folder}/mlflow.db", "registered_model": MODEL}))
    mp.chdir(folder)
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder}/mlflow.db")
    cfg = config.load("params.yaml")
    _make_models(cfg, class_rdm)
    return cfg


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> config.Config:
    """A project folder with tracking on (SQLite store in the folder) and tiny trained models."""
    return _new_project(tmp_path, monkeypatch)


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

    no_eval = _promote(project, fd=None)  # no metrics/details/eval.json yet: registered, never champion
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


def test_a_generator_on_vae_latents_is_served_with_its_vae(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """generator.json names the VAE folder by the path it was trained with (the imagenet256 preset's
    is relative to the project): the registered model carries a copy, so it loads and draws images
    from another folder, with the project's VAE gone."""
    import shutil

    import mlflow

    from rcg.serving import decode_images
    from tests.fakes import tiny_vae

    project = tmp_path / "project"
    project.mkdir()
    cfg = _new_project(project, monkeypatch)
    tiny_vae(project / "vae")  # two blocks: 8 x 8 latents of 16 px images
    kwargs = dict(input_size=8, in_channels=4, condition="rep", rep_dim=256, num_classes=N_CLASSES, rep_drop_prob=0.1)
    gen = build_generator("dit_tiny", **kwargs)
    _perturb(gen)
    meta = {"arch": "dit_tiny", "kwargs": kwargs, "codec": {"type": "vae", "path": "vae", "scale": 0.18215},
            "diffusion": {"timesteps": 100, "beta_schedule": "linear", "parameterization": "eps"},
            "sampling": {"sampler": "ddpm", "steps": 3, "eta": 1.0, "amp": False}}
    save_generator(Path(cfg.train_generator.out_dir) / "rep", gen, meta)
    _promote(cfg, fd=10.0)
    shutil.rmtree(project / "vae")
    monkeypatch.chdir(tmp_path)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    images = decode_images(model.predict(pd.DataFrame([{"n": 2, "seed": 0}, {"n": 1, "class": 1}])))
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8 and images.std() > 0
    # Registering a generator whose VAE folder is missing stops with a line naming the folder.
    monkeypatch.chdir(project)
    save_generator(Path(cfg.train_generator.out_dir) / "rep", gen, {**meta, "codec": {"type": "vae", "path": "gone"}})
    with pytest.raises(PipelineError, match="^gone: not found"):
        _promote(cfg, fd=9.0)


def test_promote_does_nothing_with_tracking_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rcg.stages import promote

    (tmp_path / "params.yaml").write_text(tiny_params(tracking={"enabled": False}))
    monkeypatch.chdir(tmp_path)
    promote.run(config.load("params.yaml"))
    assert json.loads(Path(promote.DECISION_FILE).read_text())["promoted"] is False
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()


# --------------------------------------------------------------------------------------------------
# Requests: validated as a whole before any image is generated (no server, no model)
# --------------------------------------------------------------------------------------------------

LIMITS = Limits(num_classes=N_CLASSES, timesteps=100, default_cfg=1.5)


@pytest.mark.parametrize("rows, params, want", [
    ([{"n": 1}], None, [(1, None, 1.5, 0)]),  # the defaults: unconditional, the model's cfg, seed 0
    ([{"n": 1.0, "class": "2", "cfg": "0", "seed": "7"}], None, [(1, 2, 0.0, 7)]),
    ([{"n": "3", "class": np.int64(0), "cfg": 20, "seed": MAX_SEED}], {"steps": 100}, [(3, 0, 20.0, MAX_SEED)]),
    ([{"n": 2, "class": None, "cfg": math.nan, "seed": ""}], {"steps": None}, [(2, None, 1.5, 0)]),
    ([{"n": MAX_IMAGES_PER_REQUEST - 1}, {"n": 1, "cfg": 2.5}], {"steps": 1},
     [(MAX_IMAGES_PER_REQUEST - 1, None, 1.5, 0), (1, None, 2.5, 0)]),
])
def test_validate_request_accepts_integers_in_any_spelling_and_fills_defaults(rows, params, want) -> None:
    requests, steps = validate_request(pd.DataFrame(rows), params, LIMITS)
    assert [(r.n, r.class_id, r.cfg, r.seed) for r in requests] == want
    assert all(type(r.n) is int and type(r.seed) is int for r in requests)
    assert steps == (params or {}).get("steps")


def test_validate_request_takes_the_shapes_a_pyfunc_may_be_given() -> None:
    one = [(1, 2, 1.5, 0)]
    as_tuples = lambda rs: [(r.n, r.class_id, r.cfg, r.seed) for r in rs]  # noqa: E731
    assert as_tuples(validate_request({"n": 1, "class": 2}, None, LIMITS)[0]) == one  # one row
    assert as_tuples(validate_request([{"n": 1, "class": 2}], None, LIMITS)[0]) == one  # a list of rows
    assert as_tuples(validate_request({"n": np.array(1), "class": np.array(2)}, None, LIMITS)[0]) == one
    columns = {"n": np.array([1, 2]), "seed": np.array([3, 4])}  # the server's `inputs` format
    assert as_tuples(validate_request(columns, None, LIMITS)[0]) == [(1, None, 1.5, 3), (2, None, 1.5, 4)]
    for bad in ({"n": [1, 2], "seed": [1]}, np.array([1, 2]), "n=1", [1, 2]):
        with pytest.raises(RequestError, match="request columns must be|a request is a list of rows"):
            validate_request(bad, None, LIMITS)


# (rows, params, the field named, the row named, a piece of the one-line reason)
REFUSED = {
    "missing n": ([{"seed": 1}], None, "n", 0, "request 0: n (the number of images, an integer >= 1) is required"),
    "NaN n": ([{"n": 1}, {"n": math.nan}], None, "n", 1, "request 1: n (the number of images"),
    "negative n": ([{"n": -1}], None, "n", 0, "request 0: n must be an integer in [1, 1024], got -1"),
    "zero n": ([{"n": 0}], None, "n", 0, "got 0"),
    "fractional n": ([{"n": 1.5}], None, "n", 0, "got 1.5"),
    "boolean n": ([{"n": True}], None, "n", 0, "got True"),
    "text n": ([{"n": "x"}], None, "n", 0, "got 'x'"),
    "infinite n": ([{"n": math.inf}], None, "n", 0, "got inf"),
    "list n": ([{"n": [1]}], None, "n", 0, "got [1]"),
    "rows that cancel out": ([{"n": 1000}, {"n": 1000}, {"n": -1990}], None, "n", 2, "request 2: n must be"),
    "total over the cap": ([{"n": 1000}, {"n": 100}], None, "n", None, "the 2 rows ask for 1100 images; at most 1024"),
    "negative class": ([{"n": 1, "class": -1}], None, "class", 0, "class must be an integer in [0, 2]"),
    "too-large class": ([{"n": 1}, {"n": 1, "class": 3}], None, "class", 1, "request 1: class must be"),
    "fractional class": ([{"n": 1, "class": 1.5}], None, "class", 0, "got 1.5"),
    "text cfg": ([{"n": 1, "cfg": "strong"}], None, "cfg", 0, "cfg (guidance scale) must be a number in [0, 20]"),
    "infinite cfg": ([{"n": 1, "cfg": math.inf}], None, "cfg", 0, "got inf"),
    "NaN cfg as text": ([{"n": 1, "cfg": "NaN"}], None, "cfg", 0, "got 'NaN'"),
    "too-large cfg": ([{"n": 1, "cfg": 20.5}], None, "cfg", 0, "got 20.5"),
    "negative cfg": ([{"n": 1, "cfg": -0.5}], None, "cfg", 0, "got -0.5"),
    "boolean cfg": ([{"n": 1, "cfg": True}], None, "cfg", 0, "got True"),
    "huge seed": ([{"n": 1, "seed": 2**64}], None, "seed", 0, f"seed must be an integer in [0, {MAX_SEED}]"),
    "negative seed": ([{"n": 1, "seed": -1}], None, "seed", 0, "got -1"),
    "fractional seed": ([{"n": 1, "seed": 0.5}], None, "seed", 0, "got 0.5"),
    "a 5000-digit seed": ([{"n": 1, "seed": "9" * 5000}], None, "seed", 0, "got '999"),
    "zero steps": ([{"n": 1}], {"steps": 0}, "steps", None, "params: steps must be an integer in [1, 100], got 0"),
    "negative steps": ([{"n": 1}], {"steps": -1}, "steps", None, "got -1"),
    "too many steps": ([{"n": 1}], {"steps": 101}, "steps", None, "got 101"),
    "fractional steps": ([{"n": 1}], {"steps": 2.5}, "steps", None, "got 2.5"),
    "unknown column": ([{"n": 1}, {"n": 1, "size": 64}], None, "size", 1,
                       "request 1: unknown field 'size'; the fields are n, class, cfg, seed"),
    "unknown param": ([{"n": 1}], {"stepz": 3}, "stepz", None, "params: unknown param 'stepz'; the params are steps"),
    "empty request": ([], None, None, None, "the request has no rows"),
}


@pytest.mark.parametrize("rows, params, field, row, reason", REFUSED.values(), ids=REFUSED.keys())
def test_validate_request_refuses_with_one_line_naming_row_and_field(rows, params, field, row, reason) -> None:
    from mlflow.exceptions import MlflowException

    with pytest.raises(RequestError) as e:
        validate_request(pd.DataFrame(rows), params, LIMITS)
    err = e.value
    assert reason in str(err) and "\n" not in str(err)
    assert (err.field, err.row) == (field, row)
    assert isinstance(err, MlflowException) and err.get_http_status_code() == 400
    assert isinstance(err, PipelineError)  # the CLI prints it in one line too


def test_a_class_needs_a_class_conditional_rdm() -> None:
    no_class = Limits(num_classes=0, timesteps=100, default_cfg=0.0)
    assert validate_request([{"n": 1}], None, no_class)[0][0].class_id is None
    with pytest.raises(RequestError, match="request 0: class given, but this model has no class-conditional RDM"):
        validate_request([{"n": 1, "class": 0}], None, no_class)


def test_predict_generates_nothing_when_any_row_is_refused() -> None:
    """The last row is bad: the first is not sampled either (all rows are checked first)."""
    calls = []

    class Generator:
        def sample(self, n: int, *args, **kwargs) -> torch.Tensor:
            calls.append(n)
            return torch.zeros(n, 1, 4, 4)

    pyfunc = RCGPyfunc()
    pyfunc.generator, pyfunc.cfg_schedule, pyfunc.limits = Generator(), "linear", LIMITS
    with pytest.raises(RequestError, match="request 1: cfg"):
        pyfunc.predict(None, pd.DataFrame([{"n": 2}, {"n": 1, "cfg": math.inf}]))
    assert calls == []
    out = pyfunc.predict(None, pd.DataFrame([{"n": 2}, {"n": 1, "class": 1}]))
    assert calls == [2, 1] and list(out["class"]) == [-1, -1, 1]


# --------------------------------------------------------------------------------------------------
# Over HTTP: `mlflow models serve`, started once for the module
# --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serve(cfg: config.Config, folder: Path) -> Iterator[str]:
    """`mlflow models serve` of the champion on 127.0.0.1 for the block; yields its URL once /ping answers."""
    port = _free_port()
    # `mlflow models serve` execs `uvicorn` by name: the venv's bin/ must be on PATH.
    path = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    env = dict(os.environ, MLFLOW_TRACKING_URI=cfg.tracking.uri, PATH=path)
    log_path = folder / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL}@champion",
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder, start_new_session=True,
        )
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        try:
            while True:
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
                try:
                    with urllib.request.urlopen(url + "/ping", timeout=5):
                        break
                except (urllib.error.URLError, ConnectionError):
                    time.sleep(0.5)
            yield url
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 15)  # the server and its uvicorn worker
                proc.wait(timeout=30)


def _post(url: str, body: object) -> tuple[int, Any]:
    """POST to /invocations: a list is `dataframe_records`, a dict the whole JSON body, a str sent
    as it is. Returns the HTTP status and the JSON answer (the text when it is not JSON)."""
    if isinstance(body, list):
        body = {"dataframe_records": body}
    data = (body if isinstance(body, str) else json.dumps(body)).encode()
    req = urllib.request.Request(url + "/invocations", data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, config.Config, Path]]:
    """A registry whose champion has a class-conditional RDM, served over HTTP: URL, config, folder."""
    folder = tmp_path_factory.mktemp("served")
    with pytest.MonkeyPatch.context() as mp:
        cfg = _new_project(folder, mp)
        _promote(cfg, fd=10.0)
    with _serve(cfg, folder) as url:
        yield url, cfg, folder


# The JSON body (_post), the field the answer names (None: refused by MLflow before the model runs)
# and a piece of its message. JSON has no NaN or Infinity, but Python's parser (the server's) takes
# them: Infinity arrives as inf, NaN as an empty field (indistinguishable in a DataFrame).
HOSTILE = {
    "negative n": ([{"n": -1}], "n", "request 0: n must be an integer in [1, 1024], got -1"),
    "fractional n": ([{"n": 1.5}], "n", "request 0: n must be an integer in [1, 1024], got 1.5"),
    "boolean n": ([{"n": 1}, {"n": True}], "n", "request 1: n must be an integer in [1, 1024], got True"),
    "rows that cancel out": ([{"n": 1000}, {"n": 1000}, {"n": -1990}], "n", "request 2: n must be"),
    "total over the cap": ([{"n": 1000}, {"n": 100}], "n", "ask for 1100 images; at most 1024 per request"),
    "text cfg": ([{"n": 1, "cfg": "strong"}], "cfg", "request 0: cfg (guidance scale) must be a number in [0, 20]"),
    "infinite cfg": ('{"dataframe_records": [{"n": 1, "cfg": Infinity}]}', "cfg", "got inf"),
    "NaN cfg as text": ([{"n": 1, "cfg": "NaN"}], "cfg", "got 'NaN'"),
    "too-large cfg": ([{"n": 1, "cfg": 1e6}], "cfg", "got 1000000.0"),
    "negative class": ([{"n": 1, "class": -1}], "class", "request 0: class must be an integer in [0, 2]"),
    "too-large class": ([{"n": 1}, {"n": 1, "class": 3}], "class", "request 1: class must be an integer"),
    "huge seed": ([{"n": 1, "seed": 2**70}], "seed", f"request 0: seed must be an integer in [0, {MAX_SEED}]"),
    "negative seed": ([{"n": 1, "seed": -1}], "seed", "got -1"),
    "fractional seed": ([{"n": 1, "seed": 0.5}], "seed", "got 0.5"),
    "zero steps": ({"dataframe_records": [{"n": 1}], "params": {"steps": 0}}, "steps",
                   "params: steps must be an integer in [1, 100], got 0"),
    "negative steps": ({"dataframe_records": [{"n": 1}], "params": {"steps": -1}}, "steps", "got -1"),
    "too many steps": ({"dataframe_records": [{"n": 1}], "params": {"steps": 101}}, "steps", "got 101"),
    # MLflow checks a param's type against the logged `long` before predict runs.
    "fractional steps": ({"dataframe_records": [{"n": 1}], "params": {"steps": 2.5}}, None, "'steps'"),
    "unknown column": ([{"n": 1, "size": 64}], "size",
                       "request 0: unknown field 'size'; the fields are n, class, cfg, seed"),
    "empty request": ([], None, "the request has no rows"),
    "a field twice": ({"dataframe_split": {"columns": ["n", "n"], "data": [[1, 2]]}}, "n", "field 'n' is given twice"),
    "malformed JSON": ('{"dataframe_records": [{"n": 1}', None, "Ensure that input is a valid JSON"),
    "records not a list": ({"dataframe_records": {"n": 1}}, None, "must be a list of records"),
}


@pytest.mark.parametrize("body, field, piece", HOSTILE.values(), ids=HOSTILE.keys())
def test_served_model_refuses_hostile_requests_with_400(served, body, field, piece) -> None:
    status, answer = _post(served[0], body)
    assert status == 400, answer
    assert piece in answer["message"]
    if field is not None or "reason" in answer:  # the model's own refusal: a one-line reason
        assert answer["error_code"] == "INVALID_PARAMETER_VALUE" and answer["field"] == field
        assert piece in answer["reason"] and "\n" not in answer["reason"]
        assert answer["message"].endswith(answer["reason"])  # MLflow prefixes the request's repr
    else:  # refused by MLflow's parsing before the model runs
        assert answer["error_code"] in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST")


def test_unknown_params_are_dropped_by_mlflow_before_the_model_runs(served) -> None:
    """The scoring server keeps only the params the logged schema names (rcg.serving.signature),
    warning in its log: the served model never sees `stepz`, so it cannot refuse it over HTTP."""
    url, _, folder = served
    status, answer = _post(url, {"dataframe_records": [{"n": 1}], "params": {"stepz": 3}})
    assert status == 200 and len(answer["predictions"]) == 1
    assert "Unrecognized params ['stepz'] are ignored" in (folder / "serve.log").read_text()


def test_served_model_answers_http_with_images(served, monkeypatch: pytest.MonkeyPatch) -> None:
    """`mlflow models serve` on 127.0.0.1 answers a POST to /invocations with decodable images,
    also right after refusals, and takes integers in any spelling and the range edges."""
    import mlflow

    from rcg.serving import decode_images

    url, cfg, folder = served
    for body, _, _ in list(HOSTILE.values())[:3]:
        assert _post(url, body)[0] == 400
    status, answer = _post(url, [{"n": 3, "seed": 7}, {"n": 1, "class": 1, "seed": 2}])
    assert status == 200, answer
    rows = answer["predictions"]
    assert [r["class"] for r in rows] == [-1, -1, -1, 1]
    served_images = decode_images(rows)
    assert served_images.shape == (4, 28, 28, 1)
    monkeypatch.chdir(folder)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", cfg.tracking.uri)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    local = model.predict(pd.DataFrame([{"n": 3, "seed": 7}]))
    assert np.array_equal(served_images[:3], decode_images(local))  # the server runs the same sampler

    edges = [{"n": "1", "seed": MAX_SEED, "cfg": 20}, {"n": 1.0, "class": N_CLASSES - 1, "cfg": "0"}]
    status, answer = _post(url, {"dataframe_records": edges, "params": {"steps": 100}})
    assert status == 200, answer
    assert [(r["class"], r["seed"]) for r in answer["predictions"]] == [(-1, MAX_SEED), (N_CLASSES - 1, 0)]


def test_direct_calls_raise_the_same_one_line_errors(served, monkeypatch: pytest.MonkeyPatch) -> None:
    """`model.predict(df)` on the registered model refuses what the server refuses, with the same reason."""
    import mlflow

    url, cfg, folder = served
    monkeypatch.chdir(folder)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", cfg.tracking.uri)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    for body, field, piece in HOSTILE.values():
        if isinstance(body, list):
            records, params = body, None
        elif isinstance(body, dict) and field is not None and "dataframe_records" in body:
            records, params = body["dataframe_records"], body.get("params")
        else:  # a body only the server parses
            continue
        with pytest.raises(RequestError) as e:
            model.predict(pd.DataFrame(records), params=params)
        assert e.value.field == field and piece in str(e.value)
        assert str(e.value) == _post(url, body)[1]["reason"]
    with pytest.raises(RequestError, match="params: unknown param 'stepz'"):  # no MLflow in between
        model.unwrap_python_model().predict(None, pd.DataFrame([{"n": 1}]), params={"stepz": 3})


def test_served_model_without_class_rdm_refuses_a_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _new_project(tmp_path, monkeypatch, class_rdm=False)
    _promote(cfg, fd=10.0)
    with _serve(cfg, tmp_path) as url:
        status, answer = _post(url, [{"n": 1}, {"n": 1, "class": 0}])
        assert status == 400 and answer["field"] == "class", answer
        assert "request 1: class given, but this model has no class-conditional RDM" in answer["reason"]
        status, answer = _post(url, [{"n": 2, "seed": 1}])
        assert status == 200 and [r["class"] for r in answer["predictions"]] == [-1, -1]
