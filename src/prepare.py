"""Data preparation stage: text corpus -> tokenizer + memory-mapped token files + stats.json.

    python -m src.prepare                                  # built-in Shakespeare corpus
    python -m src.prepare data=wikipedia_bookcorpus        # English Wikipedia + BookCorpus (Hub)
    python -m src.prepare data=hf data.path=json data.data_files=docs.jsonl data.tokenizer=gpt2

The output directory (`out_dir`, default data/prepared/${data.name}) is written under a temporary
name and swapped in at the end, so an interrupted run never leaves a half-written directory behind.
Its layout is described in src/data/tokenize.py, and src/data/blocks.py reads it.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from src.data.corpus import SPLITS, load_builtin, split_documents, validate_fractions
from src.data.hf_corpus import load_hf_corpus, parse_sources
from src.data.tokenize import (
    TOKENIZER_DIRNAME,
    TRAIN_TOKENIZER,
    load_tokenizer,
    train_bpe_tokenizer,
    validate_vocab_size,
    write_splits,
    write_stats,
)

log = logging.getLogger(__name__)

SOURCES = ("builtin", "hf")
BUILTIN_TEXT_FORMAT = (
    "Title line, then paragraphs separated by a blank line: act and scene headings as plain "
    "lines, 'SPEAKER:' followed by the spoken lines, stage directions in [square brackets]."
)


def _positive_int(data: Mapping, key: str, default: int) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"data.{key}={value!r} is invalid: use a positive integer.")
    return value


def validate_data_config(data: Mapping) -> None:
    """Check the cheap parts of a data config, so mistakes fail before any long work starts."""
    if not data.get("name"):
        raise ValueError("data.name is missing: it names the prepared data (data/prepared/<name>).")

    source = data.get("source")
    if source not in SOURCES:
        raise ValueError(
            f"Unknown data source data.source={source!r}. Use one of {list(SOURCES)}: 'builtin' "
            "(data=shakespeare) or 'hf' for Hugging Face datasets (data=hf, data=wikipedia_bookcorpus)."
        )

    validate_fractions(data.get("split_fractions", {}))
    seed = data.get("split_seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"data.split_seed={seed!r} is invalid: use a non-negative integer.")
    _positive_int(data, "batch_size", 64)

    tokenizer = data.get("tokenizer")
    if not tokenizer or not isinstance(tokenizer, str):
        raise ValueError(
            f"data.tokenizer={tokenizer!r} is invalid: use '{TRAIN_TOKENIZER}' to train a byte-level "
            "BPE tokenizer, or a Hugging Face tokenizer id or directory such as 'gpt2'."
        )
    if tokenizer == TRAIN_TOKENIZER:
        validate_vocab_size(data.get("vocab_size"))

    if source == "hf":
        parse_sources(data)


def check_out_dir(out_dir: Path) -> None:
    """Reject an existing, non-empty out_dir without stats.json, so only prepared data is replaced."""
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "stats.json").is_file():
        raise ValueError(
            f"out_dir={out_dir} exists, is not empty and contains no stats.json, so it is not prepared "
            "data and will not be replaced. Choose another out_dir or empty that directory."
        )


def _replace_directory(staging: Path, out_dir: Path) -> None:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)


def _get_tokenizer(data: Mapping, train_texts):
    if data["tokenizer"] != TRAIN_TOKENIZER:
        return load_tokenizer(data["tokenizer"])

    start = time.perf_counter()
    tokenizer = train_bpe_tokenizer(train_texts(), data["vocab_size"], data.get("min_frequency", 2))
    log.info(
        "Trained a byte-level BPE tokenizer on the train split: vocabulary of %d in %.1f s",
        len(tokenizer),
        time.perf_counter() - start,
    )
    return tokenizer


def prepare(data: Mapping, out_dir: str | Path) -> dict:
    """Prepare one data config into `out_dir` and return the statistics written to stats.json."""
    data = OmegaConf.to_container(data, resolve=True) if isinstance(data, DictConfig) else dict(data)
    out_dir = Path(out_dir)
    validate_data_config(data)
    check_out_dir(out_dir)

    fractions = validate_fractions(data["split_fractions"])
    seed = data.get("split_seed", 0)
    # A pretrained tokenizer loads before the corpus, so a wrong id fails fast.
    pretrained = load_tokenizer(data["tokenizer"]) if data["tokenizer"] != TRAIN_TOKENIZER else None

    if data["source"] == "builtin":
        corpus = data.get("corpus", data["name"])
        splits = split_documents(load_builtin(corpus), fractions, seed, f"{corpus} documents")

        def labelled():
            return ((split, document) for split in SPLITS for document in splits[split])

        def train_texts():
            return (document.text for document in splits["train"])

        source_info = {"corpus": corpus, "text_format": BUILTIN_TEXT_FORMAT}
    else:
        hf_corpus = load_hf_corpus(data, fractions, seed)
        labelled = hf_corpus.labelled_documents
        train_texts = hf_corpus.train_texts
        source_info = {"datasets": hf_corpus.describe(), "streaming": bool(data.get("streaming"))}

    tokenizer = pretrained if pretrained is not None else _get_tokenizer(data, train_texts)

    staging = out_dir.parent / f".{out_dir.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        stats = _write_prepared(data, staging, tokenizer, labelled, source_info, fractions, seed)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    _replace_directory(staging, out_dir)
    return stats


def _write_prepared(data, staging: Path, tokenizer, labelled, source_info, fractions, seed) -> dict:
    tokenizer.save_pretrained(staging / TOKENIZER_DIRNAME)
    stats = {
        "name": data["name"],
        "source": data["source"],
        **source_info,
        "tokenizer": data["tokenizer"],
        "tokenizer_dir": TOKENIZER_DIRNAME,
        "split_fractions": fractions,
        "split_seed": seed,
        "document_separator": "eos_id after every document",
    }
    stats.update(
        write_splits(
            labelled(),
            tokenizer,
            staging,
            batch_size=data.get("batch_size", 64),
            max_titles=data.get("max_titles_in_stats", 1000),
        )
    )
    write_stats(staging, stats)
    return stats


def log_summary(stats: Mapping, out_dir: Path, seconds: float) -> None:
    log.info(
        "Prepared %s in %.1f s -> %s (vocab %d, %s, eos id %d)",
        stats["name"],
        seconds,
        out_dir,
        stats["vocab_size"],
        stats["dtype"],
        stats["eos_id"],
    )
    for split, split_stats in stats["splits"].items():
        log.info(
            "  %-5s %6d documents %10d tokens %12d characters %.3f bytes/token",
            split,
            split_stats["documents"],
            split_stats["tokens"],
            split_stats["characters"],
            split_stats["bytes_per_token"] or 0.0,
        )


@hydra.main(version_base="1.3", config_path="../conf", config_name="prepare")
def main(cfg: DictConfig) -> None:
    out_dir = Path(hydra.utils.to_absolute_path(cfg.out_dir))
    start = time.perf_counter()
    stats = prepare(cfg.data, out_dir)
    log_summary(stats, out_dir, time.perf_counter() - start)


if __name__ == "__main__":
    main()
