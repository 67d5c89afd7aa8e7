"""Summarise the evaluated models: `python -m src.report`.

Reads every metrics JSON of the evaluate stage and writes `reports/summary.md` (a table of target
sparsity, measured sparsity and perplexity, with the spread over seeds), a CSV for `dvc plots`, and
PNG plots of perplexity against measured sparsity and of the sparsity of each layer. The PNGs are
rendered here with matplotlib because DVC's HTML plots load their renderer from a CDN.
"""

import csv
import json
import logging
from collections import defaultdict
from pathlib import Path

import hydra
import matplotlib
import numpy as np
from omegaconf import DictConfig

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

logger = logging.getLogger(__name__)


def load_eval_metrics(metrics_dir: Path) -> list[dict]:
    """Return one record per metrics file, with its `name` (the file stem)."""
    records = []
    for path in sorted(Path(metrics_dir).glob("*.json")):
        record = json.loads(path.read_text())
        record["name"] = path.stem
        records.append(record)
    if not records:
        raise FileNotFoundError(f"no evaluation metrics in {metrics_dir}; run `dvc repro evaluate` first")
    return records


def group_by_target(records: list[dict]) -> list[dict]:
    """Aggregate seeds of the same target sparsity: mean, standard deviation and count."""
    groups = defaultdict(list)
    for record in records:
        groups[float(record.get("target_sparsity") or 0.0)].append(record)

    rows = []
    for target in sorted(groups):
        members = groups[target]
        perplexity = np.array([member["perplexity"] for member in members])
        sparsity = np.array([member["sparsity"] for member in members])
        layers = np.array([member["layer_sparsity"] for member in members])
        rows.append(
            {
                "model": "dense" if target == 0.0 else f"DCP {target:g}",
                "target_sparsity": target,
                "measured_sparsity": float(sparsity.mean()),
                "measured_sparsity_std": float(sparsity.std()),
                "perplexity": float(perplexity.mean()),
                "perplexity_std": float(perplexity.std()),
                "seeds": len(members),
                "layer_sparsity": layers.mean(axis=0).tolist(),
            }
        )
    return rows


def write_table(rows: list[dict], path: Path) -> None:
    lines = [
        "| model | target sparsity | measured sparsity | perplexity | seeds |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        spread = row["seeds"] > 1
        sparsity = f"{row['measured_sparsity']:.3f}" + (f" ± {row['measured_sparsity_std']:.3f}" if spread else "")
        perplexity = f"{row['perplexity']:.2f}" + (f" ± {row['perplexity_std']:.2f}" if spread else "")
        lines.append(f"| {row['model']} | {row['target_sparsity']:g} | {sparsity} | {perplexity} | {row['seeds']} |")

    layer_lines = ["", "Measured sparsity per layer (mean over seeds):", "", "| model | " + " | ".join(
        f"layer {index}" for index in range(len(rows[0]["layer_sparsity"]))
    ) + " |", "|---|" + "---|" * len(rows[0]["layer_sparsity"])]
    for row in rows:
        layer_lines.append(f"| {row['model']} | " + " | ".join(f"{value:.3f}" for value in row["layer_sparsity"]) + " |")

    text = ["# DCP results", "", "Perplexity on the test split at hard drops (alpha = inf); ± is the standard "
            "deviation over seeds.", "", *lines, *layer_lines, ""]
    path.write_text("\n".join(text))


def write_csv(records: list[dict], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "target_sparsity", "measured_sparsity", "perplexity"])
        for record in records:
            writer.writerow([record["name"], record.get("target_sparsity") or 0.0, record["sparsity"], record["perplexity"]])


def plot_perplexity(records: list[dict], rows: list[dict], path: Path) -> None:
    figure, axis = plt.subplots(figsize=(5.5, 4))
    axis.scatter([r["sparsity"] for r in records], [r["perplexity"] for r in records], alpha=0.4, label="runs")
    axis.errorbar(
        [row["measured_sparsity"] for row in rows],
        [row["perplexity"] for row in rows],
        xerr=[row["measured_sparsity_std"] for row in rows],
        yerr=[row["perplexity_std"] for row in rows],
        fmt="o-",
        label="mean over seeds",
    )
    for row in rows:
        axis.annotate(row["model"], (row["measured_sparsity"], row["perplexity"]), textcoords="offset points", xytext=(4, 4))
    axis.set_xlabel("measured sparsity (fraction of context dropped)")
    axis.set_ylabel("test perplexity")
    axis.set_title("Perplexity against measured sparsity")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_layers(rows: list[dict], path: Path) -> None:
    figure, axis = plt.subplots(figsize=(5.5, 4))
    for row in rows:
        axis.plot(range(len(row["layer_sparsity"])), row["layer_sparsity"], marker="o", label=row["model"])
    axis.set_xlabel("layer")
    axis.set_ylabel("measured sparsity")
    axis.set_title("Sparsity of each layer")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


@hydra.main(version_base="1.3", config_path="../conf", config_name="report")
def main(cfg: DictConfig) -> None:
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = load_eval_metrics(Path(cfg.eval_dir))
    rows = group_by_target(records)

    write_table(rows, out_dir / "summary.md")
    write_csv(records, out_dir / "perplexity_vs_sparsity.csv")
    plot_perplexity(records, rows, out_dir / "perplexity_vs_sparsity.png")
    plot_layers(rows, out_dir / "layer_sparsity.png")
    logger.info("wrote the report of %d runs to %s", len(records), out_dir)


if __name__ == "__main__":
    main()
