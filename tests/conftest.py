"""Shared fixtures: a tiny prepared corpus, a tiny base GPT-2, an MLflow store per test session.

Everything runs offline on the CPU. The tiny corpus is the built-in one with a 512-token BPE, so
the tests exercise the real preparation code.
"""

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from tests.fixtures_slurm import slurm_cluster  # noqa: F401

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = str(REPO / "conf")

TINY_MODEL = [
    "model.scratch.n_layer=2",
    "model.scratch.n_embd=32",
    "model.scratch.n_head=2",
    "model.scratch.n_positions=64",
]


def compose_config(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose conf/<config_name>.yaml with overrides, as the Hydra app would (without running it)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


@pytest.fixture(scope="module")
def single_thread():
    """Run a module on one thread: its ops are tiny, and OpenMP threads on a loaded machine make them 50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory) -> str:
    """Point every test at its own sqlite MLflow store, never the project's mlflow.db."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """The built-in corpus prepared with a 512-token BPE."""
    from src.prepare import prepare

    out_dir = tmp_path_factory.mktemp("data") / "shakespeare"
    data_cfg = compose_config("prepare", ["data.vocab_size=512"]).data
    prepare(data_cfg, out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_base(tiny_data, tmp_path_factory) -> Path:
    """A 2-layer, d=32 GPT-2 trained for 60 steps on the tiny corpus, saved as a dense checkpoint."""
    from src.base import train_from_scratch

    out_dir = tmp_path_factory.mktemp("base")
    cfg = compose_config(
        "base",
        [*TINY_MODEL, f"data_dir={tiny_data}", f"out_dir={out_dir}", "steps=60", "batch_size=8", "optim.lr=3e-3"],
    )
    train_from_scratch(cfg)
    return out_dir
