"""Callables that the tests submit with submitit.

The tests register this module with cloudpickle.register_pickle_by_value, so a job unpickles the
code itself and does not need the repository on its sys.path.
"""

import os
import time

import submitit


def add(a: int, b: int) -> int:
    return a + b


def sleep_and_return(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


class RestartCounter(submitit.helpers.Checkpointable):
    """Wait for the time-limit signal on the first run and return SLURM_RESTART_COUNT after a requeue.

    SLURM sets SLURM_RESTART_COUNT only in a requeued job. submitit catches the signal sent
    before the time limit, pickles this object again through Checkpointable.checkpoint and
    requeues the job with `scontrol requeue`.
    """

    def __call__(self, max_wait_s: float) -> int:
        restart_count = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if restart_count > 0:
            return restart_count

        time.sleep(max_wait_s)
        return 0
