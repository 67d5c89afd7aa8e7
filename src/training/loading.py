"""Load models and prepared data for the stages, with errors that name the value and the fix."""

import json
import logging
import os
from pathlib import Path

import numpy as np
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

from src.dcp import DCPGPT2LMHeadModel

logger = logging.getLogger(__name__)

PREPARED_HINT = "run `python -m src.prepare` (or `dvc repro prepare`) first"


def _looks_local(name_or_path: str) -> bool:
    """Hugging Face ids have at most one slash; paths start with . / ~, or name our models/ folder."""
    return name_or_path.startswith((".", "/", "~", "models/")) or name_or_path.count("/") > 1


_SAVED_MODELS = (
    "pass a saved model directory, such as models/base (written by `python -m src.base`) or "
    "models/finetuned/<run>/model (written by `python -m src.train`), or a Hugging Face id such as gpt2"
)


def load_causal_lm(name_or_path: str) -> GPT2LMHeadModel:
    """Load a GPT-2 (dense or DCP) from a local directory or a Hugging Face model id.

    Raises FileNotFoundError for a missing local path and ValueError for an unknown model id or a
    model that is not GPT-2.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model directory {path} has no config.json; {_SAVED_MODELS}")
    elif _looks_local(name_or_path):
        raise FileNotFoundError(f"model path {name_or_path!r} does not exist; {_SAVED_MODELS}")

    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except OSError as error:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = "HF_HUB_OFFLINE=1 is set, so only cached models load" if offline else "check the model id"
        raise ValueError(f"cannot load model {name_or_path!r}: {hint}. Original error: {error}") from error

    if config.model_type not in ("gpt2", "dcp_gpt2"):
        raise ValueError(f"model {name_or_path!r} is a {config.model_type!r} model; only GPT-2 models are supported")
    return AutoModelForCausalLM.from_pretrained(name_or_path)


def to_dcp(model: GPT2LMHeadModel, enabled: bool, rank: int, beta_init: float, add_previous_mask: bool) -> DCPGPT2LMHeadModel:
    """Return a DCP model: converted from a dense GPT-2, or the DCP model itself if it prunes already."""
    if isinstance(model, DCPGPT2LMHeadModel) and model.config.dcp_enabled:
        if not enabled:
            raise ValueError(
                "the initial model already prunes context (dcp_enabled=True) but this run asks for the dense "
                "baseline; start the dense baseline from a dense model"
            )
        return model
    return DCPGPT2LMHeadModel.from_dense(
        model, dcp_enabled=enabled, dcp_rank=rank, dcp_beta_init=beta_init, dcp_add_previous_mask=add_previous_mask
    )


def read_stats(data_dir: Path) -> dict:
    """Return the prepared data's stats.json, or raise FileNotFoundError with the command to create it."""
    stats_path = Path(data_dir) / "stats.json"
    if not stats_path.exists():
        raise FileNotFoundError(f"prepared data not found: {stats_path} is missing; {PREPARED_HINT}")
    return json.loads(stats_path.read_text())


def load_split(data_dir: Path, split: str) -> np.ndarray:
    """Memory-map the token ids of one split of the prepared data."""
    stats = read_stats(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    if not path.exists():
        raise FileNotFoundError(f"prepared split not found: {path}; {PREPARED_HINT}")
    return np.memmap(path, dtype=np.dtype(stats["dtype"]), mode="r")


def load_tokenizer(data_dir: Path):
    """Load the tokenizer saved with the prepared data."""
    path = Path(data_dir) / "tokenizer"
    if not path.exists():
        raise FileNotFoundError(f"tokenizer not found: {path}; {PREPARED_HINT}")
    return AutoTokenizer.from_pretrained(path)


def load_for_inference(name_or_path: str) -> DCPGPT2LMHeadModel:
    """Load any GPT-2 as a DCPGPT2LMHeadModel in eval mode (dense checkpoints get dcp_enabled=False)."""
    model = load_causal_lm(name_or_path)
    if not isinstance(model, DCPGPT2LMHeadModel):
        model = DCPGPT2LMHeadModel.from_dense(model, dcp_enabled=False)

    # A baseline fine-tuned with a fixed-pattern mask stores that mask's settings in its config.
    settings = getattr(model.config, "dcp_keep_policy", None)
    if settings:
        from src.eval.baselines import apply_keep_policy, policy_from_config

        apply_keep_policy(model, policy_from_config(settings, default_length=model.config.n_positions))
    return model.eval()
