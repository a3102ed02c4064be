"""The example training pipeline, tracked in MLflow: prepare, features, search, evaluate, export.

Every step is a nested MLflow run under one pipeline run, with its parameters, metrics and
artifacts; the pipeline run carries the lineage (data hash, code version, package versions).
The same inputs give a byte-identical ONNX file: data is drawn from seeds, cross-validation and
models take the seed, the search runs on one core, and the ONNX opset is pinned.

Users bring their own pipeline through `PipelineCommand` (deployment/retrain/controller.py): any
command that writes the three files `export` writes here (`model.onnx`, `metrics.json`,
`train_sample.npy`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.base import BaseEstimator
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, recall_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold, train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import PolynomialFeatures, StandardScaler
from threadpoolctl import threadpool_limits

from deployment.drift.baseline_pack import BaselineOptions, build_baseline, model_outputs
from deployment.errors import PublisherError, Reason
from deployment.examples import sensor_data

# Files every pipeline writes into its output folder; the retraining controller reads them.
MODEL_FILE = "model.onnx"
METRICS_FILE = "metrics.json"
SAMPLE_FILE = "train_sample.npy"
HOLDOUT_FILE = "holdout.npz"
LINEAGE_FILE = "lineage.json"
# The drift baseline pack of the training data, for the device's drift and quality watch.
BASELINE_FILE = "baseline.json"

INPUT_NAME = "input"
# Pinned with skl2onnx's version (recorded in the lineage): both shape the exported bytes.
TARGET_OPSET = 17
SAMPLE_ROWS = 5000
# Field rows the baseline pack needs before it profiles them instead of the whole training set.
MIN_FIELD_BASELINE_ROWS = 200
LINEAGE_PACKAGES = ("scikit-learn", "skl2onnx", "onnx", "numpy", "onnxruntime", "mlflow")


@dataclass(frozen=True)
class PipelineConfig:
    out_dir: Path
    seed: int = 7
    rows: int = 3000
    # Extra labelled data (CSV with the feature columns and `label`, or .npz with x and y),
    # appended to the generated set: this is where data from the field comes in.
    data: tuple[Path, ...] = ()
    test_fraction: float = 0.25
    experiment: str = "edge-sensor_classifier"
    # How the drift baseline pack is calibrated (window sizes the device may watch).
    baseline: BaselineOptions = field(default_factory=BaselineOptions)

    def __post_init__(self) -> None:
        if self.rows < 100:
            raise PublisherError(
                Reason.PIPELINE_FAILED, f"rows must be at least 100, got {self.rows}"
            )
        if not 0.05 <= self.test_fraction <= 0.5:
            raise PublisherError(
                Reason.PIPELINE_FAILED,
                f"test_fraction must be in [0.05, 0.5], got {self.test_fraction}",
            )


@dataclass(frozen=True)
class PipelineResult:
    out_dir: Path
    sha256: str
    metrics: dict[str, float]
    run_id: str

    @property
    def model_path(self) -> Path:
        return self.out_dir / MODEL_FILE


@dataclass(frozen=True)
class Prepared:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    data_sha256: str
    # Which training rows came from the field (`PipelineConfig.data`), not the generated set.
    field_train: np.ndarray | None = None


def load_labelled(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Readings and labels from a CSV (feature columns + `label`) or an .npz (`x`, `y`)."""
    if not path.is_file():
        raise PublisherError(Reason.PIPELINE_FAILED, f"data file {path} does not exist")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive or "y" not in archive:
                raise PublisherError(
                    Reason.PIPELINE_FAILED, f"{path}: an .npz needs arrays 'x' and 'y'"
                )
            x, y = archive["x"], archive["y"]
    elif path.suffix == ".csv":
        x, y = _read_csv(path)
    else:
        raise PublisherError(
            Reason.PIPELINE_FAILED, f"{path}: data files are .csv or .npz, not {path.suffix!r}"
        )
    return _checked(path, np.asarray(x, dtype=np.float32), np.asarray(y))


def _read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise PublisherError(Reason.PIPELINE_FAILED, f"{path}: no rows")
    missing = [c for c in (*sensor_data.FEATURES, "label") if c not in rows[0]]
    if missing:
        raise PublisherError(Reason.PIPELINE_FAILED, f"{path}: missing column {missing[0]!r}")
    try:
        x = [[float(row[c]) for c in sensor_data.FEATURES] for row in rows]
        y = [int(row["label"]) for row in rows]
    except ValueError as error:
        raise PublisherError(Reason.PIPELINE_FAILED, f"{path}: {error}") from None
    return np.array(x), np.array(y)


def _checked(path: Path, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if x.ndim != 2 or x.shape[1] != len(sensor_data.FEATURES):
        raise PublisherError(
            Reason.PIPELINE_FAILED,
            f"{path}: x must have shape (rows, {len(sensor_data.FEATURES)}), got {x.shape}",
        )
    if y.shape != (len(x),):
        raise PublisherError(
            Reason.PIPELINE_FAILED, f"{path}: y must have one label per row, got shape {y.shape}"
        )
    if not np.isfinite(x).all():
        raise PublisherError(Reason.PIPELINE_FAILED, f"{path}: readings must be finite")
    if not np.isin(y, np.arange(len(sensor_data.CLASSES))).all():
        raise PublisherError(
            Reason.PIPELINE_FAILED, f"{path}: labels must be in 0..{len(sensor_data.CLASSES) - 1}"
        )
    return x, y.astype(np.int64)


def prepare(config: PipelineConfig) -> Prepared:
    """The generated set plus field data, split once, stratified, by the seed."""
    x, y = sensor_data.generate(config.rows, seed=config.seed)
    field = np.zeros(len(x), dtype=bool)
    for path in config.data:
        extra_x, extra_y = load_labelled(path)
        x, y = np.concatenate([x, extra_x]), np.concatenate([y, extra_y])
        field = np.concatenate([field, np.ones(len(extra_x), dtype=bool)])
    digest = hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()
    x_train, x_test, y_train, y_test, field_train, _ = train_test_split(
        x, y, field, test_size=config.test_fraction, random_state=config.seed, stratify=y
    )
    return Prepared(x_train, y_train, x_test, y_test, digest, field_train)


def candidates(seed: int) -> list[tuple[str, Pipeline, dict[str, list[Any]]]]:
    """Feature extraction (scaling, pairwise interactions) and model, with the search grid."""
    return [
        (
            "logistic",
            Pipeline(
                [
                    ("scale", StandardScaler()),
                    ("interactions", PolynomialFeatures(degree=2, include_bias=False)),
                    ("model", LogisticRegression(max_iter=2000)),
                ]
            ),
            {"model__C": [0.3, 3.0]},
        ),
        (
            "boosted_trees",
            Pipeline(
                [
                    ("scale", StandardScaler()),
                    ("model", GradientBoostingClassifier(random_state=seed)),
                ]
            ),
            {"model__n_estimators": [40], "model__max_depth": [2, 3]},
        ),
    ]


def search(prepared: Prepared, seed: int) -> tuple[str, Pipeline, dict[str, float]]:
    """The best candidate by cross-validated macro F1; ties go to the first listed."""
    folds = StratifiedKFold(n_splits=3, shuffle=True, random_state=seed)
    scores: dict[str, float] = {}
    best: tuple[str, Pipeline, float] | None = None
    for family, pipeline, grid in candidates(seed):
        # One core: parallel folds finish in any order, and a multi-threaded BLAS sums in any
        # order, neither of which may change the result (the coefficients, so the bytes).
        searcher = GridSearchCV(pipeline, grid, scoring="f1_macro", cv=folds, n_jobs=1)
        with threadpool_limits(limits=1):
            searcher.fit(prepared.x_train, prepared.y_train)
        score = float(searcher.best_score_)
        scores[f"cv_f1_{family}"] = score
        if best is None or score > best[2]:
            best = (family, searcher.best_estimator_, score)
    assert best is not None  # candidates() is never empty
    return best[0], best[1], scores


def export(model: Pipeline) -> bytes:
    """The fitted pipeline as ONNX: `input` (rows, features) → `label`, `probabilities`."""
    final: BaseEstimator = model.steps[-1][1]
    onnx_model = to_onnx(
        model,
        initial_types=[(INPUT_NAME, FloatTensorType([None, len(sensor_data.FEATURES)]))],
        # The agent serves tensors: no ZipMap (a list of dicts) on the probabilities.
        options={id(final): {"zipmap": False}},
        target_opset=TARGET_OPSET,
    )
    # skl2onnx's order of the opset imports varies between processes (the same model came out as
    # two byte strings differing only there); sorted, the bytes are the same in every process.
    imports = sorted(onnx_model.opset_import, key=lambda opset: opset.domain)
    del onnx_model.opset_import[:]
    onnx_model.opset_import.extend(imports)
    return bytes(onnx_model.SerializeToString())


def onnx_predict(model: bytes, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels and class probabilities from ONNX Runtime, as the device computes them."""
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    labels, probabilities = session.run(None, {INPUT_NAME: x.astype(np.float32)})
    return np.asarray(labels), np.asarray(probabilities)


def evaluate(model: bytes, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Accuracy, macro F1 and per-class recall of the exported model itself."""
    return label_scores(y, onnx_predict(model, x)[0])


def label_scores(y: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Accuracy, macro F1 and per-class recall of `predicted` labels against `y` (pure)."""
    recalls = recall_score(y, predicted, labels=range(len(sensor_data.CLASSES)), average=None)
    metrics = {
        "accuracy": float(accuracy_score(y, predicted)),
        "f1_macro": float(f1_score(y, predicted, average="macro")),
    }
    for name, value in zip(sensor_data.CLASSES, recalls, strict=True):
        metrics[f"recall_{name}"] = float(value)
    return metrics


def lineage(config: PipelineConfig, prepared: Prepared, family: str) -> dict[str, Any]:
    return {
        "seed": config.seed,
        "rows": config.rows,
        "data_files": [str(p) for p in config.data],
        "data_sha256": prepared.data_sha256,
        "code_version": code_version(),
        "packages": {name: _version(name) for name in LINEAGE_PACKAGES},
        "target_opset": TARGET_OPSET,
        "model_family": family,
    }


def code_version() -> str:
    """The git commit of the code that trained, with `+dirty` when it has local changes."""
    here = Path(__file__).resolve().parents[1]
    git = shutil.which("git")
    if git is None:
        return "unknown"
    try:
        commit = subprocess.run(  # noqa: S603 - git from PATH with fixed arguments
            [git, "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(  # noqa: S603 - git from PATH with fixed arguments
            [git, "status", "--porcelain", "--", "."],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def run_pipeline(config: PipelineConfig, tracker: Tracker) -> PipelineResult:
    """Every step in order, each as a nested run of `tracker`; the files land in `out_dir`."""
    config.out_dir.mkdir(parents=True, exist_ok=True)
    with tracker.run("pipeline", nested=False) as parent:
        with tracker.run("prepare"):
            prepared = prepare(config)
            tracker.params(
                {"seed": config.seed, "rows": config.rows, "data_sha256": prepared.data_sha256}
            )
            tracker.metrics(
                {"train_rows": len(prepared.x_train), "test_rows": len(prepared.x_test)}
            )
        with tracker.run("features"):
            tracker.params({"features": ",".join(sensor_data.FEATURES)})
            tracker.metrics(
                {
                    f"mean_{n}": float(v)
                    for n, v in zip(sensor_data.FEATURES, prepared.x_train.mean(0), strict=True)
                }
            )
        with tracker.run("search"):
            family, model, scores = search(prepared, config.seed)
            tracker.params({"model_family": family, **_best_params(model)})
            tracker.metrics(scores)
        with tracker.run("evaluate"):
            model_bytes = export(model)
            predicted, _ = onnx_predict(model_bytes, prepared.x_test)
            metrics = label_scores(prepared.y_test, predicted)
            # The exported graph must predict what the scikit-learn model does.
            metrics["onnx_parity"] = float(np.mean(model.predict(prepared.x_test) == predicted))
            tracker.metrics(metrics)
        with tracker.run("export"):
            facts = lineage(config, prepared, family)
            sha256 = _write_outputs(config.out_dir, model_bytes, metrics, prepared, facts)
            pack = write_baseline(config.out_dir, prepared, config.baseline)
            tracker.params({"sha256": sha256, "baseline_sha256": hashlib.sha256(pack).hexdigest()})
            tracker.artifacts(config.out_dir)
        tracker.params({k: v for k, v in facts.items() if isinstance(v, str | int)})
        tracker.metrics(metrics)
        return PipelineResult(config.out_dir, sha256, metrics, parent)


def _best_params(model: Pipeline) -> dict[str, Any]:
    params = model.steps[-1][1].get_params()
    return {f"model_{k}": params[k] for k in ("C", "n_estimators", "max_depth") if k in params}


def _write_outputs(
    out_dir: Path,
    model: bytes,
    metrics: dict[str, float],
    prepared: Prepared,
    facts: dict[str, Any],
) -> str:
    (out_dir / MODEL_FILE).write_bytes(model)
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    np.save(out_dir / SAMPLE_FILE, prepared.x_train[:SAMPLE_ROWS])
    np.savez(out_dir / HOLDOUT_FILE, x=prepared.x_test, y=prepared.y_test)
    (out_dir / LINEAGE_FILE).write_text(json.dumps(facts, indent=2, sort_keys=True) + "\n")
    return hashlib.sha256(model).hexdigest()


def write_baseline(out_dir: Path, prepared: Prepared, options: BaselineOptions) -> bytes:
    """The drift baseline pack of the training data (its field rows when there are enough),
    with the labels as its quality reference; seeded, so the same inputs give the same pack."""
    x, y = prepared.x_train, prepared.y_train
    field = prepared.field_train
    if field is not None and field.sum() >= MIN_FIELD_BASELINE_ROWS:
        # Retrained on field data: the field is the regime the model will serve, so the
        # pack profiles it (a sensor recalibrated for good is the new normal, not drift).
        x, y = x[field], y[field]
    sample, labels = x[:SAMPLE_ROWS], y[:SAMPLE_ROWS]
    input_name, outputs = model_outputs(out_dir / MODEL_FILE, sample)
    try:
        pack = build_baseline(
            {input_name: sample}, outputs, options, {input_name: sensor_data.FEATURES}, labels
        )
    except ValueError as error:
        raise PublisherError(
            Reason.PIPELINE_FAILED, f"the drift baseline pack cannot be built: {error}"
        ) from None
    data = json.dumps(pack, separators=(",", ":"), sort_keys=True).encode()
    (out_dir / BASELINE_FILE).write_bytes(data)
    return data


class Tracker:
    """MLflow runs for the pipeline's steps (an injected seam: tests pass a SQLite store)."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: Path) -> None:
        import mlflow  # noqa: PLC0415 - importing MLflow costs seconds; only training needs it

        self._mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri)
        found = mlflow.get_experiment_by_name(experiment)
        experiment_id = (
            found.experiment_id
            if found is not None
            else mlflow.create_experiment(experiment, artifact_location=artifact_root.as_uri())
        )
        self._experiment_id = experiment_id

    @contextmanager
    def run(self, name: str, *, nested: bool = True) -> Iterator[str]:
        with self._mlflow.start_run(
            run_name=name, nested=nested, experiment_id=self._experiment_id
        ) as active:
            yield str(active.info.run_id)

    def params(self, values: dict[str, Any]) -> None:
        self._mlflow.log_params(values)

    def metrics(self, values: dict[str, float]) -> None:
        self._mlflow.log_metrics(values)

    def artifacts(self, folder: Path) -> None:
        self._mlflow.log_artifacts(str(folder))


def read_outputs(out_dir: Path) -> tuple[bytes, dict[str, float], np.ndarray]:
    """A pipeline's model, metrics and training sample, checked: any pipeline's, ours or not."""
    paths = [out_dir / name for name in (MODEL_FILE, METRICS_FILE, SAMPLE_FILE)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise PublisherError(
            Reason.PIPELINE_FAILED, f"the pipeline wrote no {missing[0]} in {out_dir}"
        )
    model = paths[0].read_bytes()
    try:
        ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    except Exception as error:  # ONNX Runtime raises several unrelated types
        raise PublisherError(
            Reason.PIPELINE_FAILED, f"{paths[0]} is not a loadable ONNX model: {error}"
        ) from None
    try:
        raw = json.loads(paths[1].read_text())
    except json.JSONDecodeError as error:
        raise PublisherError(Reason.PIPELINE_FAILED, f"{paths[1]} is not JSON: {error}") from None
    if not isinstance(raw, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in raw.values()
    ):
        raise PublisherError(Reason.PIPELINE_FAILED, f"{paths[1]} must be an object of numbers")
    sample = np.load(paths[2], allow_pickle=False)
    return model, {str(k): float(v) for k, v in raw.items()}, sample
