"""Hydra app for the launcher test: each run writes result.json with x, x squared and its SLURM ids.

Run as a script, e.g. `python tests/slurm_apps/sweep_app.py -m x=1,2,3 hydra/launcher=submitit_slurm
'hydra.searchpath=[file:///abs/repo/conf]'`.
"""

import json
import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_NTASKS")


@hydra.main(version_base="1.3", config_path="conf", config_name="sweep_app")
def main(cfg: DictConfig) -> int:
    result = {"x": cfg.x, "square": cfg.x**2}
    result.update({name: os.environ.get(name) for name in SLURM_VARIABLES})

    output_dir = Path(HydraConfig.get().runtime.output_dir)
    (output_dir / "result.json").write_text(json.dumps(result))
    return cfg.x**2


if __name__ == "__main__":
    main()
