"""Session fixture that runs the local SLURM cluster of slurm/start.sh for tests marked `slurm`.

The fixture skips its tests, with the start script's error as the reason, when the cluster cannot
start (not root, no apt-get, daemons failing). Set DCP_REQUIRE_SLURM=1 to fail them instead, e.g.
in CI where the cluster is expected.
"""

import logging
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO_ROOT / "slurm"
# Installing the packages takes 10-15 s on a fresh Debian machine and start.sh waits up to 60 s
# for the node, so this bound only catches a hung script.
START_TIMEOUT_S = 240
STOP_TIMEOUT_S = 60


def slurm_state_dir() -> Path:
    return Path(os.environ.get("DCP_SLURM_STATE_DIR", SLURM_DIR / "state"))


def is_controller_running(state_dir: Path) -> bool:
    """Return whether the slurmctld in STATE_DIR/slurmctld.pid is alive (a zombie counts as stopped)."""
    try:
        pid = int((state_dir / "slurmctld.pid").read_text().strip())
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state != "Z"


def slurm_environment(state_dir: Path) -> dict[str, str]:
    """Return a copy of os.environ with SLURM_CONF set and slurm/bin (the sacct stand-in) first on PATH."""
    env = dict(os.environ)
    env["SLURM_CONF"] = str(state_dir / "slurm.conf")
    env["PATH"] = f"{SLURM_DIR / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("DCP_REQUIRE_SLURM") == "1":
        pytest.fail(f"{reason} (DCP_REQUIRE_SLURM=1)", pytrace=False)
    pytest.skip(reason)


def _start_cluster() -> None:
    try:
        started = subprocess.run(
            [str(SLURM_DIR / "start.sh")],
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        _skip_or_fail(f"slurm/start.sh timed out after {START_TIMEOUT_S} s")
    except OSError as error:
        _skip_or_fail(f"slurm/start.sh could not run: {error}")
    else:
        log.info("slurm/start.sh output:\n%s", started.stdout)
        if started.returncode != 0:
            message = started.stderr.strip() or started.stdout.strip()
            _skip_or_fail(f"local SLURM cluster did not start: {message}")


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[dict[str, str]]:
    """Start the local SLURM cluster once per session and yield the environment for its clients.

    The yielded dict is os.environ plus SLURM_CONF and PATH; pass it to subprocess calls, or set
    it in os.environ for submitit, which runs sbatch with the process environment. The cluster is
    stopped at the end only if this fixture started it.
    """
    state_dir = slurm_state_dir()
    was_running = is_controller_running(state_dir)

    _start_cluster()
    yield slurm_environment(state_dir)

    if was_running:
        return
    stopped = subprocess.run(
        [str(SLURM_DIR / "stop.sh")], capture_output=True, text=True, timeout=STOP_TIMEOUT_S
    )
    if stopped.returncode != 0:
        log.error("slurm/stop.sh failed with exit code %d:\n%s", stopped.returncode, stopped.stderr)
