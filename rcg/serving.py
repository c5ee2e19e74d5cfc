"""The trained RCG generator in the MLflow model registry: a pyfunc that samples images.

MLflow records models (docs/design.md); the registry holds the servable RCG generator under
aliases such as `@champion`. The pyfunc bundles what generation needs (method step 4): the RDM
(`models/rdm/rdm.*`), the class-conditional RDM when it was trained (`rdm_class.*`), the
representation-conditioned image generator (`models/generator/rep/`), the resolved config, and the
evaluation table its `fd` comes from. `load_context` loads `rcg.generation.RCGGenerator` straight
from the artifact folders (the config is a record), and `predict` calls it as `rcg generate` does:
RDM sample -> image generator, optional guidance (`cfg`), optional class through the
class-conditional RDM (paper section 4.4: no retraining of the image generator).

Input: one row per request, columns `n` (images), optional `class` (class index; empty = unconditional),
`cfg` (guidance scale, 0 = none), `seed`. Output: one row per image, columns `request`, `index`,
`class`, `seed`, `png` (base64 PNG bytes); `decode_images` turns that back into an array.
"""

from __future__ import annotations

import base64
import io
import logging
import json
import math
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rcg.config import Config
from rcg.io import PipelineError, read_json

log = logging.getLogger(__name__)

MODEL_NAME_IN_RUN = "rcg_generator"  # artifact folder of the logged model inside its run
CHAMPION = "champion"
MAX_IMAGES_PER_REQUEST = 1024  # a request is answered in one piece: keep one call bounded
# Packages the model needs at load time; pinned to the versions that logged it.
REQUIREMENTS = ("mlflow", "torch", "numpy", "pandas", "pillow", "safetensors", "pyyaml", "pyarrow")

try:  # MLflow is a hard dependency of the project, but keep `import rcg.serving` cheap to fail
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover
    PythonModel = object  # type: ignore[misc,assignment]


def served_mode(eval_table: dict[str, Any]) -> str:
    """The evaluation row that describes what the pyfunc serves by default: guided RCG if evaluated."""
    modes = eval_table.get("modes", {})
    if "rcg_cfg" in modes and float(eval_table.get("cfg", 0) or 0) > 0:
        return "rcg_cfg"
    return "rcg"


def _png_b64(image: np.ndarray) -> str:
    """uint8 [H, W, C] -> base64 PNG (grayscale for C = 1)."""
    from PIL import Image

    img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_images(predictions: Any) -> np.ndarray:
    """The pyfunc's answer (DataFrame, or the JSON `predictions` list of row dicts) -> uint8 [N, H, W, C]."""
    from PIL import Image

    rows = predictions.to_dict("records") if hasattr(predictions, "to_dict") else list(predictions)
    arrays = []
    for r in rows:
        a = np.asarray(Image.open(io.BytesIO(base64.b64decode(r["png"]))))
        arrays.append(a[..., None] if a.ndim == 2 else a)
    return np.stack(arrays) if arrays else np.zeros((0, 0, 0, 0), np.uint8)


def _optional(value: Any) -> Any:
    """None for a missing cell (None, NaN, pandas NA), the value otherwise."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def _integer(value: Any, key: str, row: int) -> int:
    """An integral number (1, 1.0, "1") as int; a PipelineError naming the request row otherwise."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        f = math.nan
    if not math.isfinite(f) or f != int(f):
        raise PipelineError(f"request {row}: {key} must be an integer, got {value!r}")
    return int(f)


class RCGPyfunc(PythonModel):
    """MLflow pyfunc around rcg.generation.RCGGenerator: RDM samples -> images (paper section 3)."""

    def load_context(self, context: Any) -> None:
        from rcg.generation import RCGGenerator

        arts = context.artifacts
        self.generator = RCGGenerator.load(arts["rdm"], Path(arts["generator"]) / "rep")
        evaluate = json.loads(Path(arts["config"]).read_text()).get("evaluate", {})  # the run's record
        table = json.loads(Path(arts["eval"]).read_text()) if "eval" in arts else {}
        self.default_cfg = float(table.get("cfg", evaluate.get("cfg", 0.0)) or 0.0)
        self.cfg_schedule = str(evaluate.get("cfg_schedule", "linear"))

    # pd.DataFrame is the one input hint MLflow accepts without inferring a schema from it: the
    # logged signature() stays the schema, and MLflow does not warn about a missing hint.
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Images for every request row (module docstring for the columns). pyfunc hands the rows
        over as a DataFrame; a dict or a list of dicts also works when called directly."""
        import torch

        requests = (
            model_input.to_dict("records") if isinstance(model_input, pd.DataFrame)
            else [model_input] if isinstance(model_input, dict) else list(model_input)
        )
        steps = (params or {}).get("steps")
        total = sum(_integer(r.get("n", 1), "n", i) for i, r in enumerate(requests))
        if total > MAX_IMAGES_PER_REQUEST:
            raise PipelineError(f"{total} images requested; at most {MAX_IMAGES_PER_REQUEST} per call")
        rows = []
        for i, r in enumerate(requests):
            n = _integer(r.get("n", 1), "n", i)
            cls = _optional(r.get("class"))
            cls = None if cls is None or _integer(cls, "class", i) < 0 else _integer(cls, "class", i)
            cfg_scale = _optional(r.get("cfg"))
            cfg_scale = self.default_cfg if cfg_scale is None else float(cfg_scale)
            seed = _optional(r.get("seed"))
            seed = 0 if seed is None else _integer(seed, "seed", i)
            if n < 1:
                raise PipelineError(f"request {i}: n must be at least 1, got {n}")
            if cls is not None and not self.generator.class_conditional:
                raise PipelineError("class given, but this model has no class-conditional RDM")
            images = self.generator.sample(n, cls, cfg=cfg_scale, cfg_schedule=self.cfg_schedule,
                                           steps=None if steps is None else int(steps), seed=seed)
            u8 = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            rows += [
                {"request": i, "index": j, "class": -1 if cls is None else cls, "seed": seed,
                 "png": _png_b64(u8[j])}
                for j in range(n)
            ]
        return pd.DataFrame(rows, columns=["request", "index", "class", "seed", "png"])


def signature() -> Any:
    """Input: n, optional class / cfg / seed; output: one row per image; param: `steps`."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([
            ColSpec("long", "n"),
            # Any, not long/double: a column left empty in some rows arrives as float NaN, and MLflow
            # refuses both NaN in a long column and int64 in a double one. predict checks the values.
            ColSpec(AnyType(), "class", required=False),
            ColSpec(AnyType(), "cfg", required=False),
            ColSpec(AnyType(), "seed", required=False),
        ]),
        outputs=Schema([
            ColSpec("long", "request"), ColSpec("long", "index"), ColSpec("long", "class"),
            ColSpec("long", "seed"), ColSpec("string", "png"),
        ]),
        params=ParamSchema([ParamSpec("steps", "long", None)]),
    )


def _requirements() -> list[str]:
    out = []
    for pkg in REQUIREMENTS:
        try:
            out.append(f"{pkg}=={metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            out.append(pkg)
    return out


def model_files(cfg: Config) -> dict[str, Path]:
    """The trained files the pyfunc bundles; a PipelineError names the first one missing."""
    rdm_dir = Path(cfg.train_rdm.out_dir)
    gen_dir = Path(cfg.train_generator.out_dir) / "rep"
    for path, stage in ((rdm_dir / "rdm.safetensors", "rcg train-rdm"),
                        (gen_dir / "generator.safetensors", "rcg train-generator --condition rep")):
        if not path.exists():
            raise PipelineError(f"{path}: not found (run `{stage}` first)")
    files = {"rdm": rdm_dir, "generator": gen_dir}
    if Path(cfg.evaluate.metrics_file).exists():
        files["eval"] = Path(cfg.evaluate.metrics_file)
    return files


def log_generator(cfg: Config, register: bool = True) -> Any:
    """Log the RCG generator as a pyfunc in the active MLflow run and register it.

    Also logs the evaluation table as run metrics (`<mode>.<metric>`) and `fd` of the served mode,
    the number `promote` compares. Returns MLflow's ModelInfo (`registered_model_version` is set
    when registered).
    """
    import mlflow

    files = model_files(cfg)
    table = read_json(files["eval"]) if "eval" in files else {}
    with tempfile.TemporaryDirectory(prefix="rcg-pyfunc-") as tmp:
        # Only what generation needs: the rep generator (not the baselines) and the RDMs.
        stage = Path(tmp)
        shutil.copytree(files["generator"], stage / "generator" / "rep")
        rdm = stage / "rdm"
        rdm.mkdir()
        for f in Path(files["rdm"]).glob("rdm*.*"):
            if f.suffix in (".safetensors", ".json"):
                shutil.copy2(f, rdm / f.name)
        (stage / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        artifacts = {"rdm": str(rdm), "generator": str(stage / "generator"),
                     "config": str(stage / "config.json")}
        if "eval" in files:
            artifacts["eval"] = str(files["eval"])
        if table:
            mode = served_mode(table)
            metrics = {f"{m}.{k}": float(v) for m, row in table.get("modes", {}).items()
                       for k, v in row.items() if isinstance(v, (int, float))}
            if f"{mode}.fd" in metrics:
                metrics["fd"] = metrics[f"{mode}.fd"]
            mlflow.log_metrics(metrics)
            mlflow.set_tags({"served_mode": mode})
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME_IN_RUN,
            python_model=RCGPyfunc(),
            artifacts=artifacts,
            code_paths=[str(Path(__file__).parent)],  # the model carries the rcg code it was built with
            signature=signature(),
            input_example=pd.DataFrame([{"n": 1, "seed": 0}]),  # shown in the UI; MLflow checks it
            pip_requirements=_requirements(),
            registered_model_name=cfg.tracking.registered_model if register else None,
        )
    if register and table:
        from mlflow import MlflowClient

        client = MlflowClient()
        fd = metrics.get("fd")
        if fd is not None:
            client.set_model_version_tag(cfg.tracking.registered_model,
                                         str(info.registered_model_version), "fd", str(fd))
    return info


# --------------------------------------------------------------------------------------------------
# Promotion: @champion moves only to a version with a better (lower) fd
# --------------------------------------------------------------------------------------------------


def version_fd(client: Any, name: str, version: str) -> float | None:
    """The `fd` logged with a model version: its run's `fd` metric (or the version tag)."""
    mv = client.get_model_version(name, version)
    fd = None
    if mv.run_id:
        fd = client.get_run(mv.run_id).data.metrics.get("fd")
    if fd is None and "fd" in (mv.tags or {}):
        fd = float(mv.tags["fd"])
    return None if fd is None or math.isnan(fd) else float(fd)


def latest_version(client: Any, name: str) -> str:
    versions = client.search_model_versions(f"name='{name}'")
    if not versions:
        raise PipelineError(f"registered model {name!r} has no versions (run `rcg promote` "
                            "without --version to register the current models)")
    return str(max(int(v.version) for v in versions))


def promote(client: Any, name: str, version: str | None = None, alias: str = CHAMPION) -> dict[str, Any]:
    """Move `@alias` to `version` (default: the latest) only if its fd beats the current holder's.

    A version without an fd is never promoted (nothing shows it is better). Returns the decision.
    """
    from mlflow.exceptions import MlflowException

    version = str(version) if version is not None else latest_version(client, name)
    fd = version_fd(client, name, version)
    try:
        current = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        current = None
    cur_version = None if current is None else str(current.version)
    cur_fd = None if current is None else version_fd(client, name, cur_version)
    if fd is None:
        promoted, reason = False, f"version {version} has no fd (evaluate before registering)"
    elif cur_version == version:
        promoted, reason = False, f"version {version} already holds @{alias}"
    elif current is None or cur_fd is None:
        promoted, reason = True, f"no @{alias} with an fd yet"
    elif fd < cur_fd:
        promoted, reason = True, f"fd {fd:.4g} < {cur_fd:.4g} of version {cur_version}"
    else:
        promoted, reason = False, f"fd {fd:.4g} >= {cur_fd:.4g} of @{alias} version {cur_version}"
    if promoted:
        client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, "promotion", ("promoted: " if promoted else "kept: ") + reason)
    log.info("promote %s version %s: %s (%s)", name, version, "promoted" if promoted else "not promoted", reason)
    return {"model": name, "version": version, "fd": fd, "alias": alias, "promoted": promoted,
            "previous_version": cur_version, "previous_fd": cur_fd, "reason": reason}
