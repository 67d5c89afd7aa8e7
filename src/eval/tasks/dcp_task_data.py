"""Dataset loaders of the local zero-shot tasks, referenced from the task YAMLs with `!function`.

lm-evaluation-harness imports this file by path, so it depends on `datasets` only. It passes the
TaskManager's metadata as keyword arguments; `dcp_task_dir` (set by `src.eval.zero_shot`) names the
folder that `src.eval.local_tasks.generate_local_tasks` wrote. On the lm_eval command line use
`--include_path src/eval/tasks --metadata '{"dcp_task_dir": "data/zero_shot/shakespeare"}'`.
"""

import json
from pathlib import Path

import datasets


def _load(filename: str, dcp_task_dir: str | None = None, **_: object) -> datasets.DatasetDict:
    if dcp_task_dir is None:
        raise ValueError(
            "the local dcp tasks need metadata dcp_task_dir (the folder of the generated task files); "
            "pass it via TaskManager(metadata=...) or lm_eval --metadata"
        )
    path = Path(dcp_task_dir) / filename
    if not path.exists():
        raise FileNotFoundError(f"local task data {path} not found; generate it with python -m src.zero_shot")

    with path.open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_next_line(**kwargs: object) -> datasets.DatasetDict:
    return _load("next_line.jsonl", **kwargs)


def load_speaker(**kwargs: object) -> datasets.DatasetDict:
    return _load("speaker.jsonl", **kwargs)


def load_cloze(**kwargs: object) -> datasets.DatasetDict:
    return _load("cloze.jsonl", **kwargs)
