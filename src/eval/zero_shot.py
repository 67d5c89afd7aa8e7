"""Zero-shot evaluation with lm-evaluation-harness 0.4.13, through the model's own forward pass.

`PrunedContextLM` subclasses lm_eval's `HFLM` for tokenisation, request handling and rolling
windows, and replaces its loglikelihood loop. HFLM calls `model(input_ids)` on right-padded
batches without an attention mask. The loop here passes the attention mask instead, so padding never
counts in the keep statistics. DCP models run at alpha = inf, so the hard keep mask applies to
every scored sequence, and the loop accumulates that mask's statistics to report the sparsity
measured on the task inputs.

Task sets: `local` is the tasks generated from held-out plays (see `local_tasks`), which run
offline. `paper` is winogrande, hellaswag, piqa and lambada_openai, the zero-shot tasks reported for
Dynamic Context Pruning (Anagnostidis et al., 2023), whose data comes from the Hugging Face Hub.
"""

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from transformers import AutoTokenizer, PreTrainedModel

from src.dcp import DCPGPT2LMHeadModel

logger = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
LOCAL_TASKS = ("dcp_next_line", "dcp_speaker", "dcp_cloze")
PAPER_TASKS = ("winogrande", "hellaswag", "piqa", "lambada_openai")
TASK_SETS = {"local": LOCAL_TASKS, "paper": PAPER_TASKS}


# ---------------------------------------------------------------------------------------------
# Model loading.


def resolve_model_paths(model_dir: Path) -> tuple[Path, Path]:
    """Return (weights dir, tokenizer dir) for a pipeline model dir (`<dir>/model/`) or a plain HF dir."""
    model_dir = Path(model_dir)
    for weights in (model_dir / "model", model_dir):
        if (weights / "config.json").exists():
            break
    else:
        raise FileNotFoundError(
            f"no config.json in {model_dir} or {model_dir / 'model'}: pass a Hugging Face model folder "
            "or a pipeline model dir such as models/finetuned/<tag>"
        )

    for tokenizer in (weights, weights / "tokenizer", model_dir / "tokenizer", model_dir):
        if (tokenizer / "tokenizer.json").exists() or (tokenizer / "tokenizer_config.json").exists():
            return weights, tokenizer
    raise FileNotFoundError(f"no tokenizer found beside {weights}; save it there with tokenizer.save_pretrained")


def load_model(model_dir: Path, device: str = "cpu") -> tuple[DCPGPT2LMHeadModel, Any]:
    """Load the model and tokenizer of `model_dir` in eval mode at alpha = inf.

    Dense GPT-2 checkpoints load as DCPGPT2LMHeadModel with dcp_enabled=False, so that a baseline
    keep policy can be applied to them.
    """
    from src.training.loading import load_for_inference

    weights, tokenizer_dir = resolve_model_paths(model_dir)
    model = load_for_inference(str(weights)).to(device)
    model.set_alpha(math.inf)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    logger.info("loaded %s (dcp_enabled=%s) from %s", type(model).__name__, model.config.dcp_enabled, weights)
    return model, tokenizer


def run_record_dir(model_dir: Path) -> Path:
    """Return the folder that contains run.json: the weights folder if it has one, else `model_dir`."""
    model_dir = Path(model_dir)
    weights, _ = resolve_model_paths(model_dir)
    return weights if (weights / "run.json").exists() else model_dir


def default_tag(model_dir: Path) -> str:
    """Name a model after its folder, skipping a trailing `model` (models/finetuned/<tag>/model)."""
    path = Path(model_dir).resolve()
    return path.parent.name if path.name == "model" else path.name


def pick_device(device: str) -> str:
    """Map "auto" to cuda when available, else cpu."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


# ---------------------------------------------------------------------------------------------
# The lm_eval model wrapper.


class PrunedContextLM(HFLM):
    """HFLM whose loglikelihood requests run through our forward with an attention mask.

    It works for any causal LM that accepts `attention_mask`. For models that return keep statistics
    (DCPGPT2LMHeadModel), `keep_summary()` reports the sparsity over all scored sequences.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: Any, batch_size: int = 16, max_length: int | None = None):
        if isinstance(model, DCPGPT2LMHeadModel):
            model.set_alpha(math.inf)
        if tokenizer.eos_token_id is None:
            raise ValueError(
                "the tokenizer has no eos_token; lm_eval uses it as the prefix of empty contexts. "
                "Set one (for example '<|endoftext|>') and save the tokenizer again."
            )
        super().__init__(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size, max_length=max_length)
        self.keep_sum: torch.Tensor | None = None  # (L,) float64
        self.pair_count: torch.Tensor | None = None  # (L,) float64
        self.scored_sequences = 0
        self.truncated_sequences = 0

    def generate_until(self, requests, disable_tqdm: bool = False):
        # NOTE: generation tasks are not supported, because DCPGPT2LMHeadModel.forward takes no KV cache.
        raise NotImplementedError("PrunedContextLM scores loglikelihoods only; generate_until tasks are not supported")

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """Score (context tokens, continuation tokens) pairs: returns (sum log p, greedy match) per request."""
        batch_size = int(override_bs or self.batch_size)
        order = sorted(range(len(requests)), key=lambda index: -(len(requests[index][1]) + len(requests[index][2])))
        results: list[tuple[float, bool] | None] = [None] * len(requests)

        for first in range(0, len(order), batch_size):
            indices = order[first : first + batch_size]
            answers = self._score_batch([requests[index] for index in indices])
            for index, answer in zip(indices, answers, strict=True):
                results[index] = answer
                if requests[index][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[index][0], answer)
        return results

    def _score_batch(self, batch) -> list[tuple[float, bool]]:
        inputs, continuations = [], []
        for _, context_enc, continuation_enc in batch:
            if not continuation_enc:
                raise ValueError("lm_eval sent an empty continuation; the task's target renders to no tokens")
            if len(continuation_enc) > self.max_length:
                raise ValueError(f"continuation of {len(continuation_enc)} tokens exceeds the model context of {self.max_length}")
            whole = (context_enc + continuation_enc)[-(self.max_length + 1) :]
            self.truncated_sequences += int(len(context_enc) + len(continuation_enc) > self.max_length + 1)
            inputs.append(whole[:-1])  # the last token is predicted, never input
            continuations.append(continuation_enc)

        # Right padding: (B, T) ids and mask.
        length = max(len(ids) for ids in inputs)
        input_ids = torch.zeros((len(inputs), length), dtype=torch.long)  # padding ids are masked out
        attention_mask = torch.zeros((len(inputs), length), dtype=torch.long)
        for row, ids in enumerate(inputs):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1

        with torch.no_grad():
            output = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))
        self._accumulate_keep_stats(output)
        self.scored_sequences += len(inputs)

        answers = []
        for row, (ids, continuation) in enumerate(zip(inputs, continuations, strict=True)):
            end = len(ids)
            predicted = F.log_softmax(output.logits[row, end - len(continuation) : end].float(), dim=-1)  # (n, V)
            target = torch.tensor(continuation, dtype=torch.long, device=predicted.device)
            total = float(predicted.gather(-1, target[:, None]).sum())
            greedy = bool((predicted.argmax(-1) == target).all())
            answers.append((total, greedy))
        return answers

    def _accumulate_keep_stats(self, output: Any) -> None:
        keep_sum = getattr(output, "layer_keep_sum", None)
        if keep_sum is None:
            return
        keep_sum = keep_sum.detach().double().cpu()
        pair_count = output.layer_pair_count.detach().double().cpu()
        if self.keep_sum is None:
            self.keep_sum, self.pair_count = keep_sum, pair_count
        else:
            self.keep_sum += keep_sum
            self.pair_count += pair_count

    def keep_summary(self) -> dict[str, Any]:
        """Return the sparsity (1 - kept fraction of valid pairs) over all scored sequences.

        `sparsity` is the mean over layers of the per-layer sparsity, as in the DCP model's keep_fraction.
        """
        summary: dict[str, Any] = {"scored_sequences": self.scored_sequences, "truncated_sequences": self.truncated_sequences}
        if self.keep_sum is None:
            summary.update(sparsity=None, layer_sparsity=None)
            return summary
        layer_sparsity = 1.0 - self.keep_sum / self.pair_count.clamp_min(1.0)
        summary.update(sparsity=float(layer_sparsity.mean()), layer_sparsity=[float(value) for value in layer_sparsity])
        return summary


# ---------------------------------------------------------------------------------------------
# Tasks.


def resolve_task_names(tasks: str | Sequence[str]) -> list[str]:
    """Expand the task sets "local" and "paper" and return a list of unique task names."""
    items = [tasks] if isinstance(tasks, str) else list(tasks)
    if not items:
        raise ValueError("zero_shot.tasks is empty; use 'local', 'paper' or a list of lm-eval task names")

    names: list[str] = []
    for item in items:
        for name in TASK_SETS.get(item, (item,)):
            if name not in names:
                names.append(name)
    return names


def load_tasks(names: Sequence[str], task_data_dir: Path | None) -> dict[str, Any]:
    """Load lm_eval task objects by name: local tasks from TASKS_DIR, others from lm_eval's registry.

    Raises RuntimeError naming HF_HUB_OFFLINE when a hub task's data cannot be loaded.
    """
    local = [name for name in names if name in LOCAL_TASKS]
    hub = [name for name in names if name not in LOCAL_TASKS]
    metadata = {"dcp_task_dir": str(Path(task_data_dir).resolve())} if task_data_dir is not None else None
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=bool(hub), metadata=metadata)

    unknown = [name for name in hub if name not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval tasks {unknown}; local tasks are {list(LOCAL_TASKS)}, sets are {list(TASK_SETS)}")

    tasks: dict[str, Any] = {}
    if local:
        tasks.update(manager.load(local)["tasks"])
    if hub:
        tasks.update(_load_hub_tasks(manager, hub))
    return tasks


def _load_hub_tasks(manager: TaskManager, names: list[str]) -> dict[str, Any]:
    offline = os.environ.get("HF_HUB_OFFLINE", "unset")
    try:
        return manager.load(names)["tasks"]
    except Exception as error:  # datasets raises several types for missing network or cache
        raise RuntimeError(
            f"could not load the data of lm-eval tasks {names} from the Hugging Face Hub (HF_HUB_OFFLINE={offline}): "
            f"{type(error).__name__}: {error}. Allow network access and unset HF_HUB_OFFLINE, or fill the "
            "datasets cache beforehand, or run the offline tasks with zero_shot.tasks=local."
        ) from error


def summarize_results(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Turn lm_eval's results into {task: {metric: value, metric_stderr: value}} (filter "none" only)."""
    summary: dict[str, dict[str, float]] = {}
    for task, values in results["results"].items():
        metrics = {}
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if filter_name != "none" or not isinstance(value, (int, float)):
                continue
            metrics[metric] = float(value)
        summary[task] = metrics
    return summary


def evaluate(
    lm: PrunedContextLM,
    tasks: dict[str, Any],
    limit: int | None,
    num_fewshot: int = 0,
    bootstrap_iters: int = 1000,
    seed: int = 1234,
) -> dict[str, dict[str, float]]:
    """Run lm_eval's simple_evaluate on loaded tasks and return the summarised metrics."""
    from lm_eval.evaluator import simple_evaluate

    # The tasks are loaded already; a manager without lm_eval's built-in index avoids indexing
    # thousands of task YAMLs, which simple_evaluate does when it gets no manager.
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    results = simple_evaluate(
        model=lm,
        tasks=list(tasks.values()),
        task_manager=manager,
        num_fewshot=num_fewshot,
        limit=limit,
        bootstrap_iters=bootstrap_iters,
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if results is None:
        raise RuntimeError("lm_eval returned no results (this happens on non-zero ranks of a distributed run)")
    return summarize_results(results)


def mlflow_metrics(summary: dict[str, dict[str, float]], keep: dict[str, Any], prefix: str = "zero_shot") -> dict[str, float]:
    """Flatten task metrics and sparsity into MLflow metric names `<prefix>/<task>/<metric>`."""
    metrics = {
        f"{prefix}/{task}/{metric}": value
        for task, values in summary.items()
        for metric, value in values.items()
        if not math.isnan(value)
    }
    if keep.get("sparsity") is not None:
        metrics[f"{prefix}/sparsity"] = keep["sparsity"]
    return metrics


# ---------------------------------------------------------------------------------------------
# The stage.


def prepare_local_tasks(settings: Any) -> Path:
    """Generate the local task files from the held-out documents and return their folder."""
    from src.eval.local_tasks import generate_local_tasks

    data_dir = Path(settings.data_dir)
    generate_local_tasks(
        Path(settings.documents),
        data_dir,
        max_examples=settings.max_examples,
        context_chars=settings.context_chars,
        seed=settings.seed,
    )
    return data_dir


def apply_baseline(model: PreTrainedModel, settings: Any) -> dict[str, Any] | None:
    """Replace the learned mask by the baseline named in `settings`; returns its description or None."""
    from src.eval.baselines import apply_keep_policy, describe_policy, policy_from_config

    policy = policy_from_config(settings, default_length=model.config.n_positions)
    if policy is None:
        return None
    apply_keep_policy(model, policy)
    return {**describe_policy(policy), "keep_fraction": float(settings.keep_fraction), "length": int(settings.get("length") or model.config.n_positions)}


def run_stage(cfg: Any) -> dict[str, Any]:
    """Evaluate one model on the configured tasks, write the metrics JSON and log to MLflow."""
    import json

    import lm_eval

    settings = cfg.zero_shot
    names = resolve_task_names(settings.tasks)
    task_data_dir = prepare_local_tasks(cfg.local_tasks) if any(name in LOCAL_TASKS for name in names) else None
    tasks = load_tasks(names, task_data_dir)

    device = pick_device(cfg.device)
    model_dir = Path(cfg.model_dir)
    model, tokenizer = load_model(model_dir, device)
    tag = cfg.get("tag") or default_tag(model_dir)
    baseline = apply_baseline(model, cfg.get("baseline"))
    lm = PrunedContextLM(model, tokenizer, batch_size=settings.batch_size, max_length=settings.max_length)
    summary = evaluate(lm, tasks, settings.limit, settings.num_fewshot, settings.bootstrap_iters, settings.seed)
    keep = lm.keep_summary()
    if keep["truncated_sequences"]:
        logger.warning("%d of %d scored sequences were cut from the left to fit %d tokens", keep["truncated_sequences"], keep["scored_sequences"], lm.max_length)

    record = {
        "tag": tag,
        "model_dir": str(model_dir),
        "tasks": summary,
        **keep,
        "baseline": baseline,
        "settings": {"limit": settings.limit, "num_fewshot": settings.num_fewshot, "max_length": lm.max_length, "seed": settings.seed},
        "lm_eval_version": lm_eval.__version__,
    }
    output = Path(cfg.get("out_path") or f"metrics/zero_shot/{tag}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2) + "\n")
    logger.info("wrote %s: %s", output, {task: values.get("acc") for task, values in summary.items()})

    if cfg.mlflow:
        from src.tracking import log_to_training_run

        # Baseline runs log into the same training run, so their metric names carry the policy.
        prefix = f"zero_shot/{baseline['name']}-{baseline['keep_fraction']:g}" if baseline else "zero_shot"
        log_to_training_run(run_record_dir(model_dir), mlflow_metrics(summary, keep, prefix), artifacts=[output])
    return record
