"""MLflow tracking shared by the stages: where the store is, and how later stages find a model's run.

Default store: a sqlite database `mlflow.db` in the project directory (MLflow 3.x refuses plain
`file:` stores unless MLFLOW_ALLOW_FILE_STORE=true). MLFLOW_TRACKING_URI overrides it, for example
a tracking server shared by a cluster. Every trained model directory holds `run.json` with the id of
the MLflow run that trained it, so evaluation and benchmark stages log into that same run and the
MLflow compare view shows training, evaluation and throughput side by side.
"""

import json
import logging
import os
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RUN_FILE = "run.json"


def tracking_uri() -> str:
    """Return MLFLOW_TRACKING_URI, or the sqlite store in the project directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"


def configure() -> str:
    """Point the mlflow client at tracking_uri() and return it."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    return uri


def write_run_file(model_dir: Path, run_id: str, experiment_id: str, extra: dict[str, Any] | None = None) -> None:
    """Record which MLflow run trained the model in `model_dir`."""
    record = {"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": tracking_uri(), **(extra or {})}
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")


def read_run_file(model_dir: Path) -> dict[str, Any] | None:
    """Return the run record of `model_dir`, or None when the model was not trained by this pipeline."""
    path = Path(model_dir) / RUN_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text())


def log_to_training_run(
    model_dir: Path,
    metrics: dict[str, float],
    params: dict[str, Any] | None = None,
    artifacts: list[Path] | None = None,
) -> str | None:
    """Log metrics (and optional params and artifact files) to the MLflow run that trained `model_dir`.

    Returns the run id, or None (with a warning) when `model_dir` has no run record or its run is not
    in the current tracking store.
    """
    record = read_run_file(model_dir)
    if record is None:
        logger.warning("no %s in %s: metrics are not logged to MLflow", RUN_FILE, model_dir)
        return None

    tracking_uri = configure()
    client = MlflowClient()
    run_id = record["run_id"]
    try:
        client.get_run(run_id)
    except MlflowException:
        # A model copied from another machine, or a store that was deleted: the metrics files still exist.
        logger.warning(
            "MLflow run %s of %s (trained with tracking URI %s) not found at %s: metrics are not logged to MLflow; "
            "set MLFLOW_TRACKING_URI to the store that trained the model to log them",
            run_id, model_dir, record.get("tracking_uri"), tracking_uri,
        )
        return None

    for key, value in metrics.items():
        client.log_metric(run_id, key, float(value))
    for key, value in (params or {}).items():
        client.log_param(run_id, key, value)
    for path in artifacts or []:
        client.log_artifact(run_id, str(path))
    logger.info("logged %d metrics to MLflow run %s", len(metrics), run_id)
    return run_id
