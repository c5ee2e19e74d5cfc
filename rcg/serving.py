"""The trained RCG generator in the MLflow model registry: a pyfunc that samples images.

MLflow records models (docs/design.md); the registry holds the servable RCG generator under
aliases such as `@champion`. The pyfunc bundles what generation needs (method step 4): the RDM
(`models/rdm/rdm.*`), the class-conditional RDM when it was trained (`rdm_class.*`), the
representation-conditioned image generator (`models/generator/rep/`) with the VAE folder it decodes
through when it works on VAE latents (the imagenet256 preset's DiT), the resolved config, and the
evaluation table its `fd` comes from. `load_context` loads `rcg.generation.RCGGenerator` straight
from the artifact folders (the config is a record), and `predict` calls it as `rcg generate` does:
RDM sample -> image generator, optional guidance (`cfg`), optional class through the
class-conditional RDM (paper section 4.4: no retraining of the image generator).

Input: one row per request, with the fields (`validate_request` checks them all, and the `steps`
param, before any image is generated; a refusal is a `RequestError`, HTTP 400 when served):
- `n`: images, an integer in [1, MAX_IMAGES_PER_REQUEST] (1, 1.0 and "1" are integers); the rows
  together ask for at most MAX_IMAGES_PER_REQUEST images;
- `class` (optional, empty = unconditional): a class in [0, num_classes) of the class-conditional
  RDM; refused when the model has none;
- `cfg` (optional, empty = the evaluated guidance): guidance scale, a finite number in [0, MAX_CFG];
- `seed` (optional, empty = 0): an integer in [0, MAX_SEED].
Param `steps` (optional): image sampler steps in [1, the generator's diffusion timesteps] (a MAGE
generator: decoding iterations in [1, its token count]).
"Empty" is how a DataFrame fills a field that a row leaves out: None, NaN or a blank string.
Output: one row per image, columns `request`, `index`, `class` (-1: unconditional), `seed`, `png`
(base64 PNG bytes); `decode_images` turns that back into an array.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import re
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from rcg.config import Config
from rcg.io import PipelineError, read_json

log = logging.getLogger(__name__)

MODEL_NAME_IN_RUN = "rcg_generator"  # artifact folder of the logged model inside its run
CHAMPION = "champion"
MAX_IMAGES_PER_REQUEST = 1024  # a request is answered in one piece: keep one call bounded
COLUMNS = ("n", "class", "cfg", "seed")  # the fields of a request row
PARAMS = ("steps",)  # the request's params
# Guidance scale w: the paper's best settings are w = 1 (MAGE-B) and 6 (MAGE-L) (docs/paper.md,
# Headline numbers); 20 leaves room to explore past them, while w -> inf only saturates the images
# (at inf they come out black).
MAX_CFG = 20.0
# Seeds: RCGGenerator seeds torch with `(seed + 1) * 1_000_003 + batch` for the image noise
# (rcg.sampling.batch_generator), which must fit torch's 64-bit seed; 2**32 - 1 fits with room to
# spare and is exact in the float64 column pandas makes when some rows leave `seed` empty.
MAX_SEED = 2**32 - 1
# Packages the model needs at load time; pinned to the versions that logged it.
REQUIREMENTS = ("mlflow", "torch", "numpy", "pandas", "pillow", "safetensors", "pyyaml", "pyarrow")


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


# --------------------------------------------------------------------------------------------------
# Requests: every row is checked before any image is generated
# --------------------------------------------------------------------------------------------------


class RequestError(MlflowException, PipelineError):
    """A refused request: HTTP 400 from `mlflow models serve` (INVALID_PARAMETER_VALUE).

    `str(e)` is the one-line reason; the JSON body of the HTTP answer carries it as `reason`, with
    `request` (the row, or null) and `field` beside MLflow's own `message`.
    """

    def __init__(self, reason: str, field: str | None = None, row: int | None = None) -> None:
        super().__init__(reason, error_code=INVALID_PARAMETER_VALUE, reason=reason, request=row, field=field)
        self.reason, self.field, self.row = reason, field, row


@dataclass(frozen=True)
class Limits:
    """What a request may ask of one served model: its classes (0 = no class-conditional RDM),
    the image generator's most sampling steps (`ImageGenerator.max_steps`) and its default guidance."""

    num_classes: int
    timesteps: int
    default_cfg: float


@dataclass(frozen=True)
class Request:
    """One validated request row: n images of `class_id` (None: unconditional), guidance, seed."""

    n: int
    class_id: int | None
    cfg: float
    seed: int


def _show(value: Any) -> str:
    """A short repr for a message (a hostile value may be huge; ints past 4300 digits have none)."""
    try:
        text = repr(value.item() if isinstance(value, np.generic) else value)
    except ValueError:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 40 else text[:37] + "..."


def _missing(value: Any) -> bool:
    """An empty cell: absent, None, NaN, pandas NA, or a blank string (how DataFrames fill gaps)."""
    if value is None or value is pd.NA:
        return True
    if isinstance(value, str):
        return not value.strip()
    return isinstance(value, (float, np.floating)) and math.isnan(value)


def _as_integer(value: Any) -> int | None:
    """An integral number (1, 1.0, "1") as int; None for anything else (True, 1.5, "x", inf)."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    number = _as_number(value)
    if number is None or not number.is_integer():
        return None
    if isinstance(value, str) and _INT_TEXT.fullmatch(value.strip()):
        return int(value.strip())  # exact: "9007199254740993" is not rounded through a float
    return int(number)


def _as_number(value: Any) -> float | None:
    """A finite real number (1, 1.5, "1.5") as float; None for anything else (True, "x", NaN, inf)."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, str):
        value = value.strip()
        if not _NUMBER_TEXT.fullmatch(value):  # float() would also take "nan", "inf" and "1_0"
            return None
    elif not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    try:
        number = float(value)
    except (OverflowError, ValueError):  # ints past float range, strings past 4300 digits
        return None
    return number if math.isfinite(number) else None


_INT_TEXT = re.compile(r"[+-]?\d+")
_NUMBER_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _integer_in(value: Any, field: str, row: int | None, low: int, high: int, hint: str = "") -> int:
    """`value` as an integer in [low, high]; a RequestError naming the row and field otherwise."""
    number = _as_integer(value)
    if number is None or not low <= number <= high:
        where = "params: " if row is None else f"request {row}: "
        raise RequestError(f"{where}{field} must be an integer in [{low}, {high}]{hint}, got {_show(value)}",
                           field, row)
    return number


def _scalar(value: Any) -> bool:
    """One cell's value, not a column of them (a 0-d array counts as one value)."""
    if isinstance(value, np.ndarray):
        return value.ndim == 0
    return not isinstance(value, (list, tuple, pd.Series))


def request_rows(model_input: Any) -> list[dict[Any, Any]]:
    """The request as a list of row dicts: a DataFrame (what the server hands over), a dict of
    columns or of one row's values, or a list of row dicts. A RequestError for anything else."""
    if isinstance(model_input, dict):
        if all(_scalar(v) for v in model_input.values()):  # one row
            model_input = [{k: v.item() if isinstance(v, np.ndarray) else v for k, v in model_input.items()}]
        else:  # columns, as the server's `inputs` format gives them
            try:
                model_input = pd.DataFrame({k: np.atleast_1d(v) for k, v in model_input.items()})
            except ValueError:
                raise RequestError("request columns must be lists of single values, all of one length") from None
    if isinstance(model_input, pd.DataFrame):
        twice = model_input.columns[model_input.columns.duplicated()]
        if len(twice):  # to_dict would keep one of them, silently
            raise RequestError(f"field {_show(twice[0])} is given twice", str(twice[0]))
        return model_input.to_dict("records")
    if isinstance(model_input, (list, tuple, np.ndarray)) and all(isinstance(r, dict) for r in model_input):
        return [dict(r) for r in model_input]
    raise RequestError(f"a request is a list of rows with the fields {', '.join(COLUMNS)}; "
                       f"got {type(model_input).__name__}")


def validate_row(row: dict[Any, Any], i: int, limits: Limits) -> Request:
    """One request row (module docstring) as a Request, or a RequestError naming the row and field."""
    if _missing(row.get("n")):
        raise RequestError(f"request {i}: n (the number of images, an integer >= 1) is required", "n", i)
    n = _integer_in(row["n"], "n", i, 1, MAX_IMAGES_PER_REQUEST)
    class_id = None
    if not _missing(row.get("class")):
        if limits.num_classes == 0:
            raise RequestError(f"request {i}: class given, but this model has no class-conditional RDM "
                               "(leave class empty for unconditional images)", "class", i)
        class_id = _integer_in(row["class"], "class", i, 0, limits.num_classes - 1,
                               " (empty for unconditional images)")
    cfg = limits.default_cfg if _missing(row.get("cfg")) else _as_number(row["cfg"])
    if cfg is None or not 0 <= cfg <= MAX_CFG:
        raise RequestError(f"request {i}: cfg (guidance scale) must be a number in [0, {MAX_CFG:g}], "
                           f"got {_show(row['cfg'])}", "cfg", i)
    seed = 0 if _missing(row.get("seed")) else _integer_in(row["seed"], "seed", i, 0, MAX_SEED)
    return Request(n, class_id, cfg, seed)


def _refuse_unknown_fields(rows: list[dict[Any, Any]]) -> None:
    """A RequestError for a field outside COLUMNS, naming the first row that fills it."""
    for key in dict.fromkeys(k for r in rows for k in r):  # every field once, in request order
        if key not in COLUMNS:
            i = next((i for i, r in enumerate(rows) if not _missing(r.get(key))), 0)
            raise RequestError(f"request {i}: unknown field {_show(key)}; the fields are {', '.join(COLUMNS)}",
                               str(key), i)


def validate_params(params: dict[str, Any] | None, limits: Limits) -> int | None:
    """The `steps` param (None: the generator's saved step count); a RequestError names a bad or
    unknown param."""
    if params is None:
        return None
    if not isinstance(params, dict):
        raise RequestError(f"params: must be a mapping of {', '.join(PARAMS)}, got {type(params).__name__}")
    unknown = [k for k in params if k not in PARAMS]
    if unknown:
        raise RequestError(f"params: unknown param {_show(unknown[0])}; the params are {', '.join(PARAMS)}",
                           str(unknown[0]))
    steps = params.get("steps")
    return None if steps is None else _integer_in(steps, "steps", None, 1, limits.timesteps)


def validate_request(model_input: Any, params: dict[str, Any] | None,
                     limits: Limits) -> tuple[list[Request], int | None]:
    """Every row and param of a request, checked before any image is generated; then the total
    number of images against MAX_IMAGES_PER_REQUEST. Returns the rows and the `steps` param."""
    steps = validate_params(params, limits)
    rows = request_rows(model_input)
    if not rows:
        raise RequestError("the request has no rows; send at least one row with n")
    _refuse_unknown_fields(rows)
    requests = [validate_row(r, i, limits) for i, r in enumerate(rows)]
    total = sum(r.n for r in requests)
    if total > MAX_IMAGES_PER_REQUEST:
        raise RequestError(f"n: the {len(requests)} rows ask for {total} images; at most "
                           f"{MAX_IMAGES_PER_REQUEST} per request", "n")
    return requests, steps


# Codecs that decode through a folder of their own (generator.json's codec type -> artifact name):
# a latent DiT's VAE, a MAGE's tokenizer; the registered model carries a copy.
CODEC_FOLDERS = {"vae": "vae", "tokens": "tokenizer"}


class RCGPyfunc(PythonModel):
    """MLflow pyfunc around rcg.generation.RCGGenerator: RDM samples -> images (paper section 3)."""

    def load_context(self, context: Any) -> None:
        from rcg.generation import RCGGenerator

        arts = context.artifacts
        folder = next((k for k in CODEC_FOLDERS.values() if k in arts), None)
        self.generator = _bundled_generator(arts, folder) if folder else RCGGenerator.load(
            arts["rdm"], Path(arts["generator"]) / "rep")
        evaluate = json.loads(Path(arts["config"]).read_text()).get("evaluate", {})  # the run's record
        table = json.loads(Path(arts["eval"]).read_text()) if "eval" in arts else {}
        self.default_cfg = float(table.get("cfg", evaluate.get("cfg", 0.0)) or 0.0)
        self.cfg_schedule = str(evaluate.get("cfg_schedule", "linear"))
        class_rdm = self.generator.reps.class_rdm
        self.limits = Limits(num_classes=0 if class_rdm is None else int(class_rdm.num_classes),
                             timesteps=self.generator.image.max_steps,
                             default_cfg=self.default_cfg)

    # pd.DataFrame is the one input hint MLflow accepts without inferring a schema from it: the
    # logged signature() (no input schema, see there) stays, and MLflow does not warn about a missing hint.
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Images for every request row (module docstring for the columns). pyfunc hands the rows
        over as a DataFrame; a dict or a list of dicts also works when called directly. The whole
        request is validated first: a RequestError (HTTP 400) names the row and field."""
        import torch

        requests, steps = validate_request(model_input, params, self.limits)
        rows = []
        for i, r in enumerate(requests):
            images = self.generator.sample(r.n, r.class_id, cfg=r.cfg, cfg_schedule=self.cfg_schedule,
                                           steps=steps, seed=r.seed)
            u8 = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            rows += [
                {"request": i, "index": j, "class": -1 if r.class_id is None else r.class_id,
                 "seed": r.seed, "png": _png_b64(u8[j])}
                for j in range(r.n)
            ]
        return pd.DataFrame(rows, columns=["request", "index", "class", "seed", "png"])


def _bundled_generator(arts: dict[str, str], folder: str) -> Any:
    """RCGGenerator.load of the bundled folders, decoding through the bundled copy (artifact
    `folder`) of the VAE or tokenizer: generator.json names the folder the generator was trained
    with, which may be relative to the project or absent where the model is served."""
    from rcg.generation import ImageGenerator, RCGGenerator, RepGenerator, default_device
    from rcg.generators import load_generator
    from rcg.generators.vae import make_codec

    device, gen_dir = default_device(), Path(arts["generator"]) / "rep"
    model, diffusion, meta = load_generator(gen_dir, device)
    codec = make_codec({**meta["codec"], "path": arts[folder]}).to(device)
    image = ImageGenerator(model, diffusion, codec, meta, device, gen_dir)
    return RCGGenerator(RepGenerator.load(arts["rdm"], device), image)


def signature() -> Any:
    """Output: one row per image; param: `steps`. No input schema, on purpose: MLflow applies one
    before `predict` runs, dropping unknown columns and casting values (the server reads 1.5 and
    true as 1 for a `long` n), so `validate_request` is the one check of the rows (module docstring)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=None,
        outputs=Schema([
            ColSpec("long", "request"), ColSpec("long", "index"), ColSpec("long", "class"),
            ColSpec("long", "seed"), ColSpec("string", "png"),
        ]),
        # MLflow checks a param's type (a long: 3.0, "3" and true are refused with HTTP 400) and
        # drops params the schema does not name before `predict` sees them.
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
    codec = read_json(gen_dir / "generator.json").get("codec") or {}
    if codec.get("type") in CODEC_FOLDERS:  # the generator decodes through this folder: bundled with it
        key = CODEC_FOLDERS[codec["type"]]
        files[key] = Path(codec["path"])
        if not files[key].is_dir():
            raise PipelineError(f"{files[key]}: not found (the {key} folder that {gen_dir}/generator.json names)")
    if Path(cfg.evaluate.details_file).exists():
        files["eval"] = Path(cfg.evaluate.details_file)
    return files


def eval_metrics(table: dict[str, Any]) -> dict[str, float]:
    """The evaluation table as run metrics: `<mode>.<metric>`, `floor.<metric>`, and `fd` of the
    served mode (the number `promote` compares)."""
    rows = {**table.get("modes", {}), "floor": table.get("floor", {})}
    metrics = {f"{m}.{k}": float(v) for m, row in rows.items() for k, v in row.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    fd = metrics.get(f"{served_mode(table)}.fd")
    return metrics if fd is None else {**metrics, "fd": fd}


def version_tags(table: dict[str, Any]) -> dict[str, str]:
    """What the registry shows beside a version: how good it is, measured how (metrics/details/eval.json).
    `fd` is the served mode's; `fd_is` says what it is (FID only with the Inception extractor)."""
    if not table:
        return {"evaluated": "no (no metrics/details/eval.json when registered)"}
    mode = served_mode(table)
    row = table.get("modes", {}).get(mode, {})
    tags = {"served_mode": mode, "extractor": str(table.get("extractor", "")), "fd_is": str(table.get("fd_is", "")),
            "n_samples": str(table.get("n_samples", "")), "cfg": str(table.get("cfg", ""))}
    for key in ("fd", "precision", "recall", "is"):
        if isinstance(row.get(key), (int, float)):
            tags[key] = str(float(row[key]))
    if isinstance(table.get("floor", {}).get("fd"), (int, float)):
        tags["floor_fd"] = str(float(table["floor"]["fd"]))
    return tags


def version_description(tags: dict[str, str]) -> str:
    """One paragraph for the registry page, from `version_tags`."""
    if "fd" not in tags:
        return "RCG generator (RDM + representation-conditioned image generator); not evaluated."
    scores = ", ".join(f"{label} {float(tags[k]):.3g}" for k, label in (("precision", "precision"),
                                                                        ("recall", "recall"), ("is", "IS")) if k in tags)
    floor = f"; the floor (real images) is {float(tags['floor_fd']):.3g}" if "floor_fd" in tags else ""
    return (f"RCG generator, mode {tags['served_mode']} (guidance {tags['cfg']}): fd {float(tags['fd']):.4g} "
            f"on {tags['n_samples']} samples, {tags['fd_is']}{floor}; {scores}.")


def _bundle(cfg: Config, files: dict[str, Path], stage: Path) -> dict[str, str]:
    """Copy what generation needs into `stage` (the rep generator, not the baselines, its VAE folder,
    the RDMs, the config, the evaluation table); the pyfunc's artifacts."""
    shutil.copytree(files["generator"], stage / "generator" / "rep")
    rdm = stage / "rdm"
    rdm.mkdir()
    for f in Path(files["rdm"]).glob("rdm*.*"):
        if f.suffix in (".safetensors", ".json"):
            shutil.copy2(f, rdm / f.name)
    (stage / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    artifacts = {"rdm": str(rdm), "generator": str(stage / "generator"), "config": str(stage / "config.json")}
    from rcg.generators.tokens import IDS_FILE

    for key in CODEC_FOLDERS.values():
        if key in files:
            # The train split's token ids are for training only: the served model leaves them behind.
            shutil.copytree(files[key], stage / key, ignore=shutil.ignore_patterns(IDS_FILE))
            artifacts[key] = str(stage / key)
    if "eval" in files:
        artifacts["eval"] = str(files["eval"])
    return artifacts


def log_generator(cfg: Config, register: bool = True) -> Any:
    """Log the RCG generator as a pyfunc in the active MLflow run and register it.

    Also logs the evaluation table as run metrics (`eval_metrics`). The registered version links to
    this run and carries `version_tags` (fd, precision, recall, the extractor, ...), its pipeline
    run (`pipeline_run`) and a description, so the registry says how good it is. Returns MLflow's
    ModelInfo (`registered_model_version` is set when registered).
    """
    import mlflow

    files = model_files(cfg)
    table = read_json(files["eval"]) if "eval" in files else {}
    if table:
        mlflow.log_metrics(eval_metrics(table))
        mlflow.set_tags({"served_mode": served_mode(table)})
    with tempfile.TemporaryDirectory(prefix="rcg-pyfunc-") as tmp:
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME_IN_RUN,
            python_model=RCGPyfunc(),
            artifacts=_bundle(cfg, files, Path(tmp)),
            code_paths=[str(Path(__file__).parent)],  # the model carries the rcg code it was built with
            signature=signature(),
            input_example=pd.DataFrame([{"n": 1, "seed": 0}]),  # shown in the UI; MLflow checks it
            pip_requirements=_requirements(),
            registered_model_name=cfg.tracking.registered_model if register else None,
        )
    if register:
        from mlflow import MlflowClient

        name, version = cfg.tracking.registered_model, str(info.registered_model_version)
        tags = version_tags(table)
        run = mlflow.active_run()
        parent = run.data.tags.get("mlflow.parentRunId", "") if run is not None else ""
        client = MlflowClient()
        for key, value in {**tags, **({"pipeline_run": parent} if parent else {})}.items():
            client.set_model_version_tag(name, version, key, value)
        client.update_model_version(name, version, description=version_description(tags))
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
