"""Fine-tuning: schedules, the sparsity controller, short real runs, resume and bad input."""

import numpy as np
import pytest
import torch

from src.train import build_model
from src.training.loading import load_causal_lm, load_for_inference, load_split
from src.training.run import run_training
from src.training.schedules import SparsityController, cosine_alpha
from src.training.validation import ConfigError
from src import tracking
from tests.conftest import compose_config


def finetune_config(tiny_data, tiny_base, out_dir, *overrides):
    return compose_config(
        "train",
        [
            f"data_dir={tiny_data}",
            f"init_from={tiny_base}",
            f"out_dir={out_dir}",
            "block_size=64",
            "batch_size=8",
            "pruning.rank=16",
            *overrides,
        ],
    )


def finetune(cfg):
    return run_training(cfg, build_model(cfg))


def measured_sparsity(model_dir, data_dir) -> float:
    """Hard-mask sparsity of a saved model on the first 8 validation blocks of 64 tokens."""
    model = load_for_inference(str(model_dir))
    tokens = torch.as_tensor(np.asarray(load_split(data_dir, "val")[: 64 * 8], dtype=np.int64)).view(8, 64)
    with torch.no_grad():
        return 1.0 - float(model(tokens).keep_fraction)


def test_cosine_alpha_endpoints():
    assert cosine_alpha(0, 100, 1.0, 8.0) == pytest.approx(1.0)
    assert cosine_alpha(50, 100, 1.0, 8.0) == pytest.approx(4.5)
    assert cosine_alpha(100, 100, 1.0, 8.0) == 8.0
    assert cosine_alpha(500, 100, 1.0, 8.0) == 8.0


def test_cosine_alpha_monotone():
    values = [cosine_alpha(step, 50) for step in range(60)]
    assert all(later >= earlier for earlier, later in zip(values, values[1:]))


def test_controller_raises_weight_when_too_little_dropped():
    controller = SparsityController(target_sparsity=0.8, ema=0.0)
    for _ in range(10):
        controller.update(keep_fraction=0.9)  # sparsity 0.1 < 0.8
    assert controller.weight > 0


def test_controller_goes_negative_when_too_much_dropped():
    controller = SparsityController(target_sparsity=0.2, ema=0.0)
    for _ in range(10):
        controller.update(keep_fraction=0.3)  # sparsity 0.7 > 0.2
    assert controller.weight < 0


def test_controller_fixed_mode_keeps_gamma():
    controller = SparsityController(target_sparsity=0.5, mode="fixed", gamma=0.3)
    controller.update(0.9)
    assert controller.weight == 0.3


def test_controller_state_round_trip():
    controller = SparsityController(target_sparsity=0.5)
    for keep in (0.9, 0.7, 0.6):
        controller.update(keep)
    restored = SparsityController(target_sparsity=0.5)
    restored.load_state_dict(controller.state_dict())
    assert restored.weight == controller.weight


@pytest.mark.parametrize("target", [-0.1, 1.0, 1.5])
def test_controller_rejects_target_outside_range(target):
    with pytest.raises(ValueError, match="target sparsity must be in"):
        SparsityController(target_sparsity=target)


@pytest.mark.slow
def test_higher_target_drops_more(tiny_data, tiny_base, tmp_path):
    measured = {}
    for target in (0.2, 0.8):
        cfg = finetune_config(tiny_data, tiny_base, tmp_path / f"t{target}", f"sparsity={target}", "steps=40")
        finetune(cfg)
        measured[target] = measured_sparsity(tmp_path / f"t{target}" / "model", tiny_data)
    assert measured[0.8] > measured[0.2] + 0.2, measured
    assert abs(measured[0.8] - 0.8) < 0.15, measured


@pytest.mark.slow
def test_dense_baseline_keeps_everything(tiny_data, tiny_base, tmp_path):
    cfg = finetune_config(tiny_data, tiny_base, tmp_path / "dense", "sparsity=0", "steps=3")
    metrics = finetune(cfg)
    assert metrics["val/sparsity"] == 0.0
    model = load_for_inference(str(tmp_path / "dense" / "model"))
    assert model.config.dcp_enabled is False


@pytest.mark.slow
def test_resume_continues_steps_and_mlflow_run(tiny_data, tiny_base, tmp_path):
    out_dir = tmp_path / "resume"
    first = finetune_config(tiny_data, tiny_base, out_dir, "sparsity=0.5", "steps=4", "checkpoint_every=2")
    finetune(first)
    run_id = tracking.read_run_file(out_dir)["run_id"]

    second = finetune_config(tiny_data, tiny_base, out_dir, "sparsity=0.5", "steps=7", "checkpoint_every=2")
    metrics = finetune(second)
    assert metrics["global_step"] == 7
    assert tracking.read_run_file(out_dir)["run_id"] == run_id

    checkpoint = torch.load(out_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 7
    assert sorted(path.name for path in (out_dir / "checkpoints").iterdir()) == ["last.ckpt"]
    assert "sparsity_controller" in checkpoint


def test_sparsity_outside_range_fails_before_training(tiny_data, tiny_base, tmp_path):
    cfg = finetune_config(tiny_data, tiny_base, tmp_path / "bad", "sparsity=1.0")
    with pytest.raises(ConfigError, match="sparsity=1.0 is outside"):
        finetune(cfg)


def test_missing_model_path_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m src.base"):
        load_causal_lm(str(tmp_path / "models" / "nothing"))


def test_unknown_hub_model_names_offline_mode():
    with pytest.raises(ValueError, match="cannot load model 'no-such-org/no-such-model'"):
        load_causal_lm("no-such-org/no-such-model")


def test_missing_data_names_the_command(tiny_base, tmp_path):
    cfg = finetune_config(tmp_path / "no-data", tiny_base, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="python -m src.prepare"):
        finetune(cfg)


def test_block_longer_than_context_is_rejected(tiny_data, tiny_base, tmp_path):
    cfg = finetune_config(tiny_data, tiny_base, tmp_path / "out", "block_size=128")
    with pytest.raises(ConfigError, match="exceeds the model's context"):
        finetune(cfg)


def test_corpus_shorter_than_a_block_is_rejected(tiny_data, tiny_base, tmp_path):
    import shutil

    import numpy as np

    short = tmp_path / "short"
    shutil.copytree(tiny_data, short)
    np.arange(10, dtype=np.uint16).tofile(short / "val.bin")
    cfg = finetune_config(short, tiny_base, tmp_path / "out")
    with pytest.raises(ConfigError, match="fewer than one block"):
        finetune(cfg)


@pytest.mark.slow
def test_fixed_pattern_baseline_fine_tunes(tiny_data, tiny_base, tmp_path):
    cfg = finetune_config(
        tiny_data, tiny_base, tmp_path / "out", "pruning=fixed_pattern", "pruning.baseline=local", "sparsity=0.5", "steps=3"
    )
    default = compose_config("train", ["pruning=fixed_pattern", "pruning.baseline=local", "sparsity=0.5"])
    assert default.out_dir == "models/finetuned/local-sparsity-0.5-seed0"
    metrics = finetune(cfg)
    assert abs(metrics["train/sparsity"] - 0.5) < 0.05

    model = load_for_inference(str(tmp_path / "out" / "model"))
    assert model.config.dcp_keep_policy["name"] == "local"
    assert abs(measured_sparsity(tmp_path / "out" / "model", tiny_data) - 0.5) < 0.05


def test_same_seed_builds_same_model(tiny_data, tiny_base, tmp_path):
    cfg = finetune_config(tiny_data, tiny_base, tmp_path / "run", "sparsity=0.5", "seed=3")
    first = build_model(cfg)
    torch.rand(100)  # the global random state moves on between the two builds
    second = build_model(cfg)

    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name


def test_same_seed_trains_same_base(tiny_data, tmp_path):
    from src.base import train_from_scratch
    from tests.conftest import TINY_MODEL

    weights = []
    for run in ("a", "b"):
        cfg = compose_config(
            "base", [*TINY_MODEL, f"data_dir={tiny_data}", f"out_dir={tmp_path / run}", "steps=3", "batch_size=4", "seed=5"]
        )
        train_from_scratch(cfg)
        weights.append(load_causal_lm(str(tmp_path / run)).state_dict())
        torch.rand(100)

    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name


def test_logging_to_missing_run_warns(tmp_path, caplog):
    model_dir = tmp_path / "model"
    tracking.write_run_file(model_dir, "0123456789abcdef0123456789abcdef", "1")

    with caplog.at_level("WARNING"):
        logged = tracking.log_to_training_run(model_dir, {"eval/test_perplexity": 10.0})

    assert logged is None
    assert "0123456789abcdef0123456789abcdef" in caplog.text
    assert "MLFLOW_TRACKING_URI" in caplog.text


def test_short_run_writes_one_last_checkpoint(tiny_data, tiny_base, tmp_path):
    cfg = finetune_config(tiny_data, tiny_base, tmp_path / "run", "sparsity=0.5", "steps=3", "checkpoint_every=50")
    finetune(cfg)

    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(path.name for path in checkpoints.iterdir()) == ["last.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 3
