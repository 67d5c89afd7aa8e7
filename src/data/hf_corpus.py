"""Documents from Hugging Face datasets, split into train, val and test.

A data config with `source: hf` names one dataset with flat keys (`path`, `config_name`, `text_column`,
...; see conf/data/hf.yaml) or several under `datasets:` (see conf/data/wikipedia_bookcorpus.yaml).
Each entry is loaded with `datasets.load_dataset`, so `path` is a Hub id or a packaged builder
such as `json`, `parquet` or `text` together with `data_files`.

Splits: a dataset's own validation and test splits are used when present (`val_split` and
`test_split`, "auto" by default). Whatever is missing is carved from its train split by whole
documents, with `data.split_fractions` and `data.split_seed`:

- non-streaming: an exact seeded shuffle, with at least one document per carved split;
- streaming: a seeded hash of each document's position, so the stream is read once and never
  held in memory, but a short stream can leave a split empty (reported as an error at the end).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from src.data.corpus import SPLITS, Document, hashed_split, shuffled_assignment

log = logging.getLogger(__name__)

AUTO = "auto"
VAL_SPLIT_NAMES = ("validation", "valid", "val", "dev")
TEST_SPLIT_NAMES = ("test",)
ROW_BATCH_SIZE = 1000


@dataclass(frozen=True)
class SourceSpec:
    """One dataset entry of a `source: hf` data config."""

    path: str
    # The dataset's configuration, `name=` of load_dataset (`data.name` names the prepared data).
    config_name: str | None = None
    data_files: Any = None
    data_dir: str | None = None
    revision: str | None = None
    split: str = "train"
    val_split: str | None = AUTO
    test_split: str | None = AUTO
    text_column: str = "text"
    title_column: str | None = None
    id_column: str | None = None
    max_documents: int | None = None
    # Consecutive rows joined into one document, for datasets of single sentences (BookCorpus).
    rows_per_document: int = 1
    row_separator: str = " "
    label: str | None = None

    @property
    def display_name(self) -> str:
        if self.label:
            return self.label
        return f"{self.path}:{self.config_name}" if self.config_name else self.path


_SPEC_KEYS = {spec_field.name for spec_field in fields(SourceSpec)}


def parse_sources(data_cfg: Mapping) -> list[SourceSpec]:
    """Read the dataset entries of a data config and check them before anything is loaded."""
    entries = data_cfg.get("datasets")
    if entries is None:
        flat = {key: value for key, value in data_cfg.items() if key in _SPEC_KEYS}
        return [_parse_source(flat, "data")]
    if not entries:
        raise ValueError("data.datasets is empty. List at least one dataset (see conf/data/hf.yaml).")

    return [
        _parse_source(dict(entry), f"data.datasets[{index}]") for index, entry in enumerate(entries)
    ]


def _parse_source(entry: dict, where: str) -> SourceSpec:
    unknown = sorted(set(entry) - _SPEC_KEYS)
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}. Known keys: {sorted(_SPEC_KEYS)}.")
    # "???" is OmegaConf's marker for a mandatory value that was never set (conf/data/hf.yaml).
    if not entry.get("path") or entry["path"] == "???":
        raise ValueError(
            f"{where}.path is missing: set a Hub dataset id (data.path=wikimedia/wikipedia) or a "
            "builder with files (data.path=json data.data_files=docs.jsonl)."
        )

    spec = SourceSpec(**{key: value for key, value in entry.items() if key in _SPEC_KEYS})
    if not spec.text_column:
        raise ValueError(f"{where}.text_column is missing: set it to the column that contains the text.")
    if spec.max_documents is not None and (
        not isinstance(spec.max_documents, int) or spec.max_documents < 1
    ):
        raise ValueError(
            f"{where}.max_documents={spec.max_documents!r} is invalid: use a positive integer, "
            "or null for all documents."
        )
    if not isinstance(spec.rows_per_document, int) or spec.rows_per_document < 1:
        raise ValueError(
            f"{where}.rows_per_document={spec.rows_per_document!r} is invalid: use a positive integer."
        )
    return spec


@dataclass
class SourcePlan:
    """A loaded dataset entry: which of its splits feeds which output split, and how."""

    spec: SourceSpec
    index: int
    # Output split -> dataset split used as a whole ("val" -> "validation").
    native: dict[str, str]
    # Output splits carved out of the dataset's train split.
    carved: list[str]
    datasets: dict[str, Any] = field(repr=False)
    # Known-length carving: split index (0 train, 1 val, 2 test) per train document; None when streaming.
    assignment: np.ndarray | None = field(default=None, repr=False)


def load_source_splits(spec: SourceSpec, streaming: bool, cache_dir: str | None) -> dict[str, Any]:
    """Load every split of one dataset entry (a DatasetDict, or an IterableDatasetDict when streaming)."""
    import datasets

    kwargs = {
        "path": spec.path,
        "name": spec.config_name,
        "data_files": spec.data_files,
        "data_dir": spec.data_dir,
        "revision": spec.revision,
        "cache_dir": cache_dir,
    }
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    if isinstance(kwargs.get("data_files"), Mapping):
        kwargs["data_files"] = dict(kwargs["data_files"])

    log.info("Loading dataset %s (streaming=%s)", spec.display_name, streaming)
    loaded = datasets.load_dataset(**kwargs, streaming=streaming)
    return dict(loaded)


def _resolve_split(
    requested: str | None, candidates: tuple[str, ...], available: list[str], key: str, spec: SourceSpec
) -> str | None:
    if requested is None:
        return None
    if requested == AUTO:
        return next((name for name in candidates if name in available), None)
    if requested not in available:
        raise ValueError(
            f"Dataset {spec.display_name} has no split {requested!r} ({key}). Available splits: "
            f"{available}. Set {key} to one of them, to '{AUTO}', or to null to carve it from "
            f"{spec.split!r}."
        )
    return requested


def column_names(dataset) -> list[str]:
    """Return a dataset's columns; a streamed dataset without declared features is peeked at."""
    names = getattr(dataset, "column_names", None)
    if names:
        return list(names)
    first = next(iter(dataset), None)
    return list(first) if first else []


def _check_columns(spec: SourceSpec, split_name: str, dataset) -> None:
    available = column_names(dataset)
    requested_columns = {"text_column": spec.text_column, "title_column": spec.title_column, "id_column": spec.id_column}
    for key, column in requested_columns.items():
        if column is not None and column not in available:
            raise ValueError(
                f"Column {column!r} ({key}) not found in dataset {spec.display_name}, split "
                f"{split_name!r}. Available columns: {available}. Set {key} to one of them."
            )


def _num_documents(spec: SourceSpec, dataset) -> int:
    rows = dataset.num_rows
    if spec.max_documents is not None:
        rows = min(rows, spec.max_documents * spec.rows_per_document)
    return math.ceil(rows / spec.rows_per_document)


def carve_counts(
    num_documents: int, fractions: Mapping[str, float], carved: list[str], description: str
) -> dict[str, int]:
    """Return document counts per split when only the `carved` splits are cut out of train."""
    if num_documents < len(carved) + 1:
        raise ValueError(
            f"{description} has {num_documents} documents, too few to carve {carved} out of train with at "
            "least one document each. Add data (raise max_documents)."
        )

    counts = {name: 0 for name in SPLITS}
    for name in carved:
        counts[name] = max(1, round(num_documents * fractions[name]))
    counts["train"] = num_documents - sum(counts[name] for name in carved)
    if counts["train"] < 1:
        raise ValueError(
            f"Carving {carved} out of {num_documents} documents of {description} with fractions "
            f"{dict(fractions)} leaves train empty. Lower those fractions or add data."
        )
    return counts


def plan_source(
    spec: SourceSpec,
    index: int,
    fractions: Mapping[str, float],
    seed: int,
    streaming: bool,
    cache_dir: str | None,
) -> SourcePlan:
    """Load one dataset entry, map its splits to train/val/test and check columns and sizes."""
    loaded = load_source_splits(spec, streaming, cache_dir)
    available = sorted(loaded)
    if spec.split not in loaded:
        raise ValueError(
            f"Dataset {spec.display_name} has no split {spec.split!r}. Available splits: "
            f"{available}. Set split to one of them."
        )

    native = {"train": spec.split}
    val = _resolve_split(spec.val_split, VAL_SPLIT_NAMES, available, "val_split", spec)
    test = _resolve_split(spec.test_split, TEST_SPLIT_NAMES, available, "test_split", spec)
    if val is not None:
        native["val"] = val
    if test is not None:
        native["test"] = test
    carved = [name for name in ("val", "test") if name not in native]
    if len(set(native.values())) < len(native):
        raise ValueError(
            f"Dataset {spec.display_name} would feed one split into several outputs: {native}. "
            "Give split, val_split and test_split different splits (or null to carve from train)."
        )

    for split_name in set(native.values()):
        _check_columns(spec, split_name, loaded[split_name])

    plan = SourcePlan(spec=spec, index=index, native=native, carved=carved, datasets=loaded)
    if not streaming:
        _check_native_sizes(plan)
        if carved:
            train_docs = _num_documents(spec, loaded[spec.split])
            counts = carve_counts(train_docs, fractions, carved, f"Dataset {spec.display_name}")
            plan.assignment = shuffled_assignment(counts, [seed, index])
    log.info(
        "Dataset %s: splits %s, carved from %r: %s",
        spec.display_name,
        native,
        spec.split,
        carved or "none",
    )
    return plan


def _check_native_sizes(plan: SourcePlan) -> None:
    for output_split, split_name in plan.native.items():
        if plan.datasets[split_name].num_rows == 0:
            raise ValueError(
                f"Split {split_name!r} of dataset {plan.spec.display_name} (used as {output_split}) "
                "is empty. Point the entry at a split with documents, or set its "
                f"{output_split}_split to null to carve {output_split} from the train split."
            )


def iter_documents(spec: SourceSpec, dataset, split_name: str) -> Iterator[Document]:
    """Yield the documents of one dataset split in order, grouping rows and honouring max_documents."""
    import datasets

    columns = [c for c in (spec.text_column, spec.title_column, spec.id_column) if c is not None]
    dataset = dataset.select_columns(list(dict.fromkeys(columns)))
    if spec.max_documents is not None:
        max_rows = spec.max_documents * spec.rows_per_document
        if isinstance(dataset, datasets.Dataset):
            dataset = dataset.select(range(min(dataset.num_rows, max_rows)))
        else:
            dataset = dataset.take(max_rows)

    group: list[dict] = []
    first_row = 0
    row_index = 0
    for batch in dataset.iter(batch_size=ROW_BATCH_SIZE):
        for offset in range(len(batch[spec.text_column])):
            group.append({column: batch[column][offset] for column in columns})
            if len(group) == spec.rows_per_document:
                yield _make_document(spec, split_name, group, first_row)
                group = []
                first_row = row_index + 1
            row_index += 1
    if group:
        yield _make_document(spec, split_name, group, first_row)


def _make_document(spec: SourceSpec, split_name: str, rows: list[dict], first_row: int) -> Document:
    texts = []
    for row in rows:
        text = row[spec.text_column]
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise ValueError(
                f"Column {spec.text_column!r} of dataset {spec.display_name} contains "
                f"{type(text).__name__} values, not strings. Set text_column to a string column."
            )
        texts.append(text)

    last_row = first_row + len(rows) - 1
    if spec.id_column is not None:
        doc_id = str(rows[0][spec.id_column])
    elif len(rows) == 1:
        doc_id = f"{spec.display_name}/{split_name}/{first_row}"
    else:
        doc_id = f"{spec.display_name}/{split_name}/{first_row}-{last_row}"
    title = str(rows[0][spec.title_column]) if spec.title_column is not None else doc_id

    return Document(
        id=doc_id,
        title=title,
        text=spec.row_separator.join(texts),
        meta={"source": spec.display_name, "source_split": split_name},
    )


def iter_plan(plan: SourcePlan, fractions: Mapping[str, float], seed: int) -> Iterator[tuple[str, Document]]:
    """Yield (output split, document) for every document of one planned dataset entry."""
    spec = plan.spec
    for position, document in enumerate(iter_documents(spec, plan.datasets[spec.split], spec.split)):
        yield _carved_split(plan, position, document, fractions, seed), document

    for output_split in ("val", "test"):
        split_name = plan.native.get(output_split)
        if split_name is not None:
            for document in iter_documents(spec, plan.datasets[split_name], split_name):
                yield output_split, document


def _carved_split(
    plan: SourcePlan, position: int, document: Document, fractions: Mapping[str, float], seed: int
) -> str:
    if not plan.carved:
        return "train"
    if plan.assignment is not None:
        return SPLITS[plan.assignment[position]]

    split = hashed_split(f"{plan.index}:{position}", seed, fractions)
    return split if split in plan.carved else "train"


@dataclass
class HFCorpus:
    """All dataset entries of a `source: hf` config, loaded and checked, ready to be iterated."""

    plans: list[SourcePlan]
    fractions: dict[str, float]
    seed: int

    def labelled_documents(self) -> Iterator[tuple[str, Document]]:
        """Yield (split, document) over all entries; each call reads the datasets again."""
        for plan in self.plans:
            yield from iter_plan(plan, self.fractions, self.seed)

    def train_texts(self) -> Iterator[str]:
        for split, document in self.labelled_documents():
            if split == "train":
                yield document.text

    def describe(self) -> list[dict]:
        return [
            {
                "dataset": plan.spec.display_name,
                "path": plan.spec.path,
                "config_name": plan.spec.config_name,
                "revision": plan.spec.revision,
                "splits": plan.native,
                "carved_from_train": plan.carved,
                "max_documents": plan.spec.max_documents,
                "rows_per_document": plan.spec.rows_per_document,
            }
            for plan in self.plans
        ]


def load_hf_corpus(data_cfg: Mapping, fractions: Mapping[str, float], seed: int) -> HFCorpus:
    """Parse, load and check every dataset entry of a `source: hf` data config."""
    specs = parse_sources(data_cfg)
    streaming = bool(data_cfg.get("streaming", False))
    cache_dir = data_cfg.get("cache_dir")
    plans = [
        plan_source(spec, index, fractions, seed, streaming, cache_dir)
        for index, spec in enumerate(specs)
    ]
    return HFCorpus(plans=plans, fractions=dict(fractions), seed=seed)
