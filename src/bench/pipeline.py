"""Benchmark of the pipeline's saved models on a grid of batch sizes, prompt lengths and new tokens."""

import logging
import math
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from src import tracking
from src.training.loading import load_for_inference, load_split

from .decode import CONTIGUOUS, PAGED, measure_case, model_runner
from .results import add_ratios, headline_case, headline_metrics, log_case

logger = logging.getLogger(__name__)

_WARNED_DATA_DIRS: set[str] = set()


def load_prompts(data_dir: str, split: str, batch_size: int, length: int, vocab_size: int, seed: int) -> tuple[torch.Tensor, str]:
    """Return (B, length) prompt ids cut from the prepared split, and where they came from.

    Rows start at evenly spaced offsets of the split. Without prepared data the prompts are random
    ids, which a trained model prunes differently from text, and the returned source names them.
    """
    try:
        tokens = load_split(Path(data_dir), split)
    except FileNotFoundError as error:
        if data_dir not in _WARNED_DATA_DIRS:
            logger.warning("no prepared data (%s); prompts are random token ids, so sparsity is not that of text", error)
            _WARNED_DATA_DIRS.add(data_dir)
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (batch_size, length), generator=generator), "random token ids"

    if tokens.shape[0] < length + batch_size:
        raise ValueError(f"{data_dir}/{split}.bin has {tokens.shape[0]} tokens, too few for {batch_size} prompts of {length}; use shorter prompts or a smaller batch")
    starts = np.linspace(0, tokens.shape[0] - length, num=batch_size).astype(np.int64)
    prompts = torch.from_numpy(np.stack([np.asarray(tokens[start : start + length], dtype=np.int64) for start in starts]))
    if int(prompts.max()) >= vocab_size:
        raise ValueError(f"prompt ids reach {int(prompts.max())} but the model vocabulary has {vocab_size}; use the model's data_dir")
    return prompts, f"{data_dir}/{split}.bin"


def _check_grid(grid: DictConfig, context: int, name: str) -> None:
    for prompt_length in grid.prompt_lengths:
        for new_tokens in grid.new_tokens:
            if prompt_length + new_tokens > context:
                raise ValueError(
                    f"model {name}: prompt_length {prompt_length} + new_tokens {new_tokens} exceeds its context "
                    f"n_positions={context}; lower pipeline.prompt_lengths or pipeline.new_tokens"
                )


def discover_models(models_dir: str, seed: int) -> list[dict]:
    """Find the fine-tuned models of one seed: `<models_dir>/sparsity-<target>-seed<seed>/model`.

    The target 0.0 is the dense baseline and is named "dense"; the others are named "dcp-<target>".
    """
    found = []
    for model_dir in sorted(Path(models_dir).glob(f"sparsity-*-seed{seed}/model")):
        target = float(model_dir.parent.name.removeprefix("sparsity-").rsplit("-seed", 1)[0])
        found.append({"name": "dense" if target == 0.0 else f"dcp-{target:g}", "dir": str(model_dir)})
    if not found:
        raise FileNotFoundError(f"no fine-tuned models sparsity-*-seed{seed}/model in {models_dir}; run `dvc repro finetune`")
    return found


def benchmark_pipeline(cfg: DictConfig, device: torch.device, dtype: torch.dtype) -> dict:
    """Measure every pipeline model on the batch x prompt length x new tokens grid."""
    grid = cfg.pipeline
    cases, models = [], {}
    for entry in grid.models or discover_models(grid.models_dir, grid.seed):
        name, model_dir = entry["name"], entry["dir"]
        if not Path(model_dir).exists():
            raise FileNotFoundError(
                f"model {name}: {model_dir} not found; train it with `dvc repro` or point pipeline.models at saved models"
            )
        model = load_for_inference(str(model_dir)).to(device=device, dtype=dtype)
        model.set_alpha(math.inf)
        _check_grid(grid, model.config.n_positions, name)
        models[name] = {"dir": str(model_dir), "dcp_enabled": model.config.dcp_enabled, "n_layer": model.config.n_layer}
        cache_kinds = [PAGED]
        if not model.config.dcp_enabled and grid.contiguous_baseline:
            cache_kinds.append(CONTIGUOUS)

        for batch_size in grid.batch_sizes:
            for prompt_length in grid.prompt_lengths:
                prompts, source = load_prompts(cfg.prompts.data_dir, cfg.prompts.split, batch_size, prompt_length, model.config.vocab_size, cfg.seed)
                models[name]["prompts"] = source
                for new_tokens in grid.new_tokens:
                    for cache_kind in cache_kinds:
                        runner = model_runner(model, prompts.to(device), new_tokens, cache_kind, cfg.page_size)
                        case = measure_case(runner, batch_size, new_tokens, device, cfg.warmup, cfg.repeats)
                        case.update(model=name, cache=cache_kind, batch_size=batch_size, prompt_length=prompt_length, new_tokens=new_tokens)
                        log_case(case)
                        cases.append(case)
        del model
    add_ratios(cases, grid.dense_model)
    return {"cases": cases, "models": models}


def log_pipeline_to_mlflow(pipeline: dict, artifacts: dict[str, Path]) -> None:
    """Log each model's benchmark metrics to the MLflow run that trained it, when it has one."""
    for name, info in pipeline["models"].items():
        run_dir = _run_dir(Path(info["dir"]))
        if run_dir is None:
            logger.info("model %s has no %s; benchmark metrics are not logged to MLflow", name, tracking.RUN_FILE)
            continue
        metrics = {}
        for case in pipeline["cases"]:
            if case["model"] != name:
                continue
            prefix = f"bench/{case['cache']}_b{case['batch_size']}_p{case['prompt_length']}_n{case['new_tokens']}"
            metrics[f"{prefix}_tokens_per_s"] = case["decode_tokens_per_s"]["median"]
            metrics[f"{prefix}_kv_bytes_peak"] = case["kv_bytes_peak"]
        headline = headline_case(pipeline["cases"], name)
        metrics.update({f"bench/{key}": value for key, value in headline_metrics(headline).items()})
        tracking.log_to_training_run(run_dir, metrics, artifacts=[artifacts[name]] if name in artifacts else None)


def _run_dir(model_dir: Path) -> Path | None:
    """Return the directory with the model's run.json (the model directory or its parent), or None."""
    for directory in (model_dir, model_dir.parent):
        if tracking.read_run_file(directory) is not None:
            return directory
    return None
