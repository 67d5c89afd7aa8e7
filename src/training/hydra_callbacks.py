"""Hydra callbacks that check a sweep before its jobs are submitted."""

from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from .validation import ConfigError, validate_launcher, validate_sparsity


class ValidateLaunch(Callback):
    """Reject a multirun whose launcher and trainer disagree, in the submitting process.

    Without this, a SLURM job would start, wait in the queue and fail (or, worse, train on fewer
    devices than asked) before the mistake shows.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            validate_launcher(config.trainer, config.hydra.launcher)
            validate_sparsity(config.get("sparsity", 0.0))
            for value in _swept_values(list(config.hydra.overrides.task), "sparsity"):
                validate_sparsity(value)
        except ConfigError as error:
            # Hydra 1.3 turns an Exception raised in a callback into a warning and launches the
            # jobs anyway. It does not catch SystemExit, which ends the process before any job
            # is submitted, with the message on stderr and exit status 1.
            raise SystemExit(f"invalid sweep configuration: {error}") from error

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        # NOTE: `config` here is the job's config without the `hydra` node; the launcher is checked
        # again inside the run (validate_run_config) through HydraConfig.
        validate_sparsity(config.get("sparsity", 0.0))


def _swept_values(overrides: list[str], key: str) -> list:
    """Every value that a multirun assigns to `key` (for example sparsity=0.3,0.5 gives both)."""
    values = []
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.key_or_group != key:
            continue
        if override.is_sweep_override():
            values.extend(override.sweep_iterator())
        else:
            values.append(override.value())
    return values
