"""Sweeps: Hydra multiruns with the basic, submitit local and submitit SLURM launchers, launch
validation, the paper_gpt2 experiment and the cluster DVC pipeline.

The SLURM test needs the local cluster of slurm/start.sh (fixture `slurm_cluster`, which skips
with the start script's error when the cluster cannot start) and runs an MLflow tracking server
on 127.0.0.1.
Run: pytest tests/test_sweeps.py (add -m "not slurm" to leave out the SLURM test).
"""

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import cloudpickle
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.singleton import Singleton
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from src import tracking
from src.training.hydra_callbacks import ValidateLaunch
from src.training.run import run_training
from src.training.validation import validate_launcher
from tests.conftest import CONF_DIR
from tests.test_distributed import (
    REPO,
    load_checkpoint,
    run_to_completion,
    sqlite_store,
    tiny_overrides,
    train_command,
    training_env,
)

PIPELINE_DIR = REPO / "pipelines" / "cluster"
SERVER_START_TIMEOUT_S = 120


def compose_with_hydra(overrides: list[str]):
    """Compose conf/train.yaml with the `hydra` node, as a multirun's launcher receives it."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def all_runs(client: MlflowClient) -> list:
    return client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])


def test_task_and_config_pickle() -> None:
    from src.train import main

    task_function = main.__wrapped__  # the undecorated function that Hydra's launcher calls
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=["hydra/launcher=submitit_slurm", "trainer=ddp_cpu", "hydra.launcher.tasks_per_node=2"],
            return_hydra_config=True,
        )
        payload = cloudpickle.dumps((task_function, cfg, ValidateLaunch(), Singleton.get_state()))

    restored_function, restored_cfg, restored_callback, _ = cloudpickle.loads(payload)

    # cloudpickle copies the undecorated function by value (src.train.main is the decorated one),
    # but the training code it calls by reference: jobs import src.training, so the repository
    # must be importable where they run.
    assert restored_function.__qualname__ == "main"
    assert restored_function.__globals__["run_training"] is run_training
    assert OmegaConf.to_container(restored_cfg) == OmegaConf.to_container(cfg)
    assert restored_cfg.hydra.launcher.tasks_per_node == 2
    assert isinstance(restored_callback, ValidateLaunch)


@pytest.mark.slow
def test_basic_multirun_ddp_runs_each_job_once(tiny_data: Path, tiny_base: Path, tmp_path: Path) -> None:
    uri = sqlite_store(tmp_path)
    sweep_dir = tmp_path / "sweep"
    command = train_command(
        *tiny_overrides(tiny_data, tiny_base),
        "sparsity=0.3,0.5",
        "trainer=ddp_cpu",
        "steps=2",
        f"out_dir={tmp_path}/out-${{sparsity}}",
        f"hydra.sweep.dir={sweep_dir}",
        multirun=True,
    )

    output = run_to_completion(command, training_env(uri))

    # Lightning's DDP children rerun the command line. Each must run its own job, not the sweep.
    assert output.count("Launching 2 jobs locally") == 1
    for job, sparsity in ((0, 0.3), (1, 0.5)):
        child_log = (sweep_dir / str(job) / "train_ddp_process_1.log").read_text()
        assert f"rank 1 of 2: target sparsity {sparsity}," in child_log
        assert load_checkpoint(tmp_path / f"out-{sparsity}" / "checkpoints" / "last.ckpt")["global_step"] == 2
    runs = all_runs(MlflowClient(uri))
    assert sorted(run.data.tags["target_sparsity"] for run in runs) == ["0.3", "0.5"]


@pytest.mark.slow
def test_submitit_local_ddp_sweep(tiny_data: Path, tiny_base: Path, tmp_path: Path) -> None:
    uri = sqlite_store(tmp_path)
    sweep_dir = tmp_path / "sweep"
    command = train_command(
        *tiny_overrides(tiny_data, tiny_base),
        "sparsity=0.3,0.5",
        "hydra/launcher=submitit_local",
        "trainer=ddp_cpu",
        "hydra.launcher.tasks_per_node=2",
        "hydra.launcher.timeout_min=10",
        "steps=2",
        f"out_dir={tmp_path}/out-${{sparsity}}",
        f"hydra.sweep.dir={sweep_dir}",
        multirun=True,
    )

    run_to_completion(command, training_env(uri))

    client = MlflowClient(uri)
    runs = all_runs(client)
    assert sorted(run.data.tags["target_sparsity"] for run in runs) == ["0.3", "0.5"]
    assert {run.data.tags["sweep"] for run in runs} == {str(sweep_dir)}
    for job, sparsity in ((0, 0.3), (1, 0.5)):
        out_dir = tmp_path / f"out-{sparsity}"
        run_id = tracking.read_run_file(out_dir / "model")["run_id"]
        assert run_id in {run.info.run_id for run in runs}
        job_log = (sweep_dir / str(job) / "train.log").read_text()
        assert "rank 0 of 2" in job_log
        assert "rank 1 of 2" in job_log


def fake_sbatch(folder: Path) -> tuple[Path, Path]:
    """Write an `sbatch` that records each call in a marker file and fails; return (bin dir, marker)."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    marker = folder / "sbatch-called"
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(f"#!/bin/sh\necho \"$@\" >> {marker}\nexit 1\n")
    sbatch.chmod(0o755)
    return bin_dir, marker


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["trainer=ddp_cpu", "hydra.launcher.tasks_per_node=1"],
            "hydra.launcher.tasks_per_node=1 but trainer.devices=2",
        ),
        (
            ["trainer=ddp_cpu", "hydra.launcher.tasks_per_node=2", "hydra.launcher.gpus_per_node=2"],
            "hydra.launcher.gpus_per_node=2 requests GPUs but trainer.accelerator=cpu",
        ),
    ],
)
def test_invalid_launch_fails_before_submission(overrides: list[str], message: str, tmp_path: Path) -> None:
    bin_dir, marker = fake_sbatch(tmp_path)
    env = training_env(sqlite_store(tmp_path))
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    sweep_dir = tmp_path / "sweep"
    command = train_command(
        "sparsity=0.3,0.5", "hydra/launcher=submitit_slurm", *overrides, f"hydra.sweep.dir={sweep_dir}", multirun=True
    )

    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)

    assert completed.returncode != 0
    assert message in completed.stderr
    assert not marker.exists(), "sbatch was called"
    assert not (sweep_dir / ".submitit").exists()


def test_paper_experiment_matches_recipe() -> None:
    cfg = compose_with_hydra(["experiment=paper_gpt2"])

    assert cfg.hydra.runtime.choices.model == "gpt2"
    assert cfg.model.name_or_path == "gpt2"
    assert cfg.data.name == "wikipedia_bookcorpus"
    assert cfg.block_size == 1024
    assert cfg.steps == 25000
    devices = cfg.trainer.devices * cfg.trainer.num_nodes
    assert cfg.batch_size * devices * cfg.trainer.accumulate_grad_batches == 6
    # AdamW 1e-4 on all weights (the new DCP ones too), no weight decay, 2000 warm-up steps, constant.
    assert cfg.optim.lr == cfg.optim.lr_interaction == cfg.optim.lr_beta == 1e-4
    assert cfg.optim.weight_decay == 0.0
    assert cfg.optim.warmup_steps == 2000
    assert cfg.optim.decay == "constant"
    # alpha: cosine from 1 (plus a small epsilon) to 8 over all steps.
    assert cfg.pruning.alpha_start == pytest.approx(1.0, abs=1e-3)
    assert cfg.pruning.alpha_start > 1.0
    assert cfg.pruning.alpha_end == 8.0
    assert cfg.pruning.alpha_steps in (0, cfg.steps)
    assert cfg.pruning.rank == 64
    assert cfg.pruning.beta_init == 2.0
    assert cfg.pruning.regularizer == "fixed"
    assert cfg.pruning.gamma == 0.3
    assert cfg.pruning.enabled
    # fp32 weights (TF32 matmuls), DDP on GPUs, one SLURM task per GPU.
    assert cfg.trainer.precision == "32-true"
    assert cfg.trainer.strategy == "ddp"
    assert cfg.trainer.accelerator == "gpu"
    assert cfg.hydra.runtime.choices["hydra/launcher"] == "submitit_slurm"
    assert cfg.hydra.launcher.tasks_per_node == cfg.trainer.devices
    assert cfg.hydra.launcher.gpus_per_node == cfg.trainer.devices
    validate_launcher(cfg.trainer, cfg.hydra.launcher)


def stage_command(name: str) -> str:
    """Return the command of a stage of pipelines/cluster/dvc.yaml with its params filled in."""
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        return repo.stage.collect(f"pipelines/cluster/dvc.yaml:{name}")[0].cmd


@pytest.mark.slow
def test_cluster_pipeline_parses() -> None:
    dvc = Path(sys.executable).parent / "dvc"
    completed = subprocess.run(
        [str(dvc), "dag", "--dot", "report"], cwd=PIPELINE_DIR, capture_output=True, text=True, timeout=120
    )

    assert completed.returncode == 0, completed.stderr
    edges = {line.strip().rstrip(";") for line in completed.stdout.splitlines() if "->" in line}
    assert edges == {
        '"prepare" -> "train"',
        '"prepare" -> "evaluate"',
        '"train" -> "evaluate"',
        '"evaluate" -> "report"',
    }


@pytest.mark.slow
def test_cluster_sweep_command_composes() -> None:
    tokens = shlex.split(stage_command("train"))
    assert tokens[:4] == ["python", "-m", "src.train", "-m"]
    assert "hydra/launcher=submitit_slurm" in tokens
    sweep = dict(token.split("=", 1) for token in tokens[4:])
    assert sweep["sparsity"] == "0.0,0.3,0.5,0.8"

    # Each job of the sweep composes and passes the checks that ValidateLaunch runs at submission.
    first_job = [f"{key}={value.split(',')[0]}" for key, value in sweep.items()]
    cfg = compose_with_hydra(first_job)
    validate_launcher(cfg.trainer, cfg.hydra.launcher)
    assert cfg.pruning.regularizer == "adaptive"
    assert cfg.out_dir == "models/paper_gpt2/sparsity-0.0-seed0"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_mlflow_server(folder: Path) -> tuple[subprocess.Popen, str]:
    """Start `mlflow server` on a free 127.0.0.1 port with a sqlite store; return it and its URI."""
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    command = [
        str(mlflow), "server",
        "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
        "--artifacts-destination", str(folder / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    # The job runner of MLflow 3 starts several worker processes that these tests do not need.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = (folder / "server.log").open("w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return server, uri
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            stop_process_group(server)
            pytest.fail(f"mlflow server did not start:\n{(folder / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)


def stop_process_group(process: subprocess.Popen) -> None:
    """Stop a process started with start_new_session=True and the workers it started."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def rest_call(uri: str, endpoint: str, body: dict | None = None, query: dict | None = None) -> dict:
    """Call the MLflow REST API (POST with a JSON body, or GET with query parameters)."""
    url = f"{uri}/api/2.0/mlflow/{endpoint}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def wait_for_final_states(job_id: str, env: dict[str, str], timeout_s: float = 60) -> list[str]:
    """Return the states of the tasks of a job array once none is pending or running.

    submitit reads a job's result file, which the job writes just before it ends, so the last job
    may still be RUNNING or COMPLETING when the sweep command returns.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        listing = subprocess.run(
            ["sacct", "-o", "State", "--parsable2", "--noheader", "-j", job_id],
            env=env, capture_output=True, text=True, check=True,
        ).stdout.split()
        if not {"PENDING", "RUNNING", "COMPLETING"} & set(listing) or time.monotonic() > deadline:
            return listing
        time.sleep(0.5)


def metric_steps(uri: str, run_id: str, key: str) -> list[int]:
    history = rest_call(uri, "metrics/get-history", query={"run_id": run_id, "metric_key": key, "max_results": 1000})
    return sorted(metric["step"] for metric in history.get("metrics", []))


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_ddp_sweep_tracks_to_server(
    slurm_cluster: dict[str, str], tiny_data: Path, tiny_base: Path, tmp_path: Path
) -> None:
    steps = 3
    sweep_dir = tmp_path / "sweep"
    server, uri = start_mlflow_server(tmp_path)
    try:
        env = {**training_env(uri), "SLURM_CONF": slurm_cluster["SLURM_CONF"], "PATH": slurm_cluster["PATH"]}
        command = train_command(
            *tiny_overrides(tiny_data, tiny_base),
            "sparsity=0.3,0.5,0.8",
            "hydra/launcher=submitit_slurm",
            "trainer=ddp_cpu",
            "hydra.launcher.tasks_per_node=2",
            "hydra.launcher.timeout_min=10",
            f"steps={steps}",
            "checkpoint_every=2",
            f"out_dir={tmp_path}/out-${{sparsity}}",
            f"hydra.sweep.dir={sweep_dir}",
            multirun=True,
        )
        started = time.monotonic()
        output = run_to_completion(command, env, timeout_s=600)
        sweep_seconds = time.monotonic() - started

        experiment = rest_call(uri, "experiments/get-by-name", query={"experiment_name": "dcp"})["experiment"]
        runs = rest_call(uri, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100})
        runs = runs.get("runs", [])
        histories = {
            run["info"]["run_id"]: {
                key: metric_steps(uri, run["info"]["run_id"], key)
                for key in ("train/alpha", "train/reg_weight", "train/sparsity", "train/loss")
            }
            for run in runs
        }
    finally:
        stop_process_group(server)
    print(f"SLURM sweep of 3 jobs x 2 tasks took {sweep_seconds:.0f} s")

    # Three SLURM array tasks of one job array, each with two tasks as DDP ranks.
    array_ids = {path.name.split("_")[0] for path in (sweep_dir / ".submitit").glob("*/*_*") if path.is_dir()}
    assert len(array_ids) == 1, output[-3000:]
    states = wait_for_final_states(array_ids.pop(), env)
    assert states == ["COMPLETED"] * 3
    for job in range(3):
        job_log = (sweep_dir / str(job) / "train.log").read_text()
        assert "rank 0 of 2" in job_log
        assert "rank 1 of 2" in job_log

    # One run per job, all in one sweep, with the swept and the resolved parameters.
    assert len(runs) == 3
    tags = [{tag["key"]: tag["value"] for tag in run["data"]["tags"]} for run in runs]
    assert {tag["sweep"] for tag in tags} == {str(sweep_dir)}
    params = [{param["key"]: param["value"] for param in run["data"]["params"]} for run in runs]
    assert sorted(param["sparsity"] for param in params) == ["0.3", "0.5", "0.8"]
    for param in params:
        assert param["out_dir"] == f"{tmp_path}/out-{param['sparsity']}"
        assert param["trainer.devices"] == "2"
        assert param["trainer.strategy"] == "ddp"
    for run_id, history in histories.items():
        for key, logged_steps in history.items():
            assert logged_steps == list(range(steps)), (run_id, key)

    for sparsity in ("0.3", "0.5", "0.8"):
        out_dir = tmp_path / f"out-{sparsity}"
        record = tracking.read_run_file(out_dir / "model")
        assert record["tracking_uri"] == uri
        assert record["run_id"] in histories
        assert load_checkpoint(out_dir / "checkpoints" / "last.ckpt")["global_step"] == steps
