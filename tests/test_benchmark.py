"""Tests of the benchmark stage and its pieces, on tiny random models."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from src import tracking
from src.bench import synthetic
from src.bench.contiguous import ContiguousKVCache, contiguous_decode_step
from src.bench.decode import CONTIGUOUS, PAGED, measure_case, model_runner
from src.bench.pipeline import benchmark_pipeline
from src.dcp import DCPGPT2Config, DCPGPT2LMHeadModel, decode_step, prefill

REPO = Path(__file__).resolve().parents[1]
TINY_SHAPE = "{n_layer:2,n_embd:32,n_head:2,n_positions:64,vocab_size:100,dcp_rank:8}"


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_model(dcp_enabled: bool) -> DCPGPT2LMHeadModel:
    """A 2-layer model; the DCP variant gets interaction weights that drop a good share of the context."""
    torch.manual_seed(0)
    config = DCPGPT2Config(
        n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=100, dcp_enabled=dcp_enabled, dcp_rank=8, bos_token_id=None, eos_token_id=None
    )
    model = DCPGPT2LMHeadModel(config).eval()
    if dcp_enabled:
        with torch.no_grad():
            for layer in model.dcp_layers:
                layer.q_int.weight.normal_(0.0, 0.5)
                layer.k_int.weight.normal_(0.0, 0.5)
                layer.beta.fill_(1.0)
    return model


def test_synthetic_model_keeps_the_wired_tokens():
    wired = synthetic.build_synthetic_model(3, 48, 4, 128, 300, 8, keep_fraction=0.4, layer_spread=0.5, seed=1)
    generator = torch.Generator().manual_seed(0)
    row_factors = synthetic.row_keep_factors(4, 0.5, generator)
    tokens = synthetic.sample_tokens(wired, row_factors, 90, generator)

    logits, cache = prefill(wired.model, tokens[:, :80])
    for step in range(80, 90):
        logits = decode_step(wired.model, cache, tokens[:, step])

    expected = synthetic.expected_keep(wired, tokens)
    expected[:, :, -1] = True  # the last fed token has not been scored yet
    for layer, layer_cache in enumerate(cache.layers):
        assert torch.equal(layer_cache.alive_by_position(90), expected[layer]), f"layer {layer}"

    # Rows keep different shares, so the spread is real.
    live = cache.live_counts().double()
    assert float(live.max() - live.min()) > 10


def test_synthetic_fill_equals_real_prefill():
    wired = synthetic.build_synthetic_model(2, 32, 2, 64, 200, 8, keep_fraction=0.5, seed=2)
    generator = torch.Generator().manual_seed(1)
    tokens = synthetic.sample_tokens(wired, synthetic.row_keep_factors(3, 0.5, generator), 40, generator)
    _, cache = prefill(wired.model, tokens)
    wired_keep = synthetic.expected_keep(wired, tokens)
    for layer, (_, _, k_int, keep) in enumerate(synthetic.synthetic_cache_inputs(wired, tokens, torch.float32, generator)):
        assert torch.equal(cache.layers[layer].alive_by_position(40), keep), f"layer {layer}"
        # The next query drops exactly the tokens whose k_int points against it (the last one included).
        assert torch.equal(k_int[:, :, 0] > 0, wired_keep[layer]), f"layer {layer}"


def test_keep_fractions_validated():
    with pytest.raises(ValueError, match="keep_fraction"):
        synthetic.layer_keep_fractions(0.0, 4, 0.5)
    with pytest.raises(ValueError, match="flag dimension"):
        synthetic.build_synthetic_model(12, 8, 2, 64, 100, 4, keep_fraction=0.5)


def test_contiguous_baseline_matches_paged_dense():
    model = tiny_model(dcp_enabled=False)
    prompts = torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(3))
    paged_logits, paged = prefill(model, prompts)
    contiguous_logits, contiguous = prefill(model, prompts, cache=ContiguousKVCache(model, 3, 20, torch.float32, "cpu"))
    assert torch.allclose(paged_logits, contiguous_logits, atol=1e-5)
    for _ in range(8):
        tokens = paged_logits.argmax(dim=-1)
        paged_logits = decode_step(model, paged, tokens)
        contiguous_logits = contiguous_decode_step(model, contiguous, tokens)
        assert torch.allclose(paged_logits, contiguous_logits, atol=1e-4)


def test_measure_case_reports_sparsity_and_bytes():
    prompts = torch.randint(0, 100, (4, 20), generator=torch.Generator().manual_seed(4))
    device = torch.device("cpu")
    dense = measure_case(model_runner(tiny_model(False), prompts, 6, PAGED, 16), 4, 6, device, warmup=0, repeats=2)
    contiguous = measure_case(model_runner(tiny_model(False), prompts, 6, CONTIGUOUS, 16), 4, 6, device, warmup=0, repeats=2)
    pruned = measure_case(model_runner(tiny_model(True), prompts, 6, PAGED, 16), 4, 6, device, warmup=1, repeats=2)

    assert dense["decode_sparsity"] == 0.0
    assert contiguous["decode_sparsity"] == 0.0
    assert dense["mean_live"] == 26.0
    assert 0.2 < pruned["decode_sparsity"] < 1.0
    assert pruned["mean_live"] < dense["mean_live"]
    assert pruned["padded_length"] >= pruned["mean_live"]
    assert len(pruned["live_mean_per_layer"]) == 2
    assert len(pruned["live_mean_per_layer"][0]) == 7  # after prefill and after each of 6 steps
    for case in (dense, contiguous, pruned):
        assert case["kv_bytes_peak"] > 0
        assert case["decode_tokens_per_s"]["median"] > 0
        assert len(case["decode_tokens_per_s"]["values"]) == 2
        assert case["prefill_s"]["min"] > 0


def test_pipeline_rejects_missing_model_dir(tmp_path):
    missing = tmp_path / "no-model"
    cfg = OmegaConf.create({"pipeline": {"models": [{"name": "dense", "dir": str(missing)}]}})
    with pytest.raises(FileNotFoundError, match="no-model not found"):
        benchmark_pipeline(cfg, torch.device("cpu"), torch.float32)


@pytest.mark.slow
def test_stage_writes_metrics_plots_and_mlflow(tmp_path, mlflow_store):
    models = {"dense": tiny_model(False), "dcp": tiny_model(True)}
    for name, model in models.items():
        model.save_pretrained(tmp_path / name / "model")

    # Only the DCP model has a training run; the dense one is skipped with a log line.
    mlflow.set_tracking_uri(mlflow_store)
    mlflow.set_experiment("benchmark-test")
    with mlflow.start_run() as run:
        run_id = run.info.run_id
        tracking.write_run_file(tmp_path / "dcp", run_id, run.info.experiment_id)

    out = tmp_path / "out"
    overrides = [
        "threads=1",
        "warmup=0",
        "repeats=2",
        f"prompts.data_dir={tmp_path / 'no-data'}",
        f"pipeline.models=[{{name:dense,dir:{tmp_path / 'dense' / 'model'}}},{{name:dcp,dir:{tmp_path / 'dcp' / 'model'}}}]",
        "pipeline.batch_sizes=[1,3]",
        "pipeline.prompt_lengths=[12]",
        "pipeline.new_tokens=[5]",
        "paper_scale.enabled=true",
        f"paper_scale.shape={TINY_SHAPE}",
        "paper_scale.keep_fractions=[0.3]",
        "paper_scale.batch_sizes=[2]",
        "paper_scale.prompt_length=30",
        "paper_scale.new_tokens=3",
        "paper_scale.repeats=1",
        "paper_scale.warmup=0",
        f"training_cost.builtin.shape={TINY_SHAPE}",
        "training_cost.builtin.seq_len=16",
        "training_cost.builtin.batch_size=1",
        "training_cost.builtin.repeats=1",
        "training_cost.gpt2_small.seq_len=16",
        "training_cost.gpt2_small.repeats=1",
        "training_cost.builtin.warmup=0",
        f"out.metrics_file={out / 'metrics.json'}",
        f"out.report_dir={out / 'report'}",
        f"out.paper_scale_dir={out / 'paper'}",
        f"hydra.run.dir={out / 'hydra'}",
    ]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run([sys.executable, "-m", "src.benchmark", *overrides], cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "model dense has no run.json" in (out / "hydra" / "benchmark.log").read_text()

    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["models"]) == {"dense", "dense_contiguous", "dcp"}
    assert metrics["models"]["dense"]["speedup_vs_dense"] == 1.0
    assert metrics["models"]["dense"]["decode_sparsity"] == 0.0
    assert 0.2 < metrics["models"]["dcp"]["decode_sparsity"] < 1.0
    assert metrics["models"]["dcp"]["decode_tokens_per_s"] > 0
    assert set(metrics["training_cost"]) == {"builtin", "gpt2_small"}

    results = json.loads((out / "report" / "results.json").read_text())
    assert len(results["cases"]) == 2 * 3  # dense paged and contiguous, dcp paged; two batch sizes
    assert results["machine"]["device"] == "cpu"
    assert (out / "report" / "model_dcp.json").exists()
    for name in ("throughput_kv_vs_batch.png", "throughput_kv_vs_sparsity.png", "live_tokens_dcp.png"):
        assert (out / "report" / name).stat().st_size > 1000, name
    assert "| dcp | paged | 3 | 12 | 5 |" in (out / "report" / "table.md").read_text()

    paper = json.loads((out / "paper" / "results.json").read_text())
    assert {case["model"] for case in paper["cases"]} == {"dense", "keep-0.3"}
    assert len(paper["prefill"]) == 2
    assert (out / "paper" / "live_tokens_keep-0.3.png").exists()

    logged = MlflowClient(tracking_uri=mlflow_store).get_run(run_id).data.metrics
    assert logged["bench/decode_tokens_per_s"] > 0
    assert "bench/paged_b3_p12_n5_kv_bytes_peak" in logged
