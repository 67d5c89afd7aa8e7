"""Evaluate one trained model: `python -m src.evaluate model_dir=models/finetuned/<tag>/model`.

Writes held-out perplexity and measured sparsity (overall and per layer) at hard drops to a metrics
JSON that `dvc metrics show` lists, and logs them to the MLflow run that trained the model.
"""

import json
import logging
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from src import tracking
from src.evaluation import evaluate_tokens
from src.training.loading import load_for_inference, load_split

logger = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    model_dir = Path(cfg.model_dir)
    model = load_for_inference(str(model_dir)).to(cfg.device)
    tokens = load_split(Path(cfg.data_dir), cfg.split)

    started = time.perf_counter()
    metrics = evaluate_tokens(
        model, tokens, window=cfg.window, stride=cfg.stride, batch_size=cfg.batch_size, max_windows=cfg.max_windows or None, device=cfg.device
    )
    metrics["eval_seconds"] = time.perf_counter() - started
    run = tracking.read_run_file(model_dir) or {}
    metrics["target_sparsity"] = run.get("target_sparsity")
    metrics["split"] = cfg.split
    metrics["window"] = cfg.window
    metrics["stride"] = cfg.stride or cfg.window

    out_path = Path(cfg.out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(metrics, indent=2) + "\n")
    logger.info("%s: perplexity %.2f, sparsity %.3f", model_dir, metrics["perplexity"], metrics["sparsity"])

    logged = {f"eval/{cfg.split}_perplexity": metrics["perplexity"], f"eval/{cfg.split}_sparsity": metrics["sparsity"]}
    for layer, value in enumerate(metrics["layer_sparsity"]):
        logged[f"eval/{cfg.split}_sparsity_layer{layer}"] = value
    tracking.log_to_training_run(model_dir, logged, artifacts=[out_path])


if __name__ == "__main__":
    main()
