"""Summarise the pipeline's results: `python -m src.report`.

Reads the metrics JSON files of the evaluate, zero_shot, baselines and benchmark stages and the
interpretability statistics, and writes `reports/summary.md` (tables with the spread over seeds),
PNG figures under `reports/figures/` and a CSV for `dvc plots`. The PNGs are rendered here with
matplotlib because DVC's HTML plots load their renderer from a CDN. Stages whose outputs are
missing are left out of the report with a note.
"""

import csv
import json
import logging
import re
from collections import defaultdict
from pathlib import Path

import hydra
import matplotlib
import numpy as np
from omegaconf import DictConfig

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

logger = logging.getLogger(__name__)

RUN_NAME = re.compile(r"sparsity-(?P<target>[0-9.]+)-seed(?P<seed>\d+)")


def read_json_dir(directory: Path) -> dict[str, dict]:
    """Return {file stem: content} for every JSON file in `directory` (empty when it is missing)."""
    if not Path(directory).is_dir():
        return {}
    return {path.stem: json.loads(path.read_text()) for path in sorted(Path(directory).glob("*.json"))}


def mean_accuracy(record: dict | None) -> float | None:
    """Return the mean accuracy over the zero-shot tasks of one record, or None without tasks."""
    if not record or not record.get("tasks"):
        return None
    values = [task["acc"] for task in record["tasks"].values() if task.get("acc") is not None]
    return float(np.mean(values)) if values else None


def _mean_std(values: list[float]) -> tuple[float, float]:
    array = np.asarray([value for value in values if value is not None], dtype=float)
    if array.size == 0:
        return float("nan"), float("nan")
    return float(array.mean()), float(array.std())


def dcp_rows(evaluations: dict[str, dict], zero_shot: dict[str, dict]) -> list[dict]:
    """Aggregate the evaluations into one row per target sparsity (0 is the dense baseline) over seeds."""
    groups = defaultdict(list)
    for name, record in evaluations.items():
        match = RUN_NAME.fullmatch(name)
        target = float(match["target"]) if match else float(record.get("target_sparsity") or 0.0)
        groups[target].append((record, zero_shot.get(name)))
    if not groups:
        raise FileNotFoundError("no evaluation metrics found; run `dvc repro evaluate` first")

    rows = []
    for target in sorted(groups):
        members = groups[target]
        perplexity = _mean_std([record["perplexity"] for record, _ in members])
        sparsity = _mean_std([record["sparsity"] for record, _ in members])
        accuracy = _mean_std([mean_accuracy(zero) for _, zero in members])
        rows.append(
            {
                "method": "dense" if target == 0.0 else "DCP",
                "label": "dense" if target == 0.0 else f"DCP {target:g}",
                "target_sparsity": target,
                "sparsity": sparsity,
                "perplexity": perplexity,
                "accuracy": accuracy,
                "seeds": len(members),
                "layer_sparsity": np.mean([record["layer_sparsity"] for record, _ in members], axis=0).tolist(),
            }
        )
    return rows


def baseline_rows(baselines: dict[str, dict]) -> list[dict]:
    """Aggregate the baseline records into one row per (baseline, target) over seeds."""
    groups = defaultdict(list)
    for record in baselines.values():
        groups[(record["baseline"], record["target_sparsity"])].append(record)

    rows = []
    for (name, target), members in sorted(groups.items()):
        rows.append(
            {
                "method": name,
                "label": f"{name} {target:g}",
                "target_sparsity": target,
                "sparsity": _mean_std([member["sparsity"] for member in members]),
                "perplexity": _mean_std([member["perplexity"] for member in members]),
                "accuracy": _mean_std([mean_accuracy(member) for member in members]),
                "dcp_perplexity": _mean_std([member["dcp_perplexity"] for member in members]),
                "seeds": len(members),
            }
        )
    return rows


def _format(value: tuple[float, float], digits: int, spread: bool) -> str:
    mean, std = value
    if np.isnan(mean):
        return "n/a"
    text = f"{mean:.{digits}f}"
    return text + (f" ± {std:.{digits}f}" if spread else "")


def results_table(rows: list[dict]) -> list[str]:
    lines = [
        "| model | target sparsity | measured sparsity | perplexity | zero-shot accuracy | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        spread = row["seeds"] > 1
        lines.append(
            f"| {row['label']} | {row['target_sparsity']:g} | {_format(row['sparsity'], 3, spread)} | "
            f"{_format(row['perplexity'], 2, spread)} | {_format(row['accuracy'], 3, spread)} | {row['seeds']} |"
        )
    return lines


def layer_table(rows: list[dict]) -> list[str]:
    layers = len(rows[0]["layer_sparsity"])
    lines = ["| model | " + " | ".join(f"layer {index}" for index in range(layers)) + " |", "|---|" + "---|" * layers]
    for row in rows:
        lines.append(f"| {row['label']} | " + " | ".join(f"{value:.3f}" for value in row["layer_sparsity"]) + " |")
    return lines


def baseline_table(rows: list[dict]) -> list[str]:
    lines = [
        "| baseline | budget of DCP target | measured sparsity | perplexity | DCP perplexity | zero-shot accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        spread = row["seeds"] > 1
        lines.append(
            f"| {row['method']} | {row['target_sparsity']:g} | {_format(row['sparsity'], 3, spread)} | "
            f"{_format(row['perplexity'], 2, spread)} | {_format(row['dcp_perplexity'], 2, spread)} | "
            f"{_format(row['accuracy'], 3, spread)} |"
        )
    return lines


def interpret_sections(interpret_dir: Path, report_dir: Path) -> list[str]:
    """Return markdown that links the drop maps and shows the drop statistics of each interpreted model."""
    lines = []
    for stats_md in sorted(Path(interpret_dir).glob("*/stats.md")):
        model_dir = stats_md.parent
        relative = model_dir.relative_to(report_dir) if model_dir.is_relative_to(report_dir) else model_dir
        lines += [f"### {model_dir.name}", ""]
        for picture in ("keep_masks.png", "token_view.png"):
            if (model_dir / picture).exists():
                lines.append(f"![{picture}]({relative}/{picture})")
        lines += ["", f"Token view: [{relative}/token_view.html]({relative}/token_view.html)", ""]
        lines += [stats_md.read_text().strip(), ""]
    return lines


def plot_quality(dcp: list[dict], baselines: list[dict], key: str, ylabel: str, path: Path) -> None:
    """Plot `key` (perplexity or accuracy) against measured sparsity for DCP, dense and each baseline."""
    figure, axis = plt.subplots(figsize=(6, 4.2))
    series = defaultdict(list)
    for row in dcp:
        series["DCP (learned)"].append(row)
    for row in baselines:
        series[row["method"]].append(row)
    dense = [row for row in dcp if row["method"] == "dense"]

    for name, rows in series.items():
        points = [(row["sparsity"][0], row[key][0], row[key][1]) for row in rows if not np.isnan(row[key][0])]
        if not points:
            continue
        points.sort()
        x, y, err = zip(*points)
        axis.errorbar(x, y, yerr=err, fmt="o-" if name.startswith("DCP") else "s--", label=name, capsize=3)
    if dense and not np.isnan(dense[0][key][0]):
        axis.axhline(dense[0][key][0], color="grey", linestyle=":", label="dense")
    axis.set_xlabel("measured sparsity (fraction of context dropped)")
    axis.set_ylabel(ylabel)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_layers(rows: list[dict], path: Path) -> None:
    figure, axis = plt.subplots(figsize=(6, 4.2))
    for row in rows:
        axis.plot(range(len(row["layer_sparsity"])), row["layer_sparsity"], marker="o", label=row["label"])
    axis.set_xlabel("layer")
    axis.set_ylabel("measured sparsity")
    axis.set_title("Sparsity of each layer")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def write_plot_data(dcp: list[dict], baselines: list[dict], benchmark: dict | None, report_dir: Path) -> None:
    """Write the CSV files behind the DVC plots in dvc.yaml (the same numbers as the PNG figures)."""
    write_csv(
        report_dir / "perplexity_vs_sparsity.csv",
        ["method", "target_sparsity", "measured_sparsity", "perplexity", "zero_shot_accuracy"],
        [
            [row["method"], row["target_sparsity"], row["sparsity"][0], row["perplexity"][0], row["accuracy"][0]]
            for row in [*dcp, *baselines]
        ],
    )

    write_csv(
        report_dir / "layer_sparsity.csv",
        ["model", "target_sparsity", "layer", "sparsity"],
        [
            [row["label"], row["target_sparsity"], layer, value]
            for row in dcp
            for layer, value in enumerate(row["layer_sparsity"])
        ],
    )

    if benchmark:
        write_csv(
            report_dir / "benchmark_vs_sparsity.csv",
            ["model", "decode_sparsity", "decode_tokens_per_s", "kv_peak_mib"],
            [
                [name, model["decode_sparsity"], model["decode_tokens_per_s"], model["kv_bytes_peak"] / 2**20]
                for name, model in benchmark["models"].items()
            ],
        )


def benchmark_lines(benchmark: dict | None, report_dir: Path) -> list[str]:
    if not benchmark:
        return ["The benchmark stage has not run; `python -m src.benchmark` writes its results to docs/benchmarks.md.", ""]
    lines = ["See [docs/benchmarks.md](../docs/benchmarks.md) for the full tables and the machine.", ""]
    for picture in sorted((report_dir / "benchmark").glob("*.png")):
        lines.append(f"![{picture.stem}](benchmark/{picture.name})")
    return lines + [""]


def build_report(cfg: DictConfig) -> Path:
    report_dir = Path(cfg.out_dir)
    figures = report_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)

    evaluations = read_json_dir(Path(cfg.eval_dir))
    zero_shot = read_json_dir(Path(cfg.zero_shot_dir))
    baselines = baseline_rows(read_json_dir(Path(cfg.baselines_dir)))
    dcp = dcp_rows(evaluations, zero_shot)
    benchmark_path = Path(cfg.benchmark_path)
    benchmark = json.loads(benchmark_path.read_text()) if benchmark_path.exists() else None

    plot_quality(dcp, baselines, "perplexity", "test perplexity", figures / "perplexity_vs_sparsity.png")
    plot_quality(dcp, baselines, "accuracy", "mean zero-shot accuracy", figures / "zero_shot_vs_sparsity.png")
    plot_layers(dcp, figures / "layer_sparsity.png")
    write_plot_data(dcp, baselines, benchmark, report_dir)

    text = [
        "# DCP results",
        "",
        "Perplexity on the test split and zero-shot accuracy (mean over the local tasks) at hard drops "
        "(alpha = inf). Measured sparsity is the fraction of valid context pairs dropped. ± is the "
        "standard deviation over seeds.",
        "",
        *results_table(dcp),
        "",
        "![perplexity against sparsity](figures/perplexity_vs_sparsity.png)",
        "![zero-shot accuracy against sparsity](figures/zero_shot_vs_sparsity.png)",
        "",
        "## Sparsity per layer",
        "",
        *layer_table(dcp),
        "",
        "![sparsity per layer](figures/layer_sparsity.png)",
        "",
        "## Baselines at the same KV budget",
        "",
        "Training-free masks on the dense fine-tune, each fitted to a DCP model's measured kept fraction.",
        "",
        *(baseline_table(baselines) if baselines else ["The baselines stage has not run."]),
        "",
        "## Throughput and KV memory",
        "",
        *benchmark_lines(benchmark, report_dir),
        "## What each model drops",
        "",
        *interpret_sections(Path(cfg.interpret_dir), report_dir),
    ]
    summary = report_dir / "summary.md"
    summary.write_text("\n".join(text) + "\n")
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="report")
def main(cfg: DictConfig) -> None:
    summary = build_report(cfg)
    logger.info("wrote %s", summary)


if __name__ == "__main__":
    main()
