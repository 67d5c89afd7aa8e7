"""The whole DVC pipeline in a temporary copy of the repository, with a tiny params.yaml."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
PIPELINE_OUTPUTS = ("data/", "models/", "metrics/", "reports/", "outputs/", "multirun/", "mlflow.db")

TINY_PARAMS = {
    "data": {"name": "shakespeare", "vocab_size": 512},
    "model": {"name": "builtin"},
    "base": {"steps": 20, "batch_size": 4},
    "finetune": {"sparsities": [0.0, 0.5], "steps": 8, "batch_size": 4, "block_size": 64},
    "seeds": [0],
    "evaluate": {"window": 64, "max_windows": 8},
    "zero_shot": {"limit": 5},
    "baselines": {"zero_shot": True, "zero_shot_limit": 3},
    "benchmark": {"seed": 0, "batch_sizes": "[1,2]", "prompt_lengths": "[16]", "new_tokens": "[4]", "training_cost": False},
}
TINY_SHAPE = {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64, "dropout": 0.0}


def copy_repository(destination: Path) -> None:
    """Copy the files git tracks or would track (not pipeline outputs) and commit them in a new repo."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, check=True, capture_output=True, text=True,
    ).stdout.splitlines()
    for name in listed:
        if name.startswith(PIPELINE_OUTPUTS) or not (REPO / name).is_file():
            continue
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)

    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    subprocess.run(["git", "init", "-q"], cwd=destination, check=True)
    subprocess.run([*git, "add", "-A"], cwd=destination, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "copy"], cwd=destination, check=True)


def shrink(repo: Path) -> None:
    (repo / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    model_config = repo / "conf" / "model" / "builtin.yaml"
    config = yaml.safe_load(model_config.read_text())
    config["scratch"] = TINY_SHAPE
    model_config.write_text(yaml.safe_dump(config))


def dvc(repo: Path, env: dict, *args: str) -> str:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), *args], cwd=repo, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr


@pytest.mark.slow
def test_dvc_repro_end_to_end(tmp_path):
    repo = tmp_path / "repo"
    copy_repository(repo)
    shrink(repo)

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": tracking_uri,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }

    first = dvc(repo, env, "repro")
    assert "Running stage 'finetune@0.5-0'" in first

    for name in ("sparsity-0.0-seed0", "sparsity-0.5-seed0"):
        metrics = json.loads((repo / "metrics" / "eval" / f"{name}.json").read_text())
        assert metrics["perplexity"] > 1.0
        assert 0.0 <= metrics["sparsity"] < 1.0
        assert len(metrics["layer_sparsity"]) == TINY_SHAPE["n_layer"]
    dense = json.loads((repo / "metrics" / "eval" / "sparsity-0.0-seed0.json").read_text())
    assert dense["sparsity"] == 0.0

    listed = dvc(repo, env, "metrics", "show")
    assert "sparsity-0.5-seed0.json" in listed

    dvc(repo, env, "plots", "show", "-o", "plots_html")
    plots_html = (repo / "plots_html" / "index.html").read_text()
    for field in ("perplexity", "zero_shot_accuracy", "decode_tokens_per_s", "kv_peak_mib"):
        assert f'"field": "{field}"' in plots_html, field

    for name in (
        "summary.md",
        "perplexity_vs_sparsity.csv",
        "layer_sparsity.csv",
        "benchmark_vs_sparsity.csv",
        "figures/perplexity_vs_sparsity.png",
        "figures/zero_shot_vs_sparsity.png",
        "figures/layer_sparsity.png",
        "interpret/sparsity-0.5-seed0/keep_masks.png",
        "interpret/sparsity-0.5-seed0/token_view.html",
    ):
        assert (repo / "reports" / name).stat().st_size > 0, name
    summary = (repo / "reports" / "summary.md").read_text()
    assert "| dense | 0 |" in summary
    assert "| h2o | 0.5 |" in summary

    benchmark = json.loads((repo / "metrics" / "benchmark.json").read_text())
    assert benchmark, "the benchmark metrics are empty"
    assert any((repo / "reports" / "benchmark").glob("*.png"))

    zero_shot = json.loads((repo / "metrics" / "zero_shot" / "sparsity-0.5-seed0.json").read_text())
    for task in zero_shot["tasks"].values():
        assert 0.0 <= task["acc"] <= 1.0
    baselines = sorted(path.stem for path in (repo / "metrics" / "baselines").glob("*.json"))
    assert baselines == [f"{name}-0.5-seed0" for name in ("h2o", "local", "streaming_llm", "strided")]

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("dcp")
    runs = client.search_runs([experiment.experiment_id])
    names = sorted(run.info.run_name for run in runs)
    assert names == ["base", "sparsity-0.0-seed0", "sparsity-0.5-seed0"]
    finetuned = next(run for run in runs if run.info.run_name == "sparsity-0.5-seed0")
    assert "eval/test_perplexity" in finetuned.data.metrics
    assert "train/alpha" in finetuned.data.metrics
    assert finetuned.data.params["sparsity"] == "0.5"

    second = dvc(repo, env, "repro")
    assert "Running stage" not in second, second
