"""Fixed-pattern baselines at the KV budget of each DCP model: `python -m src.baselines`.

Each DCP evaluation in `eval_dir` (files `sparsity-<target>-seed<seed>.json`) sets a budget: the
DCP model's measured kept fraction. The dense model fine-tuned with the same recipe and seed then runs
with each baseline mask (sliding window, StreamingLLM, H2O, strided) fitted to that budget, through
the same perplexity code and optionally the same zero-shot tasks. These baselines are training-free.
"""

import json
import logging
import re
from pathlib import Path

import hydra
from omegaconf import DictConfig

from src import tracking
from src.eval.baselines import apply_keep_policy, describe_policy, make_keep_policy
from src.evaluation import evaluate_tokens
from src.training.loading import load_for_inference, load_split, load_tokenizer

logger = logging.getLogger(__name__)

EVAL_NAME = re.compile(r"sparsity-(?P<target>[0-9.]+)-seed(?P<seed>\d+)")


def budgets(eval_dir: Path) -> list[dict]:
    """Return the measured kept fraction of every DCP model evaluated in `eval_dir`."""
    found = []
    for path in sorted(Path(eval_dir).glob("*.json")):
        match = EVAL_NAME.fullmatch(path.stem)
        if match is None or float(match["target"]) == 0.0:
            continue
        metrics = json.loads(path.read_text())
        found.append(
            {
                "target_sparsity": float(match["target"]),
                "seed": int(match["seed"]),
                "dcp_sparsity": metrics["sparsity"],
                "dcp_perplexity": metrics["perplexity"],
            }
        )
    if not found:
        raise FileNotFoundError(f"no DCP evaluations (sparsity-<target>-seed<seed>.json) in {eval_dir}; run `dvc repro evaluate`")
    return found


def zero_shot_scores(cfg: DictConfig, model, tokenizer) -> dict:
    """Score the local zero-shot tasks with the keep policy currently set on `model`."""
    from src.eval.zero_shot import PrunedContextLM, evaluate, load_tasks, prepare_local_tasks, resolve_task_names

    names = resolve_task_names(cfg.zero_shot.tasks)
    tasks = load_tasks(names, prepare_local_tasks(cfg.local_tasks))
    lm = PrunedContextLM(model, tokenizer, batch_size=cfg.zero_shot.batch_size, max_length=None)
    summary = evaluate(lm, tasks, cfg.zero_shot.limit, seed=cfg.zero_shot.seed)
    return {"tasks": summary, "zero_shot_sparsity": lm.keep_summary().get("sparsity")}


def run_baseline(cfg: DictConfig, budget: dict, name: str, model, tokens, tokenizer) -> dict:
    keep_fraction = 1.0 - budget["dcp_sparsity"]
    policy = make_keep_policy(name, keep_fraction, length=cfg.window, **(cfg.options.get(name) or {}))
    apply_keep_policy(model, policy)

    record = {"baseline": name, **budget, "keep_fraction": keep_fraction, "policy": describe_policy(policy)}
    record.update(evaluate_tokens(model, tokens, cfg.window, cfg.stride, cfg.batch_size, cfg.max_windows or None))
    if cfg.zero_shot.enabled:
        record.update(zero_shot_scores(cfg, model, tokenizer))
    apply_keep_policy(model, None)
    logger.info("%s at sparsity %.3f: perplexity %.2f", name, record["sparsity"], record["perplexity"])
    return record


@hydra.main(version_base="1.3", config_path="../conf", config_name="baselines")
def main(cfg: DictConfig) -> None:
    data_dir = Path(cfg.data_dir)
    tokens = load_split(data_dir, cfg.split)
    tokenizer = load_tokenizer(data_dir)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    records = []
    for budget in budgets(Path(cfg.eval_dir)):
        dense_dir = Path(cfg.dense_model_dir.format(seed=budget["seed"]))
        model = load_for_inference(str(dense_dir))
        for name in cfg.names:
            record = run_baseline(cfg, budget, name, model, tokens, tokenizer)
            records.append(record)
            tag = f"{name}-{budget['target_sparsity']:g}-seed{budget['seed']}"
            (out_dir / f"{tag}.json").write_text(json.dumps(record, indent=2) + "\n")
            metrics = {f"baseline/{name}-{budget['target_sparsity']:g}/{cfg.split}_perplexity": record["perplexity"]}
            tracking.log_to_training_run(dense_dir, metrics)

    logger.info("evaluated %d baseline runs into %s", len(records), out_dir)


if __name__ == "__main__":
    main()
