"""Distributed training and fault tolerance: real Lightning DDP over gloo, real kills and resumes,
and which component requeues a SLURM job.

Each training run is a subprocess `python -m src.train ...`, because Lightning's DDP launcher
starts the other ranks by running the same command again. Every such test has its own sqlite
MLflow store, so it can count the runs that its command opened.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
import torch
from hydra import compose, initialize_config_dir
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from src import tracking
from src.training.loading import load_causal_lm, to_dcp
from src.training.run import _build_trainer
from src.training.schedules import cosine_alpha
from tests.conftest import CONF_DIR, compose_config

REPO = Path(__file__).resolve().parents[1]
TRAIN_TIMEOUT_S = 300


def tiny_overrides(tiny_data: Path, tiny_base: Path) -> list[str]:
    """Overrides that make a fine-tune of the tiny base model take a few seconds."""
    return [
        f"data_dir={tiny_data}",
        f"init_from={tiny_base}",
        "block_size=64",
        "batch_size=4",
        "pruning.rank=16",
        "val_blocks=2",
        "trainer.log_every_n_steps=1",
    ]


def training_env(tracking_uri: str) -> dict[str, str]:
    """The test process's environment for a training subprocess: one thread, offline, own MLflow store."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HYDRA_FULL_ERROR="1", MLFLOW_TRACKING_URI=tracking_uri)
    return env


def sqlite_store(folder: Path) -> str:
    """Create an empty sqlite MLflow store, so that concurrent writers do not race to create its tables."""
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    return uri


def train_command(*overrides: str, multirun: bool = False) -> list[str]:
    return [sys.executable, "-m", "src.train", *(["-m"] if multirun else []), *overrides]


def run_to_completion(command: list[str], env: dict[str, str], timeout_s: float = TRAIN_TIMEOUT_S) -> str:
    """Run a training command from the repository root and return its output (stdout and stderr)."""
    completed = subprocess.run(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout_s
    )
    assert completed.returncode == 0, f"{' '.join(command)} failed:\n{completed.stdout[-6000:]}"
    return completed.stdout


def metric_series(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    """Return {step: value} of a metric, keeping the latest value where a step was logged twice."""
    history = sorted(client.get_metric_history(run_id, key), key=lambda metric: metric.timestamp)
    return {metric.step: metric.value for metric in history}


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.slow
def test_ddp_run_logs_once(tiny_data: Path, tiny_base: Path, tmp_path: Path) -> None:
    uri = sqlite_store(tmp_path)
    out_dir = tmp_path / "out"
    hydra_dir = tmp_path / "hydra"
    command = train_command(
        *tiny_overrides(tiny_data, tiny_base),
        "trainer=ddp_cpu",
        "sparsity=0.5",
        "steps=5",
        "checkpoint_every=2",
        f"out_dir={out_dir}",
        f"hydra.run.dir={hydra_dir}",
    )

    output = run_to_completion(command, training_env(uri))

    assert "Starting with 2 processes" in output
    rank1_log = (hydra_dir / "train_ddp_process_1.log").read_text()
    assert "rank 1 of 2" in rank1_log
    assert "saved" not in rank1_log, "only rank 0 may write the model"
    assert "saved" in (hydra_dir / "train.log").read_text()

    client = MlflowClient(uri)
    runs = client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])
    assert len(runs) == 1, "rank 1 must not open an MLflow run"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert tracking.read_run_file(out_dir)["run_id"] == run.info.run_id
    assert tracking.read_run_file(out_dir / "model")["run_id"] == run.info.run_id
    assert run.data.params["trainer.devices"] == "2"
    assert run.data.params["trainer.strategy"] == "ddp"
    assert sorted(metric_series(client, run.info.run_id, "train/loss")) == [0, 1, 2, 3, 4]
    artifacts = [artifact.path for artifact in client.list_artifacts(run.info.run_id)]
    assert artifacts == ["train_metrics.json"]

    # Written at step 4 by ModelCheckpoint and again after the last step, which is not a multiple of 2.
    assert sorted(path.name for path in (out_dir / "checkpoints").iterdir()) == ["last.ckpt"]
    assert load_checkpoint(out_dir / "checkpoints" / "last.ckpt")["global_step"] == 5


def start_and_kill_after_checkpoint(command: list[str], env: dict[str, str], checkpoint: Path) -> tuple[int, str]:
    """Start `command`, send SIGTERM to its process group once `checkpoint` exists.

    Returns the exit status and the output.
    """
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    deadline = time.monotonic() + TRAIN_TIMEOUT_S
    try:
        while not checkpoint.exists():
            assert process.poll() is None, f"training ended before its first checkpoint:\n{process.stdout.read()[-6000:]}"
            assert time.monotonic() < deadline, f"no {checkpoint} after {TRAIN_TIMEOUT_S} s"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode, output


def save_dcp_init(tiny_base: Path, out_dir: Path) -> Path:
    """Save the tiny base model converted to DCP with seeded new weights.

    NOTE: src.train converts a dense model to DCP before it seeds the RNGs, and torch 2.13 seeds
    each process differently, so two runs from the dense model start from different q_int/k_int.
    """
    torch.manual_seed(0)
    model = to_dcp(load_causal_lm(str(tiny_base)), True, 16, 2.0, False)
    model.save_pretrained(out_dir)
    return out_dir


@pytest.mark.slow
def test_killed_run_resumes_exactly(tiny_data: Path, tiny_base: Path, tmp_path: Path) -> None:
    steps = 40
    dcp_init = save_dcp_init(tiny_base, tmp_path / "dcp_init")
    # One validation at step 38, after the resume: its step and loss must match the reference's.
    recipe = [*tiny_overrides(tiny_data, dcp_init), "sparsity=0.5", f"steps={steps}", "checkpoint_every=4", "val_every=38"]
    reference_dir = tmp_path / "reference"
    reference_store = tmp_path / "reference_store"
    reference_store.mkdir()
    reference_uri = sqlite_store(reference_store)
    reference = subprocess.Popen(
        train_command(*recipe, f"out_dir={reference_dir}", f"hydra.run.dir={tmp_path / 'reference_hydra'}"),
        cwd=REPO, env=training_env(reference_uri), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )

    uri = sqlite_store(tmp_path)
    out_dir = tmp_path / "out"
    command = train_command(*recipe, f"out_dir={out_dir}", f"hydra.run.dir={tmp_path / 'hydra'}")
    last_checkpoint = out_dir / "checkpoints" / "last.ckpt"
    status, killed_output = start_and_kill_after_checkpoint(command, training_env(uri), last_checkpoint)

    assert status == 128 + signal.SIGTERM, killed_output[-6000:]
    killed_at = load_checkpoint(last_checkpoint)["global_step"]
    assert f"SIGTERM: saved {last_checkpoint} at global step {killed_at}" in killed_output
    assert 0 < killed_at < steps
    assert not (out_dir / "model").exists()
    run_id = tracking.read_run_file(out_dir)["run_id"]
    client = MlflowClient(uri)
    logged_before_kill = metric_series(client, run_id, "train/alpha")

    output = run_to_completion(command, training_env(uri))
    reference_output, _ = reference.communicate(timeout=TRAIN_TIMEOUT_S)
    assert reference.returncode == 0, reference_output[-6000:]

    assert f"resuming from {last_checkpoint}" in output
    assert tracking.read_run_file(out_dir)["run_id"] == run_id
    assert tracking.read_run_file(out_dir / "model")["run_id"] == run_id
    runs = client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])
    assert [run.info.run_id for run in runs] == [run_id]
    assert runs[0].info.status == "FINISHED"

    final = load_checkpoint(last_checkpoint)
    reference_final = load_checkpoint(reference_dir / "checkpoints" / "last.ckpt")
    assert final["global_step"] == steps
    assert final["sparsity_controller"] == pytest.approx(reference_final["sparsity_controller"], rel=1e-6)

    # Same data order, optimizer, controller and alpha schedule as the uninterrupted run: same weights.
    weights = load_file(out_dir / "model" / "model.safetensors")
    reference_weights = load_file(reference_dir / "model" / "model.safetensors")
    assert weights.keys() == reference_weights.keys()
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, reference_weights[name], rtol=0, atol=1e-6, msg=name)

    # The MLflow run continues: one series from step 0 to the end, equal to the reference's.
    reference_run_id = tracking.read_run_file(reference_dir)["run_id"]
    reference_client = MlflowClient(reference_uri)
    for key in ("train/alpha", "train/reg_weight", "train/loss", "val/loss"):
        series = metric_series(client, run_id, key)
        reference_series = metric_series(reference_client, reference_run_id, key)
        assert series.keys() == reference_series.keys(), key
        assert list(series.values()) == pytest.approx(list(reference_series.values()), rel=1e-5), key
    alpha = metric_series(client, run_id, "train/alpha")
    assert max(logged_before_kill) < max(alpha) == steps - 1
    for step, value in alpha.items():
        assert value == pytest.approx(cosine_alpha(step, steps, 1.0001, 8.0)), step


SLURM_TASK_ENV = {
    "SLURM_NTASKS": "2",
    "SLURM_NTASKS_PER_NODE": "2",
    "SLURM_NNODES": "1",
    "SLURM_JOB_NAME": "train",
    "SLURM_JOB_ID": "4242",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_NODELIST": "127.0.0.1",
}


def test_lightning_leaves_requeue_to_submitit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SLURM_TASK_ENV.items():
        monkeypatch.setenv(name, value)
    cfg = compose_config("train", [f"out_dir={tmp_path}", "trainer=ddp_cpu"])
    mlflow_logger = MLFlowLogger(experiment_name="requeue", tracking_uri=tracking.tracking_uri())

    trainer = _build_trainer(cfg, tmp_path, mlflow_logger)

    # The tasks of the SLURM job are the DDP ranks, and Lightning's own requeue is off.
    environment = trainer.strategy.cluster_environment
    assert isinstance(environment, SLURMEnvironment)
    assert environment.auto_requeue is False
    assert (trainer.world_size, trainer.global_rank) == (2, 0)
    # So fitting installs no handler for SLURM's requeue signal (SIGUSR1 in Lightning 2.6).
    handler_before = signal.getsignal(signal.SIGUSR1)
    trainer._signal_connector.register_signal_handlers()
    try:
        assert signal.getsignal(signal.SIGUSR1) is handler_before
    finally:
        trainer._signal_connector.teardown()


def test_submitit_launcher_requeues_same_job() -> None:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        launcher_cfg = compose(
            config_name="train", overrides=["hydra/launcher=submitit_slurm"], return_hydra_config=True
        ).hydra.launcher
    params = {key: value for key, value in launcher_cfg.items() if key != "_target_"}
    launcher = SlurmLauncher(**params)
    job_arguments = (["sparsity=0.5"], "hydra.sweep.dir", 0, "job_id_for_0", {})

    delayed = launcher.checkpoint(*job_arguments)

    # submitit requeues a job whose function has checkpoint(). The requeued job calls the launcher
    # with the same arguments, so it runs the same sweep job, which resumes from last.ckpt.
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert delayed.function is launcher
    assert delayed.args == job_arguments
    # Timed-out jobs are requeued only when max_num_timeout > 0 (preempted ones always are).
    assert launcher.params["max_num_timeout"] == 0
    assert launcher.params["signal_delay_s"] == 120
