"""Provide the dense base model at models/base: `python -m src.base`.

With the built-in default (model=builtin) a small GPT-2 is trained from scratch on the prepared
corpus, because no pretrained weights can be downloaded offline. With model=gpt2 (or any Hugging Face
id or local path, model.scratch=null) that checkpoint is copied to the output directory instead.
"""

import logging
import math
import shutil
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from src.dcp import DCPGPT2LMHeadModel
from src.training.loading import load_causal_lm, load_tokenizer, read_stats
from src.training.run import run_training

logger = logging.getLogger(__name__)


def scratch_model(cfg: DictConfig, vocab_size: int, eos_token_id: int) -> DCPGPT2LMHeadModel:
    """A randomly initialised dense GPT-2 of the configured shape (a DCP model with pruning off)."""
    shape = cfg.model.scratch
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=shape.n_positions,
        n_embd=shape.n_embd,
        n_layer=shape.n_layer,
        n_head=shape.n_head,
        resid_pdrop=shape.dropout,
        embd_pdrop=shape.dropout,
        attn_pdrop=shape.dropout,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
    )
    return DCPGPT2LMHeadModel.from_dense(GPT2LMHeadModel(config), dcp_enabled=False)


def save_dense(model: DCPGPT2LMHeadModel, out_dir: Path) -> None:
    """Save the weights as a plain GPT2LMHeadModel, the format every GPT-2 tool reads."""
    config_dict = model.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version") + tuple(k for k in config_dict if k.startswith("dcp_")):
        config_dict.pop(key, None)
    dense = GPT2LMHeadModel(GPT2Config(**config_dict))
    dense.load_state_dict(model.state_dict(), strict=False)
    dense.save_pretrained(out_dir)


def train_from_scratch(cfg: DictConfig) -> dict:
    """Train the configured GPT-2 from scratch and save it, dense, with the tokenizer in cfg.out_dir."""
    out_dir = Path(cfg.out_dir)
    data_dir = Path(cfg.data_dir)
    stats = read_stats(data_dir)
    tokenizer = load_tokenizer(data_dir)
    # Seed before the random initialisation, so that the same seed gives the same model.
    L.seed_everything(cfg.seed, workers=True)
    model = scratch_model(cfg, stats["vocab_size"], tokenizer.eos_token_id)
    parameters = sum(p.numel() for p in model.parameters())
    logger.info("training a %.2fM-parameter GPT-2 from scratch for %d steps", parameters / 1e6, cfg.steps)

    metrics = run_training(cfg, model)
    save_dense(model, out_dir)
    tokenizer.save_pretrained(out_dir)
    # The run's own copy in out_dir/model is a DCP-format duplicate of the same weights.
    shutil.rmtree(out_dir / "model")
    logger.info("saved the dense base model to %s", out_dir)
    logger.info("base model: validation perplexity %.2f", math.exp(metrics.get("val/loss", float("nan"))))
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="base")
def main(cfg: DictConfig) -> None:
    if cfg.model.get("scratch") is None:
        model = load_causal_lm(cfg.model.name_or_path)
        model.save_pretrained(cfg.out_dir)
        AutoTokenizer.from_pretrained(cfg.model.name_or_path).save_pretrained(cfg.out_dir)
        logger.info("copied %s to %s", cfg.model.name_or_path, cfg.out_dir)
        return
    train_from_scratch(cfg)


if __name__ == "__main__":
    main()
