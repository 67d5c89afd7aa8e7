"""Shared handling of benchmark cases: ratios against the dense model, headline numbers, JSON,
Markdown tables and plots.
"""

import json
import logging
from pathlib import Path

from . import plots
from .decode import CONTIGUOUS, PAGED

logger = logging.getLogger(__name__)


def log_case(case: dict) -> None:
    logger.info(
        "%s/%s batch %d prompt %d new %d: %.1f tokens/s (spread %.0f%%), step %.2f ms, KV peak %.2f MiB, sparsity %.2f",
        case["model"],
        case["cache"],
        case["batch_size"],
        case["prompt_length"],
        case["new_tokens"],
        case["decode_tokens_per_s"]["median"],
        100 * case["decode_tokens_per_s"]["spread"],
        1000 * case["step_s"]["median"],
        case["kv_bytes_peak"] / 2**20,
        case["decode_sparsity"],
    )


def add_ratios(cases: list[dict], dense_model: str) -> None:
    """Add speed-ups and KV byte ratios against the dense model's paged and contiguous runs of the same case."""
    reference = {}
    for case in cases:
        if case["model"] == dense_model:
            reference[(case["cache"], case["batch_size"], case["prompt_length"], case["new_tokens"])] = case
    for case in cases:
        key = (case["batch_size"], case["prompt_length"], case["new_tokens"])
        for cache_kind in (PAGED, CONTIGUOUS):
            dense = reference.get((cache_kind, *key))
            if dense is None:
                continue
            suffix = "" if cache_kind == PAGED else "_contiguous"
            case[f"speedup_vs_dense{suffix}"] = case["decode_tokens_per_s"]["median"] / dense["decode_tokens_per_s"]["median"]
            case[f"kv_bytes_ratio_vs_dense{suffix}"] = case["kv_bytes_peak"] / dense["kv_bytes_peak"]


def headline_case(cases: list[dict], model: str, cache_kind: str = PAGED) -> dict | None:
    """Return the case with the largest batch, then the longest prompt, then the most new tokens."""
    matching = [case for case in cases if case["model"] == model and case["cache"] == cache_kind]
    if not matching:
        return None
    return max(matching, key=lambda case: (case["batch_size"], case["prompt_length"], case["new_tokens"]))


_HEADLINE_KEYS = (
    "speedup_vs_dense",
    "speedup_vs_dense_contiguous",
    "kv_bytes_peak",
    "kv_bytes_ratio_vs_dense",
    "kv_bytes_ratio_vs_dense_contiguous",
    "decode_sparsity",
    "padded_length",
    "mean_live",
)


def headline_metrics(case: dict) -> dict:
    """Flat numbers of one case for the DVC metrics file and MLflow."""
    metrics = {
        "decode_tokens_per_s": case["decode_tokens_per_s"]["median"],
        "decode_tokens_per_s_spread": case["decode_tokens_per_s"]["spread"],
        "step_ms": 1000 * case["step_s"]["median"],
    }
    if "prefill_s" in case:
        metrics["prefill_ms"] = 1000 * case["prefill_s"]["median"]
    for key in _HEADLINE_KEYS:
        if key in case:
            metrics[key] = case[key]
    return metrics


def write_json(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    logger.info("wrote %s", path)
    return path


def plot_cases(cases: list[dict], out_dir: Path, title: str, dcp_models: list[str]) -> list[Path]:
    """Throughput and KV bytes against batch size and sparsity, and live tokens over time."""
    paths = []
    prompt_length = max(case["prompt_length"] for case in cases)
    new_tokens = min(case["new_tokens"] for case in cases)
    batch_size = max(case["batch_size"] for case in cases)
    paths.append(plots.plot_vs_batch(cases, prompt_length, new_tokens, out_dir / "throughput_kv_vs_batch.png", title))
    paths.append(plots.plot_vs_sparsity(cases, batch_size, prompt_length, new_tokens, out_dir / "throughput_kv_vs_sparsity.png", title))
    for name in dcp_models:
        case = headline_case(cases, name)
        if case is not None:
            paths.append(plots.plot_live_tokens(case, out_dir / f"live_tokens_{name}.png", title))
    return paths


def markdown_table(cases: list[dict]) -> str:
    """Build a Markdown table of the cases (median decode tokens/s with min-max, KV bytes, live counts)."""
    lines = [
        "| model | cache | batch | prompt | new | decode tok/s (min-max) | step ms | prefill ms | KV peak MiB | padded len | mean live | sparsity | speed-up vs dense paged / contiguous |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        throughput = case["decode_tokens_per_s"]
        prefill_ms = f"{1000 * case['prefill_s']['median']:.1f}" if "prefill_s" in case else "-"
        speedups = " / ".join(f"{case[key]:.2f}" if key in case else "-" for key in ("speedup_vs_dense", "speedup_vs_dense_contiguous"))
        lines.append(
            f"| {case['model']} | {case['cache']} | {case['batch_size']} | {case['prompt_length']} | {case['new_tokens']} "
            f"| {throughput['median']:.0f} ({throughput['min']:.0f}-{throughput['max']:.0f}) | {1000 * case['step_s']['median']:.2f} "
            f"| {prefill_ms} | {case['kv_bytes_peak'] / 2**20:.2f} | {case['padded_length']:.1f} | {case['mean_live']:.1f} "
            f"| {case['decode_sparsity']:.2f} | {speedups} |"
        )
    return "\n".join(lines) + "\n"


def training_cost_table(results: dict) -> str:
    """Build a Markdown table of fine-tuning step times (medians) and the DCP-specific pieces."""
    lines = [
        "| shape | batch x seq | alpha | dense step s | DCP step s | DCP / dense | keep mask s (share of DCP step) | attention causal / learned bias s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, result in results.items():
        shape = result["shape"]
        description = f"{label}: {shape['n_layer']}L d={shape['n_embd']}"
        attention = f"{result['attention_causal_s']['median']:.3f} / {result['attention_bias_s']['median']:.3f}"
        for entry in result["dcp"]:
            lines.append(
                f"| {description} | {result['batch_size']} x {result['seq_len']} | {entry['alpha']:g} "
                f"| {result['dense_step_s']['median']:.3f} | {entry['dcp_step_s']['median']:.3f} "
                f"| {entry['dcp_over_dense']:.2f} | {entry['keep_mask_s']['median']:.3f} "
                f"({100 * entry['keep_mask_share']:.0f}%) | {attention} |"
            )
    return "\n".join(lines) + "\n"
