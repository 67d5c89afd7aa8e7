"""The benchmark stage: decoding speed and KV memory of the pipeline's models, paper-scale shapes,
and the cost of a fine-tuning step. `run_benchmark(cfg)` is what `python -m src.benchmark` runs.
"""

import logging
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from .decode import CONTIGUOUS
from .paper_scale import benchmark_paper_scale
from .pipeline import benchmark_pipeline, log_pipeline_to_mlflow
from .results import headline_case, headline_metrics, markdown_table, plot_cases, training_cost_table, write_json
from .timing import machine_info
from .training_cost import measure_training_cost

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name} but CUDA is not available; use device=cpu or device=auto")
    return torch.device(name)


def resolve_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"dtype={name!r} is not supported; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def run_training_cost(cfg: DictConfig, device: torch.device) -> dict:
    cost = cfg.training_cost
    results = {}
    for label in ("builtin", "gpt2_small"):
        section = cost[label]
        if not section.enabled:
            continue
        results[label] = measure_training_cost(
            OmegaConf.to_container(section.shape),
            section.batch_size,
            section.seq_len,
            list(cost.alphas),
            section.warmup,
            section.repeats,
            device,
        )
    return results


def run_benchmark(cfg: DictConfig) -> dict:
    """Run the enabled parts of the benchmark and write their JSON, PNG and Markdown outputs."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(cfg.seed)
    header = {"machine": machine_info(device), "command": " ".join(["python -m src.benchmark", *sys.argv[1:]]), "dtype": cfg.dtype}
    outputs = {}

    training = run_training_cost(cfg, device) if cfg.training_cost.enabled else {}
    if cfg.pipeline.enabled:
        outputs["pipeline"] = _write_pipeline(cfg, benchmark_pipeline(cfg, device, dtype), training, header)
    if cfg.paper_scale.enabled:
        outputs["paper_scale"] = _write_paper_scale(cfg, benchmark_paper_scale(cfg, device, dtype), training, header)
    if training and not cfg.pipeline.enabled and not cfg.paper_scale.enabled:
        write_json(Path(cfg.out.report_dir) / "training_cost.json", {**header, "training_cost": training})
    return outputs


def _write_pipeline(cfg: DictConfig, pipeline: dict, training: dict, header: dict) -> dict:
    report_dir = Path(cfg.out.report_dir)
    write_json(report_dir / "results.json", {**header, "config": OmegaConf.to_container(cfg), **pipeline, "training_cost": training})
    artifacts = {}
    for name in pipeline["models"]:
        detail = {**header, "model": pipeline["models"][name], "cases": [case for case in pipeline["cases"] if case["model"] == name]}
        artifacts[name] = write_json(report_dir / f"model_{name}.json", detail)

    dcp_models = [name for name, info in pipeline["models"].items() if info["dcp_enabled"]]
    plot_cases(pipeline["cases"], report_dir, "pipeline models", dcp_models)
    table = markdown_table(pipeline["cases"])
    if training:
        table += "\n" + training_cost_table(training)
    (report_dir / "table.md").write_text(table)

    metrics = {"device": str(header["machine"]["device"]), "models": {}}
    for name in pipeline["models"]:
        metrics["models"][name] = headline_metrics(headline_case(pipeline["cases"], name))
        contiguous = headline_case(pipeline["cases"], name, CONTIGUOUS)
        if contiguous is not None:
            metrics["models"][f"{name}_contiguous"] = headline_metrics(contiguous)
    metrics["training_cost"] = {
        label: {f"dcp_over_dense_alpha{entry['alpha']:g}": entry["dcp_over_dense"] for entry in result["dcp"]} for label, result in training.items()
    }
    write_json(Path(cfg.out.metrics_file), metrics)

    if cfg.mlflow:
        log_pipeline_to_mlflow(pipeline, artifacts)
    return metrics


def _write_paper_scale(cfg: DictConfig, paper_scale: dict, training: dict, header: dict) -> dict:
    out_dir = Path(cfg.out.paper_scale_dir)
    write_json(out_dir / "results.json", {**header, "config": OmegaConf.to_container(cfg.paper_scale), **paper_scale, "training_cost": training})
    dcp_models = [name for name in paper_scale["models"] if name != "dense"]
    shape = cfg.paper_scale.shape
    title = f"random weights, {shape.n_layer} layers, d={shape.n_embd}"
    plot_cases(paper_scale["cases"], out_dir, title, dcp_models)
    table = markdown_table(paper_scale["cases"])
    if training:
        table += "\n" + training_cost_table(training)
    (out_dir / "table.md").write_text(table)
    return {name: headline_metrics(headline_case(paper_scale["cases"], name)) for name in paper_scale["models"]}
