"""Tests of the local SLURM cluster (slurm/), the sacct stand-in and the Hydra submitit launchers.

The cluster tests need root and the Debian SLURM packages, which slurm/start.sh installs. Without
them the slurm_cluster fixture skips the tests with the start script's error.
Run: pytest -m slurm tests/test_slurm_cluster.py
"""

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf
from omegaconf import OmegaConf
from submitit.core.utils import UncompletedJobError

from tests.fixtures_slurm import REPO_ROOT, SLURM_DIR, slurm_environment
from tests.slurm_apps import submitit_tasks

LAUNCHER_DIR = REPO_ROOT / "conf" / "hydra" / "launcher"
SWEEP_APP = REPO_ROOT / "tests" / "slurm_apps" / "sweep_app.py"
FINAL_JOB_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
}

# Jobs unpickle these callables from the pickle itself, not by importing tests.slurm_apps.
cloudpickle.register_pickle_by_value(submitit_tasks)


@pytest.fixture
def slurm_env(slurm_cluster: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Set the cluster's SLURM_CONF and PATH in os.environ, where submitit reads them."""
    monkeypatch.setenv("SLURM_CONF", slurm_cluster["SLURM_CONF"])
    monkeypatch.setenv("PATH", slurm_cluster["PATH"])
    return slurm_cluster


def run_command(command: list[str], env: dict[str, str], timeout_s: float = 60) -> str:
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
    assert completed.returncode == 0, f"{command} failed:\n{completed.stdout}\n{completed.stderr}"
    return completed.stdout


def submit_and_wait(sbatch_args: list[str], env: dict[str, str], timeout_s: float = 60) -> tuple[str, str]:
    """Submit with sbatch, poll squeue until the job ends and return (job id, final state).

    Faster than `sbatch --wait`, which polls at growing intervals.
    """
    job_id = run_command(["sbatch", "--parsable", *sbatch_args], env).strip()
    deadline = time.monotonic() + timeout_s
    while True:
        states = run_command(["squeue", "-h", "-r", "-t", "all", "-j", job_id, "-o", "%T"], env).split()
        if states and all(state in FINAL_JOB_STATES for state in states):
            return job_id, states[0]
        assert time.monotonic() < deadline, f"job {job_id} still {states} after {timeout_s} s"
        time.sleep(0.2)


def make_executor(folder: Path, timeout_min: int = 2) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
    executor.update_parameters(timeout_min=timeout_min, cpus_per_task=1)
    return executor


def wait_until_done(job: submitit.Job, timeout_s: float) -> float:
    """Poll job.done() as job.result() does, fail after TIMEOUT_S, and return the seconds waited."""
    start = time.monotonic()
    while not job.done():
        elapsed = time.monotonic() - start
        assert elapsed < timeout_s, f"job {job.job_id} not done after {timeout_s} s (state {job.state})"
        time.sleep(0.5)
    return time.monotonic() - start


def wait_for_state(job: submitit.Job, expected: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    state = job.get_info(mode="force").get("State")
    while state != expected:
        assert time.monotonic() < deadline, f"job {job.job_id} is {state}, expected {expected}"
        time.sleep(0.5)
        state = job.get_info(mode="force").get("State")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(
    ("config_file", "schema"),
    [("submitit_slurm.yaml", SlurmQueueConf), ("submitit_local.yaml", LocalQueueConf)],
)
def test_launcher_config_lists_plugin_fields(config_file: str, schema: type) -> None:
    config = OmegaConf.to_container(OmegaConf.load(LAUNCHER_DIR / config_file), resolve=False)
    plugin_fields = {field.name for field in dataclasses.fields(schema)}

    assert set(config) == plugin_fields
    assert config["_target_"] == schema._target_
    assert config["gpus_per_node"] is None
    assert "${now:" in config["submitit_folder"]


@pytest.mark.slurm
@pytest.mark.slow
def test_sbatch_runs_two_tasks(slurm_cluster: dict[str, str], tmp_path: Path) -> None:
    node_state = run_command(["sinfo", "-h", "-o", "%t"], slurm_cluster).strip()
    assert node_state == "idle"

    task_script = f"echo task $SLURM_PROCID of $SLURM_NTASKS > {tmp_path}/task_$SLURM_PROCID.txt"
    _, state = submit_and_wait(
        ["--ntasks=2", "--time=2", f"--output={tmp_path}/job.log", f"--wrap=srun bash -c '{task_script}'"],
        slurm_cluster,
    )

    assert state == "COMPLETED"
    assert (tmp_path / "task_0.txt").read_text() == "task 0 of 2\n"
    assert (tmp_path / "task_1.txt").read_text() == "task 1 of 2\n"


@pytest.mark.slurm
@pytest.mark.slow
def test_sacct_standin_lists_array_tasks(slurm_cluster: dict[str, str], tmp_path: Path) -> None:
    job_id, _ = submit_and_wait(["--array=0-2", f"--output={tmp_path}/%a.log", "--wrap=true"], slurm_cluster)
    output = run_command(
        ["sacct", "-o", "JobID,State,NodeList", "--parsable2", "-j", job_id, "-j", "999999"],
        slurm_cluster,
    )

    lines = output.splitlines()
    assert lines[0] == "JobID|State|NodeList"
    assert [line.split("|")[0] for line in lines[1:]] == [f"{job_id}_{task}" for task in range(3)]
    assert all(line.split("|")[1] == "COMPLETED" for line in lines[1:])


@pytest.mark.slurm
@pytest.mark.slow
def test_submitit_job_returns_result(slurm_env: dict[str, str], tmp_path: Path) -> None:
    job = make_executor(tmp_path).submit(submitit_tasks.add, 2, 3)

    wait_until_done(job, timeout_s=60)

    assert job.result() == 5
    # The result file appears while the job is still RUNNING or COMPLETING.
    wait_for_state(job, "COMPLETED", timeout_s=30)


@pytest.mark.slurm
@pytest.mark.slow
def test_cancelled_submitit_job_fails(slurm_env: dict[str, str], tmp_path: Path) -> None:
    job = make_executor(tmp_path).submit(submitit_tasks.sleep_and_return, 600)
    wait_for_state(job, "RUNNING", timeout_s=30)

    start = time.monotonic()
    run_command(["scancel", job.job_id], slurm_env)
    wait_until_done(job, timeout_s=90)
    with pytest.raises(UncompletedJobError):
        job.result()

    # KillWait (10 s) plus submitit's 15 s wait for a result file, plus polling.
    assert time.monotonic() - start < 90
    assert job.state == "CANCELLED"


@pytest.mark.slurm
@pytest.mark.slow
def test_hydra_sweep_runs_as_job_array(slurm_env: dict[str, str], tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    command = [
        sys.executable, str(SWEEP_APP), "--multirun", "x=1,2,3",
        "hydra/launcher=submitit_slurm",
        f"hydra.searchpath=[file://{REPO_ROOT / 'conf'}]",
        f"hydra.sweep.dir={sweep_dir}",
        "hydra.launcher.timeout_min=5",
    ]
    run_command(command, {**slurm_env, "HYDRA_FULL_ERROR": "1"}, timeout_s=120)

    results = [json.loads(path.read_text()) for path in sorted(sweep_dir.glob("*/result.json"))]
    assert sorted(result["square"] for result in results) == [1, 4, 9]
    assert len({result["SLURM_ARRAY_JOB_ID"] for result in results}) == 1
    assert sorted(result["SLURM_ARRAY_TASK_ID"] for result in results) == ["0", "1", "2"]
    submitit_folders = list((sweep_dir / ".submitit").iterdir())
    assert len(submitit_folders) == 1, "expected one timestamped submitit folder per sweep"


@pytest.mark.slow
def test_hydra_sweep_runs_with_local_launcher(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    command = [
        sys.executable, str(SWEEP_APP), "--multirun", "x=2,3",
        "hydra/launcher=submitit_local",
        f"hydra.searchpath=[file://{REPO_ROOT / 'conf'}]",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    run_command(command, {**os.environ, "HYDRA_FULL_ERROR": "1"}, timeout_s=120)

    results = [json.loads(path.read_text()) for path in sorted(sweep_dir.glob("*/result.json"))]
    assert sorted(result["square"] for result in results) == [4, 9]
    assert all(result["SLURM_JOB_ID"] is None for result in results)
    assert len(list((sweep_dir / ".submitit").iterdir())) == 1


@pytest.mark.slurm
@pytest.mark.slow
def test_checkpointable_job_is_requeued(slurm_env: dict[str, str], tmp_path: Path) -> None:
    executor = make_executor(tmp_path, timeout_min=1)
    # Ask for the signal 50 s before the 60 s limit. slurmctld checks signal times about every
    # 30 s, and in one of two runs (Slurm 22.05) the signal came only with the limit itself.
    executor.update_parameters(slurm_signal_delay_s=50)
    job = executor.submit(submitit_tasks.RestartCounter(), 300)

    wait_until_done(job, timeout_s=180)

    assert job.result() == 1


@pytest.mark.slurm
@pytest.mark.slow
def test_fake_gpus_accept_gpu_requests(slurm_cluster: dict[str, str], tmp_path: Path) -> None:
    # A second cluster with its own state folder and ports, so the session cluster is untouched.
    # The state folder is short because slurmd puts Unix sockets (at most 107 bytes) in it.
    state_dir = Path(tempfile.mkdtemp(prefix="dcp-slurm-"))
    settings = {
        "DCP_SLURM_STATE_DIR": str(state_dir),
        "DCP_SLURM_FAKE_GPUS": "2",
        "DCP_SLURM_CTLD_PORT": str(free_port()),
        "DCP_SLURM_SLURMD_PORT": str(free_port()),
    }
    env = {**slurm_environment(state_dir), **settings}
    try:
        run_command([str(SLURM_DIR / "start.sh")], env)
        gres = run_command(["sinfo", "-h", "-o", "%G"], env).strip()
        _, state = submit_and_wait(
            ["--gpus-per-node=2", f"--output={tmp_path}/job.log", "--wrap=echo $SLURM_GPUS_ON_NODE"], env
        )
        too_many = subprocess.run(
            ["sbatch", "--gpus-per-node=3", "--wrap=true"], env=env, capture_output=True, text=True
        )
    finally:
        run_command([str(SLURM_DIR / "stop.sh")], env)
        shutil.rmtree(state_dir)

    assert gres == "gpu:2"
    assert state == "COMPLETED"
    assert (tmp_path / "job.log").read_text() == "2\n"
    assert too_many.returncode != 0
    assert "Requested node configuration is not available" in too_many.stderr
