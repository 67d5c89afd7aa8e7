"""Benchmark decoding with the pruned KV cache: `python -m src.benchmark` (see conf/benchmark.yaml).

Writes metrics/benchmark.json (DVC metrics), reports/benchmark/ (JSON per model, table.md, PNG plots)
and logs each model's numbers to the MLflow run that trained it. The logic lives in src/bench/.
"""

import hydra
from omegaconf import DictConfig

from src.bench.stage import run_benchmark


@hydra.main(version_base="1.3", config_path="../conf", config_name="benchmark")
def main(cfg: DictConfig) -> None:
    run_benchmark(cfg)


if __name__ == "__main__":
    main()
