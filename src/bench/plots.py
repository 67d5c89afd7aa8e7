"""PNG plots of the benchmark results (matplotlib, Agg backend)."""

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

logger = logging.getLogger(__name__)

_MIB = 2**20


def _label(case: dict) -> str:
    return f"{case['model']} ({case['cache']})" if case["cache"] != "paged" else case["model"]


def _series(cases: list[dict]) -> dict[str, list[dict]]:
    """Group cases by model and cache kind."""
    groups: dict[str, list[dict]] = {}
    for case in cases:
        groups.setdefault(_label(case), []).append(case)
    return groups


def plot_vs_batch(cases: list[dict], prompt_length: int, new_tokens: int, path: Path, title: str) -> Path:
    """Decode tokens/s and peak KV bytes against batch size, one line per model."""
    selected = [case for case in cases if case["prompt_length"] == prompt_length and case["new_tokens"] == new_tokens]
    figure, (throughput_axis, bytes_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for label, group in sorted(_series(selected).items()):
        group = sorted(group, key=lambda case: case["batch_size"])
        batches = [case["batch_size"] for case in group]
        medians = [case["decode_tokens_per_s"]["median"] for case in group]
        errors = [
            [median - case["decode_tokens_per_s"]["min"] for median, case in zip(medians, group)],
            [case["decode_tokens_per_s"]["max"] - median for median, case in zip(medians, group)],
        ]
        throughput_axis.errorbar(batches, medians, yerr=errors, marker="o", capsize=3, label=label)
        bytes_axis.plot(batches, [case["kv_bytes_peak"] / _MIB for case in group], marker="o", label=label)

    throughput_axis.set(xlabel="batch size", ylabel="decode tokens/s (median, min-max)", xscale="log", yscale="log")
    bytes_axis.set(xlabel="batch size", ylabel="peak KV cache MiB (allocated)", xscale="log", yscale="log")
    throughput_axis.legend(fontsize=8)
    figure.suptitle(f"{title}: prompt {prompt_length}, {new_tokens} new tokens")
    return _save(figure, path)


def plot_vs_sparsity(cases: list[dict], batch_size: int, prompt_length: int, new_tokens: int, path: Path, title: str) -> Path:
    """Decode tokens/s and peak KV bytes against the measured decode sparsity, one point per model."""
    selected = [
        case
        for case in cases
        if case["batch_size"] == batch_size and case["prompt_length"] == prompt_length and case["new_tokens"] == new_tokens
    ]
    figure, (throughput_axis, bytes_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for case in sorted(selected, key=lambda case: case["decode_sparsity"]):
        sparsity = case["decode_sparsity"]
        throughput_axis.scatter(sparsity, case["decode_tokens_per_s"]["median"], label=_label(case))
        bytes_axis.scatter(sparsity, case["kv_bytes_peak"] / _MIB, label=_label(case))
    throughput_axis.set(xlabel="measured decode sparsity", ylabel="decode tokens/s (median)")
    bytes_axis.set(xlabel="measured decode sparsity", ylabel="peak KV cache MiB (allocated)")
    throughput_axis.legend(fontsize=8)
    figure.suptitle(f"{title}: batch {batch_size}, prompt {prompt_length}, {new_tokens} new tokens")
    return _save(figure, path)


def plot_live_tokens(case: dict, path: Path, title: str) -> Path:
    """Mean and max live tokens per row against decode step, one line per layer."""
    figure, axis = plt.subplots(figsize=(7, 4))
    for layer, (means, maxima) in enumerate(zip(case["live_mean_per_layer"], case["live_max_per_layer"])):
        line = axis.plot(range(len(means)), means, label=f"layer {layer}")[0]
        axis.plot(range(len(maxima)), maxima, linestyle=":", color=line.get_color())
    axis.set(xlabel="decode step (0 = after prefill)", ylabel="live tokens per row (solid: mean, dotted: max)")
    axis.legend(fontsize=7, ncol=2)
    axis.set_title(f"{title}: {case['model']}, batch {case['batch_size']}, prompt {case['prompt_length']}")
    return _save(figure, path)


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    logger.info("wrote %s", path)
    return path
